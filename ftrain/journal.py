"""The run's journal: an append-only JSON-lines event log, the single source of truth.

Every event is one line ``{"t": <unix seconds>, "event": <name>, ...}``. Events that a
resume depends on (decisions, attempt boundaries, the run's end) are fsynced. Reading
tolerates a torn last line (power loss mid-write): it is skipped, never fatal.
"""

from __future__ import annotations

import enum
import errno
import json
import os
import stat
import time
from pathlib import Path
from typing import Any

from ftrain.errors import RunDirError
from ftrain.files import TooLarge, read_bounded

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
        flags = os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
        try:
            self._fd = os.open(self.path, flags, 0o644)
        except OSError as exc:
            why = "it is a symlink" if exc.errno == errno.ELOOP else exc.strerror
            raise RunDirError(f"{self.path}: cannot open journal: {why}") from exc
        st = os.fstat(self._fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(self._fd)
            self._fd = -1
            raise RunDirError(f"{self.path}: cannot open journal: not a regular file")
        self._repair_torn_tail()

    def _repair_torn_tail(self) -> None:
        """Terminate a torn last line so the next event starts on a line of its own."""
        size = os.fstat(self._fd).st_size
        if size and os.pread(self._fd, 1, size - 1) != b"\n":
            try:
                os.write(self._fd, b"\n")
            except OSError as exc:
                raise RunDirError(f"{self.path}: cannot write the journal: {exc.strerror}") from exc

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


JOURNAL_LIMIT = 256 << 20   # a journal is a few KB per attempt; more is not one of ours


def read_journal(path: Path) -> list[dict[str, Any]]:
    """All intact events, each checked against its event's field types (DESIGN §4): a known
    field of the wrong type is a ``RunDirError`` naming the file, line, event and field. A
    line that is not JSON (a torn write, terminated by the next open) is skipped; an event
    of a name this version does not know is kept unchecked. Bounded and regular files only."""
    try:
        data = read_bounded(path, JOURNAL_LIMIT)
    except FileNotFoundError:
        raise RunDirError(f"{path}: no journal (is this a run folder?)") from None
    except TooLarge as exc:
        raise RunDirError(f"{path}: not a journal ({exc})") from None
    except OSError as exc:
        raise RunDirError(f"{path}: cannot read journal: {exc.strerror or exc}") from exc
    events: list[dict[str, Any]] = []
    for lineno, raw in enumerate(data.split(b"\n"), 1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except ValueError:
            continue
        if not isinstance(record, dict) or "event" not in record:
            continue
        problem = check_event(record)
        if problem:
            raise RunDirError(f"{path}:{lineno}: {record.get('event')}: {problem}"[:300])
        events.append(record)
    return events


# --------------------------------------------------------------------------- the event types
def _int(v: Any) -> bool:
    return type(v) is int


def _num(v: Any) -> bool:
    return type(v) in (int, float)


def _str(v: Any) -> bool:
    return isinstance(v, str)


def _bool(v: Any) -> bool:
    return type(v) is bool


def _obj(v: Any) -> bool:
    return isinstance(v, dict)


def _strs(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


def _list(v: Any) -> bool:
    return isinstance(v, list)


def _any(v: Any) -> bool:
    return True


_NAMES = {_int: "an integer", _num: "a number", _str: "a string", _bool: "true or false", _obj: "an object",
          _strs: "a list of strings", _list: "a list"}

# Field -> type, per event: what the supervisor writes (None is allowed for every field but
# the required ones). Fields not listed are kept as they are (a newer minor version's).
_REQUIRED: dict[str, tuple[str, ...]] = {
    "attempt_start": ("attempt",), "failure": ("attempt", "kind"), "decision": ("attempt", "action"),
    "attempt_end": ("attempt",), "run_end": ("status",),
}
_FIELDS: dict[str, dict[str, Any]] = {
    "run_start": {"journal_version": _int, "ftrain": _str, "script": _str, "command": _strs, "policy": _str,
                  "config": _str, "inject": _str},
    "attempt_start": {"attempt": _int, "pid": _int, "host": _str, "command": _strs, "warm": _bool,
                      "warm_ranks": _int, "config_path": _str, "overrides": _obj, "resume_from": _str,
                      "resume_step": _int, "skip_steps": _strs, "inject": _str},
    "anomaly": {"attempt": _int, "kind": _str, "step": _int, "metric": _str, "value": _any, "reason": _str,
                "evidence": _strs, "action": _str},
    "failure": {"attempt": _int},
    "decision": {"attempt": _int, "failure_step": _int},
    "attempt_end": {"attempt": _int, "exit_code": _int, "signal": _str, "kind": _str, "first_step": _int,
                    "last_step": _int, "max_step": _int, "steps": _int, "injected": _list,
                    "stop_requested": _bool, "no_progress_streak": _int, "strays_killed": _int,
                    "supervisor_lost": _bool, "orphan_stopped": _any},
    "run_end": {"status": _str, "reason": _str, "exit_code": _int, "attempts": _int, "restarts": _int},
}


def check_event(record: dict[str, Any]) -> str | None:
    """What is wrong with one journal record, or None. ``failure`` and ``decision`` records
    are decoded by ``Failure.from_json``/``Decision.from_json`` themselves."""
    name = record.get("event")
    if not isinstance(name, str):
        return f"event: expected a string, got {name!r}"
    if not _num(record.get("t")):
        return f"t: expected a number, got {record.get('t')!r}"
    fields = _FIELDS.get(name)
    if fields is None:
        return None
    for key in _REQUIRED.get(name, ()):
        if record.get(key) is None:
            return f"{key}: missing"
    for key, ok in fields.items():
        value = record.get(key)
        if value is not None and not ok(value):
            return f"{key}: expected {_NAMES[ok]}, got {value!r}"
    if name == "run_end" and record["status"] not in {s.value for s in RunStatus}:
        return f"status: not a run status: {record['status']!r}"
    if name in ("failure", "decision"):
        from ftrain.kinds import Failure
        from ftrain.policy import Decision

        try:
            (Failure if name == "failure" else Decision).from_json(record)
        except ValueError as exc:
            return str(exc)
    return None
