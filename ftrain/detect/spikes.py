"""The spike rule: a rolling robust baseline of one metric, and each value judged against it."""

from __future__ import annotations

import math
from bisect import bisect_left, insort
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ftrain.detect.spec import Anomaly, SpikeSpec, at_step, line_of
from ftrain.kinds import FailureKind

# ---------------------------------------------------------------------------------- spikes

MAD_SIGMA = 1.4826     # MAD × this estimates σ of normal noise
REL_FLOOR = 0.01       # the spread is taken as at least 1 % of the level (see SpikeWatch)
MIN_BASELINE = 10      # never judge against fewer values than this
CEILING_SPAN = 20      # a ceiling covers window // this many values (see SpikeWatch)
DIFF_SIGMA = MAD_SIGMA / math.sqrt(2.0)   # median |x[i] - x[i-1]| × this estimates σ of normal noise
RECENT = MIN_BASELINE  # values whose median is the recent level of the second rule


def median(s: list[float]) -> float:
    n = len(s)
    h = n >> 1
    return s[h] if n & 1 else (s[h - 1] + s[h]) * 0.5


class SpikeWatch:
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
        return median(sorted([abs(g(v) - med) for v in self.sorted]))

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
        evidence = tuple(line_of(r) for _, _, r, _ in self.streak)
        n = len(self.sorted)
        row = f", {spec.patience} values in a row" if spec.patience > 1 else ""
        limit = f"(limit {spec.zscore:g}{row})"
        level = math.exp(hit.level) if self.log else hit.level
        if hit.recent:
            of = (f"its recent level {level:.4g} (the higher of the last value and the median of the "
                  f"last {min(self.recent, n)} steps)")
            if self.log:
                reason = (f"{spec.metric} {value:.4g}{at_step(step)} is {value / level:.3g}× {of}: {hit.z:.1f} "
                          f"robust deviations of its step-to-step change on a log scale {limit}")
            else:
                reason = (f"{spec.metric} {value:.4g}{at_step(step)} is {hit.z:.1f} robust deviations of its "
                          f"step-to-step change above {of} {limit}")
        elif self.log:
            reason = (f"{spec.metric} {value:.4g}{at_step(step)} is {value / level:.3g}× its median "
                      f"{level:.4g} over the last {n} steps: {hit.z:.1f} robust deviations on a log scale "
                      f"{limit}")
        else:
            reason = (f"{spec.metric} {value:.4g}{at_step(step)} is {hit.z:.1f} robust deviations above its median "
                      f"{level:.4g} over the last {n} steps {limit}")
        return Anomaly(FailureKind.SPIKE, step, spec.metric, value, reason, evidence)


@dataclass(frozen=True)
class _Hit:
    """What made a value an outlier: which rule, the level (on the judging scale), the deviations."""

    recent: bool
    level: float
    z: float


