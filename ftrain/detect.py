"""Find anomalies in the metrics records: non-finite values, bounds, spikes, hangs; and
among torchrun's ranks, a straggler (``Stragglers``, fed from the ranks' heartbeats).

Cheap enough to run on every record the supervisor's loop takes (``ftrain.tail`` reads
them). ``Detectors`` turns records into at most one ``Anomaly`` each (``feed``) and watches the
  time since the last record (``check_hang``). What it watches is a ``DetectSpec``, built by
  ``policy`` from the ``detect:`` section (DESIGN §6).

The hang clock of one attempt, and the silence allowed in each state::

    start_attempt ─▶ STARTUP ──first step──▶ STEADY ──save_start──▶ SAVING
                     startup                 timeout ◀──save_end──  max(startup, timeout)

Any record of the current attempt is a heartbeat. A save stays SAVING until its
``save_end``, even while steps go on (the shim can save in the background, and the next
save waits for it without a line). The ``auto`` timeout is
``max(floor, factor × the longest step interval seen in steady state)``, leaving out the
interval before an attempt's first step and any interval that spans a save; until one
interval is known the startup allowance still applies. The learnt interval carries over
between attempts; the spike baselines and ``last_values`` do not (a restarted attempt may
begin again from a high loss).

This module never imports torch.
"""

from __future__ import annotations

import json
import math
import re
import time
from bisect import bisect_left, insort
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from math import isfinite
from typing import Any

from ftrain.kinds import Failure, FailureKind

