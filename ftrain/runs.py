"""Starting and resuming runs: command-line values in, a checked and wired Supervisor out.

Everything that can be refused is refused here, before anything is launched: the policy,
the config and its overrides, the fault spec, the script, the run folder. And everything
that varies between jobs is chosen here, once: the ``Script`` (the shim, or the policy's
``script:`` adapter), the ``Topology`` (one process, torchrun's ranks, several nodes), the
``Launcher`` (warm or cold) and the listeners (TensorBoard).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ftrain import overrides
from ftrain.errors import ConfigError, PolicyError, RunDirError, UsageError
from ftrain.files import write_atomic
from ftrain.inject import Fault, parse_inject
from ftrain.journal import JOURNAL_VERSION, Event, read_journal
from ftrain.launch import LaunchSpec, build_command, make_launcher
from ftrain.policy import Policy
from ftrain.policyfile import load_policy
from ftrain.process import become_subreaper
from ftrain.rundir import POLICY_COPY, read_run_json, read_run_policy
from ftrain.script import SHIM, Script
from ftrain.state import RunState, remove_fault
from ftrain.supervisor import Reporter, Supervisor, check_fresh_run_dir, new_run_dir
from ftrain.topology import Single, Topology
from ftrain.view import make_reporter

RUNS_DIR = Path("runs")
# torchrun's and Slurm's variables that make a plain `ftrain run` a distributed one
_DIST_ENV = {"PET_NPROC_PER_NODE", "PET_NNODES", "SLURM_STEP_NUM_NODES"}


def _parse_inject(spec: str | None) -> tuple[Fault, ...]:
    if not spec:
        return ()
    try:
        return parse_inject(spec)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def base_config(config_path: Path | None, sets: Sequence[str]) -> dict[str, Any]:
    """The config file with ``--set`` applied. With a file, a --set key must exist in it."""
    return overrides.with_sets(overrides.load_config(config_path), sets, config_path)


def start_run(*, script: str, script_args: tuple[str, ...], policy_path: Path | None,
              config_path: Path | None, sets: tuple[str, ...], run_dir: Path | None, inject: str | None,
              no_ui: bool, tensorboard: Path | None, nproc_per_node: int, nnodes: int | str, node_rank: int,
              rdzv_endpoint: str | None) -> int:
    """Check everything, then supervise a new run. Returns the exit status."""
    policy = load_policy(policy_path)
    config = base_config(config_path, sets)
    # Without --config the script's config is its ftrain.config(defaults=...), known when it runs.
    problems = policy.check_config(config if config_path is not None else None)
    if problems:
        raise PolicyError(problems)
    faults = _parse_inject(inject)
    if tensorboard is not None:   # before any folder is made
        from ftrain.tensorboard import require_tensorboard

        require_tensorboard()
    spec = None
    if nproc_per_node != 1 or str(nnodes).strip() != "1" or rdzv_endpoint or _DIST_ENV & os.environ.keys():
        from ftrain.torchrun import DistSpec  # only then: it costs start-up time

        spec = DistSpec.from_cli(nproc_per_node, nnodes, node_rank, rdzv_endpoint)
    if spec is not None and spec.multi_node and run_dir is None:
        raise UsageError(f"--nnodes {spec.nnodes}: give every node the same --run-dir on a shared file system")
    command = build_command(script, script_args)
    run_dir = run_dir if run_dir is not None else new_run_dir(RUNS_DIR, script)
    job_dir = run_dir.absolute()
    run_dir = job_dir
    if spec is not None:   # node K > 0 of several keeps its own records inside the job's folder
        from ftrain.topology import node_dir

        run_dir = node_dir(spec, job_dir)
    check_fresh_run_dir(run_dir)
    script_side = make_script(policy, config, cwd=Path.cwd(), run_dir=run_dir, started=time.time())
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(run_dir / POLICY_COPY, policy.text, durable=True)
    except OSError as exc:
        raise RunDirError(f"{run_dir}: cannot create run folder: {exc.strerror}") from exc
    launch = LaunchSpec(command=command, cwd=Path.cwd(), base_config=config, script=script,
                        script_args=script_args, config_path=str(config_path.resolve()) if config_path else None,
                        sets=dict(overrides.parse_set(s) for s in sets),
                        tensorboard=str(tensorboard.resolve()) if tensorboard else None)
    become_subreaper()
    reporter = make_reporter(no_ui)
    listeners = make_listeners(tensorboard, policy, run_dir, reporter, spec)
    supervisor = Supervisor(run_dir, policy, launch, reporter, inject=faults, script=script_side,
                            topology=make_topology(spec, run_dir, job_dir, reporter, policy), listeners=listeners,
                            launcher=make_launcher(policy.warm_start, launch.cwd, command[0]))
    return supervisor.run()


def make_script(policy: Policy, config: dict[str, Any] | None, *, cwd: Path | None = None,
                run_dir: Path | None = None, started: float | None = None) -> Script:
    """How ftrain reaches the script: the shim, or the policy's ``script:`` adapter."""
    if not policy.script:
        return SHIM
    from ftrain.adapter import ScriptAdapter

    return ScriptAdapter.from_policy(policy.script, source=policy.source, config=config, cwd=cwd, run_dir=run_dir,
                                     started=started)


