"""Where an attempt's metrics arrive, and what the loop makes of them as they do.

How the script talks is one of two ``Talk``s, chosen once where the run is built:
``ShimTalk`` follows the metrics stream the shim appends to (``ftrain.tail``);
``OutputTalk`` reads the ``script:`` adapter's metrics from the script's own output lines,
as the process layer hands them over, appends them to ``metrics.jsonl`` for the record
(``inspect``, ``--plot``), and gives them straight to the intake — never read back.

``Intake`` takes each batch of records: the attempt's own view (``AttemptWatch``: steps,
saves, stop requests, fired faults), the listeners (TensorBoard), the detectors; it
returns the first anomaly that must stop the attempt.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ftrain.detect import Anomaly, Detectors
from ftrain.files import end_torn_line
from ftrain.kinds import FailureKind
from ftrain.protocol import Control
from ftrain.tail import ChangeNotifier, Tailer

__all__ = ["AttemptWatch", "Intake", "OutputTalk", "ShimTalk", "Talk", "saved_during"]

Record = Mapping[str, Any]
VALUE_ANOMALIES = ("nan", "spike")   # the --inject kinds that only a detector can see


@dataclass
class AttemptWatch:
    """What one attempt showed in its metrics."""

    first_step: int | None = None
    last_step: int | None = None
    max_step: int | None = None
    steps: int = 0
    fired: list[tuple[str, int | None]] = field(default_factory=list)
    stop_requested: bool = False
    saves: int = 0
    config_digest: str | None = None
    config_defaults: dict[str, Any] | None = None   # the script's ftrain.config(defaults=...), scalars
    unknown_overrides: list[str] = field(default_factory=list)   # overrides of keys it has not
    last_record: Mapping[str, Any] = field(default_factory=dict)
    rate: float | None = None
    started: float = field(default_factory=time.time)   # wall clock: what it saved after this is its own
    _rate_mark: tuple[float, int] | None = None

    @property
    def metrics(self) -> dict[str, Any]:
        """The latest metric values (built on demand: the live view asks a few times a second)."""
        return {k: v for k, v in self.last_record.items() if k not in ("step", "t", "attempt")}

    def see(self, records: Sequence[Record], now: float) -> None:
        """Take the records of one read, made at ``now``."""
        steps, max_step, last = self.steps, self.max_step, None
        for record in records:
            control = record.get("ftrain")
            if control is not None:
                if control == Control.INJECT:
                    at = record.get("at")
                    self.fired.append((str(record.get("fault")), at if type(at) is int else None))
                elif control == Control.STOP_REQUESTED:
                    self.stop_requested = True
                elif control == Control.CONFIG:
                    digest = record.get("digest")
                    self.config_digest = digest if isinstance(digest, str) else None
                    defaults, unknown = record.get("defaults"), record.get("unknown_overrides")
                    self.config_defaults = defaults if isinstance(defaults, dict) else None
                    self.unknown_overrides = [str(k)[:200] for k in unknown[:50]] if isinstance(unknown, list) else []
                elif control == Control.SAVE_END and record.get("path"):
                    self.saves += 1
                continue
            step = record.get("step")
            if type(step) is not int:
                continue
            if max_step is None:
                self.first_step = max_step = step
            elif step > max_step:
                max_step = step
            steps += 1
            last = record
        if last is None:
            return
        sample = self.steps + 1   # the count at the read's first metrics line: the rate's sample
        self.steps, self.max_step, self.last_record, self.last_step = steps, max_step, last, last["step"]
        mark = self._rate_mark
        if mark is None:
            self._rate_mark = (now, sample)
        elif now - mark[0] >= 1.0:
            self.rate = (sample - mark[1]) / (now - mark[0])
            self._rate_mark = (now, sample)


def saved_during(found: Iterable[Any], attempt: int, since: float) -> bool:
    """Whether one of ``found`` (checkpoints a restart could use) is attempt ``attempt``'s:
    its manifest names the attempt, or a file without one (the script's own) is newer than
    ``since``, the attempt's start."""
    return any(c.attempt == attempt or (c.attempt is None and c.t is not None and c.t >= since)
               for c in found)


class Talk(Protocol):
    """How records of one attempt reach the loop."""

    @property
    def line_hook(self) -> Callable[[str], None] | None:
        """Given every line of the script's output (None: output is not read for metrics)."""

    @property
    def notifier(self) -> ChangeNotifier | None:
        """An fd to wake the loop when records may be waiting (None: poll, or no need)."""

    def begin(self, attempt: int) -> None:
        """Attempt ``attempt`` starts now: only what it writes from now on counts."""

    def read_new(self) -> Sequence[Record]:
        """The records that arrived since the last call: one bounded batch."""

    @property
    def backlog(self) -> bool:
        """More records were waiting than the last ``read_new`` returned (read again soon)."""

    def end(self) -> None:
        """The attempt is over (its last records were read)."""

    def close(self) -> None: ...


class ShimTalk:
    """The shim's metrics stream, ``metrics.jsonl``."""

    line_hook = None

    def __init__(self, metrics_path: Path) -> None:
        self.path = Path(metrics_path)
        os.close(os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644))
        self.notifier = ChangeNotifier.create(self.path)
        self._tailer: Tailer | None = None

    def begin(self, attempt: int) -> None:
        self.end()
        end_torn_line(self.path)   # the last attempt's cut line must not swallow this one's first
        self._tailer = Tailer(self.path, start_at_end=True)

    def read_new(self) -> Sequence[Record]:
        return self._tailer.read_new() if self._tailer is not None else []

    @property
    def backlog(self) -> bool:
        return self._tailer is not None and self._tailer.backlog

    def end(self) -> None:
        if self._tailer is not None:
            self._tailer.close()
            self._tailer = None

    def close(self) -> None:
        self.end()
        if self.notifier is not None:
            self.notifier.close()
            self.notifier = None


