#!/usr/bin/env bash
# Install ftrain into .venv and run the demo: a real character-level language model trained on
# Tiny Shakespeare, which ftrain sees fail five real ways and recover from, then the story.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -d .venv ] || python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q torch==2.13.0 numpy   # numpy: torch warns on every start without it
python -m pip install -q -e .
run="runs/demo-$(date +%Y%m%d-%H%M%S)"
echo "ftrain trains scripts/train_charlm.py for 300 steps and injects five real faults: a CUDA"
echo "out-of-memory error at step 40, a segfault at 90, a NaN loss at 140, a hang at 190, a SIGKILL"
echo "at 240. The tracebacks and stack dumps below are the script's own output as each fault hits;"
echo "the [ftrain] lines after them say what ftrain saw and what it did."
echo
set +e
ftrain run scripts/train_charlm.py --config configs/demo.yaml --policy configs/policy.demo.yaml \
  --inject oom@40,segv@90,nan@140,hang@190,kill@240 --run-dir "$run" "$@"
code=$?
set -e
echo
ftrain inspect "$run"
echo
ftrain inspect "$run/checkpoints"
exit $code
