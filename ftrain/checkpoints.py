"""The supervisor's view of a checkpoint folder: what is there, what can be trusted.

The shim writes ``step-NNNNNNNN.pt`` and its manifest ``step-NNNNNNNN.json`` (DESIGN §4,
names in ``ckptfmt``); a script without the shim leaves files of its own. ``scan`` lists
both and gives each a ``CheckpointStatus``; ``newest_usable`` picks the one a restart
would use; ``quarantine`` sets aside what a rollback distrusts. Nothing here imports torch,
and nothing here raises on a foreign or unreadable file: it is listed with a note.
"""

from __future__ import annotations

import enum
import json
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from stat import S_ISREG
from typing import Any

from ftrain import ckptfmt, sharded
from ftrain.files import folder_bytes, read_bounded

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".safetensors")
_DIGEST_CACHE_MAX = 4096


class CheckpointStatus(str, enum.Enum):
    """How far a checkpoint can be trusted.

    ``ok``           the manifest's checksum (``digest``, or ``sha256`` in older
                     manifests) and size match the data file.
    ``corrupt``      they do not (flipped bytes, a truncated file), the manifest cannot be
                     read, or the data file cannot be read: never resumed from.
    ``partial``      leftovers of an interrupted save: a ``.tmp-`` file, a manifest
                     whose data file is missing, or a sharded save's folder
                     (``step-NNNNNNNN/``) without its manifest. Never resumed from.
    ``unverified``   a checkpoint-like file (``.pt``, ``.pth``, ``.ckpt``, ``.bin``,
                     ``.safetensors``) or folder with no manifest: usable, on trust.
    ``quarantined``  set aside in ``quarantine/`` by a rollback; kept, never resumed from.

    A save moves a step through partial → ok; ``quarantine`` moves ok, unverified,
    corrupt or partial → quarantined.
    """

    OK = "ok"
    CORRUPT = "corrupt"
    PARTIAL = "partial"
    UNVERIFIED = "unverified"
    QUARANTINED = "quarantined"

    def __str__(self) -> str:
        return self.value

    @property
    def usable(self) -> bool:
        """Whether a restart may resume from a checkpoint in this state."""
        return self in (CheckpointStatus.OK, CheckpointStatus.UNVERIFIED)


_STATUS_ORDER = {s: i for i, s in enumerate((CheckpointStatus.OK, CheckpointStatus.UNVERIFIED,
                                               CheckpointStatus.CORRUPT, CheckpointStatus.PARTIAL,
                                               CheckpointStatus.QUARANTINED))}


@dataclass(frozen=True)
class Checkpoint:
    """One checkpoint (or leftover) found in a folder.

    ``path`` is the data file (the manifest itself for a manifest without data, the folder
    for a folder checkpoint); ``manifest`` its manifest, if any. ``attempt``, ``t``,
    ``metrics``, ``digest`` (``algorithm:hex``) and ``sha256`` (older manifests only) come
    from the manifest (``t`` is the file's mtime when there
    is none); ``tier`` is where it was first written: ``memory`` for a snapshot the
    supervisor promoted (``ftrain.memtier``), ``disk`` for any other. ``note`` says in
    words why the status is what it is, when that is not obvious.
    """

    path: Path
    step: int | None
    status: CheckpointStatus
    bytes: int = 0
    attempt: int | None = None
    t: float | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    sha256: str | None = None
    manifest: Path | None = None
    digest: str | None = None
    note: str | None = None
    tier: str = "disk"

    def to_json(self) -> dict[str, Any]:
        """The object ``ftrain inspect --json`` prints for this checkpoint (DESIGN §4)."""
        return {
            "path": str(self.path),
            "step": self.step,
            "status": self.status.value,
            "bytes": self.bytes,
            "attempt": self.attempt,
            "t": self.t,
            "metrics": dict(self.metrics),
            "sha256": self.sha256,
            "digest": self.digest,
            "manifest": str(self.manifest) if self.manifest else None,
            "note": self.note,
            "tier": self.tier,
        }


