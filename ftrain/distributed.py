"""Past one process: ranks under torchrun on one machine, and several machines in one job.

On one machine the attempt's child is torchrun (``python -m torch.distributed.run``) with its
own restarts off; ftrain owns the restarts. Each attempt gives torchrun a log folder of its
own, ``attempts/NNNN/ranks/``, where torchrun keeps every rank's ``stdout.log``,
``stderr.log`` and ``error.json`` (``TORCHELASTIC_ERROR_FILE``, written by torch's
``@record`` or by the shim's excepthook). When the attempt ends, ``RankAnalysis`` finds the
root cause among the ranks: the first rank that failed *on its own*, not the ranks that
torchrun stopped (SIGTERM) afterwards and not the ranks whose collective broke because a
peer died (a gloo/NCCL error or timeout that follows a peer's OOM is that OOM).

Every rank keeps a heartbeat file ``$FTRAIN_RUN_DIR/heartbeat/rank-N`` whose content is its
pid; a rank whose heartbeat is older than the hang timeout is a hang. Before stopping a
hung group ftrain asks every rank (never torchrun, whom SIGUSR1 would kill) for a stack
dump and names the rank that is stuck outside torch while the others wait in a collective.

Several machines: one ftrain per machine, all pointed at one run folder on a shared file
system. They agree on one decision per failure through files in ``coord/`` (see
``Coordinator``): every node publishes what its attempt showed; node 0 picks the root
cause among the nodes, decides by the policy, and publishes the decision; the others wait
for it and apply it verbatim, so every node starts the next attempt with the same
overrides, checkpoint, skip windows and attempt number.

The supervisor never imports torch, and neither does this module.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Sequence

import psutil

from ftrain.errors import UsageError
from ftrain.kinds import Failure, FailureKind
from ftrain.policy import Action, Decision
from ftrain.detect import Anomaly

if TYPE_CHECKING:
    from ftrain.state import RunState

__all__ = [
    "Coordinator",
    "DistSpec",
    "Distributed",
    "Heartbeat",
    "RankExit",
    "ReportedFailure",
    "adopt_snapshot",
    "analyze_ranks",
    "in_torch",
    "innermost_frame",
    "job_dir_of",
    "make_distributed",
    "node_dir",
    "parse_torchrun_report",
    "read_heartbeats",
    "root_cause",
    "state_snapshot",
    "torchrun_command",
]

MONITOR_INTERVAL = 0.1      # seconds between torchrun's looks at its ranks
CHECK_EVERY = 0.5           # seconds between two looks at the heartbeat files
DUMP_WAIT = 1.0             # seconds to let the ranks write their stack dumps
TAIL_LINES = 200            # lines of a rank's logs given to the classifier

# Text of a collective that broke because a peer went away or stalled: a consequence, not a
# cause, as long as some rank failed on its own (FAILURES.md, gloo transport/tcp, NCCL).
PEER_LOSS = re.compile(
    r"Connection (?:closed|reset) by peer|Timed out waiting \d+ms for (?:recv|send) operation"
    r"|Watchdog caught collective operation timeout|ncclRemoteError|Broken pipe"
    r"|remote worker (?:crashing|hanging)|DistNetworkError|Socket Timeout|recvValue failed"
    r"|ProcessGroupGloo.*(?:timed out|Timeout)|Heartbeat monitor timed out"
)
_SECONDARY_KINDS = frozenset({FailureKind.NCCL_ERROR, FailureKind.EXCEPTION, FailureKind.EXIT_NONZERO,
                              FailureKind.PREEMPTED, FailureKind.KILLED})


# --------------------------------------------------------------------------- the job's shape
@dataclass(frozen=True)
class DistSpec:
    """How many ranks, on how many machines, and how they meet.

    ``rdzv_endpoint`` is where the c10d rendezvous of several machines lives
    (``HOST:PORT``, served by node 0's torchrun); ``rdzv_id`` names the job there (each
    attempt adds its number, so attempts never mix); ``node_timeout`` is how long a node's
    heartbeat in ``coord/`` may be silent before the others count it as lost.
    """

    nproc_per_node: int = 1
    nnodes: int = 1
    node_rank: int = 0
    rdzv_endpoint: str | None = None
    rdzv_id: str | None = None
    node_timeout: float = 30.0

    def __post_init__(self) -> None:
        if self.nproc_per_node < 1:
            raise UsageError(f"--nproc-per-node {self.nproc_per_node}: needs at least 1")
        if self.nnodes < 1:
            raise UsageError(f"--nnodes {self.nnodes}: needs at least 1")
        if not 0 <= self.node_rank < self.nnodes:
            raise UsageError(f"--node-rank {self.node_rank}: must be in 0..{self.nnodes - 1} for --nnodes "
                             f"{self.nnodes}")
        if self.nnodes > 1:
            if not self.rdzv_endpoint:
                raise UsageError(f"--nnodes {self.nnodes}: needs --rdzv-endpoint HOST:PORT "
                                 "(or MASTER_ADDR and MASTER_PORT in the environment)")
            host, sep, port = self.rdzv_endpoint.rpartition(":")
            if not sep or not host or not port.isdigit():
                raise UsageError(f"--rdzv-endpoint {self.rdzv_endpoint!r}: expected HOST:PORT")

    @property
    def multi_node(self) -> bool:
        return self.nnodes > 1

    @property
    def leader(self) -> bool:
        """Node 0 decides for every node."""
        return self.node_rank == 0

    @classmethod
    def from_cli(cls, nproc_per_node: int, nnodes: int, node_rank: int, rdzv_endpoint: str | None,
                 env: Mapping[str, str] | None = None) -> DistSpec | None:
        """The spec from the command line, completed from the environment; None for one process.

        Values left at their defaults are read, in this order, from torchrun's own
        variables (``PET_NNODES``, ``PET_NODE_RANK``, ``PET_RDZV_ENDPOINT``,
        ``PET_NPROC_PER_NODE``), from a Slurm step (``SLURM_STEP_NUM_NODES``,
        ``SLURM_NODEID``; set by ``srun``, not in the batch script itself), and the
        endpoint from ``MASTER_ADDR``/``MASTER_PORT``. ``FTRAIN_NODE_TIMEOUT`` (seconds)
        sets how long a silent node is waited for.
        """
        env = os.environ if env is None else env

        def number(*names: str) -> int | None:
            for name in names:
                text = env.get(name, "").strip()
                if text.isdigit():
                    return int(text)
            return None

        if nproc_per_node == 1:
            nproc_per_node = number("PET_NPROC_PER_NODE") or 1
        if nnodes == 1:
            nnodes = number("PET_NNODES", "SLURM_STEP_NUM_NODES") or 1
        if nnodes > 1 and node_rank == 0:
            node_rank = number("PET_NODE_RANK", "SLURM_NODEID") or 0
        if nnodes > 1 and not rdzv_endpoint:
            rdzv_endpoint = env.get("PET_RDZV_ENDPOINT") or None
            if rdzv_endpoint is None and env.get("MASTER_ADDR") and env.get("MASTER_PORT"):
                rdzv_endpoint = f"{env['MASTER_ADDR']}:{env['MASTER_PORT']}"
        if nproc_per_node == 1 and nnodes == 1:
            if rdzv_endpoint:
                raise UsageError("--rdzv-endpoint: only meaningful with --nnodes > 1")
            return None
        rdzv_id = env.get("SLURM_JOB_ID") or env.get("PET_RDZV_ID") or None
        timeout_text = env.get("FTRAIN_NODE_TIMEOUT", "").strip()
        try:
            node_timeout = float(timeout_text) if timeout_text else 30.0
        except ValueError:
            raise UsageError(f"FTRAIN_NODE_TIMEOUT={timeout_text!r}: expected seconds") from None
        if not node_timeout > 0:
            raise UsageError(f"FTRAIN_NODE_TIMEOUT={timeout_text!r}: must be above 0")
        return cls(nproc_per_node=nproc_per_node, nnodes=nnodes, node_rank=node_rank,
                   rdzv_endpoint=rdzv_endpoint, rdzv_id=rdzv_id, node_timeout=node_timeout)

    def to_json(self) -> dict[str, Any]:
        return {"nproc_per_node": self.nproc_per_node, "nnodes": self.nnodes, "node_rank": self.node_rank,
                "rdzv_endpoint": self.rdzv_endpoint, "rdzv_id": self.rdzv_id, "node_timeout": self.node_timeout}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> DistSpec:
        return cls(nproc_per_node=int(data.get("nproc_per_node", 1)), nnodes=int(data.get("nnodes", 1)),
                   node_rank=int(data.get("node_rank", 0)), rdzv_endpoint=data.get("rdzv_endpoint"),
                   rdzv_id=data.get("rdzv_id"), node_timeout=float(data.get("node_timeout", 30.0)))


def torchrun_command(spec: DistSpec, command: Sequence[str], log_dir: Path, *, rdzv_id: str,
                     monitor_interval: float = MONITOR_INTERVAL) -> tuple[str, ...]:
    """torchrun around ``command`` (a ``.py`` run by our interpreter, or any executable).

    torchrun's restarts are off (ftrain owns them); each rank's output goes to its file
    under ``log_dir`` and, teed, to the console that ftrain reads.
    """
    argv = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(spec.nproc_per_node),
            "--max-restarts", "0", "--monitor-interval", f"{monitor_interval:g}",
            "--log-dir", str(log_dir), "--redirects", "3", "--tee", "3"]
    if spec.multi_node:
        assert spec.rdzv_endpoint is not None
        argv += ["--nnodes", str(spec.nnodes), "--node-rank", str(spec.node_rank), "--rdzv-backend", "c10d",
                 "--rdzv-endpoint", spec.rdzv_endpoint, "--rdzv-id", rdzv_id,
                 # node 0 serves the rendezvous store: no guessing from host names (on one
                 # machine every node's name would match the endpoint)
                 "--rdzv-conf", f"is_host={1 if spec.leader else 0}"]
    else:
        argv += ["--standalone"]
    if len(command) >= 2 and command[0] == sys.executable and command[1].endswith(".py"):
        argv += list(command[1:])
    else:
        argv += ["--no-python", *command]
    return tuple(argv)


# --------------------------------------------------------------------------- torchrun's report
@dataclass(frozen=True)
class ReportedFailure:
    """One entry of torchrun's failure report block (``Root Cause``, ``Failures``)."""

    rank: int
    local_rank: int
    exit_code: int
    pid: int | None
    error_file: str | None
    root: bool


