"""The shim a training script imports (``import ftrain``), DESIGN §3.

It is the script's side of the supervisor: it reads the environment the supervisor set
(DESIGN §2), appends metrics and control lines to ``FTRAIN_METRICS_PATH``, writes atomic
checkpoints with a manifest, turns SIGTERM/SIGUSR2 into ``should_stop()``, and fires the
faults of ``--inject``. Without the supervisor every function still works (``config``
returns the defaults, ``log`` does nothing, checkpoints go to ``./checkpoints``).

It stands apart from the supervisor: it imports only ``ftrain.inject`` and
``ftrain.ckptfmt`` (lazily), and torch, yaml and hashlib only when a function needs them,
so ``import ftrain`` stays cheap.

Control lines share the metrics file with metric lines and always carry an ``"ftrain"``
key (first) naming the event: ``config``, ``stop_requested``, ``inject``, ``save_start``,
``save_end``. A reader must check that key before treating a line as a step's metrics.
"""

from __future__ import annotations

import atexit
import faulthandler
import json
import math
import os
import signal
import sys
import threading
import time

TYPE_CHECKING = False   # typing itself costs milliseconds at import; annotations are strings
if TYPE_CHECKING:
    from typing import Any, Callable, Mapping

    from ftrain.inject import Fault

__all__ = [
    "CheckpointError",
    "config",
    "is_supervised",
    "load_checkpoint",
    "log",
    "save_checkpoint",
    "should_skip",
    "should_stop",
]

HEARTBEAT_EVERY = 0.5      # seconds between two refreshes of a rank's heartbeat file
MAX_STRING = 256           # longer string metrics are cut to this many characters
_RESERVED = frozenset({"t", "attempt", "rank", "ftrain"})   # "step" is log's own argument
_PLAIN = frozenset({float, int, bool, type(None)})   # written as they are, no conversion
_VALUE_FAULTS = frozenset({"nan", "spike", "term"})  # the step goes on after these fire
_encode = json.JSONEncoder().encode                  # NaN/Infinity allowed, like json.dumps


class CheckpointError(OSError):
    """A checkpoint could not be written or read; ``errno`` is the cause's (ENOSPC, EIO …)."""