def make_topology(spec: Any, run_dir: Path, job_dir: Path, reporter: Reporter, policy: Policy) -> Topology:
    """One process, or torchrun's ranks on one or several machines (``ftrain.topology``);
    what happens between the nodes is told through ``reporter``; the ranks are watched for
    a straggler as the policy's ``detect: straggler`` says."""
    if spec is None:
        return Single(run_dir)
    from ftrain.topology import make_topology as make

    return make(spec, run_dir, job_dir, say=lambda message, level: reporter.event(message, level=level),
                straggler=policy.detect.straggler)


def make_listeners(tensorboard: Path | None, policy: Policy, run_dir: Path, reporter: Reporter,
                   spec: Any = None) -> list[Any]:
    """What mirrors the run elsewhere: TensorBoard (``--tensorboard``), alerts (``notify:``,
    from node 0 only: every node journals the same decisions)."""
    listeners: list[Any] = []
    if tensorboard is not None:
        from ftrain.tensorboard import TensorBoardMirror

        listeners.append(TensorBoardMirror(tensorboard))
    if policy.notify.enabled and getattr(spec, "node_rank", 0) == 0:
        from ftrain.notify import Notifier

        listeners.append(Notifier(policy.notify, run_dir,
                                  say=lambda message, level: reporter.event(message, level=level)))
    return listeners


def newest_run(base: Path = RUNS_DIR) -> Path:
    candidates = [p.parent for p in base.glob("*/journal.jsonl")] if base.is_dir() else []
    if not candidates:
        raise RunDirError(f"{base}/: no run folders to resume")
    return max(candidates, key=lambda p: (p / "journal.jsonl").stat().st_mtime)


def fired_injections(metrics_path: Path) -> list[tuple[str, int | None]]:
    """Faults the shim reported firing, from the metrics stream (covers an attempt whose
    supervisor died before journaling its end). Read in chunks: the stream may be large."""
    fired: list[tuple[str, int | None]] = []
    try:
        f = open(metrics_path, "rb")
    except OSError:
        return fired
    with f:
        carry = b""
        while chunk := f.read(1 << 20):
            lines = (carry + chunk).split(b"\n")
            carry = lines.pop()
            for raw in lines:
                if b'"inject"' not in raw:
                    continue
                try:
                    record = json.loads(raw)
                except (ValueError, RecursionError):
                    continue
                if isinstance(record, dict) and record.get("ftrain") == "inject":
                    at = record.get("at")
                    fired.append((str(record.get("fault")), at if type(at) is int else None))
    return fired


