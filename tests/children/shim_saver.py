"""A fork server for the crash-safety test of ``save_checkpoint``.

Imports torch once; for each ``go STEP`` line on stdin it forks a worker that saves
checkpoints STEP, STEP+1, … in a loop until something kills it, prints the worker's pid,
waits for it, and prints its wait status. Each saved tensor holds its own step in every
element, so a torn file cannot pass for a whole one.
"""

from __future__ import annotations

import os
import sys

import torch

import ftrain

ELEMENTS = 512 * 1024   # 2 MiB of float32: big enough to take the shim's parallel-hash path


def save_forever(step: int) -> None:
    while True:
        ftrain.save_checkpoint({"step": step, "w": torch.full((ELEMENTS,), float(step))}, step)
        step += 1


def main() -> int:
    for line in sys.stdin:
        command, _, arg = line.strip().partition(" ")
        if command != "go":
            continue
        pid = os.fork()
        if pid == 0:
            try:
                save_forever(int(arg))
            finally:
                os._exit(1)
        print(pid, flush=True)
        _, status = os.waitpid(pid, 0)
        print(status, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