# (path, size, mtime_ns, inode, algorithm) -> hex digest: a file that changed is rehashed.
_digests: dict[tuple[str, int, int, int, str], str] = {}


def scan(directory: str | os.PathLike[str], *, verify: bool = True) -> list[Checkpoint]:
    """Every checkpoint and leftover in ``directory`` and its ``quarantine/``, by step
    (those without a step last). A missing folder is an empty list.

    ``verify`` hashes each data file that has a manifest (with the algorithm it names) (results are cached by path, size
    and mtime, so a repeated scan is cheap); without it only sizes are compared.
    """
    root = Path(directory)
    found = _scan_live(root, verify=verify) + _scan_quarantine(root / ckptfmt.QUARANTINE_DIR)
    return sorted(found, key=_order)


def newest_usable(checkpoints: Iterable[Checkpoint], *, max_step: int | None = None) -> Checkpoint | None:
    """The newest ``ok`` or ``unverified`` checkpoint with a step <= ``max_step``; an ``ok``
    one wins a tie. Never a corrupt, partial or quarantined one."""
    usable = [c for c in checkpoints
              if c.status.usable and c.step is not None and (max_step is None or c.step <= max_step)]
    return max(usable, key=lambda c: (c.step, c.status is CheckpointStatus.OK), default=None)


def restart_candidates(found: Iterable[Checkpoint]) -> list[Checkpoint]:
    """The checkpoints a restart may use, by step: the ``ok`` ones, and ``unverified`` ones
    only from before the oldest ``ok`` one. A file without a manifest (a stray, or a save
    cut between its rename and its manifest) never outranks a verified checkpoint."""
    usable = [c for c in found if c.status.usable and c.step is not None]
    oks = [c.step for c in usable if c.status is CheckpointStatus.OK and c.step is not None]
    first_ok = min(oks, default=None)
    kept = [c for c in usable if c.status is CheckpointStatus.OK or first_ok is None
            or (c.step is not None and c.step < first_ok)]
    return sorted(kept, key=lambda c: (c.step, c.status is CheckpointStatus.OK))


# A resume that died loading its checkpoint: the traceback passes through the shim's
# load_checkpoint or torch.load, or the shim's own check refused the file.
_LOAD_FRAMES = re.compile(r'File "[^"]*(?:ftrain/shim/__init__\.py", line \d+, in load_checkpoint'
                          r'|torch/serialization\.py", line \d+, in load)\b|^ftrain\.load_checkpoint: '
                          r'|CheckpointError: .*ftrain\.load_checkpoint: ')


def load_failure(tail: Sequence[str]) -> str | None:
    """The last line of the traceback of a failed checkpoint load in an attempt's output
    ``tail``, or None when the output shows no load that failed (or a call that lacked the
    ``state=`` a sharded checkpoint needs: the script's mistake, not the checkpoint's)."""
    for i, line in enumerate(tail):
        if _LOAD_FRAMES.search(line):
            rest = [x.strip() for x in tail[i + 1:] if x.strip() and not x.startswith((" ", "\t"))]
            last = (rest[-1] if rest else line.strip())[:200]
            return None if last.startswith("TypeError: ftrain.load_checkpoint: ") else last
    return None


def set_aside(path: str | os.PathLike[str]) -> list[Path]:
    """Move one checkpoint (its data file and manifest) into ``quarantine/`` beside it: it
    failed to load, so no restart may choose it again. Returns the new paths."""
    data = Path(path)
    manifest_name = ckptfmt.manifest_for(data.name) or _folder_manifest(data.name)
    sources = [p for p in (data, data.parent / manifest_name if manifest_name else None)
               if p is not None and os.path.lexists(p)]
    if not sources:
        return []
    qdir = data.parent / ckptfmt.QUARANTINE_DIR
    qdir.mkdir(exist_ok=True)
    suffix = _free_suffix(qdir, [p.name for p in sources])
    moved = []
    for src in sources:
        dst = qdir / (src.name + suffix)
        os.rename(src, dst)
        moved.append(dst)
    _fsync_dir(qdir)
    _fsync_dir(data.parent)
    return moved


