"""A training loop that knows nothing of ftrain (no import, no FTRAIN_* variable read), for
the adapter's end-to-end tests: no model, no torch, so an attempt takes a fraction of a second.

Config from environment variables EXT_TRAIN_STEPS, EXT_TRAIN_BATCH_SIZE, EXT_TRAIN_GRAD_ACCUM,
EXT_OPTIM_LR. Flags: --resume PATH, --save-every N (checkpoints ckpt/step_N.state, JSON,
renamed into place), --crash-at N (SIGSEGV at step N, once: a marker file remembers),
--nan-at N (loss NaN from step N unless resumed), --max-batch B (the exact CUDA OOM error when the batch is
larger). Prints "config batch_size=B grad_accum=G lr=L" and "step N | loss X" lines.
"""

import argparse
import json
import os
import signal
import time

parser = argparse.ArgumentParser()
parser.add_argument("--resume")
parser.add_argument("--save-every", type=int, default=0)
parser.add_argument("--crash-at", type=int, default=-1)
parser.add_argument("--nan-at", type=int, default=-1)
parser.add_argument("--max-batch", type=int, default=1 << 30)
args = parser.parse_args()

steps = int(os.environ["EXT_TRAIN_STEPS"])
batch = int(os.environ["EXT_TRAIN_BATCH_SIZE"])
accum = int(os.environ["EXT_TRAIN_GRAD_ACCUM"])
lr = float(os.environ["EXT_OPTIM_LR"])
print(f"config batch_size={batch} grad_accum={accum} lr={lr}", flush=True)
if batch > args.max_batch:
    raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.15 GiB "
                       "of which 1.06 GiB is free.")
start = 0
if args.resume:
    with open(args.resume) as f:
        start = json.load(f)["step"] + 1
    print(f"resumed from {args.resume} at step {start}", flush=True)
os.makedirs("ckpt", exist_ok=True)
for step in range(start, steps):
    time.sleep(0.01)
    if step == args.crash_at and not os.path.exists(".crashed"):
        open(".crashed", "w").close()
        os.kill(os.getpid(), signal.SIGSEGV)
    loss = float("nan") if 0 <= args.nan_at <= step and not args.resume else 1.0 / (step + 1)
    print(f"step {step} | loss {loss:.4f} | lr {lr:g}", flush=True)
    if args.save_every and (step + 1) % args.save_every == 0:
        tmp = f"ckpt/.step_{step}.tmp"
        with open(tmp, "w") as f:
            json.dump({"step": step}, f)
        os.replace(tmp, f"ckpt/step_{step}.state")
print("finished", flush=True)
