"""A real DDP training job for the distributed tests: a tiny model, gloo on CPU, every rank
using the shim (config, resume, log, checkpoints on rank 0, skip windows, should_stop).

Config (ftrain.config): train.steps, train.batch_size, train.ckpt_every, train.sleep.
Faults the supervisor's ``--inject`` cannot place on another rank than 0 come from the
environment and fire in attempt 1 only (so a restart can finish):

* ``DIST_FAULT=kind@step`` with ``DIST_FAULT_RANK=r`` (default 1; ``*``: every rank that
  sees the variable, e.g. all ranks of one node): at that step ``segv`` (a real SIGSEGV),
  ``hang`` (sleep forever outside any collective, so the other ranks block in their next
  allreduce).
* ``DIST_SLOW_RANK=r:seconds``: rank r sleeps that much longer per step, inside its
  ``ftrain.timed()`` section (a straggler; every attempt).
* ``DIST_GLOO_TIMEOUT`` seconds for the process group's collectives (default 300), long
  enough that ftrain's hang detector fires before gloo gives up.

Each rank prints ``rank R pid P`` at start and ``rank R done`` at the end.
"""

from __future__ import annotations

import ctypes
import datetime
import os
import sys
import time

import torch
import torch.distributed as dist
from torch import nn

import ftrain


def fire(kind: str, rank: int, step: int) -> None:
    print(f"rank {rank}: injecting {kind} at step {step}", flush=True)
    sys.stdout.flush()
    sys.stderr.flush()
    if kind == "segv":
        ctypes.string_at(0)
    elif kind == "hang":
        while True:
            time.sleep(3600)
    raise SystemExit(f"unknown DIST_FAULT kind {kind!r}")


def main() -> None:
    cfg = ftrain.config(defaults={"train": {"steps": 30, "batch_size": 16, "ckpt_every": 5, "sleep": 0.02}})
    t = cfg["train"]
    timeout = float(os.environ.get("DIST_GLOO_TIMEOUT", "300"))
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=timeout))
    rank, world = dist.get_rank(), dist.get_world_size()
    print(f"rank {rank} pid {os.getpid()} world {world} batch_size {t['batch_size']}", flush=True)

    fault_kind, fault_step = None, -1
    spec = os.environ.get("DIST_FAULT")
    target = os.environ.get("DIST_FAULT_RANK", "1")
    if spec and os.environ.get("FTRAIN_ATTEMPT") == "1" and (target == "*" or rank == int(target)):
        fault_kind, _, step_text = spec.partition("@")
        fault_step = int(step_text)

    slow_rank, _, extra = os.environ.get("DIST_SLOW_RANK", "").partition(":")
    slow = float(extra) if slow_rank.isdigit() and int(slow_rank) == rank else 0.0

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
    start = 0
    state = ftrain.load_checkpoint()
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optim"])
        start = int(state["step"]) + 1
        print(f"rank {rank} resumed from step {state['step']}", flush=True)

    gen = torch.Generator().manual_seed(1234 + rank)
    w_true = torch.arange(8, dtype=torch.float32) / 8
    for step in range(start, int(t["steps"])):
        if ftrain.should_skip(step):
            continue
        if step == fault_step and fault_kind is not None:
            fire(fault_kind, rank, step)
        with ftrain.timed():   # this rank's own work: its batch and forward pass, no collective
            x = torch.randn(int(t["batch_size"]), 8, generator=gen)
            y = (x @ w_true).unsqueeze(1)
            loss = nn.functional.mse_loss(ddp(x), y)
            time.sleep(float(t["sleep"]) + slow)   # the input pipeline's time; longer on a slow rank
        opt.zero_grad()
        loss.backward()
        opt.step()
        ftrain.log(step, loss=loss.detach(), grad_norm=0.5)
        if t["ckpt_every"] and (step + 1) % int(t["ckpt_every"]) == 0:
            ftrain.save_checkpoint({"model": model.state_dict(), "optim": opt.state_dict(), "step": step}, step)
        stop = torch.tensor([int(ftrain.should_stop())])
        dist.all_reduce(stop, op=dist.ReduceOp.MAX)   # every rank leaves after the same step
        if stop.item():
            ftrain.save_checkpoint({"model": model.state_dict(), "optim": opt.state_dict(), "step": step}, step)
            print(f"rank {rank} stopping at step {step}", flush=True)
            break
    dist.barrier()
    dist.destroy_process_group()
    print(f"rank {rank} done", flush=True)


if __name__ == "__main__":
    main()