def resume_run(run_dir: Path | None, *, max_restarts: int | None, no_ui: bool) -> int:
    """Continue a run from its journal. Returns the exit status."""
    run_dir = (run_dir if run_dir is not None else newest_run()).absolute()
    journal = run_dir / "journal.jsonl"
    events = read_journal(journal) if run_dir.is_dir() and os.path.lexists(journal) else None
    start = next((e for e in events or () if e.get("event") == Event.RUN_START.value), None)
    if events is not None and start is None and not any(e.get("event") == Event.ATTEMPT_START.value for e in events):
        raise RunDirError(f"{run_dir}: the run never started (its supervisor stopped before run_start); "
                          f"start it with `ftrain run SCRIPT ... --run-dir {run_dir}`")
    info = read_run_json(run_dir)
    if events is None:
        events = read_journal(journal)
    if start is None:
        raise RunDirError(f"{journal}: the journal has no run_start")
    if start.get("command") is not None and tuple(start["command"]) != info.command:
        raise RunDirError(f"{run_dir / 'run.json'}: command {list(info.command)!r} is not the one the run started "
                          f"with ({journal}: run_start: {start['command']!r})"[:400])
    version = start.get("journal_version", 1)
    if type(version) is not int or version > JOURNAL_VERSION:
        raise RunDirError(f"{run_dir}: written by a newer ftrain (journal version {version!r}); "
                          "upgrade ftrain to resume it")
    policy = read_run_policy(run_dir, info)
    faults = _parse_inject(info.inject)
    base = info.base_config
    try:
        state = RunState.replay(events, base, faults)
    except (ValueError, TypeError, ConfigError) as exc:   # ConfigError: an override no longer applies
        raise RunDirError(f"{journal}: cannot replay: {exc}") from exc
    for kind, at in fired_injections(run_dir / "metrics.jsonl"):
        state.inject = remove_fault(state.inject, kind, at)

    if state.finished is not None:
        status = state.finished.get("status")
        if status == "succeeded":
            raise RunDirError(f"{run_dir}: the run finished successfully; nothing to resume")
        if status in ("gave_up", "stopped") and max_restarts is None:
            raise RunDirError(f"{run_dir}: the run ended as {status} ({state.finished.get('reason')}); "
                              "give it a new budget with --max-restarts N")
    budget = None
    if max_restarts is not None:
        budget = state.restarts + max_restarts
        state.rule_uses.clear()
        state.no_progress_streak = 0

    cwd = Path(info.cwd or ".")
    launch = LaunchSpec(command=info.command, cwd=cwd, base_config=base, script=info.script,
                        script_args=info.args, config_path=info.config_path, sets=info.sets)
    script_side = make_script(policy, state.config, cwd=cwd, run_dir=run_dir, started=info.created)
    tb = info.tensorboard
    become_subreaper()
    spec, job_dir = None, run_dir
    if info.distributed:
        from ftrain.topology import job_dir_of
        from ftrain.torchrun import DistSpec

        try:
            spec = DistSpec.from_json(info.distributed)
        except (ValueError, TypeError) as exc:
            raise RunDirError(f"{run_dir / 'run.json'}: distributed: {exc}") from exc
        job_dir = job_dir_of(spec, run_dir)
    if spec is None:
        _redo_rollback(events, script_side, run_dir / "checkpoints")
    reporter = make_reporter(no_ui)
    supervisor = Supervisor(run_dir, policy, launch, reporter, state=state, max_restarts=budget,
                            script=script_side, topology=make_topology(spec, run_dir, job_dir, reporter, policy),
                            listeners=make_listeners(Path(tb) if tb else None, policy, run_dir, reporter, spec),
                            launcher=make_launcher(policy.warm_start, cwd, launch.command[0]),
                            open_attempt=_open_attempt(events))
    return supervisor.run(resuming=True)


def _redo_rollback(events: Sequence[dict[str, Any]], script: Script, checkpoint_dir: Path) -> None:
    """A rollback decided and journaled, but no attempt started after it: its supervisor may
    have died before the quarantine was done. Redo it (it is idempotent), so that the newest
    usable checkpoint is the decision's target again, not a poisoned one."""
    last = None
    for ev in events:
        if ev.get("event") == Event.DECISION.value:
            last = ev
        elif ev.get("event") == Event.ATTEMPT_START.value:
            last = None
    if last is None or last.get("action") != "rollback":
        return
    from ftrain.policy import Decision

    try:
        script.roll_back(Decision.from_json(last), checkpoint_dir)
    except OSError as exc:
        raise RunDirError(f"{checkpoint_dir}: cannot redo the journaled rollback's quarantine: {exc.strerror}") from exc


def _open_attempt(events: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """The last attempt_start with no attempt_end after it: its supervisor died mid-attempt."""
    open_: dict[str, Any] | None = None
    for ev in events:
        if ev.get("event") == Event.ATTEMPT_START.value:
            open_ = ev
        elif ev.get("event") == Event.ATTEMPT_END.value:
            open_ = None
    return open_
