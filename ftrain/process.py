"""The process layer: start an attempt, pump its output, signal it, stop it, reap it.

It knows nothing of policies. A ``Child`` runs in a session of its own; its stdout and
stderr go to the attempt's ``output.log``, to an optional live sink, and into a bounded
in-memory tail for the classifier (a child that prints gigabytes does not grow us).
Stopping is TERM → grace → KILL to the whole group *and* to every descendant seen,
including those that started a session of their own (torchrun's ranks); nothing of an
attempt outlives it.

    spawn() ──► running ──(exit)──────────────────────────► ended (returncode, reaped)
                   └──stop(): [USR1 dump] → TERM → grace → KILL ──┘
"""

from __future__ import annotations

import ctypes
import os
import selectors
import signal
import subprocess
import time
from collections import deque
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # psutil is imported where it is used: it costs start-up time before the first child
    import psutil

from ftrain.kinds import signal_name

TAIL_BYTES = 256 * 1024
ANSWER_WAIT = 1.0   # seconds a possibly stuck child has to show it acts on a TERM (see ``stop``)
_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36

try:
    _libc = ctypes.CDLL(None, use_errno=True)
    _prctl: Any = _libc.prctl
except (OSError, AttributeError):  # not Linux
    _prctl = None

_subreaper = False  # set by become_subreaper(); then orphans of an attempt are our children
_leaders: set[int] = set()  # every live Child: a subreaper's scan for orphans leaves the others alone
OutputSink = Callable[[bytes, bool], None]  # (data, is_stderr)


def become_subreaper() -> bool:
    """Adopt orphaned descendants (Linux), so a grandchild whose parent died is still ours
    to find and stop. Returns whether it took effect."""
    global _subreaper
    if _prctl is None:
        return False
    _subreaper = _prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    return _subreaper


def descendants(pid: int, skip: Collection[int] = ()) -> list[int]:
    """All descendants of ``pid``, read from ``/proc/<pid>/task/*/children`` (cheap: no scan
    of every process), leaving out the subtrees of ``skip``; falls back to psutil where that
    file does not exist."""
    out: list[int] = []
    todo = [pid]
    while todo:
        parent = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{parent}/task")
        except FileNotFoundError:
            continue
        except OSError:
            return [p.pid for p in _psutil_children(pid)]
        for tid in tasks:
            try:
                with open(f"/proc/{parent}/task/{tid}/children") as f:
                    kids = [int(x) for x in f.read().split()]
            except FileNotFoundError:
                continue
            except OSError:
                return [p.pid for p in _psutil_children(pid)]
            kids = [k for k in kids if k not in skip]
            out.extend(kids)
            todo.extend(kids)
    return out


def _psutil_children(pid: int) -> list[psutil.Process]:
    import psutil
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def _child_setup(parent: int) -> Callable[[], None] | None:
    """Runs in the child between fork and exec: die (politely) with the supervisor."""
    if _prctl is None:
        return None
    prctl = _prctl

    def setup() -> None:
        # A USR1 meant for ftrain (Slurm's --signal=USR1@N reaches every process of the step)
        # must not kill torchrun or a script: ignored survives exec; the shim's stack-dump
        # handler replaces it, and ftrain relays the notice as a TERM.
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:  # the supervisor died before prctl took effect
            os._exit(143)

    return setup


@dataclass(frozen=True)
class Exit:
    """How an attempt's process ended: ``returncode`` as subprocess reports it."""

    returncode: int
    pid: int
    strays_killed: int

    @property
    def signal_name(self) -> str | None:
        return signal_name(self.returncode)


