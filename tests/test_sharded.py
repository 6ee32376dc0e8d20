"""Sharded checkpoints: ``save_checkpoint(state, step, sharded=True)`` on every rank, the folder
``step-NNNNNNNN/`` that torch.distributed.checkpoint writes and the manifest beside it.

The folder logic is tested on folders made here (no torch); the save, a crash, a resume
with the state exact and a rank SIGKILLed mid-save run a real FSDP2 job
(tests/children/shard_train.py: ``fully_shard`` over gloo on CPU, two ranks) under
``ftrain run --nproc-per-node 2``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import CHILDREN, events, ftrain_cmd, of

from ftrain import checkpoints, ckptfmt, sharded
from ftrain.checkpoints import CheckpointStatus

SHARD = str(CHILDREN / "shard_train.py")
POLICY = """
version: 1
max_restarts: 3
grace: 3s
backoff: 0s
detect:
  hang: {timeout: 60s, startup: 90s}
rules:
  - when: [segfault, aborted, killed, preempted, nccl_error, hang, host_oom, exit_nonzero, exception]
    action: restart
"""


# --------------------------------------------------------------------------- folders made here
def make_folder(root: Path, step: int, files: dict[str, bytes] | None = None, *, manifest: bool = True,
                algorithm: str = "sha256") -> Path:
    """A sharded checkpoint as the shim leaves it: the folder, and (``manifest``) its manifest."""
    files = files if files is not None else {".metadata": b"meta", "__0_0.distcp": b"a" * 100,
                                             "__1_0.distcp": b"b" * 50}
    folder = root / sharded.folder_name(step)
    folder.mkdir(parents=True)
    listed = []
    for name, data in files.items():
        (folder / name).write_bytes(data)
        h = ckptfmt.hasher(algorithm)
        h.update(data)
        listed.append({"name": name, "bytes": len(data), **ckptfmt.digest_field(algorithm, h.hexdigest())})
    if manifest:
        body = sharded.manifest_body({"step": step, "attempt": 1, "t": 1.0, "metrics": {"loss": 0.5}}, listed, 2)
        (root / f"step-{step:08d}.json").write_text(json.dumps(body))
    return folder


def only(found: list[checkpoints.Checkpoint], step: int) -> checkpoints.Checkpoint:
    (ckpt,) = [c for c in found if c.step == step]
    return ckpt


@pytest.mark.parametrize("algorithm", ["xxh3_128", "sha256"])
def test_a_folder_with_its_manifest_is_one_ok_checkpoint_of_all_its_bytes(tmp_path, algorithm):
    folder = make_folder(tmp_path, 10, algorithm=algorithm)
    (found,) = checkpoints.scan(tmp_path)
    assert found.status is CheckpointStatus.OK and found.path == folder and found.step == 10
    assert found.bytes == 154 and found.attempt == 1 and found.metrics == {"loss": 0.5}
    assert found.manifest == tmp_path / "step-00000010.json"
    assert checkpoints.newest_usable([found]) == found
    assert found.to_json()["status"] == "ok" and found.to_json()["bytes"] == 154


@pytest.mark.parametrize("algorithm", ["xxh3_128", "sha256"])
@pytest.mark.parametrize("damage, note", [
    (lambda f: (f / "__1_0.distcp").write_bytes(b"b" * 49), "__1_0.distcp has 49 bytes, the manifest says 50"),
    (lambda f: (f / "__1_0.distcp").write_bytes(b"c" * 50), "{} of __1_0.distcp does not match the manifest"),
    (lambda f: (f / "__0_0.distcp").unlink(), "__0_0.distcp is missing"),
    (lambda f: ((f / "__0_0.distcp").unlink(), (f / "__0_0.distcp").symlink_to(f.parent / "outside")),
     "__0_0.distcp is not a regular file of the folder"),
])
def test_a_shard_that_is_short_changed_missing_or_a_symlink_makes_the_folder_corrupt(tmp_path, damage, note,
                                                                                  algorithm):
    (tmp_path / "outside").write_bytes(b"a" * 100)
    damage(make_folder(tmp_path, 10, algorithm=algorithm))
    ckpt = only(checkpoints.scan(tmp_path), 10)
    assert ckpt.status is CheckpointStatus.CORRUPT and ckpt.note == note.format(algorithm)
    assert checkpoints.newest_usable(checkpoints.scan(tmp_path)) is None


@pytest.mark.parametrize("entry, note", [
    ({"name": "../outside", "bytes": 100, "sha256": "0" * 64}, "the manifest names a file outside the folder"),
    ({"name": "a/b", "bytes": 1, "sha256": "0" * 64}, "the manifest names a file outside the folder"),
    ({"name": "x", "bytes": "1", "sha256": "0" * 64}, "the manifest's entry for 'x' lacks bytes"),
])
def test_a_manifest_that_names_files_outside_or_untyped_is_corrupt_never_followed(tmp_path, entry, note):
    make_folder(tmp_path, 10)
    manifest = tmp_path / "step-00000010.json"
    meta = json.loads(manifest.read_text())
    meta["files"].append(entry)
    manifest.write_text(json.dumps(meta))
    ckpt = only(checkpoints.scan(tmp_path), 10)
    assert ckpt.status is CheckpointStatus.CORRUPT and ckpt.note is not None and ckpt.note.startswith(note)


def test_a_folder_without_a_manifest_is_partial_and_a_plain_manifest_beside_a_folder_is_corrupt(tmp_path):
    make_folder(tmp_path, 10, manifest=False)
    make_folder(tmp_path, 20)
    meta = json.loads((tmp_path / "step-00000020.json").read_text())
    (tmp_path / "step-00000020.json").write_text(json.dumps({k: meta[k] for k in ("step", "bytes")} |
                                                            {"sha256": "0" * 64}))
    found = checkpoints.scan(tmp_path)
    assert only(found, 10).status is CheckpointStatus.PARTIAL
    assert "without its manifest" in (only(found, 10).note or "")
    assert only(found, 20).status is CheckpointStatus.CORRUPT
    assert only(found, 20).note == "the manifest describes a file, not a sharded folder"
    assert len(found) == 2   # the manifest is listed with its folder, not as a leftover


def test_quarantine_set_aside_and_retain_move_or_delete_whole_folders(tmp_path):
    for step in (10, 20, 30, 40):
        make_folder(tmp_path, step)
    moved = checkpoints.quarantine(tmp_path, after_step=30)
    assert [p.name for p in moved] == ["step-00000040", "step-00000040.json"]
    assert (tmp_path / "quarantine/step-00000040/__1_0.distcp").read_bytes() == b"b" * 50
    assert checkpoints.set_aside(tmp_path / "step-00000030") == [tmp_path / "quarantine/step-00000030",
                                                                 tmp_path / "quarantine/step-00000030.json"]
    found = checkpoints.scan(tmp_path)
    assert [(c.step, c.status.value, c.bytes) for c in found] == [
        (10, "ok", 154), (20, "ok", 154), (30, "quarantined", 154), (40, "quarantined", 154)]
    assert only(found, 40).attempt == 1 and only(found, 40).manifest == tmp_path / "quarantine/step-00000040.json"
    make_folder(tmp_path, 40)
    assert checkpoints.quarantine(tmp_path, after_step=30)[0].name == "step-00000040.q1"
    removed = checkpoints.retain(tmp_path, keep_last=1)
    assert removed == [tmp_path / "step-00000010.json", tmp_path / "step-00000010"]
    assert not (tmp_path / "step-00000010").exists() and (tmp_path / "step-00000020/.metadata").exists()


def test_remove_leftovers_deletes_a_folder_never_given_its_manifest_and_never_follows_a_symlink(tmp_path):
    root = tmp_path / "ckpt"
    make_folder(root, 10)
    make_folder(root, 20, manifest=False)
    outside = tmp_path / "outside"
    make_folder(outside, 30, manifest=False)
    os.symlink(outside / "step-00000030", root / "step-00000030")
    make_folder(root, 40, manifest=False)
    later = time.time() + 10
    os.utime(root / "step-00000040", (later, later))   # newer than ``before``: a save may still own it
    removed = checkpoints.remove_leftovers(root, before=time.time() + 5)
    assert sorted(p.name for p in removed) == ["step-00000020", "step-00000030"]
    assert (outside / "step-00000030/__0_0.distcp").exists()   # the link went, not what it pointed to
    assert (root / "step-00000010/.metadata").exists() and (root / "step-00000040").exists()


# --------------------------------------------------------------------------- one process, no supervisor
def test_without_the_supervisor_a_sharded_save_and_load_work_in_one_process(tmp_path):
    script = """