def quarantine(directory: str | os.PathLike[str], *, after_step: int) -> list[Path]:
    """Move every checkpoint with a step > ``after_step`` (data, manifest, leftovers) into
    ``<directory>/quarantine/``, by atomic renames; returns the new paths.

    The data file moves before its manifest, so an interruption leaves a manifest without
    data (partial, never resumed from) rather than data without a manifest (unverified).
    A name already taken in the quarantine gets a ``.q1``, ``.q2`` … suffix.
    """
    root = Path(directory)
    doomed = [c for c in _scan_live(root, verify=False) if c.step is not None and c.step > after_step]
    if not doomed:
        return []
    qdir = root / ckptfmt.QUARANTINE_DIR
    qdir.mkdir(exist_ok=True)
    moved: list[Path] = []
    for ckpt in sorted(doomed, key=_order):
        sources = [p for p in (ckpt.path, ckpt.manifest) if p is not None]
        suffix = _free_suffix(qdir, [p.name for p in sources])
        for src in sources:
            dst = qdir / (src.name + suffix)
            os.rename(src, dst)
            moved.append(dst)
    _fsync_dir(qdir)
    _fsync_dir(root)
    return moved


def remove_leftovers(directory: str | os.PathLike[str], *, before: float) -> list[Path]:
    """Delete the ``.tmp-step-*`` files of interrupted saves in ``directory`` (not in its
    quarantine): those last modified before ``before`` whose writer (the pid in the name)
    no longer runs here. Call it only when no process of the run's attempts is alive, so no
    live save loses its file. Returns what went."""
    root = Path(directory)
    removed: list[Path] = []
    entries = _list(root)
    for name, entry in entries.items():
        match = ckptfmt.TEMP_RE.match(name)
        if match is None:
            manifest = _folder_manifest(name)
            if manifest is not None and manifest not in entries and _older(entry, before) \
                    and sharded.remove(entry.path):
                removed.append(Path(entry.path))   # a sharded save's folder, never given its manifest
            continue
        try:
            st = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        if st.st_mtime >= before or not S_ISREG(st.st_mode) or _pid_alive(int(name.rsplit(".", 1)[1])):
            continue
        try:
            os.unlink(entry.path)
            removed.append(Path(entry.path))
        except OSError:
            pass
    return removed


def _older(entry: os.DirEntry[str], before: float) -> bool:
    try:
        return entry.stat(follow_symlinks=False).st_mtime < before
    except OSError:
        return False


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True    # someone else's process
    except (OverflowError, ValueError):
        return False   # a pid no process can have
    return True


# --------------------------------------------------------------------------- scanning
def _scan_live(root: Path, *, verify: bool) -> list[Checkpoint]:
    entries = _list(root)
    found: list[Checkpoint] = []
    for name, entry in entries.items():
        if name == ckptfmt.QUARANTINE_DIR:
            continue
        step = ckptfmt.parse_step(name)
        if ckptfmt.TEMP_RE.match(name):
            found.append(_leftover(entry, step, "temporary file of an interrupted save"))
            continue
        if name.startswith("."):
            continue
        folder_manifest = _folder_manifest(name)
        if folder_manifest is not None:
            step = sharded.parse_folder(name)
            if folder_manifest in entries:
                found.append(_sharded(entry, Path(entries[folder_manifest].path), step, verify=verify))
            else:
                found.append(_leftover(entry, step, "a sharded save's folder without its manifest (interrupted)"))
            continue
        own = ckptfmt.STEP_RE.match(name)
        if own is not None and own.group(2) == "json":
            if _data_name(name) not in entries and _folder_name(name) not in entries:
                found.append(_leftover(entry, step, "manifest without its data file"))
            continue
        if own is not None:
            manifest = _manifest_name(name)
            if manifest in entries:
                found.append(_verified(Path(entry.path), Path(entries[manifest].path), step, verify=verify))
            else:
                found.append(_unverified(entry, step, "no manifest"))
            continue
        foreign = _foreign(entry, CheckpointStatus.UNVERIFIED)
        if foreign is not None:
            found.append(foreign)
    return found


