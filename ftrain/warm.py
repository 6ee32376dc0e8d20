"""Warm restarts: the next attempt's interpreter, started early with the script's imports done.

Most of a PyTorch script's restart is not ftrain's: it is a new Python importing torch
(2–3 s on a small machine, more with transformers) before the script's first line of its
own. So while attempt N trains, ftrain starts a *spare* interpreter for attempt N+1. The
spare runs the script's leading import statements (third-party modules only: ``import
torch``, ``from transformers import …``) and waits on a pipe. When attempt N ends and the
policy restarts, the spare receives the attempt's argv and environment and runs the
script the way ``python script.py`` would: as ``__main__``, with ``sys.argv`` and
``sys.path[0]`` set as usual, its traceback printed by ``sys.excepthook`` with our frames
left out. A torchrun job's spare is its agent, ``python -m torch.distributed.run``, run by
``runpy`` as ``python -m`` runs it. It is then an ordinary ``process.Child``: same session,
same stop, same reaping. The spare's program is ``ftrain/spare.py``, run by path (``ps``
shows ``python …/ftrain/spare.py FD SCRIPT MODULES_TXT``), not as ``-m ftrain.spare``: nothing
of ftrain is imported before the attempt's own ``import ftrain``.

What a spare imports ahead is first the script's own prefix of import statements, run in
order and stopped at the first statement that is not one, at ``ftrain`` (the shim reads
the attempt's environment at import) and at any module of the script's own folder (it may
read ``sys.argv`` or files). Then what the last attempt had imported by its first step,
from outside the script's folder, as the shim listed it in ``attempts/NNNN/modules.txt``:
torch imports ``torch._dynamo`` (800 modules, 1.2 s) when the first optimizer is built.
If a module it imported from outside the installed packages (an editable install, a
``PYTHONPATH`` folder) was edited since, or a package was installed, upgraded or removed,
the spare starts cold after all (``execve`` of the plain command): a fix to a library
between attempts is seen, as with a new process. A cold start is used instead when the
spare died, when the new attempt's environment differs from the spare's in anything but
``FTRAIN_*`` (an adapter's ``env:`` that follows an override, say), or when the command is
neither ``python script.py`` nor ``python -m torch.distributed.run``. ``warm_start: false``
in the policy turns it off.

While it waits, a spare is the kernel OOM killer's first pick (``oom_score_adj`` 1000): on a
host short of memory it goes before the training process does. It takes the inherited
value back when it becomes an attempt; a spare that died is replaced by a cold start.

    attempt N running ──(first step seen)──► Spare(): python …/ftrain/spare.py fd script
                                               │ imports torch …, blocks on fd
    attempt N fails ─► decision restart ─► launch(): argv + env over fd ─► attempt N+1

A torchrun job's *ranks* come back warm too (``WarmRanks``): one server, ``python
…/ftrain/spare.py --ranks NAME N SCRIPT [MODULES_TXT]``, imports the script's modules ahead
(what local rank 0 listed) and waits on the abstract Unix socket NAME. The next attempt's
command is then torchrun as before, its ranks run ``--no-python PYTHON …/ftrain/rankentry.py
NAME SCRIPT ARGS``: each entry hands its argv, environment and standard streams to the
server, which forks the rank for it (pages shared copy-on-write: one interpreter's memory
while they wait, not N). torchrun stays the launcher and the rendezvous; the entries relay
its signals and exit as their ranks did, so its report, error files and per-rank logs are
as for cold ranks. The server follows a spare's rules (``FTRAIN_SPARE`` mark, OOM killer's
first pick, the same reasons for a cold start); once it serves an attempt, that attempt's
child owns it (``Child.bind``): stopped and reaped with it, nothing of it survives.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from ftrain.process import Child, OutputSink, spare_mark
from ftrain.torchrun import entry_command, split_command

MAX_MESSAGE = 60_000  # the go message must fit the pipe's buffer: a write never blocks us

# The spare's program, run by path: `python -m ftrain.spare` would import ftrain first.
SPARE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "spare.py")
RANK_ENTRY = os.path.join(os.path.dirname(SPARE), "rankentry.py")   # what torchrun runs per warm rank


# Modules a spare may run as ``python -m``: importing them ahead has no effect but imports.
WARM_MODULES = frozenset({"torch.distributed.run"})   # torchrun's agent: 2 s of imports


def fits(command: Sequence[str], interpreter: str) -> bool:
    """Whether ``command`` is ``python script.py …`` or ``python -m torch.distributed.run …``
    with our interpreter: the shapes a spare can stand in for."""
    if len(command) < 2 or command[0] != interpreter:
        return False
    return command[1].endswith(".py") or (command[1] == "-m" and len(command) > 2 and command[2] in WARM_MODULES)


def _head(command: Sequence[str]) -> tuple[str, ...]:
    """What a spare is started for: interpreter and script, or interpreter, ``-m`` and module."""
    return tuple(command[:3] if command[1] == "-m" else command[:2])


def _base(env: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if not k.startswith("FTRAIN_")}


class Spare:
    """One interpreter waiting to become the next attempt."""

    def __init__(self, command: Sequence[str], env: Mapping[str, str], cwd: Path | None,
                 modules: Path | None = None) -> None:
        """``modules``: the names the shim listed at the last attempt's first step."""
        self.head = _head(command)
        self.env = _base(env)
        read_end, self._go = os.pipe()
        if command[1] == "-m":      # a module's own imports only: what a script imported is not its
            listed = [command[2]]
        else:
            listed = [str(modules)] if modules is not None and modules.is_file() else []
        try:
            self.child = Child([command[0], SPARE, str(read_end), command[1], *listed],
                               env={**self.env, **spare_mark(env)}, cwd=cwd, log_path=None, pass_fds=(read_end,))
        except OSError:
            os.close(self._go)
            raise
        finally:
            os.close(read_end)

    def usable_for(self, command: Sequence[str], env: Mapping[str, str]) -> bool:
        return self.child.proc.poll() is None and _head(command) == self.head and _base(env) == self.env

    def launch(self, command: Sequence[str], env: Mapping[str, str], log_path: Path,
               sink: OutputSink | None = None, line_hook: Callable[[str], None] | None = None) -> Child | None:
        """Hand the spare its attempt; None (and the spare stood down) if it cannot take it."""
        message = json.dumps({"argv": list(command[1:]), "env": dict(env)}).encode()
        if len(message) > MAX_MESSAGE or not self.usable_for(command, env):
            self.discard()
            return None
        try:
            os.write(self._go, message)
        except OSError:             # it died just now
            self.discard()
            return None
        os.close(self._go)
        self._go = -1
        self.child.adopt(log_path, sink, line_hook, env)
        return self.child

    def discard(self) -> None:
        """Stand the spare down and make sure it is gone."""
        if self._go >= 0:
            os.close(self._go)      # EOF: it leaves by itself once its imports are done
            self._go = -1
        self.child.stop(0.0, cooperative=False)
        self.child.finish()