import torch, ftrain
state = {"w": torch.arange(6.0), "step": 3}
print("saved", ftrain.save_checkpoint(state, 3, sharded=True))
fresh = {"w": torch.zeros(6), "step": 0}
back = ftrain.load_checkpoint("checkpoints/step-00000003", state=fresh)
print("loaded", back is fresh, fresh["w"].tolist(), fresh["step"])
try:
    ftrain.load_checkpoint("checkpoints/step-00000003")
except TypeError as exc:
    print("error", exc)
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FTRAIN_", "RANK", "WORLD_SIZE"))}
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert f"saved {tmp_path}/checkpoints/step-00000003" in out.stdout
    assert "loaded True [0.0, 1.0, 2.0, 3.0, 4.0, 5.0] 3" in out.stdout
    assert "error ftrain.load_checkpoint: checkpoints/step-00000003 is a sharded checkpoint: pass state=" in out.stdout
    (found,) = checkpoints.scan(tmp_path / "checkpoints")
    assert found.status is CheckpointStatus.OK and found.step == 3
    meta = json.loads((tmp_path / "checkpoints/step-00000003.json").read_text())
    assert meta["sharded"] is True and meta["world_size"] == 1 and meta["step"] == 3 and meta["tier"] == "disk"
    assert sorted(f["name"] for f in meta["files"]) == [".metadata", "__0_0.distcp"]
    assert all(f["digest"].startswith("xxh3_128:") for f in meta["files"])   # as plain manifests name it
    assert meta["bytes"] == sum(f["bytes"] for f in meta["files"])