def _scan_quarantine(qdir: Path) -> list[Checkpoint]:
    entries = _list(qdir)
    found: list[Checkpoint] = []
    for name, entry in entries.items():
        base, suffix = _split_suffix(name)
        own = ckptfmt.STEP_RE.match(base)
        if own is not None and own.group(2) == "json" and (_data_name(base) + suffix in entries
                                                           or _folder_name(base) + suffix in entries):
            continue   # listed with its data file or folder
        folder_manifest = _folder_manifest(base)
        if folder_manifest is not None:
            manifest = Path(entries[folder_manifest + suffix].path) if folder_manifest + suffix in entries else None
            meta = _read_manifest(manifest)[0] if manifest is not None else {}
            found.append(Checkpoint(Path(entry.path), sharded.parse_folder(base), CheckpointStatus.QUARANTINED,
                                    bytes=folder_bytes(entry.path), manifest=manifest,
                                    **_meta_fields(meta, default_t=_size_and_mtime(entry)[1])))
            continue
        if own is not None or ckptfmt.TEMP_RE.match(base):
            manifest_key = _manifest_name(base) + suffix if own is not None and own.group(2) == "pt" else None
            manifest = Path(entries[manifest_key].path) if manifest_key in entries else None
            meta = _read_manifest(manifest)[0] if manifest is not None else {}
            size, mtime = _size_and_mtime(entry)
            found.append(Checkpoint(Path(entry.path), ckptfmt.parse_step(base), CheckpointStatus.QUARANTINED,
                                    bytes=size, manifest=manifest, **_meta_fields(meta, default_t=mtime)))
            continue
        foreign = _foreign(entry, CheckpointStatus.QUARANTINED)
        if foreign is not None:
            found.append(foreign)
    return found


def _verified(data: Path, manifest: Path, step: int | None, *, verify: bool) -> Checkpoint:
    """A data file with a manifest: ok when size and checksum match, else corrupt."""
    meta, problem = _read_manifest(manifest)

    def result(status: CheckpointStatus, size: int, note: str | None = None) -> Checkpoint:
        return Checkpoint(data, step, status, bytes=size, manifest=manifest, note=note,
                          **_meta_fields(meta, default_t=None))

    try:
        stat = os.stat(data)
    except OSError as exc:
        return result(CheckpointStatus.CORRUPT, 0, f"cannot read the data file: {exc.strerror}")
    if not _stays_inside(data) or not S_ISREG(stat.st_mode):
        return result(CheckpointStatus.CORRUPT, 0, "the data file is not a regular file of this folder")
    if problem is not None:
        return result(CheckpointStatus.CORRUPT, stat.st_size, problem)
    expected_size = meta.get("bytes")
    algorithm, expected = ckptfmt.digest_of(meta) or ("", "")
    if type(meta.get("step")) is not int or meta.get("step") != step:
        return result(CheckpointStatus.CORRUPT, stat.st_size,
                      f"the manifest is of step {meta.get('step')!r}, the file name says {step}")
    if stat.st_size != expected_size:
        return result(CheckpointStatus.CORRUPT, stat.st_size,
                      f"{stat.st_size} bytes, the manifest says {expected_size!r}")
    if not verify:
        return result(CheckpointStatus.OK, stat.st_size, "size matches; checksum not verified")
    try:
        digest = _digest(data, stat, algorithm)
    except OSError as exc:
        return result(CheckpointStatus.CORRUPT, stat.st_size, f"cannot read the data file: {exc.strerror}")
    if digest is None:
        return result(CheckpointStatus.UNVERIFIED, stat.st_size,
                      f"{algorithm} cannot be computed here (pip install xxhash): checksum not verified")
    if digest != expected:
        return result(CheckpointStatus.CORRUPT, stat.st_size, f"{algorithm} does not match the manifest")
    return result(CheckpointStatus.OK, stat.st_size)


