"""A script that knows nothing of ftrain: prints "iter N: loss X", writes its own checkpoint
out/ckpt.json (no step in the name) after the line of step SAVE_AT, then runs fast (2 ms a
step, many lines within the 100 ms a line may be read late) until it exits 1 at CRASH_AT.
`--resume PATH` goes on after the step the checkpoint holds. argv: SAVE_AT CRASH_AT."""

import json
import os
import sys
import time

save_at, crash_at = int(sys.argv[1]), int(sys.argv[2])
start = 0
if "--resume" in sys.argv:
    with open(sys.argv[sys.argv.index("--resume") + 1]) as f:
        start = json.load(f)["step"] + 1
    print(f"resumed after step {start - 1}", flush=True)
    crash_at = -1
os.makedirs("out", exist_ok=True)
for step in range(start, 40):
    print(f"iter {step}: loss {1.0 / (step + 1):.4f}", flush=True)
    if step == save_at:
        time.sleep(0.05)
        with open("out/ckpt.tmp", "w") as f:
            json.dump({"step": step}, f)
        os.replace("out/ckpt.tmp", "out/ckpt.json")
    if step == crash_at:
        sys.exit(1)
    time.sleep(0.002 if step > save_at else 0.02)
