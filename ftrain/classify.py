"""Turn how an attempt ended into one ``FailureKind``, with the lines that prove it.

The most specific evidence wins (DESIGN §5, FAILURES.md):

    text in the tail, in ``PATTERNS`` order   CUDA/ECC → OOM → NCCL → segfault → abort → preemption
      │ nothing matched
    death by signal                           SEGV/BUS → segfault, ABRT → aborted,
      │ not one of those                      KILL → host_oom (cgroup OOM kill) or killed, TERM → preempted
    a Python traceback                        → exception (its last ``Type: message`` line)
      │ none
    anything else non-zero                    → exit_nonzero

A stop that ftrain or the scheduler asked for turns an exit 0, a death by TERM/INT/USR2, or a
KILL after the grace period into ``preempted``, unless the tail shows a CUDA, OOM or NCCL
error. Under torchrun the report's root cause (the first rank to fail, its exit code or
signal, its error file) stands in for torchrun's own exit 1.

Pure and fast: no subprocess, no torch. The only I/O is reading a torchelastic error file
that the report names and, in ``read_oom_kill_count``, the cgroup's counter.
"""

from __future__ import annotations

import math
import re
import signal
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from ftrain.kinds import Failure, FailureKind, signal_name
from ftrain.outcome import AttemptOutcome, RankReport
from ftrain.torchrun import ReportedFailure, read_error_file, report_root

__all__ = ["PATTERNS", "Judgement", "Pattern", "RankVerdict", "classify", "classify_error_file", "failure_of",
           "judge", "rank_root", "read_oom_kill_count"]

MAX_EVIDENCE = 5      # lines kept per failure
MAX_LINE = 300        # characters kept per evidence line
PER_PATTERN = 2       # lines one pattern may contribute (eight ranks print the same timeout)

K = FailureKind


@dataclass(frozen=True)
class Pattern:
    """One piece of text evidence: seeing ``regex`` in the tail means ``kind``.

    ``needle`` is the literal text every match begins with: a plain substring test on it
    skips the regex for most tails (a 500-line tail is searched by every entry).
    """

    kind: FailureKind
    regex: re.Pattern[str]
    name: str
    needle: str


def _p(kind: FailureKind, name: str, regex: str) -> Pattern:
    return Pattern(kind, re.compile(regex, re.MULTILINE), name, _leading_literal(regex))


def _leading_literal(regex: str) -> str:
    """The literal prefix of ``regex``: characters up to the first operator, escapes undone,
    without a last character that a quantifier makes optional."""
    out: list[str] = []
    i = 0
    while i < len(regex):
        if regex[i] == "\\" and i + 1 < len(regex) and not regex[i + 1].isalnum():
            char, width = regex[i + 1], 2
        elif regex[i] in ".^$*+?{}[]()|\\":
            break
        else:
            char, width = regex[i], 1
        if regex[i + width:i + width + 1] in ("?", "*", "+", "{"):
            break
        out.append(char)
        i += width
    return "".join(out)


