"""How an attempt starts: the command to run, and a launcher that gives the loop a child.

The attempt loop asks a ``Launcher`` for a running ``process.Child`` and never knows how it
was made: ``Cold`` starts a new process; ``Warm`` hands the attempt to a spare interpreter
started ahead with the script's imports done (``ftrain.warm``), and falls back to a cold
start when there is none or it cannot take the attempt; for a torchrun job it also readies
the next attempt's ranks (``ftrain.warm.WarmRanks``), and the attempt's torchrun then runs
them through the rank entry. ``prepare`` is the moment the next attempt's spare may begin
(the running attempt's start-up is over).
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
    """A started attempt: its child, whether a warm spare became it, how many of its ranks
    are warm, and a note for the person when the launcher had to fall back (the spare died
    while it waited …)."""

    child: Child
    warm: bool = False
    note: str | None = None
    warm_ranks: int = 0     # ranks handed to interpreters that imported ahead (torchrun jobs)
    command: tuple[str, ...] | None = None   # what was run, where the launcher changed the command


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
    """The next attempt's interpreter started ahead (``ftrain.warm.Spare``), and a torchrun
    job's next ranks (``ftrain.warm.WarmRanks``); cold otherwise."""

    def __init__(self, cwd: Path, program: str) -> None:
        super().__init__(cwd, program)
        self._spare: Any = None   # ftrain.warm.Spare: imported only when one is started
        self._ranks: Any = None   # ftrain.warm.WarmRanks, likewise

    def start(self, command: Sequence[str], env: Mapping[str, str], log_path: Path,
              sink: OutputSink | None, line_hook: LineHook | None) -> Launched:
        notes = []
        ranks, self._ranks = self._ranks, None
        if ranks is not None:
            died = ranks.child.proc.poll()
            if ranks.usable_for(command, env):
                command = ranks.command(command)
            else:
                ranks.discard()
                ranks = None
                if died is not None and died < 0:
                    notes.append(f"the warm ranks' interpreter was killed by {signal_name(died)} while it "
                                 "waited; starting the ranks cold")
        try:
            launched = self._start(command, env, log_path, sink, line_hook)
        except BaseException:
            if ranks is not None:
                ranks.discard()
            raise
        if ranks is not None:
            launched.child.bind(ranks.child)   # the attempt's now: stopped and reaped with it
        note = "; ".join(n for n in (*notes, launched.note) if n) or None
        return Launched(launched.child, warm=launched.warm, note=note,
                        warm_ranks=ranks.count if ranks is not None else 0,
                        command=tuple(command) if ranks is not None else None)

    def _start(self, command: Sequence[str], env: Mapping[str, str], log_path: Path,
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
        from ftrain.warm import Spare, WarmRanks, fits, fits_ranks

        problems = []
        if self._ranks is None and fits_ranks(command):
            try:
                self._ranks = WarmRanks(command, env, self.cwd, modules)
            except OSError as exc:
                problems.append(f"could not start the warm ranks' interpreter: {exc.strerror}")
        if self._spare is None and fits(command, sys.executable):
            try:
                self._spare = Spare(command, env, self.cwd, modules)
            except OSError as exc:   # no warm start then; the next attempt starts cold
                problems.append(f"could not start a spare interpreter: {exc.strerror}")
        return "; ".join(problems) or None

    def spare_oom_killed(self) -> bool:
        import signal

        return any(w is not None and w.child.proc.poll() == -signal.SIGKILL for w in (self._spare, self._ranks))

    def close(self) -> None:
        for waiting in (self._spare, self._ranks):
            if waiting is not None:
                waiting.discard()
        self._spare = self._ranks = None


def make_launcher(warm_start: bool, cwd: Path, program: str) -> Launcher:
    """The launcher the policy asks for (``warm_start``, default true)."""
    return Warm(cwd, program) if warm_start else Cold(cwd, program)