class Child:
    """One running attempt. Call ``pump()`` from the supervisor's loop until it returns False."""

    def __init__(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str],
        cwd: Path | None,
        log_path: Path | None,
        sink: OutputSink | None = None,
        line_hook: Callable[[str], None] | None = None,
        pass_fds: Sequence[int] = (),
    ) -> None:
        # No log_path: a spare (ftrain.warm) whose output waits in its pipes until ``adopt``.
        self._log = open(log_path, "ab", buffering=0) if log_path is not None else None
        self._sink = sink
        self._line_hook = line_hook
        self._partial = b""
        self._tail: deque[bytes] = deque()
        self._tail_size = 0
        self.started = time.time()
        try:
            self.proc = subprocess.Popen(
                list(argv), env=dict(env), cwd=cwd, stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, pass_fds=tuple(pass_fds),
                start_new_session=True, preexec_fn=_child_setup(os.getpid()),
            )
        except OSError:
            if self._log is not None:
                self._log.close()
            raise
        self.pid = self.proc.pid
        _leaders.add(self.pid)
        self._known: dict[int, float] = {}
        self._last_scan = time.monotonic()
        self._sel = selectors.DefaultSelector()
        for stream, is_err in ((self.proc.stdout, False), (self.proc.stderr, True)):
            assert stream is not None
            os.set_blocking(stream.fileno(), False)
            self._sel.register(stream.fileno(), selectors.EVENT_READ, is_err)
        self._open_fds = 2
        self.woken = False  # a wake-up fd (see ``wake_on``) fired during the last pump
        self.returncode: int | None = None

    def adopt(self, log_path: Path, sink: OutputSink | None = None,
              line_hook: Callable[[str], None] | None = None) -> None:
        """Make a spare started without a log the attempt that writes to ``log_path``; what it
        printed while it waited goes there first."""
        assert self._log is None, "adopt() is for a child started without a log"
        self._log = open(log_path, "ab", buffering=0)
        self._sink = sink
        self._line_hook = line_hook
        self.started = time.time()

    def wake_on(self, fd: int, drain: Callable[[], None]) -> None:
        """Also return from ``pump`` as soon as ``fd`` is readable (a file-change notifier);
        ``drain`` empties it. The caller owns ``fd``."""
        self._sel.register(fd, selectors.EVENT_READ, drain)

    # ------------------------------------------------------------------ output
    def pump(self, timeout: float) -> bool:
        """Move output for up to ``timeout`` seconds; False once the child has exited and its
        pipes are drained (or held open only by strays, which ``finish`` will stop)."""
        self.woken = False
        if self._open_fds:
            for key, _ in self._sel.select(timeout):
                self._read(key.fd, key.data)
        else:
            time.sleep(timeout)
        now = time.monotonic()
        if now - self._last_scan > (2.0 if _subreaper else 0.5):  # orphans come to a subreaper anyway
            self._scan_descendants()
            self._last_scan = now
        if self.returncode is None:
            self.returncode = self.proc.poll()
            if self.returncode is None and not self._open_fds:
                try:
                    self.returncode = self.proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    pass
        if self.returncode is not None and self._open_fds:
            self._drain(deadline=time.monotonic() + 0.05)
        return self.returncode is None

    def _read(self, fd: int, is_err: Any) -> bool:
        if callable(is_err):  # a wake-up fd, not one of the child's pipes
            is_err()
            self.woken = True
            return True
        try:
            data = os.read(fd, 1 << 16)
        except BlockingIOError:
            return True
        except OSError:
            data = b""
        if not data:
            self._sel.unregister(fd)
            self._open_fds -= 1
            return False
        if self._log is not None:
            self._log.write(data)
        if self._sink is not None:
            self._sink(data, is_err)
        self._tail.append(data)
        self._tail_size += len(data)
        while self._tail_size > TAIL_BYTES and len(self._tail) > 1:
            self._tail_size -= len(self._tail.popleft())
        if self._line_hook is not None:
            self._feed_lines(data)
        return True

    def _feed_lines(self, data: bytes) -> None:
        assert self._line_hook is not None
        buf = self._partial + data
        *lines, self._partial = buf.split(b"\n")
        if len(self._partial) > TAIL_BYTES:
            self._partial = b""
        for line in lines:
            self._line_hook(line.decode("utf-8", "replace").rstrip("\r"))

    def _drain(self, deadline: float) -> None:
        while self._open_fds and time.monotonic() < deadline:
            events = self._sel.select(max(0.0, deadline - time.monotonic()))
            if not events:
                break
            for key, _ in events:
                self._read(key.fd, key.data)

    def tail_lines(self, limit: int = 400) -> list[str]:
        """The last lines of combined output, decoded, for the classifier."""
        text = b"".join(self._tail).decode("utf-8", "replace")
        lines = [line.rstrip("\r") for line in text.splitlines()]
        return lines[-limit:]

    # ------------------------------------------------------------------ signals
    def _scan_descendants(self) -> None:
        """Remember every descendant (pid, create time), so one that leaves the group or
        the tree (``setsid``, reparenting) can still be found and stopped."""
        import psutil
        for pid in descendants(self.pid):
            if pid not in self._known:
                try:
                    self._known[pid] = psutil.Process(pid).create_time()
                except psutil.Error:
                    pass

    def _members(self) -> list[psutil.Process]:
        """Every live process of this attempt we can name."""
        import psutil
        found: dict[int, psutil.Process] = {}
        for pid, created in self._known.items():
            try:
                p = psutil.Process(pid)
                if abs(p.create_time() - created) < 0.01 and p.status() != psutil.STATUS_ZOMBIE:
                    found[pid] = p
            except psutil.Error:
                pass
        roots = [self.pid] + ([os.getpid()] if _subreaper else [])  # a subreaper adopts the orphans
        others = _leaders - {self.pid}   # a spare waiting for the next attempt is not one of ours
        for root in roots:
            for pid in descendants(root, skip=others):
                if pid != self.pid and pid not in found:
                    try:
                        p = psutil.Process(pid)
                        if p.status() != psutil.STATUS_ZOMBIE:
                            found[pid] = p
                    except psutil.Error:
                        pass
        return list(found.values())

    def signal(self, sig: int, *, group: bool = True) -> None:
        """Send ``sig`` to the leader, or to its process group and every known descendant."""
        import psutil
        if self.returncode is None:
            try:
                if group:
                    os.killpg(self.pid, sig)
                else:
                    os.kill(self.pid, sig)
            except ProcessLookupError:
                pass
        if group:
            self._scan_descendants()
            for p in self._members():
                try:
                    p.send_signal(sig)
                except psutil.Error:
                    pass

    def stop(self, grace: float, *, dump_stacks: bool = False, cooperative: bool = True,
             answered: Callable[[], bool] | None = None) -> None:
        """Ask the child to stop, then make sure it does: [USR1 →] TERM → grace → KILL.

        ``cooperative``: TERM goes to the leader only first, so the shim's ``should_stop()``
        turns true and the script can save and leave; its workers are not shot mid-batch.
        ``answered``: for a child that may be stuck: unless it says within ``ANSWER_WAIT``
        that it is acting on the TERM, it gets no more of the grace.
        """
        if self.returncode is None and dump_stacks:
            self.signal(signal.SIGUSR1, group=False)
            self._wait(0.5)
        if self.returncode is None:
            self.signal(signal.SIGTERM, group=not cooperative)
        if answered is not None and grace > ANSWER_WAIT:
            self._wait(ANSWER_WAIT)
            grace = grace - ANSWER_WAIT if answered() else 0.0
        self._wait(grace)
        if self.returncode is None:
            self.signal(signal.SIGKILL)
            self._wait(5.0)

    def _wait(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while self.returncode is None and time.monotonic() < deadline:
            self.pump(min(0.02, max(0.0, deadline - time.monotonic())))

    def finish(self) -> Exit:
        """Reap the leader, kill whatever of the attempt is left, close everything."""
        if self.returncode is None:
            self.returncode = self.proc.wait()
        self._drain(deadline=time.monotonic() + 0.05)
        _leaders.discard(self.pid)
        strays = self._kill_strays()
        self._drain(deadline=time.monotonic() + 0.2)
        for key in list(self._sel.get_map().values()):
            self._sel.unregister(key.fd)
        self._sel.close()
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()
        if self._partial and self._line_hook is not None:
            self._line_hook(self._partial.decode("utf-8", "replace"))
            self._partial = b""
        if self._log is not None:
            self._log.close()
        return Exit(self.returncode, self.pid, strays)

    def _kill_strays(self) -> int:
        """SIGKILL every remaining process of the attempt and reap what is ours."""
        import psutil
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        members = self._members()
        for p in members:
            try:
                p.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(members, timeout=5.0)
        return len(members)


def stop_leftover(pid: int, started_by: float, grace: float = 10.0) -> bool:
    """Stop a process tree left running by a supervisor that died (found by pid in the
    journal), unless the pid now belongs to a process born after ``started_by``.
    TERM to the tree, ``grace``, KILL. True if there was one to stop."""
    import psutil
    try:
        proc = psutil.Process(pid)
        if proc.create_time() > started_by + 2.0:
            return False
        members = [proc] + proc.children(recursive=True)
    except psutil.Error:
        return False
    for p in members:
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(members, timeout=grace)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=5.0)
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    return True
