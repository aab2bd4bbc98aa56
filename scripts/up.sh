#!/usr/bin/env bash
# The first command: install what is needed, then run the whole system embedded
# (API + dispatcher + relay, SQLite, an embedded Redis, local jobs, tiny models).
# Arguments go to `vidmaas up` (e.g. --port 8080 --data-dir ./mydata).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh runtime
exec .venv/bin/vidmaas up "$@"