# Priority order: the first entry that matches anywhere in the tail decides the kind; the
# evidence is then every line matched by an entry of that kind, in table order.
PATTERNS: tuple[Pattern, ...] = (
    # CUDA's own out-of-memory codes, before the generic "CUDA error:" that they also match.
    _p(K.CUDA_OOM, "cuda_error_oom", r"CUDA (?:driver )?error: out of memory"),
    _p(K.CUDA_OOM, "cublas_alloc_failed", r"CUBLAS_STATUS_ALLOC_FAILED"),
    # CUDA/ECC: after an illegal access or an ECC error the context is dead.
    _p(K.CUDA_ERROR, "cuda_error", r"CUDA (?:driver )?error: "),
    _p(K.CUDA_ERROR, "triton_cuda_error", r"Triton Error \[CUDA\]: "),
    _p(K.CUDA_ERROR, "device_assert", r"block: \[\d+,\d+,\d+\], thread: \[\d+,\d+,\d+\] Assertion `"),
    _p(K.CUDA_ERROR, "cudnn_error", r"cuDNN (?:error: CUDNN_STATUS_[A-Z_]+|Frontend error: )"),
    _p(K.CUDA_ERROR, "nvrm_xid", r"NVRM: Xid \(PCI:[^)]*\): \d+,"),
    # Device OOM. Releases differ: "CUDA out of memory" (one spelt "capacty"), the
    # device-generic allocator's "Out of memory", XPU, MPS, and NCCL's own cudaMalloc.
    _p(K.CUDA_OOM, "cuda_alloc_oom", r"CUDA out of memory\. Tried to allocate"),
    _p(K.CUDA_OOM, "device_alloc_oom", r"Out of memory\. Tried to allocate \d[\d.]* \w+\. GPU \d+"),
    _p(K.CUDA_OOM, "xpu_alloc_oom", r"XPU out of memory\. Tried to allocate"),
    _p(K.CUDA_OOM, "mps_oom", r"MPS backend out of memory"),
    _p(K.CUDA_OOM, "torch_oom_error", r"torch\.(?:cuda\.)?OutOfMemoryError\b"),
    _p(K.CUDA_OOM, "nccl_cuda_oom", r"Cuda failure (?:\d+ )?'out of memory'"),
    # Host OOM.
    _p(K.HOST_OOM, "cpu_alloc", r"DefaultCPUAllocator: can't allocate memory"),
    _p(K.HOST_OOM, "memory_error",   # a traceback's last line, bare, after "[rankN]: ", or in torchrun's report
       r"MemoryError(?:(?<=^MemoryError)|(?<=\]: MemoryError)|(?<=^  MemoryError))(?::|$)"),
    _p(K.HOST_OOM, "numpy_memory_error", r"_ArrayMemoryError: Unable to allocate"),
    _p(K.HOST_OOM, "enomem", r"\[Errno 12\] Cannot allocate memory"),
    _p(K.HOST_OOM, "bad_alloc", r"std::bad_alloc"),
    _p(K.HOST_OOM, "dataloader_killed", r"DataLoader worker \(pid \d+\) is killed by signal: Killed\b"),
    _p(K.HOST_OOM, "kernel_oom_kill", r"ut of memory: Killed process \d+"),   # "Out of", "Memory cgroup out of"
    _p(K.HOST_OOM, "slurm_oom_kill", r"Detected \d+ oom[-_]kill event"),
    # NCCL / gloo / c10d.
    _p(K.NCCL_ERROR, "nccl_error_in", r"NCCL error in: \S+:\d+, "),
    _p(K.NCCL_ERROR, "nccl_result",
       r"nccl(?:UnhandledCudaError|SystemError|RemoteError|InternalError|InvalidArgument|InvalidUsage)\b"),
    _p(K.NCCL_ERROR, "nccl_watchdog_timeout", r"Watchdog caught collective operation timeout"),
    _p(K.NCCL_ERROR, "nccl_watchdog_stuck", r"ProcessGroupNCCL's watchdog got stuck for \d+ seconds"),
    _p(K.NCCL_ERROR, "nccl_heartbeat", r"Heartbeat monitor timed out"),
    _p(K.NCCL_ERROR, "nccl_comm_aborted", r"NCCL communicator was aborted"),
    _p(K.NCCL_ERROR, "gloo_timeout", r"Timed out waiting \d+ms for (?:recv|send) operation to complete"),
    _p(K.NCCL_ERROR, "gloo_peer_closed", r"Connection closed by peer \["),
    _p(K.NCCL_ERROR, "dist_error", r"torch\.distributed\.(?:DistBackendError|DistNetworkError|DistStoreError)\b"),
    # Crashes in native code, as faulthandler, a shell or the DataLoader report them.
    _p(K.SEGFAULT, "fatal_segv", r"Fatal Python error: (?:Segmentation fault|Bus error)"),
    # A shell's report of its child: "Segmentation fault (core dumped)", "bash: line 1: 42 Bus error  cmd".
    _p(K.SEGFAULT, "shell_segv", r"Segmentation fault(?:(?<=^Segmentation fault)|(?<=\d Segmentation fault))"),
    _p(K.SEGFAULT, "shell_bus_error", r"Bus error(?:(?<=^Bus error)|(?<=\d Bus error))"),
    _p(K.SEGFAULT, "dataloader_segv",
       r"DataLoader worker \(pid \d+\) is killed by signal: (?:Segmentation fault|Bus error)"),
    _p(K.SEGFAULT, "dataloader_worker_fault",
       r"ERROR: Unexpected (?:segmentation fault|bus error) encountered in worker"),
    _p(K.ABORTED, "fatal_abort", r"Fatal Python error: Aborted"),
    _p(K.ABORTED, "cxx_terminate", r"terminate called after throwing an instance of"),
    _p(K.ABORTED, "dataloader_abort", r"DataLoader worker \(pid \d+\) is killed by signal: Aborted"),
    # A divergence that the script's own code trips over before any metric shows it: sampling
    # from NaN logits (torch.multinomial), the perplexity of a diverged loss (math.exp; what
    # else of the math module overflows a float in a training script is rare).
    _p(K.NONFINITE, "multinomial_nonfinite", r"probability tensor contains either `inf`, `nan` or element < 0"),
    _p(K.NONFINITE, "math_overflow", r"OverflowError: math range error$"),
    # Preemption: the scheduler's word, or torchrun's agent passing on its SIGTERM.
    _p(K.PREEMPTED, "slurm_cancelled",
       r"\*\*\* (?:JOB|STEP) \S+ ON \S+ CANCELLED AT \S+ DUE TO (?:PREEMPTION|TIME LIMIT|NODE FAILURE)"),
    _p(K.PREEMPTED, "torchrun_sigterm", r"SignalException: Process \d+ got signal: (?:15|Signals\.SIGTERM|SIGTERM)\b"),
    _p(K.PREEMPTED, "torchelastic_death_signal", r"Received (?:15|Signals\.SIGTERM|SIGTERM) death signal"),
)

