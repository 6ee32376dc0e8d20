"""Upkeep of the checkpoint folder between attempts, and what a new attempt is given.

The supervisor calls these at fixed points of its loop; each is a function of values (the
policy, the run's state, the folder), so it reads and tests apart from the loop:

* ``retain`` — after a save: the policy's retention, never deleting what a rollback could
  need (DESIGN §6 ``checkpoints``);
* ``fall_back`` — after an attempt died loading its checkpoint: set it aside and restart
  from the one before;
* ``child_env`` — the environment of attempt ``n`` (DESIGN §2);
* ``skipped_text`` — the steps the run's rollbacks skipped, in words, for its last line.

None of them imports torch.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ftrain import checkpoints
from ftrain.inject import format_inject
from ftrain.kinds import Failure
from ftrain.policy import Action, Decision, Policy
from ftrain.protocol import format_skip
from ftrain.state import RunState

__all__ = ["child_env", "fall_back", "retain", "skipped_text"]


def retain(checkpoint_dir: Path, policy: Policy, state: RunState, newest_step: int | None) -> None:
    """Apply the policy's checkpoint retention. Kept whatever it says: for each rollback
    margin, the newest checkpoint that far behind the newest step, and the checkpoints the
    run resumed from (earlier rollbacks' and the current attempt's)."""
    keep = policy.checkpoints
    if keep.keep_last is None and keep.keep_every is None:
        return
    newest = newest_step if newest_step is not None else 0
    protect = {step for _, step in state.rollbacks if step is not None}
    if state.resume_step is not None:
        protect.add(state.resume_step)
    found = [c for c in checkpoints.scan(checkpoint_dir, verify=False) if c.status.usable and c.step is not None]
    for margin in {r.margin for r in policy.rules if r.action is Action.ROLLBACK}:
        behind = checkpoints.newest_usable(found, max_step=newest - margin)
        if behind is not None and behind.step is not None:
            protect.add(behind.step)
    best = (keep.keep_best_metric, keep.keep_best_mode) if keep.keep_best_metric else None
    checkpoints.retain(checkpoint_dir, keep_last=keep.keep_last, keep_every=keep.keep_every,
                       best=best, protect=protect)


def fall_back(failure: Failure, state: RunState, policy: Policy, checkpoint_dir: Path, *,
              first_step: int | None, tail: Sequence[str],
              candidates: Callable[[], Sequence[Any]]) -> Decision | None:
    """The decision for an attempt that died loading the checkpoint it resumed from, before
    its first step: that checkpoint is bad, whatever its manifest says. It is set aside in
    ``quarantine/`` and the restart goes to the newest of the ``candidates()`` left before
    it, within ``max_restarts``. None for any other failure."""
    bad = state.resume_from
    if bad is None or first_step is not None or state.restarts >= policy.max_restarts \
            or Path(bad).parent.resolve() != checkpoint_dir.resolve():
        return None
    evidence = checkpoints.load_failure(tail)
    if evidence is None:
        return None
    checkpoints.set_aside(bad)
    before = [c for c in candidates()
              if state.resume_step is None or (c.step is not None and c.step < state.resume_step)]
    prev = before[-1] if before else None
    where = f"from step {prev.step}" if prev is not None else "from scratch"
    return Decision(Action.RESTART, resume_from=str(prev.path) if prev is not None else None,
                    resume_step=prev.step if prev is not None else None,
                    reason=f"{failure.kind.value}: {Path(bad).name} failed to load ({evidence}): set aside "
                           f"in quarantine/ as bad; restart {where}")


def child_env(n: int, *, run_dir: Path, config_path: Path, metrics_path: Path, checkpoint_dir: Path,
              state: RunState, extra: Mapping[str, str]) -> dict[str, str]:
    """Attempt ``n``'s environment: ours without any ``FTRAIN_`` variable of an outer run,
    then the run's paths, where to resume, what to skip and inject, and ``extra`` (the
    memory tier's)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FTRAIN_")}
    env.update({
        "FTRAIN_RUN_DIR": str(run_dir.resolve()),
        "FTRAIN_ATTEMPT": str(n),
        "FTRAIN_CONFIG_PATH": str(config_path.resolve()),
        "FTRAIN_METRICS_PATH": str(metrics_path.resolve()),
        "FTRAIN_CHECKPOINT_DIR": str(checkpoint_dir.resolve()),
    })
    env.setdefault("PYTHONUNBUFFERED", "1")
    if state.resume_from:
        env["FTRAIN_RESUME_FROM"] = str(Path(state.resume_from).resolve())
    if state.skip:
        env["FTRAIN_SKIP_STEPS"] = format_skip(state.skip)
    if state.inject:
        env["FTRAIN_INJECT"] = format_inject(state.inject)
    env.update(extra)
    return env


def skipped_text(skip: Sequence[tuple[int, int]], total: int | None) -> str:
    """The steps the run's rollbacks skipped, in words ("" when none): overlapping windows
    counted once, and past the job's end (``total`` steps, when known) not at all."""
    merged: list[list[int]] = []
    for a, b in sorted(skip):
        if merged and a <= merged[-1][1] + 1:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    if total is not None:
        merged = [[a, min(b, total - 1)] for a, b in merged if a < total]
    count = sum(b - a + 1 for a, b in merged)
    if not count:
        return ""
    share = f", {count / total:.0%} of the job" if total else ""
    return f"; {count} steps skipped by rollbacks ({format_skip([(a, b) for a, b in merged])}{share})"
