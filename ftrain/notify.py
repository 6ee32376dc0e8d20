"""Alerts: the events a person wants at 3 a.m., sent to a command and/or a webhook.

``Notifier`` is a supervisor ``Listener`` built from the policy's ``notify:`` section
(DESIGN §6). For each journal event it is told to send (``restart``, ``rollback``, ``stop``
— a rule's stop or giving up —, ``run_end``; ``anomaly`` and ``failure`` on request) it
builds one JSON message::

    {"event": "restart", "text": "ftrain run-…: attempt 2 failed: segfault at step 40; restart …",
     "run_dir": "/abs/run", "host": "node3", "record": {…the journal record…}}

and delivers it in the background: the ``command`` gets it on its standard input (argv
split like a shell would, no shell; ``FTRAIN_NOTIFY_EVENT`` in its environment), the
``webhook`` gets it as the body of a POST (``text`` is what Slack, Mattermost and Teams'
incoming webhooks show). The loop never waits on a delivery: one worker thread, a bounded
queue (past it, messages are dropped and counted), a timeout per delivery (a command that
outlives it is killed with its process group). A delivery that fails is journaled as
``notify_failed`` (one ``O_APPEND`` write per line, like every journal line) and told to
the person once per destination; the run goes on. At the run's end ``close`` waits a
bounded time for what is queued, so the ``run_end`` message leaves before ftrain exits.
"""

from __future__ import annotations

import json
import math
import os
import queue
import shlex
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["DEFAULT_EVENTS", "NOTIFY_EVENTS", "NotifySpec", "Notifier", "message_for"]

NOTIFY_EVENTS = ("restart", "rollback", "stop", "ignore", "run_end", "anomaly", "failure")
DEFAULT_EVENTS = ("restart", "rollback", "stop", "run_end")
QUEUE_LIMIT = 100          # messages waiting; a run that fails faster than alerts leave drops the rest
TAIL_LIMIT = 300           # characters of a failed command's stderr kept in the journal


@dataclass(frozen=True)
class NotifySpec:
    """The policy's ``notify:`` section."""

    command: tuple[str, ...] = ()
    webhook: str | None = None
    events: tuple[str, ...] = DEFAULT_EVENTS
    timeout: float = 10.0

    @property
    def enabled(self) -> bool:
        return bool(self.command or self.webhook)


def _kind_of(record: Mapping[str, Any]) -> str | None:
    """Which notify event a journal record is (a decision is its action), or None."""
    name = record.get("event")
    if name == "decision":
        action = record.get("action")
        return action if isinstance(action, str) else None
    return name if name in ("run_end", "anomaly", "failure") else None