_PREFIX = re.compile(r"^\[[A-Za-z_]+\d+\]:\s?")      # torchrun's per-rank console prefix, [default0]:
_ENTRY = re.compile(r"^\s*\[\d+\]:\s*$")
_RANK = re.compile(r"^\s*rank\s+: (\d+) \(local_rank: (\d+)\)")
_EXIT = re.compile(r"^\s*exitcode\s+: (-?\d+) \(pid: (\d+)\)")
_ERROR_FILE = re.compile(r"^\s*error_file\s*: (.*?)\s*$")


def parse_torchrun_report(lines: Iterable[str]) -> list[ReportedFailure]:
    """The failed ranks torchrun listed, root cause first; [] when there is no report.

    Console lines may carry a log prefix (``[default0]:``), which is ignored.
    """
    found: list[ReportedFailure] = []
    section: bool | None = None            # True: Root Cause, False: Failures
    entry: dict[str, Any] | None = None

    def close() -> None:
        if entry is not None and "rank" in entry and "exit_code" in entry and section is not None:
            found.append(ReportedFailure(entry["rank"], entry["local_rank"], entry["exit_code"], entry.get("pid"),
                                         entry.get("error_file"), root=bool(entry["root"])))

    for line in lines:
        line = _PREFIX.sub("", line)
        if "Root Cause (first observed failure):" in line:
            close()
            section, entry = True, None
            continue
        if line.strip() == "Failures:":
            close()
            section, entry = False, None
            continue
        if section is None:
            continue
        if line.startswith("=====") or line.startswith("-----"):
            close()
            entry = None
            if line.startswith("====="):
                section = None
            continue
        if _ENTRY.match(line):
            close()
            entry = {"root": section}
            continue
        if entry is None:
            continue
        if m := _RANK.match(line):
            entry["rank"], entry["local_rank"] = int(m.group(1)), int(m.group(2))
        elif m := _EXIT.match(line):
            entry["exit_code"], entry["pid"] = int(m.group(1)), int(m.group(2))
        elif m := _ERROR_FILE.match(line):
            value = m.group(1)
            entry["error_file"] = None if value in ("", "<N/A>") else value
    close()
    found.sort(key=lambda f: not f.root)
    return found


