"""Sharded checkpoints through ``torch.distributed.checkpoint`` (DCP): every rank saves and
loads its own part (``ftrain.save_checkpoint(..., sharded=True)``, ``load_checkpoint(state=)``).

A save is collective. Rank 0 first drops an earlier manifest and folder of the same step;
DCP writes the folder (each rank its ``__R_N.distcp`` files, hashed as they are written
and fsynced; the coordinator ``.metadata``) and returns on every rank once ``.metadata`` is
in place; each rank then sends the names, sizes and checksums of the files it wrote to
rank 0, which fsyncs ``.metadata`` and the folder and only then writes the manifest
(``ftrain.sharded``), durably, and tells every rank how it went. A rank killed anywhere
before that leaves a folder without a manifest: ``partial``, never resumed from.
Loaded on the first sharded save or load.
"""

from __future__ import annotations

import json
import os
import time

from ftrain import ckptfmt, sharded
from ftrain.files import fsync_dir
from ftrain.protocol import Control
from ftrain.shim import CheckpointError
from ftrain.shim.metrics import control, one_line, plain_metrics, write_all

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping
    from typing import Any

    from ftrain.shim import ProcessState

__all__ = ["load", "save"]


def save(st: ProcessState, state: Any, step: int, metrics: Mapping[str, Any]) -> str:
    """Save ``state`` (a dict: tensors, DTensors, ``state_dict()``s, plain values) as the
    folder of step ``step`` on every rank; its path, on every rank."""
    import torch.distributed as dist

    on = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if on else (0, 1)
    directory = os.path.abspath(st.checkpoint_dir or "checkpoints")
    folder = os.path.join(directory, sharded.folder_name(step))
    manifest = os.path.join(directory, ckptfmt.manifest_name(step))
    if rank == 0:
        control(st, Control.SAVE_START, step, path=folder, blocking=True, sharded=True)
    error: BaseException | None = None
    try:
        if rank == 0:
            _clear(directory, folder, manifest)
        files = _write(state, folder, rank, on)
        if on:
            gathered: list[Any] | None = [None] * world if rank == 0 else None
            dist.gather_object(files, gathered, dst=0)
        else:
            gathered = [files]
        problem: list[str | None] = [None]
        if rank == 0:
            assert gathered is not None
            info = {"step": step, "attempt": st.attempt, "t": time.time(),
                    "metrics": plain_metrics(metrics, "ftrain.save_checkpoint")}
            try:
                _write_manifest(directory, folder, manifest, step,
                                sharded.manifest_body(info, [f for part in gathered for f in part], world))
            except OSError as exc:
                problem = [one_line(exc)]
        if on:
            dist.broadcast_object_list(problem, src=0)
        if problem[0] is not None:
            raise CheckpointError(0, f"ftrain.save_checkpoint: cannot save step {step} in {directory}: "
                                     f"rank 0: {problem[0]}")
    except BaseException as exc:
        error = exc
        if isinstance(exc, OSError) and not isinstance(exc, CheckpointError):
            raise CheckpointError(exc.errno or 0, f"ftrain.save_checkpoint: cannot save step {step} in "
                                  f"{directory}: {exc.strerror or exc}") from exc
        raise
    finally:
        if rank == 0:
            control(st, Control.SAVE_END, step, path=None if error else folder,
                    **({"error": one_line(error)} if error else {}))
    return folder


def _clear(directory: str, folder: str, manifest: str) -> None:
    """Before a save of a step saved before: its manifest goes first (a crash in between
    leaves a folder without one, partial), then the folder, so no file of it lingers."""
    os.makedirs(directory, exist_ok=True)
    if os.path.lexists(manifest):
        os.unlink(manifest)
        fsync_dir(directory)
    if os.path.lexists(folder) and not sharded.remove(folder):
        raise CheckpointError(0, f"ftrain.save_checkpoint: cannot remove the earlier {folder}")


def _write(state: Any, folder: str, rank: int, on: bool) -> list[dict[str, Any]]:
    """DCP's save of this rank's part; the files this rank wrote (``.metadata`` too on rank 0),
    each with its size and checksum (xxh3_128 or sha256, as plain manifests), fsynced."""
    import torch.distributed.checkpoint as dcp

    writer = dcp.FileSystemWriter(folder, sync_files=False)   # each shard file is fsynced at its close
    hashing = writer.fs = _hashing_fs()
    try:
        dcp.save(state, storage_writer=writer, no_dist=not on)
    except dcp.CheckpointException as exc:
        raise CheckpointError(0, f"ftrain.save_checkpoint: {folder}: {str(exc).splitlines()[0][:300]}") from exc
    files = [hashing.files[name] for name in sorted(hashing.files)]
    if rank == 0:
        files.append(_describe(os.path.join(folder, sharded.METADATA), sharded.METADATA))
    return files