__all__ = [
    "Anomaly",
    "DetectSpec",
    "Detectors",
    "HangSpec",
    "NonfiniteSpec",
    "SpikeSpec",
    "StragglerSpec",
    "Stragglers",
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


def _line(record: Mapping[str, Any]) -> str:
    return json.dumps(record, separators=(", ", ": "))


def _at(step: int | None) -> str:
    return f" at step {step}" if step is not None else ""


# ---------------------------------------------------------------------------------- spikes

MAD_SIGMA = 1.4826     # MAD × this estimates σ of normal noise
REL_FLOOR = 0.01       # the spread is taken as at least 1 % of the level (see _SpikeWatch)
MIN_BASELINE = 10      # never judge against fewer values than this
CEILING_SPAN = 20      # a ceiling covers window // this many values (see _SpikeWatch)
DIFF_SIGMA = MAD_SIGMA / math.sqrt(2.0)   # median |x[i] - x[i-1]| × this estimates σ of normal noise
RECENT = MIN_BASELINE  # values whose median is the recent level of the second rule


def _median(s: list[float]) -> float:
    n = len(s)
    h = n >> 1
    return s[h] if n & 1 else (s[h - 1] + s[h]) * 0.5


class _SpikeWatch:
    """Rolling robust baseline of one metric, and two rules that judge each value against it.

    * The *window* rule: more than ``zscore`` robust deviations (MAD) above the median of
      the last ``window`` values. It sees a level that creeps up over many steps.
    * The *recent* rule: more than ``zscore`` robust deviations of the step-to-step change
      (the median of ``|x[i] - x[i-1]|`` over the window, × ``DIFF_SIGMA``) above the recent
      level (the higher of the last value and the median of the last ``RECENT``). A trend
      does not widen that spread nor drag that level behind it, so a 1000× jump right after a
      steep early descent fires, which the window rule misses while the window still holds
      the descent (its MAD is then the descent's). Being the higher of two levels, and
      measured by the noise of single steps, it stays silent on clean noisy curves.

    A value is an outlier when either rule says so.

    Positive series are judged on a log scale: training-loss noise is multiplicative, and a
    linear MAD fires on the long upper tail of a 20 %-noisy loss in about one 5,000-step run
    in five, while a log scale does not (for small noise the two agree). A series that goes
    to 0 or below is judged linearly from then on, for the rest of the attempt. The spread
    is floored at ``REL_FLOOR`` of the level, so a flat series never fires on rounding noise
    and the smallest spike that can fire is about ``zscore`` % above the median.

    The window holds the raw values, kept sorted (bisect; an O(window) memmove per value):
    log is increasing, so one order serves both scales, and a log is taken only where a
    value is judged. Judging costs O(1) for the median and for a lower bound of the MAD —
    for any ``a``, ``b`` with ``b - a = ceil(n/2)`` and ``s[a] <= median <= s[b]``, fewer
    than half the values lie strictly between ``s[a]`` and ``s[b]``, so
    ``min(median - s[a], s[b] - median) <= MAD`` — and the exact MAD (O(window)) only for
    a value above that bound.

    Most values need no judging at all. Once the window is full each value swaps one out
    and one in, so after ``j`` values the ``i``-th smallest lies between the ``(i-j)``-th
    and the ``(i+j)``-th smallest of the window before them. ``_refresh`` uses that to set
    a *ceiling* that no threshold of the next ``k`` windows can be under (the lowest median
    they can have, plus ``zscore`` × the lowest spread by the bound above with ``a`` and
    ``b`` moved ``k`` places inwards); a value at or below it just joins the window. A value
    above the ceiling, and every value while the window fills or an outlier streak is open,
    is judged in full, so the alarms are exactly those of judging every value (the tests
    check this against a from-scratch implementation). With ``k = window / 20`` the
    ceiling of a 200-value window sits about 3.3 σ above the median of normal noise. The
    recent rule has a ceiling of its own, relative to the last value: the lowest spread of
    the next ``k`` windows (the step changes are a window too) times ``zscore`` above it.
    """

    __slots__ = ("spec", "window", "ready", "k", "recent", "log", "fifo", "sorted", "diffs", "seen",
                 "streak", "fast", "low", "ceiling", "jump", "judged")

    def __init__(self, spec: SpikeSpec) -> None:
        self.spec = spec
        self.window = spec.window
        self.ready = max(spec.warmup, min(MIN_BASELINE, spec.window))
        self.k = max(1, spec.window // CEILING_SPAN)
        self.recent = min(RECENT, spec.window)
        self.judged = 0        # values judged in full (not under a ceiling): what the per-line cost hangs on
        self.reset()

    def reset(self) -> None:
        self.log = True
        self.fifo: deque[float] = deque()
        self.sorted: list[float] = []
        self.diffs: list[float] = []   # step changes in the window, sorted: ratios ≥ 1 on a log scale, |a - b| else
        self.seen = 0
        self.streak: list[tuple[float, int | None, Mapping[str, Any], _Hit]] = []
        self.fast = 0          # values the current ceiling still covers
        self.low = 0.0         # and the range it covers: (low, ceiling]
        self.ceiling = 0.0
        self.jump = 0.0        # the recent rule's: a factor over the last value (log scale), else a step

    def observe(self, value: float, step: int | None, record: Mapping[str, Any]) -> Anomaly | None:
        fifo = self.fifo
        if not (self.fast and self.low < value <= self.ceiling and (
                value <= fifo[-1] * self.jump if self.log else value - fifo[-1] <= self.jump)):
            if not (self._refresh() and self.low < value <= self.ceiling and (   # a ceiling from this window
                    value <= fifo[-1] * self.jump if self.log else value - fifo[-1] <= self.jump)):
                return self._judge(value, step, record)
        # Under every threshold this window can have: it joins the window unjudged. The
        # window is full here, and ``seen`` no longer matters (it only counts to ``ready``).
        self.fast -= 1
        prev = fifo[-1]
        fifo.append(value)
        old = fifo.popleft()
        head = fifo[0]
        s, d = self.sorted, self.diffs
        del s[bisect_left(s, old)]
        insort(s, value)
        if self.log:
            del d[bisect_left(d, old / head if old > head else head / old)]
            insort(d, prev / value if prev > value else value / prev)
        else:
            del d[bisect_left(d, abs(old - head))]
            insort(d, abs(prev - value))
        return None

    def _judge(self, value: float, step: int | None, record: Mapping[str, Any]) -> Anomaly | None:
        """The rules themselves (class docstring): is ``value`` an outlier by either?"""
        self.fast = 0
        self.judged += 1
        if self.log and value <= 0.0:
            self._to_linear()
        if self.seen >= self.ready:
            hit = self._window_rule(value) or self._recent_rule(value)
            if hit is not None:
                return self._outlier(value, step, record, hit)
            self.streak.clear()
        self._add(value)
        return None

    def _window_rule(self, value: float) -> _Hit | None:
        s = self.sorted
        g = math.log if self.log else float   # the judging scale (float: as it is)
        n = len(s)
        h = n >> 1
        med = g(s[h]) if n & 1 else (g(s[h - 1]) + g(s[h])) * 0.5
        excess = g(value) - med
        if excess > 0.0:
            span = (n + 1) >> 1
            a = (n - span) >> 1
            mad_low = min(med - g(s[a]), g(s[a + span]) - med)
            zscore = self.spec.zscore
            if excess > zscore * self._scale(med, mad_low):
                scale = self._scale(med, self._mad(med))
                if excess > zscore * scale:
                    return _Hit(False, med, excess / scale)
        return None

    def _recent_rule(self, value: float) -> _Hit | None:
        d, fifo = self.diffs, self.fifo
        if not d:
            return None
        g = math.log if self.log else float
        n = len(d)
        h = n >> 1
        spread = DIFF_SIGMA * (g(d[h]) if n & 1 else (g(d[h - 1]) + g(d[h])) * 0.5)
        zscore = self.spec.zscore
        gv, last = g(value), g(fifo[-1])
        if gv - last <= zscore * max(spread, REL_FLOOR if self.log else 1e-12):
            return None   # the recent level is at least the last value, its floor at least this
        recent = sorted(fifo[i] for i in range(len(fifo) - self.recent, len(fifo)))
        r = len(recent)
        level = max(last, g(recent[r >> 1]) if r & 1 else (g(recent[(r >> 1) - 1]) + g(recent[r >> 1])) * 0.5)
        scale = max(spread, REL_FLOOR if self.log else REL_FLOOR * abs(level) + 1e-12)
        excess = gv - level
        return _Hit(True, level, excess / scale) if excess > zscore * scale else None

    def _add(self, value: float) -> None:
        s, fifo, d = self.sorted, self.fifo, self.diffs
        if fifo:
            prev = fifo[-1]
            insort(d, (prev / value if prev > value else value / prev) if self.log else abs(prev - value))
        fifo.append(value)
        if len(fifo) > self.window:
            old = fifo.popleft()
            del s[bisect_left(s, old)]
            head = fifo[0]
            del d[bisect_left(d, (old / head if old > head else head / old) if self.log else abs(old - head))]
        insort(s, value)
        self.seen += 1

    def _refresh(self) -> bool:
        """Set the ceiling for the next ``k`` values (class docstring); False where none applies:
        while the window fills, before ``ready`` and while an outlier streak is open."""
        s = self.sorted
        n = len(s)
        if n < self.window or self.seen < self.ready or self.streak:
            return False
        k = self.k
        g = math.log if self.log else float
        med_lo, med_hi = g(s[((n - 1) >> 1) - k]), g(s[(n >> 1) + k])
        span = (n + 1) >> 1
        a = (n - span) >> 1
        mad_low = max(0.0, min(med_lo - g(s[a + k]), g(s[a + span - k]) - med_hi))
        if self.log:
            floor = REL_FLOOR
        else:  # REL_FLOOR × the smallest |median| in [med_lo, med_hi]
            nearest = min(abs(med_lo), abs(med_hi)) if med_lo > 0.0 or med_hi < 0.0 else 0.0
            floor = REL_FLOOR * nearest + 1e-12
        allow = self.spec.zscore * max(MAD_SIGMA * mad_low, floor)
        top = med_lo + allow
        top -= 1e-9 * (abs(top) + allow) + 1e-12   # far above any rounding: the full rule decides there
        # The recent rule: its level is at least the last value, its spread at least this.
        d = self.diffs
        i = ((len(d) - 1) >> 1) - k
        step_low = DIFF_SIGMA * max(0.0, g(d[i])) if i >= 0 else 0.0
        jump = self.spec.zscore * max(step_low, REL_FLOOR if self.log else 0.0)
        jump -= 1e-9 * jump + 1e-12
        if self.log:
            try:
                self.ceiling = math.exp(top)
            except OverflowError:   # above every finite value
                self.ceiling = math.inf
            try:
                self.jump = math.exp(jump)
            except OverflowError:
                self.jump = math.inf
            self.low = 0.0
        else:
            self.ceiling, self.low = top, -math.inf
            self.jump = jump
        self.fast = k
        return True

    def _scale(self, med: float, mad: float) -> float:
        floor = REL_FLOOR if self.log else REL_FLOOR * abs(med) + 1e-12
        return max(MAD_SIGMA * mad, floor)

    def _mad(self, med: float) -> float:
        # |x - med| over a sorted list is a falling run then a rising one: sorted() merges them.
        g = math.log if self.log else float
        return _median(sorted([abs(g(v) - med) for v in self.sorted]))

    def _to_linear(self) -> None:
        self.log = False
        self.streak.clear()  # only values above a positive median count, and this one is not
        fifo = list(self.fifo)
        self.diffs = sorted(abs(b - a) for a, b in zip(fifo, fifo[1:]))

    def _outlier(self, value: float, step: int | None, record: Mapping[str, Any], hit: _Hit) -> Anomaly | None:
        """Count an outlier; fire after ``patience`` in a row.

        Outliers stay out of the window while they are counted (a broken streak leaves no
        trace); once they have fired they join it, so that under an ``ignore`` rule the
        baseline follows a lasting change of level instead of firing on every value.
        """
        self.streak.append((value, step, record, hit))
        if len(self.streak) < self.spec.patience:
            return None
        anomaly = self._fire()
        for fired in self.streak:
            self._add(fired[0])
        self.streak.clear()
        return anomaly

    def _fire(self) -> Anomaly:
        spec = self.spec
        value, step, _, hit = self.streak[-1]
        evidence = tuple(_line(r) for _, _, r, _ in self.streak)
        n = len(self.sorted)
        row = f", {spec.patience} values in a row" if spec.patience > 1 else ""
        limit = f"(limit {spec.zscore:g}{row})"
        level = math.exp(hit.level) if self.log else hit.level
        if hit.recent:
            of = (f"its recent level {level:.4g} (the higher of the last value and the median of the "
                  f"last {min(self.recent, n)} steps)")
            if self.log:
                reason = (f"{spec.metric} {value:.4g}{_at(step)} is {value / level:.3g}× {of}: {hit.z:.1f} "
                          f"robust deviations of its step-to-step change on a log scale {limit}")
            else:
                reason = (f"{spec.metric} {value:.4g}{_at(step)} is {hit.z:.1f} robust deviations of its "
                          f"step-to-step change above {of} {limit}")
        elif self.log:
            reason = (f"{spec.metric} {value:.4g}{_at(step)} is {value / level:.3g}× its median "
                      f"{level:.4g} over the last {n} steps: {hit.z:.1f} robust deviations on a log scale "
                      f"{limit}")
        else:
            reason = (f"{spec.metric} {value:.4g}{_at(step)} is {hit.z:.1f} robust deviations above its median "
                      f"{level:.4g} over the last {n} steps {limit}")
        return Anomaly(FailureKind.SPIKE, step, spec.metric, value, reason, evidence)


@dataclass(frozen=True)
class _Hit:
    """What made a value an outlier: which rule, the level (on the judging scale), the deviations."""

    recent: bool
    level: float
    z: float


# ---------------------------------------------------------------------------------- stragglers

class Stragglers:
    """Per-rank step times → a straggler score per rank, and a ``straggler`` anomaly.

    ``times`` maps each rank to its latest per-step times, newest last (what its heartbeat
    carries: the time in ``ftrain.timed()`` sections per step where the script marks them,
    else the time between two ``ftrain.log`` calls per step). A rank's level is the median
    of its last ``window`` times; its score is that level over the median of the *other*
    ranks' levels (with two ranks: over the other rank's), so 1.0 is "as fast as the rest"
    and a score at or above ``factor`` is a straggler. A median of many steps is what makes
    it *persistent*: one slow step (a checkpoint save, a page fault) moves it not at all;
    slower than the others in more than half of the window, it fires. Nothing is judged
    before every rank compared has a full window, nor with fewer than two ranks. Each rank
    fires once per attempt. Arithmetic on at most 64 numbers per rank, every half second.
    """

    def __init__(self, spec: StragglerSpec) -> None:
        self.spec = spec
        self.fired: set[int] = set()
        self.last: dict[int, float] = {}   # rank -> its latest score (shown, journaled)

    def start_attempt(self) -> None:
        self.fired.clear()
        self.last.clear()

    def levels(self, times: Mapping[int, Sequence[float]]) -> dict[int, float]:
        """``rank → median step time`` over the last ``window`` steps, for ranks with that many."""
        w = self.spec.window
        return {r: _median(sorted(ts[-w:])) for r, ts in times.items() if len(ts) >= w}

    def scores(self, times: Mapping[int, Sequence[float]]) -> dict[int, float]:
        """``rank → score``: its level over the median level of the other ranks."""
        levels = self.levels(times)
        if len(levels) < 2:
            return {}
        out: dict[int, float] = {}
        for r, level in levels.items():
            others = _median(sorted(v for q, v in levels.items() if q != r))
            out[r] = level / others if others > 0 else (math.inf if level > 0 else 1.0)
        return out

    def check(self, times: Mapping[int, Sequence[float]], step: int | None) -> Anomaly | None:
        """A ``straggler`` anomaly for the ranks newly at or above the factor; None otherwise."""
        scores = self.scores(times)
        self.last = scores
        factor = self.spec.factor
        slow = sorted((r for r, s in scores.items() if s >= factor and r not in self.fired),
                      key=lambda r: -scores[r])
        if not slow:
            return None
        self.fired.update(slow)
        levels = self.levels(times)
        worst = slow[0]
        others = _median(sorted(v for q, v in levels.items() if q != worst))
        names = ", ".join(str(r) for r in slow)
        reason = (f"rank {names} straggling: rank {worst}'s median step time {levels[worst]:.3g} s over its last "
                  f"{self.spec.window} steps is {scores[worst]:.2f}x the other ranks' {others:.3g} s "
                  f"(straggler factor {factor:g})")
        evidence = tuple(f"rank {r}: median step time {levels[r]:.3g} s, score {scores[r]:.2f}"
                         for r in sorted(levels))
        return Anomaly(FailureKind.STRAGGLER, step, "step_time", scores[worst], reason, evidence)


# ---------------------------------------------------------------------------------- detectors

_Judge = Callable[[float, int | None, Mapping[str, Any]], Anomaly | None]  # (value, step, record)


class _Watch:
    """Everything that looks at one metric."""

    __slots__ = ("name", "nonfinite", "bounds", "spikes")

    def __init__(self, name: str) -> None:
        self.name = name
        self.nonfinite = False
        self.bounds: list[ThresholdSpec] = []
        self.spikes: list[_SpikeWatch] = []

    def finite_judge(self) -> _Judge | None:
        """What judges a finite value: nothing, a lone spike watch, or ``check_finite``. Chosen
        once, so that ``Detectors.feed`` makes one call per value at most."""
        if not self.bounds and not self.spikes:
            return None
        if not self.bounds and len(self.spikes) == 1:
            return self.spikes[0].observe
        return self.check_finite

    def check_finite(self, v: float, step: int | None, record: Mapping[str, Any]) -> Anomaly | None:
        """The first anomaly a finite value shows: a bound, then a spike (every spike watch
        sees the value)."""
        found = self.check_bounds(v, step, record) if self.bounds else None
        for sw in self.spikes:
            spike = sw.observe(v, step, record)
            if found is None:
                found = spike
        return found

    def check_nonfinite(self, v: float, step: int | None, record: Mapping[str, Any]) -> Anomaly | None:
        """The anomaly a NaN or ±Inf shows: non-finite, else an infinite value past a bound.
        It never enters a spike window."""
        if self.nonfinite:
            return Anomaly(FailureKind.NONFINITE, step, self.name, v, f"{self.name} = {v}{_at(step)}",
                           (_line(record),))
        return self.check_bounds(v, step, record) if self.bounds and v == v else None

    def check_bounds(self, v: float, step: int | None, record: Mapping[str, Any]) -> Anomaly | None:
        for b in self.bounds:
            if b.max is not None and v > b.max:
                side = f"above its max {b.max:g}"
            elif b.min is not None and v < b.min:
                side = f"below its min {b.min:g}"
            else:
                continue
            return Anomaly(FailureKind.THRESHOLD, step, self.name, v,
                           f"{self.name} {v:.4g}{_at(step)} is {side}", (_line(record),))
        return None


class Detectors:
    """Runs a ``DetectSpec`` over the records of a run, one attempt at a time.

    ``feed`` every record as it is read and call ``check_hang`` on every poll; both return
    at most one ``Anomaly``. A hang fires once per silence. ``last_values`` holds the latest
    finite-or-not value of each watched metric in the current attempt (an exit 0 with a NaN
    there is ``nonfinite``). ``clock`` is injectable for tests.
    """

    def __init__(self, spec: DetectSpec, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.spec = spec
        self.last_values: dict[str, float] = {}
        self._clock = clock
        self._hang = spec.hang
        watches: dict[str, _Watch] = {}
        for name in spec.metrics:
            watches[name] = _Watch(name)
        if spec.nonfinite:
            for name in spec.nonfinite.metrics:
                watches[name].nonfinite = True
        for t in spec.thresholds:
            watches[t.metric].bounds.append(t)
        for sp in spec.spikes:
            watches[sp.metric].spikes.append(_SpikeWatch(sp))
        self._watches = tuple(watches.values())
        self._plan = tuple((w.name, w, w.finite_judge()) for w in self._watches)
        self._max_interval = -1.0                # learnt (-1: not yet); survives attempts
        self._attempt: int | None = None
        self._beat: float | None = None          # None: no attempt started, no record yet
        self._step_t: float | None = None        # None: no interval to learn from the next step
        self._last_step: int | None = None       # None: no step yet in this attempt
        self._last_record: Mapping[str, Any] | None = None
        self._saving = False
        self._save_step: int | None = None
        self._hang_fired = False

    # public --------------------------------------------------------------------------
    @property
    def spike_values_judged(self) -> int:
        """How many values the spike rules judged in full, over every metric: the rest joined
        their windows under a ceiling, at a fraction of the cost."""
        return sum(sw.judged for w in self._watches for sw in w.spikes)

    def start_attempt(self, now: float | None = None, *, attempt: int | None = None) -> None:
        """Reset what belongs to one attempt; with ``attempt``, records of others are ignored."""
        self._attempt = attempt
        self._beat = self._clock() if now is None else now
        self._step_t = self._last_step = self._last_record = None
        self._saving = self._hang_fired = False
        self._save_step = None
        self.last_values.clear()
        for w in self._watches:
            for sw in w.spikes:
                sw.reset()

    def feed(self, record: Mapping[str, Any], now: float | None = None) -> Anomaly | None:
        """Take one record: a heartbeat, and for a metric line the value detectors."""
        # The per-line path of the supervisor and of the ingest budget (DESIGN §9).
        get = record.get
        mine = self._attempt
        if mine is not None:
            attempt = get("attempt")
            if attempt != mine and attempt is not None:
                return None
        if now is None:
            now = self._clock()
        self._beat = now
        self._hang_fired = False
        self._last_record = record
        control = get("ftrain")
        if control is not None:
            if control == "save_start":
                step = get("step")
                self._saving = True
                self._step_t = None   # the interval that spans a save is not learnt
                self._save_step = step if type(step) is int else None
            elif control == "save_end":
                self._saving = False
            return None
        step = get("step")
        if type(step) is int:
            last_t = self._step_t
            if last_t is not None and now - last_t > self._max_interval:
                self._max_interval = now - last_t
            self._step_t = now
            self._last_step = step
        else:
            step = None
        found: Anomaly | None = None
        last = self.last_values
        for name, w, judge in self._plan:
            v = get(name)
            if type(v) is not float:
                if type(v) is not int:  # absent, bool, str, lists: not a value
                    continue
                v = float(v)
            last[name] = v
            if isfinite(v):
                if judge is None:
                    continue
                anomaly = judge(v, step, record)
            else:
                anomaly = w.check_nonfinite(v, step, record)
            if found is None:
                found = anomaly
        return found

    def check_hang(self, now: float | None = None) -> Anomaly | None:
        """A ``hang`` anomaly when nothing has arrived for longer than the current limit."""
        if self._hang is None or self._beat is None or self._hang_fired:
            return None
        if now is None:
            now = self._clock()
        silent = now - self._beat
        if silent <= self._limit():
            return None
        self._hang_fired = True
        return Anomaly(FailureKind.HANG, self._last_step, None, silent, self._hang_reason(silent),
                       (_line(self._last_record),) if self._last_record is not None else ())

    @property
    def hang_timeout(self) -> float:
        """The silence that counts as a hang right now (inf without a hang detector)."""
        return self._limit() if self._hang is not None else math.inf

    # internals -----------------------------------------------------------------------
    def _steady(self) -> float | None:
        """The steady-state timeout, or None while nothing is known to base it on."""
        h = self._hang
        assert h is not None
        if h.timeout is not None:
            return h.timeout
        if self._max_interval < 0.0:
            return None
        return max(h.floor, h.factor * self._max_interval)

    def _limit(self) -> float:
        h = self._hang
        assert h is not None
        steady = self._steady()
        if self._saving or self._last_step is None or steady is None:
            return max(h.startup, steady or 0.0)
        return steady

    def _hang_reason(self, silent: float) -> str:
        h = self._hang
        assert h is not None
        limit = self._limit()
        if self._saving:
            return (f"nothing new for {silent:.1f} s while the checkpoint save{_at(self._save_step)} "
                    f"is in flight (allowance {limit:.1f} s)")
        if self._last_step is None:
            return f"no step yet and nothing new for {silent:.1f} s (startup allowance {limit:.1f} s)"
        head = f"no new step for {silent:.1f} s after step {self._last_step}"
        if h.timeout is not None:
            return f"{head} (timeout {limit:.1f} s)"
        if self._max_interval < 0.0:
            return f"{head} (startup allowance {limit:.1f} s: no step interval learnt yet)"
        if limit == h.floor:
            return f"{head} (timeout {limit:.1f} s, the floor; max step interval {self._max_interval:.1f} s)"
        learnt = f"learnt from a {self._max_interval:.1f} s max step interval × {h.factor:g}"
        return f"{head} (timeout {limit:.1f} s, {learnt})"