def test_a_load_without_state_is_the_scripts_mistake_never_the_checkpoints():
    tail = ['Traceback (most recent call last):',
            '  File "/x/ftrain/shim/__init__.py", line 350, in load_checkpoint',
            '    return shards.load(target, state)',
            'TypeError: ftrain.load_checkpoint: /r/step-00000004 is a sharded checkpoint: pass state=, the state']
    assert checkpoints.load_failure(tail) is None
    tail[-1] = "RuntimeError: checkpoint file is corrupt"
    assert checkpoints.load_failure(tail) == "RuntimeError: checkpoint file is corrupt"


# --------------------------------------------------------------------------- two ranks under ftrain
def run_shards(tmp_path: Path, env: dict[str, str], timeout: float = 240) -> tuple[int, Path, str]:
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    run = tmp_path / "run"
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("FTRAIN_", "DIST_", "PET_", "SLURM_"))}
    full_env.update(env)
    proc = subprocess.run(ftrain_cmd("run", SHARD, "--nproc-per-node", "2", "--policy", str(policy),
                                     "--run-dir", str(run), "--no-ui"),
                          cwd=tmp_path, env=full_env, capture_output=True, text=True, timeout=timeout)
    return proc.returncode, run, proc.stdout + proc.stderr


def digests(text: str, verb: str) -> dict[tuple[int, int], str]:
    """(rank, step) -> digest of that rank's shards, from ``rank R saved|resumed step S digest D`` lines."""
    return {(int(r), int(s)): d for r, s, d in re.findall(rf"rank (\d) {verb} step (\d+) digest (\w+)", text)}


