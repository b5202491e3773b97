#!/usr/bin/env bash
# dcpio's two entry points on a fresh machine (Python 3.11 + pip is all it needs):
#   bash scripts/dev.sh demo [DIR]   set up .venv, then run the main job: `dcpio demo`
#   bash scripts/dev.sh test         set up .venv, then lint, type-check and run the test suite
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${DCPIO_VENV:-.venv}"
PY="${PYTHON:-python3}"

setup() {
    if [ ! -x "$VENV/bin/python" ]; then
        "$PY" -m venv "$VENV"
    fi
    # torch first, pinned to the CPU build (constraints.txt): an unpinned request would pull a multi-GB CUDA build.
    # pip prints what it fetches (a download bar on a terminal): the first set-up takes a few minutes.
    echo "dev.sh: installing torch 2.13.0 (CPU build) into $VENV ..." >&2
    "$VENV/bin/python" -m pip install --disable-pip-version-check -c constraints.txt "torch==2.13.0"
    echo "dev.sh: installing dcpio with its [dev] extra (test servers, linters) ..." >&2
    "$VENV/bin/python" -m pip install --disable-pip-version-check -c constraints.txt -e ".[dev]"
}

cmd="${1:-test}"
shift || true
case "$cmd" in
    setup)
        setup
        ;;
    demo)
        setup
        "$VENV/bin/dcpio" demo "$@"
        ;;
    test)
        setup
        "$VENV/bin/ruff" check src tests benchmarks
        "$VENV/bin/ruff" format --check src tests benchmarks
        "$VENV/bin/mypy"
        "$VENV/bin/python" -m pytest -q -p no:cacheprovider "$@"
        ;;
    *)
        echo "usage: bash scripts/dev.sh {demo [DIR]|test [pytest args]|setup}" >&2
        exit 2
        ;;
esac
