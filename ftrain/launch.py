"""How an attempt starts: the command to run, and a launcher that gives the loop a child.

The attempt loop asks a ``Launcher`` for a running ``process.Child`` and never knows how it
was made: ``Cold`` starts a new process; ``Warm`` hands the attempt to a spare interpreter
started ahead with the script's imports done (``ftrain.warm``), and falls back to a cold
start when there is none or it cannot take the attempt. ``prepare`` is the moment the next
attempt's spare may begin (the running attempt's start-up is over).
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ftrain.errors import UsageError
from ftrain.kinds import signal_name
from ftrain.process import Child, OutputSink

__all__ = ["Cold", "LaunchSpec", "Launched", "Launcher", "Warm", "build_command", "make_launcher"]


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


@dataclass(frozen=True)
class Launched:
    """A started attempt: its child, whether a warm spare became it, and a note for the
    person when the launcher had to fall back (the spare died while it waited …)."""

    child: Child
    warm: bool = False
    note: str | None = None


LineHook = Callable[[str], None]


class Launcher(Protocol):
    """Starts attempts; see the module docstring."""

    def start(self, command: Sequence[str], env: Mapping[str, str], log_path: Path,
              sink: OutputSink | None, line_hook: LineHook | None) -> Launched: ...

    def prepare(self, command: Sequence[str], env: Mapping[str, str], modules: Path) -> str | None:
        """The running attempt is past its start-up: the next one may be readied. Returns a
        warning for the person if that failed."""

    def spare_oom_killed(self) -> bool:
        """The interpreter waiting for the next attempt was killed by SIGKILL (the OOM
        killer's first pick): an OOM kill the attempt's own process did not suffer."""

    def close(self) -> None: ...


class Cold:
    """A new process for every attempt."""

    def __init__(self, cwd: Path, program: str) -> None:
        self.cwd = cwd
        self.program = program   # the name a person typed, for the one-line error

    def start(self, command: Sequence[str], env: Mapping[str, str], log_path: Path,
              sink: OutputSink | None, line_hook: LineHook | None) -> Launched:
        try:
            return Launched(Child(command, env=env, cwd=self.cwd, log_path=log_path, sink=sink,
                                  line_hook=line_hook))
        except OSError as exc:
            raise UsageError(f"{self.program}: cannot start: {exc.strerror}") from exc

    def prepare(self, command: Sequence[str], env: Mapping[str, str], modules: Path) -> str | None:
        return None

    def spare_oom_killed(self) -> bool:
        return False

    def close(self) -> None:
        pass


class Warm(Cold):
    """The next attempt's interpreter started ahead (``ftrain.warm.Spare``), cold otherwise."""

    def __init__(self, cwd: Path, program: str) -> None:
        super().__init__(cwd, program)
        self._spare: Any = None   # ftrain.warm.Spare: imported only when one is started

    def start(self, command: Sequence[str], env: Mapping[str, str], log_path: Path,
              sink: OutputSink | None, line_hook: LineHook | None) -> Launched:
        spare, self._spare = self._spare, None
        note = None
        if spare is not None:
            died = spare.child.proc.poll()
            child = spare.launch(command, env, log_path, sink, line_hook)
            if child is not None:
                return Launched(child, warm=True)
            if died is not None and died < 0:   # the OOM killer's first pick while it waited
                note = f"the spare interpreter was killed by {signal_name(died)} while it waited; starting cold"
        cold = super().start(command, env, log_path, sink, line_hook)
        return Launched(cold.child, note=note)

    def prepare(self, command: Sequence[str], env: Mapping[str, str], modules: Path) -> str | None:
        from ftrain.warm import Spare, fits

        if self._spare is not None or not fits(command, sys.executable):
            return None
        try:
            self._spare = Spare(command, env, self.cwd, modules)
        except OSError as exc:   # no warm start then; the next attempt starts cold
            return f"could not start a spare interpreter: {exc.strerror}"
        return None

    def spare_oom_killed(self) -> bool:
        import signal

        return self._spare is not None and self._spare.child.proc.poll() == -signal.SIGKILL

    def close(self) -> None:
        if self._spare is not None:
            self._spare.discard()
            self._spare = None


def make_launcher(warm_start: bool, cwd: Path, program: str) -> Launcher:
    """The launcher the policy asks for (``warm_start``, default true)."""
    return Warm(cwd, program) if warm_start else Cold(cwd, program)
