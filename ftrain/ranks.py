"""torchrun's ranks on this machine, watched while they run: heartbeats, pids, stack dumps,
stragglers.

Every rank keeps a heartbeat file ``$FTRAIN_RUN_DIR/heartbeat/rank-N`` whose content is its
pid; a rank whose heartbeat is older than the hang timeout is a hang (``RankWatch.check``).
Before a hung group is stopped ftrain asks every rank (never torchrun, whom SIGUSR1 would
kill) for a stack dump, and ``explain`` names the rank stuck outside torch while the others
wait in a collective.

``Ranks`` is the ``Topology`` of one machine under torchrun (``ftrain.topology``): torchrun
around the script, the ranks' liveness, their stacks, and their reports after the attempt
(``ftrain.torchrun``). The supervisor never imports torch, and neither does this module.
"""

from __future__ import annotations

import math
import os
import re
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import psutil

from ftrain.detect import Anomaly, Stragglers, StragglerSpec
from ftrain.detect.spec import STEP_TIMES
from ftrain.kinds import Failure, FailureKind
from ftrain.outcome import RankReport
from ftrain.policy import Decision
from ftrain.state import RunState
from ftrain.topology import Verdict
from ftrain.torchrun import DistSpec, rank_folders, rank_reports, torchrun_command
from ftrain.warm import RANK_ENTRY

__all__ = ["Heartbeat", "RankWatch", "Ranks", "in_torch", "innermost_frame", "read_heartbeats"]

CHECK_EVERY = 0.5           # seconds between two looks at the heartbeat files
DUMP_WAIT = 1.0             # seconds to let the ranks write their stack dumps
DUMP_BYTES = 256 * 1024     # read at most this much of a rank's stack dump


# --------------------------------------------------------------------------- heartbeats and stacks
HEARTBEAT_BYTES = 4096      # read at most this much of a heartbeat file (64 step times fit)


@dataclass(frozen=True)
class Heartbeat:
    """One rank's heartbeat file: its pid (None if not written yet), its last refresh, and
    what the shim wrote after the pid: the last step and its latest per-step times (s)."""

    rank: int
    pid: int | None
    mtime: float
    step: int | None = None
    times: tuple[float, ...] = ()


def _parse_beat(rank: int, mtime: float, text: str) -> Heartbeat:
    """A heartbeat's content (``ftrain.shim.metrics.heartbeat``); what does not parse is left out."""
    first, _, rest = text.partition("\n")
    first = first.strip()
    pid = int(first) if first.isdigit() and len(first) < 12 else None
    fields = rest.split()
    step: int | None = None
    times: list[float] = []
    if fields and fields[0].lstrip("-").isdigit() and len(fields[0]) < 20:
        step = int(fields[0]) if int(fields[0]) >= 0 else None
        for f in fields[1:STEP_TIMES + 1]:
            try:
                t = float(f)
            except ValueError:
                times = []
                break
            if not (math.isfinite(t) and t >= 0):
                times = []
                break
            times.append(t)
    return Heartbeat(rank, pid, mtime, step, tuple(times))


def read_heartbeats(folder: Path) -> dict[int, Heartbeat]:
    """``rank → Heartbeat`` from ``heartbeat/rank-N`` files; missing or odd files are skipped."""
    found: dict[int, Heartbeat] = {}
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return found
    for entry in entries:
        name = entry.name
        if not name.startswith("rank-") or not name[5:].isdigit():
            continue
        try:
            if not entry.is_file(follow_symlinks=False):
                continue
            mtime = entry.stat().st_mtime
            with open(entry.path, "rb") as f:
                text = f.read(HEARTBEAT_BYTES).decode("ascii", "replace")
        except OSError:
            continue
        found[int(name[5:])] = _parse_beat(int(name[5:]), mtime, text)
    return found


_THREAD = re.compile(r"^(Current thread|Thread) 0x[0-9a-f]+ ")
_FRAME = re.compile(r'^\s+File "(.*)", line (\d+) in (\S+)')


def innermost_frame(dump: str) -> str | None:
    """The innermost frame of the signalled thread in a faulthandler dump (``File …, line N
    in f``), or of the first thread when none is marked current."""
    blocks: list[tuple[bool, list[str]]] = []
    for line in dump.splitlines():
        m = _THREAD.match(line)
        if m:
            blocks.append((m.group(1) == "Current thread", []))
        elif blocks and _FRAME.match(line):
            blocks[-1][1].append(line.strip())
    blocks = [b for b in blocks if b[1]]
    if not blocks:
        return None
    chosen = next((b for b in blocks if b[0]), blocks[0])
    return chosen[1][0]


