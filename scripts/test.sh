#!/usr/bin/env bash
# Set up (once) and run the whole test suite: `bash scripts/test.sh`.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v chromium >/dev/null 2>&1; then  # for the browser test of the app
  (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) || echo "chromium could not be installed"
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q -r requirements.txt
.venv/bin/ruff check .
.venv/bin/python -m pytest -q "$@"
