"""The run folder's own files, as the supervisor holds them: the lock, the attempt folders,
a new folder's name, whether a folder may take a new run, ``run.json``, and what a failed
write is.

Split from ``supervisor`` (the attempt loop); ``runs`` and the loop use these.
"""

from __future__ import annotations

import errno
import fcntl
import os
import platform
import stat
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ftrain import __version__
from ftrain.errors import RunDirError
from ftrain.files import write_json_atomic
from ftrain.inject import Fault, format_inject
from ftrain.journal import Event, read_journal

if TYPE_CHECKING:
    from ftrain.launch import LaunchSpec

__all__ = ["MEDIUM_ERRORS", "RunLock", "WriteFailed", "check_fresh_run_dir", "new_run_dir", "own_folder",
           "write_run_json"]


class WriteFailed(Exception):
    """ftrain could not write a file of the run folder (a full disk, read-only media, an I/O
    error): not a bug of ours and not the script's failure. The message names the file and
    what was being written; the run stops with ``ExitCode.INTERNAL`` and stays resumable."""


# Errors of the medium, not of ftrain: said in one line, without a traceback file.
MEDIUM_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EFBIG}


class RunLock:
    """An exclusive lock on a run folder, held while a supervisor works on it. The kernel
    drops it when the holder dies, so a stale lock of a dead supervisor is simply taken.
    ``.lock`` is opened without following a symlink and must be a regular file of its own
    (no hard link to a file elsewhere): the lock writes its pid into it."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / ".lock"
        try:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                               0o644)
        except OSError as exc:
            why = "it is a symlink" if exc.errno == errno.ELOOP else exc.strerror
            raise RunDirError(f"{self.path}: cannot lock the run folder: {why}") from exc
        st = os.fstat(self._fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
            os.close(self._fd)
            raise RunDirError(f"{self.path}: cannot lock the run folder: not a regular file of its own")
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self._fd, 64, 0).decode(errors="replace").strip() or "another process"
            os.close(self._fd)
            raise RunDirError(f"{run_dir}: in use by a running supervisor (pid {holder})") from None
        try:
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)
        except OSError:   # the pid is only a courtesy for the next one's message (a full disk)
            pass

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1



def own_folder(path: Path, run_dir: Path) -> None:
    """Make ``path`` a folder of the run folder; one that exists as a symlink (or anything
    but a real folder) is refused: what ftrain writes there would land outside the run."""
    try:
        path.mkdir()
    except FileExistsError:
        pass
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise RunDirError(f"{path}: not a folder of {run_dir} (a symlink?); remove it to continue")


def new_run_dir(base: Path, script: str) -> Path:
    stem = Path(script).stem or "run"
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = base / f"{stem}-{stamp}"
    i = 1
    while path.exists():
        i += 1
        path = base / f"{stem}-{stamp}-{i}"
    return path


def check_fresh_run_dir(run_dir: Path) -> None:
    """Refuse a folder that already holds a run (finished or not). A folder whose supervisor
    died before the run started (a journal with no ``run_start`` and no attempt) is taken:
    ``run --run-dir`` starts it; ``resume`` says so."""
    journal = run_dir / "journal.jsonl"
    if not os.path.lexists(journal):
        return
    events = read_journal(journal)
    started = {Event.RUN_START.value, Event.ATTEMPT_START.value}
    if not any(e.get("event") in started for e in events):
        return
    if any(e.get("event") == Event.RUN_END.value for e in events):
        raise RunDirError(f"{run_dir}: already holds a finished run; choose a new --run-dir")
    raise RunDirError(f"{run_dir}: already holds a run; continue it with `ftrain resume {run_dir}`")


def write_run_json(run_dir: Path, launch: LaunchSpec, *, policy: str | None, distributed: Mapping[str, Any] | None,
                   inject: Sequence[Fault]) -> None:
    """``run.json`` (DESIGN §4): what was launched, from where, with which policy and config,
    durably, before the first attempt. A resume checks it against the journal's ``run_start``."""
    write_json_atomic(run_dir / "run.json", {
        "script": launch.script,
        "args": list(launch.script_args),
        "command": list(launch.command),
        "cwd": str(Path(launch.cwd).resolve()),
        "policy": policy,
        "config_path": launch.config_path,
        "sets": dict(launch.sets),
        "tensorboard": launch.tensorboard,
        "distributed": distributed,
        "base_config": dict(launch.base_config),
        "inject": format_inject(inject) or None,
        "created": time.time(),
        "versions": {"ftrain": __version__, "python": platform.python_version(),
                     "platform": platform.platform()},
    }, durable=True)
