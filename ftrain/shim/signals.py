"""Signals and crashes under the supervisor, armed when ``import ftrain`` finds ``FTRAIN_RUN_DIR``.

SIGTERM and SIGUSR2 become a stop request (``should_stop()``) and a ``stop_requested``
control line; SIGUSR1 dumps every thread's Python stack (``faulthandler``), so a hung
child's stacks land in its log before it is stopped; under torchrun an uncaught exception
also lands in ``TORCHELASTIC_ERROR_FILE``. A script's own handlers win: ours go in only
over the default disposition.
"""

from __future__ import annotations

import faulthandler
import json
import os
import signal
import sys
import threading
import time

from ftrain.protocol import Control
from ftrain.shim.metrics import control

TYPE_CHECKING = False   # typing itself costs milliseconds at import; annotations are strings
if TYPE_CHECKING:
    from typing import Any

    from ftrain.shim import ProcessState

__all__ = ["arm"]


def arm(st: ProcessState) -> None:
    """Stacks on a crash and on SIGUSR1, stop requests on TERM/USR2, torchrun's error file.

    Python handlers go in only from the main thread and only over the default disposition,
    so a script's own handlers win.
    """
    try:
        faulthandler.enable()
    except (RuntimeError, ValueError, AttributeError, OSError):
        pass   # no usable stderr (closed or not a file): nowhere to dump stacks
    else:
        # Ignored is ftrain's doing (children start with SIGUSR1 ignored, so that Slurm's
        # step-wide USR1 kills none of them): replace it too.
        if signal.getsignal(signal.SIGUSR1) in (signal.SIG_DFL, signal.SIG_IGN):
            faulthandler.register(signal.SIGUSR1, all_threads=True, chain=False)
    if os.environ.get("TORCHELASTIC_ERROR_FILE"):
        _chain_excepthook(st, sys.excepthook)
    if threading.current_thread() is not threading.main_thread():
        return

    def on_stop_signal(signum: int, frame: object) -> None:
        _stop_requested(st, signum)

    for sig in (signal.SIGTERM, signal.SIGUSR2):
        if signal.getsignal(sig) == signal.SIG_DFL:
            signal.signal(sig, on_stop_signal)


def _stop_requested(st: ProcessState, signum: int) -> None:
    """SIGTERM/SIGUSR2: a stop request. Only sets a flag and writes a control line, unless
    the script never asked ``should_stop()``: then it dies by the signal, as without us."""
    name = signal.Signals(signum).name
    if os.getpid() != st.pid:        # a forked worker (DataLoader): not ours to keep alive
        _die_by(signum)
        return
    st.stop_signal = st.stop_signal or name
    try:
        control(st, Control.STOP_REQUESTED, st.last_step, signal=name, cooperative=st.cooperating)
    except OSError:
        pass
    if not st.cooperating:
        _die_by(signum)


def _die_by(signum: int) -> None:
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def _chain_excepthook(st: ProcessState, previous: Any) -> None:
    """Under torchrun: an uncaught exception also lands in ``TORCHELASTIC_ERROR_FILE``, in
    the format of torch's ``@record``, so the supervisor (and torchrun's report) see this
    rank's error and when it happened. A file ``@record`` already wrote is left alone."""

    def hook(exc_type: Any, exc: Any, tb: Any) -> None:
        path = os.environ.get("TORCHELASTIC_ERROR_FILE")
        if path and os.getpid() == st.pid and not os.path.exists(path):
            try:
                import traceback

                from ftrain.files import write_atomic

                data = {"message": {"message": f"{exc_type.__name__}: {exc}", "extraInfo": {
                    "py_callstack": "".join(traceback.format_exception(exc_type, exc, tb)),
                    "timestamp": str(int(time.time()))}}}
                write_atomic(path, json.dumps(data))
            except Exception:  # noqa: BLE001, S110 - never hide the original error behind our own
                pass
        previous(exc_type, exc, tb)

    sys.excepthook = hook
