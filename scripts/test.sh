#!/usr/bin/env bash
# Run the test suite (what CI runs): set up .venv if needed, then pytest from the repo root.
# Extra arguments go to pytest, e.g.  bash scripts/test.sh sort3ddepth/tests/test_plugin.py -x
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup_venv.sh"
cd "$ROOT"
exec "$ROOT/.venv/bin/python" -m pytest -q -p no:cacheprovider --durations=15 "$@"
