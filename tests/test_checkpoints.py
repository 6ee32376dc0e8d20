"""Checkpoints: what the shim writes, what ``checkpoints.scan`` makes of it, and that no
crash or full disk ever leaves a checkpoint that looks good and is not (DESIGN §4)."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import pickle
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import ftrain
from ftrain.checkpoints import Checkpoint, CheckpointStatus, newest_usable, quarantine, scan
from ftrain.shim import CheckpointError

torch = pytest.importorskip("torch")

CHILDREN = Path(__file__).resolve().parent / "children"


@pytest.fixture
def ckdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Unsupervised, the shim saves into ``./checkpoints``: work in a fresh folder."""
    if ftrain.is_supervised():
        pytest.skip("this test process itself runs under ftrain")
    monkeypatch.chdir(tmp_path)
    return tmp_path / "checkpoints"


def save(step: int, value: float = 0.0, elements: int = 1000) -> Path:
    path = ftrain.save_checkpoint({"step": step, "w": torch.full((elements,), value)}, step,
                                  metrics={"loss": value})
    assert path is not None
    return Path(path)


def by_step(found: list[Checkpoint]) -> dict[int | None, Checkpoint]:
    return {c.step: c for c in found}


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


# --------------------------------------------------------------------------- statuses
def test_save_then_scan_is_ok_with_the_manifest(ckdir: Path) -> None:
    path = save(120, 2.5)
    assert path == ckdir / "step-00000120.pt"
    manifest = json.loads((ckdir / "step-00000120.json").read_text())
    assert set(manifest) == {"step", "attempt", "t", "bytes", "digest", "metrics"}
    assert manifest["digest"].startswith("xxh3_128:") and len(manifest["digest"]) == 9 + 32
    assert manifest["step"] == 120 and manifest["bytes"] == path.stat().st_size
    ckpt, = scan(ckdir)
    assert ckpt.status is CheckpointStatus.OK and ckpt.note is None
    assert (ckpt.path, ckpt.step, ckpt.bytes, ckpt.metrics) == (path, 120, path.stat().st_size, {"loss": 2.5})
    assert ckpt.digest == manifest["digest"] and ckpt.sha256 is None and ckpt.manifest == ckdir / "step-00000120.json"
    assert {"path", "step", "status", "bytes", "attempt", "metrics"} <= set(ckpt.to_json())
    assert ckpt.to_json()["status"] == "ok" and ckpt.to_json()["path"] == str(path)
    assert [p.name for p in ckdir.iterdir() if p.name.startswith(".")] == []


def test_a_flipped_byte_is_corrupt(ckdir: Path) -> None:
    path = save(10)
    scan(ckdir)                                   # fill the digest cache first
    flip_byte(path, path.stat().st_size // 2)
    ckpt, = scan(ckdir)
    assert ckpt.status is CheckpointStatus.CORRUPT and "xxh3_128 does not match" in (ckpt.note or "")


def test_a_truncated_file_is_corrupt(ckdir: Path) -> None:
    path = save(10)
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 100)
    ckpt, = scan(ckdir, verify=False)
    assert ckpt.status is CheckpointStatus.CORRUPT and "bytes" in (ckpt.note or "")


def test_leftovers_of_interrupted_saves_are_partial(ckdir: Path) -> None:
    save(10)
    (ckdir / ".tmp-step-00000020.pt.4242").write_bytes(b"half a checkpoint")
    (ckdir / ".tmp-step-00000030.json.4242").write_text("{")
    (ckdir / "step-00000040.json").write_text('{"step": 40, "bytes": 3, "sha256": "00"}')
    found = by_step(scan(ckdir))
    assert found[10].status is CheckpointStatus.OK
    assert {s: found[s].status for s in (20, 30, 40)} == {s: CheckpointStatus.PARTIAL for s in (20, 30, 40)}
    assert "data file" in (found[40].note or "")
    assert newest_usable(found.values()) == found[10]


