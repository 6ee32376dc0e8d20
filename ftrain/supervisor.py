"""The attempt loop: launch, watch, classify, decide, restart — or stop and say why.

The supervisor owns the run folder and its journal. It sees the child only through the
process layer (``process.Child``), the metrics only through ``watch``, and turns what ended
into a ``Failure`` (``classify``) that the ``Policy`` maps to a ``Decision``. Everything a
resume needs is in ``journal.jsonl``; ``RunState.replay`` rebuilds it from there.

    run_start ─► attempt_start ─► [anomaly] ─► failure ─► decision ─► attempt_end ─┐
                      ▲                                                            │
                      └──────────────── restart / rollback (after backoff) ◄───────┘
                 attempt_end (success, stop, budget spent, interrupt) ─► run_end
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import platform
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Protocol, Sequence

from ftrain import __version__, checkpoints, overrides
from ftrain.errors import RunDirError, UsageError
from ftrain.inject import Fault, format_inject
from ftrain.journal import JOURNAL_VERSION, Event, Journal, RunStatus, read_journal
from ftrain.kinds import Failure, FailureKind
from ftrain.policy import Action, Decision, Policy
from ftrain.process import Child, Exit, stop_leftover
from ftrain.state import RunState, remove_fault
from ftrain.warm import Spare, fits
from ftrain.detect import Anomaly, Detectors
from ftrain.tail import ChangeNotifier, Tailer

if TYPE_CHECKING:
    from ftrain.distributed import Distributed

POLL = 0.02       # seconds between looks at the metrics file, where no change notifier exists
POLL_IDLE = 0.25  # with a notifier: the longest sleep (hang checks, status, signals)
COALESCE = 0.03   # after an ingest that found lines, wait this long: a busy stream costs <= ~30 wake-ups/s
STATUS_EVERY = 0.25


class Listener(Protocol):
    """Something that mirrors the run elsewhere (e.g. TensorBoard): sees every metrics record
    and every journal event as they happen."""

    def on_metrics(self, record: Mapping[str, Any]) -> None: ...
    def on_event(self, record: Mapping[str, Any]) -> None: ...
    def close(self) -> None: ...


class ScriptAdapter(Protocol):
    """How to drive a script that does not use the shim (policy ``script:`` section)."""

    def command(self, base: Sequence[str], config: Mapping[str, Any], resume_from: str | None) -> tuple[str, ...]: ...
    def env(self, config: Mapping[str, Any], attempt_dir: Path) -> dict[str, str]: ...
    def parse_line(self, line: str) -> dict[str, Any] | None: ...
    def checkpoints(self, cwd: Path) -> list[Any]: ...
    def vet_decision(self, decision: Decision, found: Sequence[Any]) -> Decision: ...
    @property
    def delivers_config(self) -> bool: ...
    @property
    def reads_output(self) -> bool: ...
    @property
    def owns_checkpoints(self) -> bool: ...


class Reporter(Protocol):
    """Where the supervisor tells a person what happens (plain lines or a live view)."""

    def output(self, data: bytes, is_err: bool) -> None: ...
    def event(self, message: str, *, level: str = "info") -> None: ...
    def status(self, attempt: int, step: int | None, metrics: Mapping[str, Any], rate: float | None,
               last_event: str) -> None: ...
    def close(self) -> None: ...


@dataclass
class AttemptWatch:
    """What one attempt showed in its metrics stream."""

    first_step: int | None = None
    last_step: int | None = None
    max_step: int | None = None
    steps: int = 0
    fired: list[tuple[str, int | None]] = field(default_factory=list)
    stop_requested: bool = False
    saves: int = 0
    config_digest: str | None = None
    last_record: Mapping[str, Any] = field(default_factory=dict)
    rate: float | None = None
    _rate_mark: tuple[float, int] | None = None

    @property
    def metrics(self) -> dict[str, Any]:
        """The latest metric values (built on demand: the live view asks a few times a second)."""
        return {k: v for k, v in self.last_record.items() if k not in ("step", "t", "attempt")}

    def see(self, records: Sequence[Mapping[str, Any]], now: float) -> None:
        """Take the records of one read, made at ``now``."""
        steps, max_step, last = self.steps, self.max_step, None
        for record in records:
            control = record.get("ftrain")
            if control is not None:
                if control == "inject":
                    self.fired.append((str(record.get("fault")), record.get("at")))
                elif control == "stop_requested":
                    self.stop_requested = True
                elif control == "config":
                    self.config_digest = record.get("digest")
                elif control == "save_end" and record.get("path"):
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


@dataclass(frozen=True)
class LaunchSpec:
    """How to start the training script: the command, where, with what config."""

    command: tuple[str, ...]
    cwd: Path
    base_config: Mapping[str, Any]
    script: str
    script_args: tuple[str, ...] = ()
    config_path: str | None = None
    sets: Mapping[str, Any] = field(default_factory=dict)
    tensorboard: str | None = None


def build_command(script: str, args: Sequence[str]) -> tuple[str, ...]:
    """``.py`` runs with our own interpreter; anything else is executed as a command."""
    path = Path(script)
    if script.endswith(".py"):
        if not path.is_file():
            raise UsageError(f"{script}: script not found")
        return (sys.executable, str(path.resolve()), *args)
    if "/" in script:
        if not path.is_file():
            raise UsageError(f"{script}: script not found")
        if not os.access(path, os.X_OK):
            raise UsageError(f"{script}: not executable (chmod +x, or name a .py script)")
        return (str(path.resolve()), *args)
    found = shutil.which(script)
    if found is None:
        if path.is_file():
            raise UsageError(f"{script}: not executable (chmod +x, or name a .py script)")
        raise UsageError(f"{script}: command not found")
    return (found, *args)


class RunLock:
    """An exclusive lock on a run folder, held while a supervisor works on it. The kernel
    drops it when the holder dies, so a stale lock of a dead supervisor is simply taken."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / ".lock"
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
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


