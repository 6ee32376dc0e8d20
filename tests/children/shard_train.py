"""A real FSDP2 job for the sharded-checkpoint tests: a tiny model ``fully_shard``ed over gloo
on CPU, Adam, every rank saving and loading its own shards through
``ftrain.save_checkpoint(state, step, sharded=True)`` and ``ftrain.load_checkpoint(state=)``.

Config (ftrain.config): train.steps, train.ckpt_every, train.sleep. At each save and at a
resume every rank prints ``rank R saved|resumed step S digest D``, D the sha256 of its own
shards (model and optimizer), so a test can hold the resumed state to the saved one.
Faults, in attempt 1 only, from the environment:

* ``DIST_FAULT=segv@step`` on rank ``DIST_FAULT_RANK`` (default 1): a real SIGSEGV.
* ``DIST_KILL_SAVE=step``: rank 1 SIGKILLs itself during that step's save, as soon as its
  first shard file appears in the folder (so before the manifest can exist).
* ``DIST_PAD_MB=n``: n MiB more state per rank (a DTensor sharded over the ranks), to make
  a save long enough to be cut.
"""

from __future__ import annotations

import ctypes
import datetime
import glob
import hashlib
import os
import signal
import threading
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import Shard, distribute_tensor

import ftrain


def digest(state: dict) -> str:
    """sha256 of this rank's own shards, in key order."""
    h = hashlib.sha256()

    def walk(prefix: str, obj: object) -> None:
        if isinstance(obj, dict):
            for key in sorted(obj, key=str):
                walk(f"{prefix}.{key}", obj[key])
        elif isinstance(obj, torch.Tensor):
            local = obj.to_local() if hasattr(obj, "to_local") else obj
            h.update(prefix.encode())
            h.update(local.detach().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
        else:
            h.update(f"{prefix}={obj!r}".encode())

    walk("", state)
    return h.hexdigest()[:16]


def kill_when_written(folder: str) -> None:
    """SIGKILL this rank once its first shard file appears in ``folder``."""
    def watch() -> None:
        while not glob.glob(os.path.join(folder, "__1_*.distcp")):
            time.sleep(0.0005)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, daemon=True).start()


def main() -> None:
    cfg = ftrain.config(defaults={"train": {"steps": 20, "ckpt_every": 5, "sleep": 0.01}})
    t = cfg["train"]
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    rank, world = dist.get_rank(), dist.get_world_size()
    print(f"rank {rank} pid {os.getpid()} world {world}", flush=True)
    first = os.environ.get("FTRAIN_ATTEMPT") == "1"
    fault = os.environ.get("DIST_FAULT", "") if first else ""
    fault_step = int(fault.partition("@")[2]) if fault else -1
    fault_here = rank == int(os.environ.get("DIST_FAULT_RANK", "1"))
    kill_save = int(os.environ.get("DIST_KILL_SAVE", "-1")) if first else -1

    mesh = init_device_mesh("cpu", (world,))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    pad_mb = int(os.environ.get("DIST_PAD_MB", "0"))
    pad = distribute_tensor(torch.zeros(world * pad_mb * (1 << 18)), mesh, [Shard(0)]) if pad_mb else None

    def full_state(step: int) -> dict:
        model_sd, optim_sd = get_state_dict(model, opt)
        state = {"model": model_sd, "optim": optim_sd, "step": step}
        if pad is not None:
            state["pad"] = pad
        return state

    start = 0
    state = full_state(-1)
    if ftrain.load_checkpoint(state=state) is not None:
        set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
        start = int(state["step"]) + 1
        print(f"rank {rank} resumed step {state['step']} digest {digest(full_state(state['step']))}", flush=True)

    gen = torch.Generator().manual_seed(1234 + rank)
    w_true = torch.arange(8, dtype=torch.float32) / 8
    for step in range(start, int(t["steps"])):
        if step == fault_step and fault_here:
            print(f"rank {rank}: injecting segv at step {step}", flush=True)
            ctypes.string_at(0)
        x = torch.randn(16, 8, generator=gen)
        loss = nn.functional.mse_loss(model(x), (x @ w_true).unsqueeze(1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        time.sleep(float(t["sleep"]))
        ftrain.log(step, loss=loss.detach())
        if (step + 1) % int(t["ckpt_every"]) == 0:
            state = full_state(step)
            if step == kill_save and rank == 1:
                kill_when_written(os.path.join(os.environ["FTRAIN_CHECKPOINT_DIR"], f"step-{step:08d}"))
            path = ftrain.save_checkpoint(state, step, sharded=True)
            print(f"rank {rank} saved step {step} digest {digest(state)} at {path}", flush=True)
    dist.barrier()
    dist.destroy_process_group()
    print(f"rank {rank} done", flush=True)


if __name__ == "__main__":
    main()
