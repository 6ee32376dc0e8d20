"""The attempt loop: launch, watch, judge, decide, restart — or stop and say why.

The loop is one pipeline of values, the same for every job (DESIGN §7):

    launcher.start ─► Child ─► AttemptOutcome ─► classify.judge ─► topology.agree
        ─► policy.decide ─► RunState.apply ─► journal ─► next launcher.start

What varies is plugged in where the run is built (``runs``): the ``Launcher`` (cold, or a
warm spare), the ``Topology`` (one process, torchrun's ranks, several nodes) and the
``Script`` (the shim, or the ``script:`` adapter, with its ``Talk``). The supervisor owns
the run folder and its journal; everything a resume needs is in ``journal.jsonl``.

    run_start ─► attempt_start ─► [anomaly] ─► failure ─► decision ─► attempt_end ─┐
                      ▲                                                            │
                      └──────────────── restart / rollback (after backoff) ◄───────┘
                 attempt_end (success, stop, budget spent, interrupt) ─► run_end
"""

from __future__ import annotations

import enum
import fcntl
import math
import os
import platform
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol

from ftrain import __version__, checkpoints, overrides, slurm
from ftrain.detect import Anomaly, Detectors
from ftrain.errors import FtrainError, RunDirError
from ftrain.files import write_json_atomic
from ftrain.inject import Fault, format_inject
from ftrain.intake import AttemptWatch, Intake, Talk
from ftrain.journal import JOURNAL_VERSION, Event, Journal, RunStatus, read_journal
from ftrain.kinds import Failure, FailureKind
from ftrain.launch import Launcher, LaunchSpec, make_launcher
from ftrain.outcome import AttemptOutcome
from ftrain.policy import Action, Decision, Policy
from ftrain.process import Child, Exit, stop_leftover
from ftrain.protocol import Control, format_skip
from ftrain.script import SHIM, Script
from ftrain.state import RunState, remove_fault
from ftrain.tail import Tailer
from ftrain.topology import Single, Topology
from ftrain.view import Progress, total_steps

__all__ = ["ExitCode", "Listener", "Reporter", "RunLock", "Supervisor", "check_fresh_run_dir", "new_run_dir"]

POLL = 0.02       # seconds between looks at the metrics file, where no change notifier exists
POLL_IDLE = 0.25  # with a notifier: the longest sleep (hang checks, status, signals)
COALESCE = 0.03   # after an ingest that found lines, wait this long: a busy stream costs <= ~30 wake-ups/s
STATUS_EVERY = 0.25


class ExitCode(enum.IntEnum):
    """Exit status of ``ftrain run``/``resume`` (DESIGN §1; ``INTERNAL`` is ftrain's own failure)."""

    SUCCEEDED = 0    # the script finished
    STOPPED = 1      # the policy stopped, or its budget ran out
    USAGE = 2        # bad input; nothing was launched
    INTERNAL = 3     # ftrain itself failed (a bug, a full disk): the child was stopped, the run stays resumable
    INTERRUPTED = 130
    TERMINATED = 143


class Listener(Protocol):
    """Something that mirrors the run elsewhere (e.g. TensorBoard): sees every metrics record
    and every journal event as they happen."""

    def on_metrics(self, record: Mapping[str, Any]) -> None: ...
    def on_event(self, record: Mapping[str, Any]) -> None: ...
    def close(self) -> None: ...


class Reporter(Protocol):
    """Where the supervisor tells a person what happens (plain lines or a live view)."""

    def output(self, data: bytes, is_err: bool) -> None: ...
    def event(self, message: str, *, level: str = "info") -> None: ...
    def status(self, progress: Progress) -> None: ...
    def close(self) -> None: ...