# --------------------------------------------------------------------------- per-rank analysis
@dataclass(frozen=True)
class RankExit:
    """How one rank ended, as far as its files and torchrun's report tell.

    ``t`` is when it failed (its error file's or its stderr's last write, wall clock);
    ``secondary`` marks a rank that failed because of another: stopped by torchrun, or
    its collective broke when a peer went away.
    """

    rank: int
    local_rank: int
    pid: int | None
    exit_code: int | None
    failure: Failure
    t: float
    secondary: bool
    folder: Path | None
    message: str | None = None

    @property
    def label(self) -> str:
        pid = f", pid {self.pid}" if self.pid is not None else ""
        return f"rank {self.rank} (local_rank {self.local_rank}{pid})"

    def describe(self) -> str:
        how = self.failure.signal or (f"exit {self.exit_code}" if self.exit_code is not None else "no exit code")
        head = self.failure.evidence[0] if self.failure.evidence else self.message or ""
        return f"{self.label}: {self.failure.kind.value} ({how})" + (f" — {head}" if head else "")


def rank_folders(ranks_dir: Path) -> dict[int, Path]:
    """``local_rank → folder`` of torchrun's per-rank logs under an attempt's ``ranks/``."""
    found: dict[int, Path] = {}
    for folder in sorted(ranks_dir.glob("*/attempt_*/*")):
        if folder.is_dir() and folder.name.isdigit():
            found[int(folder.name)] = folder
    return found


def read_error_file(path: Path) -> tuple[str | None, str | None]:
    """``(message, py_callstack)`` of a torchelastic error file; Nones if unreadable."""
    try:
        data = json.loads(path.read_text(errors="replace"))
    except (OSError, ValueError):
        return None, None
    message = data.get("message") if isinstance(data, dict) else None
    if isinstance(message, str):
        return message, None
    if isinstance(message, dict):
        extra = message.get("extraInfo") if isinstance(message.get("extraInfo"), dict) else {}
        text = message.get("message")
        stack = extra.get("py_callstack")
        return (str(text) if text is not None else None), (str(stack) if stack is not None else None)
    return None, None


def _tail(path: Path, limit: int = TAIL_LINES, max_bytes: int = 256 * 1024) -> list[str]:
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            f.seek(max(0, size - max_bytes))
            data = f.read()
    except OSError:
        return []
    return data.decode("utf-8", "replace").splitlines()[-limit:]


def _mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except OSError:
        return None


def _signal_name(code: int | None) -> str | None:
    if code is None or code >= 0:
        return None
    try:
        return signal.Signals(-code).name
    except ValueError:
        return f"SIG{-code}"


def analyze_ranks(ranks_dir: Path, console: Sequence[str], *, step: int | None, oom_killed: bool = False,
                  rank_of: Mapping[int, int] | None = None,
                  classify: Callable[..., Failure | None] | None = None) -> list[RankExit]:
    """Every rank that failed in an attempt, the root cause first.

    Sources: torchrun's report block in ``console`` (exit codes, pids), and each rank's
    folder (``error.json``, ``stderr.log``, ``stdout.log``). ``rank_of`` maps local ranks to
    global ranks where the report does not say (several nodes). Ordering: ranks that
    failed on their own before ranks that failed because of them, then by time.
    """
    if classify is None:
        from ftrain.classify import classify as classify_fn
        classify = classify_fn
    reported = {r.local_rank: r for r in parse_torchrun_report(console)}
    folders = rank_folders(ranks_dir)
    exits: list[RankExit] = []
    for local in sorted(set(folders) | set(reported)):
        rep = reported.get(local)
        folder = folders.get(local)
        error_file = folder / "error.json" if folder is not None else None
        if rep is not None and rep.error_file and (error_file is None or not error_file.exists()):
            error_file = Path(rep.error_file)   # relative to torchrun's cwd, which may not be ours
        message, stack = read_error_file(error_file) if error_file is not None else (None, None)
        has_error = message is not None
        if rep is None and not has_error:
            continue          # this rank did not fail (or we cannot tell that it did)
        code = rep.exit_code if rep is not None else 1
        lines: list[str] = []
        if folder is not None:
            lines += _tail(folder / "stdout.log") + _tail(folder / "stderr.log")
        if stack and not any(message and message in line for line in lines):
            lines += stack.splitlines()
        failure = classify(code, lines, step=step, oom_killed=oom_killed and code == -signal.SIGKILL,
                           stop_requested=False)
        if failure is None:
            continue
        times = [t for t in (_mtime(error_file) if has_error and error_file else None,
                             _mtime(folder / "stderr.log") if folder is not None else None) if t is not None]
        text = "\n".join(lines[-60:]) + "\n" + (message or "")
        secondary = (code in (-signal.SIGTERM, -signal.SIGKILL, -signal.SIGINT) and not
                     (code == -signal.SIGKILL and oom_killed)) or (
            failure.kind in _SECONDARY_KINDS and PEER_LOSS.search(text) is not None)
        rank = rep.rank if rep is not None else (rank_of or {}).get(local, local)
        pid = rep.pid if rep is not None else None
        exits.append(RankExit(rank=rank, local_rank=local, pid=pid, exit_code=code, failure=failure,
                              t=min(times) if times else math.inf, secondary=secondary, folder=folder,
                              message=message))
    exits.sort(key=lambda e: (e.secondary, e.t, not (reported.get(e.local_rank) and
                                                      reported[e.local_rank].root), e.rank))
    return exits


