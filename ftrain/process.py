"""The process layer: start an attempt, pump its output, signal it, stop it, reap it.

It knows nothing of policies. A ``Child`` runs in a session of its own; its stdout and
stderr go to the attempt's ``output.log``, to an optional live sink, and into a bounded
in-memory tail for the classifier (a child that prints gigabytes does not grow us).
Stopping is TERM → grace → KILL to the whole group *and* to every descendant seen,
including those that started a session of their own (torchrun's ranks); nothing of an
attempt outlives it. A daemon that left the tree too (double fork, ``setsid``) is found by
what every process of an attempt carries: ``FTRAIN_RUN_DIR`` and ``FTRAIN_ATTEMPT`` in
``/proc/PID/environ`` (``marked``: one look at this user's processes, about 1 ms for 100).
A warm spare carries the run folder and ``FTRAIN_SPARE`` instead, so it is this run's but
no stray of the attempt it waits beside. ``resume`` signals a process a dead supervisor
left only once its environment proves it this run's (``why_not_ours``).

    spawn() ──► running ──(exit)──────────────────────────► ended (returncode, reaped)
                   └──stop(): [USR1 dump] → TERM → grace → KILL ──┘
"""

from __future__ import annotations

import ctypes
import itertools
import os
import selectors
import signal
import socket
import stat
import subprocess
import threading
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
RUN_DIR_VAR, ATTEMPT_VAR, SPARE_VAR = "FTRAIN_RUN_DIR", "FTRAIN_ATTEMPT", "FTRAIN_SPARE"
HELPER_VAR = "FTRAIN_HELPER"   # in the environment of ftrain's own commands (alerts): no attempt's
HELPER_SPAWN = threading.Lock()   # held while a helper is started (Popen returns after its exec)
_spares = itertools.count(1)


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
        kids = _children(todo.pop())
        if kids is None:
            return [p.pid for p in _psutil_children(pid)]
        kids = [k for k in kids if k not in skip]
        out.extend(kids)
        todo.extend(kids)
    return out


def _children(pid: int) -> list[int] | None:
    """The children of ``pid`` from ``/proc/<pid>/task/*/children`` ([] for a process that
    is gone; None where those files cannot be read)."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return []
    except OSError:
        return None
    kids: list[int] = []
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                kids.extend(int(x) for x in f.read().split())
        except FileNotFoundError:   # a thread that just ended
            continue
        except OSError:
            return None
    return kids


def _marked_helpers() -> set[int]:
    """The supervisor's own children whose environment says they are ftrain's helpers
    (``HELPER_VAR``: an alert command), so no attempt's sweep for orphans takes them."""
    if not _subreaper:
        return set()
    return {pid for pid in _children(os.getpid()) or () if HELPER_VAR in (read_environ(pid) or {})}


