"""The memory tier: the supervisor's folder in host shared memory where ``ftrain.snapshot``
writes (DESIGN §3). The supervisor owns it, so a snapshot outlives the training process.

The folder is ``/dev/shm/ftrain-<uid>-<digest of the run folder>``: one per run, the same
on resume, outside the run folder (a run folder on a network disk must not hold RAM). The
shim writes there under the checkpoint names of ``ckptfmt`` (data, then manifest with
``"tier": "memory"``), so ``checkpoints.scan`` verifies it like any checkpoint folder.
When an attempt fails, ``promote`` copies the newest usable snapshot into ``checkpoints/``
(hashed on the way and checked against its manifest, fsynced, renamed into place: an
ordinary checkpoint for resume, ``inspect``, retention and rollbacks), then ``clear``
empties the tier but for the promoted snapshot, which the restarted attempt loads from
memory (``ftrain.load_checkpoint``: same name, same digest); the run's end removes it.
Nothing here imports torch: the supervisor only moves and checksums bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ftrain import checkpoints, ckptfmt
from ftrain.checkpoints import Checkpoint, CheckpointStatus
from ftrain.files import folder_bytes, fsync_dir

if TYPE_CHECKING:
    from ftrain.kinds import Failure
    from ftrain.policy import Policy

__all__ = ["MemoryTier", "Promotion", "promote_newest", "snapshot_limit"]

SHM_ROOT = Path("/dev/shm")
_CHUNK = 8 << 20
OWNER = ".run-dir"   # in a tier: the run folder it belongs to (sweep_orphans)


@dataclass(frozen=True)
class Promotion:
    """A snapshot made a checkpoint: where it is now, and what it cost."""

    step: int
    path: Path
    bytes: int
    seconds: float


class MemoryTier:
    """The run's folder of snapshots in host memory (see the module)."""

    def __init__(self, run_dir: Path, *, overhead: float = 0.02, root: Path | None = None) -> None:
        base = root if root is not None else Path(os.environ.get("FTRAIN_SHM_ROOT") or SHM_ROOT)
        self.run_dir = Path(run_dir).absolute()
        key = hashlib.sha256(str(self.run_dir).encode()).hexdigest()[:16]
        self.dir = base / f"ftrain-{os.getuid()}-{key}"
        self.overhead = overhead
        self.available = False

    def open(self) -> bool:
        """Make the folder (ours alone: 0700, no symlink); False where host memory is not
        available (no /dev/shm): ``snapshot`` then does nothing."""
        try:
            self.dir.parent.stat()
            os.mkdir(self.dir, 0o700)
        except FileExistsError:
            pass
        except OSError:
            return False
        try:
            st = os.lstat(self.dir)
        except OSError:
            return False
        self.available = stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid()
        if self.available:
            try:
                (self.dir / OWNER).write_text(str(self.run_dir))
            except OSError:
                pass
            self.sweep_orphans()
        return self.available

    def sweep_orphans(self) -> list[Path]:
        """Remove the tiers of this user whose run folder is gone (a supervisor killed, then
        its folder deleted: nothing would ever resume it). A tier whose run folder still
        exists is kept for its ``resume``; one without an owner note is left alone."""
        removed = []
        for tier in self.dir.parent.glob(f"ftrain-{os.getuid()}-*"):
            if tier == self.dir:
                continue
            try:
                owner = Path((tier / OWNER).read_text()[:4096])
                st = os.lstat(tier)
            except (OSError, ValueError):
                continue
            if stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and owner.is_absolute() \
                    and not (owner / "journal.jsonl").exists():
                shutil.rmtree(tier, ignore_errors=True)
                removed.append(tier)
        return removed

    def env(self) -> dict[str, str]:
        """What the child needs: the folder and the overhead budget."""
        if not self.available:
            return {}
        return {"FTRAIN_MEMORY_DIR": str(self.dir), "FTRAIN_SNAPSHOT_OVERHEAD": repr(self.overhead)}

    def snapshots(self) -> list[Checkpoint]:
        """The complete snapshots there, verified (checksum), oldest first."""
        if not self.dir.is_dir():
            return []
        found = [c for c in checkpoints.scan(self.dir) if c.status is CheckpointStatus.OK and c.step is not None]
        return sorted(found, key=lambda c: c.step or 0)

    def usage(self) -> int:
        """Bytes the tier holds now (``inspect`` shows it)."""
        return folder_bytes(self.dir)

    def newest(self, *, at_most: int | None = None, newer_than: int | None = None) -> Checkpoint | None:
        """The newest verified snapshot with ``newer_than < step <= at_most``."""
        for snap in reversed(self.snapshots()):
            assert snap.step is not None
            if at_most is not None and snap.step > at_most:
                continue
            if newer_than is not None and snap.step <= newer_than:
                return None
            return snap
        return None

    def promote(self, snap: Checkpoint, checkpoint_dir: Path) -> Promotion:
        """Copy ``snap`` into ``checkpoint_dir`` as an ordinary checkpoint of its step:
        data (hashed while copied, compared with the snapshot's manifest, fsynced) renamed
        into place, then the manifest, then the folder fsynced. OSError when it cannot."""
        import time

        assert snap.step is not None and snap.manifest is not None
        started = time.perf_counter()
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        pid = os.getpid()
        data = checkpoint_dir / ckptfmt.data_name(snap.step)
        manifest = checkpoint_dir / ckptfmt.manifest_name(snap.step)
        data_tmp = checkpoint_dir / ckptfmt.temp_name(data.name, pid)
        manifest_tmp = checkpoint_dir / ckptfmt.temp_name(manifest.name, pid)
        meta = json.loads(snap.manifest.read_bytes())
        algorithm, expected = ckptfmt.digest_of(meta) or ("sha256", "")
        try:
            digest, size = _copy_hashed(snap.path, data_tmp, algorithm)
            if digest != expected or size != meta.get("bytes"):
                raise OSError(f"{snap.path}: changed while it was copied ({algorithm} or size differ)")
            if manifest.exists():
                manifest.unlink()
            os.replace(data_tmp, data)
            body = dict(meta, tier="memory", promoted_t=time.time())
            fd = os.open(manifest_tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
            try:
                os.write(fd, (json.dumps(body, indent=1) + "\n").encode())
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(manifest_tmp, manifest)
            fsync_dir(checkpoint_dir)
        finally:
            for leftover in (data_tmp, manifest_tmp):
                try:
                    os.unlink(leftover)
                except OSError:
                    pass
        return Promotion(snap.step, data, size, time.perf_counter() - started)

    def clear(self, *, keep: int | None = None) -> None:
        """Empty the tier (after a promotion, or a rollback that distrusts what is there),
        but for the snapshot of step ``keep``: the promoted one, which the restarted
        attempt's ``load_checkpoint`` reads from memory instead of disk (the child's next
        snapshot removes it)."""
        try:
            with os.scandir(self.dir) as entries:
                names = [e.name for e in entries]
        except OSError:
            return
        kept = {OWNER} | ({ckptfmt.data_name(keep), ckptfmt.manifest_name(keep)} if keep is not None else set())
        for name in names:
            if name in kept:
                continue
            try:
                os.unlink(self.dir / name)
            except OSError:
                pass

    def release(self) -> None:
        """Remove the tier: the run ended or was interrupted (its memory goes back)."""
        shutil.rmtree(self.dir, ignore_errors=True)
        self.available = False


def _copy_hashed(src: Path, dst: Path, algorithm: str) -> tuple[str, int]:
    """Copy ``src`` to a new ``dst`` (fsynced), hashing the bytes on the way (``algorithm``:
    the snapshot manifest's); ValueError when it cannot be computed here."""
    digest = ckptfmt.hasher(algorithm)
    if digest is None:
        raise ValueError(f"{src}: its digest ({algorithm}) cannot be computed here")
    size = 0
    fd_in = os.open(src, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        fd_out = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            while chunk := os.read(fd_in, _CHUNK):
                digest.update(chunk)
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd_out, view):]
                size += len(chunk)
            os.fsync(fd_out)
        finally:
            os.close(fd_out)
    finally:
        os.close(fd_in)
    return digest.hexdigest(), size


