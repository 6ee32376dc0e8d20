"""The program of a warm spare (``ftrain.warm``): an interpreter that imports ahead, then
becomes the next attempt.

``ftrain.warm.Spare`` starts it by path, never as ``-m ftrain.spare``, so that nothing of
the ftrain package is imported before the attempt's own ``import ftrain`` (the shim reads
the attempt's environment then). It imports the standard library only::

    python /…/ftrain/spare.py FD SCRIPT [MODULES_TXT]     a spare for `python SCRIPT …`
    python /…/ftrain/spare.py FD -m MODULE                a spare for `python -m MODULE …`

It imports what it can ahead (``prefix_imports``, then the names in MODULES_TXT), then
blocks on FD. EOF without a message: stood down, it leaves. A message (JSON: the attempt's
``argv`` after the interpreter, and its ``env``) makes it the attempt: as ``python SCRIPT``
would run it (``run_script``), or cold after all (``execve`` of the plain command) where
code changed since it began (``stale``).
"""

from __future__ import annotations

import os
import sys
import time

TYPE_CHECKING = False               # not typing's: nothing beyond os and sys before sys.path is ours
if TYPE_CHECKING:
    from types import ModuleType

__all__ = ["main", "prefix_imports", "run_script", "set_oom_score_adj", "stale"]

COLD_NOTE = b"[ftrain] code changed since this interpreter was started ahead: starting cold\n"


def main(argv: list[str]) -> None:
    """Import ahead, wait for the attempt on ``argv[1]``, then become it."""
    fd, script, listed = int(argv[1]), argv[2], argv[3:]
    module = listed.pop(0) if script == "-m" else None
    if not getattr(sys.flags, "safe_path", False):   # (-P, 3.11+) sys.path[0] is this file's folder:
        # ftrain's, where `tensorboard.py` and `files.py` live. Set it as python would have.
        sys.path[0] = os.getcwd() if module is not None else os.path.dirname(os.path.realpath(script))
    began = time.time()
    inherited = _take_oom_score()
    sys.argv = [script]
    if module is not None:          # `python -m module`: what it imports, not its main
        try:
            __import__(module)
        except BaseException:
            os._exit(0)
        del sys.modules[module]     # run_module runs it afresh as __main__, as `python -m` does
    else:
        main_module = _script_main(script)
        sys.modules["__main__"] = main_module   # what an import that looks at __main__ sees in a plain run
        for name in prefix_imports(script):
            try:
                __import__(name)
            except BaseException:   # the script meets the error itself, on a cold start
                os._exit(0)
        if listed:
            _import_listed(listed[0], script)
    message = _wait(fd)
    if message is None:             # stood down: no attempt for us
        os._exit(0)
    if inherited is not None:       # an attempt now, as any other
        set_oom_score_adj(inherited)
    import json

    msg = json.loads(message)
    args, env = list(msg["argv"]), dict(msg["env"])
    if module is None and not os.path.isfile(args[0]):
        os.execve(sys.executable, [sys.executable, *args], env)   # gone: python says so, as it would
    if stale(began):
        os.write(2, COLD_NOTE)
        os.execve(sys.executable, [sys.executable, *args], env)
    os.environ.clear()
    os.environ.update(env)
    sys.orig_argv = [sys.orig_argv[0], *args]
    sys.argv = args
    if module is not None:
        import runpy

        del sys.argv[0]             # ["-m", module, args…] → [module, args…]; run_module sets [0]
        runpy.run_module(module, run_name="__main__", alter_sys=True)
        return
    run_script(main_module)


def _script_main(script: str) -> ModuleType:
    """The ``__main__`` module ``python script`` runs the script in, not yet run."""
    import builtins
    import importlib.machinery
    import types

    filename = os.path.abspath(script)   # as python's __file__ (3.9+): absolute, links kept
    main = types.ModuleType("__main__")
    main.__dict__.update(__file__=filename, __cached__=None, __builtins__=builtins,
                         __loader__=importlib.machinery.SourceFileLoader("__main__", filename))
    if "__annotations__" in vars(sys.modules["__main__"]):   # python's startup gives __main__ one (3.10-3.13)
        main.__annotations__ = {}
    return main


