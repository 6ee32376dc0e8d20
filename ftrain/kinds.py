"""The values that cross module boundaries: failure kinds and the failure record.

A ``Failure`` is what ``classify`` makes of an ended attempt (or what ``watch`` makes of an
anomaly); ``policy.decide`` turns it into a ``Decision``. Both are plain frozen values, so
the decision logic is tested without spawning anything.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any


class FailureKind(str, enum.Enum):
    """Why an attempt ended. Exactly one per ended attempt; the strings are public (DESIGN §5)."""

    CUDA_OOM = "cuda_oom"
    HOST_OOM = "host_oom"
    CUDA_ERROR = "cuda_error"
    NCCL_ERROR = "nccl_error"
    SEGFAULT = "segfault"
    ABORTED = "aborted"
    KILLED = "killed"
    PREEMPTED = "preempted"
    HANG = "hang"
    NONFINITE = "nonfinite"
    THRESHOLD = "threshold"
    SPIKE = "spike"
    STRAGGLER = "straggler"
    EXCEPTION = "exception"
    NO_PROGRESS = "no_progress"
    EXIT_NONZERO = "exit_nonzero"

    def __str__(self) -> str:
        return self.value

    @property
    def is_anomaly(self) -> bool:
        """Kinds found in the metrics stream rather than in how the process ended."""
        return self in ANOMALY_KINDS


ANOMALY_KINDS = frozenset(
    {FailureKind.NONFINITE, FailureKind.THRESHOLD, FailureKind.SPIKE, FailureKind.HANG, FailureKind.STRAGGLER}
)


@dataclass(frozen=True)
class Failure:
    """One ended attempt, classified.

    ``exit_code`` is the child's return code as ``subprocess`` reports it (negative for a
    death by signal) or None if unknown; ``signal`` the signal name (``"SIGSEGV"``) when it
    died by one; ``step`` the last step seen in the metrics; ``evidence`` the lines that
    proved the kind, most telling first.
    """

    kind: FailureKind
    exit_code: int | None = None
    signal: str | None = None
    step: int | None = None
    evidence: tuple[str, ...] = field(default_factory=tuple)

    def to_json(self) -> dict[str, object]:
        return {
            "kind": self.kind.value,
            "exit_code": self.exit_code,
            "signal": self.signal,
            "step": self.step,
            "evidence": list(self.evidence),
        }

    @classmethod
    def from_json(cls, data: Any) -> Failure:
        """The failure ``to_json`` wrote; ``ValueError`` naming the field on bad content."""
        if not isinstance(data, dict):
            raise ValueError(f"failure: expected an object, got {data!r}"[:200])
        try:
            kind = FailureKind(data.get("kind"))
        except ValueError:
            raise ValueError(f"kind: not a failure kind: {data.get('kind')!r}"[:200]) from None
        code, sig, step, evidence = (data.get(k) for k in ("exit_code", "signal", "step", "evidence"))
        if code is not None and type(code) is not int:
            raise ValueError(f"exit_code: expected an integer, got {code!r}"[:200])
        if sig is not None and not isinstance(sig, str):
            raise ValueError(f"signal: expected a string, got {sig!r}"[:200])
        if step is not None and type(step) is not int:
            raise ValueError(f"step: expected an integer, got {step!r}"[:200])
        if evidence is None:
            evidence = []
        if not isinstance(evidence, list) or not all(isinstance(e, str) for e in evidence):
            raise ValueError(f"evidence: expected a list of strings, got {evidence!r}"[:200])
        return cls(kind, exit_code=code, signal=sig, step=step, evidence=tuple(evidence))


def signal_name(code: int | None) -> str | None:
    """``"SIGSEGV"`` for a return code of a death by signal (``-11``), else None."""
    import signal

    if code is None or code >= 0:
        return None
    try:
        return signal.Signals(-code).name
    except ValueError:
        return f"SIG{-code}"
