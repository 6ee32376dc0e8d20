"""Sharded checkpoints: a folder of files that every rank wrote, and the manifest that vouches for it.

``ftrain.save_checkpoint(state, step, sharded=True)`` (every rank) writes the folder
``step-NNNNNNNN/`` through ``torch.distributed.checkpoint`` (each rank its own
``__R_N.distcp`` files, the coordinator ``.metadata``), then rank 0 writes the manifest
``step-NNNNNNNN.json`` beside it, only once every rank's files are durable::

    {"step": 120, "attempt": 1, "t": ..., "metrics": {...}, "tier": "disk",
     "sharded": true, "world_size": 2, "bytes": <total>,
     "files": [{"name": ".metadata", "bytes": 1234, "digest": "xxh3_128:..."}, ...]}

Each file's checksum is named as in a plain manifest (``ckptfmt.digest_field``: ``digest``
``algorithm:hex``, or ``sha256`` where xxhash is not installed).

So a folder without a manifest is the leftover of an interrupted save (``partial``), and
one whose files do not match the manifest is ``corrupt``. This module holds the names and
the checks, as plain values; ``checkpoints`` maps them onto its statuses. Standard library
only: the supervisor never imports torch, and the shim builds its manifest here too.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from stat import S_ISDIR, S_ISREG
from typing import Any

from ftrain import ckptfmt
from ftrain.files import folder_bytes

__all__ = ["FolderCheck", "check", "folder_name", "is_folder_manifest", "manifest_body",
           "parse_folder", "remove"]

# At least the eight digits of ``folder_name``'s padding: another tool's ``step-5/`` stays foreign.
FOLDER_RE = re.compile(r"^step-(\d{8,})$")
METADATA = ".metadata"        # DCP's own index of the folder, written by its coordinator
FILES_MAX = 100_000           # entries a manifest may list


def folder_name(step: int) -> str:
    """``step-00000120``: the folder a sharded save of ``step`` writes."""
    return f"step-{step:08d}"


def parse_folder(name: str) -> int | None:
    """The step of a sharded checkpoint's folder name, else None."""
    match = FOLDER_RE.match(name)
    return int(match.group(1)) if match else None


def manifest_body(info: dict[str, Any], files: list[dict[str, Any]], world_size: int) -> dict[str, Any]:
    """The manifest of a sharded save: ``info`` (step, attempt, t, metrics) and every file,
    by name, with its size and checksum."""
    ordered = sorted(files, key=lambda f: f["name"])
    return dict(info, tier="disk", sharded=True, world_size=world_size,
                bytes=sum(f["bytes"] for f in ordered), files=ordered)


def is_folder_manifest(meta: Any) -> bool:
    """Whether a manifest's content says it describes a folder."""
    return isinstance(meta, dict) and meta.get("sharded") is True


@dataclass(frozen=True)
class FolderCheck:
    """What ``check`` found: ``ok``, the bytes on disk, and the problem in words when not ok
    (or, with ``verified`` False, why the checksums could not be computed here)."""

    ok: bool
    bytes: int
    problem: str | None = None
    verified: bool = True


# (path, stat, algorithm) -> hex digest, None when the algorithm is not available here
Digest = Callable[[Path, os.stat_result, str], "str | None"]


def check(folder: Path, meta: dict[str, Any], step: int | None, *, verify: bool, digest: Digest) -> FolderCheck:
    """Compare ``folder`` with its manifest ``meta``: every listed file a regular file of the
    folder (no symlink, no ``/``), of the listed size and, with ``verify``, checksum."""
    try:
        st = os.lstat(folder)
    except OSError as exc:
        return FolderCheck(False, 0, f"cannot read the folder: {exc.strerror}")
    if not S_ISDIR(st.st_mode):
        return FolderCheck(False, 0, "the checkpoint is not a folder of this checkpoint folder")
    on_disk = folder_bytes(folder)
    files, problem = _files_of(meta)
    if problem is None and (type(meta.get("step")) is not int or meta.get("step") != step):
        problem = f"the manifest is of step {meta.get('step')!r}, the folder name says {step}"
    if problem is not None:
        return FolderCheck(False, on_disk, problem)
    for entry in files:
        path = folder / entry["name"]
        try:
            fst = os.lstat(path)
        except FileNotFoundError:
            return FolderCheck(False, on_disk, f"{entry['name']} is missing")
        except OSError as exc:
            return FolderCheck(False, on_disk, f"cannot read {entry['name']}: {exc.strerror}")
        if not S_ISREG(fst.st_mode):
            return FolderCheck(False, on_disk, f"{entry['name']} is not a regular file of the folder")
        if fst.st_size != entry["bytes"]:
            return FolderCheck(False, on_disk, f"{entry['name']} has {fst.st_size} bytes, the manifest says "
                                               f"{entry['bytes']}")
    if not verify:
        return FolderCheck(True, on_disk, "sizes match; checksums not verified")
    for entry in files:
        path = folder / entry["name"]
        algorithm, expected = ckptfmt.digest_of(entry) or ("", "")
        try:
            found = digest(path, os.lstat(path), algorithm)
        except OSError as exc:
            return FolderCheck(False, on_disk, f"cannot read {entry['name']}: {exc.strerror}")
        if found is None:
            return FolderCheck(True, on_disk, f"{algorithm} cannot be computed here (pip install xxhash): "
                                              "checksums not verified", verified=False)
        if found != expected:
            return FolderCheck(False, on_disk, f"{algorithm} of {entry['name']} does not match the manifest")
    return FolderCheck(True, on_disk)


def _files_of(meta: dict[str, Any]) -> tuple[list[dict[str, Any]], str | None]:
    """The manifest's file list, typed, or a problem in words."""
    files = meta.get("files")
    if not isinstance(files, list) or not files or len(files) > FILES_MAX:
        return [], "the manifest lists no files"
    names = set()
    for entry in files:
        if not isinstance(entry, dict):
            return [], "the manifest's file list holds something other than objects"
        name, size, checksum = entry.get("name"), entry.get("bytes"), ckptfmt.digest_of(entry)
        if not isinstance(name, str) or not name or "/" in name or "\0" in name or name in (".", ".."):
            return [], f"the manifest names a file outside the folder: {str(name)[:80]!r}"
        if type(size) is not int or size < 0 or checksum is None or checksum[0] not in ckptfmt.DIGEST_HEX \
                or len(checksum[1]) != ckptfmt.DIGEST_HEX[checksum[0]] \
                or not all(c in "0123456789abcdef" for c in checksum[1]):
            return [], f"the manifest's entry for {name[:80]!r} lacks bytes or a digest"
        names.add(name)
    if METADATA not in names:
        return [], f"the manifest does not list {METADATA}"
    return files, None


def remove(folder: str | os.PathLike[str]) -> bool:
    """Delete a checkpoint folder and what is in it; a symlink is only unlinked, never followed.
    True when it went."""
    try:
        if os.path.islink(folder) or not os.path.isdir(folder):
            os.unlink(folder)
        else:
            shutil.rmtree(folder)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    return True
