"""``ftrain.snapshot``: a copy of the training state in host memory that outlives the process.

The supervisor owns a folder in host shared memory (``FTRAIN_MEMORY_DIR``, on /dev/shm: its
files live in RAM and belong to no process, so a segfault, abort, SIGKILL or OOM kill of
this one leaves them). A snapshot copies the state to the CPU (the blocking part: into the
previous snapshot's tensors when their shapes match, no page faults), then a background
thread (one for the process, started by the first snapshot: starting a thread per snapshot
blocked the caller up to a GIL switch interval, 5 ms, each time) writes it there under the
checkpoint names of ``ftrain.ckptfmt`` — the data through
the same hashing writer as a durable save but with no fsync (RAM has nothing to flush),
renamed into place, then its manifest — and removes the snapshot before it. At most one
is in flight and the folder holds at most two (the newest complete, the one being
written). The supervisor promotes the newest usable one into ``checkpoints/`` when an
attempt fails (``ftrain.memtier``).

The budget: a snapshot blocks for ``b`` seconds (the median of the last five); the next is
allowed only once ``b / overhead`` seconds have passed (``FTRAIN_SNAPSHOT_OVERHEAD``, the policy's
``checkpoints.snapshot_overhead``, 2 % by default), so the blocking share of training time
stays under the budget whatever the step time. A call refused by it, or while the last is
still being written, returns False at once.
"""

from __future__ import annotations

import os
import queue
import threading
import time

from ftrain import ckptfmt
from ftrain.shim.metrics import one_line, plain_metrics
from ftrain.shim.writer import cpu_copy, snapshot_pool, write_checkpoint

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from ftrain.shim import ProcessState

__all__ = ["take"]

DEFAULT_OVERHEAD = 0.02


def take(st: ProcessState, state: Any, step: int) -> bool:
    """One snapshot of ``state`` at ``step``, if the budget allows it now; see the module."""
    directory = st.memory_dir
    if directory is None or st.rank != 0:
        return False
    worker = _worker_for(st)
    if not worker.idle.is_set():
        return False
    now = time.monotonic()
    if now < st.snapshot_next_at or st.snapshot_failed:
        return False
    import torch

    started = time.perf_counter()
    pooled = st.snapshot_copy is not None
    pool = snapshot_pool(st.snapshot_copy, torch) if pooled else None
    st.snapshot_copy = None
    copy = st.snapshot_copy = cpu_copy(state, torch, pool)
    del pool
    blocked = time.perf_counter() - started
    info = {"step": step, "attempt": st.attempt, "t": time.time(), "tier": "memory",
            "metrics": plain_metrics(st.last_metrics, "ftrain.snapshot"), "blocked_s": round(blocked, 6)}
    worker.idle.clear()
    worker.jobs.put((st, copy, directory, step, info))
    # The spacing follows the median of the last few copies: one copy stretched by the
    # scheduler (a busy machine) must not stop snapshots for many steps.
    # The first copy pays a page fault per 4 KiB of new memory; the ones after it copy into
    # that memory, so the first does not count unless it is all there is. Nor does it space
    # the next: spaced by it, a restarted attempt's second snapshot came 5-40 steps late
    # (the steps a crash then redoes); the next call times a copy into its memory instead.
    first = not pooled and not st.snapshot_steady and not st.snapshot_blocked
    if pooled and not st.snapshot_steady:
        st.snapshot_steady, st.snapshot_blocked = True, []
    if pooled or not st.snapshot_steady:
        st.snapshot_blocked = (st.snapshot_blocked + [blocked])[-5:]
    recent = st.snapshot_blocked
    st.snapshot_next_at = now if first else now + sorted(recent)[len(recent) // 2] / st.snapshot_overhead
    return True


class _Worker:
    """The process's snapshot writer: one thread, one job at a time (``idle`` clear while
    one is queued or being written)."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.jobs: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self.idle = threading.Event()
        self.idle.set()
        self.thread = threading.Thread(target=self._run, name="ftrain-snapshot", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            job = self.jobs.get()
            try:
                _write(*job)
            finally:
                del job
                self.idle.set()


_worker: _Worker | None = None


def _worker_for(st: ProcessState) -> _Worker:
    """The writer, started on first use (and again in a forked child, which has no threads)."""
    global _worker
    if _worker is None or _worker.pid != os.getpid():
        _worker = _Worker()
        st.snapshot_thread = _worker.thread
    return _worker


def _write(st: ProcessState, copy: Any, directory: str, step: int, info: dict[str, Any]) -> None:
    """The background half: ``write_checkpoint`` into host memory (no fsync), then drop the
    older snapshot. A failure (a full /dev/shm) must not stop training: said once, then off."""
    try:
        write_checkpoint(copy, directory, step, info, durable=False)
    except BaseException as exc:  # noqa: BLE001 - see the docstring
        st.snapshot_failed = True
        import sys

        print(f"ftrain: snapshots are off for this attempt: step {step} could not be written to "
              f"{directory}: {one_line(exc)}", file=sys.stderr, flush=True)
        return
    _drop_older(directory, step)


def _drop_older(directory: str, step: int) -> None:
    """Remove the complete snapshots before ``step``: the folder holds the newest only."""
    try:
        names = os.listdir(directory)
    except OSError:
        return
    for name in names:
        other = ckptfmt.parse_step(name)
        if other is not None and other < step and not name.startswith(ckptfmt.TEMP_PREFIX):
            try:
                os.unlink(os.path.join(directory, name))
            except OSError:
                pass


def wait(st: ProcessState) -> None:
    """Let the snapshot in flight finish (at exit: a clean end keeps the newest one whole)."""
    if _worker is not None and _worker.pid == os.getpid() and _worker.thread.is_alive():
        _worker.idle.wait()
