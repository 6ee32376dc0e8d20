"""The shim a training script imports (``import ftrain``), DESIGN §3.

It is the script's side of the supervisor: it reads the environment the supervisor set
(DESIGN §2), appends metrics and control lines to ``FTRAIN_METRICS_PATH``, writes atomic
checkpoints with a manifest, turns SIGTERM/SIGUSR2 into ``should_stop()``, and fires the
faults of ``--inject``. Without the supervisor every function still works (``config``
returns the defaults, ``log`` does nothing, checkpoints go to ``./checkpoints``).

This module holds the public functions and what the shim knows of its process
(``ProcessState``); the rest lives in rooms of its own, each given that state:

    metrics   the metrics file, control lines, value coercion, heartbeats
    signals   stop requests, stacks on SIGUSR1, torchrun's error file (armed at import
              under the supervisor)
    writer    the checkpoint writer: hashed, durable, in the background (loaded on a save)
    shards    sharded checkpoints through torch.distributed.checkpoint (loaded on one)
    faults    firing the faults of ``--inject`` (loaded when one is due)

It stands apart from the supervisor: it imports only ``ftrain.protocol`` (the names of the
control lines), and ``ftrain.files``, ``ftrain.inject`` and ``ftrain.ckptfmt`` when a
function needs them, torch, yaml and hashlib likewise, so ``import ftrain`` stays cheap.
Control lines share the metrics file with metric lines and always carry an ``"ftrain"``
key (first) naming the event (``protocol.Control``). A reader must check that key before
treating a line as a step's metrics.
"""

from __future__ import annotations

import atexit
import json
import math
import os
import sys
import threading
import time

from ftrain.protocol import RESERVED_METRICS, Control, parse_skip
from ftrain.shim.metrics import (
    PLAIN,
    as_step,
    coerce,
    control,
    heartbeat,
    one_line,
    record_modules,
    step_time,
    write,
)

TYPE_CHECKING = False   # typing itself costs milliseconds at import; annotations are strings
if TYPE_CHECKING:
    from collections.abc import Mapping
    from typing import Any

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
    "snapshot",
    "timed",
]


class CheckpointError(OSError):
    """A checkpoint could not be written or read; ``errno`` is the cause's (ENOSPC, EIO …)."""


class ProcessState:
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
        # Per-step times for the supervisor's straggler score (carried by the heartbeat):
        # the time in ftrain.timed() per step where the script uses it, else log to log.
        self.step_times: list[float] = []
        self.step_seen: tuple[int, float] | None = None   # (step, perf_counter) of the last log
        self.timed_total = 0.0                            # time in timed() since the last log
        self.timed_used = False
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
        # spare interpreter to import ahead (ftrain.warm); under torchrun local rank 0 lists
        # them for the next attempt's warm ranks (each node its own, in its own run folder).
        self.modules_path: str | None = None
        if self.run_dir is not None and self.attempt is not None and (rank is None or env.get("LOCAL_RANK") == "0"):
            self.modules_path = os.path.join(self.run_dir, "attempts", f"{self.attempt:04d}", "modules.txt")
        self.save_thread: threading.Thread | None = None
        self.last_snapshot: Any = None   # kept after its save: the next one copies into it
        self.save_error: BaseException | None = None
        self.save_error_step: int | None = None
        # ftrain.snapshot: the supervisor's memory tier and the blocking budget (shim/snapshot.py)
        self.memory_dir = env.get("FTRAIN_MEMORY_DIR") or None
        self.snapshot_overhead = _share(env.get("FTRAIN_SNAPSHOT_OVERHEAD"), 0.02)
        self.snapshot_thread: threading.Thread | None = None
        self.snapshot_copy: Any = None
        self.snapshot_next_at = -math.inf
        self.snapshot_blocked: list[float] = []
        self.snapshot_steady = False   # a copy into the last one's memory has been timed
        self.snapshot_failed = False


def _share(text: str | None, default: float) -> float:
    try:
        value = float(text) if text else default
    except ValueError:
        return default
    return value if 0 < value <= 1 else default


_st = ProcessState(os.environ)


# --------------------------------------------------------------------------- public API
def is_supervised() -> bool:
    """True when the script runs under ``ftrain run`` (``FTRAIN_RUN_DIR`` is set)."""
    return _st.run_dir is not None


