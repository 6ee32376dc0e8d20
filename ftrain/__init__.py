"""ftrain keeps a training job alive; ``import ftrain`` is the shim a training script uses.

The functions below are the whole script-side API (DESIGN §3). Importing them is cheap: no
torch, no yaml, not even ``typing`` until a function needs one. In a script under
``ftrain run`` (``FTRAIN_RUN_DIR`` set) the import loads ``ftrain.shim``, which arms itself
then (stack dumps on SIGUSR1, stop requests on SIGTERM, torchrun's error file). Elsewhere,
``ftrain run`` itself included, the shim is loaded on first use.
"""

from __future__ import annotations

import os

TYPE_CHECKING = False   # typing itself costs milliseconds at import; annotations are strings
if TYPE_CHECKING:
    from typing import Any

__all__ = ["config", "is_supervised", "load_checkpoint", "log", "save_checkpoint", "should_skip", "should_stop",
           "snapshot", "timed"]
__version__ = "0.1.0"

if os.environ.get("FTRAIN_RUN_DIR"):
    from ftrain.shim import (
        config,
        is_supervised,
        load_checkpoint,
        log,
        save_checkpoint,
        should_skip,
        should_stop,
        snapshot,
        timed,
    )


def __getattr__(name: str) -> Any:
    if name in __all__ or name == "shim":
        import importlib

        shim = importlib.import_module("ftrain.shim")   # (not `from ftrain import shim`: that asks us again)
        for api in __all__:   # bound here once: later calls are plain attribute lookups
            globals()[api] = getattr(shim, api)
        return shim if name == "shim" else globals()[name]
    raise AttributeError(f"module 'ftrain' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
