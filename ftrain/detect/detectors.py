"""``Detectors``: every watch of a ``DetectSpec`` run over the records of a run."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from math import isfinite
from typing import Any

from ftrain.detect.spec import Anomaly, DetectSpec, ThresholdSpec, at_step, line_of
from ftrain.detect.spikes import SpikeWatch
from ftrain.kinds import FailureKind

# ---------------------------------------------------------------------------------- detectors

_Judge = Callable[[float, int | None, Mapping[str, Any]], Anomaly | None]  # (value, step, record)


class _Watch:
    """Everything that looks at one metric."""

    __slots__ = ("name", "nonfinite", "bounds", "spikes")

    def __init__(self, name: str) -> None:
        self.name = name
        self.nonfinite = False
        self.bounds: list[ThresholdSpec] = []
        self.spikes: list[SpikeWatch] = []

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
            return Anomaly(FailureKind.NONFINITE, step, self.name, v, f"{self.name} = {v}{at_step(step)}",
                           (line_of(record),))
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
                           f"{self.name} {v:.4g}{at_step(step)} is {side}", (line_of(record),))
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
            watches[sp.metric].spikes.append(SpikeWatch(sp))
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
                       (line_of(self._last_record),) if self._last_record is not None else ())

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
            return (f"nothing new for {silent:.1f} s while the checkpoint save{at_step(self._save_step)} "
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
