"""The program of a warm spare (``ftrain.warm``): an interpreter that imports ahead, then
becomes the next attempt.

``ftrain.warm.Spare`` starts it by path, never as ``-m ftrain.spare``, so that nothing of
the ftrain package is imported before the attempt's own ``import ftrain`` (the shim reads
the attempt's environment then). It imports the standard library only::

    python /…/ftrain/spare.py FD SCRIPT [MODULES_TXT]     a spare for `python SCRIPT …`
    python /…/ftrain/spare.py FD -m MODULE                a spare for `python -m MODULE …`
    python /…/ftrain/spare.py --ranks NAME N SCRIPT [MODULES_TXT]   N warm ranks of `torchrun … SCRIPT`

It imports what it can ahead (``prefix_imports``, then the names in MODULES_TXT), then
blocks on FD. EOF without a message: stood down, it leaves. A message (JSON: the attempt's
``argv`` after the interpreter, and its ``env``) makes it the attempt: as ``python SCRIPT``
would run it (``run_script``), or cold after all (``execve`` of the plain command) where
code changed since it began (``stale``). With ``--ranks`` it serves the ranks of a torchrun
attempt (``serve_ranks``): each rank's entry (``ftrain/rankentry.py``) connects to the
abstract socket NAME, and a process forked for it becomes the rank.
"""

from __future__ import annotations

import os
import sys
import time

TYPE_CHECKING = False               # not typing's: nothing beyond os and sys before sys.path is ours
if TYPE_CHECKING:
    from collections.abc import Callable
    from types import ModuleType

__all__ = ["main", "prefix_imports", "run_script", "serve_ranks", "set_oom_score_adj", "stale"]

COLD_NOTE = b"[ftrain] code changed since this interpreter was started ahead: starting cold\n"


def main(argv: list[str]) -> None:
    """Import ahead, wait for the attempt on ``argv[1]``, then become it (``--ranks``: serve
    the ranks of a torchrun attempt instead, ``serve_ranks``)."""
    if argv[1] == "--ranks":
        began = time.time()
        script = argv[4]
        _set_path0(script, None)
        rank = serve_ranks(argv[2], int(argv[3]), script, argv[5:])
        _become(rank.main, rank.inherited, rank.argv, rank.env, began, rank.cwd)
        return
    fd, script, listed = int(argv[1]), argv[2], argv[3:]
    module = listed.pop(0) if script == "-m" else None
    _set_path0(script, module)
    began = time.time()
    inherited = _take_oom_score()
    sys.argv = [script]
    main_module = None
    if module is not None:          # `python -m module`: what it imports, not its main
        try:
            __import__(module)
        except BaseException:
            os._exit(0)
        del sys.modules[module]     # run_module runs it afresh as __main__, as `python -m` does
    else:
        main_module = _import_ahead(script, listed)
    message = _wait(fd)
    if message is None:             # stood down: no attempt for us
        os._exit(0)
    import json

    msg = json.loads(message)
    _become(main_module, inherited, list(msg["argv"]), dict(msg["env"]), began, None, module)


def _set_path0(script: str, module: str | None) -> None:
    if not getattr(sys.flags, "safe_path", False):   # (-P, 3.11+) sys.path[0] is this file's folder:
        # ftrain's, where `tensorboard.py` and `files.py` live. Set it as python would have.
        sys.path[0] = os.getcwd() if module is not None else os.path.dirname(os.path.realpath(script))


def _import_ahead(script: str, listed: list[str]) -> ModuleType:
    """The script's ``__main__`` (not yet run), its leading imports and those MODULES_TXT
    lists done; an import that fails ends us (the script meets the error itself, cold)."""
    main_module = _script_main(script)
    sys.modules["__main__"] = main_module   # what an import that looks at __main__ sees in a plain run
    for name in prefix_imports(script):
        try:
            __import__(name)
        except BaseException:
            os._exit(0)
    if listed:
        _import_listed(listed[0], script)
    return main_module


def _become(main_module: ModuleType | None, inherited: str | None, args: list[str], env: dict[str, str],
            began: float, cwd: str | None = None, module: str | None = None) -> None:
    """Run the attempt (``args``: its argv after the interpreter) as ``python`` would, or
    cold after all (``execve``) where the script is another or code changed since ``began``."""
    if inherited is not None:       # an attempt now, as any other
        set_oom_score_adj(inherited)
    if cwd is not None:
        os.chdir(cwd)
    if module is None and (not os.path.isfile(args[0]) or main_module is None
                           or os.path.abspath(args[0]) != main_module.__dict__.get("__file__")):
        os.execve(sys.executable, [sys.executable, *args], env)   # gone or another: python says so, as it would
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
    assert main_module is not None
    run_script(main_module)


class _Rank:
    """What a rank's entry sent (``ftrain/rankentry.py``), in the forked process that runs it."""

    def __init__(self, main: ModuleType, inherited: str | None, msg: dict, fds: list[int]) -> None:
        self.main, self.inherited = main, inherited
        self.argv, self.env, self.cwd = list(msg["argv"]), dict(msg["env"]), str(msg["cwd"])
        self.fds = fds


