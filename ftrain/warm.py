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
``runpy`` as ``python -m`` runs it. It is then an ordinary ``process.Child``: same session, same stop, same reaping.

What a spare imports ahead is first the script's own prefix of import statements, run in
order and stopped at the first statement that is not one, at ``ftrain`` (the shim reads
the attempt's environment at import) and at any module of the script's own folder (it may
read ``sys.argv`` or files). Then what the last attempt had imported by its first step,
from outside the script's folder, as the shim listed it in ``attempts/NNNN/modules.txt``:
torch imports ``torch._dynamo`` (800 modules, 1.2 s) when the first optimizer is built.
If a module it imported from outside the installed packages (an editable install, a
``PYTHONPATH`` folder) was edited since, or a package was installed, upgraded or removed,
the spare starts cold after all (``execve`` of the
plain command): a fix to a library between attempts is seen, as with a new process. A cold start is used instead when the spare died, when the
new attempt's environment differs from the spare's in anything but ``FTRAIN_*`` (an
adapter's ``env:`` that follows an override, say), or when the command is neither ``python
script.py`` nor ``python -m torch.distributed.run``. ``warm_start: false`` in the policy turns it off.

While it waits, a spare is the kernel OOM killer's first pick (``oom_score_adj`` 1000): on a
host short of memory it goes before the training process does. It takes the inherited
value back when it becomes an attempt; a spare that died is replaced by a cold start.

    attempt N running ──(first step seen)──► Spare(): python -c BOOT fd script
                                               │ imports torch …, blocks on fd
    attempt N fails ─► decision restart ─► launch(): argv + env over fd ─► attempt N+1
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Mapping, Sequence

from ftrain.process import Child, OutputSink

MAX_MESSAGE = 60_000  # the go message must fit the pipe's buffer: a write never blocks us

# Runs in the spare as ``python -c BOOT FD SCRIPT``. Nothing of ftrain is imported here.
BOOT = r'''
import os, sys

def _prefix(script):
    """The module names of the script's leading third-party import statements."""
    import ast, importlib.util
    try:
        with open(script, "rb") as f:
            tree = ast.parse(f.read(), script)
    except (OSError, SyntaxError, ValueError):
        return []
    here = os.path.dirname(os.path.abspath(script)) + os.sep
    names = []
    for i, node in enumerate(tree.body):
        if i == 0 and isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            continue                                      # the docstring
        if isinstance(node, ast.Import):
            mods = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "__future__":
                continue
            mods = [node.module]
        else:
            break
        for mod in mods:
            top = mod.partition(".")[0]
            if top == "ftrain":
                continue
            try:
                spec = importlib.util.find_spec(top)
            except (ImportError, ValueError):
                return names
            origin = (spec and (spec.origin or next(iter(spec.submodule_search_locations or ()), None))) or ""
            if spec is None or origin.startswith(here):
                return names
            names.append(mod)
    return names

def _stale(since):
    """Whether a cold start would import other code than we did: a package was installed,
    upgraded or removed since we began (pip changes the folders of installed packages), or
    a module from outside them (an editable install, a PYTHONPATH folder) was edited."""
    import site, sysconfig
    paths = sysconfig.get_paths()
    installed = {paths[k] for k in ("stdlib", "platstdlib", "purelib", "platlib") if k in paths}
    installed.update(site.getsitepackages() + [site.getusersitepackages()])
    for folder in installed:
        try:
            if os.stat(folder).st_mtime >= since:
                return True
        except OSError:
            pass                    # no user site, say
    prefixes = {p + os.sep for p in installed} | {os.path.realpath(p) + os.sep for p in installed}
    prefixes = tuple(sorted(prefixes, key=len, reverse=True))   # site-packages before a stdlib around it
    linked = {}                     # top-level entry of an installed folder -> is a symlink
    for module in list(sys.modules.values()):
        path = getattr(module, "__file__", None)
        if not isinstance(path, str) or not os.path.isabs(path):
            continue                # none, or a name only (torch.ops says "_ops.py")
        prefix = next((p for p in prefixes if path.startswith(p)), None)
        if prefix is not None:      # most of them: no realpath (90 ms for torch's 1,900 modules)
            top = prefix + path[len(prefix):].split(os.sep, 1)[0]
            if top not in linked:
                linked[top] = os.path.islink(top)
            if not linked[top]:
                continue            # installed; a package linked in (flit --symlink) is a checkout
        real = os.path.realpath(path)
        if real.startswith(prefixes):
            continue
        try:
            if os.stat(real).st_mtime >= since:
                return True
        except OSError:
            return True
    return False

def _oom_score_adj(value):
    """Set this process's oom_score_adj; the old value, or None where it cannot be set. An
    unprivileged process may raise it and lower it again to where it started."""
    try:
        with open("/proc/self/oom_score_adj", "r+") as f:
            old = f.read().strip()
            f.seek(0)
            f.write(value)
        return old
    except (OSError, ValueError):
        return None

def _main():
    import time
    began = time.time()
    inherited = _oom_score_adj("1000")   # while it only waits, the OOM killer's first pick
    if inherited is not None and (_oom_score_adj(inherited) is None or _oom_score_adj("1000") is None):
        _oom_score_adj(inherited)   # could not take it back (a floor set above it): stay as we were
        inherited = None
    fd, script, listed = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
    module = listed.pop(0) if script == "-m" else None
    if module is not None:          # `python -m module`: what it imports, not its main
        if not sys.flags.safe_path:
            sys.path[0] = os.getcwd()
        try:
            __import__(module)
        except BaseException:
            os._exit(0)
        del sys.modules[module]     # run_module runs it afresh as __main__, as `python -m` does
    elif not sys.flags.safe_path:   # as `python script.py`: the script's folder first
        sys.path[0] = os.path.dirname(os.path.abspath(script))
    sys.argv = [script]
    for mod in _prefix(script) if module is None else ():
        try:
            __import__(mod)
        except BaseException:       # the script meets the error itself, on a cold start
            os._exit(0)
    if listed:                      # what the last attempt had imported by its first step
        import importlib
        try:
            with open(listed[0]) as f:
                names = f.read().split()
        except OSError:
            names = []
        for name in names:
            if name not in sys.modules:
                try:
                    importlib.import_module(name)
                except Exception:
                    pass
    chunks = []
    while True:
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            break
        chunks.append(chunk)
    os.close(fd)
    if not chunks:                  # stood down: no attempt for us
        os._exit(0)
    if inherited is not None:       # an attempt now, as any other
        _oom_score_adj(inherited)
    import json
    msg = json.loads(b"".join(chunks))
    if _stale(began):               # start cold after all, in this same process
        os.write(2, b"[ftrain] code changed since this interpreter was started ahead: starting cold\n")
        os.execve(sys.executable, [sys.executable, *msg["argv"]], msg["env"])
    os.environ.clear()
    os.environ.update(msg["env"])
    sys.argv = list(msg["argv"])
    if module is not None:
        import runpy
        del sys.argv[0]             # ["-m", module, args…] → [module, args…]; run_module sets [0]
        runpy.run_module(module, run_name="__main__", alter_sys=True)
        return
    script = sys.argv[0]
    import builtins, importlib.machinery, types
    main = types.ModuleType("__main__")
    main.__file__ = script
    main.__builtins__ = builtins
    main.__loader__ = importlib.machinery.SourceFileLoader("__main__", script)
    sys.modules["__main__"] = main
    try:
        with open(script, "rb") as f:
            code = compile(f.read(), script, "exec", dont_inherit=True)
    except SyntaxError as exc:
        sys.excepthook(type(exc), exc, None)
        sys.exit(1)
    try:
        exec(code, main.__dict__)
    except (SystemExit, KeyboardInterrupt):
        raise
    except BaseException as exc:    # as the interpreter would report it, without our frames
        tb = exc.__traceback__
        while tb is not None and tb.tb_frame.f_code.co_filename != script:
            tb = tb.tb_next
        exc.with_traceback(tb or exc.__traceback__)   # the hook prints the exception's own
        sys.excepthook(type(exc), exc, exc.__traceback__)
        sys.exit(1)

_main()
'''


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
            self.child = Child([command[0], "-c", BOOT, str(read_end), command[1], *listed],
                               env=self.env, cwd=cwd, log_path=None, pass_fds=(read_end,))
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
        self.child.adopt(log_path, sink, line_hook)
        return self.child

    def discard(self) -> None:
        """Stand the spare down and make sure it is gone."""
        if self._go >= 0:
            os.close(self._go)      # EOF: it leaves by itself once its imports are done
            self._go = -1
        self.child.stop(0.0, cooperative=False)
        self.child.finish()