def root_cause(exits: Sequence[RankExit], *, step: int | None, node: int | None = None) -> Failure | None:
    """The attempt's failure: the first rank's kind and evidence, the others named after it."""
    if not exits:
        return None
    first = exits[0]
    where = f" on node {node}" if node is not None else ""
    lead = f"root cause: {first.label}{where} failed first: {first.failure.kind.value}"
    how = first.failure.signal or (f"exit {first.exit_code}" if first.exit_code is not None else None)
    if how:
        lead += f" ({how})"
    others = [f"then {e.describe()}" + (" [a consequence]" if e.secondary else "") for e in exits[1:]]
    logs = [f"logs: {first.folder}"] if first.folder is not None else []
    evidence = (lead, *first.failure.evidence, *others, *logs)
    return Failure(first.failure.kind, exit_code=first.exit_code, signal=_signal_name(first.exit_code),
                   step=step if step is not None else first.failure.step, evidence=tuple(evidence))


# --------------------------------------------------------------------------- heartbeats and stacks
@dataclass(frozen=True)
class Heartbeat:
    """One rank's heartbeat file: its pid (None if not written yet) and its last refresh."""

    rank: int
    pid: int | None
    mtime: float


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
            mtime = entry.stat().st_mtime
            text = Path(entry.path).read_text().strip()
        except OSError:
            continue
        found[int(name[5:])] = Heartbeat(int(name[5:]), int(text) if text.isdigit() else None, mtime)
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