def _sharded(entry: os.DirEntry[str], manifest: Path, step: int | None, *, verify: bool) -> Checkpoint:
    """A sharded save's folder with its manifest: ok when every file it lists matches."""
    meta, problem = _read_manifest(manifest, folder=True)
    folder = Path(entry.path)
    if problem is not None:
        return Checkpoint(folder, step, CheckpointStatus.CORRUPT, bytes=folder_bytes(folder),
                          manifest=manifest, note=problem, **_meta_fields(meta, default_t=None))
    found = sharded.check(folder, meta, step, verify=verify, digest=_digest)
    status = CheckpointStatus.CORRUPT if not found.ok else \
        CheckpointStatus.OK if found.verified else CheckpointStatus.UNVERIFIED
    return Checkpoint(folder, step, status,
                      bytes=found.bytes, manifest=manifest, note=found.problem, **_meta_fields(meta, default_t=None))


MANIFEST_LIMIT = 4 << 20   # a manifest is a few hundred bytes (its metrics included)


def _stays_inside(path: Path) -> bool:
    """``path`` is no symlink that leads out of its own folder."""
    return os.path.dirname(os.path.realpath(path)) == os.path.realpath(path.parent)


def _read_manifest(path: Path, *, folder: bool = False) -> tuple[dict[str, Any], str | None]:
    """The manifest's fields, and a problem in words if it cannot be trusted (typed: a field
    of the wrong type makes the checkpoint ``corrupt``, never an exception). ``folder``: the
    manifest of a sharded folder, whose files ``sharded.check`` types."""
    try:
        meta = json.loads(read_bounded(path, MANIFEST_LIMIT, inside=path.parent))
    except OSError as exc:
        return {}, f"cannot read the manifest: {exc.strerror or exc}"
    except (ValueError, RecursionError) as exc:
        return {}, f"the manifest is not JSON: {str(exc)[:120]}"
    if not isinstance(meta, dict):
        return {}, "the manifest is not a JSON object"
    of_folder = sharded.is_folder_manifest(meta)
    if of_folder != folder:
        return meta, "the manifest describes a sharded folder, not a file" if of_folder \
            else "the manifest describes a file, not a sharded folder"
    if folder:
        return meta, None   # its file list is typed by sharded.check
    size = meta.get("bytes")
    if type(size) is not int or size < 0 or ckptfmt.digest_of(meta) is None:
        return meta, "the manifest lacks bytes or sha256 (or digest)"
    # each checksum field it has must be one (the one verified is ``digest``, where both are)
    for field_name in ("digest", "sha256"):
        if field_name not in meta:
            continue
        algorithm, hexdigest = ckptfmt.digest_of({field_name: meta[field_name]}) or ("", "")
        if algorithm not in ckptfmt.DIGEST_HEX:
            return meta, f"the manifest's digest algorithm is unknown: {str(meta[field_name])[:40]!r}"
        if len(hexdigest) != ckptfmt.DIGEST_HEX[algorithm] or not all(c in "0123456789abcdef" for c in hexdigest):
            return meta, f"the manifest's {algorithm} is not a digest: {hexdigest[:80]!r}"
    return meta, None


def _meta_fields(meta: dict[str, Any], *, default_t: float | None) -> dict[str, Any]:
    attempt, t, metrics, sha = meta.get("attempt"), meta.get("t"), meta.get("metrics"), meta.get("sha256")
    checksum = ckptfmt.digest_of(meta)
    return {
        "attempt": attempt if isinstance(attempt, int) and not isinstance(attempt, bool) else None,
        "t": float(t) if isinstance(t, (int, float)) and not isinstance(t, bool) else default_t,
        "metrics": dict(metrics) if isinstance(metrics, dict) else {},
        "sha256": sha if isinstance(sha, str) else None,
        "digest": ":".join(checksum) if checksum is not None else None,
        "tier": "memory" if meta.get("tier") == "memory" else "disk",
    }


