"""Exercises the shim's values and environment once, then prints what it saw as JSON.

Logs NaN, ±Inf, a 0-d tensor, numpy scalars, a bool and strings at step 1; asks
``config()`` for defaults; reports ``should_skip`` for steps 0..20, ``is_supervised()``,
the keys of what ``load_checkpoint()`` returns, and (``--save``) what ``save_checkpoint`` returns on
this rank. ``--torch`` adds tensors and numpy scalars to the logged values.
"""

from __future__ import annotations

import json
import sys

import ftrain

DEFAULTS = {"train": {"batch_size": 32, "lr": 0.1, "amp": True}, "name": "default"}


def main() -> int:
    cfg = ftrain.config(DEFAULTS)
    with_torch = "--torch" in sys.argv
    extra: dict[str, object] = {}
    if with_torch:
        import numpy as np
        import torch

        extra = {"tensor": torch.tensor(0.25), "np32": np.float32(1.5), "np64": np.float64(2.5),
                 "npint": np.int64(7), "npbool": np.bool_(True)}
    ftrain.log(1, nan=float("nan"), inf=float("inf"), ninf=float("-inf"), flag=True, count=3,
               name="warmup", long="x" * 1000, **extra)
    result = {
        "config": cfg,
        "skip": [s for s in range(21) if ftrain.should_skip(s)],
        "supervised": ftrain.is_supervised(),
    }
    resumed = ftrain.load_checkpoint()
    result["resume"] = sorted(resumed) if isinstance(resumed, dict) else resumed
    if "--save" in sys.argv:   # a plain state: only the shim imports torch, and only on rank 0
        result["saved"] = ftrain.save_checkpoint({"w": [0.0, 0.0, 0.0]}, 5)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