def config(defaults: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The effective config: ``FTRAIN_CONFIG_PATH`` (YAML) deep-merged over ``defaults``.

    The file (base config + overrides) wins where both have a key. Without the variable, a
    deep copy of ``defaults``. The sha256 of the file is recorded in the metrics stream, so
    the supervisor can tell a script that never asked for its overrides, with the defaults'
    values (scalars only: what a policy's ``scale`` needs without ``--config``) and the
    overrides of keys neither the defaults nor the base config have: those are also said
    on stderr, for a key the script never reads is an override that does nothing.
    """
    import copy
    from collections.abc import Mapping

    if defaults is not None and not isinstance(defaults, Mapping):
        raise TypeError(f"ftrain.config: defaults must be a mapping, not {type(defaults).__name__}")
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
        raise ValueError(  # noqa: TRY004 - what the file holds is a bad value, not a caller's type
            f"{path}: a config must be a mapping at the top level, not {type(loaded).__name__}")
    unknown = _unknown_overrides(loaded, result)
    _merge(result, loaded)
    if _st.rank == 0:
        if unknown:
            print(f"ftrain: warning: override{'s' if len(unknown) > 1 else ''} of "
                  f"{', '.join(f'{k}={_leaf(loaded, k)!r}' for k in unknown)}: no such key in the script's "
                  "ftrain.config(defaults=...) nor in --config; the script may not use it",
                  file=sys.stderr, flush=True)
        fields: dict[str, Any] = {"digest": hashlib.sha256(raw).hexdigest(), "path": path}
        if defaults:
            plain = _plain_tree(defaults)
            if len(json.dumps(plain, default=str)) <= DEFAULTS_LIMIT:
                fields["defaults"] = plain
        if unknown:
            fields["unknown_overrides"] = unknown
        control(_st, Control.CONFIG, None, **fields)
    return result


def log(step: int, *, rank_zero_only: bool = True, **metrics: Any) -> None:
    """Append one metrics line ``{"step", "t", "attempt", **metrics}``; also a heartbeat.

    Values: numbers, bools, short strings, and anything with ``.item()`` (numpy scalars,
    0-d tensors). NaN and Inf are written as JSON ``NaN``/``Infinity``. Under several
    ranks only rank 0 writes (unless ``rank_zero_only=False``); every rank refreshes its
    heartbeat file. A cheap no-op when ``FTRAIN_METRICS_PATH`` is not set.
    """
    st = _st
    if type(step) is not int:
        step = as_step(step)
    st.last_step = step
    if st.modules_path is not None:
        record_modules(st)
    if step >= st.next_fault_step:
        from ftrain.shim.faults import fire_due

        metrics = fire_due(st, step, metrics)
    st.last_metrics = metrics
    if st.heartbeat_path is not None:
        step_time(st, step)
        heartbeat(st)
    if st.metrics_path is None or (rank_zero_only and st.rank != 0):
        return
    for key, value in metrics.items():
        if type(value) not in PLAIN:
            metrics[key] = coerce(key, value)
    if not RESERVED_METRICS.isdisjoint(metrics):
        raise ValueError(f"ftrain.log: the metric names {', '.join(sorted(RESERVED_METRICS))} are reserved")
    record = {"step": step, "t": time.time(), "attempt": st.attempt}
    if st.rank:
        record["rank"] = st.rank
    record.update(metrics)
    write(st, record)


class _Timed:
    """``ftrain.timed()``: adds the time spent inside to this rank's step time."""

    __slots__ = ("began",)

    def __enter__(self) -> _Timed:
        self.began = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        st = _st
        st.timed_total += time.perf_counter() - self.began
        st.timed_used = True


def timed() -> _Timed:
    """A context manager around the part of a step that does not wait for the other ranks
    (loading the batch, the forward pass): under torchrun its time per step, on every rank,
    is what ftrain compares to find a straggler (DESIGN §6 ``detect: straggler``). Without
    it a rank's step time is the time between two ``ftrain.log`` calls, which in a job whose
    ranks meet in a collective every step is the same on every rank. Cheap (two clock
    reads); works anywhere, the supervisor or not."""
    return _Timed()


def should_skip(step: int) -> bool:
    """True when ``step`` lies in one of the ``FTRAIN_SKIP_STEPS`` windows (inclusive)."""
    ranges = _st.skip
    if ranges is None:
        ranges = _st.skip = parse_skip(_st.skip_spec)
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
                    blocking: bool = True, sharded: bool = False) -> str | None:
    """Save ``state`` as ``step-NNNNNNNN.pt`` plus a manifest, atomically and durably.

    Rank 0 only (other ranks get None). Writes to ``FTRAIN_CHECKPOINT_DIR``, else
    ``./checkpoints``. The data is hashed as it is written; the manifest
    (``step, attempt, t, bytes, digest, metrics``) is written only after the data file is
    flushed and renamed into place. ``metrics`` defaults to those of the last ``log``.
    ``blocking=False`` copies the state to the CPU now and writes it on a background
    thread (one at a time); its error is raised by the next call. The copy's CPU memory is
    kept for the next non-blocking save, which copies into it (no page faults: a seventh of
    the time). Returns the final path.
    Raises ``CheckpointError`` (an OSError) when the files cannot be written; nothing that
    looks like a checkpoint is left behind then, and earlier checkpoints are not touched.

    ``sharded=True``: a collective, called on every rank (blocking only). Each rank writes
    its own part of ``state`` (a dict of tensors, DTensors, ``state_dict()``s, plain values)
    through ``torch.distributed.checkpoint`` into the folder ``step-NNNNNNNN/``; rank 0
    writes the manifest (every file's name, size and sha256) once every rank's files are
    durable. Returns the folder's path on every rank.
    """
    st = _st
    if sharded:
        if not blocking:
            raise ValueError("ftrain.save_checkpoint: a sharded save is blocking (blocking=False is for one file)")
        _wait_for_save(raise_error=True)
        from ftrain.shim import shards

        return shards.save(st, state, step, st.last_metrics if metrics is None else metrics)
    if st.rank != 0:
        return None
    _wait_for_save(raise_error=True)
    from ftrain.shim import writer

    return writer.save(st, state, step, st.last_metrics if metrics is None else metrics, blocking=blocking)


def snapshot(state: Any, step: int) -> bool:
    """Put a copy of ``state`` (tensors, nested dicts/lists, plain values) at ``step`` in the
    supervisor's memory tier, where it survives a crash of this process; cheap enough to
    call every step. True when a snapshot was started; False at once when the previous one
    is still being written, when the ``checkpoints.snapshot_overhead`` budget says too soon,
    on a rank other than 0, or without the supervisor. Save the step with the state, as for
    ``save_checkpoint``: a restart may resume from the snapshot (``load_checkpoint``)."""
    if _st.memory_dir is None:
        return False
    from ftrain.shim import snapshots

    return snapshots.take(_st, state, step)


def load_checkpoint(path: str | os.PathLike[str] | None = None, *, weights_only: bool = True,
                    map_location: Any = "cpu", state: Any = None) -> Any:
    """Load ``path`` (default ``FTRAIN_RESUME_FROM``) with ``torch.load``; None if neither.

    When it is the folder of a sharded save (``save_checkpoint(..., sharded=True)``), every
    rank calls this with ``state``, its own state dict of the same shape (its model's and
    optimizer's ``state_dict()``, DTensors included): ``torch.distributed.checkpoint``
    loads into it in place, and it is returned. Without ``state`` that raises a TypeError.

    When the file has a manifest its size is checked (the supervisor checked the digest
    before it chose the file); a mismatch raises ``CheckpointError``. When the resume point
    is a promoted snapshot still held in the supervisor's memory tier (the same name, digest
    and size), its bytes are read from there instead of from disk.
    """
    target = os.fspath(path) if path is not None else _st.resume_from
    if not target:
        return None
    _wait_for_save(raise_error=False)   # it may be the file a background save is writing
    if os.path.isdir(target):
        from ftrain.shim import shards

        return shards.load(target, state)
    _check_size(target)
    import torch

    source: Any = target
    if _st.memory_dir is not None and path is None:
        source = _from_memory(target) or target
    try:
        return torch.load(source, map_location=map_location, weights_only=weights_only)
    finally:
        if source is not target:
            source.close()


# --------------------------------------------------------------------------- helpers
DEFAULTS_LIMIT = 64 << 10   # bytes of defaults sent in the config control line


def _leaves(tree: Mapping[str, Any], prefix: str = "") -> list[str]:
    """The dotted keys of every value in ``tree`` that is not itself a mapping."""
    out: list[str] = []
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.extend(_leaves(value, dotted + "."))
        else:
            out.append(dotted)
    return out


def _leaf(tree: Mapping[str, Any], dotted: str) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def _has(tree: Mapping[str, Any], dotted: str) -> bool:
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def _unknown_overrides(loaded: Mapping[str, Any], defaults: Mapping[str, Any]) -> list[str]:
    """Keys of the attempt's config file that are overrides (not of the base config that
    ``run.json`` records) and that ``defaults`` lacks. Empty when run.json cannot be read:
    then the shim cannot tell an override from the base config."""
    if _st.run_dir is None:
        return []
    try:
        from ftrain.files import read_bounded

        info = json.loads(read_bounded(os.path.join(_st.run_dir, "run.json"), 64 << 20))
        base = info.get("base_config") if isinstance(info, dict) else None
    except (OSError, ValueError):
        return []
    if not isinstance(base, dict):
        return []
    return [k for k in _leaves(loaded) if not _has(base, k) and not _has(defaults, k)]


def _plain_tree(tree: Mapping[Any, Any], depth: int = 0) -> dict[str, Any]:
    """``tree`` as JSON: mappings kept (string keys), numbers, bools and short strings as
    they are, anything else as None (the key exists; its value is not one to scale)."""
    from collections.abc import Mapping

    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping) and depth < 32:
            out[str(key)] = _plain_tree(value, depth + 1)
        elif isinstance(value, (bool, int, float)) or value is None:
            out[str(key)] = value if not isinstance(value, int) or abs(value) < 1 << 63 else None
        elif isinstance(value, str) and len(value) <= 256:
            out[str(key)] = value
        else:
            item = getattr(value, "item", None)
            scalar = None
            if callable(item) and type(value).__module__.startswith(("numpy", "torch")):
                try:
                    scalar = item()
                except (ValueError, RuntimeError):
                    scalar = None
            out[str(key)] = scalar if type(scalar) in (bool, int, float) else None
    return out


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> None:
    """Deep-merge ``over`` into ``base`` in place; ``over`` wins, mappings merge key by key."""
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value


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
    if _st.snapshot_thread is not None:
        from ftrain.shim import snapshots

        snapshots.wait(_st)
    if _st.save_error is not None:
        print(f"ftrain: the background save of step {_st.save_error_step} failed: {one_line(_st.save_error)}",
              file=sys.stderr, flush=True)