class RunLock:
    """An exclusive lock on a run folder, held while a supervisor works on it. The kernel
    drops it when the holder dies, so a stale lock of a dead supervisor is simply taken."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / ".lock"
        try:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as exc:
            raise RunDirError(f"{run_dir}: cannot lock the run folder: {exc.strerror}") from exc
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self._fd, 64, 0).decode(errors="replace").strip() or "another process"
            os.close(self._fd)
            raise RunDirError(f"{run_dir}: in use by a running supervisor (pid {holder})") from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class Supervisor:
    """Runs attempts until the script succeeds or the policy stops; returns the exit code.

    The parts that vary come in through the constructor (``script``, ``topology``,
    ``launcher``), so the loop is tested with real children and fakes alike.
    """

    def __init__(self, run_dir: Path, policy: Policy, launch: LaunchSpec, reporter: Reporter, *,
                 inject: Sequence[Fault] = (), state: RunState | None = None,
                 max_restarts: int | None = None, script: Script = SHIM, topology: Topology | None = None,
                 launcher: Launcher | None = None, listeners: Sequence[Listener] = (),
                 open_attempt: Mapping[str, Any] | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.policy = policy if max_restarts is None else replace(policy, max_restarts=max_restarts)
        self.launch = launch
        self.report = reporter
        self.state = state or RunState(config=dict(launch.base_config), inject=list(inject))
        self.script = script
        self.topology = topology if topology is not None else Single(self.run_dir)
        self.launcher = launcher if launcher is not None else make_launcher(
            self.policy.warm_start, launch.cwd, launch.command[0])
        self.listeners = list(listeners)
        self.open_attempt = open_attempt   # resume: an attempt whose supervisor died
        job = self.topology.job_dir        # several nodes share the metrics and the checkpoints
        self.checkpoint_dir = job / "checkpoints"
        self.metrics_path = job / "metrics.jsonl"
        self.detectors = Detectors(self.policy.detect)
        self.intake = Intake(self.detectors, self.listeners, stops=self._stops_for,
                             record=self._record_anomaly, saved=self._retain)
        self._talk: Talk | None = None
        self._child: Child | None = None
        self._signal: int | None = None
        self._last_event = ""
        self._total: int | None = None   # the job's length, when its config says (the live view's ETA)
        self._attempt_no = 0
        self.journal: Journal | None = None

    # ------------------------------------------------------------------ lifecycle
    def run(self, *, resuming: bool = False) -> int:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        lock = RunLock(self.run_dir)
        previous: dict[int, Any] = {}
        try:
            self.journal = Journal(self.run_dir / "journal.jsonl")
            self.checkpoint_dir.mkdir(exist_ok=True)
            (self.run_dir / "attempts").mkdir(exist_ok=True)
            self._talk = self.script.talk(self.metrics_path)
            previous = {sig: signal.signal(sig, self._on_signal)
                        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
            self.topology.open()
            if not resuming:
                self._write_run_json()
                self._event(Event.RUN_START, journal_version=JOURNAL_VERSION, ftrain=__version__,
                            script=self.launch.script, command=list(self.launch.command),
                            policy=self.policy.source, config=self.launch.config_path,
                            inject=format_inject(self.state.inject) or None)
            else:
                self._close_open_attempt()
                self._say(f"resuming {self.run_dir} at attempt {self.state.attempt + 1}"
                          f" (restarts so far {self.state.restarts}, overrides {self.state.overrides or 'none'})")
            return self._loop()
        except FtrainError:
            if self._child is not None:
                self._stop_child()
            raise
        except Exception as exc:   # a bug of ours, or the machine (a full disk): say so, stop, stay resumable
            return self._internal_error(exc)
        finally:
            self.launcher.close()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            for close in (self.topology.close, *(lst.close for lst in self.listeners), self.report.close):
                try:
                    close()
                except Exception:   # noqa: BLE001 - closing must not hide why we leave
                    pass
            if self._talk is not None:
                self._talk.close()
            if self.journal is not None:
                self.journal.close()
            lock.release()

    def _internal_error(self, exc: BaseException) -> int:
        """An unexpected exception in the loop: stop the child, journal ``run_end``, one line."""
        where = self.run_dir / "ftrain-error.log"
        try:
            where.write_text("".join(traceback.format_exception(exc)))
        except OSError:
            pass
        if self._child is not None:
            self._stop_child()
        text = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
        reason = f"ftrain failed: {text} (details in {where}); `ftrain resume {self.run_dir}` continues"
        try:
            self._end_run(RunStatus.INTERRUPTED, reason, ExitCode.INTERNAL)
        except Exception:   # noqa: BLE001 - the journal itself may be what failed (ENOSPC)
            print(f"ftrain: error: {reason}", file=sys.stderr)
        return ExitCode.INTERNAL

    def _stop_child(self) -> None:
        child, self._child = self._child, None
        if child is None:
            return
        try:
            child.stop(self.policy.grace, cooperative=True)
            child.finish()
        except Exception:   # noqa: BLE001 - best effort on the way out; the subreaper reaps the rest
            pass

    def _event(self, event: Event, **fields: Any) -> dict[str, Any]:
        """Journal an event and tell the listeners (TensorBoard mirror, …)."""
        assert self.journal is not None
        record = self.journal.write(event, **fields)
        for listener in self.listeners:
            listener.on_event(record)
        return record

    def _close_open_attempt(self) -> None:
        """Resume: stop the previous supervisor's child if it still runs, journal its end,
        and restart from the newest usable checkpoint (it may have saved since)."""
        if self.open_attempt is not None:
            pid, started = self.open_attempt.get("pid"), float(self.open_attempt.get("t") or 0)
            stopped = isinstance(pid, int) and stop_leftover(pid, started, grace=self.policy.grace)
            if stopped:
                self._say(f"stopped pid {pid} left running by the previous supervisor", "warn")
            self._event(Event.ATTEMPT_END, attempt=self.open_attempt.get("attempt"), exit_code=None,
                        signal=None, kind=None, supervisor_lost=True, orphan_stopped=stopped,
                        no_progress_streak=self.state.no_progress_streak)
        newest = self.script.usable(self.checkpoint_dir, self.state.set_aside)
        if newest:
            self.state.resume_from, self.state.resume_step = str(newest[-1].path), newest[-1].step

    def _on_signal(self, signum: int, frame: Any) -> None:
        # SIGUSR1 is the usual Slurm pre-timeout notice (--signal=USR1@90): treat as preemption.
        self._signal = signum

    def _say(self, message: str, level: str = "info") -> None:
        self._last_event = message
        self.report.event(message, level=level)

    def _write_run_json(self) -> None:
        write_json_atomic(self.run_dir / "run.json", {
            "script": self.launch.script,
            "args": list(self.launch.script_args),
            "command": list(self.launch.command),
            "cwd": str(Path(self.launch.cwd).resolve()),
            "policy": self.policy.source,
            "config_path": self.launch.config_path,
            "sets": dict(self.launch.sets),
            "tensorboard": self.launch.tensorboard,
            "distributed": self.topology.to_json(),
            "base_config": dict(self.launch.base_config),
            "inject": format_inject(self.state.inject) or None,
            "created": time.time(),
            "versions": {"ftrain": __version__, "python": platform.python_version(),
                         "platform": platform.platform()},
        }, durable=True)

    # ------------------------------------------------------------------ the loop
    def _loop(self) -> int:
        while True:
            self.state = self.topology.before_attempt(self.state)
            self.state.attempt += 1
            n = self.state.attempt
            outcome, watch, exit_ = self._attempt(n)
            from ftrain.classify import judge  # imported by then (see _attempt)

            judged = judge(outcome)
            if judged.failure is not None:
                self._journal_failure(n, judged.failure)
            if watch.max_step is not None and self.state.overrides and watch.config_digest is None \
                    and not self.script.delivers_config:
                self._say("the script logged steps but never called ftrain.config(): "
                          "the overrides may not have reached it", "warn")
            verdict = self.topology.agree(n, judged.failure, secondary=judged.secondary,
                                          t_fail=judged.t if judged.t is not None else time.time(),
                                          interrupted=lambda: self._signal is not None)
            failure = verdict.failure
            self.state.attempt_ended(watch.max_step, counts=n > 1 or self.state.restarts > 0)
            for kind, step in watch.fired:
                self.state.inject = remove_fault(self.state.inject, kind, step)

            if failure is None or self._signal is not None:
                self._end_attempt(n, exit_, watch, failure)
                if self._signal is None:
                    return self._end_run(RunStatus.SUCCEEDED,
                                         f"the script finished (attempt {n}, last step {watch.last_step})"
                                         + self._skipped_text(), ExitCode.SUCCEEDED)
                return self._interrupted("the script was asked to stop")

            decision = verdict.decision
            if decision is None:
                usable = self.script.usable(self.checkpoint_dir, self.state.set_aside)
                decision = self.policy.decide(failure, self.state.history(), usable, self.script.checkpoint_source())
            if verdict.must_decide:   # only the deciding node moves (shared) checkpoints, then tells the others
                if decision.action is Action.ROLLBACK:
                    moved = self.script.roll_back(decision, self.checkpoint_dir)
                    if moved:
                        self._say(moved)
                self.topology.announce(n, failure, decision)
            self._journal_decision(n, decision, failure)
            self._end_attempt(n, exit_, watch, failure)
            if decision.action is Action.IGNORE:
                # An ignored anomaly that ended the attempt (exit 0 with NaN last): the script finished.
                return self._end_run(RunStatus.SUCCEEDED, f"the script finished; {decision.reason}",
                                     ExitCode.SUCCEEDED)
            if decision.action is Action.STOP:
                status = RunStatus.GAVE_UP if decision.gave_up else RunStatus.STOPPED
                return self._end_run(status, decision.reason, ExitCode.STOPPED)
            self.state.apply(decision, failure.step, t=time.time())
            if decision.backoff > 0:
                self._say(f"waiting {decision.backoff:g}s before attempt {n + 1}")
                if not self._sleep(decision.backoff):
                    return self._interrupted("interrupted during backoff")

    def _interrupted(self, what: str) -> int:
        code = ExitCode.INTERRUPTED if self._signal == signal.SIGINT else ExitCode.TERMINATED
        name = signal.Signals(self._signal).name if self._signal else "signal"
        requeued = slurm.requeue_if_allowed(self._signal, code, allowed=slurm.requeue_allowed(self.policy))
        return self._end_run(RunStatus.INTERRUPTED, f"{name} received: {what}; "
                                                    f"`ftrain resume {self.run_dir}` continues"
                             + (f"; {requeued}" if requeued else ""), code)

    def _sleep(self, seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self._signal is not None:
                return False
            time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))
        return self._signal is None

    def _journal_failure(self, n: int, failure: Failure) -> None:
        self._event(Event.FAILURE, attempt=n, **failure.to_json())
        where = f"at step {failure.step}" if failure.step is not None else "before its first step"
        self._say(f"attempt {n} failed: {failure.kind.value} {where}"
                  + (f" — {failure.evidence[0]}" if failure.evidence else ""), "error")

    def _journal_decision(self, n: int, decision: Decision, failure: Failure) -> None:
        self._event(Event.DECISION, attempt=n, failure_step=failure.step, **decision.to_json())
        self._say(f"decision: {decision.reason}", "error" if decision.action is Action.STOP else "warn")

    def _end_attempt(self, n: int, exit_: Exit | None, watch: AttemptWatch, failure: Failure | None) -> None:
        self._event(
            Event.ATTEMPT_END, attempt=n,
            exit_code=exit_.returncode if exit_ else None, signal=exit_.signal_name if exit_ else None,
            kind=failure.kind.value if failure else None,
            first_step=watch.first_step, last_step=watch.last_step, max_step=watch.max_step,
            steps=watch.steps, injected=watch.fired, stop_requested=watch.stop_requested,
            no_progress_streak=self.state.no_progress_streak,
            strays_killed=exit_.strays_killed if exit_ else 0,
        )

    def _skipped_text(self) -> str:
        """The steps the run's rollbacks skipped, in words (a success that skipped much says so)."""
        windows = sorted(self.state.skip)
        merged: list[list[int]] = []
        for a, b in windows:
            if merged and a <= merged[-1][1] + 1:
                merged[-1][1] = max(merged[-1][1], b)
            else:
                merged.append([a, b])
        if self._total is not None:
            merged = [[a, min(b, self._total - 1)] for a, b in merged if a < self._total]
        count = sum(b - a + 1 for a, b in merged)
        if not count:
            return ""
        share = f", {count / self._total:.0%} of the job" if self._total else ""
        return f"; {count} steps skipped by rollbacks ({format_skip([(a, b) for a, b in merged])}{share})"

    def _end_run(self, status: RunStatus, reason: str, code: int) -> int:
        self._event(Event.RUN_END, status=status.value, reason=reason, exit_code=int(code),
                    attempts=self.state.attempt, restarts=self.state.restarts)
        self._say(f"run {status.value}: {reason}", "info" if status is RunStatus.SUCCEEDED else "error")
        return int(code)

    # ------------------------------------------------------------------ one attempt
    def _attempt(self, n: int) -> tuple[AttemptOutcome, AttemptWatch, Exit]:
        """Run attempt ``n`` to its end; what it showed, as values."""
        assert self._talk is not None
        talk = self._talk
        attempt_dir = self.run_dir / "attempts" / f"{n:04d}"
        attempt_dir.mkdir(parents=True, exist_ok=True)
        config_path = attempt_dir / "config.yaml"
        config_path.write_text(overrides.dump_config(self.state.config))
        self._total = total_steps(self.state.config)
        env = self._child_env(n, config_path)
        command = self.topology.wrap(self.launch.command, n, attempt_dir)
        command = self.script.command(command, self.state.config, self.state.resume_from)
        env.update(self.script.env(self.state.config, attempt_dir))
        talk.begin(n)
        watch = AttemptWatch()
        launched = self.launcher.start(command, env, attempt_dir / "output.log", self.report.output, talk.line_hook)
        child = self._child = launched.child
        if launched.note:
            self._say(launched.note, "warn")
        self._event(Event.ATTEMPT_START, attempt=n, pid=child.pid, host=socket.gethostname(),
                    command=list(command), warm=launched.warm,
                    config_path=str(config_path), overrides=dict(self.state.overrides),
                    resume_from=self.state.resume_from, resume_step=self.state.resume_step,
                    skip_steps=[f"{a}-{b}" for a, b in self.state.skip] or None,
                    inject=format_inject(self.state.inject) or None)
        from ftrain.classify import read_oom_kill_count  # after the spawn: its patterns take a while to compile

        oom_before = read_oom_kill_count()
        where = f"from {Path(self.state.resume_from).name}" if self.state.resume_from else "fresh"
        self._say(f"attempt {n} started (pid {child.pid}, {where}{', warm' if launched.warm else ''})")
        self.detectors.start_attempt(time.monotonic(), attempt=n)
        self.topology.started(n, attempt_dir, child.pid)
        self.intake.begin()

        anomaly, interrupted = self._watch(child, talk, watch, n, command, env, attempt_dir)
        ended_first = False   # the script had ended on its own when its anomaly was acted on
        if anomaly is not None:
            self._say(f"stopping attempt {n}: {anomaly.reason}", "warn")
            ended_first = child.proc.poll() is not None
            self._stop_for(child, anomaly)
        exit_ = child.finish()
        self._child = None
        # What the script wrote before it ended but was read only now is judged as if read in
        # time: whether a NaN two lines before the exit is acted on must not depend on how
        # soon this process was scheduled. Past an anomaly, or after we asked it to stop, the
        # rest is only journaled.
        late = self.intake.take(talk.read_new(), watch, time.monotonic(), act=anomaly is None and not interrupted)
        if late is not None:
            self._say(f"attempt {n} ended before its last lines were read: {late.reason}", "warn")
            anomaly, ended_first = late, True
        talk.end()
        if exit_.strays_killed:
            self._say(f"stopped {exit_.strays_killed} leftover process(es) of attempt {n}", "warn")
        if anomaly is not None:
            anomaly = self.topology.explain(anomaly)
        oom_after = read_oom_kill_count()
        tail = tuple(child.tail_lines())
        ranks = self.topology.rank_reports(tail) if exit_.returncode != 0 and not interrupted else ()
        outcome = AttemptOutcome(
            exit_code=exit_.returncode, signal=exit_.signal_name, tail=tail, anomaly=anomaly,
            anomaly_after_exit=ended_first,
            oom_kills=oom_after - oom_before if oom_before is not None and oom_after is not None else None,
            spare_oom_killed=self.launcher.spare_oom_killed(), stop_requested=watch.stop_requested,
            interrupted=interrupted, last_step=watch.last_step, last_values=dict(self.detectors.last_values),
            ranks=ranks, distributed=self.topology.distributed, node=self.topology.node)
        return outcome, watch, exit_

    def _watch(self, child: Child, talk: Talk, watch: AttemptWatch, n: int, command: Sequence[str],
               env: Mapping[str, str], attempt_dir: Path) -> tuple[Anomaly | None, bool]:
        """Pump the child until it ends, an anomaly must stop it, or ftrain was asked to stop.
        Returns (the anomaly, whether the script was asked to stop)."""
        timeout = POLL
        if talk.notifier is not None:
            child.wake_on(talk.notifier.fileno(), talk.notifier.drain)
            timeout = POLL_IDLE
        elif talk.line_hook is not None:
            timeout = POLL_IDLE   # records arrive with the output the pump reads
        last_status = 0.0
        prepared = False
        while child.pump(timeout):
            now = time.monotonic()
            seen = watch.steps
            anomaly = self.intake.take(talk.read_new(), watch, now)
            if anomaly is not None:
                return anomaly, False
            if not prepared and watch.first_step is not None:   # its start-up is over: the next may begin
                prepared = True
                problem = self.launcher.prepare(command, env, attempt_dir / "modules.txt")
                if problem:
                    self._say(problem, "warn")
            anomaly = self.detectors.check_hang(now) or self.topology.check(self.detectors.hang_timeout,
                                                                            watch.last_step)
            if anomaly is not None and self.intake.acts_on(anomaly):
                return anomaly, False
            if self._signal is not None:
                self._say(f"{signal.Signals(self._signal).name}: asking the script to stop "
                          f"(grace {self.policy.grace:g}s)", "warn")
                child.stop(self.policy.grace, cooperative=True)
                return None, True
            if now - last_status >= STATUS_EVERY:
                last_status = now
                self.report.status(Progress(n, watch.last_step, watch.metrics, watch.rate, self._total,
                                            self.state.restarts, self.policy.max_restarts, self._last_event))
            if child.woken and watch.steps != seen:
                time.sleep(COALESCE)  # let a busy stream gather: one look per COALESCE, not per line
        return None, False

    def _stop_for(self, child: Child, anomaly: Anomaly) -> None:
        """Stop an attempt for its anomaly; a hang first dumps its stacks."""
        dump = anomaly.kind is FailureKind.HANG and not self.topology.dump_stacks()
        answered: Callable[[], bool] | None = None
        since = None
        if anomaly.kind is FailureKind.HANG and not self.topology.distributed:
            since = Tailer(self.metrics_path, start_at_end=True)
            answered = lambda: self._acting_on_term(since.read_new())   # noqa: E731
        try:
            child.stop(self.policy.grace, dump_stacks=dump, cooperative=False, answered=answered)
        finally:
            if since is not None:
                since.close()

    @staticmethod
    def _acting_on_term(records: Sequence[Mapping[str, Any]]) -> bool:
        """After a TERM to a hung attempt, from the records written since: False when the
        shim's handler took the TERM (``stop_requested``) but the loop showed nothing else (no
        step, no save): it waits for a ``should_stop()`` that a hung loop never reaches.
        True otherwise: a step or save means it can use the grace, and silence may be a
        script's own handler saving, or a process stuck in C where no handler has run yet;
        those keep the whole grace."""
        controls = [r.get("ftrain") for r in records]
        return Control.STOP_REQUESTED not in controls or any(c != Control.STOP_REQUESTED for c in controls)

    def _stops_for(self, anomaly: Anomaly) -> bool:
        rule = self.policy.rule_for(anomaly.kind)
        return rule is None or rule.action is not Action.IGNORE

    def _record_anomaly(self, anomaly: Anomaly, ignored: bool) -> None:
        value = anomaly.value if anomaly.value is None or math.isfinite(anomaly.value) else str(anomaly.value)
        self._event(Event.ANOMALY, attempt=self.state.attempt, kind=anomaly.kind.value, step=anomaly.step,
                    metric=anomaly.metric, value=value, reason=anomaly.reason,
                    evidence=list(anomaly.evidence), action="ignore" if ignored else None)
        self._say(f"anomaly: {anomaly.reason}" + (" (ignored by policy)" if ignored else ""), "warn")

    def _retain(self, watch: AttemptWatch) -> None:
        """Apply the policy's checkpoint retention, never deleting what a rollback could need:
        for each rollback margin, the newest checkpoint that far behind the newest step, and
        the checkpoints earlier rollbacks resumed from."""
        keep = self.policy.checkpoints
        if keep.keep_last is None and keep.keep_every is None:
            return
        newest = watch.max_step if watch.max_step is not None else 0
        protect = {step for _, step in self.state.rollbacks if step is not None}
        if self.state.resume_step is not None:
            protect.add(self.state.resume_step)
        found = [c for c in checkpoints.scan(self.checkpoint_dir, verify=False)
                 if c.status.usable and c.step is not None]
        for margin in {r.margin for r in self.policy.rules if r.action is Action.ROLLBACK}:
            behind = checkpoints.newest_usable(found, max_step=newest - margin)
            if behind is not None and behind.step is not None:
                protect.add(behind.step)
        best = (keep.keep_best_metric, keep.keep_best_mode) if keep.keep_best_metric else None
        checkpoints.retain(self.checkpoint_dir, keep_last=keep.keep_last, keep_every=keep.keep_every,
                           best=best, protect=protect)

    def _child_env(self, n: int, config_path: Path) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("FTRAIN_")}
        env.update({
            "FTRAIN_RUN_DIR": str(self.run_dir.resolve()),
            "FTRAIN_ATTEMPT": str(n),
            "FTRAIN_CONFIG_PATH": str(config_path.resolve()),
            "FTRAIN_METRICS_PATH": str(self.metrics_path.resolve()),
            "FTRAIN_CHECKPOINT_DIR": str(self.checkpoint_dir.resolve()),
        })
        env.setdefault("PYTHONUNBUFFERED", "1")
        if self.state.resume_from:
            env["FTRAIN_RESUME_FROM"] = str(Path(self.state.resume_from).resolve())
        if self.state.skip:
            env["FTRAIN_SKIP_STEPS"] = format_skip(self.state.skip)
        if self.state.inject:
            env["FTRAIN_INJECT"] = format_inject(self.state.inject)
        return env


def new_run_dir(base: Path, script: str) -> Path:
    stem = Path(script).stem or "run"
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = base / f"{stem}-{stamp}"
    i = 1
    while path.exists():
        i += 1
        path = base / f"{stem}-{stamp}-{i}"
    return path


def check_fresh_run_dir(run_dir: Path) -> None:
    """Refuse a folder that already holds a run (finished or not)."""
    journal = run_dir / "journal.jsonl"
    if not journal.exists():
        return
    events = read_journal(journal)
    if any(e.get("event") == Event.RUN_END.value for e in events):
        raise RunDirError(f"{run_dir}: already holds a finished run; choose a new --run-dir")
    raise RunDirError(f"{run_dir}: already holds a run; continue it with `ftrain resume {run_dir}`")