def in_torch(frame: str) -> bool:
    """A frame inside torch itself: the rank waits in a collective, a backward or a barrier."""
    m = _FRAME.match("  " + frame)
    path = m.group(1) if m else frame
    return "/torch/" in path.replace(os.sep, "/")


class RankWatch:
    """This machine's ranks during one attempt: which pid is which rank, whose heartbeat is
    stale, and their stack dumps. ``start`` begins an attempt; the rest reads its state.

    Per attempt: ``start(attempt_dir, torchrun's pid)`` → ``check`` on every poll →
    (a hang) ``dump_stacks`` → ``explain`` → ``rank_of`` for the reports.
    """

    def __init__(self, heartbeat_dir: Path, *, multi_node: bool = False,
                 straggler: StragglerSpec | None = None) -> None:
        self.heartbeat_dir = Path(heartbeat_dir)
        self.multi_node = multi_node
        self.stragglers = Stragglers(straggler) if straggler is not None else None
        self.attempt_dir: Path | None = None
        self.leader_pid: int | None = None
        self._started = 0.0                                  # wall clock at the attempt's start
        self._next_check = 0.0
        self._pids: dict[int, tuple[int, int]] = {}          # rank → (pid, local_rank)
        self._servers: set[int] = set()                      # warm ranks servers serving the attempt
        self._server_names: set[str] = set()
        self._dump_offsets: dict[int, tuple[Path, int]] = {}  # rank → (stderr.log, size before the dump)

    @property
    def ranks_dir(self) -> Path | None:
        return self.attempt_dir / "ranks" if self.attempt_dir is not None else None

    def start(self, attempt_dir: Path, leader_pid: int) -> None:
        """Forget the last attempt's ranks. Their heartbeat files stay until each new rank
        rewrites its own; until then they are older than the attempt and not looked at."""
        self.attempt_dir, self.leader_pid = Path(attempt_dir), leader_pid
        self._started = time.time()
        self._pids.clear()
        self._servers.clear()
        self._server_names.clear()
        self._dump_offsets.clear()
        self._next_check = 0.0
        if self.stragglers is not None:
            self.stragglers.start_attempt()

    def due(self) -> bool:
        """Whether a look at the files is due (at most one per CHECK_EVERY seconds)."""
        mono = time.monotonic()
        if mono < self._next_check:
            return False
        self._next_check = mono + CHECK_EVERY
        return True

    def _beats(self) -> dict[int, Heartbeat]:
        """This attempt's heartbeats (a file older than the attempt is a previous rank's)."""
        return {r: hb for r, hb in read_heartbeats(self.heartbeat_dir).items() if hb.mtime >= self._started - 1.0}

    def check(self, hang_timeout: float, step: int | None, now: float | None = None) -> Anomaly | None:
        """A hang when one rank's heartbeat is older than ``hang_timeout`` (the detectors'
        current limit); a rank that has exited is not hung. Else a straggler among the live
        ranks (``detect.Stragglers``), when the policy watches for one."""
        now = time.time() if now is None else now
        self.learn_pids()
        live = set(self.rank_pids().values())
        beats = {r: hb for r, hb in self._beats().items() if hb.pid is None or hb.pid in live}
        hang = self._hang(beats, hang_timeout, step, now) if math.isfinite(hang_timeout) else None
        if hang is not None or self.stragglers is None:
            return hang
        return self.stragglers.check({r: hb.times for r, hb in beats.items() if hb.pid is not None}, step)

    def _hang(self, beats: dict[int, Heartbeat], hang_timeout: float, step: int | None,
              now: float) -> Anomaly | None:
        stale = sorted((now - hb.mtime, hb.rank) for hb in beats.values() if now - hb.mtime > hang_timeout)
        if not stale:
            return None
        age = stale[-1][0]
        fresh = [r for r, hb in sorted(beats.items()) if now - hb.mtime <= hang_timeout]
        if fresh:
            names = ", ".join(str(r) for _, r in reversed(stale))
            reason = (f"rank {names}: no heartbeat for {age:.1f} s (hang timeout {hang_timeout:.1f} s) while "
                      f"rank {', '.join(map(str, fresh))} still beat")
        else:
            reason = (f"no rank has beaten for {stale[0][0]:.1f} s (ranks {', '.join(str(r) for _, r in stale)}; "
                      f"hang timeout {hang_timeout:.1f} s)")
        evidence = tuple(f"rank {r}: heartbeat {a:.1f} s old" for a, r in reversed(stale))
        return Anomaly(FailureKind.HANG, step, None, age, reason, evidence)

    def learn_pids(self) -> None:
        """Which pid is which rank: torchrun's children carry RANK/LOCAL_RANK in their
        environment. A warm rank's entry (``ftrain/rankentry.py``) names the server that
        forked the rank itself (``ftrain.warm.WarmRanks``): its processes count as the
        attempt's tree too (``rank_pids``)."""
        if self.leader_pid is None:
            return
        try:
            kids = psutil.Process(self.leader_pid).children()
        except psutil.Error:
            return
        known = {pid for pid, _ in self._pids.values()}
        for p in kids:
            if p.pid in known:
                continue
            try:
                env = p.environ()
            except psutil.Error:
                continue
            rank, local = env.get("RANK", ""), env.get("LOCAL_RANK", "")
            if rank.isdigit() and local.isdigit():
                self._pids[int(rank)] = (p.pid, int(local))
                self._learn_server(p)

    def _learn_server(self, entry: psutil.Process) -> None:
        """The warm ranks server a rank entry hands its rank to: this process's own child
        that serves the socket named on the entry's command line."""
        try:
            argv = entry.cmdline()
        except psutil.Error:
            return
        if len(argv) < 3 or argv[1] != RANK_ENTRY or argv[2] in self._server_names:
            return
        self._server_names.add(argv[2])
        for p in psutil.Process().children():
            try:
                if p.cmdline()[2:4] == ["--ranks", argv[2]]:
                    self._servers.add(p.pid)
            except psutil.Error:
                pass

    def rank_of(self) -> dict[int, int]:
        """``local_rank → rank`` of the ranks seen in this attempt."""
        return {local: rank for rank, (_, local) in self._pids.items()}

    def rank_pids(self) -> dict[int, int]:
        """``rank → pid`` of this node's live ranks (torchrun's children and heartbeat files,
        checked against the attempt's process tree so that a recycled pid is never signalled).
        A heartbeat's pid wins: it is the process that runs the script (a warm rank, forked by
        its server, not torchrun's child; the python under a wrapper)."""
        self.learn_pids()
        pids = {rank: pid for rank, (pid, _) in self._pids.items()}
        tree: set[int] = set()
        for root in ([self.leader_pid] if self.leader_pid is not None else []) + sorted(self._servers):
            try:
                tree |= {p.pid for p in psutil.Process(root).children(recursive=True)}
            except psutil.Error:
                pass
        for rank, hb in self._beats().items():
            if hb.pid is not None and hb.pid in tree:
                pids[rank] = hb.pid
        return {rank: pid for rank, pid in pids.items() if pid in tree}

    def dump_stacks(self) -> list[int]:
        """SIGUSR1 to every rank (the shim's faulthandler prints all threads' stacks into
        the rank's stderr.log), never to torchrun; wait briefly for the dumps. Returns the
        ranks signalled."""
        folders = rank_folders(self.ranks_dir) if self.ranks_dir is not None else {}
        sent: list[int] = []
        for rank, pid in sorted(self.rank_pids().items()):
            local = self._pids.get(rank, (pid, rank if not self.multi_node else -1))[1]
            folder = folders.get(local)
            if folder is not None:
                log = folder / "stderr.log"
                try:
                    size = log.stat().st_size
                except OSError:
                    size = 0
                self._dump_offsets[rank] = (log, size)
            try:
                os.kill(pid, signal.SIGUSR1)
                sent.append(rank)
            except OSError:
                pass
        deadline = time.monotonic() + DUMP_WAIT
        while time.monotonic() < deadline and not all(self._dumped(r) for r in sent):
            time.sleep(0.05)
        return sent

    def _dumped(self, rank: int) -> bool:
        log, size = self._dump_offsets.get(rank, (None, 0))
        if log is None:
            return True
        try:
            return log.stat().st_size > size and "most recent call first" in self._dump_text(rank)
        except OSError:
            return True

    def _dump_text(self, rank: int) -> str:
        log, size = self._dump_offsets[rank]
        try:
            with open(log, "rb") as f:
                f.seek(size)
                return f.read(DUMP_BYTES).decode("utf-8", "replace")
        except OSError:
            return ""

    def explain(self, anomaly: Anomaly) -> Anomaly:
        """A hang's evidence with each rank's innermost frame; names the rank stuck outside
        torch while the others wait inside it (in a collective)."""
        if anomaly.kind is not FailureKind.HANG or not self._dump_offsets:
            return anomaly
        frames = {rank: innermost_frame(self._dump_text(rank)) for rank in sorted(self._dump_offsets)}
        lines = [f"rank {rank} stack: {frame or 'no dump'}" for rank, frame in frames.items()]
        outside = [r for r, f in frames.items() if f is not None and not in_torch(f)]
        inside = [r for r, f in frames.items() if f is not None and in_torch(f)]
        reason = anomaly.reason
        if outside and inside:
            verdict = (f"rank {', '.join(map(str, outside))} stuck outside torch ({frames[outside[0]]}); "
                       f"rank {', '.join(map(str, inside))} waiting inside torch (a collective)")
            reason = f"{reason}; {verdict}"
        logs = [f"stacks: {self._dump_offsets[r][0]}" for r in outside[:1] or list(self._dump_offsets)[:1]]
        return replace(anomaly, reason=reason, evidence=(*anomaly.evidence, *lines, *logs))