def _from_memory(target: str) -> Any:
    """The resume point's bytes in the supervisor's memory tier, open, when the snapshot
    promoted to ``target`` is still there: the same name, and the same digest and size in
    both manifests (the supervisor checked the digest of both when it promoted it). None
    otherwise (then the file on disk is read)."""
    from ftrain import ckptfmt

    assert _st.memory_dir is not None
    name = os.path.basename(target)
    manifest = ckptfmt.manifest_for(name)
    if manifest is None:
        return None
    metas = []
    for folder in (os.path.dirname(target), _st.memory_dir):
        try:
            with open(os.path.join(folder, manifest), "rb") as f:
                metas.append(json.load(f))
        except (OSError, ValueError):
            return None
    disk, memory = metas
    if not (isinstance(disk, dict) and isinstance(memory, dict) and ckptfmt.digest_of(disk)
            and ckptfmt.digest_of(disk) == ckptfmt.digest_of(memory) and disk.get("bytes") == memory.get("bytes")):
        return None
    try:
        f = open(os.path.join(_st.memory_dir, name), "rb")  # noqa: SIM115 - closed by load_checkpoint
    except OSError:
        return None   # the child's own next snapshot may have removed it
    if os.fstat(f.fileno()).st_size != disk.get("bytes"):
        f.close()
        return None
    print(f"ftrain: {name} read from host memory ({_st.memory_dir})", file=sys.stderr, flush=True)
    return f


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
    from ftrain.shim import signals

    signals.arm(_st)