def write_json_atomic(path: Path, data: Any) -> None:
    """Write to a temporary name, then rename into place: a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, default=str)
        f.write("\n")
    os.replace(tmp, path)


class Supervisor:
    """Runs attempts until the script succeeds or the policy stops; returns the exit code."""

    def __init__(self, run_dir: Path, policy: Policy, launch: LaunchSpec, reporter: Reporter, *,
                 inject: Sequence[Fault] = (), state: RunState | None = None,
                 max_restarts: int | None = None, adapter: ScriptAdapter | None = None,
                 listeners: Sequence[Listener] = (), dist: Distributed | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.policy = policy if max_restarts is None else replace(policy, max_restarts=max_restarts)
        self.launch = launch
        self.report = reporter
        self.state = state or RunState(config=dict(launch.base_config), inject=list(inject))
        self.checkpoint_dir = self.run_dir / "checkpoints"
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.detectors = Detectors(self.policy.detect)
        self.adapter = adapter
        self.dist = dist   # several ranks under torchrun, several nodes (ftrain.distributed)
        if dist is not None:
            dist.bind(self._say)
        self._hook_fds: list[int] = []
        self._spare: Spare | None = None   # the next attempt's interpreter, imports done (ftrain.warm)
        self.listeners = list(listeners)
        self._notifier: ChangeNotifier | None = None
        self.open_attempt: dict[str, Any] | None = None  # resume: an attempt whose supervisor died
        self._signal: int | None = None
        self._last_event = ""
        self.journal: Journal | None = None

    # ------------------------------------------------------------------ lifecycle
    def run(self, *, resuming: bool = False) -> int:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        lock = RunLock(self.run_dir)
        self.journal = Journal(self.run_dir / "journal.jsonl")
        os.close(os.open(self.metrics_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644))
        self._notifier = ChangeNotifier.create(self.metrics_path)
        self.checkpoint_dir.mkdir(exist_ok=True)
        (self.run_dir / "attempts").mkdir(exist_ok=True)
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM,
                                                                            signal.SIGUSR1)}
        try:
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
        finally:
            if self._spare is not None:
                self._spare.discard()
                self._spare = None
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self.journal.close()
            if self._notifier is not None:
                self._notifier.close()
            for listener in self.listeners:
                listener.close()
            lock.release()
            self.report.close()

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
        assert self.journal is not None
        if self.open_attempt is not None:
            pid, started = self.open_attempt.get("pid"), float(self.open_attempt.get("t", 0))
            stopped = isinstance(pid, int) and stop_leftover(pid, started, grace=self.policy.grace)
            if stopped:
                self._say(f"stopped pid {self.open_attempt.get('pid')} left running by the previous supervisor",
                          "warn")
            self._event(Event.ATTEMPT_END, attempt=self.open_attempt.get("attempt"), exit_code=None,
                               signal=None, kind=None, supervisor_lost=True, orphan_stopped=stopped,
                               no_progress_streak=self.state.no_progress_streak)
        newest = self._usable_checkpoints()
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
            "cwd": str(self.launch.cwd),
            "policy": self.policy.source,
            "config_path": self.launch.config_path,
            "sets": dict(self.launch.sets),
            "tensorboard": self.launch.tensorboard,
            "distributed": self.dist.spec.to_json() if self.dist is not None else None,
            "base_config": dict(self.launch.base_config),
            "inject": format_inject(self.state.inject) or None,
            "created": time.time(),
            "versions": {"ftrain": __version__, "python": platform.python_version(),
                         "platform": platform.platform()},
        })

    # ------------------------------------------------------------------ the loop
    def _loop(self) -> int:
        assert self.journal is not None
        while True:
            if self.dist is not None:
                self.dist.before_attempt(self.state)
            self.state.attempt += 1
            n = self.state.attempt
            failure, exit_, watch = self._attempt(n)
            agreed: Decision | None = None
            if self.dist is not None:   # several nodes: node 0 decides for all
                def decide(f: Failure) -> Decision:
                    return self.policy.decide(f, self.state.history(), self._usable_checkpoints())

                failure, agreed = self.dist.agree(n, failure, interrupted=lambda: self._signal is not None,
                                                  decide=decide)
            progress = watch.max_step is not None and (self.state.best_step is None
                                                       or watch.max_step > self.state.best_step)
            if n > 1 or self.state.restarts > 0:
                self.state.no_progress_streak = 0 if progress else self.state.no_progress_streak + 1
            if progress:
                self.state.best_step = watch.max_step
            for kind, step in watch.fired:
                self.state.inject = remove_fault(self.state.inject, kind, step)

            interrupted = self._signal is not None
            if failure is None or interrupted:
                status = RunStatus.SUCCEEDED if failure is None and not interrupted else RunStatus.INTERRUPTED
                self._end_attempt(n, exit_, watch, failure)
                if status is RunStatus.SUCCEEDED:
                    return self._end_run(status, f"the script finished (attempt {n}, last step {watch.last_step})", 0)
                code = 130 if self._signal == signal.SIGINT else 143
                name = signal.Signals(self._signal).name if self._signal else "signal"
                return self._end_run(status, f"{name} received: the script was asked to stop; "
                                             f"`ftrain resume {self.run_dir}` continues", code)

            ckpts = self._usable_checkpoints()
            decision = agreed or self.policy.decide(failure, self.state.history(), ckpts)
            if self.adapter is not None:
                decision = self.adapter.vet_decision(decision, ckpts)
            if decision.action is Action.IGNORE:
                # An ignored anomaly that ended the attempt (exit 0 with NaN last): the script finished.
                self._journal_decision(n, decision, failure)
                self._end_attempt(n, exit_, watch, failure)
                return self._end_run(RunStatus.SUCCEEDED, f"the script finished; {decision.reason}", 0)
            self._journal_decision(n, decision, failure)
            self._end_attempt(n, exit_, watch, failure)
            if decision.action is Action.STOP:
                status = RunStatus.GAVE_UP if decision.gave_up else RunStatus.STOPPED
                return self._end_run(status, decision.reason, 1)
            if decision.action is Action.ROLLBACK:
                moved = checkpoints.quarantine(self.checkpoint_dir, after_step=decision.quarantine_after
                                               if decision.quarantine_after is not None else -1)
                if moved:
                    self._say(f"quarantined {len(moved)} checkpoint file(s) after step {decision.quarantine_after}")
            self.state.apply(decision, failure.step, t=time.time())
            if decision.backoff > 0:
                self._say(f"waiting {decision.backoff:g}s before attempt {n + 1}")
                if not self._sleep(decision.backoff):
                    code = 130 if self._signal == signal.SIGINT else 143
                    return self._end_run(RunStatus.INTERRUPTED, "interrupted during backoff; "
                                         f"`ftrain resume {self.run_dir}` continues", code)

    def _sleep(self, seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self._signal is not None:
                return False
            time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))
        return self._signal is None

    def _usable_checkpoints(self) -> list[checkpoints.Checkpoint]:
        if self.adapter is not None and self.adapter.owns_checkpoints:
            return sorted(self.adapter.checkpoints(self.launch.cwd), key=lambda c: c.step)
        usable = {checkpoints.CheckpointStatus.OK, checkpoints.CheckpointStatus.UNVERIFIED}
        return [c for c in checkpoints.scan(self.checkpoint_dir) if c.status in usable and c.step is not None]

    def _journal_decision(self, n: int, decision: Decision, failure: Failure) -> None:
        assert self.journal is not None
        self._event(Event.DECISION, attempt=n, failure_step=failure.step, **decision.to_json())
        level = "error" if decision.action is Action.STOP else "warn"
        self._say(f"decision: {decision.reason}", level)

    def _end_attempt(self, n: int, exit_: Exit | None, watch: AttemptWatch, failure: Failure | None) -> None:
        assert self.journal is not None
        self._event(
            Event.ATTEMPT_END, attempt=n,
            exit_code=exit_.returncode if exit_ else None, signal=exit_.signal_name if exit_ else None,
            kind=failure.kind.value if failure else None,
            first_step=watch.first_step, last_step=watch.last_step, max_step=watch.max_step,
            steps=watch.steps, injected=watch.fired, stop_requested=watch.stop_requested,
            no_progress_streak=self.state.no_progress_streak,
            strays_killed=exit_.strays_killed if exit_ else 0,
        )

    def _end_run(self, status: RunStatus, reason: str, code: int) -> int:
        assert self.journal is not None
        self._event(Event.RUN_END, status=status.value, reason=reason, exit_code=code,
                           attempts=self.state.attempt, restarts=self.state.restarts)
        level = "info" if status is RunStatus.SUCCEEDED else "error"
        self._say(f"run {status.value}: {reason}", level)
        return code

    # ------------------------------------------------------------------ one attempt
    def _attempt(self, n: int) -> tuple[Failure | None, Exit | None, AttemptWatch]:
        assert self.journal is not None
        attempt_dir = self.run_dir / "attempts" / f"{n:04d}"
        attempt_dir.mkdir(parents=True, exist_ok=True)
        config_path = attempt_dir / "config.yaml"
        config_path.write_text(overrides.dump_config(self.state.config))
        env = self._child_env(n, config_path)
        command = tuple(self.launch.command)
        if self.dist is not None:
            command = self.dist.command(command, n, attempt_dir)
        line_hook = None
        if self.adapter is not None:
            command = self.adapter.command(command, self.state.config, self.state.resume_from)
            env.update(self.adapter.env(self.state.config, attempt_dir))
            if self.adapter.reads_output:
                line_hook = self._metrics_from_output(n)
        tailer = Tailer(self.metrics_path, start_at_end=True)
        watch = AttemptWatch()
        child, warm = self._launch(command, env, attempt_dir / "output.log", line_hook)
        self._event(Event.ATTEMPT_START, attempt=n, pid=child.pid, command=list(command), warm=warm,
                           config_path=str(config_path), overrides=dict(self.state.overrides),
                           resume_from=self.state.resume_from, resume_step=self.state.resume_step,
                           skip_steps=[f"{a}-{b}" for a, b in self.state.skip] or None,
                           inject=format_inject(self.state.inject) or None)
        from ftrain.classify import read_oom_kill_count  # after the spawn: its patterns take a while to compile

        oom_before = read_oom_kill_count()
        where = f"from {Path(self.state.resume_from).name}" if self.state.resume_from else "fresh"
        self._say(f"attempt {n} started (pid {child.pid}, {where}{', warm' if warm else ''})")
        self.detectors.start_attempt(time.monotonic(), attempt=n)
        if self.dist is not None:
            self.dist.start_attempt(n, attempt_dir, child.pid)

        anomaly: Anomaly | None = None
        interrupted_sent = False
        last_status = 0.0
        ignored: set[tuple[str, str | None]] = set()
        timeout = POLL
        if self._notifier is not None:
            child.wake_on(self._notifier.fileno(), self._notifier.drain)
            timeout = POLL_IDLE
        want_spare = self.policy.warm_start and fits(command, sys.executable) and self._spare is None
        while child.pump(timeout):
            now = time.monotonic()
            seen = watch.steps
            anomaly = self._ingest(tailer, watch, n, ignored)
            if anomaly is not None:
                break
            if want_spare and watch.first_step is not None:   # its start-up is over: ours can begin
                want_spare = False
                self._spare = self._start_spare(command, env, attempt_dir / "modules.txt")
            anomaly = self.detectors.check_hang(now)
            if anomaly is None and self.dist is not None:   # one stuck rank, a failed or lost node
                anomaly = self.dist.check(self.detectors.hang_timeout, step=watch.last_step)
            if anomaly is not None and self._act_on(anomaly, n, ignored):
                break
            anomaly = None
            if self._signal is not None and not interrupted_sent:
                interrupted_sent = True
                self._say(f"{signal.Signals(self._signal).name}: asking the script to stop "
                          f"(grace {self.policy.grace:g}s)", "warn")
                child.stop(self.policy.grace, cooperative=True)
                break
            if now - last_status >= STATUS_EVERY:
                last_status = now
                self.report.status(n, watch.last_step, watch.metrics, watch.rate, self._last_event)
            if child.woken and watch.steps != seen:
                time.sleep(COALESCE)  # let a busy stream gather: one look per COALESCE, not per line

        ended_first = False   # the script had ended on its own when its anomaly was acted on
        if anomaly is not None:
            self._say(f"stopping attempt {n}: {anomaly.reason}", "warn")
            ended_first = child.proc.poll() is not None
            dump = anomaly.kind is FailureKind.HANG
            if dump and self.dist is not None:   # SIGUSR1 to each rank; it would kill torchrun
                self.dist.dump_stacks()
                dump = False
            answered, since = None, None
            if anomaly.kind is FailureKind.HANG and self.dist is None:
                since = Tailer(self.metrics_path, start_at_end=True)
                answered = lambda: self._acting_on_term(since.read_new())   # noqa: E731
            child.stop(self.policy.grace, dump_stacks=dump, cooperative=False, answered=answered)
            if since is not None:
                since.close()
        exit_ = child.finish()
        # What the script wrote before it ended but was read only now is judged as if read in
        # time: whether a NaN two lines before the exit is acted on must not depend on how
        # soon this process was scheduled. Past an anomaly, or after we asked it to stop, the
        # rest is only journaled.
        late = self._ingest(tailer, watch, n, ignored, act=anomaly is None and not interrupted_sent)
        if late is not None:
            self._say(f"attempt {n} ended before its last lines were read: {late.reason}", "warn")
            anomaly, ended_first = late, True
        tailer.close()
        while self._hook_fds:
            os.close(self._hook_fds.pop())
        if exit_.strays_killed:
            self._say(f"stopped {exit_.strays_killed} leftover process(es) of attempt {n}", "warn")

        failure = self._classify(anomaly, exit_, child, watch, oom_before, interrupted_sent, ended_first)
        if failure is not None:
            self._event(Event.FAILURE, attempt=n, **failure.to_json())
            where = f"at step {failure.step}" if failure.step is not None else "before its first step"
            self._say(f"attempt {n} failed: {failure.kind.value} {where}"
                      + (f" — {failure.evidence[0]}" if failure.evidence else ""), "error")
        delivered = self.adapter is not None and self.adapter.delivers_config
        if watch.max_step is not None and self.state.overrides and watch.config_digest is None and not delivered:
            self._say("the script logged steps but never called ftrain.config(): "
                      "the overrides may not have reached it", "warn")
        return failure, exit_, watch

    @staticmethod
    def _acting_on_term(records: Sequence[Mapping[str, Any]]) -> bool:
        """After a TERM to a hung attempt, from the records written since: False when the
        shim's handler took the TERM (``stop_requested``) but the loop showed nothing else (no
        step, no save): it waits for a ``should_stop()`` that a hung loop never reaches.
        True otherwise: a step or save means it can use the grace, and silence may be a
        script's own handler saving, or a process stuck in C where no handler has run yet;
        those keep the whole grace."""
        controls = [r.get("ftrain") for r in records]
        return "stop_requested" not in controls or any(c != "stop_requested" for c in controls)

    def _launch(self, command: Sequence[str], env: Mapping[str, str], log_path: Path,
                line_hook: Any) -> tuple[Child, bool]:
        """The attempt's process: the waiting spare if it fits, else a new one. (child, warm)"""
        spare, self._spare = self._spare, None
        if spare is not None:
            died = spare.child.proc.poll()
            child = spare.launch(command, env, log_path, self.report.output, line_hook)
            if child is not None:
                return child, True
            if died is not None and died < 0:   # the OOM killer's first pick while it waited
                how = Exit(died, spare.child.pid, 0).signal_name
                self._say(f"the spare interpreter was killed by {how} while it waited; starting cold", "warn")
        try:
            return Child(command, env=env, cwd=self.launch.cwd, log_path=log_path,
                         sink=self.report.output, line_hook=line_hook), False
        except OSError as exc:
            raise UsageError(f"{self.launch.command[0]}: cannot start: {exc.strerror}") from exc

    def _start_spare(self, command: Sequence[str], env: Mapping[str, str], modules: Path) -> Spare | None:
        try:
            return Spare(command, env, self.launch.cwd, modules)
        except OSError as exc:   # no warm start then; the next attempt starts cold
            self._say(f"could not start a spare interpreter: {exc.strerror}", "warn")
            return None

    def _metrics_from_output(self, n: int) -> Any:
        """A line hook that turns the script's progress lines into metrics records, appended
        to metrics.jsonl like the shim's, so every detector works unchanged."""
        assert self.adapter is not None
        adapter = self.adapter
        fd = os.open(self.metrics_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._hook_fds.append(fd)

        def hook(line: str) -> None:
            record = adapter.parse_line(line)
            if record is not None:
                record = {"step": record.pop("step"), "t": time.time(), "attempt": n, **record}
                os.write(fd, (json.dumps(record) + "\n").encode())

        return hook

    def _ingest(self, tailer: Tailer, watch: AttemptWatch, n: int, ignored: set, act: bool = True) -> Anomaly | None:
        """Take the new records: the attempt's view, the listeners, the detectors. With ``act``,
        returns the first anomaly that must stop the attempt (journaled already); the records
        after it are still counted and mirrored, but no longer judged."""
        now = time.monotonic()
        records = tailer.read_new()
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
            if not act:
                self._record_anomaly(anomaly, n)
            elif self._act_on(anomaly, n, ignored):
                found = anomaly
        if watch.saves != saves:
            self._retain(watch)
        return found

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

    def _act_on(self, anomaly: Anomaly, n: int, ignored: set) -> bool:
        """Journal an anomaly; True if the attempt must be stopped for it."""
        rule = self.policy.rule_for(anomaly.kind)
        if rule is not None and rule.action is Action.IGNORE:
            key = (anomaly.kind.value, anomaly.metric)
            if key not in ignored:
                ignored.add(key)
                self._record_anomaly(anomaly, n, action="ignore")
            return False
        self._record_anomaly(anomaly, n)
        return True

    def _record_anomaly(self, anomaly: Anomaly, n: int, action: str | None = None) -> None:
        assert self.journal is not None
        value = anomaly.value if anomaly.value is None or math.isfinite(anomaly.value) else str(anomaly.value)
        self._event(Event.ANOMALY, attempt=n, kind=anomaly.kind.value, step=anomaly.step,
                           metric=anomaly.metric, value=value, reason=anomaly.reason,
                           evidence=list(anomaly.evidence), action=action)
        self._say(f"anomaly: {anomaly.reason}" + (" (ignored by policy)" if action == "ignore" else ""), "warn")

    def _classify(self, anomaly: Anomaly | None, exit_: Exit, child: Child, watch: AttemptWatch,
                  oom_before: int | None, interrupted: bool, ended_first: bool = False) -> Failure | None:
        """The attempt's failure: the anomaly it was stopped for, else what its exit says. An
        anomaly of a script that had ended on its own by the time it was acted on
        (``ended_first``; read late, say) is the failure as if acted on in time, with what the
        exit says after it when that was a failure too."""
        from ftrain.classify import classify, read_oom_kill_count
        if anomaly is not None:
            if self.dist is not None:
                anomaly = self.dist.explain(anomaly)
            if not ended_first:
                return anomaly.to_failure(exit_code=exit_.returncode, signal=exit_.signal_name)
        oom_after = read_oom_kill_count()
        # A spare is the OOM killer's first pick (ftrain.warm): its death is not the attempt's.
        spare_killed = int(self._spare is not None and self._spare.child.proc.poll() == -signal.SIGKILL)
        oom_killed = oom_before is not None and oom_after is not None and oom_after - oom_before > spare_killed
        failure = None
        if self.dist is not None and exit_.returncode != 0 and not interrupted:   # ranks' TERMs are torchrun's
            failure = self.dist.root_cause(child.tail_lines(), step=watch.last_step, oom_killed=oom_killed)
        failure = failure or classify(exit_.returncode, child.tail_lines(), step=watch.last_step,
                                      oom_killed=oom_killed, stop_requested=watch.stop_requested or interrupted)
        if anomaly is not None:   # the anomaly came first; how the script ended follows it
            then = (f"then the script ended: {failure.kind.value}", *failure.evidence[:3]) if failure else ()
            found = anomaly.to_failure(exit_code=exit_.returncode, signal=exit_.signal_name)
            return replace(found, evidence=(*found.evidence, *then))
        if failure is None:
            bad = {m: v for m, v in self.detectors.last_values.items()
                   if isinstance(v, float) and not math.isfinite(v)}
            if bad:
                metric, value = next(iter(bad.items()))
                return Failure(FailureKind.NONFINITE, exit_code=exit_.returncode, step=watch.last_step,
                               evidence=(f"exit 0 but the last {metric} is {value}",))
        return failure

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
            env["FTRAIN_RESUME_FROM"] = str(self.state.resume_from)
        if self.state.skip:
            env["FTRAIN_SKIP_STEPS"] = ",".join(f"{a}-{b}" for a, b in self.state.skip)
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
