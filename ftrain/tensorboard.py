"""Mirror a run into TensorBoard: the script's metrics and ftrain's own events.

``TensorBoardMirror`` is a supervisor ``Listener`` (``--tensorboard DIR``). Every metrics
record becomes scalars (one per numeric metric, x = step); every journal event becomes a
line of text under ``ftrain/events`` and, where it marks a point of the run, a scalar
marker at its step:

    ftrain/attempt    attempt number, at the step the attempt starts from
    ftrain/anomaly    1 where a detector fired
    ftrain/failure    1 where an attempt failed
    ftrain/restart    1 where a restart was decided (``ftrain/rollback`` for a rollback,
                      ``ftrain/rollback_to`` the step it goes back to, ``ftrain/stop``)
    ftrain/override/KEY   the new value of an overridden config key

The supervisor must not import torch or TensorFlow, so this writes with the ``tensorboard``
package's own pieces that import neither: its protocol buffers (``tensorboard.compat.proto``)
and its TFRecord framing and checksums (``tensorboard.summary.writer.record_writer``).
Not its ``EventFileWriter``: that opens the file through ``tensorboard.compat.tf``, which
imports TensorFlow wherever it is installed, and writes from a thread of its own. A
TensorBoard started on DIR shows the run live; restarted attempts replay steps, and their
points sit beside the first ones.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ftrain.errors import UsageError

__all__ = ["TensorBoardMirror", "require_tensorboard"]

TEXT_TAG = "ftrain/events"
FLUSH_EVERY = 1.0          # seconds: metrics reach the file (and a live TensorBoard) this often
_SKIP_FIELDS = frozenset({"step", "t", "attempt", "rank"})
MISSING = "--tensorboard needs the tensorboard package: pip install 'ftrain[tensorboard]'"


def require_tensorboard() -> None:
    """Raise ``UsageError`` (one line) unless the parts of ``tensorboard`` the mirror writes
    with import: a check to make before anything is created or launched."""
    _tensorboard()


def _tensorboard() -> tuple[Any, ...]:
    """The modules the mirror writes with: event, summary, tensor, shape and type protos,
    and the record writer."""
    try:
        from tensorboard.compat.proto import event_pb2, summary_pb2, tensor_pb2, tensor_shape_pb2, types_pb2
        from tensorboard.summary.writer import record_writer
    except ImportError as exc:
        if (exc.name or "tensorboard").partition(".")[0] == "tensorboard":
            raise UsageError(MISSING) from exc
        raise UsageError(f"--tensorboard: the tensorboard package does not import: {exc}") from exc
    return event_pb2, summary_pb2, tensor_pb2, tensor_shape_pb2, types_pb2, record_writer


class TensorBoardMirror:
    """Writes one TensorBoard event file in ``logdir`` for this supervisor process.

    Raises ``UsageError`` when the ``tensorboard`` package is missing or the folder cannot
    be written, before anything is launched.
    """

    def __init__(self, logdir: str | os.PathLike[str]) -> None:
        event_pb2, summary_pb2, tensor_pb2, tensor_shape_pb2, types_pb2, record_writer = _tensorboard()
        self._event_pb2, self._summary_pb2 = event_pb2, summary_pb2
        self._tensor_pb2, self._shape_pb2, self._types_pb2 = tensor_pb2, tensor_shape_pb2, types_pb2
        self.logdir = Path(logdir)
        name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}.ftrain"
        try:
            self.logdir.mkdir(parents=True, exist_ok=True)
            self._file = open(self.logdir / name, "ab")
        except OSError as exc:
            raise UsageError(f"--tensorboard {logdir}: cannot write there: {exc.strerror}") from exc
        self.path = self.logdir / name
        self._records = record_writer.RecordWriter(self._file)   # its framing and CRC-32C
        self._step = 0              # the last step seen: the x of events that carry none
        self._flushed = time.monotonic()
        self._text_meta = summary_pb2.SummaryMetadata(
            plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="text"))
        self._write(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"), flush=True)

    # ------------------------------------------------------------------ Listener
    def on_metrics(self, record: Mapping[str, Any]) -> None:
        """One metrics record: a scalar per numeric metric at the record's step."""
        if "ftrain" in record or self._file.closed:
            return
        step = record.get("step")
        if type(step) is not int:
            return
        self._step = step
        values = [self._summary_pb2.Summary.Value(tag=str(k), simple_value=float(v))
                  for k, v in record.items()
                  if k not in _SKIP_FIELDS and isinstance(v, (int, float)) and not isinstance(v, bool)]
        if values:
            wall = record.get("t")
            self._summary(values, step, float(wall) if isinstance(wall, (int, float)) else time.time())
        if time.monotonic() - self._flushed >= FLUSH_EVERY:
            self._flush()

    def on_event(self, record: Mapping[str, Any]) -> None:
        """One journal event: a line of text, and the markers of DESIGN-level moments."""
        if self._file.closed:
            return
        name = record.get("event")
        wall = float(record.get("t") or time.time())
        markers: dict[str, float] = {}
        step = self._step
        if name == "attempt_start":
            step = _int(record.get("resume_step"), 0)
            markers["ftrain/attempt"] = float(record.get("attempt") or 0)
        elif name == "anomaly":
            step = _int(record.get("step"), self._step)
            markers["ftrain/anomaly"] = 1.0
        elif name == "failure":
            step = _int(record.get("step"), self._step)
            markers["ftrain/failure"] = 1.0
        elif name == "decision":
            step = _int(record.get("failure_step"), self._step)
            action = record.get("action")
            if action in ("restart", "rollback", "stop"):
                markers[f"ftrain/{action}"] = 1.0
            if action == "rollback":
                markers["ftrain/rollback_to"] = float(_int(record.get("resume_step"), 0))
            for key, value in (record.get("overrides") or {}).items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    markers[f"ftrain/override/{key}"] = float(value)
        text = describe(record)
        if markers:
            self._summary([self._summary_pb2.Summary.Value(tag=k, simple_value=v) for k, v in markers.items()],
                          step, wall)
        if text:
            self._summary([self._text(text)], step, wall)
        self._flush()

    def close(self) -> None:
        if not self._file.closed:
            self._file.flush()
            self._file.close()

    # ------------------------------------------------------------------ writing
    def _text(self, text: str) -> Any:
        tensor = self._tensor_pb2.TensorProto(
            dtype=self._types_pb2.DT_STRING, string_val=[text.encode()],
            tensor_shape=self._shape_pb2.TensorShapeProto(dim=[self._shape_pb2.TensorShapeProto.Dim(size=1)]))
        return self._summary_pb2.Summary.Value(tag=TEXT_TAG, metadata=self._text_meta, tensor=tensor)

    def _summary(self, values: list[Any], step: int, wall: float) -> None:
        self._write(self._event_pb2.Event(wall_time=wall, step=step,
                                          summary=self._summary_pb2.Summary(value=values)))

    def _write(self, event: Any, flush: bool = False) -> None:
        self._records.write(event.SerializeToString())
        if flush:
            self._flush()

    def _flush(self) -> None:
        self._file.flush()
        self._flushed = time.monotonic()


def describe(record: Mapping[str, Any]) -> str:
    """One line of text for a journal event, as a person reads the run's story."""
    name = record.get("event")
    if name == "run_start":
        return f"run started: {record.get('script')} (policy {record.get('policy')})"
    if name == "attempt_start":
        where = f"from {record['resume_from']} (step {record.get('resume_step')})" if record.get("resume_from") \
            else "fresh"
        changed = record.get("overrides") or {}
        return f"attempt {record.get('attempt')} started {where}" + (f"; overrides {changed}" if changed else "")
    if name == "anomaly":
        return f"anomaly ({record.get('kind')}): {record.get('reason')}"
    if name == "failure":
        evidence = record.get("evidence") or []
        return (f"attempt {record.get('attempt')} failed: {record.get('kind')} at step {record.get('step')}"
                + (f" — {evidence[0]}" if evidence else ""))
    if name == "decision":
        return f"decision ({record.get('action')}): {record.get('reason')}"
    if name == "run_end":
        return f"run {record.get('status')}: {record.get('reason')}"
    return ""


def _int(value: Any, default: int) -> int:
    return value if type(value) is int else default