# --------------------------------------------------------------------------- one node's runtime
class Distributed:
    """The supervisor's view of torchrun and its ranks on this machine, one attempt at a time.

    The supervisor calls ``command`` and ``start_attempt`` when it launches, ``check`` on
    every poll (stale ranks, lost peers), ``dump_stacks`` before stopping a hung group,
    ``explain`` on a hang, and ``root_cause`` when the attempt ended by itself.
    """

    def __init__(self, spec: DistSpec, run_dir: Path, *, coordinator: Coordinator | None = None,
                 job_dir: Path | None = None) -> None:
        self.spec = spec
        self.run_dir = Path(run_dir)
        self.job_dir = Path(job_dir) if job_dir is not None else self.run_dir   # shared by the nodes
        self.heartbeat_dir = self.run_dir / "heartbeat"
        self.coordinator = coordinator
        self.attempt = 0
        self.attempt_dir: Path | None = None
        self.leader_pid: int | None = None
        self._next_check = 0.0
        self._pids: dict[int, tuple[int, int]] = {}        # rank → (pid, local_rank)
        self._dump_offsets: dict[int, tuple[Path, int]] = {}  # rank → (stderr.log, size before the dump)
        self._started = 0.0                                 # wall clock at the attempt's start
        self._peer_stopped = False                          # stopped because another node failed
        self.last_secondary = False                         # the attempt failed only as a consequence
        self.last_failure_t: float | None = None            # when its first rank failed (wall clock)

    def bind(self, say: Callable[[str, str], None]) -> None:
        """Where to tell a person what happens between the nodes (the supervisor's reporter)."""
        if self.coordinator is not None:
            self.coordinator.say = say

    # ---------------------------------------------------------------- launch
    @property
    def ranks_dir(self) -> Path:
        assert self.attempt_dir is not None
        return self.attempt_dir / "ranks"

    def rdzv_id(self, n: int) -> str:
        base = self.spec.rdzv_id or re.sub(r"[^A-Za-z0-9_.-]", "-", self.job_dir.resolve().name)
        return f"ftrain-{base}-{n}"

    def command(self, base: Sequence[str], n: int, attempt_dir: Path) -> tuple[str, ...]:
        """torchrun around the script for attempt ``n``, its logs in ``attempt_dir/ranks``."""
        self.attempt, self.attempt_dir = n, attempt_dir
        # absolute: torchrun runs in the script's folder, which need not be ours
        return torchrun_command(self.spec, base, attempt_dir.resolve() / "ranks", rdzv_id=self.rdzv_id(n))

    def start_attempt(self, n: int, attempt_dir: Path, leader_pid: int) -> None:
        """Forget the last attempt's ranks. Their heartbeat files stay until each new rank
        rewrites its own; until then they are older than the attempt and not looked at."""
        self.attempt, self.attempt_dir, self.leader_pid = n, attempt_dir, leader_pid
        self._started = time.time()
        self._pids.clear()
        self._dump_offsets.clear()
        self._next_check = 0.0
        self._peer_stopped = self.last_secondary = False
        self.last_failure_t = None
        if self.coordinator is not None:
            self.coordinator.start_attempt(n)

    # ---------------------------------------------------------------- while it runs
    def _beats(self) -> dict[int, Heartbeat]:
        """This attempt's heartbeats (a file older than the attempt is a previous rank's)."""
        return {r: hb for r, hb in read_heartbeats(self.heartbeat_dir).items() if hb.mtime >= self._started - 1.0}

    def check(self, hang_timeout: float, *, step: int | None = None, now: float | None = None) -> Anomaly | None:
        """A hang when one rank's heartbeat is older than ``hang_timeout`` (the Detectors'
        current limit); a failure elsewhere when another node reported one or went silent."""
        mono = time.monotonic()
        if mono < self._next_check:
            return None
        self._next_check = mono + CHECK_EVERY
        now = time.time() if now is None else now
        self._learn_pids()
        if self.coordinator is not None:
            peer = self.coordinator.peer_trouble(self.attempt)
            if peer is not None:
                self._peer_stopped = True
                self.last_failure_t = now
                return peer if peer.step is not None else replace(peer, step=step)
        if not math.isfinite(hang_timeout):
            return None
        live = set(self.rank_pids().values())   # a rank that has exited is not hung
        beats = {r: hb for r, hb in self._beats().items() if hb.pid is None or hb.pid in live}
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

    def _learn_pids(self) -> None:
        """Which pid is which rank: torchrun's children carry RANK/LOCAL_RANK in their
        environment; heartbeat files name the pid of each rank that logged."""
        if self.leader_pid is None:
            return
        try:
            kids = psutil.Process(self.leader_pid).children()
        except psutil.Error:
            return
        for p in kids:
            if p.pid in {pid for pid, _ in self._pids.values()}:
                continue
            try:
                env = p.environ()
            except psutil.Error:
                continue
            rank, local = env.get("RANK", ""), env.get("LOCAL_RANK", "")
            if rank.isdigit() and local.isdigit():
                self._pids[int(rank)] = (p.pid, int(local))

    def rank_pids(self) -> dict[int, int]:
        """``rank → pid`` of this node's live ranks (heartbeat files, checked against the
        attempt's process tree so that a recycled pid is never signalled)."""
        self._learn_pids()
        pids = {rank: pid for rank, (pid, _) in self._pids.items()}
        tree: set[int] = set()
        if self.leader_pid is not None:
            try:
                tree = {p.pid for p in psutil.Process(self.leader_pid).children(recursive=True)}
            except psutil.Error:
                tree = set()
        for rank, hb in self._beats().items():
            if hb.pid is not None and hb.pid in tree:
                pids.setdefault(rank, hb.pid)
        return {rank: pid for rank, pid in pids.items() if pid in tree}

    def dump_stacks(self) -> list[int]:
        """SIGUSR1 to every rank (the shim's faulthandler prints all threads' stacks into
        the rank's stderr.log), never to torchrun; wait briefly for the dumps. Returns the
        ranks signalled."""
        folders = rank_folders(self.ranks_dir) if self.attempt_dir is not None else {}
        sent: list[int] = []
        for rank, pid in sorted(self.rank_pids().items()):
            local = self._pids.get(rank, (pid, rank if not self.spec.multi_node else -1))[1]
            folder = folders.get(local)
            if folder is not None:
                log = folder / "stderr.log"
                self._dump_offsets[rank] = (log, log.stat().st_size if log.exists() else 0)
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
                return f.read(256 * 1024).decode("utf-8", "replace")
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

    # ---------------------------------------------------------------- after it ended
    def root_cause(self, console: Sequence[str], *, step: int | None, oom_killed: bool) -> Failure | None:
        """The root cause among this node's ranks, or None if no rank is known to have failed."""
        if self.attempt_dir is None:
            return None
        rank_of = {local: rank for rank, (_, local) in self._pids.items()}
        exits = analyze_ranks(self.ranks_dir, console, step=step, oom_killed=oom_killed, rank_of=rank_of)
        if exits:
            self.last_secondary = exits[0].secondary
            self.last_failure_t = exits[0].t if math.isfinite(exits[0].t) else time.time()
        return root_cause(exits, step=step, node=self.spec.node_rank if self.spec.multi_node else None)

    # ---------------------------------------------------------------- several nodes
    def before_attempt(self, state: RunState) -> None:
        """Node 0 publishes the state it starts the next attempt with; a node that rejoins
        (resumed after it died) adopts node 0's newer state and attempt number."""
        if self.coordinator is not None:
            self.coordinator.before_attempt(state)

    def agree(self, n: int, failure: Failure | None, *, interrupted: Callable[[], bool],
              decide: Callable[[Failure], Decision]) -> tuple[Failure | None, Decision | None]:
        """One decision for every node after attempt ``n``: ``(root failure, decision)``.

        One node: nothing to agree on, ``(failure, None)`` (the caller decides). Several:
        see ``Coordinator.agree``; ``interrupted()`` true (SIGINT/SIGTERM to ftrain) ends
        any wait for the other nodes.
        """
        if self.coordinator is None:
            return failure, None
        secondary = self.last_secondary or self._peer_stopped
        t_fail = self.last_failure_t if self.last_failure_t is not None else time.time()
        return self.coordinator.agree(n, failure, secondary=secondary, t_fail=t_fail, interrupted=interrupted,
                                      decide=decide)

    def start(self) -> None:
        """Before the first attempt: several nodes start beating in ``coord/``."""
        if self.coordinator is not None:
            self.coordinator.start()

    def close(self) -> None:
        if self.coordinator is not None:
            self.coordinator.close()


def node_dir(spec: DistSpec, job_dir: Path) -> Path:
    """This node's own run folder: the job's folder on node 0, ``nodes/node-K/`` inside it on
    the others (each node keeps its own journal, attempts and rank logs; the metrics stream,
    the checkpoints and ``coord/`` are the job's, shared)."""
    if spec.multi_node and not spec.leader:
        return Path(job_dir) / "nodes" / f"node-{spec.node_rank}"
    return Path(job_dir)


def job_dir_of(spec: DistSpec, run_dir: Path) -> Path:
    """The job's shared folder, from a node's own run folder (``node_dir`` inverted)."""
    if spec.multi_node and not spec.leader:
        return Path(run_dir).parent.parent
    return Path(run_dir)


