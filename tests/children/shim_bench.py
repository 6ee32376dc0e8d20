"""Times ``ftrain.log(step, loss=, lr=, grad_norm=)`` and prints the median cost in µs."""

from __future__ import annotations

import statistics
import sys
import time

import ftrain


def main() -> int:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 20000
    costs = []
    for step in range(n):
        t0 = time.perf_counter_ns()
        ftrain.log(step, loss=2.31, lr=1e-3, grad_norm=0.5)
        costs.append(time.perf_counter_ns() - t0)
    print(f"{statistics.median(costs[n // 10:]) / 1000:.3f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
