"""A job that snapshots every step and checks its state is exact after every resume.

The state is a 4 MB tensor that equals step + 1 after each step, so a resume from any
checkpoint or snapshot must continue with exactly the values it had at that step.
"""

import time

import torch

import ftrain

cfg = ftrain.config(defaults={"train": {"steps": 100, "every": 50, "sleep": 0.05, "snapshot": True}})
train = cfg["train"]
w = torch.zeros(1_000_000)
start = 0
state = ftrain.load_checkpoint()
if state is not None:
    w, start = state["w"], state["step"] + 1
    assert torch.all(w == start), f"resumed state is not exact: {w[0].item()} at step {start}"
print(f"start at step {start}", flush=True)
taken = 0
for step in range(start, train["steps"]):
    w += 1
    assert torch.all(w == step + 1)
    ftrain.log(step, loss=1.0 / (step + 1))
    if step % train["every"] == 0:
        ftrain.save_checkpoint({"w": w, "step": step}, step)
    if train["snapshot"]:
        taken += ftrain.snapshot({"w": w, "step": step}, step)
    time.sleep(train["sleep"])
print(f"done; {taken} snapshots", flush=True)
