"""Starting and resuming runs: turn command-line values into a checked Supervisor.

Everything that can be refused is refused here, before anything is launched: the policy,
the config and its overrides, the fault spec, the script, the run folder.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

from ftrain import overrides
from ftrain.errors import ConfigError, PolicyError, RunDirError, UsageError
from ftrain.inject import Fault, parse_inject
from ftrain.journal import JOURNAL_VERSION, Event, read_journal
from ftrain.policy import load_policy
from ftrain.process import become_subreaper
from ftrain.state import RunState, remove_fault
from ftrain.supervisor import LaunchSpec, Supervisor, build_command, check_fresh_run_dir, new_run_dir
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
    config = overrides.load_config(config_path)
    for text in sets:
        key, value = overrides.parse_set(text)
        if config_path is not None and not overrides.has_key(config, key):
            raise ConfigError(f"--set {key}: {config_path} has no such key")
        parts = key.split(".")
        node = config
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {key}: {part!r} is not a mapping in the config")
            node = child
        node[parts[-1]] = value
    return config


def start_run(*, script: str, script_args: tuple[str, ...], policy_path: Path | None,
              config_path: Path | None, sets: tuple[str, ...], run_dir: Path | None, inject: str | None,
              no_ui: bool, tensorboard: Path | None, nproc_per_node: int, nnodes: int, node_rank: int,
              rdzv_endpoint: str | None) -> int:
    """Check everything, then supervise a new run. Returns the exit status."""
    policy = load_policy(policy_path)
    config = base_config(config_path, sets)
    problems = policy.check_config(config)
    if problems:
        raise PolicyError(problems)
    faults = _parse_inject(inject)
    spec = None
    if nproc_per_node != 1 or nnodes != 1 or rdzv_endpoint or _DIST_ENV & os.environ.keys():
        from ftrain.distributed import DistSpec  # only then: it costs start-up time

        spec = DistSpec.from_cli(nproc_per_node, nnodes, node_rank, rdzv_endpoint)
    if spec is not None and spec.multi_node and run_dir is None:
        raise UsageError(f"--nnodes {spec.nnodes}: give every node the same --run-dir on a shared file system")
    command = build_command(script, script_args)
    run_dir = run_dir if run_dir is not None else new_run_dir(RUNS_DIR, script)
    job_dir = run_dir
    if spec is not None:   # node K > 0 of several keeps its own records inside the job's folder
        from ftrain.distributed import node_dir

        run_dir = node_dir(spec, job_dir)
    check_fresh_run_dir(run_dir)
    adapter = make_adapter(policy, config, cwd=Path.cwd(), run_dir=run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RunDirError(f"{run_dir}: cannot create run folder: {exc.strerror}") from exc
    launch = LaunchSpec(command=command, cwd=Path.cwd(), base_config=config, script=script,
                        script_args=script_args, config_path=str(config_path) if config_path else None,
                        sets=dict(overrides.parse_set(s) for s in sets),
                        tensorboard=str(tensorboard.resolve()) if tensorboard else None)
    listeners = make_listeners(tensorboard)
    become_subreaper()
    dist = None
    if spec is not None:
        from ftrain.distributed import make_distributed

        dist = make_distributed(spec, run_dir, job_dir)
    supervisor = Supervisor(run_dir, policy, launch, make_reporter(no_ui), inject=faults, adapter=adapter,
                            listeners=listeners, dist=dist)
    return _supervise(supervisor)


def _supervise(supervisor: Supervisor, *, resuming: bool = False) -> int:
    """Run the supervisor; with several nodes, on the job's shared metrics and checkpoints
    and with this node's heartbeat in ``coord/`` for as long as it runs."""
    dist = supervisor.dist
    if dist is None:
        return supervisor.run(resuming=resuming)
    if dist.job_dir != supervisor.run_dir:
        supervisor.metrics_path = dist.job_dir / "metrics.jsonl"
        supervisor.checkpoint_dir = dist.job_dir / "checkpoints"
    dist.start()
    try:
        return supervisor.run(resuming=resuming)
    finally:
        dist.close()


