"""A shim-using loop that logs three lines per step (loss, then the learning rate, then the
throughput), as scripts that log each kind of metric on its own do. Its loss falls from 10
to 0.01 by step 35: three decades. Config: train.steps, train.ckpt_every,
train.sleep. Checkpoints hold the step; a resumed attempt goes on after it."""

import math
import time

import ftrain

cfg = ftrain.config(defaults={"train": {"steps": 60, "ckpt_every": 10, "sleep": 0.01}})
t = cfg["train"]
state = ftrain.load_checkpoint()
start = int(state["step"]) + 1 if state else 0
for step in range(start, t["steps"]):
    if ftrain.should_skip(step):
        continue
    time.sleep(t["sleep"])
    ftrain.log(step, loss=10 * math.exp(-step / 5))
    ftrain.log(step, lr=0.1)
    ftrain.log(step, samples_per_s=100.0)
    if (step + 1) % t["ckpt_every"] == 0 or ftrain.should_stop():
        ftrain.save_checkpoint({"step": step}, step)
    if ftrain.should_stop():
        break
