"""The run's journal: an append-only JSON-lines event log, the single source of truth.

Every event is one line ``{"t": <unix seconds>, "event": <name>, ...}``. Events that a
resume depends on (decisions, attempt boundaries, the run's end) are fsynced. Reading
tolerates a torn last line (power loss mid-write): it is skipped, never fatal.
"""

from __future__ import annotations

import enum
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ftrain.errors import RunDirError

JOURNAL_VERSION = 1


class Event(str, enum.Enum):
    """Journal event names (public, DESIGN §4)."""

    RUN_START = "run_start"
    ATTEMPT_START = "attempt_start"
    ANOMALY = "anomaly"
    FAILURE = "failure"
    DECISION = "decision"
    ATTEMPT_END = "attempt_end"
    RUN_END = "run_end"


class RunStatus(str, enum.Enum):
    """How a run ended (``run_end.status``)."""

    SUCCEEDED = "succeeded"
    GAVE_UP = "gave_up"
    STOPPED = "stopped"
    INTERRUPTED = "interrupted"


# fsync once per attempt, when it has started (which also flushes the previous attempt's
# failure, decision and end), and at the run's end: the flush falls outside the restart gap
# (child exit -> next child exec). A supervisor killed by a signal loses nothing either way
# (the lines are in the page cache); only power loss can cost the events since the last
# attempt_start, and a resume then replays that attempt.
_DURABLE = {Event.ATTEMPT_START, Event.RUN_END}


class Journal:
    """Appends events to ``journal.jsonl``; one ``os.write`` per line so lines never interleave."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        try:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as exc:
            raise RunDirError(f"{self.path}: cannot open journal: {exc.strerror}") from exc
        self._repair_torn_tail()

    def _repair_torn_tail(self) -> None:
        """Terminate a torn last line so the next event starts on a line of its own."""
        size = os.fstat(self._fd).st_size
        if size == 0:
            return
        with open(self.path, "rb") as f:
            f.seek(size - 1)
            if f.read(1) != b"\n":
                os.write(self._fd, b"\n")

    def write(self, event: Event, **fields: Any) -> dict[str, Any]:
        record = {"t": round(time.time(), 6), "event": event.value, **fields}
        line = json.dumps(record, default=str) + "\n"
        os.write(self._fd, line.encode())
        if event in _DURABLE:
            os.fsync(self._fd)
        return record

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def read_journal(path: Path) -> list[dict[str, Any]]:
    """All intact events; a torn or garbled line is skipped. RunDirError if unreadable."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise RunDirError(f"{path}: no journal (is this a run folder?)") from None
    except OSError as exc:
        raise RunDirError(f"{path}: cannot read journal: {exc.strerror}") from exc
    return list(_parse(data))


def _parse(data: bytes) -> Iterator[dict[str, Any]]:
    for raw in data.split(b"\n"):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except ValueError:
            continue
        if isinstance(record, dict) and "event" in record:
            yield record
