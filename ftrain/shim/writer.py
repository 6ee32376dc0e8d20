"""The checkpoint writer behind ``ftrain.save_checkpoint``: atomic, durable, hashed on the way.

A save writes ``step-NNNNNNNN.pt`` under a temporary name (``ftrain.ckptfmt``) through a
``HashingWriter`` (the manifest's checksum, xxh3_128 or sha256, on a helper thread,
writeback started as it goes), fsyncs it,
renames it into place, then writes the manifest the same way and fsyncs the folder: a
name without the temporary prefix is always a finished file, and a manifest always
describes the bytes beside it. A non-blocking save copies the state to the CPU first
(into the last snapshot's memory when it can) and writes it on a background thread.
Loaded on the first save; torch only inside the functions that need it.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time

from ftrain import ckptfmt
from ftrain.files import fsync_dir
from ftrain.protocol import Control
from ftrain.shim import CheckpointError
from ftrain.shim.metrics import control, one_line, plain_metrics, write_all

TYPE_CHECKING = False   # typing itself costs milliseconds at import; annotations are strings
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping
    from typing import Any

    from ftrain.shim import ProcessState

__all__ = ["HashingWriter", "cpu_copy", "save", "snapshot_pool", "write_checkpoint"]


def save(st: ProcessState, state: Any, step: int, metrics: Mapping[str, Any], *, blocking: bool) -> str:
    """Save ``state`` as step ``step`` with ``metrics`` in its manifest; the final path.

    Blocking: ``save_start``, the write, ``save_end`` (with the error, re-raised, if it
    failed). Non-blocking: the CPU copy now, ``save_start``, and the write and
    ``save_end`` on a thread whose error the caller raises at its next save.
    """
    directory = os.path.abspath(st.checkpoint_dir or "checkpoints")
    final = os.path.join(directory, ckptfmt.data_name(step))
    info: dict[str, Any] = {
        "step": step, "attempt": st.attempt, "t": time.time(),
        "metrics": plain_metrics(metrics, "ftrain.save_checkpoint"),
    }
    if not blocking:
        import torch

        # The last snapshot is written out (the caller waited): its memory takes this one.
        pool = snapshot_pool(st.last_snapshot, torch) if st.last_snapshot is not None else None
        st.last_snapshot = None
        snapshot = st.last_snapshot = cpu_copy(state, torch, pool)
        del pool
        control(st, Control.SAVE_START, step, path=final, blocking=False)
        thread = threading.Thread(target=_background_save, args=(st, snapshot, directory, step, info, final),
                                  name=f"ftrain-save-{step}")
        st.save_thread = thread
        thread.start()
        return final
    control(st, Control.SAVE_START, step, path=final, blocking=True)
    error: BaseException | None = None
    try:
        write_checkpoint(state, directory, step, info)
    except BaseException as exc:
        error = exc
        raise
    finally:
        control(st, Control.SAVE_END, step, path=None if error else final,
                **({"error": one_line(error)} if error else {}))
    return final


class HashingWriter:
    """A write-only file for ``torch.save`` that hashes the bytes on their way to disk.

    The checksum (``ckptfmt.new_hasher``) is computed on a helper thread while the same bytes are written (both
    release the GIL), so it costs little beyond the write and the data is never read back.
    Writes under ``CHUNK`` bytes (zip headers, small tensors) are gathered in one of two
    buffers of our own, so the next buffer fills while the last is still being hashed. A
    larger write is torch's own buffer, which it may reuse: that ``write`` returns only
    when its bytes are hashed and written. Every ``WRITEBACK_EVERY`` bytes Linux is told
    to start writing them to disk, so the final fsync finds little left to do.
    """

    CHUNK = 1 << 20
    WRITEBACK_EVERY = 8 << 20

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.size = 0
        self.error: OSError | None = None
        self.before_first_write: Callable[[], None] | None = None
        self.algorithm, self._hash = ckptfmt.new_hasher()
        self._writeback_from = 0   # bytes before this offset are already on their way to disk
        self._buffers = (bytearray(self.CHUNK), bytearray(self.CHUNK))
        self._filling = 0          # index in _buffers of the one being filled
        self._filled = 0           # bytes in it
        self._chunk: memoryview | None = None
        self._hashing = False      # the helper thread has a chunk it has not finished
        self._go = threading.Semaphore(0)
        self._done = threading.Semaphore(0)
        self._thread: threading.Thread | None = None

    def write(self, data: Any) -> int:
        if self.before_first_write is not None:
            self.before_first_write()
            self.before_first_write = None
        view = memoryview(data)
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        n = view.nbytes
        try:
            if n >= self.CHUNK:
                self._flush_buffer()
                self._hash_aside(view, ours=False)
            else:
                if self._filled + n > self.CHUNK:
                    self._flush_buffer()
                self._buffers[self._filling][self._filled:self._filled + n] = view
                self._filled += n
        except OSError as exc:
            self.error = exc   # torch turns it into a RuntimeError; the caller wants this one
            raise
        return n

    def flush(self) -> None:
        """Write out what is buffered; durability is the caller's fsync."""
        try:
            self._flush_buffer()
        except OSError as exc:
            self.error = exc
            raise

    def hexdigest(self) -> str:
        self._wait_for_hash()
        return self._hash.hexdigest()

    def close(self) -> None:
        if self._thread is not None:
            self._wait_for_hash()
            self._chunk = None
            self._go.release()
            self._thread.join()
            self._thread = None

    def _flush_buffer(self) -> None:
        if self._filled:
            view = memoryview(self._buffers[self._filling])[:self._filled]
            self._filling, self._filled = 1 - self._filling, 0
            self._hash_aside(view, ours=True)

    def _hash_aside(self, view: memoryview, *, ours: bool) -> None:
        """Hash ``view`` on the helper thread while it is written here. Wait for the hash
        before returning unless the buffer is ours; the next hand-off waits for it then
        (that is also what frees the buffer for refilling)."""
        self._wait_for_hash()
        if self._thread is None:
            self._thread = threading.Thread(target=self._hash_loop, name="ftrain-digest", daemon=True)
            self._thread.start()
        self._chunk = view
        self._hashing = True
        self._go.release()
        try:
            self._write(view)
        finally:
            if not ours:
                self._wait_for_hash()

    def _wait_for_hash(self) -> None:
        if self._hashing:
            self._done.acquire()
            self._hashing = False

    def _write(self, view: memoryview) -> None:
        """Write ``view`` in pieces of ``WRITEBACK_EVERY``, starting writeback after each."""
        step = self.WRITEBACK_EVERY
        for start in range(0, view.nbytes, step):
            piece = view[start:start + step]
            write_all(self.fd, piece)
            self.size += piece.nbytes
            if self.size - self._writeback_from >= step:
                _start_writeback(self.fd, self._writeback_from, self.size - self._writeback_from)
                self._writeback_from = self.size

    def _hash_loop(self) -> None:
        while True:
            self._go.acquire()
            chunk = self._chunk
            if chunk is None:
                return
            self._hash.update(chunk)
            self._done.release()


