"""The metrics file and the heartbeat: what the shim writes for the supervisor to read.

Metric lines and control lines (``{"ftrain": <Control>, ...}``, ``ftrain.protocol``) share
``FTRAIN_METRICS_PATH``; each line is one ``os.write`` on an ``O_APPEND`` descriptor, so a
reader never sees a torn line. Values are coerced here to what JSON holds (NaN and Inf
included). Under torchrun every rank also keeps ``$FTRAIN_RUN_DIR/heartbeat/rank-N``; the
first ``log`` of a single process lists the modules start-up imported (``ftrain.warm``).
Standard library only, like the rest of the shim.
"""

from __future__ import annotations

import json
import os
import sys
import time

TYPE_CHECKING = False   # typing itself costs milliseconds at import; annotations are strings
if TYPE_CHECKING:
    from collections.abc import Mapping
    from typing import Any

    from ftrain.protocol import Control
    from ftrain.shim import ProcessState

__all__ = ["HEARTBEAT_EVERY", "MAX_STRING", "PLAIN", "as_step", "coerce", "control", "heartbeat", "one_line",
           "plain_metrics", "record_modules", "step_time", "write", "write_all"]

HEARTBEAT_EVERY = 0.5      # seconds between two refreshes of a rank's heartbeat file
STEP_TIMES = 64            # per-step times a heartbeat carries (ftrain.detect.STEP_TIMES)
MAX_STRING = 256           # longer string metrics are cut to this many characters
PLAIN = frozenset({float, int, bool, type(None)})   # written as they are, no conversion
_encode = json.JSONEncoder().encode                 # NaN/Infinity allowed, like json.dumps


def write(st: ProcessState, record: dict[str, Any]) -> None:
    """Append one line with a single ``os.write`` (O_APPEND): never torn, seen at once."""
    fd = st.fd if st.fd is not None else _open(st)
    data = (_encode(record) + "\n").encode()
    written = os.write(fd, data)
    if written < len(data):   # only near a full disk; finish the line or raise its error
        write_all(fd, memoryview(data)[written:])


def control(st: ProcessState, event: Control, step: int | None, **fields: Any) -> None:
    """Write a control line ``{"ftrain": event, "step", "t", "attempt", **fields}``."""
    if st.metrics_path is None:
        return
    record: dict[str, Any] = {"ftrain": event.value, "step": step, "t": time.time(), "attempt": st.attempt}
    if st.rank:
        record["rank"] = st.rank
    record.update(fields)
    write(st, record)


