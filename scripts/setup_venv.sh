#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment in .venv and install the package into it
# in editable mode with the test extras (pytest, ruff). Idempotent: when .venv/.sort3ddepth-installed is newer
# than setup.py, nothing is reinstalled.
#
# The interpreter must be CPython 3.9-3.12 WITH tkinter (Scipion's pwem imports tkinter while it
# registers plugins, even headless). Candidates, first usable wins: $PYTHON, then every python3.11,
# python3.12, python3.10, python3 found on PATH.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
STAMP="$VENV/.sort3ddepth-installed"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1

log() { echo "[setup_venv] $*" >&2; }

# fails unless "$1" is CPython 3.9-3.12 with tkinter; with a 2nd argument, it must also make venvs
usable() {
    "$1" - ${2:+venv} <<'EOF' >/dev/null 2>&1
import sys
assert (3, 9) <= sys.version_info[:2] <= (3, 12), sys.version
import tkinter  # noqa: F401
if "venv" in sys.argv[1:]:
    import venv, ensurepip  # noqa: F401
EOF
}

if [ -x "$VENV/bin/python" ]; then
    if ! usable "$VENV/bin/python"; then
        log "ERROR: $VENV exists but its Python ($("$VENV/bin/python" -V 2>&1)) lacks tkinter or"
        log "is not 3.9-3.12. Remove it (rm -rf .venv) and run this script again."
        exit 1
    fi
    if [ -f "$STAMP" ] && [ "$STAMP" -nt "$ROOT/setup.py" ]; then
        exit 0          # up to date
    fi
else
    PY=""
    candidates=()
    [ -n "${PYTHON:-}" ] && candidates+=("$PYTHON")
    for name in python3.11 python3.12 python3.10 python3; do
        while IFS= read -r p; do candidates+=("$p"); done < <(type -ap "$name" 2>/dev/null || true)
    done
    for p in "${candidates[@]}"; do
        if usable "$p" venv; then PY="$p"; break; fi
    done
    if [ -z "$PY" ]; then
        log "ERROR: no usable Python found. sort3ddepth needs CPython 3.9-3.12 with tkinter"
        log "(Scipion's pwem imports tkinter even without a display) and the venv module."
        log "Tried: ${candidates[*]:-(none on PATH)}"
        log "Install e.g. Debian's python3-tk + python3-venv, or a pyenv build with Tk, or set PYTHON=/path/to/python."
        exit 1
    fi
    log "creating $VENV with $PY ($("$PY" -V 2>&1))"
    "$PY" -m venv "$VENV"
fi

log "installing sort3ddepth (editable, with test extras) into $VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
(cd "$ROOT" && "$VENV/bin/python" -m pip install -q -e ".[test]")
touch "$STAMP"
log "done"
