#!/usr/bin/env bash
# Creates .venv at the repository root and installs vidmaas into it, with the extras
# named in $1 (default: runtime). Re-running is cheap: nothing is reinstalled unless
# pyproject.toml or the runtime constraints changed. Needs only Python 3.11+.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-runtime}"
py="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$py" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "vidmaas needs Python 3.11 or newer")'
  "$py" -m venv .venv
  .venv/bin/python -m pip install --quiet --upgrade pip
fi
stamp=".venv/.vidmaas-installed-$extras"
constraints="deploy/images/runtime-constraints.txt"
want="$(cat pyproject.toml "$constraints" | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  if ! .venv/bin/python -c 'import torch' 2>/dev/null; then
    # The CPU build used on machines without a GPU; GPU images bring their own torch.
    .venv/bin/python -m pip install --quiet "torch==2.13.0"
  fi
  # Under the runtime image's constraints: the tests run the versions the image ships,
  # not whatever the package index has newest today.
  .venv/bin/python -m pip install --quiet -e ".[$extras]" -c "$constraints"
  echo "$want" > "$stamp"
fi