# Text that outweighs a requested stop: the job would have failed anyway.
_STRONG = frozenset({K.CUDA_OOM, K.HOST_OOM, K.CUDA_ERROR, K.NCCL_ERROR})
# Shells, Slurm, Docker and Kubernetes report a death by signal N as 128+N.
_SHELL_SIGNALS = {128 + s: s for s in (signal.SIGINT, signal.SIGABRT, signal.SIGBUS, signal.SIGKILL,
                                       signal.SIGSEGV, signal.SIGTERM)}
# Deaths a stop request explains: ftrain's TERM (or the shim's USR2), Ctrl-C, KILL after grace.
_STOP_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGUSR2, signal.SIGKILL})
_STOP_EXCEPTIONS = ("KeyboardInterrupt", "SystemExit", "SignalException")

_ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b[@-Z\\-_]")
_RANK_PREFIX = re.compile(r"^\[[A-Za-z_]*\d+\]:\s?")
_TRACEBACK = "Traceback (most recent call last):"
_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(?::|$)")


def classify(
    returncode: int | None,
    tail: Sequence[str],
    *,
    step: int | None = None,
    oom_killed: bool = False,
    stop_requested: bool = False,
) -> Failure | None:
    """Classify an ended attempt; None only for a clean success (exit 0, no stop asked).

    ``returncode`` as ``subprocess`` reports it (negative: died by that signal; 128+N from
    wrappers is read as signal N too). ``tail``: the last lines of the child's combined
    output. ``oom_killed``: the cgroup's OOM-kill count grew during the attempt.
    ``stop_requested``: ftrain or the scheduler asked the child to stop.
    """
    if returncode == 0 and not stop_requested:
        return None
    lines = _clean(tail)
    text = "\n".join(lines)
    root = report_root(lines) if "Root Cause" in text or "failed (exitcode" in text else None
    message = None
    if root is not None and root.error_file and root.error_file.startswith("/"):
        message = classify_error_file(root.error_file)
    if message:   # the failed rank's own words, should its output have left the tail
        lines = lines + message.splitlines()
        text = text + "\n" + message
    code = root.exit_code if root is not None else returncode
    sig = _signal_of(code)
    sig_name = _signal_name(code)
    died = _signal_line(code, sig_name, root) if sig_name else ""

    def failure(kind: FailureKind, *evidence: str) -> Failure:
        more = _root_lines(root) if root is not None else ()
        return Failure(kind, exit_code=returncode, signal=sig_name, step=step,
                       evidence=_finish([*evidence, *more]))

    found = _match_text(text)
    if found is not None and (found[0] in _STRONG or not stop_requested):
        return failure(found[0], *found[1], died)
    if sig is signal.SIGKILL and oom_killed:
        return failure(K.HOST_OOM, f"{died}; the cgroup recorded an OOM kill")
    if stop_requested and (code is None or code == 0 or sig in _STOP_SIGNALS):
        how = died or ("exit status unknown" if code is None else f"exit {code}")
        return failure(K.PREEMPTED, f"stopped on request; {how}", *(found[1] if found else ()))
    if found is not None:   # weak text (segfault, abort, preemption) while a stop was asked
        return failure(found[0], *found[1], died)
    if sig in (signal.SIGSEGV, signal.SIGBUS):
        return failure(K.SEGFAULT, died)
    if sig is signal.SIGABRT:
        return failure(K.ABORTED, died)
    if sig is signal.SIGKILL:
        return failure(K.KILLED, f"{died}; no OOM kill was recorded")
    if sig is signal.SIGTERM:
        return failure(K.PREEMPTED, died)
    exception = _exception(lines, root, message)
    if exception is not None:
        if stop_requested and _exception_type(exception[0]) in _STOP_EXCEPTIONS:
            return failure(K.PREEMPTED, f"stopped on request; exit {code}", *exception)
        return failure(K.EXCEPTION, *exception, died)
    if stop_requested:
        return failure(K.PREEMPTED, f"stopped on request; exit {code}")
    if root is not None:
        return failure(K.EXIT_NONZERO, died)
    last = next((line.strip() for line in reversed(lines) if line.strip(" =-")), "")
    return failure(K.EXIT_NONZERO, died or ("exit status unknown" if code is None else f"exit {code}"),
                   f"last output: {last}" if last else "")