def _hashing_fs() -> Any:
    """DCP's local file system, but each ``.distcp`` file it creates is a ``HashingWriter``
    (the checksum computed on a helper thread as the bytes are written, never read back),
    flushed and fsynced at its close; ``files`` holds each one's name, size and digest."""
    import contextlib

    from torch.distributed.checkpoint.filesystem import FileSystem

    from ftrain.shim.writer import HashingWriter

    class Stream(HashingWriter):
        """The file object DCP writes a shard into: ``write``, ``tell``, ``fileno``, ``close``."""

        def __init__(self, fd: int, name: str, done: dict[str, dict[str, Any]]) -> None:
            super().__init__(fd)
            self.name, self.done, self.closed = name, done, False

        def tell(self) -> int:
            return self.size + self._filled

        def writable(self) -> bool:
            return True

        def fileno(self) -> int:
            return self.fd

        def close(self) -> None:
            if self.closed:
                return
            self.closed = True
            try:
                self.flush()
                os.fsync(self.fd)
                self.done[self.name] = {"name": self.name, "bytes": self.size,
                                        **ckptfmt.digest_field(self.algorithm, self.hexdigest())}
            finally:
                super().close()

    class HashingFS(FileSystem):
        def __init__(self) -> None:
            super().__init__()
            self.files: dict[str, dict[str, Any]] = {}

        @contextlib.contextmanager
        def create_stream(self, path: Any, mode: str) -> Any:
            name = os.path.basename(os.fspath(path))
            if mode != "wb" or not name.endswith(".distcp"):
                with super().create_stream(path, mode) as plain:   # .metadata, and reads
                    yield plain
                return
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
            stream = Stream(fd, name, self.files)
            try:
                yield stream
                stream.close()
            finally:
                HashingWriter.close(stream)   # the helper thread, if an error came first
                os.close(fd)

    return HashingFS()


def _describe(path: str, name: str) -> dict[str, Any]:
    """Size and checksum of a file written by DCP's own code (``.metadata``), fsynced first."""
    algorithm, h = ckptfmt.new_hasher()
    buffer = bytearray(1 << 20)
    view = memoryview(buffer)
    with open(path, "rb") as f:
        os.fsync(f.fileno())
        while n := f.readinto(buffer):
            h.update(view[:n])
        size = os.fstat(f.fileno()).st_size
    return {"name": name, "bytes": size, **ckptfmt.digest_field(algorithm, h.hexdigest())}


def _write_manifest(directory: str, folder: str, manifest: str, step: int, body: dict[str, Any]) -> None:
    """fsync the folder (the names of every rank's files), then the manifest: temp, fsync, rename."""
    fsync_dir(folder)
    tmp = os.path.join(directory, ckptfmt.temp_name(ckptfmt.manifest_name(step), os.getpid()))
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        write_all(fd, memoryview((json.dumps(body, indent=1) + "\n").encode()))
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    os.close(fd)
    os.replace(tmp, manifest)
    fsync_dir(directory)


def load(folder: str, state: Any) -> Any:
    """DCP's load of ``folder`` into ``state``, in place, after comparing the files' sizes
    with the manifest (the supervisor checked their checksums before it chose the folder)."""
    if state is None:
        raise TypeError(f"ftrain.load_checkpoint: {folder} is a sharded checkpoint: pass state=, the state "
                        "dict (of this rank's model and optimizer) that DCP loads it into")
    _check_sizes(folder)
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    dcp.load(state, checkpoint_id=folder, no_dist=not (dist.is_available() and dist.is_initialized()))
    return state


def _check_sizes(folder: str) -> None:
    name = os.path.basename(os.path.normpath(folder))
    step = sharded.parse_folder(name)
    if step is None:
        return   # a folder of another tool: DCP judges it
    try:
        with open(os.path.join(os.path.dirname(os.path.normpath(folder)), ckptfmt.manifest_name(step)), "rb") as f:
            meta = json.load(f)
        files = [(str(e["name"]), e["bytes"]) for e in meta["files"]]
    except (OSError, ValueError, KeyError, TypeError):
        return   # no (readable) manifest: nothing cheap to check
    for file, expected in files:
        try:
            size = os.lstat(os.path.join(folder, file)).st_size
        except OSError as exc:
            raise CheckpointError(exc.errno or 0, f"ftrain.load_checkpoint: {folder}/{file}: {exc.strerror}") from exc
        if size != expected:
            import errno

            raise CheckpointError(errno.EIO, f"ftrain.load_checkpoint: {folder}/{file} has {size} bytes but "
                                             f"the manifest says {expected}: the file was truncated or replaced")
