"""Hugging Face Trainer and PyTorch Lightning under ftrain (``ftrain.integrations``): the
callbacks log through the shim, a stop request becomes save-and-exit, and a restart resumes
through the trainer's own mechanism — end to end with tiny models built from configs on
made-up data (nothing downloaded), a real preemption (``term``) and a real SIGSEGV."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, events, of, run_ftrain

EXAMPLES = ROOT / "scripts" / "examples"
CONFIGS = ROOT / "configs" / "examples"


def supervise(tmp_path: Path, framework: str, inject: str) -> tuple[int, list[dict], Path]:
    """The example of docs/integrations.md under its example policy, with faults injected."""
    p = run_ftrain("run", str(EXAMPLES / framework / "train.py"), "--policy", str(CONFIGS / f"{framework}.policy.yaml"),
                   "--run-dir", "run", "--no-ui", "--inject", inject, cwd=tmp_path, timeout=240)
    run = tmp_path / "run"
    assert (run / "journal.jsonl").exists(), p.stdout + p.stderr
    return p.returncode, events(run), run


def first_steps(run: Path) -> dict[int, int]:
    first: dict[int, int] = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "ftrain" not in record:
            first.setdefault(record["attempt"], record["step"])
    return first


def check_story(evts: list[dict], run: Path, resumed: list[tuple[str, int]]) -> None:
    """term → the trainer saves and leaves → restart from that checkpoint; segv → restart
    from the newest periodic checkpoint; the job finishes at step 60."""
    assert [f["kind"] for f in of(evts, "failure")] == ["preempted", "segfault"]
    assert [(Path(d["resume_from"]).name, d["resume_step"]) for d in of(evts, "decision")] == resumed
    assert first_steps(run) == {1: 1, 2: resumed[0][1] + 1, 3: resumed[1][1] + 1}
    assert of(evts, "run_end")[0]["status"] == "succeeded"
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("loss" in r and r["step"] == 5 for r in logged)


# --------------------------------------------------------------------------- Hugging Face
def test_hf_trainer_preempted_and_crashed_resumes_from_its_checkpoints(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    code, evts, run = supervise(tmp_path, "hf", "term@25,segv@45")
    assert code == 0, evts[-1]
    check_story(evts, run, [("checkpoint-25", 25), ("checkpoint-40", 40)])
    assert of(evts, "failure")[0]["exit_code"] == 0   # train() returned after the save
    state = json.loads((tmp_path / "out" / "checkpoint-60" / "trainer_state.json").read_text())
    assert state["global_step"] == 60


def test_hf_resume_checkpoint_prefers_ftrain_then_the_newest_complete(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    from ftrain.integrations.hf import resume_checkpoint

    monkeypatch.delenv("FTRAIN_RESUME_FROM", raising=False)
    assert resume_checkpoint(tmp_path / "missing") is None
    for step, complete in ((5, True), (40, True), (100, False)):   # 100: interrupted mid-save
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        if complete:
            (folder / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoint-7.tmp").mkdir()
    assert resume_checkpoint(tmp_path) == str(tmp_path / "checkpoint-40")
    monkeypatch.setenv("FTRAIN_RESUME_FROM", str(tmp_path / "checkpoint-5"))
    assert resume_checkpoint(tmp_path) == str(tmp_path / "checkpoint-5")


# --------------------------------------------------------------------------- Lightning
def test_lightning_preempted_and_crashed_resumes_from_its_checkpoints(tmp_path):
    pytest.importorskip("lightning.pytorch")
    code, evts, run = supervise(tmp_path, "lightning", "term@30,segv@50")
    assert code == 0, evts[-1]
    check_story(evts, run, [("epoch=0-step=30.ckpt", 30), ("epoch=1-step=40.ckpt", 40)])
    assert of(evts, "failure")[0]["exit_code"] == 0   # Lightning's own SIGTERM exit, after the save
    assert (tmp_path / "lit" / "checkpoints" / "epoch=1-step=60.ckpt").is_file()


def test_lightning_resume_checkpoint_prefers_ftrain_then_the_newest(tmp_path, monkeypatch):
    pytest.importorskip("lightning.pytorch")
    from ftrain.integrations.lightning import resume_checkpoint

    monkeypatch.delenv("FTRAIN_RESUME_FROM", raising=False)
    assert resume_checkpoint(tmp_path) is None
    now = time.time()
    for i, rel in enumerate(("lightning_logs/version_0/checkpoints/epoch=0-step=10.ckpt",
                             "lightning_logs/version_1/checkpoints/epoch=1-step=20.ckpt",
                             "lightning_logs/version_1/checkpoints/last.ckpt")):
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
        os.utime(path, (now + i, now + i))
    assert resume_checkpoint(tmp_path) == str(tmp_path / "lightning_logs/version_1/checkpoints/last.ckpt")
    monkeypatch.setenv("FTRAIN_RESUME_FROM", "/elsewhere/epoch=0-step=10.ckpt")
    assert resume_checkpoint(tmp_path) == "/elsewhere/epoch=0-step=10.ckpt"


# --------------------------------------------------------------------------- without the framework
@pytest.mark.parametrize("module, blocked, message", [
    ("ftrain.integrations.hf", ["transformers"], "needs Hugging Face transformers: pip install transformers"),
    ("ftrain.integrations.lightning", ["lightning", "lightning.pytorch", "pytorch_lightning"],
     "needs PyTorch Lightning: pip install lightning"),
])
def test_a_missing_framework_is_named_with_the_install_line(module, blocked, message):
    code = (f"import sys\nsys.modules.update(dict.fromkeys({blocked!r}))\n"
            f"try:\n    import {module}\nexcept ImportError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert message in out.stdout, out.stderr


def test_scalars_keep_numbers_and_one_element_tensors():
    torch = pytest.importorskip("torch")
    import numpy

    from ftrain.integrations import scalars

    assert scalars({"loss": torch.tensor(0.5), "lr": 1e-3, "step": 3, "t": 1.0, "name": "x", "flag": True,
                    "vector": torch.ones(3), "epoch": 2, "tokens": numpy.int64(7),
                    "done": torch.tensor(True)}) == {"loss": 0.5, "lr": 1e-3, "epoch": 2, "tokens": 7}
    assert scalars(None) == {}


def test_the_documented_examples_are_the_files_that_run():
    """docs/integrations.md shows these files whole; a change to one must show there too."""
    doc = (ROOT / "docs" / "integrations.md").read_text()
    for rel in ("scripts/examples/hf/train.py", "scripts/examples/lightning/train.py",
                "configs/examples/hf.policy.yaml", "configs/examples/lightning.policy.yaml"):
        assert f"\n{(ROOT / rel).read_text()}```" in doc, rel