def make_adapter(policy: Any, config: dict[str, Any] | None, *, cwd: Path | None = None,
                 run_dir: Path | None = None) -> Any:
    """The driver for a script without the shim, from the policy's ``script:`` section."""
    if not policy.script:
        return None
    from ftrain.adapter import ScriptAdapter

    return ScriptAdapter.from_policy(policy.script, source=policy.source, config=config, cwd=cwd, run_dir=run_dir)


def make_listeners(tensorboard: Path | None) -> list[Any]:
    if tensorboard is None:
        return []
    from ftrain.tensorboard import TensorBoardMirror

    return [TensorBoardMirror(tensorboard)]


def newest_run(base: Path = RUNS_DIR) -> Path:
    candidates = [p.parent for p in base.glob("*/journal.jsonl")] if base.is_dir() else []
    if not candidates:
        raise RunDirError(f"{base}/: no run folders to resume")
    return max(candidates, key=lambda p: (p / "journal.jsonl").stat().st_mtime)


def read_run_json(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "run.json"
    if not run_dir.is_dir():
        raise RunDirError(f"{run_dir}: no such folder")
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise RunDirError(f"{run_dir}: not a run folder (no run.json)") from None
    except (OSError, ValueError) as exc:
        raise RunDirError(f"{path}: unreadable: {exc}") from exc
    if not isinstance(data, dict) or "command" not in data:
        raise RunDirError(f"{path}: not an ftrain run.json")
    return data


def fired_injections(metrics_path: Path) -> list[tuple[str, int | None]]:
    """Faults the shim reported firing, from the metrics stream (covers an attempt whose
    supervisor died before journaling its end)."""
    fired: list[tuple[str, int | None]] = []
    try:
        data = metrics_path.read_bytes()
    except OSError:
        return fired
    for raw in data.split(b"\n"):
        if b'"inject"' not in raw:
            continue
        try:
            record = json.loads(raw)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("ftrain") == "inject":
            fired.append((str(record.get("fault")), record.get("at")))
    return fired


def resume_run(run_dir: Path | None, *, max_restarts: int | None, no_ui: bool) -> int:
    """Continue a run from its journal. Returns the exit status."""
    run_dir = run_dir if run_dir is not None else newest_run()
    info = read_run_json(run_dir)
    events = read_journal(run_dir / "journal.jsonl")
    start = next((e for e in events if e.get("event") == Event.RUN_START.value), None)
    if start is None:
        raise RunDirError(f"{run_dir}: the journal has no run_start")
    if int(start.get("journal_version", 1)) > JOURNAL_VERSION:
        raise RunDirError(f"{run_dir}: written by a newer ftrain (journal version "
                          f"{start.get('journal_version')}); upgrade ftrain to resume it")
    source = info.get("policy")
    policy = load_policy(None if not source or source.startswith("<") else Path(source))
    faults = _parse_inject(info.get("inject"))
    state = RunState.replay(events, info.get("base_config") or {}, faults)
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

    launch = LaunchSpec(command=tuple(info["command"]), cwd=Path(info.get("cwd") or "."),
                        base_config=info.get("base_config") or {}, script=info.get("script", ""),
                        script_args=tuple(info.get("args") or ()), config_path=info.get("config_path"),
                        sets=info.get("sets") or {})
    adapter = make_adapter(policy, state.config, cwd=launch.cwd, run_dir=run_dir)
    if adapter is not None:
        adapter.replay(events)
    tb = info.get("tensorboard")
    become_subreaper()
    dist = None
    if info.get("distributed"):
        from ftrain.distributed import DistSpec, job_dir_of, make_distributed

        spec = DistSpec.from_json(info["distributed"])
        dist = make_distributed(spec, run_dir, job_dir_of(spec, run_dir))
    supervisor = Supervisor(run_dir, policy, launch, make_reporter(no_ui), state=state, max_restarts=budget,
                            adapter=adapter, listeners=make_listeners(Path(tb) if tb else None), dist=dist)
    supervisor.open_attempt = _open_attempt(events)
    return _supervise(supervisor, resuming=True)


def _open_attempt(events: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """The last attempt_start with no attempt_end after it: its supervisor died mid-attempt."""
    open_: dict[str, Any] | None = None
    for ev in events:
        if ev.get("event") == Event.ATTEMPT_START.value:
            open_ = ev
        elif ev.get("event") == Event.ATTEMPT_END.value:
            open_ = None
    return open_