def message_for(record: Mapping[str, Any], *, run_dir: Path, host: str,
                failure: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The JSON sent for one journal record; ``failure`` is the failure a decision answers."""
    kind = _kind_of(record) or str(record.get("event"))
    name = f"ftrain {run_dir.name} on {host}"
    if record.get("event") == "decision":
        what = ""
        if failure is not None:
            at = f" at step {failure['step']}" if failure.get("step") is not None else ""
            what = f" failed: {failure.get('kind')}{at}"
        text = f"{name}: attempt {record.get('attempt')}{what}; {record.get('reason', kind)}"
    elif kind == "run_end":
        text = (f"{name}: run {record.get('status')} after {record.get('attempts')} attempt(s), "
                f"{record.get('restarts')} restart(s): {record.get('reason', '')}")
    elif kind == "anomaly":
        text = f"{name}: attempt {record.get('attempt')}: {record.get('reason') or record.get('kind')}"
    else:
        at = f" at step {record['step']}" if record.get("step") is not None else ""
        text = f"{name}: attempt {record.get('attempt')} failed: {record.get('kind')}{at}"
    return {"event": kind, "text": text, "run_dir": str(run_dir), "host": host, "record": dict(record)}


class Notifier:
    """Sends the chosen journal events to ``spec``'s destinations, off the loop's thread.

    ``say(message, level)`` tells the person (called only from the thread that calls
    ``on_event`` and ``close``); failures are appended to ``journal_path``."""

    def __init__(self, spec: NotifySpec, run_dir: Path, *, say: Callable[[str, str], None] | None = None,
                 journal_path: Path | None = None) -> None:
        self.spec = spec
        self.run_dir = Path(run_dir).resolve()
        self.host = socket.gethostname()
        self.say = say
        self.journal_path = journal_path if journal_path is not None else self.run_dir / "journal.jsonl"
        self.dropped = 0
        self._queue: queue.Queue[dict[str, Any] | None] = queue.Queue(QUEUE_LIMIT)
        self._failures: queue.SimpleQueue[tuple[str, str]] = queue.SimpleQueue()
        self._told: set[str] = set()
        self._failure: Mapping[str, Any] | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._worker = threading.Thread(target=self._work, name="ftrain-notify", daemon=True)
        self._worker.start()

    # ------------------------------------------------------------------ Listener
    def on_metrics(self, record: Mapping[str, Any]) -> None:
        pass

    def on_event(self, record: Mapping[str, Any]) -> None:
        if record.get("event") == "failure":
            self._failure = record
        kind = _kind_of(record)
        if kind in self.spec.events:
            failure = self._failure if record.get("event") == "decision" else None
            message = message_for(record, run_dir=self.run_dir, host=self.host, failure=failure)
            try:
                self._queue.put_nowait(message)
            except queue.Full:
                self.dropped += 1
        self._tell()

    def close(self) -> None:
        """Wait (bounded) for the queued messages, then stop the worker."""
        deadline = time.monotonic() + self.spec.timeout + 2.0
        try:
            self._queue.put(None, timeout=max(0.0, deadline - time.monotonic()))
        except queue.Full:
            pass
        self._worker.join(max(0.0, deadline - time.monotonic()))
        if self._worker.is_alive():   # a delivery past its time: do not leave its command behind
            self._kill()
            self._failures.put(("notify", f"{self._queue.qsize()} message(s) not sent when the run ended"))
        if self.dropped:
            self._failures.put(("notify", f"{self.dropped} message(s) dropped (more than {QUEUE_LIMIT} waiting)"))
        self._tell()

    # ------------------------------------------------------------------ worker
    def _work(self) -> None:
        while True:
            message = self._queue.get()
            if message is None:
                return
            try:
                body = json.dumps(_plain(message), allow_nan=False, default=str).encode()
            except (TypeError, ValueError) as exc:   # noqa: PERF203 - not the loop's thread
                self._deliver("notify", lambda why: why, f"cannot encode the message: {exc}")
                continue
            if self.spec.command:
                self._deliver("command", self._run_command, body, str(message["event"]))
            if self.spec.webhook:
                self._deliver("webhook", self._post, body)

    def _deliver(self, where: str, send: Callable[..., str | None], *args: Any) -> None:
        try:
            problem = send(*args)
        except Exception as exc:   # noqa: BLE001 - an alert must never break the run
            problem = f"{type(exc).__name__}: {exc}"
        if problem:
            self._failures.put((where, problem))
            self._journal(where, problem)

    def _run_command(self, body: bytes, event: str) -> str | None:
        from ftrain.process import HELPER_SPAWN, HELPER_VAR

        env = {**os.environ, "FTRAIN_NOTIFY_EVENT": event, HELPER_VAR: "notify"}
        try:
            with HELPER_SPAWN:   # an attempt's sweep for orphans sees it only once its mark is in place
                proc = subprocess.Popen(self.spec.command, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.PIPE, env=env, start_new_session=True)
        except OSError as exc:
            return f"{self.spec.command[0]}: {exc.strerror or exc}"
        self._proc = proc
        try:
            _, err = proc.communicate(body, timeout=self.spec.timeout)
        except subprocess.TimeoutExpired:
            self._kill()
            proc.communicate()
            return f"`{shlex.join(self.spec.command)}` did not finish in {self.spec.timeout:g}s (killed)"
        finally:
            self._proc = None
        if proc.returncode != 0:
            tail = err.decode(errors="replace").strip()[-TAIL_LIMIT:]
            return f"`{shlex.join(self.spec.command)}` exited {proc.returncode}" + (f": {tail}" if tail else "")
        return None

    def _post(self, body: bytes) -> str | None:
        import urllib.error
        import urllib.request

        assert self.spec.webhook is not None
        request = urllib.request.Request(self.spec.webhook, data=body, method="POST",
                                         headers={"Content-Type": "application/json",
                                                  "User-Agent": "ftrain-notify"})
        try:
            with urllib.request.urlopen(request, timeout=self.spec.timeout) as response:   # noqa: S310 - http(s) only, checked
                response.read(1 << 16)
        except urllib.error.HTTPError as exc:
            return f"{self.spec.webhook}: HTTP {exc.code} {exc.reason}"
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            return f"{self.spec.webhook}: {getattr(reason, 'strerror', None) or reason}"
        return None

    def _kill(self) -> None:
        proc = self._proc
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except OSError:
                pass

    def _journal(self, where: str, problem: str) -> None:
        line = json.dumps({"t": time.time(), "event": "notify_failed", "to": where, "problem": problem}) + "\n"
        try:
            fd = os.open(self.journal_path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError:
            return
        try:
            os.write(fd, line.encode())
        except OSError:
            pass
        finally:
            os.close(fd)

    def _tell(self) -> None:
        """Say each destination's first failure (the journal keeps them all)."""
        while True:
            try:
                where, problem = self._failures.get_nowait()
            except queue.Empty:
                return
            if where in self._told or self.say is None:
                continue
            self._told.add(where)
            self.say(f"notify: {where} failed: {problem} (the run goes on; later failures only in the journal)",
                     "warn")


def _plain(value: Any) -> Any:
    """``value`` with NaN and infinities as the strings JSON has no numbers for."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def parse_command(raw: Any) -> tuple[str, ...] | None:
    """``command:`` as argv: a string split like a shell would (no shell runs), or a list."""
    if isinstance(raw, str):
        try:
            argv = shlex.split(raw)
        except ValueError:
            return None
        return tuple(argv) or None
    if isinstance(raw, Sequence) and raw and all(isinstance(a, str) and a for a in raw):
        return tuple(raw)
    return None