@dataclass(frozen=True)
class Judgement:
    """An attempt's failure (None: it succeeded), and for agreeing among nodes whether it
    failed only as a consequence of another rank (``secondary``) and when (``t``, wall
    clock; None: unknown, take the time it was judged)."""

    failure: Failure | None
    secondary: bool = False
    t: float | None = None


def judge(outcome: AttemptOutcome) -> Judgement:
    """The one failure of an ended attempt, from its evidence (DESIGN §5). Pure.

    The rules, most specific evidence first:

    * an anomaly the attempt was stopped for is the failure (its exit follows from the stop);
    * an anomaly in what the script wrote before it ended on its own (read only after the
      exit: a late NaN) is the failure too, with how the script ended after it as evidence;
    * under torchrun, the root cause among the ranks (``rank_root``): the first rank that
      failed on its own, not those torchrun stopped or whose collective broke because of it;
    * else the exit and the output's tail (``classify``), an OOM kill counted only when it
      was not the waiting spare's;
    * an exit 0 while the last value of a watched metric is NaN/Inf is ``nonfinite``.
    """
    anomaly = outcome.anomaly
    if anomaly is not None and not outcome.anomaly_after_exit:
        return Judgement(anomaly.to_failure(exit_code=outcome.exit_code, signal=outcome.signal))
    oom_killed = outcome.oom_killed
    found: Failure | None = None
    secondary, t = False, None
    if outcome.ranks and outcome.exit_code != 0 and not outcome.interrupted:   # the ranks' TERMs are torchrun's
        verdict = rank_root(outcome.ranks, step=outcome.last_step, oom_killed=oom_killed, node=outcome.node)
        if verdict is not None:
            found, secondary = verdict.failure, verdict.secondary
            t = verdict.t if math.isfinite(verdict.t) else None
    if found is None:
        found = classify(outcome.exit_code, outcome.tail, step=outcome.last_step, oom_killed=oom_killed,
                         stop_requested=outcome.stop_requested or outcome.interrupted)
    if anomaly is not None:   # the anomaly came first; how the script ended follows it
        then = (f"then the script ended: {found.kind.value}", *found.evidence[:3]) if found else ()
        first = anomaly.to_failure(exit_code=outcome.exit_code, signal=outcome.signal)
        return Judgement(replace(first, evidence=(*first.evidence, *then)), secondary, t)
    if found is None:
        bad = [(m, v) for m, v in outcome.last_values.items() if isinstance(v, float) and not math.isfinite(v)]
        if bad:
            metric, value = bad[0]
            return Judgement(Failure(K.NONFINITE, exit_code=outcome.exit_code, step=outcome.last_step,
                                     evidence=(f"exit 0 but the last {metric} is {value}",)))
    return Judgement(found, secondary, t)