def _unverified(entry: os.DirEntry[str], step: int | None, note: str | None) -> Checkpoint:
    size, mtime = _size_and_mtime(entry)
    if size < 0:
        return Checkpoint(Path(entry.path), step, CheckpointStatus.CORRUPT, note="cannot read the file")
    return Checkpoint(Path(entry.path), step, CheckpointStatus.UNVERIFIED, bytes=size, t=mtime, note=note)


def _leftover(entry: os.DirEntry[str], step: int | None, note: str) -> Checkpoint:
    size, mtime = _size_and_mtime(entry)
    return Checkpoint(Path(entry.path), step, CheckpointStatus.PARTIAL, bytes=max(size, 0), t=mtime, note=note)


def _foreign(entry: os.DirEntry[str], status: CheckpointStatus) -> Checkpoint | None:
    """A checkpoint another tool wrote (a known suffix, or a folder); None for other files."""
    try:
        is_dir = entry.is_dir()
    except OSError:
        is_dir = False
    if entry.name.startswith(".") or not (is_dir or entry.name.endswith(CHECKPOINT_SUFFIXES)):
        return None
    if is_dir and os.path.lexists(os.path.join(entry.path, "journal.jsonl")):
        return None   # a run folder, not a checkpoint
    step = None if _STAMP_RE.search(entry.name) else ckptfmt.guess_step(entry.name)
    if status is CheckpointStatus.UNVERIFIED:
        return _unverified(entry, step, "no manifest")
    size, mtime = _size_and_mtime(entry)
    return Checkpoint(Path(entry.path), step, status, bytes=max(size, 0), t=mtime)


# A date and time in a name (``run-20261207-053000``): a timestamp, never a step.
_STAMP_RE = re.compile(r"(?:19|20)\d{6}[-_T]?\d{4,6}(?!\d)")


def _size_and_mtime(entry: os.DirEntry[str]) -> tuple[int, float | None]:
    """Size (a folder's: the sum of its files) and mtime; (-1, None) when it cannot be read."""
    try:
        stat = entry.stat()
        if not entry.is_dir():
            return stat.st_size, stat.st_mtime
    except OSError:
        return -1, None
    total = 0
    for folder, _, files in os.walk(entry.path):
        for name in files:
            try:
                total += os.stat(os.path.join(folder, name)).st_size
            except OSError:
                pass
    return total, stat.st_mtime


def _digest(path: Path, stat: os.stat_result, algorithm: str) -> str | None:
    """The hex ``algorithm`` digest of the file (cached); None when it cannot be computed here."""
    key = (str(path), stat.st_size, stat.st_mtime_ns, stat.st_ino, algorithm)
    digest = _digests.get(key)
    if digest is None:
        h = ckptfmt.hasher(algorithm)   # here: loading OpenSSL is 5 ms of `ftrain run`'s start
        if h is None:
            return None
        buffer = bytearray(1 << 20)
        view = memoryview(buffer)
        with open(path, "rb") as f:
            while n := f.readinto(buffer):
                h.update(view[:n])
        digest = h.hexdigest()
        if len(_digests) >= _DIGEST_CACHE_MAX:
            del _digests[next(iter(_digests))]
        _digests[key] = digest
    return digest


def _list(folder: Path) -> dict[str, os.DirEntry[str]]:
    try:
        with os.scandir(folder) as it:
            return {entry.name: entry for entry in it}
    except OSError:
        return {}   # missing, not a folder, or unreadable: nothing to list


def _order(c: Checkpoint) -> tuple[bool, int, int, str]:
    return (c.step is None, c.step or 0, _STATUS_ORDER[c.status], c.path.name)


def _data_name(manifest_name: str) -> str:
    return manifest_name[: -len(ckptfmt.MANIFEST_SUFFIX)] + ckptfmt.DATA_SUFFIX


