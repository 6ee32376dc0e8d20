"""Firing the faults of ``ftrain run --inject`` (DESIGN §1), each for real and once.

The faults come from ``FTRAIN_INJECT`` (``ftrain.inject``; rank 0 only) and fire from
``log``, the first time a logged step reaches a fault's step, after an ``inject`` control
line announces them: the exception PyTorch would raise (with its real message), a real
signal, a real hang, or this step's values made NaN or spiked. Loaded only when a fault is due.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import time

from ftrain.protocol import Control
from ftrain.shim.metrics import control, plain_metrics, write

TYPE_CHECKING = False   # typing itself costs milliseconds at import; annotations are strings
if TYPE_CHECKING:
    from typing import Any

    from ftrain.shim import ProcessState

__all__ = ["VALUE_FAULTS", "fire_due", "raise_fault"]

VALUE_FAULTS = frozenset({"nan", "spike", "term"})  # the step goes on after these fire

_OOM_MESSAGE = (
    "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.15 GiB of which "
    "1.06 GiB is free. Including non-PyTorch memory, this process has 78.08 GiB memory in use. Of the "
    "allocated memory 75.52 GiB is allocated by PyTorch, and 1.03 GiB is reserved by PyTorch but "
    "unallocated. If reserved but unallocated memory is large try setting "
    "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to avoid fragmentation.  See documentation for "
    "Memory Management  (https://pytorch.org/docs/stable/notes/cuda.html#environment-variables)"
)
_CUDA_MESSAGE = (
    "CUDA error: an illegal memory access was encountered\n"
    "CUDA kernel errors might be asynchronously reported at some other API call, so the stacktrace "
    "below might be incorrect.\n"
    "For debugging consider passing CUDA_LAUNCH_BLOCKING=1\n"
    "Compile with `TORCH_USE_CUDA_DSA` to enable device-side assertions.\n"
)
_NCCL_MESSAGE = (
    "NCCL error in: /pytorch/torch/csrc/distributed/c10d/ProcessGroupNCCL.cpp:3356, unhandled cuda "
    "error (run with NCCL_DEBUG=INFO for details), NCCL version 2.21.5\n"
    "ncclUnhandledCudaError: Call to CUDA function failed.\n"
    "Last error:\n"
    "Cuda failure 'an illegal memory access was encountered'"
)


def fire_due(st: ProcessState, step: int, metrics: dict[str, Any]) -> dict[str, Any]:
    """Fire the faults due at ``step``, each once, after recording it in the metrics file.

    Value faults (nan, spike) change this step's metrics and term asks the job to stop;
    the step goes on after them. Of the faults that end the step (an exception, a death, a
    hang) one fires per call, before the step's line is written — unless a value fault
    fired too, whose line is written first so that its effect is seen.
    """
    due = [f for f in st.faults if f.step <= step]
    soft = [f for f in due if f.kind in VALUE_FAULTS]
    hard = next((f for f in due if f.kind not in VALUE_FAULTS), None)
    for fault in soft + ([hard] if hard else []):
        st.faults.remove(fault)
    st.next_fault_step = st.faults[0].step if st.faults else math.inf
    for fault in soft:
        control(st, Control.INJECT, step, fault=fault.kind, at=fault.step)
        if fault.kind == "term":
            os.kill(os.getpid(), signal.SIGTERM)
        else:
            metrics = _corrupt(fault.kind, metrics)
    if hard is not None:
        control(st, Control.INJECT, step, fault=hard.kind, at=hard.step)
        if soft and st.metrics_path is not None:
            st.last_metrics = metrics
            write(st, {"step": step, "t": time.time(), "attempt": st.attempt, **metrics})
        raise_fault(hard.kind, step)
    return metrics


def _corrupt(kind: str, metrics: dict[str, Any]) -> dict[str, Any]:
    """``nan``: loss (else every float metric) becomes NaN; ``spike``: the same, x1000."""
    out = plain_metrics(metrics)
    keys = ["loss"] if "loss" in out else [k for k, v in out.items() if type(v) is float]
    for key in keys:
        if isinstance(out[key], (int, float)) and not isinstance(out[key], bool):
            out[key] = math.nan if kind == "nan" else float(out[key]) * 1000.0
    return out


def raise_fault(kind: str, step: int) -> None:
    """Make the fault real: the exception PyTorch raises, a real signal, a real hang."""
    if kind in ("segv", "abort", "kill"):
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (AttributeError, ValueError, OSError):
                pass
    if kind == "oom":
        try:
            import torch
        except ImportError:
            raise RuntimeError(_OOM_MESSAGE) from None
        raise torch.OutOfMemoryError(_OOM_MESSAGE)
    if kind == "cuda":
        try:
            import torch
        except ImportError:
            raise RuntimeError(_CUDA_MESSAGE) from None
        raise getattr(torch, "AcceleratorError", RuntimeError)(_CUDA_MESSAGE)
    if kind == "nccl":
        try:
            from torch.distributed import DistBackendError
        except ImportError:
            raise RuntimeError(_NCCL_MESSAGE) from None
        raise DistBackendError(_NCCL_MESSAGE)
    if kind == "exc":
        raise RuntimeError(f"ftrain --inject: exception at step {step}")
    if kind == "segv":
        import ctypes

        ctypes.string_at(0)
    elif kind == "abort":
        os.abort()
    elif kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif kind == "hang":
        while True:      # signals keep their default actions; SIGUSR1 still dumps this frame
            time.sleep(3600)
    raise RuntimeError(f"ftrain --inject: fault {kind!r} at step {step} did not take effect")