def serve_ranks(name: str, count: int, script: str, listed: list[str]) -> _Rank:
    """The warm ranks server: listen on the abstract socket ``name``, import ahead, then
    serve ``count`` rank entries, each in a process forked for it (``_fork_rank``); this
    process sends each entry its rank's pid and, once it ended, its wait status. An entry
    that goes away (torchrun killed it) takes its rank with it (SIGKILL to its group).
    Returns in each forked rank; the server itself leaves once every rank it took ended."""
    import selectors
    import signal
    import socket

    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind("\0" + name)     # before the imports: an early entry waits in the backlog
    listener.listen(count)
    inherited = _take_oom_score()
    sys.argv = [script]
    main_module = _at_low_priority(lambda: _import_ahead(script, listed))
    dispositions = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ, None)
    served: dict[int, tuple[socket.socket, int]] = {}   # rank pid -> (its entry's connection, pidfd)
    taken = 0
    while taken < count or served:
        for key, _ in sel.select():
            if key.data is None:
                conn, _ = listener.accept()
                got = _receive(conn) if _same_user(conn) else None
                if got is None:
                    conn.close()
                    continue
                taken += 1
                if taken == count:  # no more: a late entry is refused and starts cold
                    sel.unregister(listener)
                    listener.close()
                for sig in dispositions:   # the ranks' stop is theirs (relayed by the entries), not ours
                    signal.signal(sig, signal.SIG_IGN)
                pid = os.fork()
                if pid == 0:
                    sel.close()
                    listener.close()
                    for other, pidfd in served.values():
                        other.close()
                        os.close(pidfd)
                    conn.close()
                    for sig, how in dispositions.items():
                        signal.signal(sig, how)
                    return _fork_rank(_Rank(main_module, inherited, *got))
                for fd in got[1]:
                    os.close(fd)
                pidfd = os.pidfd_open(pid)
                served[pid] = (conn, pidfd)
                sel.register(pidfd, selectors.EVENT_READ, ("ended", pid))
                sel.register(conn, selectors.EVENT_READ, ("entry", pid))
                _send(conn, f"pid {pid}\n")
            elif key.data[0] == "ended":
                pid = key.data[1]
                conn, pidfd = served.pop(pid)
                _, status = os.waitpid(pid, 0)
                sel.unregister(pidfd)
                os.close(pidfd)
                _send(conn, f"status {status}\n")
                if conn.fileno() >= 0:
                    sel.unregister(conn)
                    conn.close()
            else:                   # the entry spoke (it never does) or went away
                pid = key.data[1]
                conn = served[pid][0]
                try:
                    gone = not conn.recv(64)
                except OSError:
                    gone = True
                if gone:
                    sel.unregister(conn)
                    conn.close()
                    try:
                        os.killpg(pid, signal.SIGKILL)
                    except OSError:
                        pass
    os._exit(0)


def _at_low_priority(work: Callable[[], ModuleType]) -> ModuleType:
    """``work()`` in a thread of the lowest CPU priority (nice 19: Linux's nice is per
    thread), waited for: importing ahead takes seconds of CPU, which must not slow the
    running attempt on a busy machine. The ranks are forked from this thread, whose
    priority stays as inherited (an unprivileged process could not lower it again)."""
    import threading

    done: list[ModuleType] = []

    def run() -> None:
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        except OSError:
            pass
        done.append(work())

    thread = threading.Thread(target=run, name="ftrain-import-ahead")
    thread.start()
    thread.join()
    if not done:                    # it raised: no warm ranks; the script meets the error itself, cold
        os._exit(0)
    return done[0]


def _fork_rank(rank: _Rank) -> _Rank:
    """In the forked rank: a session of its own (stopped as a group, as torchrun stops a
    worker), the entry's standard streams as ours."""
    os.setsid()
    for target, fd in enumerate(rank.fds[:3]):
        os.dup2(fd, target)
    for fd in rank.fds:
        if fd > 2:
            os.close(fd)
    return rank


def _same_user(conn: object) -> bool:
    """The peer runs as we do (any local process may reach an abstract socket)."""
    import socket
    import struct

    assert isinstance(conn, socket.socket)
    try:
        _, uid, _ = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                          struct.calcsize("3i")))
    except OSError:
        return False
    return uid == os.getuid()


def _receive(conn: object) -> tuple[dict, list[int]] | None:
    """An entry's message (length, JSON) and its three fds; None if it is not one."""
    import json
    import socket

    assert isinstance(conn, socket.socket)
    conn.settimeout(10.0)
    fds: list[int] = []
    try:
        data, fds, _, _ = socket.recv_fds(conn, 1 << 16, 3)
        while 4 <= len(data) < 4 + int.from_bytes(data[:4], "big"):
            more = conn.recv(1 << 16)
            if not more:
                break
            data += more
        size = int.from_bytes(data[:4], "big")
        if len(fds) != 3 or len(data) != 4 + size:
            raise ValueError("short message")
        msg = json.loads(data[4:])
        conn.settimeout(None)
        return msg, fds
    except (OSError, ValueError):
        for fd in fds:
            os.close(fd)
        return None


def _send(conn: object, text: str) -> None:
    try:
        conn.sendall(text.encode())   # type: ignore[attr-defined]
    except OSError:
        pass                        # the entry is gone; its rank is being killed


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