_sync_file_range: Any = None   # libc's sync_file_range, once looked up; False where there is none


def _start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Ask Linux to start writing this range of ``fd`` to disk, without waiting for it
    (``sync_file_range(SYNC_FILE_RANGE_WRITE)``). Only a head start for the fsync that
    follows, so a missing call or an error is ignored: the fsync reports what matters."""
    global _sync_file_range
    if _sync_file_range is None:
        _sync_file_range = False
        if sys.platform.startswith("linux"):
            try:
                import ctypes

                func = ctypes.CDLL(None, use_errno=True).sync_file_range
                func.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
                func.restype = ctypes.c_int
                _sync_file_range = func
            except (OSError, AttributeError):
                pass
    if _sync_file_range:
        _sync_file_range(fd, offset, nbytes, 2)   # SYNC_FILE_RANGE_WRITE


_crc32_lock = threading.Lock()


def _save_without_crc32(torch: Any, state: Any, writer: HashingWriter) -> None:
    """``torch.save(state, writer)`` without torch's CRC32 of each zip record.

    The checksum in the manifest already covers every byte, and the CRC32 costs about a
    third of a plain torch.save. ``torch.load`` does not check it (zip tools would).
    The option is process-wide, but torch reads it once, when torch.save opens its zip
    writer, before the first byte reaches ``writer``: so it is restored at that first
    write, and only a torch.save that another thread starts while ``state`` is being
    pickled (milliseconds) is written without CRC32 too, which torch.load reads all the
    same. The lock keeps two saves from restoring each other's setting.
    """
    serialization = torch.serialization
    with _crc32_lock:
        previous = serialization.get_crc32_options()

        def restore() -> None:
            serialization.set_crc32_options(previous)

        serialization.set_crc32_options(False)
        writer.before_first_write = restore
        try:
            torch.save(state, writer)
        finally:
            if writer.before_first_write is not None:   # torch.save failed before writing
                writer.before_first_write = None
                restore()


def write_checkpoint(state: Any, directory: str, step: int, info: dict[str, Any], *, durable: bool = True) -> None:
    """temp data (hashed, fsync) → rename → temp manifest (fsync) → rename → fsync folder.
    ``durable=False`` (host memory, ``ftrain.snapshot``): the same steps without writeback or fsync."""
    import torch

    pid = os.getpid()
    data = os.path.join(directory, ckptfmt.data_name(step))
    data_tmp = os.path.join(directory, ckptfmt.temp_name(ckptfmt.data_name(step), pid))
    manifest = os.path.join(directory, ckptfmt.manifest_name(step))
    manifest_tmp = os.path.join(directory, ckptfmt.temp_name(ckptfmt.manifest_name(step), pid))
    renamed = False
    try:
        os.makedirs(directory, exist_ok=True)
        fd = os.open(data_tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        writer = HashingWriter(fd)
        if not durable:
            writer.WRITEBACK_EVERY = 1 << 62   # RAM: nothing to write back
        try:
            try:
                _save_without_crc32(torch, state, writer)
            except RuntimeError as exc:
                if writer.error is not None:
                    raise writer.error from exc
                raise
            writer.flush()
            if durable:
                os.fsync(fd)
        finally:
            writer.close()
            os.close(fd)
        # A manifest of an earlier save of this step would describe other bytes: drop it
        # first, so a crash in between leaves a complete file without a manifest.
        if os.path.lexists(manifest):
            os.unlink(manifest)
        os.replace(data_tmp, data)
        renamed = True
        body = dict(info, bytes=writer.size, **ckptfmt.digest_field(writer.algorithm, writer.hexdigest()))
        _write_durably(manifest_tmp, (json.dumps(body, indent=1) + "\n").encode(), durable=durable)
        os.replace(manifest_tmp, manifest)
        if durable:
            fsync_dir(directory)
    except BaseException as exc:
        for leftover in (data_tmp, manifest_tmp) + ((data,) if renamed else ()):
            try:
                os.unlink(leftover)
            except OSError:
                pass
        if isinstance(exc, OSError) and not isinstance(exc, CheckpointError):
            why = exc.strerror or str(exc)
            raise CheckpointError(exc.errno or 0, f"ftrain.save_checkpoint: cannot save step {step} "
                                  f"in {directory}: {why}") from exc
        raise


def _write_durably(path: str, data: bytes, *, durable: bool = True) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        write_all(fd, memoryview(data))
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)


def cpu_copy(obj: Any, torch: Any, pool: dict[Any, list[Any]] | None = None) -> Any:
    """A snapshot of ``obj`` that later training steps cannot change: tensors copied to
    the CPU, containers rebuilt, anything else deep-copied.

    ``pool``: CPU tensors of the previous snapshot, by (shape, stride, dtype), written out
    and free again. Copying into memory that is already mapped takes a seventh of the time
    of a fresh copy (100 MB: 7 vs 49 ms here): the fresh one pays a page fault per 4 KiB.
    """
    if isinstance(obj, torch.Tensor):
        src = obj.detach()
        if pool and type(src) is torch.Tensor and src.layout == torch.strided and not src.is_quantized:
            free = pool.get((tuple(src.shape), src.stride(), src.dtype))
            if free:
                return _host_copy(free.pop(), src)
        if src.device.type == "cpu" and type(src) is torch.Tensor and src.layout == torch.strided \
                and not src.is_quantized and src.is_contiguous():
            return _host_copy(torch.empty_like(src), src)
        return src.to("cpu", copy=True)
    if isinstance(obj, dict):
        import copy

        out = copy.copy(obj)   # keeps the type and attributes (a state_dict's _metadata)
        for key, value in obj.items():
            out[key] = cpu_copy(value, torch, pool)
        return out
    if isinstance(obj, list):
        return [cpu_copy(v, torch, pool) for v in obj]
    if isinstance(obj, tuple):
        items = [cpu_copy(v, torch, pool) for v in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)
    if isinstance(obj, (str, bytes, int, float, bool, type(None))):
        return obj
    import copy

    return copy.deepcopy(obj)


def _host_copy(dst: Any, src: Any) -> Any:
    """``dst.copy_(src)``; between contiguous CPU tensors one ``memmove`` on this thread.
    torch splits a large CPU copy across its intra-op threads and waits for the slowest:
    on a busy machine a 4 MB copy then blocks 8-20 ms instead of 0.5 ms (median, 2 cores)."""
    if src.device.type == "cpu" and dst.device.type == "cpu" and src.is_contiguous() and dst.is_contiguous() \
            and src.dtype == dst.dtype and src.shape == dst.shape and not src.is_conj() and not src.is_neg():
        import ctypes

        ctypes.memmove(dst.data_ptr(), src.data_ptr(), src.numel() * src.element_size())
        return dst
    return dst.copy_(src)


def snapshot_pool(snapshot: Any, torch: Any) -> dict[Any, list[Any]]:
    """The CPU tensors of a snapshot whose save is over, by (shape, stride, dtype)."""
    pool: dict[Any, list[Any]] = {}
    seen: set[int] = set()
    todo = [snapshot]
    while todo:
        obj = todo.pop()
        if isinstance(obj, torch.Tensor):
            if type(obj) is torch.Tensor and obj.device.type == "cpu" and id(obj) not in seen:
                seen.add(id(obj))
                pool.setdefault((tuple(obj.shape), obj.stride(), obj.dtype), []).append(obj)
        elif isinstance(obj, dict):
            todo.extend(obj.values())
        elif isinstance(obj, (list, tuple)):
            todo.extend(obj)
    return pool


def _background_save(st: ProcessState, snapshot: Any, directory: str, step: int, info: dict[str, Any],
                     final: str) -> None:
    """The thread of a non-blocking save: its error is kept for the next call to raise."""
    error: BaseException | None = None
    try:
        write_checkpoint(snapshot, directory, step, info)
    except BaseException as exc:  # noqa: BLE001 - whatever it was, the next call raises it
        error = exc
        st.save_error, st.save_error_step = exc, step
    try:
        control(st, Control.SAVE_END, step, path=None if error else final,
                **({"error": one_line(error)} if error else {}))
    except OSError:
        pass