def _folder_manifest(name: str) -> str | None:
    """The manifest name of a sharded save's folder ``name``; None for another name."""
    step = sharded.parse_folder(name)
    return ckptfmt.manifest_name(step) if step is not None else None


def _folder_name(manifest_name: str) -> str:
    return manifest_name[: -len(ckptfmt.MANIFEST_SUFFIX)]


def _manifest_name(data_name: str) -> str:
    return data_name[: -len(ckptfmt.DATA_SUFFIX)] + ckptfmt.MANIFEST_SUFFIX


def _split_suffix(name: str) -> tuple[str, str]:
    """``step-00000120.pt.q2`` → (``step-00000120.pt``, ``.q2``); names without one → (name, "")."""
    base, dot, tail = name.rpartition(".")
    if dot and tail.startswith("q") and tail[1:].isdigit():
        return base, "." + tail
    return name, ""


def _free_suffix(qdir: Path, names: list[str]) -> str:
    """"" when none of ``names`` is taken in the quarantine, else the first free ``.qN``."""
    suffix, n = "", 0
    while any(os.path.lexists(qdir / (name + suffix)) for name in names):
        n += 1
        suffix = f".q{n}"
    return suffix


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def best_of(checkpoints: Iterable[Checkpoint], metric: str, mode: str = "min") -> Checkpoint | None:
    """The ok checkpoint whose manifest metric is lowest (``min``) or highest (``max``)."""
    scored = [(c.metrics[metric], c) for c in checkpoints
              if c.status is CheckpointStatus.OK and isinstance(c.metrics.get(metric), (int, float))
              and c.metrics[metric] == c.metrics[metric]]  # NaN never wins
    if not scored:
        return None
    pick = min if mode == "min" else max
    return pick(scored, key=lambda sc: (sc[0], -(sc[1].step or 0) if mode == "min" else sc[1].step or 0))[1]


def retain(directory: str | os.PathLike[str], *, keep_last: int | None = None, keep_every: int | None = None,
           best: tuple[str, str] | None = None, protect: Iterable[int] = ()) -> list[Path]:
    """Delete the shim's ok checkpoints that retention does not keep; returns what went.

    Kept: the newest ``keep_last``; one per ``keep_every`` steps (the first at or after each
    multiple); the best by ``best = (metric, mode)``; every step in ``protect`` (those a
    rollback could need); and always the newest ok. Only ``ok`` checkpoints written by the
    shim are candidates: unverified, corrupt, partial and quarantined ones are never touched.
    Without ``keep_last`` and ``keep_every`` nothing is deleted.
    """
    if keep_last is None and keep_every is None:
        return []
    root = Path(directory)
    found = [c for c in _scan_live(root, verify=False)
             if c.status is CheckpointStatus.OK and c.step is not None and c.manifest is not None]
    if not found:
        return []
    found.sort(key=lambda c: c.step)  # type: ignore[arg-type, return-value]
    keep = {found[-1].step} | set(protect)
    if keep_last:
        keep |= {c.step for c in found[-keep_last:]}
    if keep_every:
        firsts: dict[int, int] = {}
        for c in found:
            assert c.step is not None
            firsts.setdefault(c.step // keep_every, c.step)
        keep |= set(firsts.values())
    if best is not None:
        winner = best_of(found, *best)
        if winner is not None:
            keep.add(winner.step)
    removed: list[Path] = []
    for c in found:
        if c.step in keep:
            continue
        for path in (c.manifest, c.path):  # manifest first: a half-deleted pair reads as unverified
            assert path is not None
            if path is c.path and sharded.parse_folder(path.name) is not None:
                if sharded.remove(path):   # a sharded folder; without its manifest it read as partial
                    removed.append(path)
                continue
            try:
                os.unlink(path)
                removed.append(Path(path))
            except FileNotFoundError:
                pass
    if removed:
        _fsync_dir(root)
    return removed
