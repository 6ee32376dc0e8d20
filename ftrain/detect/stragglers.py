"""Stragglers among torchrun's ranks: a score per rank from its heartbeat's step times."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from ftrain.detect.spec import Anomaly, StragglerSpec
from ftrain.detect.spikes import median
from ftrain.kinds import FailureKind

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
        return {r: median(sorted(ts[-w:])) for r, ts in times.items() if len(ts) >= w}

    def scores(self, times: Mapping[int, Sequence[float]]) -> dict[int, float]:
        """``rank → score``: its level over the median level of the other ranks."""
        levels = self.levels(times)
        if len(levels) < 2:
            return {}
        out: dict[int, float] = {}
        for r, level in levels.items():
            others = median(sorted(v for q, v in levels.items() if q != r))
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
        others = median(sorted(v for q, v in levels.items() if q != worst))
        names = ", ".join(str(r) for r in slow)
        reason = (f"rank {names} straggling: rank {worst}'s median step time {levels[worst]:.3g} s over its last "
                  f"{self.spec.window} steps is {scores[worst]:.2f}x the other ranks' {others:.3g} s "
                  f"(straggler factor {factor:g})")
        evidence = tuple(f"rank {r}: median step time {levels[r]:.3g} s, score {scores[r]:.2f}"
                         for r in sorted(levels))
        return Anomaly(FailureKind.STRAGGLER, step, "step_time", scores[worst], reason, evidence)


