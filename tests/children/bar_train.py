"""A training loop that knows nothing of ftrain and shows its progress as a bar, the way real
scripts do: tqdm's bar on stderr with the loss in its postfix (a bar of its own drawn with
``\\r`` if tqdm is absent), or with --lines plain "step N | loss X" lines. No torch.

The loss falls steeply (3.0 → 0.15 in 80 steps) with 5 % noise, then stays. Flags:
--steps N, --step-time S, --nan-at N (NaN from step N on: a divergence), --spike-at N (one
value ×1000), --freeze-at N (stops moving at step N, forever: a hang), --lines.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=300)
parser.add_argument("--step-time", type=float, default=0.02)
parser.add_argument("--nan-at", type=int, default=-1)
parser.add_argument("--spike-at", type=int, default=-1)
parser.add_argument("--freeze-at", type=int, default=-1)
parser.add_argument("--lines", action="store_true")
args = parser.parse_args()


def loss_at(step: int, rng: random.Random) -> float:
    if 0 <= args.nan_at <= step:
        return math.nan
    level = 3.0 * (0.05 ** (step / 80)) if step < 80 else 0.15
    value = level * math.exp(rng.gauss(0.0, 0.05))
    return value * 1000 if step == args.spike_at else value


class Bar:
    """tqdm's bar text, drawn with ``\\r`` at most every 0.1 s, for when tqdm is not installed."""

    def __init__(self, total: int) -> None:
        self.total, self.n, self.postfix, self.last = total, 0, "", 0.0

    def set_postfix(self, **kw: float) -> None:
        self.postfix = ", ".join(f"{k}={v:.3g}" for k, v in kw.items())

    def update(self, n: int = 1) -> None:
        self.n += n
        if time.monotonic() - self.last >= 0.1 or self.n == self.total:
            self.last = time.monotonic()
            pct = 100 * self.n // self.total
            sys.stderr.write(f"\rtrain: {pct:3d}%|{'#' * (pct // 10):10s}| {self.n}/{self.total} [{self.postfix}]")
            sys.stderr.flush()

    def close(self) -> None:
        sys.stderr.write("\n")


def main() -> None:
    rng = random.Random(7)
    print(f"training for {args.steps} steps", flush=True)
    bar = None
    if not args.lines:
        try:
            from tqdm import tqdm
            bar = tqdm(total=args.steps, desc="train")
        except ImportError:
            bar = Bar(args.steps)
    for step in range(args.steps):
        if step == args.freeze_at:
            while True:
                time.sleep(1)
        time.sleep(args.step_time)
        loss = loss_at(step, rng)
        if bar is None:
            print(f"step {step} | loss {loss:.4f}", flush=True)
        else:
            bar.set_postfix(loss=loss)
            bar.update(1)
        if bar is not None and step % 100 == 99:
            print(f"checkpoint at step {step}", flush=True)   # stdout, between the bar's drawings
    if bar is not None:
        bar.close()
    print("done", flush=True)


main()