def test_fsdp2_ranks_save_shards_crash_and_resume_exactly_and_inspect_flags_a_truncated_shard(tmp_path):
    code, run, out = run_shards(tmp_path, {"DIST_FAULT": "segv@7"})
    assert code == 0, out
    evts = events(run)
    (failure,) = of(evts, "failure")
    assert failure["kind"] == "segfault"
    (decision,) = of(evts, "decision")
    assert decision["resume_from"] == str(run / "checkpoints/step-00000004") and decision["resume_step"] == 4
    first = (run / "attempts/0001/output.log").read_text(errors="replace")
    second = (run / "attempts/0002/output.log").read_text(errors="replace")
    saved, resumed = digests(first, "saved"), digests(second, "resumed")
    assert set(resumed) == {(0, 4), (1, 4)}
    assert resumed == {key: saved[key] for key in resumed}   # every rank's shards, exactly as saved
    assert saved[(0, 4)] != saved[(1, 4)]                     # and each rank has its own
    assert "saved step 19 digest" in second

    ckpts = run / "checkpoints"
    meta = json.loads((ckpts / "step-00000019.json").read_text())
    assert meta["sharded"] is True and meta["world_size"] == 2 and meta["attempt"] == 2
    assert {f["name"] for f in meta["files"]} == {".metadata", "__0_0.distcp", "__1_0.distcp"}
    assert "loss" in meta["metrics"]
    listed = json.loads(subprocess.run(ftrain_cmd("inspect", str(ckpts), "--json"), capture_output=True,
                                       text=True, timeout=30, check=True).stdout)
    assert [(c["step"], c["status"]) for c in listed] == [(4, "ok"), (9, "ok"), (14, "ok"), (19, "ok")]
    assert listed[-1]["path"] == str(ckpts / "step-00000019") and listed[-1]["bytes"] == meta["bytes"]

    shard = ckpts / "step-00000019/__1_0.distcp"
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size - 10)
    text = subprocess.run(ftrain_cmd("inspect", str(ckpts)), capture_output=True, text=True, timeout=30,
                          env=dict(os.environ, COLUMNS="200"), check=True).stdout
    assert re.search(r"step-00000019: corrupt: __1_0\.distcp has \d+ bytes, the manifest says \d+", text), text
    assert "a restart would resume from step-00000014 (step 14)" in text


def test_a_rank_killed_mid_save_leaves_a_partial_folder_and_the_restart_takes_the_one_before(tmp_path):
    code, run, out = run_shards(tmp_path, {"DIST_KILL_SAVE": "9", "DIST_PAD_MB": "16"})
    assert code == 0, out
    evts = events(run)
    (failure,) = of(evts, "failure")
    assert any("rank 1" in line and "SIGKILL" in line for line in failure["evidence"]), failure
    (decision,) = of(evts, "decision")
    assert decision["resume_from"] == str(run / "checkpoints/step-00000004") \
        and decision["resume_step"] == 4
    first = (run / "attempts/0001/output.log").read_text(errors="replace")
    assert "saved step 4" in first and "saved step 9" not in first
    assert "leftover file(s) of interrupted saves: step-00000009" in out   # partial, removed before attempt 2
    assert set(digests((run / "attempts/0002/output.log").read_text(errors="replace"), "resumed")) == {(0, 4), (1, 4)}
    meta = json.loads((run / "checkpoints/step-00000009.json").read_text())
    assert meta["attempt"] == 2   # step 9's only manifest is attempt 2's save
    found = checkpoints.scan(run / "checkpoints")
    assert [(c.step, c.status.value) for c in found] == [(4, "ok"), (9, "ok"), (14, "ok"), (19, "ok")]