def failure_of(outcome: AttemptOutcome) -> Failure | None:
    """``judge(outcome).failure``: the attempt's one failure kind and its evidence."""
    return judge(outcome).failure


def classify_error_file(path: str | Path) -> str | None:
    """The message of a torchelastic per-rank error file (``@record`` writes it where
    ``TORCHELASTIC_ERROR_FILE`` points): ``"<Type>: <msg>"``, possibly several lines.

    None for a missing, unreadable, oversized or malformed file, or one that is not a
    regular file (read by ``torchrun.read_error_file``, bounded).
    """
    error = read_error_file(path)
    message = error.message.strip() if error is not None and error.message is not None else ""
    return message or None


def read_oom_kill_count(
    proc_cgroup: str | Path = "/proc/self/cgroup",
    cgroup_root: str | Path = "/sys/fs/cgroup",
) -> int | None:
    """This process's cgroup OOM-kill counter, or None when it cannot be read.

    cgroup v2: ``memory.events`` line ``oom_kill N`` (also under ``unified/`` on hybrid
    hosts); v1: ``memory/<path>/memory.oom_control`` line ``oom_kill N``. Inside a container
    the listed path may not exist below the mount, so the mount's own file is tried last.
    Sample it before and after an attempt: a grown count with a SIGKILL means host_oom.
    """
    root = Path(cgroup_root)
    try:
        entries = Path(proc_cgroup).read_text().splitlines()
    except (OSError, ValueError):
        return None
    candidates: list[Path] = []
    for entry in entries:
        parts = entry.split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy, controllers, path = parts
        rel = path.strip().lstrip("/")
        if hierarchy == "0" and controllers == "":
            for base in (root, root / "unified"):
                candidates += [base / rel / "memory.events", base / "memory.events"]
        elif "memory" in controllers.split(","):
            candidates += [root / "memory" / rel / "memory.oom_control", root / "memory" / "memory.oom_control"]
    for candidate in dict.fromkeys(candidates):
        count = _oom_kill_field(candidate)
        if count is not None:
            return count
    return None


# --------------------------------------------------------------------------- helpers
def _oom_kill_field(path: Path) -> int | None:
    try:
        text = path.read_text()
    except (OSError, ValueError):
        return None
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if key == "oom_kill":
            try:
                return int(value.strip())
            except ValueError:
                return None
    return None


def _clean(tail: Sequence[str]) -> list[str]:
    """The tail as lines without colour codes; a carriage return starts a new line (progress
    bars). One join and one split: a tail is hundreds of lines."""
    text = "\n".join(tail)
    if "\x00" in text:   # the DataLoader's C signal handler writes its message with the NUL
        text = text.replace("\x00", "")
    if "\x1b" in text:
        text = _ANSI.sub("", text)
    if "\r" in text:
        text = text.replace("\r", "\n")
    return text.split("\n")


def _match_text(text: str) -> tuple[FailureKind, list[str]] | None:
    """The kind of the first table entry seen in ``text`` and the lines that show it."""
    kind = next((p.kind for p in PATTERNS if p.needle in text and p.regex.search(text)), None)
    if kind is None:
        return None
    evidence: list[str] = []
    for pattern in PATTERNS:
        if pattern.kind is not kind:
            continue
        taken = 0
        for m in pattern.regex.finditer(text):
            start = text.rfind("\n", 0, m.start()) + 1
            end = text.find("\n", m.end())
            line = text[start:end if end >= 0 else len(text)]
            excerpt = _excerpt(line, m.start() - start)
            if excerpt not in evidence:
                evidence.append(excerpt)
                taken += 1
            if taken >= PER_PATTERN or len(evidence) >= MAX_EVIDENCE:
                break
        if len(evidence) >= MAX_EVIDENCE:
            break
    return kind, evidence


