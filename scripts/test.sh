#!/usr/bin/env bash
# Install ftrain with its test extras into .venv, check it (ruff, mypy) and run the test suite.
# torch's CPU build goes first: with it installed, the project's torch range fetches nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -d .venv ] || python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q torch==2.13.0
python -m pip install -q -e '.[test]' torch==2.13.0   # torch pinned: the extras must not move it
echo "ruff: $(ruff --version)"; ruff check ftrain tests scripts
echo "mypy: $(mypy --version)"; mypy
python -m pytest -q "$@"
