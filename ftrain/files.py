"""Files that another process reads: written whole or not at all, read within bounds.

``write_atomic`` writes to a temporary name in the same folder and renames it into place,
so a reader never sees half a file; ``durable=True`` also fsyncs the data and the folder
(what must survive a power loss: checkpoints' manifests, the run's own records, the nodes'
decisions). ``read_bounded`` reads at most ``limit`` bytes of a file that someone else
wrote, without following a symlink out of the folder it must stay in.
Standard library only: the shim uses it too.
"""

from __future__ import annotations

import json
import os

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

__all__ = ["TooLarge", "end_torn_line", "folder_bytes", "fsync_dir", "read_bounded", "write_atomic",
           "write_json_atomic"]


class TooLarge(OSError):
    """A file is larger than its reader accepts."""


def fsync_dir(directory: str | os.PathLike[str]) -> None:
    """Make a rename in ``directory`` durable (best effort where the file system refuses)."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def end_torn_line(path: str | os.PathLike[str]) -> bool:
    """Terminate a torn last line of the JSON-lines file ``path`` (a write cut short by a
    full disk or a kill), so the next line starts on a line of its own; True if it did.
    Only while nothing else writes the file (between two attempts); never through a symlink."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return False
    try:
        import stat

        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size == 0 or os.pread(fd, 1, st.st_size - 1) == b"\n":
            return False
        os.write(fd, b"\n")
        return True
    except OSError:   # the disk is still full: the reader's resync at the next newline covers it
        return False
    finally:
        os.close(fd)


def write_atomic(path: str | os.PathLike[str], data: bytes | str, *, durable: bool = False) -> None:
    """Write ``data`` to ``path`` through a temporary file renamed into place."""
    path = os.fspath(path)
    directory, name = os.path.split(path)
    tmp = os.path.join(directory, f".{name}.{os.getpid()}-{os.urandom(4).hex()}.tmp")   # unique across hosts
    raw = data.encode() if isinstance(data, str) else data
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        view = memoryview(raw)
        while view:
            view = view[os.write(fd, view):]
        if durable:
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    os.close(fd)
    try:
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    if durable:
        fsync_dir(directory or ".")


def write_json_atomic(path: str | os.PathLike[str], data: Any, *, durable: bool = False) -> None:
    """``write_atomic`` of ``data`` as indented JSON (values JSON cannot hold become strings)."""
    write_atomic(path, json.dumps(data, indent=2, default=str) + "\n", durable=durable)


def read_bounded(path: str | os.PathLike[str], limit: int, *, inside: str | os.PathLike[str] | None = None,
                 tail: bool = False) -> bytes:
    """At most ``limit`` bytes of a regular file: ``TooLarge`` beyond that (or, with ``tail``,
    its last ``limit`` bytes). With ``inside``, a path that resolves outside that folder
    (a symlink pointing out of it) is refused with ``PermissionError``. Never blocks on a
    FIFO or reads a device: only regular files are read."""
    path = os.fspath(path)
    if inside is not None:
        root = os.path.realpath(inside)
        real = os.path.realpath(path)
        if real != root and not real.startswith(root.rstrip(os.sep) + os.sep):
            raise PermissionError(f"{path}: leads outside {inside}")
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        st = os.fstat(fd)
        import stat

        if not stat.S_ISREG(st.st_mode):
            raise IsADirectoryError(f"{path}: not a regular file") if stat.S_ISDIR(st.st_mode) \
                else TooLarge(f"{path}: not a regular file")
        if st.st_size > limit:
            if not tail:
                raise TooLarge(f"{path}: {st.st_size} bytes, more than the {limit} read here")
            os.lseek(fd, st.st_size - limit, os.SEEK_SET)
        chunks: list[bytes] = []
        left = limit
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def folder_bytes(folder: str | os.PathLike[str]) -> int:
    """The bytes of the regular files directly in ``folder`` (symlinks and subfolders not followed)."""
    total = 0
    try:
        with os.scandir(folder) as it:
            for entry in it:
                try:
                    if entry.is_file(follow_symlinks=False):
                        total += entry.stat(follow_symlinks=False).st_size
                except OSError:
                    pass
    except OSError:
        return 0
    return total
