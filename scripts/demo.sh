#!/usr/bin/env bash
# Run the demo on the embedded data: set up .venv if needed, then python -m sort3ddepth.demo.
# Arguments go to the demo, e.g.  bash scripts/demo.sh --output_dir /tmp/demo --seed 3
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup_venv.sh"
cd "$ROOT"
exec "$ROOT/.venv/bin/python" -m sort3ddepth.demo "$@"