class _State:
    """What the shim knows of its process: the environment it was started with, and what
    the script has done so far (last step, metrics, a stop request, faults still due)."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.pid = os.getpid()
        self.run_dir = env.get("FTRAIN_RUN_DIR") or None
        self.metrics_path = env.get("FTRAIN_METRICS_PATH") or None
        self.config_path = env.get("FTRAIN_CONFIG_PATH") or None
        self.checkpoint_dir = env.get("FTRAIN_CHECKPOINT_DIR") or None
        self.resume_from = env.get("FTRAIN_RESUME_FROM") or None
        self.skip_spec = env.get("FTRAIN_SKIP_STEPS") or None
        attempt = env.get("FTRAIN_ATTEMPT", "")
        self.attempt: int | None = int(attempt) if attempt.isdigit() else None
        rank = env.get("RANK")
        self.rank = int(rank) if rank and rank.isdigit() else 0
        # Under torchrun every rank keeps a heartbeat file; a single process needs none
        # (its metric lines are its heartbeat).
        self.heartbeat_path: str | None = None
        if self.run_dir is not None and rank is not None:
            self.heartbeat_path = os.path.join(self.run_dir, "heartbeat", f"rank-{self.rank}")
        self.heartbeat_at = -math.inf
        self.fd: int | None = None
        self.fd_lock = threading.Lock()
        self.last_step: int | None = None
        self.last_metrics: dict[str, Any] = {}
        self.stop_signal: str | None = None
        self.cooperating = False
        self.skip: tuple[tuple[int, int], ...] | None = None
        self.faults: list[Fault] = []
        self.next_fault_step: float = math.inf
        inject = env.get("FTRAIN_INJECT")
        if inject and self.rank == 0:
            from ftrain.inject import parse_inject

            self.faults = sorted(parse_inject(inject), key=lambda f: f.step)
            self.next_fault_step = self.faults[0].step if self.faults else math.inf
        # Where the first log() lists the modules start-up imported, for the next attempt's
        # spare interpreter to import ahead (ftrain.warm). Not under torchrun: the spare there is
        # torchrun's agent, which imports no script's modules.
        self.modules_path: str | None = None
        if self.run_dir is not None and self.attempt is not None and rank is None:
            self.modules_path = os.path.join(self.run_dir, "attempts", f"{self.attempt:04d}", "modules.txt")
        self.save_thread: threading.Thread | None = None
        self.last_snapshot: Any = None   # kept after its save: the next one copies into it
        self.save_error: BaseException | None = None
        self.save_error_step: int | None = None


_st = _State(os.environ)


# --------------------------------------------------------------------------- public API
def is_supervised() -> bool:
    """True when the script runs under ``ftrain run`` (``FTRAIN_RUN_DIR`` is set)."""
    return _st.run_dir is not None


def config(defaults: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The effective config: ``FTRAIN_CONFIG_PATH`` (YAML) deep-merged over ``defaults``.

    The file wins where both have a key. Without the variable, a deep copy of ``defaults``.
    The sha256 of the file is recorded in the metrics stream, so the supervisor can tell a
    script that never asked for its overrides.
    """
    import copy

    result: dict[str, Any] = copy.deepcopy(dict(defaults)) if defaults else {}
    path = _st.config_path
    if path is None:
        return result
    import hashlib

    import yaml

    with open(path, "rb") as f:
        raw = f.read()
    loaded = yaml.load(raw, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    if loaded is None:
        loaded = {}
    if not isinstance(loaded, dict):
        raise ValueError(f"{path}: a config must be a mapping at the top level, not {type(loaded).__name__}")
    _merge(result, loaded)
    if _st.rank == 0:
        _control("config", None, digest=hashlib.sha256(raw).hexdigest(), path=path)
    return result


def log(step: int, *, rank_zero_only: bool = True, **metrics: Any) -> None:
    """Append one metrics line ``{"step", "t", "attempt", **metrics}``; also a heartbeat.

    Values: numbers, bools, short strings, and anything with ``.item()`` (numpy scalars,
    0-d tensors). NaN and Inf are written as JSON ``NaN``/``Infinity``. Under several
    ranks only rank 0 writes (unless ``rank_zero_only=False``); every rank refreshes its
    heartbeat file. A cheap no-op when ``FTRAIN_METRICS_PATH`` is not set.
    """
    st = _st
    st.last_step = step
    if st.modules_path is not None:
        _record_modules()
    if step >= st.next_fault_step:
        metrics = _fire_due(step, metrics)
    st.last_metrics = metrics
    if st.heartbeat_path is not None:
        _heartbeat()
    if st.metrics_path is None or (rank_zero_only and st.rank != 0):
        return
    for key, value in metrics.items():
        if type(value) not in _PLAIN:
            metrics[key] = _coerce(key, value)
    if not _RESERVED.isdisjoint(metrics):
        raise ValueError(f"ftrain.log: the metric names {', '.join(sorted(_RESERVED))} are reserved")
    record = {"step": step, "t": time.time(), "attempt": st.attempt}
    if st.rank:
        record["rank"] = st.rank
    record.update(metrics)
    _write(record)


def should_skip(step: int) -> bool:
    """True when ``step`` lies in one of the ``FTRAIN_SKIP_STEPS`` windows (inclusive)."""
    ranges = _st.skip
    if ranges is None:
        ranges = _st.skip = _parse_skip(_st.skip_spec)
    for lo, hi in ranges:
        if lo <= step <= hi:
            return True
    return False


def should_stop() -> bool:
    """True once SIGTERM or SIGUSR2 asked the job to stop: save and leave.

    Calling it tells the shim the script cooperates; a script that never calls it dies by
    the signal as if the shim were not there.
    """
    _st.cooperating = True
    return _st.stop_signal is not None


def save_checkpoint(state: Any, step: int, *, metrics: Mapping[str, Any] | None = None,
                    blocking: bool = True) -> str | None:
    """Save ``state`` as ``step-NNNNNNNN.pt`` plus a manifest, atomically and durably.

    Rank 0 only (other ranks get None). Writes to ``FTRAIN_CHECKPOINT_DIR``, else
    ``./checkpoints``. The data is hashed as it is written; the manifest
    (``step, attempt, t, bytes, sha256, metrics``) is written only after the data file is
    flushed and renamed into place. ``metrics`` defaults to those of the last ``log``.
    ``blocking=False`` copies the state to the CPU now and writes it on a background
    thread (one at a time); its error is raised by the next call. The copy's CPU memory is
    kept for the next non-blocking save, which copies into it (no page faults: a seventh of
    the time). Returns the final path.
    Raises ``CheckpointError`` (an OSError) when the files cannot be written; nothing that
    looks like a checkpoint is left behind then, and earlier checkpoints are not touched.
    """
    st = _st
    if st.rank != 0:
        return None
    _wait_for_save(raise_error=True)
    from ftrain import ckptfmt

    directory = os.path.abspath(st.checkpoint_dir or "checkpoints")
    final = os.path.join(directory, ckptfmt.data_name(step))
    info: dict[str, Any] = {
        "step": step, "attempt": st.attempt, "t": time.time(),
        "metrics": _plain_metrics(st.last_metrics if metrics is None else metrics, "ftrain.save_checkpoint"),
    }
    if not blocking:
        import torch

        # The last snapshot is written out (we waited above): its memory takes this one.
        pool = _snapshot_pool(st.last_snapshot, torch) if st.last_snapshot is not None else None
        st.last_snapshot = None
        snapshot = st.last_snapshot = _cpu_copy(state, torch, pool)
        del pool
        _control("save_start", step, path=final, blocking=False)
        thread = threading.Thread(target=_background_save, args=(snapshot, directory, step, info, final),
                                  name=f"ftrain-save-{step}")
        st.save_thread = thread
        thread.start()
        return final
    _control("save_start", step, path=final, blocking=True)
    error: BaseException | None = None
    try:
        _write_checkpoint(state, directory, step, info)
    except BaseException as exc:
        error = exc
        raise
    finally:
        _control("save_end", step, path=None if error else final,
                 **({"error": _one_line(error)} if error else {}))
    return final


def load_checkpoint(path: str | os.PathLike[str] | None = None, *, weights_only: bool = True,
                    map_location: Any = "cpu") -> Any:
    """Load ``path`` (default ``FTRAIN_RESUME_FROM``) with ``torch.load``; None if neither.

    When the file has a manifest its size is checked (the supervisor checked the sha256
    before it chose the file); a mismatch raises ``CheckpointError``.
    """
    target = os.fspath(path) if path is not None else _st.resume_from
    if not target:
        return None
    _wait_for_save(raise_error=False)   # it may be the file a background save is writing
    _check_size(target)
    import torch

    return torch.load(target, map_location=map_location, weights_only=weights_only)


# --------------------------------------------------------------------------- metrics file
def _write(record: dict[str, Any]) -> None:
    """Append one line with a single ``os.write`` (O_APPEND): never torn, seen at once."""
    fd = _st.fd if _st.fd is not None else _open_metrics()
    data = (_encode(record) + "\n").encode()
    written = os.write(fd, data)
    if written < len(data):   # only near a full disk; finish the line or raise its error
        _write_all(fd, memoryview(data)[written:])


def _record_modules() -> None:
    """Write the names of the modules imported so far that come from outside the script's
    folder (torch, torch._dynamo that an optimizer pulls in, …), once, in import order."""
    path, _st.modules_path = _st.modules_path, None
    assert path is not None
    main = sys.modules.get("__main__")
    here = os.path.dirname(os.path.abspath(getattr(main, "__file__", None) or ".")) + os.sep
    names = []
    for name, module in list(sys.modules.items()):
        spec = getattr(module, "__spec__", None)
        origin = getattr(spec, "origin", None)
        if (spec is None or spec.name != name or name.partition(".")[0] in ("ftrain", "__main__", "__mp_main__")
                or origin in ("built-in", "frozen") or (origin or "").startswith(here)):
            continue
        names.append(name)
    try:
        with open(path + ".tmp", "w") as f:
            f.write("\n".join(names) + "\n")
        os.replace(path + ".tmp", path)
    except OSError:   # only an optimisation of the next start
        pass


def _open_metrics() -> int:
    with _st.fd_lock:
        if _st.fd is None:
            assert _st.metrics_path is not None
            _st.fd = os.open(_st.metrics_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        return _st.fd


def _control(event: str, step: int | None, **fields: Any) -> None:
    """Write a control line ``{"ftrain": event, "step", "t", "attempt", **fields}``."""
    if _st.metrics_path is None:
        return
    record: dict[str, Any] = {"ftrain": event, "step": step, "t": time.time(), "attempt": _st.attempt}
    if _st.rank:
        record["rank"] = _st.rank
    record.update(fields)
    _write(record)


def _coerce(key: str, value: Any, where: str = "ftrain.log") -> Any:
    """A JSON-ready scalar for ``value``: ``.item()`` for tensors and numpy scalars."""
    if isinstance(value, str):
        return str(value)[:MAX_STRING]
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    item = getattr(value, "item", None)
    if callable(item):
        try:
            scalar = item()
        except (ValueError, RuntimeError) as exc:
            raise TypeError(f"{where}: metric {key!r} is not a scalar ({exc})") from exc
        if type(scalar) in _PLAIN:
            return scalar
    raise TypeError(f"{where}: metric {key!r} is a {type(value).__name__}; "
                    "give numbers, bools, short strings, numpy scalars or 0-d tensors")


def _plain_metrics(metrics: Mapping[str, Any], where: str = "ftrain.log") -> dict[str, Any]:
    return {str(k): v if type(v) in _PLAIN else _coerce(str(k), v, where) for k, v in metrics.items()}


def _heartbeat() -> None:
    """Refresh this rank's heartbeat file, at most every ``HEARTBEAT_EVERY`` seconds.

    Its content is the rank's pid (written by the first heartbeat of the process), so the
    supervisor can ask every rank for a stack dump without asking their launcher.
    """
    now = time.monotonic()
    if now - _st.heartbeat_at < HEARTBEAT_EVERY:
        return
    first = _st.heartbeat_at == -math.inf
    _st.heartbeat_at = now
    path = _st.heartbeat_path
    assert path is not None
    try:
        if first:
            _write_pid(path)
        else:
            os.utime(path)
    except FileNotFoundError:
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            _write_pid(path)
        except OSError:
            pass   # a heartbeat is advice to the supervisor; never fail a training step for it
    except OSError:
        pass


def _write_pid(path: str) -> None:
    """Write this process's pid to ``path`` atomically (a reader never sees it half written)."""
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, f"{os.getpid()}\n".encode())
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _parse_skip(spec: str | None) -> tuple[tuple[int, int], ...]:
    """``"1200-1399,5000"`` → ((1200, 1399), (5000, 5000)); ValueError on anything else."""
    if not spec:
        return ()
    ranges: list[tuple[int, int]] = []
    for item in spec.split(","):
        lo_text, _, hi_text = item.strip().partition("-")
        hi_text = hi_text or lo_text
        if not (lo_text.strip().isdigit() and hi_text.strip().isdigit()):
            raise ValueError(f"FTRAIN_SKIP_STEPS={spec!r}: {item.strip()!r} is not a step or a range a-b")
        lo, hi = int(lo_text), int(hi_text)
        if hi < lo:
            raise ValueError(f"FTRAIN_SKIP_STEPS={spec!r}: range {item.strip()!r} ends before it starts")
        ranges.append((lo, hi))
    return tuple(sorted(ranges))


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> None:
    """Deep-merge ``over`` into ``base`` in place; ``over`` wins, mappings merge key by key."""
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value


def _one_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".splitlines()[0]


# --------------------------------------------------------------------------- signals
def _on_stop_signal(signum: int, frame: object) -> None:
    """SIGTERM/SIGUSR2: a stop request. Only sets a flag and writes a control line, unless
    the script never asked ``should_stop()``: then it dies by the signal, as without us."""
    name = signal.Signals(signum).name
    if os.getpid() != _st.pid:        # a forked worker (DataLoader): not ours to keep alive
        _die_by(signum)
        return
    _st.stop_signal = _st.stop_signal or name
    try:
        _control("stop_requested", _st.last_step, signal=name, cooperative=_st.cooperating)
    except OSError:
        pass
    if not _st.cooperating:
        _die_by(signum)


def _die_by(signum: int) -> None:
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def _arm() -> None:
    """Under the supervisor: stacks on a crash and on SIGUSR1, stop requests on TERM/USR2.

    Python handlers go in only from the main thread and only over the default disposition,
    so a script's own handlers win.
    """
    try:
        faulthandler.enable()
    except (RuntimeError, ValueError, AttributeError, OSError):
        pass   # no usable stderr (closed or not a file): nowhere to dump stacks
    else:
        if signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL:
            faulthandler.register(signal.SIGUSR1, all_threads=True, chain=False)
    if os.environ.get("TORCHELASTIC_ERROR_FILE"):
        _chain_excepthook(sys.excepthook)
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in (signal.SIGTERM, signal.SIGUSR2):
        if signal.getsignal(sig) == signal.SIG_DFL:
            signal.signal(sig, _on_stop_signal)


def _chain_excepthook(previous: Any) -> None:
    """Under torchrun: an uncaught exception also lands in ``TORCHELASTIC_ERROR_FILE``, in
    the format of torch's ``@record``, so the supervisor (and torchrun's report) see this
    rank's error and when it happened. A file ``@record`` already wrote is left alone."""

    def hook(exc_type: Any, exc: Any, tb: Any) -> None:
        path = os.environ.get("TORCHELASTIC_ERROR_FILE")
        if path and os.getpid() == _st.pid and not os.path.exists(path):
            try:
                import traceback

                data = {"message": {"message": f"{exc_type.__name__}: {exc}", "extraInfo": {
                    "py_callstack": "".join(traceback.format_exception(exc_type, exc, tb)),
                    "timestamp": str(int(time.time()))}}}
                tmp = f"{path}.{os.getpid()}.tmp"
                with open(tmp, "w") as f:
                    json.dump(data, f)
                os.replace(tmp, path)
            except Exception:   # never hide the original error behind our own
                pass
        previous(exc_type, exc, tb)

    sys.excepthook = hook


# --------------------------------------------------------------------------- fault injection
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


def _fire_due(step: int, metrics: dict[str, Any]) -> dict[str, Any]:
    """Fire the faults due at ``step``, each once, after recording it in the metrics file.

    Value faults (nan, spike) change this step's metrics and term asks the job to stop;
    the step goes on after them. Of the faults that end the step (an exception, a death, a
    hang) one fires per call, before the step's line is written — unless a value fault
    fired too, whose line is written first so that its effect is seen.
    """
    st = _st
    due = [f for f in st.faults if f.step <= step]
    soft = [f for f in due if f.kind in _VALUE_FAULTS]
    hard = next((f for f in due if f.kind not in _VALUE_FAULTS), None)
    for fault in soft + ([hard] if hard else []):
        st.faults.remove(fault)
    st.next_fault_step = st.faults[0].step if st.faults else math.inf
    for fault in soft:
        _control("inject", step, fault=fault.kind, at=fault.step)
        if fault.kind == "term":
            os.kill(os.getpid(), signal.SIGTERM)
        else:
            metrics = _corrupt(fault.kind, metrics)
    if hard is not None:
        _control("inject", step, fault=hard.kind, at=hard.step)
        if soft and st.metrics_path is not None:
            st.last_metrics = metrics
            _write({"step": step, "t": time.time(), "attempt": st.attempt, **metrics})
        _raise_fault(hard.kind, step)
    return metrics


def _corrupt(kind: str, metrics: dict[str, Any]) -> dict[str, Any]:
    """``nan``: loss (else every float metric) becomes NaN; ``spike``: the same, x1000."""
    out = _plain_metrics(metrics)
    keys = ["loss"] if "loss" in out else [k for k, v in out.items() if type(v) is float]
    for key in keys:
        if isinstance(out[key], (int, float)) and not isinstance(out[key], bool):
            out[key] = math.nan if kind == "nan" else float(out[key]) * 1000.0
    return out


def _raise_fault(kind: str, step: int) -> None:
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


# --------------------------------------------------------------------------- checkpoints
class _HashingWriter:
    """A write-only file for ``torch.save`` that hashes the bytes on their way to disk.

    The SHA-256 is computed on a helper thread while the same bytes are written (both
    release the GIL), so it costs little beyond the write and the data is never read back.
    Writes under ``CHUNK`` bytes (zip headers, small tensors) are gathered in one of two
    buffers of our own, so the next buffer fills while the last is still being hashed. A
    larger write is torch's own buffer, which it may reuse: that ``write`` returns only
    when its bytes are hashed and written. Every ``WRITEBACK_EVERY`` bytes Linux is told
    to start writing them to disk, so the final fsync finds little left to do.
    """

    CHUNK = 1 << 20
    WRITEBACK_EVERY = 8 << 20

    def __init__(self, fd: int) -> None:
        import hashlib

        self.fd = fd
        self.size = 0
        self.error: OSError | None = None
        self.before_first_write: Callable[[], None] | None = None
        self._hash = hashlib.sha256()
        self._writeback_from = 0   # bytes before this offset are already on their way to disk
        self._buffers = (bytearray(self.CHUNK), bytearray(self.CHUNK))
        self._filling = 0          # index in _buffers of the one being filled
        self._filled = 0           # bytes in it
        self._chunk: memoryview | None = None
        self._hashing = False      # the helper thread has a chunk it has not finished
        self._go = threading.Semaphore(0)
        self._done = threading.Semaphore(0)
        self._thread: threading.Thread | None = None

    def write(self, data: Any) -> int:
        if self.before_first_write is not None:
            self.before_first_write()
            self.before_first_write = None
        view = memoryview(data)
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        n = view.nbytes
        try:
            if n >= self.CHUNK:
                self._flush_buffer()
                self._hash_aside(view, ours=False)
            else:
                if self._filled + n > self.CHUNK:
                    self._flush_buffer()
                self._buffers[self._filling][self._filled:self._filled + n] = view
                self._filled += n
        except OSError as exc:
            self.error = exc   # torch turns it into a RuntimeError; the caller wants this one
            raise
        return n

    def flush(self) -> None:
        """Write out what is buffered; durability is the caller's fsync."""
        try:
            self._flush_buffer()
        except OSError as exc:
            self.error = exc
            raise

    def hexdigest(self) -> str:
        self._wait_for_hash()
        return self._hash.hexdigest()

    def close(self) -> None:
        if self._thread is not None:
            self._wait_for_hash()
            self._chunk = None
            self._go.release()
            self._thread.join()
            self._thread = None

    def _flush_buffer(self) -> None:
        if self._filled:
            view = memoryview(self._buffers[self._filling])[:self._filled]
            self._filling, self._filled = 1 - self._filling, 0
            self._hash_aside(view, ours=True)

    def _hash_aside(self, view: memoryview, *, ours: bool) -> None:
        """Hash ``view`` on the helper thread while it is written here. Wait for the hash
        before returning unless the buffer is ours; the next hand-off waits for it then
        (that is also what frees the buffer for refilling)."""
        self._wait_for_hash()
        if self._thread is None:
            self._thread = threading.Thread(target=self._hash_loop, name="ftrain-sha256", daemon=True)
            self._thread.start()
        self._chunk = view
        self._hashing = True
        self._go.release()
        try:
            self._write(view)
        finally:
            if not ours:
                self._wait_for_hash()

    def _wait_for_hash(self) -> None:
        if self._hashing:
            self._done.acquire()
            self._hashing = False

    def _write(self, view: memoryview) -> None:
        """Write ``view`` in pieces of ``WRITEBACK_EVERY``, starting writeback after each."""
        step = self.WRITEBACK_EVERY
        for start in range(0, view.nbytes, step):
            piece = view[start:start + step]
            _write_all(self.fd, piece)
            self.size += piece.nbytes
            if self.size - self._writeback_from >= step:
                _start_writeback(self.fd, self._writeback_from, self.size - self._writeback_from)
                self._writeback_from = self.size

    def _hash_loop(self) -> None:
        while True:
            self._go.acquire()
            chunk = self._chunk
            if chunk is None:
                return
            self._hash.update(chunk)
            self._done.release()


_sync_file_range: Any = None   # libc's sync_file_range, once looked up; False where there is none


def _start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Ask Linux to start writing this range of ``fd`` to disk, without waiting for it
    (``sync_file_range(SYNC_FILE_RANGE_WRITE)``). Only a head start for the fsync that
    follows, so a missing call or an error is ignored: the fsync reports what matters."""
    global _sync_file_range
    if _sync_file_range is None:
        _sync_file_range = False
        if sys.platform.startswith("linux"):
            try:
                import ctypes

                func = ctypes.CDLL(None, use_errno=True).sync_file_range
                func.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
                func.restype = ctypes.c_int
                _sync_file_range = func
            except (OSError, AttributeError):
                pass
    if _sync_file_range:
        _sync_file_range(fd, offset, nbytes, 2)   # SYNC_FILE_RANGE_WRITE


def _write_all(fd: int, view: memoryview) -> None:
    """``os.write`` until every byte is out (one call writes at most ~2 GiB on Linux)."""
    while view.nbytes:
        written = os.write(fd, view)
        view = view[written:]


_crc32_lock = threading.Lock()


def _save_without_crc32(torch: Any, state: Any, writer: _HashingWriter) -> None:
    """``torch.save(state, writer)`` without torch's CRC32 of each zip record.

    The SHA-256 in the manifest already covers every byte, and the CRC32 costs about a
    third of a plain torch.save. ``torch.load`` does not check it (zip tools would).
    The option is process-wide, but torch reads it once, when torch.save opens its zip
    writer, before the first byte reaches ``writer``: so it is restored at that first
    write, and only a torch.save that another thread starts while ``state`` is being
    pickled (milliseconds) is written without CRC32 too, which torch.load reads all the
    same. The lock keeps two saves from restoring each other's setting.
    """
    serialization = torch.serialization
    with _crc32_lock:
        previous = serialization.get_crc32_options()

        def restore() -> None:
            serialization.set_crc32_options(previous)

        serialization.set_crc32_options(False)
        writer.before_first_write = restore
        try:
            torch.save(state, writer)
        finally:
            if writer.before_first_write is not None:   # torch.save failed before writing
                writer.before_first_write = None
                restore()


def _write_checkpoint(state: Any, directory: str, step: int, info: dict[str, Any]) -> None:
    """temp data (hashed, fsync) → rename → temp manifest (fsync) → rename → fsync folder."""
    import torch

    from ftrain import ckptfmt

    pid = os.getpid()
    data = os.path.join(directory, ckptfmt.data_name(step))
    data_tmp = os.path.join(directory, ckptfmt.temp_name(ckptfmt.data_name(step), pid))
    manifest = os.path.join(directory, ckptfmt.manifest_name(step))
    manifest_tmp = os.path.join(directory, ckptfmt.temp_name(ckptfmt.manifest_name(step), pid))
    renamed = False
    try:
        os.makedirs(directory, exist_ok=True)
        fd = os.open(data_tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        writer = _HashingWriter(fd)
        try:
            try:
                _save_without_crc32(torch, state, writer)
            except RuntimeError as exc:
                if writer.error is not None:
                    raise writer.error from exc
                raise
            writer.flush()
            os.fsync(fd)
        finally:
            writer.close()
            os.close(fd)
        # A manifest of an earlier save of this step would describe other bytes: drop it
        # first, so a crash in between leaves a complete file without a manifest.
        if os.path.lexists(manifest):
            os.unlink(manifest)
        os.replace(data_tmp, data)
        renamed = True
        body = dict(info, bytes=writer.size, sha256=writer.hexdigest())
        _write_durably(manifest_tmp, (json.dumps(body, indent=1) + "\n").encode())
        os.replace(manifest_tmp, manifest)
        _fsync_dir(directory)
    except BaseException as exc:
        for leftover in (data_tmp, manifest_tmp) + ((data,) if renamed else ()):
            try:
                os.unlink(leftover)
            except OSError:
                pass
        if isinstance(exc, OSError) and not isinstance(exc, CheckpointError):
            why = exc.strerror or str(exc)
            raise CheckpointError(exc.errno or 0, f"ftrain.save_checkpoint: cannot save step {step} "
                                  f"in {directory}: {why}") from exc
        raise


def _write_durably(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        _write_all(fd, memoryview(data))
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    except OSError:
        pass   # some file systems cannot fsync a folder; the renames are done regardless
    finally:
        os.close(fd)


def _cpu_copy(obj: Any, torch: Any, pool: dict[Any, list[Any]] | None = None) -> Any:
    """A snapshot of ``obj`` that later training steps cannot change: tensors copied to
    the CPU, containers rebuilt, anything else deep-copied.

    ``pool``: CPU tensors of the previous snapshot, by (shape, stride, dtype), written out
    and free again. Copying into memory that is already mapped takes a seventh of the time
    of a fresh copy (100 MB: 7 vs 49 ms here): the fresh one pays a page fault per 4 KiB.
    """
    if isinstance(obj, torch.Tensor):
        src = obj.detach()
        if pool and type(src) is torch.Tensor and src.layout == torch.strided and not src.is_quantized:
            free = pool.get((tuple(src.shape), src.stride(), src.dtype))
            if free:
                return free.pop().copy_(src)
        return src.to("cpu", copy=True)
    if isinstance(obj, dict):
        import copy

        out = copy.copy(obj)   # keeps the type and attributes (a state_dict's _metadata)
        for key, value in obj.items():
            out[key] = _cpu_copy(value, torch, pool)
        return out
    if isinstance(obj, list):
        return [_cpu_copy(v, torch, pool) for v in obj]
    if isinstance(obj, tuple):
        items = [_cpu_copy(v, torch, pool) for v in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)
    if isinstance(obj, (str, bytes, int, float, bool, type(None))):
        return obj
    import copy

    return copy.deepcopy(obj)


def _snapshot_pool(snapshot: Any, torch: Any) -> dict[Any, list[Any]]:
    """The CPU tensors of a snapshot whose save is over, by (shape, stride, dtype)."""
    pool: dict[Any, list[Any]] = {}
    seen: set[int] = set()
    todo = [snapshot]
    while todo:
        obj = todo.pop()
        if isinstance(obj, torch.Tensor):
            if type(obj) is torch.Tensor and obj.device.type == "cpu" and id(obj) not in seen:
                seen.add(id(obj))
                pool.setdefault((tuple(obj.shape), obj.stride(), obj.dtype), []).append(obj)
        elif isinstance(obj, dict):
            todo.extend(obj.values())
        elif isinstance(obj, (list, tuple)):
            todo.extend(obj)
    return pool


def _background_save(snapshot: Any, directory: str, step: int, info: dict[str, Any], final: str) -> None:
    error: BaseException | None = None
    try:
        _write_checkpoint(snapshot, directory, step, info)
    except BaseException as exc:
        error = exc
        _st.save_error, _st.save_error_step = exc, step
    try:
        _control("save_end", step, path=None if error else final,
                 **({"error": _one_line(error)} if error else {}))
    except OSError:
        pass


def _wait_for_save(*, raise_error: bool) -> None:
    """Wait for the background save in flight; raise (once) the error of the last one."""
    thread = _st.save_thread
    if thread is not None:
        thread.join()
        _st.save_thread = None
    error = _st.save_error
    if error is not None and raise_error:
        _st.save_error = None
        raise error


def _at_exit() -> None:
    _wait_for_save(raise_error=False)
    if _st.save_error is not None:
        print(f"ftrain: the background save of step {_st.save_error_step} failed: {_one_line(_st.save_error)}",
              file=sys.stderr, flush=True)


def _check_size(path: str) -> None:
    """Compare a checkpoint's size with its manifest's ``bytes``, when it has a manifest."""
    from ftrain import ckptfmt

    name = ckptfmt.manifest_for(os.path.basename(path))
    if name is None:
        return
    try:
        with open(os.path.join(os.path.dirname(path), name), "rb") as f:
            expected = json.load(f).get("bytes")
    except (OSError, ValueError, AttributeError):
        return   # no (readable) manifest: nothing cheap to check
    try:
        size = os.stat(path).st_size
    except OSError as exc:
        raise CheckpointError(exc.errno or 0, f"ftrain.load_checkpoint: {path}: {exc.strerror}") from exc
    if isinstance(expected, int) and size != expected:
        import errno

        raise CheckpointError(errno.EIO, f"ftrain.load_checkpoint: {path} has {size} bytes but its manifest "
                                         f"says {expected}: the file was truncated or replaced")


atexit.register(_at_exit)
if _st.run_dir is not None:
    _arm()