def make_distributed(spec: DistSpec, run_dir: Path, job_dir: Path) -> Distributed:
    """This node's ``Distributed`` for a supervisor on ``run_dir`` (see ``node_dir``); on
    several nodes with the coordinator over ``job_dir/coord``."""
    coordinator = None
    if spec.multi_node:
        coordinator = Coordinator(spec, Path(job_dir) / "coord", Path(job_dir) / "checkpoints")
    return Distributed(spec, run_dir, coordinator=coordinator, job_dir=job_dir)


# --------------------------------------------------------------------------- several machines
def _write_json_atomic(path: Path, data: Any, *, durable: bool = True) -> None:
    """Temporary name, flush, rename: another node never reads half a file. ``durable``
    also fsyncs (not worth a round trip to the file server for a heartbeat)."""
    tmp = path.with_name(f".{path.name}.{os.urandom(6).hex()}.tmp")   # unique across hosts sharing the folder
    with open(tmp, "w") as f:
        json.dump(data, f, default=str)
        if durable:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def failure_from_json(data: Mapping[str, Any]) -> Failure:
    return Failure(FailureKind(data["kind"]), exit_code=data.get("exit_code"), signal=data.get("signal"),
                   step=data.get("step"), evidence=tuple(data.get("evidence") or ()))


def decision_to_json(decision: Decision) -> dict[str, Any]:
    return {**decision.to_json(), "quarantine_after": decision.quarantine_after}


def decision_from_json(data: Mapping[str, Any]) -> Decision:
    def window(text: str) -> tuple[int, int]:
        a, _, b = str(text).partition("-")
        return int(a), int(b or a)

    return Decision(Action(data["action"]), reason=str(data.get("reason", "")), rule=data.get("rule"),
                    overrides=dict(data.get("overrides") or {}), resume_from=data.get("resume_from"),
                    resume_step=data.get("resume_step"),
                    skip=tuple(window(w) for w in data.get("skip_steps") or ()),
                    backoff=float(data.get("backoff") or 0.0), gave_up=bool(data.get("gave_up")),
                    quarantine_after=data.get("quarantine_after"))