def _psutil_children(pid: int) -> list[psutil.Process]:
    import psutil
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def read_environ(pid: int) -> dict[str, str] | None:
    """The environment ``pid`` was started with (``/proc/PID/environ``); None when it is gone,
    a zombie, or not ours to read."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return _parse_environ(f.read())
    except OSError:
        return None


def _parse_environ(data: bytes) -> dict[str, str] | None:
    if not data:   # a zombie, or a kernel thread
        return None
    out: dict[str, str] = {}
    for item in data.split(b"\0"):
        key, sep, value = item.partition(b"=")
        if sep:
            out.setdefault(key.decode("utf-8", "replace"), value.decode("utf-8", "replace"))
    return out


def marked(run_dir: str, attempt: str | None = None, spare: str | None = None,
           skip: Collection[int] = ()) -> list[int]:
    """This user's processes whose environment carries ``FTRAIN_RUN_DIR=run_dir`` and, when
    given, ``FTRAIN_ATTEMPT=attempt`` or ``FTRAIN_SPARE=spare`` (any of the run otherwise).
    Finds what left the process tree and the group; ``skip`` and this process are left out."""
    needle = f"\0{RUN_DIR_VAR}={run_dir}\0".encode()
    uid, me = os.getuid(), os.getpid()
    found: list[int] = []
    try:
        names = os.listdir("/proc")
    except OSError:
        return found
    for name in names:
        if not name.isdigit() or int(name) == me or int(name) in skip:
            continue
        try:
            if os.stat(f"/proc/{name}").st_uid != uid:
                continue
            with open(f"/proc/{name}/environ", "rb") as f:
                data = f.read()
        except OSError:
            continue
        if needle not in b"\0" + data:   # cheap: most processes are not ours
            continue
        env = _parse_environ(data)
        if env is None or env.get(RUN_DIR_VAR) != run_dir:
            continue
        if attempt is None and spare is None or (attempt is not None and env.get(ATTEMPT_VAR) == attempt) \
                or (spare is not None and env.get(SPARE_VAR) == spare):
            found.append(int(name))
    return found


def spare_mark(env: Mapping[str, str]) -> dict[str, str]:
    """What a warm spare started beside the attempt of ``env`` carries: the run folder (found
    as this run's at a resume) and a token of its own, no ``FTRAIN_ATTEMPT`` (no stray of the
    attempt it waits beside)."""
    if RUN_DIR_VAR not in env:
        return {}
    return {RUN_DIR_VAR: env[RUN_DIR_VAR], SPARE_VAR: f"{os.getpid()}.{next(_spares)}"}


def proc_state(pid: int) -> str | None:
    """The state letter of ``/proc/PID/stat`` (R, S, D, T stopped, t traced, Z …); None if gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()[0]
    except (OSError, IndexError):
        return None


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
        self._partial = {False: b"", True: b""}   # the unfinished line of stdout, of stderr
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
        # How the attempt's processes are found outside the tree (``marked``).
        self._run_dir = env.get(RUN_DIR_VAR)
        self._attempt = env.get(ATTEMPT_VAR)
        self._spare = env.get(SPARE_VAR)
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
        self._bound: list[Child] = []   # other leaders whose processes are this attempt's (``bind``)

    def adopt(self, log_path: Path, sink: OutputSink | None = None,
              line_hook: Callable[[str], None] | None = None, env: Mapping[str, str] | None = None) -> None:
        """Make a spare started without a log the attempt that writes to ``log_path``; what it
        printed while it waited goes there first. ``env``: the attempt's, which what it starts
        from now on carries."""
        assert self._log is None, "adopt() is for a child started without a log"
        if env is not None:
            self._attempt = env.get(ATTEMPT_VAR)
        self._log = open(log_path, "ab", buffering=0)
        self._sink = sink
        self._line_hook = line_hook
        self.started = time.time()

    def bind(self, other: Child) -> None:
        """``other`` (a warm ranks server, ``ftrain.warm``) now runs part of this attempt: it
        is stopped and reaped, with all it started, when this child ``finish``es."""
        self._bound.append(other)

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
            self._feed_lines(data, bool(is_err))
        return True

    def _feed_lines(self, data: bytes, is_err: bool = False) -> None:
        """Hand every finished line to the hook as it arrives. A line ends at ``\\n`` or at
        ``\\r`` (DESIGN §6): a progress bar redrawn in place is read at every drawing, not
        once when it closes. Each stream keeps its own unfinished line, so a bar on stderr
        and a log line on stdout never splice into one. Empty lines are not handed over (a
        ``\\r\\n`` split between two reads makes one)."""
        assert self._line_hook is not None
        buf = self._partial[is_err] + data
        if b"\r" in buf:
            buf = buf.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        *lines, rest = buf.split(b"\n")
        self._partial[is_err] = rest if len(rest) <= TAIL_BYTES else b""
        hook = self._line_hook
        for line in lines:
            if line:
                hook(line.decode("utf-8", "replace"))

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
        with HELPER_SPAWN:   # no helper between fork and exec (its mark not yet in its environment)
            others = (_leaders - {self.pid}) | _marked_helpers()   # a waiting spare, an alert command
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
        """Send ``sig`` to the leader, or to its process group and every known descendant.
        A signal it must act on is followed by SIGCONT: a stopped process (SIGSTOP) acts on
        nothing but KILL until continued."""
        import psutil
        sigs = (sig,) if sig in (signal.SIGKILL, signal.SIGCONT, signal.SIGSTOP) else (sig, signal.SIGCONT)
        for s in sigs:
            if self.returncode is None:
                try:
                    if group:
                        os.killpg(self.pid, s)
                    else:
                        os.kill(self.pid, s)
                except ProcessLookupError:
                    pass
        if group:
            self._scan_descendants()
            for p in self._members():
                for s in sigs:
                    try:
                        p.send_signal(s)
                    except psutil.Error:
                        pass

    def stopped(self) -> list[str]:
        """The attempt's processes in state T or t (SIGSTOP, a debugger), as ``pid N (name)``:
        for a hang's evidence, that it was not running at all."""
        import psutil
        out = []
        bound = [pid for other in self._bound for pid in (other.pid, *descendants(other.pid))]
        for pid in [self.pid, *descendants(self.pid), *bound]:
            if proc_state(pid) in ("T", "t"):
                try:
                    name = psutil.Process(pid).name()
                except psutil.Error:
                    name = "?"
                out.append(f"pid {pid} ({name})")
        return out

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
        for other in self._bound:   # its ranks ended with their entries: a server left to reap
            other.stop(0.0, cooperative=False)
            other.finish()
        self._bound.clear()
        self._drain(deadline=time.monotonic() + 0.2)
        for key in list(self._sel.get_map().values()):
            self._sel.unregister(key.fd)
        self._sel.close()
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()
        for is_err, rest in self._partial.items():
            if rest and self._line_hook is not None:
                self._line_hook(rest.decode("utf-8", "replace"))
            self._partial[is_err] = b""
        if self._log is not None:
            self._log.close()
        return Exit(self.returncode, self.pid, strays)

    def _kill_strays(self) -> int:
        """SIGKILL every remaining process of the attempt, in the tree or carrying its mark
        (a daemon that left both), and reap what is ours."""
        import psutil
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        members = self._members()
        if self._run_dir is not None and (self._attempt is not None or self._spare is not None):
            seen = {p.pid for p in members} | _leaders | {self.pid}
            for pid in marked(self._run_dir, self._attempt, self._spare, skip=seen):
                try:
                    members.append(psutil.Process(pid))
                except psutil.Error:
                    pass
        for p in members:
            try:
                p.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(members, timeout=5.0)
        return len(members)


