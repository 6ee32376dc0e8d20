"""What the detectors watch (the ``detect:`` section, as values) and what they report
(``Anomaly``)."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ftrain.kinds import Failure, FailureKind

__all__ = [
    "STEP_TIMES",
    "Anomaly",
    "DetectSpec",
    "HangSpec",
    "NonfiniteSpec",
    "SpikeSpec",
    "StragglerSpec",
    "ThresholdSpec",
    "parse_duration",
]

Record = dict[str, Any]

# ---------------------------------------------------------------------------------- durations

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|h)?\s*\Z")


def parse_duration(text: str | int | float) -> float:
    """Seconds from ``"500ms"``, ``"2s"``, ``"10m"``, ``"1h"`` or a plain number of seconds."""
    if isinstance(text, bool):
        raise ValueError(f"{text!r} is not a duration: use seconds or a number with ms, s, m or h")
    if isinstance(text, (int, float)):
        if not math.isfinite(text) or text < 0:
            raise ValueError(f"{text!r} is not a duration: it must be a finite number of seconds, "
                             "at least 0")
        return float(text)
    if not isinstance(text, str):
        raise ValueError(f"{text!r} is not a duration: use seconds or a number with ms, s, m or h")
    match = _DURATION.match(text)
    if match is None:
        raise ValueError(f"{text!r} is not a duration: use seconds or a number with ms, s, m or h "
                         "(500ms, 2s, 10m, 1h)")
    return float(match.group(1)) * _UNITS[match.group(2) or "s"]


# ---------------------------------------------------------------------------------- specs

@dataclass(frozen=True)
class NonfiniteSpec:
    """NaN or ±Inf in any of these metrics is an anomaly."""

    metrics: tuple[str, ...]


@dataclass(frozen=True)
class ThresholdSpec:
    """The metric must stay within [min, max]; either bound may be absent."""

    metric: str
    min: float | None = None
    max: float | None = None

    def __post_init__(self) -> None:
        if self.min is None and self.max is None:
            raise ValueError(f"threshold on {self.metric}: needs min or max")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"threshold on {self.metric}: min {self.min} is above max {self.max}")


@dataclass(frozen=True)
class SpikeSpec:
    """A value more than ``zscore`` robust deviations above the rolling median of ``window``.

    Fires after ``warmup`` values of the attempt (and never on fewer than 10), when
    ``patience`` values in a row are outliers. Upward only: a falling loss is good.
    """

    metric: str
    window: int = 200
    zscore: float = 6.0
    warmup: int = 50
    patience: int = 1

    def __post_init__(self) -> None:
        if self.window < 5 or self.warmup < 0 or self.patience < 1 or not self.zscore >= 0:
            raise ValueError(f"spike on {self.metric}: needs window >= 5, warmup >= 0, patience >= 1, "
                             f"zscore >= 0 (got {self.window}, {self.warmup}, {self.patience}, "
                             f"{self.zscore})")


@dataclass(frozen=True)
class HangSpec:
    """No record for longer than the timeout is a hang.

    ``timeout`` None is ``auto``: ``max(floor, factor × the longest steady step interval)``.
    ``startup`` applies before an attempt's first step, while nothing has been learnt, and
    while a checkpoint save is in flight (with an explicit timeout, the larger of the two).
    """

    timeout: float | None = None
    startup: float = 600.0
    floor: float = 60.0
    factor: float = 5.0

    def __post_init__(self) -> None:
        if self.timeout is not None and not self.timeout > 0:
            raise ValueError(f"hang timeout must be above 0 s, not {self.timeout}")
        if not (self.startup > 0 and self.floor >= 0 and self.factor >= 1):
            raise ValueError(f"hang: needs startup > 0, floor >= 0, factor >= 1 "
                             f"(got {self.startup}, {self.floor}, {self.factor})")


STEP_TIMES = 64   # the most per-step times a rank's heartbeat carries (ftrain.shim.metrics)


@dataclass(frozen=True)
class StragglerSpec:
    """A rank whose median step time over its last ``window`` steps is at least ``factor``
    times the median of the other ranks' medians is a straggler (torchrun jobs only)."""

    factor: float = 1.5
    window: int = 20

    def __post_init__(self) -> None:
        if not (self.factor > 1 and math.isfinite(self.factor)) or not 3 <= self.window <= STEP_TIMES:
            raise ValueError(f"straggler: needs factor > 1 and window in 3..{STEP_TIMES} "
                             f"(got {self.factor}, {self.window})")


@dataclass(frozen=True)
class DetectSpec:
    """All the detectors of a run: the ``detect:`` section of a policy, parsed."""

    nonfinite: NonfiniteSpec | None = None
    thresholds: tuple[ThresholdSpec, ...] = ()
    spikes: tuple[SpikeSpec, ...] = ()
    hang: HangSpec | None = None
    straggler: StragglerSpec | None = None

    @classmethod
    def default(cls) -> DetectSpec:
        """DESIGN §6 without the fixed bound.

        No threshold by default: a sensible bound depends on the loss (``loss > 1000`` never
        fires for a cross-entropy and is normal for a summed regression loss); the spike
        detector covers blow-ups relative to the run's own level.
        """
        return cls(
            nonfinite=NonfiniteSpec(("loss", "grad_norm")),
            thresholds=(),
            spikes=(SpikeSpec("loss", window=200, zscore=6.0, warmup=50, patience=1),),
            hang=HangSpec(timeout=None, startup=600.0, floor=60.0, factor=5.0),
            straggler=StragglerSpec(factor=1.5, window=20),
        )

    @property
    def metrics(self) -> tuple[str, ...]:
        """Every metric some detector watches, in first-mention order."""
        names = list(self.nonfinite.metrics if self.nonfinite else ())
        names += [t.metric for t in self.thresholds] + [s.metric for s in self.spikes]
        return tuple(dict.fromkeys(names))


# ---------------------------------------------------------------------------------- anomalies

@dataclass(frozen=True)
class Anomaly:
    """One thing a detector saw: the kind, where, a reason in words and the raw lines.

    ``value`` is the metric's value, or for a hang the seconds of silence.
    """

    kind: FailureKind
    step: int | None
    metric: str | None
    value: float | None
    reason: str
    evidence: tuple[str, ...] = field(default_factory=tuple)

    def to_failure(self, exit_code: int | None = None, signal: str | None = None) -> Failure:
        """The attempt's failure record: the reason first, then the lines that fired."""
        return Failure(self.kind, exit_code=exit_code, signal=signal, step=self.step,
                       evidence=(self.reason, *self.evidence))


def line_of(record: Mapping[str, Any]) -> str:
    return json.dumps(record, separators=(", ", ": "))


def at_step(step: int | None) -> str:
    return f" at step {step}" if step is not None else ""