def _open(st: ProcessState) -> int:
    with st.fd_lock:   # a background save's control line may race the first log
        if st.fd is None:
            assert st.metrics_path is not None
            from ftrain.files import end_torn_line

            end_torn_line(st.metrics_path)   # a line cut by a full disk must not swallow our first
            st.fd = os.open(st.metrics_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        return st.fd


def write_all(fd: int, view: memoryview) -> None:
    """``os.write`` until every byte is out (one call writes at most ~2 GiB on Linux)."""
    while view.nbytes:
        written = os.write(fd, view)
        view = view[written:]


def as_step(step: Any, where: str = "ftrain.log") -> int:
    """``step`` as an int: ints, and whole-number floats, numpy scalars and 0-d tensors
    (``120.0``, ``np.int64(120)``, ``torch.tensor(120)``). Anything else is the script's
    bug, said at the call: a step the supervisor cannot read would hide that step's NaN."""
    if isinstance(step, bool):
        raise TypeError(f"{where}: step {step!r} is a bool, not a step number")
    if isinstance(step, int):
        return int(step)
    scalar = step
    item = getattr(step, "item", None)
    if not isinstance(step, float) and callable(item):
        try:
            scalar = item()
        except (ValueError, RuntimeError) as exc:
            raise TypeError(f"{where}: step {type(step).__name__} is not a scalar ({exc})") from exc
        if isinstance(scalar, bool):
            raise TypeError(f"{where}: step {step!r} is a bool, not a step number")
        if isinstance(scalar, int):
            return int(scalar)
    if isinstance(scalar, float):
        if scalar.is_integer():
            return int(scalar)
        raise ValueError(f"{where}: step {scalar!r} is not a whole number")
    raise TypeError(f"{where}: step must be an int (or a whole-number float), not {type(step).__name__} "
                    f"{str(step)[:40]!r}")


_NUMBER_CHARS = frozenset("0123456789+-.eE_ ")


def _number(text: str) -> float | int | None:
    """The number a short string spells (``"2.31"``, ``"NaN"``, ``"-inf"``), else None: a
    loss logged as text is still a loss the detectors watch."""
    if len(text) > 40:
        return None
    bare = text.strip().lower().lstrip("+-")
    if bare in ("nan", "inf", "infinity"):
        return float(text)
    if not bare or not _NUMBER_CHARS.issuperset(bare) or "_" in bare or " " in bare:
        return None
    try:
        return int(text) if bare.isdigit() else float(text)
    except ValueError:
        return None


def coerce(key: str, value: Any, where: str = "ftrain.log") -> Any:
    """A JSON-ready scalar for ``value``: ``.item()`` for tensors and numpy scalars; a
    string that spells a number (``"NaN"``, ``"2.31"``) is that number."""
    if isinstance(value, str):
        number = _number(value)
        return number if number is not None else str(value)[:MAX_STRING]
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
        if type(scalar) in PLAIN:
            return scalar
    raise TypeError(f"{where}: metric {key!r} is a {type(value).__name__}; "
                    "give numbers, bools, short strings, numpy scalars or 0-d tensors")


def plain_metrics(metrics: Mapping[str, Any], where: str = "ftrain.log") -> dict[str, Any]:
    """``metrics`` with string keys and every value ``coerce``d."""
    return {str(k): v if type(v) in PLAIN else coerce(str(k), v, where) for k, v in metrics.items()}


def one_line(exc: BaseException) -> str:
    """``"OSError: [Errno 28] No space left on device"``: an error as a control line carries it."""
    return f"{type(exc).__name__}: {exc}".splitlines()[0]


def step_time(st: ProcessState, step: int) -> None:
    """Note this rank's time per step at a ``log`` call: the time spent in ``ftrain.timed()``
    since the last call where the script uses it, else the time since the last call; over
    the steps between the two calls. The last ``STEP_TIMES`` are kept for the heartbeat."""
    now = time.perf_counter()
    seen = st.step_seen
    st.step_seen = (step, now)
    own, st.timed_total = st.timed_total, 0.0
    if seen is None or step <= seen[0]:
        return      # the first step, or the loop went back (a skip window, a new epoch's count)
    times = st.step_times
    times.append((own if st.timed_used else now - seen[1]) / (step - seen[0]))
    if len(times) > 2 * STEP_TIMES:
        del times[:-STEP_TIMES]


def heartbeat(st: ProcessState) -> None:
    """Refresh this rank's heartbeat file, at most every ``HEARTBEAT_EVERY`` seconds.

    Its content is the rank's pid on the first line, so the supervisor can ask every rank
    for a stack dump without asking their launcher; then the last step and the rank's
    latest per-step times in seconds, newest last (``step_time``), for the straggler score::

        4711
        120 0.0412 0.0398 0.0405 …
    """
    now = time.monotonic()
    if now - st.heartbeat_at < HEARTBEAT_EVERY:
        return
    st.heartbeat_at = now
    path = st.heartbeat_path
    assert path is not None
    try:
        _write_beat(path, st)
    except FileNotFoundError:
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            _write_beat(path, st)
        except OSError:
            pass   # a heartbeat is advice to the supervisor; never fail a training step for it
    except OSError:
        pass


def _write_beat(path: str, st: ProcessState) -> None:
    """Write the heartbeat atomically (a reader never sees it half written)."""
    from ftrain.files import write_atomic

    times = " ".join(f"{t:.6g}" for t in st.step_times[-STEP_TIMES:])
    step = st.last_step if st.last_step is not None else -1
    write_atomic(path, f"{os.getpid()}\n{step} {times}\n")


def record_modules(st: ProcessState) -> None:
    """Write the names of the modules imported so far that come from outside the script's
    folder (torch, torch._dynamo that an optimizer pulls in, …), once, in import order."""
    path, st.modules_path = st.modules_path, None
    assert path is not None
    main = sys.modules.get("__main__")
    script = os.path.abspath(getattr(main, "__file__", None) or ".")
    # the script's own folder, as typed and as Python puts it on sys.path (symlinks resolved)
    here = tuple({os.path.dirname(script) + os.sep, os.path.dirname(os.path.realpath(script)) + os.sep})
    names = []
    for name, module in list(sys.modules.items()):
        spec = getattr(module, "__spec__", None)
        origin = getattr(spec, "origin", None)
        if (spec is None or spec.name != name or name.partition(".")[0] in ("ftrain", "__main__", "__mp_main__")
                or origin in ("built-in", "frozen") or (origin or "").startswith(here)):
            continue
        names.append(name)
    try:
        from ftrain.files import write_atomic

        write_atomic(path, "\n".join(names) + "\n")
    except OSError:   # only an optimisation of the next start
        pass