class OutputTalk:
    """Metrics read from the script's own output by the ``script:`` adapter's regexes."""

    notifier = None
    backlog = False   # the pump's reads are bounded already

    def __init__(self, parse: Callable[[str], dict[str, Any] | None], metrics_path: Path) -> None:
        self._parse = parse
        self.path = Path(metrics_path)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        self._pending: list[Record] = []
        self._attempt = 0
        self._last: dict[str, Any] | None = None

    def begin(self, attempt: int) -> None:
        self._attempt = attempt
        self._pending.clear()
        self._last = None

    def line_hook(self, line: str) -> None:
        record = self._parse(line)
        if record is None or record == self._last:
            return   # a bar redrawn without moving (tqdm's monitor does) is not a heartbeat
        self._last = dict(record)
        stamped = {"step": record.pop("step"), "t": time.time(), "attempt": self._attempt, **record}
        self._pending.append(stamped)
        try:
            os.write(self._fd, (json.dumps(stamped) + "\n").encode())
        except OSError:   # the record of it is lost, not the reading of it
            pass

    def read_new(self) -> Sequence[Record]:
        out, self._pending = self._pending, []
        return out

    def end(self) -> None:
        pass

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class Intake:
    """Records in, the first anomaly that stops the attempt out.

    ``stops(anomaly)`` says whether an anomaly stops the attempt (the policy may ignore a
    kind): it is journaled either way, by ``record(anomaly, ignored)``, an ignored kind
    once per attempt and metric. ``saved()`` runs after a read that saw a new checkpoint.
    """

    def __init__(self, detectors: Detectors, listeners: Sequence[Any], *,
                 stops: Callable[[Anomaly], bool], record: Callable[[Anomaly, bool], None],
                 saved: Callable[[AttemptWatch], None]) -> None:
        self.detectors = detectors
        self.listeners = list(listeners)
        self._stops = stops
        self._record = record
        self._saved = saved
        self._ignored: set[tuple[str, str | None]] = set()
        self._seen: list[Anomaly] = []   # every anomaly of this attempt, acted on or not

    def begin(self) -> None:
        self._ignored.clear()
        self._seen.clear()

    def undetected(self, fired: Sequence[tuple[str, int | None]], failure_kind: FailureKind | None) -> list[str]:
        """The value faults (``--inject`` nan, spike) that fired in this attempt but that no
        detector saw, as ``kind@step``: the policy's ``detect:`` would miss the real thing too."""
        watched = {FailureKind.NONFINITE, FailureKind.SPIKE, FailureKind.THRESHOLD}
        if failure_kind in watched:
            return []
        return [f"{kind}@{at}" if at is not None else kind for kind, at in fired
                if kind in VALUE_ANOMALIES and not any(
                    a.kind in watched and (at is None or a.step is None or a.step >= at) for a in self._seen)]

    def take(self, records: Sequence[Record], watch: AttemptWatch, now: float, *, act: bool = True) -> Anomaly | None:
        """Take one read's records. With ``act``, returns the first anomaly that must stop the
        attempt; the records after it are still counted and mirrored, but no longer judged.
        Without, anomalies are only journaled (what came after the attempt was stopped)."""
        if not records:
            return None
        found: Anomaly | None = None
        saves = watch.saves
        watch.see(records, now)
        feed, listeners = self.detectors.feed, self.listeners  # the per-line path
        for record in records:
            for listener in listeners:
                listener.on_metrics(record)
            if found is not None:
                continue
            anomaly = feed(record, now)
            if anomaly is None:
                continue
            self._seen.append(anomaly)
            if not act:
                self._record(anomaly, False)
            elif self.acts_on(anomaly):
                found = anomaly
        if watch.saves != saves:
            self._saved(watch)
        return found

    def acts_on(self, anomaly: Anomaly) -> bool:
        """Journal an anomaly; True if the attempt must be stopped for it."""
        if not self._stops(anomaly):
            key = (anomaly.kind.value, anomaly.metric)
            if key not in self._ignored:
                self._ignored.add(key)
                self._record(anomaly, True)
            return False
        self._record(anomaly, False)
        return True
