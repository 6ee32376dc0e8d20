"""Callbacks that put a framework's trainer under ftrain without touching its loop.

``ftrain.integrations.hf``         Hugging Face ``transformers.Trainer``
``ftrain.integrations.lightning``  PyTorch Lightning ``Trainer`` (``lightning`` or ``pytorch_lightning``)

Each callback logs the trainer's metrics through the shim (``ftrain.log``: the metrics
stream, the heartbeat, and where ``--inject`` faults fire), turns ``ftrain.should_stop()``
into a save-and-exit by the trainer's own means, and comes with ``resume_checkpoint(dir)``:
the path to hand the trainer's own resume argument. Like the shim, they are script-side
code: they import the shim and their framework, never the supervisor. Importing this
package imports neither framework.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from ftrain.protocol import RESERVED_METRICS

RESERVED = RESERVED_METRICS | {"step"}   # a trainer's own "step" metric would clash with the line's


def resume_from_env() -> str | None:
    """The checkpoint ftrain chose for this attempt (``FTRAIN_RESUME_FROM``), if any."""
    return os.environ.get("FTRAIN_RESUME_FROM") or None


def scalars(metrics: Mapping[str, Any] | None) -> dict[str, Any]:
    """The loggable scalars of a trainer's metrics: numbers, one-element tensors and numpy
    scalars, under names that do not clash with the fields of a metrics line."""
    out: dict[str, Any] = {}
    for key, value in (metrics or {}).items():
        name = str(key)
        if name in RESERVED or isinstance(value, (str, bool)):
            continue
        if isinstance(value, (int, float)):
            out[name] = value
            continue
        item = getattr(value, "item", None)
        if not callable(item):
            continue
        try:
            number = item()
        except (ValueError, RuntimeError):   # more than one element
            continue
        if isinstance(number, (int, float)) and not isinstance(number, bool):
            out[name] = number
    return out