def run_script(main: ModuleType) -> None:
    """Run the script of ``main`` (``_script_main``) as ``python script`` does (CPython's
    ``_PyRun_SimpleFileObject``).

    Not ``runpy.run_path``: that puts the previous ``__main__`` back once the code returns,
    so a thread or an ``atexit`` handler that pickles a class of the script (a checkpoint
    saved late) would fail. An exception is printed by ``sys.excepthook`` without our frames,
    then left to the interpreter, which exits as after a plain run (1, or SIGINT for an
    interrupt) once threads and ``atexit`` are done; ``SystemExit`` is left to it as is.
    """
    sys.modules["__main__"] = main
    filename = main.__dict__["__file__"]
    try:
        with open(filename, "rb") as f:
            source = f.read()
        code = compile(source, filename, "exec", dont_inherit=True)
        exec(code, main.__dict__)
    except SystemExit:
        raise
    except BaseException as exc:
        tb = exc.__traceback__
        while tb is not None and tb.tb_frame.f_code.co_filename != filename:
            tb = tb.tb_next         # none left: the script did not compile; python shows no frame
        sys.excepthook(type(exc), exc.with_traceback(tb), tb)   # the default hook prints the exception's own
        _forget_file(main)
        sys.excepthook = _printed
        raise
    _forget_file(main)


def _forget_file(main: ModuleType) -> None:
    for name in ("__file__", "__cached__"):   # python removes them once the script is done
        main.__dict__.pop(name, None)


def _printed(kind: type[BaseException], exc: BaseException, tb: object) -> None:
    """``sys.excepthook`` for the exception ``run_script`` has printed already."""


def prefix_imports(script: str) -> list[str]:
    """The module names of the script's leading third-party import statements: stopped at
    the first statement that is not an import, at ``ftrain`` and at a module of the
    script's own folder (it may read ``sys.argv`` or files)."""
    import ast
    import importlib.util

    try:
        with open(script, "rb") as f:
            tree = ast.parse(f.read(), script)
    except (OSError, SyntaxError, ValueError):
        return []
    names: list[str] = []
    for i, node in enumerate(tree.body):
        if i == 0 and isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            continue                # the docstring
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
            if spec is None or _is_own(spec, script):
                return names
            names.append(mod)
    return names


def _is_own(spec: object, script: str) -> bool:
    """Whether a module found by ``spec`` lives in the script's folder (as given or resolved)."""
    origin = getattr(spec, "origin", None) or next(iter(getattr(spec, "submodule_search_locations", None) or ()), "")
    folders = {os.path.dirname(os.path.abspath(script)), os.path.dirname(os.path.realpath(script))}
    return any(origin.startswith(folder + os.sep) for folder in folders)


def _import_listed(path: str, script: str) -> None:
    """Import what the last attempt had imported by its first step (torch imports
    ``torch._dynamo`` when the first optimizer is built); never ftrain, never the script's own."""
    import importlib
    import importlib.util

    try:
        with open(path) as f:
            names = f.read().split()
    except OSError:
        return
    tops: dict[str, bool] = {}      # top-level name -> may be imported ahead
    for name in names:
        top = name.partition(".")[0]
        if top not in tops:
            try:
                spec = importlib.util.find_spec(top)
            except (ImportError, ValueError):
                spec = None
            tops[top] = top != "ftrain" and spec is not None and not _is_own(spec, script)
        if tops[top] and name not in sys.modules:
            try:
                importlib.import_module(name)
            except Exception:
                pass


def _wait(fd: int) -> bytes | None:
    """The go message on ``fd``: all of it up to EOF, or None at EOF alone."""
    chunks = []
    while True:
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            break
        chunks.append(chunk)
    os.close(fd)
    return b"".join(chunks) if chunks else None


def stale(since: float) -> bool:
    """Whether a cold start would import other code than we did: a package was installed,
    upgraded or removed since ``since`` (pip changes the folders of installed packages), or
    a module from outside them (an editable install, a PYTHONPATH folder) was edited."""
    import site
    import sysconfig

    paths = sysconfig.get_paths()
    installed = {paths[k] for k in ("stdlib", "platstdlib", "purelib", "platlib") if k in paths}
    installed.update(site.getsitepackages() + [site.getusersitepackages()])
    for folder in installed:
        try:
            if os.stat(folder).st_mtime >= since:
                return True
        except OSError:
            pass                    # no user site, say
    prefixes = tuple(sorted({p + os.sep for p in installed} | {os.path.realpath(p) + os.sep for p in installed},
                            key=len, reverse=True))   # site-packages before a stdlib around it
    linked: dict[str, bool] = {}    # top-level entry of an installed folder -> is a symlink
    for name, module in list(sys.modules.items()):
        path = getattr(module, "__file__", None)
        if name == "__main__":
            continue                # the script: read afresh when it runs, edited or not
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


def set_oom_score_adj(value: str) -> str | None:
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


def _take_oom_score() -> str | None:
    """While it only waits, be the OOM killer's first pick (1000); the value to take back as
    an attempt, or None where it could not be taken back (then it stays as it was)."""
    inherited = set_oom_score_adj("1000")
    if inherited is not None and (set_oom_score_adj(inherited) is None or set_oom_score_adj("1000") is None):
        set_oom_score_adj(inherited)   # a floor set above it: stay as we were
        return None
    return inherited


if __name__ == "__main__":
    main(sys.argv)