def test_foreign_checkpoints_are_unverified_and_other_files_ignored(ckdir: Path) -> None:
    ckdir.mkdir()
    torch.save({"w": torch.zeros(3)}, ckdir / "model.pt")
    (ckdir / "ckpt_1200.pth").write_bytes(b"x" * 10)
    (ckdir / "checkpoint-500").mkdir()
    (ckdir / "checkpoint-500" / "model.safetensors").write_bytes(b"y" * 7)
    (ckdir / "step-00000050.pt").write_bytes(b"z")          # ours, but its manifest is gone
    (ckdir / "notes.txt").write_text("not a checkpoint")
    (ckdir / "config.json").write_text("{}")
    found = scan(ckdir)
    assert [(c.path.name, c.step, c.status) for c in found] == [
        ("step-00000050.pt", 50, CheckpointStatus.UNVERIFIED),
        ("checkpoint-500", 500, CheckpointStatus.UNVERIFIED),
        ("ckpt_1200.pth", 1200, CheckpointStatus.UNVERIFIED),
        ("model.pt", None, CheckpointStatus.UNVERIFIED),
    ]
    assert by_step(found)[500].bytes == 7
    assert newest_usable(found) == by_step(found)[1200]


def test_unreadable_files_are_listed_with_a_note_not_raised(ckdir: Path) -> None:
    save(10)
    (ckdir / "step-00000020.pt").symlink_to(ckdir / "gone")
    (ckdir / "step-00000020.json").write_text('{"step": 20, "bytes": 3, "sha256": "00"}')
    (ckdir / "step-00000030.pt").write_bytes(b"abc")
    (ckdir / "step-00000030.json").write_text("not json")
    (ckdir / "model.ckpt").symlink_to(ckdir / "gone")
    found = by_step(scan(ckdir))
    assert found[20].status is CheckpointStatus.CORRUPT and "cannot read" in (found[20].note or "")
    assert found[30].status is CheckpointStatus.CORRUPT and "not JSON" in (found[30].note or "")
    assert found[None].status is CheckpointStatus.CORRUPT
    assert newest_usable(found.values()) == found[10]


def test_scan_of_a_missing_folder_is_empty(tmp_path: Path) -> None:
    assert scan(tmp_path / "nowhere") == []