def _excerpt(line: str, at: int = 0) -> str:
    """At most MAX_LINE characters of ``line``, stripped, keeping the match at ``at`` in view."""
    at -= len(line) - len(line.lstrip())
    line = line.strip()
    if len(line) <= MAX_LINE:
        return line
    begin = 0 if at < MAX_LINE - 80 else at - 40
    return ("…" if begin else "") + line[begin:begin + MAX_LINE - 2].strip() + "…"


def _finish(evidence: list[str]) -> tuple[str, ...]:
    """Trimmed, non-empty, each once, at most MAX_EVIDENCE."""
    seen: dict[str, None] = {}
    for line in evidence:
        line = _excerpt(line)
        if line:
            seen.setdefault(line)
    return tuple(seen)[:MAX_EVIDENCE]


def _signal_of(code: int | None) -> signal.Signals | None:
    if code is None:
        return None
    if code < 0:
        try:
            return signal.Signals(-code)
        except ValueError:
            return None
    return _SHELL_SIGNALS.get(code)


def _signal_name(code: int | None) -> str | None:
    sig = _signal_of(code)
    if sig is not None:
        return sig.name
    return f"SIG{-code}" if code is not None and code < 0 else None


def _signal_line(code: int | None, name: str, root: ReportedFailure | None) -> str:
    where = ""
    if root is not None:
        where = ", rank " + (str(root.rank) if root.rank is not None else "?") + " under torchrun"
    return f"died by signal {name} (exit {code}{where})"


def _exception_type(line: str) -> str:
    """``ValueError`` of ``[rank0]: builtins.ValueError: boom``."""
    return _RANK_PREFIX.sub("", line).split(":", 1)[0].rsplit(".", 1)[-1]


def _root_lines(root: ReportedFailure) -> tuple[str, ...]:
    """What torchrun's report says of its root cause, as evidence: who, how, and the first
    line of its traceback when that is a message rather than a traceback's header."""
    first = root.traceback[0] if root.traceback else ""
    detail = (first,) if first and not first.startswith((_TRACEBACK, "To enable traceback")) else ()
    return (root.summary, *detail)


def _exception(lines: list[str], root: ReportedFailure | None, error_message: str | None) -> tuple[str, ...] | None:
    """The final ``Type: message`` line of the most telling traceback, with its innermost
    ``File`` line: torchrun's root cause (its report, else its error file) first, then the
    last one in the tail that is not torchrun's own ``ChildFailedError``."""
    if root is not None:
        found = _last_traceback(list(root.traceback))
        if found is None and error_message:
            found = (error_message.splitlines()[0],)
        if found is not None:
            return found
    found = _last_traceback(lines, skip="ChildFailedError")
    if found is None and root is None:   # the report fell out of the tail: better than nothing
        found = _last_traceback(lines)
    return found


def _last_traceback(lines: list[str], skip: str | None = None) -> tuple[str, ...] | None:
    """The last complete traceback's exception line (and innermost ``File`` line), skipping
    one whose exception type contains ``skip``. Frames are indented; anything else that
    does not look like ``Type: message`` (interleaved logging) is passed over."""
    for i in range(len(lines) - 1, -1, -1):
        if _TRACEBACK not in lines[i]:
            continue
        where: str | None = None
        for line in lines[i + 1:i + 400]:
            body = _RANK_PREFIX.sub("", line)
            if body[:1].isspace():
                if body.lstrip().startswith("File "):
                    where = body.strip()
                continue
            if _TRACEBACK in body:
                break
            if _EXCEPTION_LINE.match(body):
                if skip and skip in body.split(":", 1)[0]:
                    break
                return (line.strip(), where) if where else (line.strip(),)
    return None


