"""ftrain keeps a training job alive; ``import ftrain`` is the shim a training script uses.

The functions below are the whole script-side API (DESIGN §3). Importing them is cheap: no
torch, no yaml until a function needs one. They come from ``ftrain.shim`` on first use, so
the supervisor (``ftrain run``), which imports this package too, does not load the shim.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["config", "log", "save_checkpoint", "load_checkpoint", "should_stop", "should_skip", "is_supervised"]
__version__ = "0.1.0"

if TYPE_CHECKING:
    from ftrain.shim import config, is_supervised, load_checkpoint, log, save_checkpoint, should_skip, should_stop


def __getattr__(name: str) -> Any:
    if name in __all__:
        from ftrain import shim

        for api in __all__:   # bound here once: later calls are plain attribute lookups
            globals()[api] = getattr(shim, api)
        return globals()[name]
    raise AttributeError(f"module 'ftrain' has no attribute {name!r}")
