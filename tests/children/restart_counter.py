"""A script that restarts its step counter after --resume, as karpathy/makemore does: it
loads the weights, counts steps from 0 again, saves ``out/model.pt`` (no step in the name)
and improves its loss in every attempt. No ftrain, no torch.

Flags: --resume PATH, --crash-rounds N (SIGSEGV at step 25 in the first N attempts, told
apart by the round number kept in the checkpoint), --die-on-resume (a crash loop: a resumed
attempt dies before its first step).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import time

parser = argparse.ArgumentParser()
parser.add_argument("--resume")
parser.add_argument("--crash-rounds", type=int, default=0)
parser.add_argument("--die-on-resume", action="store_true")
args = parser.parse_args()

rnd = 0
if args.resume:
    if args.die_on_resume:
        os.kill(os.getpid(), signal.SIGSEGV)
    with open(args.resume) as f:
        rnd = json.load(f)["round"] + 1
    print(f"resumed from {args.resume}, round {rnd}", flush=True)
os.makedirs("out", exist_ok=True)
for step in range(30):
    time.sleep(0.01)
    loss = 2.0 / (rnd + 1) * (1 - step / 100)
    print(f"step {step} | loss {loss:.4f}", flush=True)
    if step == 20:
        with open("out/.model.tmp", "w") as f:
            json.dump({"round": rnd, "loss": loss}, f)
        os.replace("out/.model.tmp", "out/model.pt")
    if step == 25 and rnd < args.crash_rounds:
        os.kill(os.getpid(), signal.SIGSEGV)
print("done", flush=True)