# --------------------------------------------------------------------------- root cause among ranks
# Text of a collective that broke because a peer went away or stalled: a consequence, not a
# cause, as long as some rank failed on its own (FAILURES.md, gloo transport/tcp, NCCL).
PEER_LOSS = re.compile(
    r"Connection (?:closed|reset) by peer|Timed out waiting \d+ms for (?:recv|send) operation"
    r"|Watchdog caught collective operation timeout|ncclRemoteError|Broken pipe"
    r"|remote worker (?:crashing|hanging)|DistNetworkError|Socket Timeout|recvValue failed"
    r"|ProcessGroupGloo.*(?:timed out|Timeout)|Heartbeat monitor timed out"
)
# Kinds a peer's loss can show as; a rank's own OOM, CUDA error or segfault is never one.
_SECONDARY_KINDS = frozenset({K.NCCL_ERROR, K.EXCEPTION, K.EXIT_NONZERO, K.PREEMPTED, K.KILLED})
_TORCHRUN_STOPS = frozenset({-signal.SIGTERM, -signal.SIGKILL, -signal.SIGINT})


@dataclass(frozen=True)
class RankVerdict:
    """The root cause among a torchrun job's ranks: its ``failure``, whether even that rank
    failed only as a consequence (``secondary``: stopped by torchrun, or its collective broke
    when a peer went away, e.g. a node's ranks after another node's fault), and when it
    failed (``t``, wall clock; inf: unknown)."""

    failure: Failure
    secondary: bool
    t: float


def rank_root(reports: Sequence[RankReport], *, step: int | None, oom_killed: bool,
              node: int | None = None) -> RankVerdict | None:
    """The first rank that failed on its own, with the others named after it; None when no
    report shows a failure. Pure.

    Each rank is classified by its own lines (``classify``; an exit code torchrun did not
    report counts as 1, an OOM kill only for a rank that died by SIGKILL). A rank is a
    consequence when torchrun stopped it (TERM, INT, or KILL that was not the OOM killer's)
    or when a collective broke because a peer went away (``PEER_LOSS`` text, with a kind a
    peer's loss can show as). Order: own failures first, then the earliest, then the rank
    torchrun named as its root cause, then the lowest rank. ``node``: where, in the evidence.
    """
    judged: list[tuple[RankReport, int, Failure, bool]] = []
    for report in reports:
        code = report.exit_code if report.exit_code is not None else 1
        failure = classify(code, report.lines, step=step, oom_killed=oom_killed and code == -signal.SIGKILL)
        if failure is None:
            continue
        text = "\n".join(report.lines[-60:]) + "\n" + (report.message or "")
        secondary = (code in _TORCHRUN_STOPS and not (code == -signal.SIGKILL and oom_killed)) or (
            failure.kind in _SECONDARY_KINDS and PEER_LOSS.search(text) is not None)
        judged.append((report, code, failure, secondary))
    if not judged:
        return None
    judged.sort(key=lambda j: (j[3], j[0].t, not j[0].root, j[0].rank))
    first, code, failure, secondary = judged[0]
    where = f" on node {node}" if node is not None else ""
    lead = f"root cause: {_rank_label(first)}{where} failed first: {failure.kind.value}"
    how = failure.signal or f"exit {code}"
    others = [f"then {_rank_line(r, c, f)}" + (" [a consequence]" if s else "") for r, c, f, s in judged[1:]]
    logs = [f"logs: {first.folder}"] if first.folder is not None else []
    evidence = (f"{lead} ({how})", *failure.evidence, *others, *logs)
    return RankVerdict(Failure(failure.kind, exit_code=code, signal=signal_name(code),
                               step=step if step is not None else failure.step, evidence=evidence),
                       secondary, first.t)


def _rank_label(report: RankReport) -> str:
    pid = f", pid {report.pid}" if report.pid is not None else ""
    return f"rank {report.rank} (local_rank {report.local_rank}{pid})"


def _rank_line(report: RankReport, code: int, failure: Failure) -> str:
    how = failure.signal or f"exit {code}"
    head = failure.evidence[0] if failure.evidence else report.message or ""
    return f"{_rank_label(report)}: {failure.kind.value} ({how})" + (f" — {head}" if head else "")
