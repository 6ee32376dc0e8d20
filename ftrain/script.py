"""How ftrain reaches the training script: through the shim, or the ``script:`` adapter.

A ``Script`` is chosen once where the run is built (``runs``). It shapes the command and
environment of each attempt (the adapter adds override flags, ``resume_args``, variables),
says how the script's metrics arrive (``talk``), where restarts find checkpoints (``usable``
and ``source``, inputs of ``policy.decide``), and what a rollback does to the checkpoints
it distrusts (``roll_back``). ``ShimScript`` is the script that imports ``ftrain``;
``adapter.ScriptAdapter`` is the other.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from ftrain import checkpoints
from ftrain.intake import ShimTalk, Talk
from ftrain.policy import CheckpointSource, Decision

__all__ = ["SHIM", "Script", "ShimScript"]


class Script(Protocol):
    """See the module docstring."""

    @property
    def delivers_config(self) -> bool:
        """Overrides reach the script without ``ftrain.config()`` (flags, a file, variables)."""

    def command(self, base: Sequence[str], config: Mapping[str, Any], resume_from: str | None) -> tuple[str, ...]: ...

    def env(self, config: Mapping[str, Any], attempt_dir: Path) -> dict[str, str]: ...

    def talk(self, metrics_path: Path) -> Talk: ...

    def checkpoint_source(self) -> CheckpointSource: ...

    def usable(self, checkpoint_dir: Path, set_aside: Sequence[tuple[int, float]]) -> list[Any]: ...

    def roll_back(self, decision: Decision, checkpoint_dir: Path) -> str | None: ...


class ShimScript:
    """A script that uses the shim: ftrain's environment is all it needs."""

    delivers_config = False

    def command(self, base: Sequence[str], config: Mapping[str, Any], resume_from: str | None) -> tuple[str, ...]:
        return tuple(base)

    def env(self, config: Mapping[str, Any], attempt_dir: Path) -> dict[str, str]:
        return {}

    def talk(self, metrics_path: Path) -> Talk:
        return ShimTalk(metrics_path)

    def checkpoint_source(self) -> CheckpointSource:
        return CheckpointSource()

    def usable(self, checkpoint_dir: Path, set_aside: Sequence[tuple[int, float]]) -> list[Any]:
        """ftrain's checkpoints a restart may use (``ok``, or ``unverified`` from before the
        first ``ok`` one), oldest first."""
        return checkpoints.restart_candidates(checkpoints.scan(checkpoint_dir))

    def roll_back(self, decision: Decision, checkpoint_dir: Path) -> str | None:
        """Quarantine the checkpoints after the one the rollback resumes from."""
        after = decision.quarantine_after if decision.quarantine_after is not None else -1
        moved = checkpoints.quarantine(checkpoint_dir, after_step=after)
        return f"quarantined {len(moved)} checkpoint file(s) after step {decision.quarantine_after}" if moved else None


SHIM = ShimScript()