def test_repeated_scans_hash_each_file_once(ckdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    save(10)
    save(20)
    calls: list[Any] = []
    import hashlib
    real = hashlib.file_digest

    def counting(f: Any, name: str) -> Any:
        calls.append(f)
        return real(f, name)

    monkeypatch.setattr(hashlib, "file_digest", counting)
    first = scan(ckdir)
    second = scan(ckdir)
    assert first == second and all(c.status is CheckpointStatus.OK for c in first)
    assert len(calls) <= 2


def test_saving_a_step_again_replaces_it_whole(ckdir: Path) -> None:
    save(10, 1.0)
    save(10, 2.0, elements=5000)
    ckpt, = scan(ckdir)
    assert ckpt.status is CheckpointStatus.OK and ckpt.metrics == {"loss": 2.0}
    assert torch.equal(ftrain.load_checkpoint(ckpt.path)["w"], torch.full((5000,), 2.0))


def test_load_checkpoint_checks_the_size_against_the_manifest(ckdir: Path) -> None:
    path = save(10)
    with open(path, "r+b") as f:
        f.truncate(100)
    with pytest.raises(CheckpointError, match="truncated or replaced") as info:
        ftrain.load_checkpoint(path)
    assert info.value.errno == errno.EIO


# --------------------------------------------------------------------------- how the data file is written
def test_a_state_of_many_sizes_round_trips_with_a_matching_digest(ckdir: Path) -> None:
    # Small records are gathered in the writer's buffers, large ones hashed beside the write:
    # the digest must cover every byte in file order whatever the mix.
    sizes = [1, 3, 1000, 70_000, 262_143, 262_144, 1 << 18, (1 << 20) // 4 - 1, 1 << 20, 5 << 20, 7, 3 << 18]
    state = {f"t{i}": torch.arange(n, dtype=torch.float32) + i for i, n in enumerate(sizes)}
    path = ftrain.save_checkpoint(state, 10)
    assert path is not None
    ckpt, = scan(ckdir)
    assert ckpt.status is CheckpointStatus.OK and ckpt.bytes == Path(path).stat().st_size
    loaded = ftrain.load_checkpoint(path)
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)


@pytest.mark.parametrize("blocking", [True, False])
@pytest.mark.parametrize("crc32_before", [True, False])
def test_the_save_skips_torchs_crc32_and_restores_the_setting(ckdir: Path, blocking: bool,
                                                             crc32_before: bool) -> None:
    import zipfile

    torch.serialization.set_crc32_options(crc32_before)
    try:
        path = ftrain.save_checkpoint({"w": torch.arange(1000.0), "step": 10}, 10, blocking=blocking)
        assert path is not None
        ftrain.shim._wait_for_save(raise_error=True)
        assert torch.serialization.get_crc32_options() is crc32_before
    finally:
        torch.serialization.set_crc32_options(True)
    with zipfile.ZipFile(path) as archive:
        assert archive.testzip() is not None          # records without CRC32 …
    for state in (torch.load(path, weights_only=True), torch.load(path, weights_only=True, mmap=True),
                  ftrain.load_checkpoint(path)):
        assert state["step"] == 10 and torch.equal(state["w"], torch.arange(1000.0))   # … load all the same
    assert scan(ckdir)[0].status is CheckpointStatus.OK


def test_without_crc32_a_flipped_tensor_byte_is_still_caught_by_the_digest(ckdir: Path) -> None:
    path = save(10, 1.0)
    data = bytearray(path.read_bytes())
    data[data.index(torch.full((4,), 1.0).numpy().tobytes()) + 2] ^= 0xFF
    path.write_bytes(bytes(data))
    assert not torch.equal(torch.load(path, weights_only=True)["w"], torch.full((1000,), 1.0))  # torch can't tell
    ckpt, = scan(ckdir)
    assert ckpt.status is CheckpointStatus.CORRUPT and "xxh3_128" in (ckpt.note or "")


def test_a_save_that_fails_before_writing_restores_the_crc32_setting(ckdir: Path) -> None:
    with pytest.raises((pickle.PicklingError, AttributeError)):
        ftrain.save_checkpoint({"w": torch.zeros(3), "f": lambda: None}, 10)    # a lambda does not pickle
    assert torch.serialization.get_crc32_options() is True
    assert list(ckdir.iterdir()) == []


# --------------------------------------------------------------------------- choosing and rollback
def test_newest_usable_skips_corrupt_and_respects_max_step(ckdir: Path) -> None:
    for step in (10, 20, 30):
        save(step)
    flip_byte(ckdir / "step-00000030.pt", 200)
    found = scan(ckdir)
    assert newest_usable(found).step == 20                                # type: ignore[union-attr]
    assert newest_usable(found, max_step=15).step == 10                   # type: ignore[union-attr]
    assert newest_usable(found, max_step=5) is None
    unverified = Checkpoint(ckdir / "other.pt", 20, CheckpointStatus.UNVERIFIED)
    assert newest_usable([unverified, *found]).status is CheckpointStatus.OK  # type: ignore[union-attr]


def test_quarantine_moves_later_checkpoints_aside_and_keeps_them(ckdir: Path) -> None:
    for step in (10, 20, 30):
        save(step)
    (ckdir / ".tmp-step-00000040.pt.99").write_bytes(b"partial")
    (ckdir / "model_step50.pt").write_bytes(b"foreign")
    moved = quarantine(ckdir, after_step=10)
    q = ckdir / "quarantine"
    assert moved == [q / "step-00000020.pt", q / "step-00000020.json", q / "step-00000030.pt",
                     q / "step-00000030.json", q / ".tmp-step-00000040.pt.99", q / "model_step50.pt"]
    found = scan(ckdir)
    assert [(c.step, c.status) for c in found] == [
        (10, CheckpointStatus.OK), (20, CheckpointStatus.QUARANTINED), (30, CheckpointStatus.QUARANTINED),
        (40, CheckpointStatus.QUARANTINED), (50, CheckpointStatus.QUARANTINED)]
    assert by_step(found)[20].metrics == {"loss": 0.0} and by_step(found)[20].manifest == q / "step-00000020.json"
    assert newest_usable(found).step == 10                                # type: ignore[union-attr]

    # a later rollback over the same steps keeps both generations
    save(20, 5.0)
    assert quarantine(ckdir, after_step=10) == [q / "step-00000020.pt.q1", q / "step-00000020.json.q1"]
    twenties = [c for c in scan(ckdir) if c.step == 20]
    assert sorted(c.metrics["loss"] for c in twenties) == [0.0, 5.0]
    assert all(c.status is CheckpointStatus.QUARANTINED for c in twenties)
    assert quarantine(ckdir, after_step=10) == []


# --------------------------------------------------------------------------- failures during a save
@contextlib.contextmanager
def _full_disk_for_temp_files(after_bytes: int) -> Iterator[None]:
    """Fake a full disk: writes to a ``.tmp-`` file fail with ENOSPC past ``after_bytes``."""
    real_write = os.write
    written: dict[int, int] = {}

    def full_disk_write(fd: int, data: Any) -> int:
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            target = ""
        if "/.tmp-" in target:
            written[fd] = written.get(fd, 0) + len(memoryview(data).cast("B"))
            if written[fd] > after_bytes:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(os, "write", full_disk_write)
        yield


def test_full_disk_simulated_by_monkeypatched_write_raises_and_keeps_the_previous(ckdir: Path) -> None:
    save(10, 1.0)
    with _full_disk_for_temp_files(after_bytes=64 * 1024), pytest.raises(CheckpointError) as info:
        save(20, 2.0, elements=1 << 20)
    assert isinstance(info.value, OSError) and info.value.errno == errno.ENOSPC
    assert "cannot save step 20" in str(info.value) and "No space left on device" in str(info.value)
    assert sorted(p.name for p in ckdir.iterdir()) == ["step-00000010.json", "step-00000010.pt"]
    ckpt, = scan(ckdir)
    assert ckpt.status is CheckpointStatus.OK and ckpt.step == 10


def test_full_disk_simulated_in_a_background_save_is_raised_by_the_next_call(ckdir: Path) -> None:
    save(10, 1.0)
    with _full_disk_for_temp_files(after_bytes=0):
        path = ftrain.save_checkpoint({"w": torch.zeros(1 << 20)}, 20, blocking=False)
        assert path == str(ckdir / "step-00000020.pt")
        with pytest.raises(CheckpointError, match="cannot save step 20"):
            save(30)
    save(30)                       # the error was reported once; saving works again
    assert [(c.step, c.status) for c in scan(ckdir)] == [(10, CheckpointStatus.OK), (30, CheckpointStatus.OK)]


def test_full_disk_at_the_last_buffered_bytes_raises_and_keeps_the_previous(ckdir: Path) -> None:
    # A small state is buffered whole and reaches os.write only at the end of torch.save.
    save(10, 1.0)
    with _full_disk_for_temp_files(after_bytes=100), pytest.raises(CheckpointError) as info:
        save(20, 2.0, elements=10)
    assert info.value.errno == errno.ENOSPC and "cannot save step 20" in str(info.value)
    assert sorted(p.name for p in ckdir.iterdir()) == ["step-00000010.json", "step-00000010.pt"]
    assert torch.serialization.get_crc32_options() is True


def test_a_real_write_error_from_the_kernel_raises_and_keeps_the_previous(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FTRAIN_")}
    env["FTRAIN_CHECKPOINT_DIR"] = str(tmp_path / "ck")
    out = subprocess.run([sys.executable, str(CHILDREN / "shim_filelimit.py")], env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["type"] == "CheckpointError" and report["errno"] == errno.EFBIG
    assert "cannot save step 20" in report["message"]
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["step-00000010.json", "step-00000010.pt"]
    ckpt, = scan(tmp_path / "ck")
    assert ckpt.status is CheckpointStatus.OK


# --------------------------------------------------------------------------- crash safety
@pytest.fixture
def saver(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], Path]]:
    ck = tmp_path / "ck"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FTRAIN_")}
    env["FTRAIN_CHECKPOINT_DIR"] = str(ck)
    proc = subprocess.Popen([sys.executable, str(CHILDREN / "shim_saver.py")], env=env, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        yield proc, ck
    finally:
        proc.kill()
        proc.wait()


def _kill_during_saves(saver: tuple[subprocess.Popen[str], Path], iterations: int) -> None:
    proc, ck = saver
    assert proc.stdin is not None and proc.stdout is not None
    rng = random.Random(1234)
    next_step = 0
    for i in range(iterations):
        proc.stdin.write(f"go {next_step}\n")
        proc.stdin.flush()
        pid = int(proc.stdout.readline())
        time.sleep(rng.uniform(0.0, 0.25))      # a random moment of the worker's save loop
        os.kill(pid, signal.SIGKILL)
        status = int(proc.stdout.readline())
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, f"worker {i} ended by {status}"

        found = scan(ck)
        for ckpt in found:
            if ckpt.status is CheckpointStatus.OK or (ckpt.status is CheckpointStatus.UNVERIFIED
                                                       and ckpt.path.name.startswith("step-")):
                state = torch.load(ckpt.path, weights_only=True)   # a named data file is always whole
                assert state["step"] == ckpt.step and bool((state["w"] == float(ckpt.step)).all())
            assert ckpt.status is not CheckpointStatus.CORRUPT, ckpt
        newest = newest_usable(found)
        if newest is not None:
            assert newest.step is not None and torch.load(newest.path, weights_only=True)["step"] == newest.step
            next_step = newest.step + 1
        # keep the folder small: drop all but the newest two usable checkpoints and the leftovers
        usable = sorted((c for c in found if c.status.usable), key=lambda c: c.step or 0)
        for ckpt in usable[:-2] + [c for c in found if c.status is CheckpointStatus.PARTIAL]:
            for path in (ckpt.path, ckpt.manifest):
                if path is not None:
                    path.unlink(missing_ok=True)


def test_sigkill_during_saves_never_leaves_a_bad_checkpoint_that_looks_good(
        saver: tuple[subprocess.Popen[str], Path]) -> None:
    _kill_during_saves(saver, iterations=50)


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("RUN_SLOW"), reason="slow: set RUN_SLOW=1")
def test_sigkill_during_saves_many_times(saver: tuple[subprocess.Popen[str], Path]) -> None:
    _kill_during_saves(saver, iterations=200)


# --------------------------------------------------------------------------- the manifest's digest
def test_an_old_sha256_manifest_still_verifies_and_a_flipped_byte_in_it_is_caught(ckdir: Path) -> None:
    import hashlib

    path = save(30, 3.0)
    manifest = ckdir / "step-00000030.json"
    meta = json.loads(manifest.read_text())
    del meta["digest"]
    meta["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()    # as manifests were written before
    manifest.write_text(json.dumps(meta))
    ckpt, = scan(ckdir)
    assert ckpt.status is CheckpointStatus.OK and ckpt.sha256 == meta["sha256"]
    assert ckpt.digest == "sha256:" + meta["sha256"] and ckpt.to_json()["digest"] == ckpt.digest
    flip_byte(path, path.stat().st_size // 3)
    ckpt, = scan(ckdir)
    assert ckpt.status is CheckpointStatus.CORRUPT and "sha256 does not match" in (ckpt.note or "")


@pytest.mark.parametrize("digest, note", [("md5:" + "0" * 32, "algorithm is unknown"),
                                          ("xxh3_128:" + "0" * 31, "xxh3_128 is not a digest"),
                                          ("xxh3_128", "xxh3_128 is not a digest: ''"),
                                          ("xxh3_128:" + "0" * 32, "xxh3_128 does not match")])
def test_a_bad_digest_field_makes_the_checkpoint_corrupt(ckdir: Path, digest: str, note: str) -> None:
    save(40)
    manifest = ckdir / "step-00000040.json"
    manifest.write_text(json.dumps(dict(json.loads(manifest.read_text()), digest=digest)))
    ckpt, = scan(ckdir)
    assert ckpt.status is CheckpointStatus.CORRUPT and note in (ckpt.note or ""), ckpt.note


def test_without_xxhash_a_save_writes_sha256_and_a_reader_without_it_does_not_call_xxh3_corrupt(
        tmp_path: Path) -> None:
    """A child where ``import xxhash`` fails (as where the package is missing): its save
    falls back to sha256, which verifies; an xxh3_128 manifest is ``unverified`` there."""
    code = """
import sys
sys.modules["xxhash"] = None          # import xxhash raises ImportError
import json, torch, ftrain
from ftrain.checkpoints import scan
ftrain.save_checkpoint({"w": torch.arange(10.0)}, 5)
meta = json.load(open("checkpoints/step-00000005.json"))
print(json.dumps({"keys": sorted(meta), "status": [c.status.value for c in scan("checkpoints")],
                  "xxh3": [c.status.value for c in scan("new")]}))
"""
    new = tmp_path / "new"
    new.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FTRAIN_")}
    made = subprocess.run([sys.executable, "-c",
                           "import torch, ftrain; ftrain.save_checkpoint({'w': torch.ones(3)}, 7)"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    for name in ("step-00000007.pt", "step-00000007.json"):
        os.replace(tmp_path / "checkpoints" / name, new / name)
    p = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert "sha256" in out["keys"] and "digest" not in out["keys"] and out["status"] == ["ok"]
    assert out["xxh3"] == ["unverified"]