class Coordinator:
    """Several ftrains, one per machine, agree through files in a shared folder.

    Why files: every node already needs the run folder on a shared file system (the
    checkpoints rank 0 writes must be readable by every node's supervisor when it chooses
    one), the supervisor must not import torch (so no c10d store, which in any case lives
    in node 0's torchrun and is gone between attempts, when the decision is taken), and a
    file outlives the process that wrote it, so a node that rejoins after a crash reads
    what it missed. Node 0 decides; nobody votes, so there is nothing to reconcile. ::

        coord/node-K.json               K's heartbeat: a counter, every BEAT s, from a thread
        coord/NNNN/state.json           the state node 0 starts attempt NNNN with
        coord/NNNN/failed               exists once some node's attempt NNNN failed (or a node
                                        was lost): one stat tells every node to stop its ranks
        coord/NNNN/outcome-node-K.json  what K saw of attempt NNNN: failure or none, when, and
                                        whether it was only a consequence of another node's
        coord/NNNN/decision.json        node 0's verdict: the root failure and the decision

    Per attempt: every node runs it; when one node's attempt fails it publishes its outcome
    and the ``failed`` mark, and the others, seeing the mark, stop theirs at once instead of
    waiting for a collective to time out. Node 0 waits for every node's outcome (a node
    whose heartbeat has not moved for ``node_timeout`` is lost, and counted as ``killed``),
    picks the root cause (a failure of its own before a consequence, then the earliest),
    decides by the policy, sets rolled-back checkpoints aside, and publishes the decision;
    the others wait for it (as long as node 0 beats) and apply it as it is.

    Cost per poll: a follower stats one mark and reads node 0's heartbeat; node 0 reads
    every heartbeat. Lost-node detection watches a counter change with the reader's own
    monotonic clock, so the machines' clocks need not agree.
    """

    BEAT = 1.0
    POLL = 0.1    # seconds between looks while waiting for outcomes or a decision

    def __init__(self, spec: DistSpec, coord_dir: Path, checkpoint_dir: Path, *,
                 say: Callable[[str, str], None] | None = None) -> None:
        self.spec = spec
        self.dir = Path(coord_dir)
        self.checkpoint_dir = Path(checkpoint_dir)
        self.say = say or (lambda message, level: None)
        self.node = spec.node_rank
        self._seen: dict[int, tuple[Any, float]] = {}     # node → (last beat mark, monotonic when it changed)
        self._absent: set[int] = set()                    # lost before this attempt began
        self._watch_from = time.monotonic()
        self._attempt = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._beats = 0

    def attempt_dir(self, n: int) -> Path:
        return self.dir / f"{n:04d}"

    # ---------------------------------------------------------------- heartbeat
    def start(self) -> None:
        """Create the folder and start beating (a daemon thread: it only writes a file)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        self._beat()
        self._thread = threading.Thread(target=self._beat_loop, name="ftrain-node-heartbeat", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2 * self.BEAT)
            self._thread = None

    def _beat_loop(self) -> None:
        while not self._stop.wait(self.BEAT):
            try:
                self._beat()
            except OSError:
                pass   # a slow or full shared disk: the others will count us as lost, rightly

    def _beat(self) -> None:
        self._beats += 1
        _write_json_atomic(self.dir / f"node-{self.node}.json", {
            "node": self.node, "pid": os.getpid(), "host": socket.gethostname(), "beat": self._beats,
            "attempt": self._attempt, "t": time.time()}, durable=False)

    def lost_nodes(self, nodes: Iterable[int] | None = None, *,
                   never_seen_after: float | None = None) -> dict[int, float]:
        """``node → seconds silent`` for the other nodes (all, or ``nodes``) whose heartbeat
        stopped moving for longer than ``node_timeout``. A node never seen counts only once
        ``never_seen_after`` seconds have passed since we started watching."""
        now = time.monotonic()
        lost: dict[int, float] = {}
        for node in range(self.spec.nnodes) if nodes is None else nodes:
            if node == self.node:
                continue
            data = _read_json(self.dir / f"node-{node}.json")
            mark = (data.get("pid"), data.get("beat")) if data else None
            seen = self._seen.get(node)
            if mark is not None and (seen is None or seen[0] != mark):
                self._seen[node] = (mark, now)
                self._absent.discard(node)   # it beats (again)
                continue
            if seen is not None:
                silent = now - seen[1]
                if silent > self.spec.node_timeout:
                    lost[node] = silent
            elif never_seen_after is not None and now - self._watch_from > never_seen_after:
                lost[node] = now - self._watch_from
        return lost

    def _watched(self) -> list[int] | None:
        """Node 0 watches every node; the others watch node 0 (it tells them about the rest)."""
        return None if self.spec.leader else [0]

    # ---------------------------------------------------------------- during an attempt
    def start_attempt(self, n: int) -> None:
        """A node already lost when the attempt starts is not a reason to stop it: torchrun's
        rendezvous waits for it (bounded by the hang detector's startup allowance)."""
        self._attempt = n
        self.attempt_dir(n).mkdir(parents=True, exist_ok=True)
        self._absent = set(self.lost_nodes(self._watched()))

    def peer_trouble(self, n: int) -> Anomaly | None:
        """Another node's attempt ``n`` failed, or a node went silent: stop ours now."""
        folder = self.attempt_dir(n)
        if (folder / "failed").exists():
            for path in sorted(folder.glob("outcome-node-*.json")):
                data = _read_json(path)
                if data and data.get("failure") and data.get("node") != self.node:
                    failure = failure_from_json(data["failure"])
                    return Anomaly(failure.kind, failure.step, None, None,
                                   f"node {data['node']} reported {failure.kind.value} in attempt {n}: stopping "
                                   "this node's ranks", failure.evidence[:3])
            mark = _read_json(folder / "failed") or {}
            if mark.get("node") != self.node:
                return Anomaly(FailureKind.KILLED, None, None, None,
                               f"attempt {n} failed elsewhere: {mark.get('reason', 'a node failed')}; stopping "
                               "this node's ranks")
        lost = {node: silent for node, silent in self.lost_nodes(self._watched()).items()
                if node not in self._absent}
        if lost:
            node, silent = max(lost.items(), key=lambda kv: kv[1])
            reason = (f"node {node} lost: its ftrain heartbeat has not moved for {silent:.1f} s "
                      f"(node timeout {self.spec.node_timeout:g} s)")
            self._mark_failed(n, reason)
            return Anomaly(FailureKind.KILLED, None, None, silent, reason)
        return None

    def _mark_failed(self, n: int, reason: str) -> None:
        path = self.attempt_dir(n) / "failed"
        if not path.exists():
            _write_json_atomic(path, {"node": self.node, "reason": reason, "t": time.time()})

    # ---------------------------------------------------------------- after an attempt
    def publish_outcome(self, n: int, failure: Failure | None, *, secondary: bool, t_fail: float) -> None:
        folder = self.attempt_dir(n)
        folder.mkdir(parents=True, exist_ok=True)
        _write_json_atomic(folder / f"outcome-node-{self.node}.json", {
            "node": self.node, "attempt": n, "failure": failure.to_json() if failure else None,
            "secondary": secondary, "t_fail": t_fail, "t": time.time()})
        if failure is not None:
            self._mark_failed(n, f"node {self.node}: {failure.kind.value}")

    def agree(self, n: int, failure: Failure | None, *, secondary: bool, t_fail: float,
              interrupted: Callable[[], bool], decide: Callable[[Failure], Decision],
              ) -> tuple[Failure | None, Decision | None]:
        """Publish this node's outcome of attempt ``n`` and return the job's verdict:
        node 0 gathers, picks the root cause and decides; the others wait for it. A node
        interrupted (SIGINT/SIGTERM to its ftrain) before or while it waits returns
        ``(failure, None)``; node 0 then tells the others to stop."""
        self.publish_outcome(n, failure, secondary=secondary, t_fail=t_fail)
        if self.spec.leader:
            verdict = None if interrupted() else self._lead(n, failure, secondary, t_fail, decide, interrupted)
            if verdict is None:   # tell the others now rather than by falling silent
                stop = Decision(Action.STOP, reason=f"node 0 was interrupted during attempt {n}; resume every "
                                                    "node's run folder to continue")
                _write_json_atomic(self.attempt_dir(n) / "decision.json", {
                    "attempt": n, "node": self.node, "failure": failure.to_json() if failure else None,
                    "decision": decision_to_json(stop)})
                return failure, None
            return verdict
        if interrupted():
            return failure, None
        return self._follow(n, failure, interrupted)

    def _lead(self, n: int, failure: Failure | None, secondary: bool, t_fail: float,
              decide: Callable[[Failure], Decision], interrupted: Callable[[], bool],
              ) -> tuple[Failure | None, Decision | None] | None:
        folder = self.attempt_dir(n)
        outcomes: dict[int, dict[str, Any]] = {self.node: {"failure": failure.to_json() if failure else None,
                                                           "secondary": secondary, "t_fail": t_fail}}
        waiting = set(range(self.spec.nnodes)) - {self.node}
        lost: dict[int, float] = {}
        if waiting:
            self.say(f"waiting for the other {len(waiting)} node(s) to report attempt {n}", "info")
        self._watch_from = time.monotonic()
        while waiting:
            if interrupted():
                return None
            for node in sorted(waiting):
                data = _read_json(folder / f"outcome-node-{node}.json")
                if data is not None:
                    outcomes[node] = data
                    waiting.discard(node)
            if not waiting:
                break
            gone = self.lost_nodes(sorted(waiting), never_seen_after=self.spec.node_timeout)
            for node, silent in gone.items():
                lost[node] = silent
                waiting.discard(node)
            if waiting:
                time.sleep(self.POLL)
        candidates: list[tuple[bool, float, int, Failure]] = []
        for node, data in outcomes.items():
            if data.get("failure"):
                candidates.append((bool(data.get("secondary")), float(data.get("t_fail") or math.inf), node,
                                   failure_from_json(data["failure"])))
        for node, silent in lost.items():
            candidates.append((False, time.time() - silent, node, Failure(
                FailureKind.KILLED, evidence=(f"node {node} lost: no outcome for attempt {n} and its ftrain "
                                              f"heartbeat has not moved for {silent:.1f} s",))))
        if not candidates:
            _write_json_atomic(folder / "decision.json", {"attempt": n, "failure": None, "decision": None,
                                                          "node": None})
            return None, None
        candidates.sort(key=lambda c: (c[0], c[1], c[2]))
        _, _, node, root = candidates[0]
        if node != self.node:
            head = root.evidence[0] if root.evidence else root.kind.value
            if f"node {node}" not in head:
                root = replace(root, evidence=(f"node {node}: {head}", *root.evidence[1:]))
            self.say(f"root cause of attempt {n} is on node {node}: {root.kind.value}", "warn")
        decision = decide(root)
        if decision.action is Action.ROLLBACK:
            # Only node 0 moves shared checkpoints, before anyone reads the decision.
            from ftrain import checkpoints

            after = decision.quarantine_after if decision.quarantine_after is not None else -1
            checkpoints.quarantine(self.checkpoint_dir, after_step=after)
        _write_json_atomic(folder / "decision.json", {
            "attempt": n, "node": node, "failure": root.to_json(), "decision": decision_to_json(decision),
            "outcomes": {str(k): v for k, v in outcomes.items()}, "lost": {str(k): v for k, v in lost.items()}})
        return root, decision

    def _follow(self, n: int, failure: Failure | None,
                interrupted: Callable[[], bool]) -> tuple[Failure | None, Decision | None]:
        path = self.attempt_dir(n) / "decision.json"
        self.say(f"waiting for node 0's decision on attempt {n}", "info")
        self._watch_from = time.monotonic()
        while True:
            data = _read_json(path)
            if data is not None:
                break
            if interrupted():
                return failure, None
            lost = self.lost_nodes([0], never_seen_after=self.spec.node_timeout)
            if 0 in lost:
                reason = (f"node 0 lost while this node waited for its decision on attempt {n} "
                          f"(no heartbeat for {lost[0]:.1f} s); resume this node when node 0 is back")
                return failure or Failure(FailureKind.KILLED, evidence=(reason,)), Decision(Action.STOP, reason)
            time.sleep(self.POLL)
        if data.get("decision") is None:
            return None, None
        root = failure_from_json(data["failure"]) if data.get("failure") else failure
        decision = decision_from_json(data["decision"])
        if root is None:   # node 0 stopped without a failure of its own (interrupted)
            root = Failure(FailureKind.PREEMPTED, evidence=(decision.reason,))
        return root, decision

    # ---------------------------------------------------------------- rejoining
    def before_attempt(self, state: RunState) -> None:
        """Node 0: publish the state of the attempt it starts next. Others: adopt node 0's
        state when it is ahead (this node missed decisions while it was down)."""
        nxt = int(state.attempt) + 1
        if self.spec.leader:
            self.attempt_dir(nxt).mkdir(parents=True, exist_ok=True)
            _write_json_atomic(self.attempt_dir(nxt) / "state.json", state_snapshot(state, nxt))
            return
        numbers = sorted((int(p.name) for p in self.dir.glob("[0-9]*") if p.name.isdigit()), reverse=True)
        data = next((d for d in (_read_json(self.attempt_dir(k) / "state.json") for k in numbers) if d), None)
        if data is None or int(data.get("attempt", 0)) < nxt:
            return
        if int(data["attempt"]) > nxt:
            self.say(f"rejoining the job at attempt {data['attempt']} (node 0's state)", "warn")
        adopt_snapshot(state, data)


_SNAPSHOT_FIELDS = ("config", "overrides", "resume_from", "resume_step", "restarts", "rule_uses",
                    "no_progress_streak", "best_step")


def state_snapshot(state: RunState, attempt: int) -> dict[str, Any]:
    """The parts of a ``RunState`` that every node must share to start ``attempt`` alike."""
    from ftrain.inject import format_inject

    data = {name: getattr(state, name) for name in _SNAPSHOT_FIELDS}
    data["rule_uses"] = {str(k): v for k, v in state.rule_uses.items()}
    data.update(attempt=attempt, skip=[list(w) for w in state.skip], rollbacks=[list(r) for r in state.rollbacks],
                inject=format_inject(state.inject))
    return data


def adopt_snapshot(state: RunState, data: Mapping[str, Any]) -> None:
    """Make ``state`` start node 0's attempt ``data["attempt"]`` next."""
    from ftrain.inject import parse_inject

    for name in _SNAPSHOT_FIELDS:
        if name in data:
            setattr(state, name, data[name])
    state.rule_uses = {int(k): int(v) for k, v in (data.get("rule_uses") or {}).items()}
    state.skip = [(int(a), int(b)) for a, b in data.get("skip") or ()]
    state.rollbacks = [(a, b) for a, b in data.get("rollbacks") or ()]
    state.inject = list(parse_inject(data.get("inject") or ""))
    state.attempt = int(data["attempt"]) - 1