def why_not_ours(pid: int, run_dir: str, attempt: int | None, *, warm: bool = False) -> str | None:
    """None when ``pid`` provably is attempt ``attempt`` of the run in ``run_dir`` (its
    environment holds both; a warm attempt's leader holds the run and ``FTRAIN_SPARE``: it was
    started before it knew its attempt); otherwise why not, in words."""
    if proc_state(pid) in (None, "Z"):
        return "it is gone"
    env = read_environ(pid)
    if env is None:
        return "its environment cannot be read"
    if env.get(RUN_DIR_VAR) != run_dir:
        return f"its environment holds no {RUN_DIR_VAR}={run_dir}"
    if env.get(ATTEMPT_VAR) == str(attempt) or (warm and SPARE_VAR in env and ATTEMPT_VAR not in env):
        return None
    return f"its {ATTEMPT_VAR} is {env.get(ATTEMPT_VAR)!r}, not {attempt}"


def left_by_the_dead(start: Mapping[str, Any], run_dir: str) -> tuple[int | None, str | None]:
    """The journal's open ``attempt_start`` of a supervisor that died: (its pid, None) when
    that process provably is the attempt, here; else (None, why not)."""
    pid, host, here = start.get("pid"), start.get("host"), socket.gethostname()
    if not isinstance(pid, int):
        return None, "no pid was journaled"
    if host is not None and host != here:
        return None, f"it ran on host {host}, this is {here}"
    why = why_not_ours(pid, run_dir, start.get("attempt"), warm=bool(start.get("warm")))
    return (pid if why is None else None), why


def stop_leftovers(run_dir: str, leader: int | None, grace: float = 10.0) -> int:
    """Stop what a supervisor that died left of the run in ``run_dir``: ``leader`` (proven
    ours by the caller) with its tree and group, and every process carrying the run's
    ``FTRAIN_RUN_DIR`` (a daemon that left the tree, a spare). TERM (and CONT), ``grace``,
    KILL. Returns how many there were."""
    import psutil
    members: dict[int, psutil.Process] = {}
    group = None
    if leader is not None:
        try:
            proc = psutil.Process(leader)
            members.update((p.pid, p) for p in [proc, *proc.children(recursive=True)])
            group = leader if os.getpgid(leader) == leader else None   # a session we started
        except (psutil.Error, OSError):
            pass
    for pid in marked(run_dir, skip=members):
        try:
            members[pid] = psutil.Process(pid)
        except psutil.Error:
            pass
    if not members:
        return 0
    for p in members.values():
        for sig in (signal.SIGTERM, signal.SIGCONT):
            try:
                p.send_signal(sig)
            except psutil.Error:
                pass
    _, alive = psutil.wait_procs(list(members.values()), timeout=grace)
    for pid in marked(run_dir, skip=members):   # started during the grace
        try:
            alive.append(psutil.Process(pid))
        except psutil.Error:
            pass
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    if group is not None:
        try:
            os.killpg(group, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    psutil.wait_procs(alive, timeout=5.0)
    return len(members)


def leave_terminal() -> None:
    """After a hangup, point stdout and stderr that were a terminal at /dev/null: writes to a
    hung-up terminal fail (EIO), and the way out must not fail on saying where it is."""
    try:
        null = os.open(os.devnull, os.O_WRONLY)
    except OSError:
        return
    try:
        devnull = os.fstat(null).st_rdev
        for fd in (1, 2):
            try:
                st = os.fstat(fd)
            except OSError:
                continue
            if stat.S_ISCHR(st.st_mode) and st.st_rdev != devnull:   # a terminal, hung up or not
                os.dup2(null, fd)
    finally:
        os.close(null)
