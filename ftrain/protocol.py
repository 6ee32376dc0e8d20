"""The wire between a training script and the supervisor: names both sides must agree on.

The shim writes control lines into the metrics stream (``{"ftrain": <Control>, ...}``) and
reads step windows from ``FTRAIN_SKIP_STEPS``; the supervisor reads and writes the same.
This module is their one home. It imports only the standard library (``enum``, which ``re``
and ``json`` load anyway), so the shim can use it and ``import ftrain`` stays cheap.
"""

from __future__ import annotations

import enum

TYPE_CHECKING = False   # typing costs milliseconds at import; annotations stay strings
if TYPE_CHECKING:
    from collections.abc import Iterable

__all__ = ["Control", "RESERVED_METRICS", "format_skip", "parse_skip"]


class Control(str, enum.Enum):
    """The events of control lines, the value of their ``"ftrain"`` key.

    config          the script called ``ftrain.config()``; ``digest`` of what it got
    stop_requested  a stop signal reached the shim's handler (``signal``, ``cooperative``)
    inject          a rehearsed fault fires now (``fault``, ``at``)
    save_start      a checkpoint save began (``path``, ``blocking``)
    save_end        it ended (``path`` None when it failed, ``error``)
    """

    CONFIG = "config"
    STOP_REQUESTED = "stop_requested"
    INJECT = "inject"
    SAVE_START = "save_start"
    SAVE_END = "save_end"

    def __str__(self) -> str:
        return self.value


# Keys of a metrics line that are not metrics: the shim refuses them as metric names, and
# the ``script:`` adapter refuses them as regex group names ("step" is a line's own key).
RESERVED_METRICS = frozenset({"t", "attempt", "rank", "ftrain"})


def parse_skip(spec: str | None, *, what: str = "FTRAIN_SKIP_STEPS") -> tuple[tuple[int, int], ...]:
    """``"1200-1399,5000"`` → ``((1200, 1399), (5000, 5000))``, sorted; ``ValueError`` naming
    ``what`` and the bad item on anything else."""
    if not spec:
        return ()
    ranges: list[tuple[int, int]] = []
    for raw in str(spec).split(","):
        item = raw.strip()
        lo_text, _, hi_text = item.partition("-")
        lo_text, hi_text = lo_text.strip(), (hi_text or lo_text).strip()
        if not (lo_text.isascii() and lo_text.isdigit() and hi_text.isascii() and hi_text.isdigit()) \
                or len(lo_text) > 18 or len(hi_text) > 18:
            raise ValueError(f"{what}={spec!r}: {item!r} is not a step or a range a-b")
        lo, hi = int(lo_text), int(hi_text)
        if hi < lo:
            raise ValueError(f"{what}={spec!r}: range {item!r} ends before it starts")
        ranges.append((lo, hi))
    return tuple(sorted(ranges))


def format_skip(windows: Iterable[tuple[int, int]]) -> str:
    """The text of step windows (``[(1200, 1399)]`` → ``"1200-1399"``); ``parse_skip`` reads it back."""
    return ",".join(f"{a}-{b}" for a, b in windows)
