"""Follow the metrics stream as the shim appends to it, in bounded reads.

``Tailer`` follows ``metrics.jsonl`` and returns the complete new records. A missing file,
a partial last line, garbage, a truncated or replaced file are counted in ``Tailer.stats``
and never raise. ``ChangeNotifier`` (inotify where the kernel has it) wakes the supervisor
when the file grows, so it need not poll. The detectors that judge the records live in
``ftrain.detect``. This module never imports torch.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["ChangeNotifier", "Record", "TailStats", "Tailer"]

Record = dict[str, Any]

# ---------------------------------------------------------------------------------- tailing

CHUNK = 1 << 20          # bytes per read; also the granularity of the memory bound
BATCH = CHUNK            # bytes one ``read_new`` consumes at most: a flood is read in batches
MAX_LINE = 1 << 20       # a line longer than this without a newline is dropped
DRAIN_BYTES = 1 << 16    # a notifier's read buffer: thousands of events

_scan_json = json.JSONDecoder().scan_once  # type: ignore[attr-defined]  # the C scanner json.loads runs: (value, end) at an index


@dataclass
class TailStats:
    """What a ``Tailer`` has read and what it had to drop; reported, never fatal."""

    records: int = 0      # records returned
    garbage: int = 0      # lines that are not JSON
    non_dict: int = 0     # JSON that is not an object
    no_step: int = 0      # metric lines without an int "step"
    oversized: int = 0    # lines over MAX_LINE, dropped
    truncations: int = 0  # the file shrank: read again from its start
    replaced: int = 0     # a new file took the path: read it from its start

    def problems(self) -> dict[str, int]:
        """The non-zero problem counters, for a journal line or a warning."""
        return {k: v for k, v in vars(self).items() if k != "records" and v}


class ChangeNotifier:
    """Wakes the supervisor when a file changes (Linux inotify, through ctypes).

    ``fileno()`` turns readable when ``path`` (a file, or a folder's files) is written, so a
    metrics line is seen as soon as it lands instead of at the next poll; ``drain()`` empties
    the event queue. ``create`` returns None where inotify is unavailable, and the
    supervisor then polls.
    """

    _IN_MODIFY, _IN_MOVED_TO, _IN_CREATE = 0x2, 0x80, 0x100
    _IN_NONBLOCK, _IN_CLOEXEC = 0o4000, 0o2000000

    def __init__(self, fd: int) -> None:
        self._fd = fd

    @classmethod
    def create(cls, path: Path) -> ChangeNotifier | None:
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            fd = libc.inotify_init1(cls._IN_NONBLOCK | cls._IN_CLOEXEC)
            if fd < 0:
                return None
            mask = cls._IN_MODIFY | cls._IN_MOVED_TO | cls._IN_CREATE
            if libc.inotify_add_watch(fd, os.fsencode(path), mask) < 0:
                os.close(fd)
                return None
        except (OSError, AttributeError):
            return None
        return cls(fd)

    def fileno(self) -> int:
        return self._fd

    def drain(self) -> None:
        # One read empties the queue: the kernel merges a file's repeated events, so it holds
        # a few at most. A read that fills the buffer is followed by another.
        try:
            while len(os.read(self._fd, DRAIN_BYTES)) == DRAIN_BYTES:
                pass
        except OSError:  # BlockingIOError: nothing queued (a wake-up raced a drain)
            pass

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class Tailer:
    """Follows a growing JSON-lines file and returns its complete new records.

    The file may not exist yet, may end in a partial line (kept until its newline arrives),
    may hold garbage, and may be truncated or replaced (read again from its start). A call
    with nothing new costs one ``os.stat``. Memory stays bounded by ``CHUNK + MAX_LINE``
    plus the records of one batch: a call consumes at most ``limit`` bytes (``BATCH``), and
    ``backlog`` says that more were already there, so a flood of millions of lines is read
    batch by batch and each batch is judged before the next is read. With ``start_at_end``
    an existing file is followed from its current end (a partial line there is skipped); a
    file that appears later is read whole.
    """

    def __init__(self, path: Path, *, start_at_end: bool = False, max_line: int = MAX_LINE) -> None:
        self.path = Path(path)
        self.stats = TailStats()
        self._path = os.fspath(self.path)
        self._max_line = max_line
        self._fd: int | None = None
        self._id: tuple[int, int] = (0, 0)
        self._offset = 0
        self._known = 0     # the file's size at the last look: beyond _offset is the backlog
        self._pending = b""
        self._skip = False  # dropping the rest of a line, up to its newline
        self._open(at_end=start_at_end)

    # public --------------------------------------------------------------------------
    def read_new(self, limit: int = BATCH) -> list[Record]:
        """The complete records appended since the last call, in file order: those of at most
        ``limit`` bytes (a replaced file's rest and the new file's start: twice that)."""
        try:
            st = os.stat(self._path)
        except OSError:
            return self._drain(limit) if self._fd is not None else []
        if self._fd is None or (st.st_dev, st.st_ino) != self._id:
            out = self._drain(limit) if self._fd is not None else []
            if self.backlog:   # the old file's rest first; the switch comes at a later call
                return out
            if self._fd is not None:
                self.stats.replaced += 1
            if self._open(at_end=False) and self._fd is not None:
                out += self._read_to(os.fstat(self._fd).st_size, limit)
            return out
        size = st.st_size
        if size == self._offset:
            self._known = size
            return []
        if size < self._offset:
            self.stats.truncations += 1
            self._offset, self._pending, self._skip = 0, b"", False
        return self._read_to(size, limit)

    @property
    def backlog(self) -> bool:
        """Bytes were there at the last call that it left for the next (a bounded batch)."""
        return self._fd is not None and self._offset < self._known

    @property
    def offset(self) -> int:
        """Bytes of the current file consumed so far (a partial line included)."""
        return self._offset

    def close(self) -> None:
        """Release the file descriptor; ``read_new`` reopens the file if called again."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

    def __enter__(self) -> Tailer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None:
            try:
                self.close()
            except OSError:
                pass

    # internals -----------------------------------------------------------------------
    def _open(self, *, at_end: bool) -> bool:
        self.close()
        try:
            fd = os.open(self._path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError:
            return False
        st = os.fstat(fd)
        self._fd, self._id = fd, (st.st_dev, st.st_ino)
        self._offset, self._known, self._pending, self._skip = 0, 0, b"", False
        if at_end and st.st_size:
            self._offset = self._known = st.st_size
            self._skip = os.pread(fd, 1, st.st_size - 1) != b"\n"  # joined mid-line
        return True

    def _drain(self, limit: int) -> list[Record]:
        """What is left in the file we hold open (it was deleted or replaced)."""
        assert self._fd is not None
        try:
            size = os.fstat(self._fd).st_size
        except OSError:
            self._known = self._offset
            return []
        if size <= self._offset:
            self._known = self._offset
            return []
        return self._read_to(size, limit)

    def _read_to(self, size: int, limit: int) -> list[Record]:
        assert self._fd is not None
        out: list[Record] = []
        self._known = size
        end = min(size, self._offset + max(limit, 1))
        while self._offset < end:
            data = os.pread(self._fd, min(CHUNK, end - self._offset), self._offset)
            if not data:  # shrank under us; the next call sees the truncation
                self._known = self._offset
                break
            self._offset += len(data)
            self._take(data, out)
        self.stats.records += len(out)
        return out

    def _take(self, data: bytes, out: list[Record]) -> None:
        if self._pending:
            data, self._pending = self._pending + data, b""
        if self._skip:
            nl = data.find(b"\n")
            if nl < 0:
                return
            data, self._skip = data[nl + 1:], False
        end = data.rfind(b"\n")
        tail = data[end + 1:]
        if len(tail) > self._max_line:
            self.stats.oversized += 1
            self._skip, tail = True, b""
        self._pending = tail
        if end > 0:
            self._parse(data[:end], out)

    def _parse(self, body: bytes, out: list[Record]) -> None:
        # Fast path: all the lines of a chunk parsed as one JSON array by one call of the C
        # scanner, twice as fast as a json.loads per line (calling the scanner directly skips
        # json.loads's Python wrapper: a fifth of the parse of a few dozen lines, the usual
        # look of the supervisor). A line that is not one JSON value makes the parse fail, end
        # early or the element count differ (short of two broken lines that cancel out
        # exactly), and then the chunk is parsed line by line.
        items: list[Any] | None = None
        try:
            text = "".join(("[", body.decode().replace("\n", ","), "]"))
            found, end = _scan_json(text, 0)
            if end == len(text) and len(found) == body.count(b"\n") + 1:
                items = found
        except (ValueError, StopIteration, RecursionError):  # UnicodeDecodeError is a ValueError
            pass
        if items is None:
            items = self._parse_lines(body)
        kept = [obj for obj in items
                if type(obj) is dict and ("ftrain" in obj or type(obj.get("step")) is int)]
        out += kept
        if len(kept) != len(items):  # count what was dropped, and why
            non_dict = sum(type(obj) is not dict for obj in items)
            self.stats.non_dict += non_dict
            self.stats.no_step += len(items) - len(kept) - non_dict

    def _parse_lines(self, body: bytes) -> list[Any]:
        items: list[Any] = []
        for line in body.split(b"\n"):
            if len(line) > self._max_line:
                self.stats.oversized += 1
                continue
            try:
                items.append(json.loads(line))
            except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
                if line.strip():
                    self.stats.garbage += 1
        return items
