"""torchrun as ftrain runs it: the job's shape, its command line, and what it left behind.

On one machine or several the attempt's child is torchrun (``python -m
torch.distributed.run``) with its own restarts off; ftrain owns the restarts. Each attempt
gives torchrun a log folder of its own, ``attempts/NNNN/ranks/``, where torchrun keeps every
rank's ``stdout.log``, ``stderr.log`` and ``error.json`` (``TORCHELASTIC_ERROR_FILE``, written
by torch's ``@record`` or by the shim's excepthook). When the attempt has ended,
``rank_reports`` gathers how each failed rank ended from torchrun's failure report and those
files, as ``RankReport`` values; which rank is the root cause is ``classify.rank_root``'s call.

``parse_report`` is the one reader of torchrun's failure report block; ``classify`` uses it
too, to read a torchrun console as one process. Nothing here imports torch.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ftrain.errors import UsageError
from ftrain.files import read_bounded
from ftrain.outcome import RankReport

__all__ = ["DistSpec", "ErrorFile", "ReportedFailure", "entry_command", "parse_nnodes", "parse_report",
           "rank_folders", "rank_reports", "read_error_file", "report_root", "split_command", "torchrun_command"]

LAST_CALL = 3.0            # seconds an elastic rendezvous waits for more nodes once MIN have joined
MONITOR_INTERVAL = 0.1      # seconds between torchrun's looks at its ranks
TAIL_LINES = 200            # lines of each rank log given to the classifier
TAIL_BYTES = 256 * 1024     # read at most this much of the end of a rank log
ERROR_FILE_LIMIT = 1 << 20  # an error file larger than this is not read


# --------------------------------------------------------------------------- the job's shape
@dataclass(frozen=True)
class DistSpec:
    """How many ranks, on how many machines, and how they meet.

    ``rdzv_endpoint`` is where the c10d rendezvous of several machines lives
    (``HOST:PORT``, served by node 0's torchrun); ``rdzv_id`` names the job there (each
    attempt adds its number, so attempts never mix); ``node_timeout`` is how long a node's
    heartbeat in ``coord/`` may be silent before the others count it as lost. ``min_nodes``
    (torchrun's ``--nnodes MIN:MAX``, ``nnodes`` being MAX) says the script may go on with
    fewer machines: an attempt after a node was lost runs on the nodes that remain.
    """

    nproc_per_node: int = 1
    nnodes: int = 1
    node_rank: int = 0
    rdzv_endpoint: str | None = None
    rdzv_id: str | None = None
    node_timeout: float = 30.0
    min_nodes: int | None = None

    def __post_init__(self) -> None:
        if self.nproc_per_node < 1:
            raise UsageError(f"--nproc-per-node {self.nproc_per_node}: needs at least 1")
        if self.nnodes < 1:
            raise UsageError(f"--nnodes {self.nnodes}: needs at least 1")
        if self.min_nodes is not None and not 1 <= self.min_nodes <= self.nnodes:
            raise UsageError(f"--nnodes {self.min_nodes}:{self.nnodes}: MIN must be in 1..MAX")
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
        """Node 0 decides for every node, until it is lost (``ftrain.coord``)."""
        return self.node_rank == 0

    @property
    def elastic(self) -> bool:
        """The job may go on with fewer machines (``--nnodes MIN:MAX``, MIN < MAX)."""
        return self.min_nodes is not None and self.min_nodes < self.nnodes

    @property
    def nnodes_text(self) -> str:
        """``--nnodes`` as torchrun takes it: ``N`` or ``MIN:MAX``."""
        return f"{self.min_nodes}:{self.nnodes}" if self.elastic else str(self.nnodes)

    @classmethod
    def from_cli(cls, nproc_per_node: int, nnodes: int | str, node_rank: int, rdzv_endpoint: str | None,
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

        min_nodes, nnodes = parse_nnodes(nnodes)
        if nproc_per_node == 1:
            nproc_per_node = number("PET_NPROC_PER_NODE") or 1
        if nnodes == 1:   # torchrun's own variable may be MIN:MAX too
            pet = env.get("PET_NNODES", "").strip()
            if pet:
                min_nodes, nnodes = parse_nnodes(pet)
            else:
                min_nodes = nnodes = number("SLURM_STEP_NUM_NODES") or 1
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
                   rdzv_endpoint=rdzv_endpoint, rdzv_id=rdzv_id, node_timeout=node_timeout,
                   min_nodes=min_nodes if min_nodes != nnodes else None)

    def to_json(self) -> dict[str, Any]:
        return {"nproc_per_node": self.nproc_per_node, "nnodes": self.nnodes, "node_rank": self.node_rank,
                "rdzv_endpoint": self.rdzv_endpoint, "rdzv_id": self.rdzv_id, "node_timeout": self.node_timeout,
                "min_nodes": self.min_nodes}

    @classmethod
    def from_json(cls, data: Any) -> DistSpec:
        """The spec ``to_json`` wrote (run.json's ``distributed``); ``ValueError`` naming the
        field on bad content, missing fields at their defaults."""
        if not isinstance(data, Mapping):
            raise ValueError(f"expected an object, got {data!r}"[:200])
        fields: dict[str, Any] = {}
        for key in ("nproc_per_node", "nnodes", "node_rank"):
            value = data.get(key, cls.__dataclass_fields__[key].default)
            if type(value) is not int:
                raise ValueError(f"{key}: expected an integer, got {value!r}"[:200])
            fields[key] = value
        for key in ("rdzv_endpoint", "rdzv_id"):
            value = data.get(key)
            if value is not None and not isinstance(value, str):
                raise ValueError(f"{key}: expected a string, got {value!r}"[:200])
            fields[key] = value
        least = data.get("min_nodes")
        if least is not None and type(least) is not int:
            raise ValueError(f"min_nodes: expected an integer, got {least!r}"[:200])
        fields["min_nodes"] = least
        timeout = data.get("node_timeout", 30.0)
        if type(timeout) not in (int, float) or not 0 < timeout < float("inf"):
            raise ValueError(f"node_timeout: expected seconds above 0, got {timeout!r}"[:200])
        try:
            return cls(**fields, node_timeout=float(timeout))
        except UsageError as exc:   # the flags' wording, but the file is at fault
            raise ValueError(str(exc)) from None


def torchrun_command(spec: DistSpec, command: Sequence[str], log_dir: Path, *, rdzv_id: str,
                     monitor_interval: float = MONITOR_INTERVAL, serve: bool | None = None,
                     rdzv_endpoint: str | None = None) -> tuple[str, ...]:
    """torchrun around ``command`` (a ``.py`` run by our interpreter, or any executable).

    torchrun's restarts are off (ftrain owns them); each rank's output goes to its file
    under ``log_dir`` and, teed, to the console that ftrain reads. Several nodes: the
    deciding node serves the rendezvous store (``serve``, default: node 0's) at
    ``rdzv_endpoint`` (default: the spec's).
    """
    argv = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(spec.nproc_per_node),
            "--max-restarts", "0", "--monitor-interval", f"{monitor_interval:g}",
            "--log-dir", str(log_dir), "--redirects", "3", "--tee", "3"]
    if spec.multi_node:
        assert spec.rdzv_endpoint is not None
        serve = spec.leader if serve is None else serve
        argv += ["--nnodes", spec.nnodes_text, "--node-rank", str(spec.node_rank), "--rdzv-backend", "c10d",
                 "--rdzv-endpoint", rdzv_endpoint or spec.rdzv_endpoint, "--rdzv-id", rdzv_id,
                 # the deciding node serves the rendezvous store: no guessing from host names
                 # (on one machine every node's name would match the endpoint); an elastic job
                 # closes its rendezvous soon after MIN nodes joined, not after torchrun's 30 s
                 "--rdzv-conf", f"is_host={1 if serve else 0}"
                 + (f",last_call_timeout={LAST_CALL:g}" if spec.elastic else "")]
    else:
        argv += ["--standalone"]
    if len(command) >= 2 and command[0] == sys.executable and command[1].endswith(".py"):
        argv += list(command[1:])
    else:
        argv += ["--no-python", *command]
    return tuple(argv)


def parse_nnodes(value: int | str) -> tuple[int, int]:
    """``--nnodes`` as ``(MIN, MAX)``: ``N`` is ``(N, N)``, ``MIN:MAX`` as torchrun takes it."""
    text = str(value).strip()
    low, sep, high = text.partition(":")
    if not low.isdigit() or (sep and not high.isdigit()):
        raise UsageError(f"--nnodes {text!r}: expected N or MIN:MAX (whole numbers)")
    least, most = int(low), int(high) if sep else int(low)
    if least > most:
        raise UsageError(f"--nnodes {text}: MIN is above MAX")
    return least, most


# torchrun_command's own flags: those with a value, and those without
_VALUED = frozenset({"--nproc-per-node", "--max-restarts", "--monitor-interval", "--log-dir", "--redirects", "--tee",
                     "--nnodes", "--node-rank", "--rdzv-backend", "--rdzv-endpoint", "--rdzv-id", "--rdzv-conf"})
_BARE = frozenset({"--standalone"})


def split_command(command: Sequence[str]) -> tuple[tuple[str, ...], tuple[str, ...], int] | None:
    """A ``torchrun_command`` around a ``.py`` script, taken apart: (torchrun and its flags,
    the script and its arguments, ranks per node); None for any other command (a
    ``--no-python`` executable, a flag this module does not write)."""
    if tuple(command[:3]) != (sys.executable, "-m", "torch.distributed.run"):
        return None
    i, nproc = 3, 1
    while i < len(command) and command[i].startswith("--"):
        if command[i] in _VALUED and i + 1 < len(command):
            if command[i] == "--nproc-per-node":
                if not command[i + 1].isdigit():
                    return None
                nproc = int(command[i + 1])
            i += 2
        elif command[i] in _BARE:
            i += 1
        else:
            return None
    if i >= len(command) or not command[i].endswith(".py"):
        return None
    return tuple(command[:i]), tuple(command[i:]), nproc


def entry_command(command: Sequence[str], entry: str, name: str) -> tuple[str, ...]:
    """``command`` (a ``split_command`` one) with each rank run as ``PYTHON ENTRY NAME SCRIPT
    ARGS`` (``--no-python``): the entry hands the rank to the warm interpreter at ``name``."""
    split = split_command(command)
    if split is None:
        raise ValueError(f"not a torchrun command around a script: {list(command)[:4]}")
    head, script, _ = split
    return (*head, "--no-python", sys.executable, entry, name, *script)


# --------------------------------------------------------------------------- torchrun's report
@dataclass(frozen=True)
class ReportedFailure:
    """One failed rank as torchrun reported it: an entry of its report block (``Failures``,
    ``Root Cause``), or its agent's ``failed (exitcode: N)`` log line (``rank`` then unknown).

    ``error_file`` as printed (None for ``<N/A>``; it may be relative to torchrun's folder);
    ``traceback`` the entry's ``traceback :`` field, one line per line, de-indented.
    """

    rank: int | None
    local_rank: int | None
    exit_code: int
    pid: int | None
    error_file: str | None = None
    root: bool = False
    traceback: tuple[str, ...] = ()

    @property
    def summary(self) -> str:
        if self.rank is not None:
            who = f"rank {self.rank} (local_rank {self.local_rank})"
        else:
            who = f"local_rank {self.local_rank}" if self.local_rank is not None else "a rank"
        return f"torchrun root cause: {who} exitcode {self.exit_code} (pid {self.pid})"


_PREFIX = re.compile(r"^\[[A-Za-z_]+\d+\]:\s?")      # torchrun's per-rank console prefix, [default0]:
_ROOT_HEADER = "Root Cause (first observed failure):"
_ENTRY = re.compile(r"^\[\d+\]:\s*$")
_RANK = re.compile(r"^\s*rank\s*: (\d+) \(local_rank: (\d+)\)")
_EXIT = re.compile(r"^\s*exitcode\s*: (-?\d+) \(pid: (\d+)\)")
_ERROR_FILE = re.compile(r"^\s*error_file\s*: (.*?)\s*$")
_TRACE = re.compile(r"^\s*traceback\s*: ?(.*)$")
_AGENT_FAILED = re.compile(r"failed \(exitcode: (-?\d+)\) local_rank: (\d+) \(pid: (\d+)\) of binary:")


def parse_report(lines: Iterable[str]) -> list[ReportedFailure]:
    """The failed ranks of torchrun's last failure report in ``lines``, root cause first;
    [] when there is none.

    The report (torch's ``ChildFailedError``) is a block between ``=====`` borders with a
    ``Failures:`` and a ``Root Cause (first observed failure):`` section of ``[i]:`` entries;
    a ``traceback :`` field runs on over the lines indented below it. Console lines may
    carry a log prefix (``[default0]:``), which is ignored.
    """
    found: list[ReportedFailure] = []
    section: bool | None = None            # True: Root Cause, False: Failures, None: outside
    entry: dict[str, Any] | None = None

    def close() -> None:
        if entry is not None and "exit_code" in entry:
            found.append(ReportedFailure(entry["rank"], entry["local_rank"], entry["exit_code"], entry["pid"],
                                         entry.get("error_file"), root=entry["root"],
                                         traceback=tuple(entry.get("trace", ()))))

    for raw in lines:
        line = _PREFIX.sub("", raw.rstrip("\n"))
        structural = not line[:1].isspace()   # the traceback's own lines are indented
        if structural and _ROOT_HEADER in line:
            close()
            if any(f.root for f in found):   # a second report: the last one counts
                found.clear()
            section, entry = True, None
            continue
        if structural and line.strip() == "Failures:":
            close()
            found.clear()
            section, entry = False, None
            continue
        if section is None:
            continue
        if structural and (line.startswith("=====") or line.startswith("-----")):
            close()
            entry = None
            if line.startswith("====="):
                section = None
            continue
        if structural and _ENTRY.match(line):
            close()
            entry = {"root": section, "rank": None, "local_rank": None, "pid": None}
            continue
        if entry is None:
            continue
        if "trace" in entry:
            entry["trace"].append(line[2:] if line.startswith("  ") else line)
        elif m := _RANK.match(line):
            entry["rank"], entry["local_rank"] = int(m.group(1)), int(m.group(2))
        elif m := _EXIT.match(line):
            entry["exit_code"], entry["pid"] = int(m.group(1)), int(m.group(2))
        elif m := _ERROR_FILE.match(line):
            value = m.group(1)
            entry["error_file"] = None if value in ("", "<N/A>") else value
        elif m := _TRACE.match(line):
            entry["trace"] = [m.group(1)]
    close()
    found.sort(key=lambda f: not f.root)
    return found


def report_root(lines: Sequence[str]) -> ReportedFailure | None:
    """The root cause of torchrun's report, or, when the report fell out of the tail, the
    first rank its agent logged as ``failed (exitcode: N)``; None when neither is there."""
    reported = parse_report(lines)
    if reported and reported[0].root:
        return reported[0]
    if any(_ROOT_HEADER in line for line in lines):
        return None   # a report without a readable root entry: nothing to stand in for it
    for line in lines:
        if m := _AGENT_FAILED.search(line):
            return ReportedFailure(None, int(m.group(2)), int(m.group(1)), int(m.group(3)))
    return None


# --------------------------------------------------------------------------- the ranks' files
@dataclass(frozen=True)
class ErrorFile:
    """A torchelastic error file's ``message`` and its Python call stack (either may be None)."""

    message: str | None
    stack: str | None


def read_error_file(path: str | os.PathLike[str]) -> ErrorFile | None:
    """A torchelastic error file (``@record`` or the shim wrote it where
    ``TORCHELASTIC_ERROR_FILE`` points); None for one that is missing, not a regular file
    (a path from a child's output may name /dev/zero or a FIFO), over 1 MiB, or not one."""
    try:
        data = json.loads(read_bounded(path, ERROR_FILE_LIMIT).decode("utf-8", "replace"))
    except (OSError, ValueError, TypeError):
        return None
    message = data.get("message") if isinstance(data, dict) else None
    if isinstance(message, str):
        return ErrorFile(message, None)
    if isinstance(message, dict):
        extra = message.get("extraInfo")
        text = message.get("message")
        stack = extra.get("py_callstack") if isinstance(extra, dict) else None
        return ErrorFile(text if isinstance(text, str) else None, stack if isinstance(stack, str) else None)
    return None


def rank_folders(ranks_dir: Path) -> dict[int, Path]:
    """``local_rank → folder`` of torchrun's per-rank logs under an attempt's ``ranks/``."""
    found: dict[int, Path] = {}
    for folder in sorted(ranks_dir.glob("*/attempt_*/*")):
        if folder.is_dir() and folder.name.isdigit():
            found[int(folder.name)] = folder
    return found


def _tail(path: Path, inside: Path) -> list[str]:
    try:
        data = read_bounded(path, TAIL_BYTES, inside=inside, tail=True)
    except OSError:
        return []
    return data.decode("utf-8", "replace").splitlines()[-TAIL_LINES:]


def _mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except OSError:
        return None


def rank_reports(ranks_dir: Path, console: Sequence[str], *,
                 rank_of: Mapping[int, int] | None = None) -> tuple[RankReport, ...]:
    """How each failed rank of an attempt ended, by local rank.

    Sources: torchrun's report in ``console`` (exit codes, pids, the root flag) and each
    rank's folder under ``ranks_dir`` (``error.json``, ``stdout.log``, ``stderr.log``). A
    rank counts as failed when the report lists it or it wrote an error file. ``rank_of``
    maps local ranks to global ranks where the report does not say (several nodes).
    """
    reported = {r.local_rank: r for r in parse_report(console) if r.local_rank is not None}
    folders = rank_folders(ranks_dir)
    found: list[RankReport] = []
    for local in sorted(set(folders) | set(reported)):
        rep = reported.get(local)
        folder = folders.get(local)
        error_path = folder / "error.json" if folder is not None else None
        if rep is not None and rep.error_file and (error_path is None or not error_path.exists()):
            error_path = Path(rep.error_file)   # relative to torchrun's cwd, which may not be ours
        error = read_error_file(error_path) if error_path is not None else None
        message = error.message if error is not None else None
        if rep is None and message is None:
            continue          # this rank did not fail (or we cannot tell that it did)
        lines: list[str] = []
        if folder is not None:
            lines += _tail(folder / "stdout.log", ranks_dir) + _tail(folder / "stderr.log", ranks_dir)
        stack = error.stack if error is not None else None
        if stack and not any(message and message in line for line in lines):
            lines += stack.splitlines()
        times = [t for t in (_mtime(error_path) if message is not None and error_path is not None else None,
                             _mtime(folder / "stderr.log") if folder is not None else None) if t is not None]
        rank = rep.rank if rep is not None and rep.rank is not None else (rank_of or {}).get(local, local)
        found.append(RankReport(rank=rank, local_rank=local, pid=rep.pid if rep is not None else None,
                                exit_code=rep.exit_code if rep is not None else None, lines=tuple(lines),
                                message=message, t=min(times) if times else float("inf"),
                                root=rep.root if rep is not None else False,
                                folder=str(folder) if folder is not None else None))
    return tuple(found)
