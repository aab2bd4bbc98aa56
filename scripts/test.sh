#!/usr/bin/env bash
# The second command: install everything, make sure the services the tests talk to are
# running, then lint, type-check, check the layers and run the whole test suite.
# Arguments go to pytest (e.g. -k relay -x).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh "runtime,dev"
export PATH="$PWD/.venv/bin:$PATH"

# A browser for the web page's tests: Debian's Chromium (never a downloaded one), and a
# CJK font so the Chinese page renders in its screenshots.
if { [ ! -x /usr/bin/chromium ] || [ ! -d /usr/share/fonts/truetype/wqy ]; } \
    && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
      chromium fonts-wqy-microhei) >/dev/null \
    || echo "warning: could not install chromium; browser tests will be skipped"
fi
# PostgreSQL on 127.0.0.1:5432 (started if installed and down).
if ! (echo > /dev/tcp/127.0.0.1/5432) 2>/dev/null && command -v pg_ctlcluster >/dev/null; then
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start || true
fi

echo "== ruff";        ruff check src tests bench
echo "== mypy";        mypy
echo "== layers";      lint-imports
echo "== pytest"
set +e
# Two workers (VIDMAAS_TEST_WORKERS; 0 runs in one process), a test file per worker at a
# time: most tests wait on servers, jobs and browsers, so two share two cores well.
python -m pytest -n "${VIDMAAS_TEST_WORKERS:-2}" --dist loadfile "$@"
rc=$?
set -e
# pytest's "no tests collected" is a failure here, not a silent pass.
[ "$rc" = 5 ] && { echo "no tests ran"; exit 1; }
exit "$rc"