# --------------------------------------------------------------------------- the topology
class Ranks:
    """torchrun on this machine (``ftrain.topology.Topology``): wraps the script in torchrun
    with the attempt's ``ranks/`` log folder, watches the ranks' heartbeats, dumps and
    explains their stacks on a hang, and reports how the failed ranks ended. One machine
    has nothing to agree on: ``agree`` returns the node's own failure, to be decided here."""

    distributed = True

    def __init__(self, spec: DistSpec, run_dir: Path, job_dir: Path | None = None, *,
                 straggler: StragglerSpec | None = None) -> None:
        self.spec = spec
        self.run_dir = Path(run_dir)
        self._job_dir = Path(job_dir) if job_dir is not None else self.run_dir
        self.watch = RankWatch(self.run_dir / "heartbeat", multi_node=spec.multi_node, straggler=straggler)
        # several nodes: whether this node's torchrun serves the rendezvous, and where (set by
        # ``ftrain.coord.Nodes`` when the deciding role moves); None: the spec's own
        self.serves_rendezvous: bool | None = None
        self.rdzv_endpoint: str | None = None

    @property
    def job_dir(self) -> Path:
        return self._job_dir

    @property
    def node(self) -> int | None:
        return None

    def to_json(self) -> dict[str, Any] | None:
        return self.spec.to_json()

    def open(self) -> None:
        pass

    def close(self) -> None:
        pass

    def before_attempt(self, state: RunState) -> RunState:
        return state

    def rdzv_id(self, n: int) -> str:
        """The rendezvous id of attempt ``n``: attempts never meet each other's ranks."""
        base = self.spec.rdzv_id or re.sub(r"[^A-Za-z0-9_.-]", "-", self.job_dir.resolve().name)
        return f"ftrain-{base}-{n}"

    def wrap(self, command: Sequence[str], n: int, attempt_dir: Path) -> tuple[str, ...]:
        # absolute: torchrun runs in the script's folder, which need not be ours
        return torchrun_command(self.spec, command, Path(attempt_dir).resolve() / "ranks", rdzv_id=self.rdzv_id(n),
                                serve=self.serves_rendezvous, rdzv_endpoint=self.rdzv_endpoint)

    def started(self, n: int, attempt_dir: Path, pid: int) -> None:
        self.watch.start(attempt_dir, pid)

    def check(self, hang_timeout: float, step: int | None) -> Anomaly | None:
        if not self.watch.due():
            return None
        return self.watch.check(hang_timeout, step)

    def dump_stacks(self) -> bool:
        self.watch.dump_stacks()
        return True   # done here, rank by rank: SIGUSR1 would kill torchrun itself

    def explain(self, anomaly: Anomaly) -> Anomaly:
        return self.watch.explain(anomaly)

    def rank_reports(self, console: Sequence[str]) -> tuple[RankReport, ...]:
        ranks_dir = self.watch.ranks_dir
        if ranks_dir is None:
            return ()
        return rank_reports(ranks_dir, console, rank_of=self.watch.rank_of())

    def agree(self, n: int, failure: Failure | None, *, secondary: bool, t_fail: float | None,
              interrupted: Callable[[], bool]) -> Verdict:
        return Verdict(failure)

    def announce(self, n: int, failure: Failure, decision: Decision) -> None:
        pass
