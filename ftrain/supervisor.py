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
import math
import os
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol

from ftrain import __version__, checkpoints, overrides, runfolder, slurm, upkeep
from ftrain.detect import Anomaly, Detectors
from ftrain.errors import FtrainError, RunDirError
from ftrain.inject import Fault, format_inject
from ftrain.intake import AttemptWatch, Intake, Talk, saved_during
from ftrain.journal import JOURNAL_VERSION, Event, Journal, RunStatus
from ftrain.kinds import Failure, FailureKind
from ftrain.launch import Launcher, LaunchSpec, make_launcher
from ftrain.memtier import MemoryTier, promote_newest, snapshot_limit
from ftrain.outcome import AttemptOutcome
from ftrain.policy import Action, Decision, Policy
from ftrain.process import Child, Exit, leave_terminal, left_by_the_dead, stop_leftovers
from ftrain.protocol import Control
from ftrain.runfolder import MEDIUM_ERRORS, RunLock, WriteFailed, check_fresh_run_dir, new_run_dir, own_folder
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
                             record=self._record_anomaly,
                             saved=lambda watch: upkeep.retain(self.checkpoint_dir, self.policy, self.state,
                                                               watch.max_step))
        self._talk: Talk | None = None
        self._child: Child | None = None
        self._signal: int | None = None
        self._last_event = ""
        self._total: int | None = None   # the job's length, when its config says (the live view's ETA)
        self._undetected: list[str] = []  # injected value faults no detector saw (told at the run's end)
        self._attempt_no = 0
        self._launched = 0   # attempts this supervisor started
        self._quiet_since = time.time()   # no process of an attempt of ours wrote after this
        self.journal: Journal | None = None
        # ftrain.snapshot's host memory, one per node, and its blocking budget (the child's env)
        self.memory = MemoryTier(self.run_dir, overhead=self.policy.checkpoints.snapshot_overhead)

    # ------------------------------------------------------------------ lifecycle
    def run(self, *, resuming: bool = False) -> int:
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RunDirError(f"{self.run_dir}: cannot create the run folder: {exc.strerror}") from exc
        lock = RunLock(self.run_dir)
        previous: dict[int, Any] = {}
        try:
            self.journal = Journal(self.run_dir / "journal.jsonl")
            try:
                self.checkpoint_dir.mkdir(exist_ok=True)
                own_folder(self.run_dir / "attempts", self.run_dir)
            except OSError as exc:
                raise RunDirError(f"{exc.filename}: cannot create: {exc.strerror}") from exc
            self._talk = self.script.talk(self.metrics_path)
            previous = {sig: signal.signal(sig, self._on_signal)
                        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGHUP)}
            self.topology.open()
            self.memory.open()
            if not resuming:
                runfolder.write_run_json(self.run_dir, self.launch, policy=self.policy.source,
                                         distributed=self.topology.to_json(), inject=self.state.inject)
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
        except WriteFailed as exc:
            return self._write_failed(str(exc))
        except Exception as exc:   # a bug of ours, or the machine (a full disk): say so, stop, stay resumable
            if isinstance(exc, OSError) and exc.errno in MEDIUM_ERRORS:
                where = f"{exc.filename}: " if exc.filename else ""
                return self._write_failed(f"{where}{exc.strerror or exc}")
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
            self.memory.release()
            lock.release()

    def _write_failed(self, what: str) -> int:
        """A file of the run folder could not be written (the journal on a full disk): ask the
        child to save and stop, say in one line what failed and where, exit ``INTERNAL``. The
        journal is not written again (it may be what failed): a resume closes the attempt.
        Before anything was launched it is a ``RunDirError`` (exit 2) instead."""
        had_child = self._child is not None
        self._stop_child()
        if not had_child and self._launched == 0:
            raise RunDirError(f"{what}; nothing was launched")
        print(f"ftrain: error: {what}; the script was asked to save and stop; "
              f"make room, then `ftrain resume {self.run_dir}` continues", file=sys.stderr, flush=True)
        return ExitCode.INTERNAL

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
        """Journal an event and tell the listeners (TensorBoard mirror, …). A write that
        fails (a full disk) is a ``WriteFailed`` naming the journal and the event."""
        assert self.journal is not None
        try:
            record = self.journal.write(event, **fields)
        except OSError as exc:
            what = event.value + (f" '{fields['reason']}'" if isinstance(fields.get("reason"), str) else "")
            raise WriteFailed(f"{self.journal.path}: cannot write to the journal ({what[:160]}): "
                              f"{exc.strerror or exc}") from exc
        for listener in self.listeners:
            listener.on_event(record)
        return record

    def _close_open_attempt(self) -> None:
        """Resume: stop what the previous supervisor left running — its child only once its
        environment proves it this run's, on this host; every process carrying the run's
        ``FTRAIN_RUN_DIR`` (a daemon, a spare) — journal its end, and restart from the newest
        usable checkpoint (it may have saved since)."""
        run_dir = str(self.run_dir.resolve())
        leader, why = left_by_the_dead(self.open_attempt, run_dir) if self.open_attempt else (None, None)
        if self.open_attempt is not None and leader is None and why != "it is gone":
            self._say(f"pid {self.open_attempt.get('pid')} named by attempt {self.open_attempt.get('attempt')} "
                      f"is not this run's process ({why}): left alone", "warn")
        others = max(0, stop_leftovers(run_dir, leader, grace=self.policy.grace) - (leader is not None))
        if leader is not None:
            self._say(f"stopped pid {leader} left running by the previous supervisor", "warn")
        if others:
            self._say(f"stopped {others} other process(es) of this run left by the previous supervisor", "warn")
        if self.open_attempt is not None:
            self._event(Event.ATTEMPT_END, attempt=self.open_attempt.get("attempt"), exit_code=None,
                        signal=None, kind=None, supervisor_lost=True, orphan_stopped=leader is not None,
                        orphan_reason=why, strays_killed=others,
                        no_progress_streak=self.state.no_progress_streak)
        if self.open_attempt is not None:
            self._promote_snapshot(None)   # the dead supervisor's attempt may have left one
        newest = self.script.usable(self.checkpoint_dir, self.state.set_aside)
        if newest:
            self.state.resume_from, self.state.resume_step = str(newest[-1].path), newest[-1].step

    def _promote_snapshot(self, failure: Failure | None) -> None:
        """Make the newest snapshot the decision may use an ordinary checkpoint (DESIGN §3)."""
        newest = self.script.usable(self.checkpoint_dir, self.state.set_aside)
        promoted = promote_newest(self.memory, self.checkpoint_dir, at_most=snapshot_limit(failure, self.policy),
                                  newer_than=newest[-1].step if newest else None)
        if promoted is not None:
            self._say(f"snapshot of step {promoted.step} kept as {promoted.path.name} "
                      f"({promoted.bytes / 1e6:.1f} MB in {promoted.seconds * 1e3:.0f} ms)")

    def _clean_leftovers(self) -> None:
        """Remove the temporary files of saves that an ended attempt left half-written: only
        those last written before this supervisor's attempts were all gone, by a process
        that no longer exists. The deciding node cleans the shared folder."""
        if self.topology.job_dir.resolve() != self.run_dir.resolve():
            return
        removed = checkpoints.remove_leftovers(self.checkpoint_dir, before=self._quiet_since)
        if removed:
            self._say(f"removed {len(removed)} leftover file(s) of interrupted saves: "
                      + ", ".join(p.name for p in removed[:3]) + (" …" if len(removed) > 3 else ""))

    def _on_signal(self, signum: int, frame: Any) -> None:
        # SIGUSR1 is the usual Slurm pre-timeout notice (--signal=USR1@90): treat as preemption.
        # SIGHUP (the terminal closed) as SIGTERM: the script saves, the run stays resumable.
        if signum == signal.SIGHUP:
            leave_terminal()
        self._signal = signum

    def _say(self, message: str, level: str = "info") -> None:
        self._last_event = message
        self.report.event(message, level=level)

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
            if watch.config_defaults is not None:   # what a policy's `scale` reads without --config
                self.state.defaults = watch.config_defaults
                self._total = self._total or total_steps(self.state.defaults)
            if watch.unknown_overrides:
                self._say(f"the script's config has no {', '.join(watch.unknown_overrides)}: the "
                          "override reached the script, which may not use it", "warn")
            if watch.max_step is not None and self.state.overrides and watch.config_digest is None \
                    and not self.script.delivers_config:
                self._say("the script logged steps but never called ftrain.config(): "
                          "the overrides may not have reached it", "warn")
            verdict = self.topology.agree(n, judged.failure, secondary=judged.secondary,
                                          t_fail=judged.t if judged.t is not None else time.time(),
                                          interrupted=lambda: self._signal is not None)
            failure = verdict.failure
            counts = n > 1 or self.state.restarts > 0
            saved = watch.saves > 0 or counts and saved_during(
                self.script.usable(self.checkpoint_dir, self.state.set_aside), n, watch.started)
            self.state.attempt_ended(watch.max_step, counts=counts, saved=saved, lived=time.time() - watch.started)
            for kind, step in watch.fired:
                self.state.inject = remove_fault(self.state.inject, kind, step)
            self._undetected += self.intake.undetected(watch.fired, failure.kind if failure else None)

            if failure is not None and verdict.must_decide:
                self._promote_snapshot(failure)
            if failure is None or self._signal is not None:
                self._end_attempt(n, exit_, watch, failure)
                if self._signal is None:
                    return self._end_run(RunStatus.SUCCEEDED,
                                         f"the script finished (attempt {n}, last step {watch.last_step})"
                                         + upkeep.skipped_text(self.state.skip, self._total),
                                         ExitCode.SUCCEEDED)
                return self._interrupted("the script was asked to stop")

            decision = verdict.decision
            if decision is None:
                decision = upkeep.fall_back(
                    failure, self.state, self.policy, self.checkpoint_dir, first_step=watch.first_step,
                    tail=outcome.tail, candidates=lambda: self.script.usable(self.checkpoint_dir, self.state.set_aside))
            if decision is None:
                usable = self.script.usable(self.checkpoint_dir, self.state.set_aside)
                decision = self.policy.decide(failure, self.state.history(), usable, self.script.checkpoint_source())
            # Journaled before its quarantine: a resume after a kill in between redoes it (runs.resume_run).
            self._journal_decision(n, decision, failure)
            if verdict.must_decide:   # only the deciding node moves (shared) checkpoints, then tells the others
                if decision.action is Action.ROLLBACK:
                    moved = self.script.roll_back(decision, self.checkpoint_dir)
                    if moved:
                        self._say(moved)
                self.topology.announce(n, failure, decision)
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
            **({"unknown_overrides": watch.unknown_overrides} if watch.unknown_overrides else {}),
        )

    def _end_run(self, status: RunStatus, reason: str, code: int) -> int:
        if self._undetected:
            self._say(f"injected fault(s) {', '.join(self._undetected)} fired but no detector saw them: "
                      "the policy's detect: section would miss the real thing", "warn")
        self._event(Event.RUN_END, status=status.value, reason=reason, exit_code=int(code),
                    attempts=self.state.attempt, restarts=self.state.restarts,
                    undetected=self._undetected or None)
        self._say(f"run {status.value}: {reason}", "info" if status is RunStatus.SUCCEEDED else "error")
        return int(code)

    # ------------------------------------------------------------------ one attempt
    def _attempt(self, n: int) -> tuple[AttemptOutcome, AttemptWatch, Exit]:
        """Run attempt ``n`` to its end; what it showed, as values."""
        assert self._talk is not None
        talk = self._talk
        attempt_dir = self.run_dir / "attempts" / f"{n:04d}"
        config_path = attempt_dir / "config.yaml"
        try:
            own_folder(attempt_dir, self.run_dir)
            config_path.unlink(missing_ok=True)   # never written through a link left in its place
            fd = os.open(config_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
            with os.fdopen(fd, "w") as f:
                f.write(overrides.dump_config(self.state.config))
        except OSError as exc:
            raise WriteFailed(f"{exc.filename or config_path}: cannot write: {exc.strerror or exc}") from exc
        self._clean_leftovers()
        self._total = total_steps(self.state.config) or total_steps(self.state.defaults)
        env = upkeep.child_env(n, run_dir=self.run_dir, config_path=config_path, metrics_path=self.metrics_path,
                               checkpoint_dir=self.checkpoint_dir, state=self.state, extra=self.memory.env())
        command = self.topology.wrap(self.launch.command, n, attempt_dir)
        command = self.script.command(command, self.state.config, self.state.resume_from)
        env.update(self.script.env(self.state.config, attempt_dir))
        talk.begin(n)
        watch = AttemptWatch()
        launched = self.launcher.start(command, env, attempt_dir / "output.log", self.report.output, talk.line_hook)
        child = self._child = launched.child
        self._launched += 1
        if launched.note:
            self._say(launched.note, "warn")
        self._event(Event.ATTEMPT_START, attempt=n, pid=child.pid, host=socket.gethostname(),
                    command=list(launched.command or command), warm=launched.warm,
                    warm_ranks=launched.warm_ranks or None,
                    config_path=str(config_path), overrides=dict(self.state.overrides),
                    resume_from=self.state.resume_from, resume_step=self.state.resume_step,
                    skip_steps=[f"{a}-{b}" for a, b in self.state.skip] or None,
                    inject=format_inject(self.state.inject) or None)
        from ftrain.classify import read_oom_kill_count  # after the spawn: its patterns take a while to compile

        oom_before = read_oom_kill_count()
        where = f"from {Path(self.state.resume_from).name}" if self.state.resume_from else "fresh"
        self._say(f"attempt {n} started (pid {child.pid}, {where}{', warm' if launched.warm else ''}"
                  f"{f', {launched.warm_ranks} warm ranks' if launched.warm_ranks else ''})")
        self.detectors.start_attempt(time.monotonic(), attempt=n)
        self.topology.started(n, attempt_dir, child.pid)
        self.intake.begin()

        anomaly, interrupted = self._watch(child, talk, watch, n, command, env, attempt_dir)
        ended_first = False   # the script had ended on its own when its anomaly was acted on
        if anomaly is not None:
            self._say(f"stopping attempt {n}: {anomaly.reason}", "warn")
            ended_first = child.proc.poll() is not None
            anomaly = self._stop_for(child, anomaly)
        exit_ = child.finish()
        self._child = None
        self._quiet_since = time.time()
        # What the script wrote before it ended but was read only now is judged as if read in
        # time: whether a NaN two lines before the exit is acted on must not depend on how
        # soon this process was scheduled. Past an anomaly, or after we asked it to stop, the
        # rest is only journaled.
        late = None
        while True:   # batch by batch: a flood's last lines (its NaN) are judged too
            found = self.intake.take(talk.read_new(), watch, time.monotonic(),
                                     act=anomaly is None and not interrupted and late is None)
            late = late or found
            if not talk.backlog:
                break
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
        while child.pump(0 if talk.backlog else timeout):   # a backlog is read on at once
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
                total = self._total or total_steps(watch.config_defaults or {})   # learnt as attempt 1 runs
                self.report.status(Progress(n, watch.last_step, watch.metrics, watch.rate, total,
                                            self.state.restarts, self.policy.max_restarts, self._last_event))
            if child.woken and watch.steps != seen and not talk.backlog:
                time.sleep(COALESCE)  # let a busy stream gather: one look per COALESCE, not per line
        return None, False

    def _stop_for(self, child: Child, anomaly: Anomaly) -> Anomaly:
        """Stop an attempt for its anomaly; a hang first dumps its stacks. Returns the anomaly,
        a hang's evidence led by the processes that were stopped (SIGSTOP: state T), not hung."""
        if anomaly.kind is FailureKind.HANG:
            frozen = child.stopped()
            if frozen:
                anomaly = replace(anomaly, evidence=(f"{', '.join(frozen[:4])}: stopped (state T, SIGSTOP "
                                                     "or a debugger), not running", *anomaly.evidence))
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
        return anomaly

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
        if rule is None:   # a straggler is news, not a fault, until a rule says what to do with it
            return anomaly.kind is not FailureKind.STRAGGLER
        return rule.action is not Action.IGNORE

    def _record_anomaly(self, anomaly: Anomaly, ignored: bool) -> None:
        value = anomaly.value if anomaly.value is None or math.isfinite(anomaly.value) else str(anomaly.value)
        self._event(Event.ANOMALY, attempt=self.state.attempt, kind=anomaly.kind.value, step=anomaly.step,
                    metric=anomaly.metric, value=value, reason=anomaly.reason,
                    evidence=list(anomaly.evidence), action="ignore" if ignored else None)
        note = " (ignored by policy)" if ignored else ""
        if ignored and self.policy.rule_for(anomaly.kind) is None:
            note = f" (reported only: no rule names {anomaly.kind.value})"
        self._say(f"anomaly: {anomaly.reason}{note}", "warn")