def snapshot_limit(failure: Failure | None, policy: Policy) -> int | None:
    """The newest step a snapshot may have to be used after ``failure``: before the step
    of a bad value (a snapshot taken at or after the NaN is poisoned), and the rule's
    rollback margin before that; None (any) for a crash, a hang, a straggler or a stop
    request: the state of the last step taken is sound (a hung job's last snapshot, of the
    step it logged before it hung, is the one to resume from)."""
    if failure is None or failure.step is None:
        return None
    from ftrain.kinds import FailureKind
    from ftrain.policy import Action

    rule = policy.rule_for(failure.kind)
    limit: int | None = None
    if failure.kind in (FailureKind.NONFINITE, FailureKind.THRESHOLD, FailureKind.SPIKE):
        limit = failure.step - 1
    if rule is not None and rule.action is Action.ROLLBACK:
        limit = failure.step - rule.margin
    return limit


def promote_newest(tier: MemoryTier, checkpoint_dir: Path, *, at_most: int | None,
                   newer_than: int | None) -> Promotion | None:
    """Promote the newest snapshot in ``(newer_than, at_most]``, then empty the tier but for
    it (what else is there is older or distrusted). None when there is none or it cannot be
    copied."""
    if not tier.available:
        return None
    snap = tier.newest(at_most=at_most, newer_than=newer_than)
    promoted = None
    if snap is not None:
        try:
            promoted = tier.promote(snap, checkpoint_dir)
        except (OSError, ValueError):
            promoted = None
    tier.clear(keep=promoted.step if promoted is not None else None)
    return promoted
