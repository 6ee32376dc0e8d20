"""A small training loop on the shim, driven by flags: the child of the shim's tests.

Logs ``loss`` (falling from 2.0) and ``lr`` once per step, optionally checks
``should_stop()``, saves on stop, and catches the exceptions ``log`` raises when asked.
Without torch unless it saves, so it starts fast.
"""

from __future__ import annotations

import argparse
import sys
import time

import ftrain


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=10, help="0: run until stopped")
    parser.add_argument("--sleep", type=float, default=0.0, help="seconds per step")
    parser.add_argument("--cooperate", action="store_true", help="check should_stop() every step")
    parser.add_argument("--save-on-stop", action="store_true")
    parser.add_argument("--catch", action="store_true", help="survive exceptions raised by log()")
    args = parser.parse_args()

    step = 0
    while args.steps == 0 or step < args.steps:
        try:
            ftrain.log(step, loss=2.0 / (1 + step), lr=0.1)
        except RuntimeError as exc:
            if not args.catch:
                raise
            print(f"caught at step {step}: {type(exc).__name__}", flush=True)
        if args.cooperate and ftrain.should_stop():
            if args.save_on_stop:
                import torch

                ftrain.save_checkpoint({"step": step, "w": torch.arange(10.0)}, step)
            print(f"stopped at step {step}", flush=True)
            return 0
        step += 1
        if args.sleep:
            time.sleep(args.sleep)
    print(f"finished {step} steps", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