def fits_ranks(command: Sequence[str]) -> bool:
    """Whether ``command`` is ftrain's torchrun around a ``.py`` script: ranks that can be warm."""
    return split_command(command) is not None


class WarmRanks:
    """One server process waiting to become the ranks of the next torchrun attempt."""

    def __init__(self, command: Sequence[str], env: Mapping[str, str], cwd: Path | None,
                 modules: Path | None = None) -> None:
        """``command``: the running attempt's torchrun command; ``modules``: what its local
        rank 0 had imported by its first step."""
        split = split_command(command)
        if split is None:
            raise ValueError("not a torchrun command around a script")
        _, script, self.count = split
        self.script = script[0]
        self.env = _base(env)
        self.name = f"ftrain-ranks-{os.getpid()}-{secrets.token_hex(8)}"
        server_env = {**self.env, **spare_mark(env)}
        if self.count > 1:          # what torchrun gives its workers when unset; read as torch loads
            server_env.setdefault("OMP_NUM_THREADS", "1")
        listed = [str(modules)] if modules is not None and modules.is_file() else []
        self.child = Child([command[0], SPARE, "--ranks", self.name, str(self.count), self.script, *listed],
                           env=server_env, cwd=cwd, log_path=None)

    def usable_for(self, command: Sequence[str], env: Mapping[str, str]) -> bool:
        split = split_command(command)
        return (self.child.proc.poll() is None and split is not None and split[1][0] == self.script
                and split[2] == self.count and _base(env) == self.env)

    def command(self, command: Sequence[str]) -> tuple[str, ...]:
        """The attempt's torchrun command with its ranks handed to this server."""
        return entry_command(command, RANK_ENTRY, self.name)

    def discard(self) -> None:
        """Stand the server down (with any rank it forked) and make sure it is gone."""
        self.child.stop(0.0, cooperative=False)
        self.child.finish()
