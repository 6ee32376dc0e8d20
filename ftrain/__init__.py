"""ftrain keeps a training job alive; ``import ftrain`` is the shim a training script uses.

The functions below are the whole script-side API (DESIGN §3). Importing them is cheap: no
torch, no yaml until a function needs one.
"""

from __future__ import annotations

from ftrain.shim import (
    config,
    is_supervised,
    load_checkpoint,
    log,
    save_checkpoint,
    should_skip,
    should_stop,
)

__all__ = ["config", "log", "save_checkpoint", "load_checkpoint", "should_stop", "should_skip", "is_supervised"]
__version__ = "0.1.0"
