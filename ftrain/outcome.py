"""What one attempt showed, as values: the input of ``classify.failure_of``.

The attempt loop gathers an ``AttemptOutcome`` when an attempt has ended (its exit, the
anomaly it was stopped for, its output's tail, the ranks' reports under torchrun, the OOM
killer's count); everything that merges that evidence into one failure kind is a pure
function of it, in ``classify``. Nothing here touches a process or a file.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from ftrain.detect import Anomaly

__all__ = ["AttemptOutcome", "RankReport"]


@dataclass(frozen=True)
class RankReport:
    """How one rank of a torchrun job ended, as its files and torchrun's report tell.

    ``exit_code`` as torchrun reported it (negative: a signal; None: not reported, e.g. a
    rank that wrote an error file but was not listed); ``lines`` the tail of its stdout and
    stderr logs (and its error file's call stack); ``message`` its error file's message;
    ``t`` when it failed (wall clock: its error file's or stderr's last write; inf unknown);
    ``root`` torchrun named it the root cause; ``folder`` where its logs are.
    """

    rank: int
    local_rank: int
    pid: int | None
    exit_code: int | None
    lines: tuple[str, ...] = ()
    message: str | None = None
    t: float = float("inf")
    root: bool = False
    folder: str | None = None


@dataclass(frozen=True)
class AttemptOutcome:
    """One ended attempt, everything its failure is judged from.

    ``anomaly``: what the attempt was stopped for (or, with ``anomaly_after_exit``, what the
    metrics it wrote before it ended said, read only after the exit); ``oom_kills``: how
    much the OOM killer's count grew while it ran (None: unknown); ``spare_oom_killed``: the
    waiting warm spare was one of those kills (not the attempt's own); ``stop_requested``:
    the script's shim took a stop signal; ``interrupted``: ftrain itself asked it to stop
    (SIGINT/SIGTERM to ftrain); ``last_values``: the last value of each watched metric;
    ``ranks``: the failed ranks' reports under torchrun (empty otherwise); ``node``: this
    node's rank in a job of several machines (None on one).
    """

    exit_code: int | None
    signal: str | None = None
    tail: tuple[str, ...] = ()
    anomaly: Anomaly | None = None
    anomaly_after_exit: bool = False
    oom_kills: int | None = None
    spare_oom_killed: bool = False
    stop_requested: bool = False
    interrupted: bool = False
    last_step: int | None = None
    last_values: Mapping[str, float] = field(default_factory=dict)
    ranks: tuple[RankReport, ...] = ()
    distributed: bool = False
    node: int | None = None

    @property
    def oom_killed(self) -> bool:
        """The OOM killer took a process of this attempt (not only the waiting spare)."""
        return self.oom_kills is not None and self.oom_kills > int(self.spare_oom_killed)
