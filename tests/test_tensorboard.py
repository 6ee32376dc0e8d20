"""``--tensorboard DIR`` (``ftrain.tensorboard.TensorBoardMirror``): a crashing, restarted,
rolled-back job's metrics and ftrain's own events, read back with TensorBoard's
``EventAccumulator``."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import CHILDREN, events, of, run_ftrain

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

from ftrain.errors import UsageError  # noqa: E402
from ftrain.tensorboard import MISSING, TensorBoardMirror, require_tensorboard  # noqa: E402

POLICY = """
version: 1
max_restarts: 5
grace: 2s
backoff: 0s
detect: {nonfinite: [loss], hang: {timeout: 10s, startup: 30s}}
rules:
  - when: cuda_oom
    action: restart
    set: {train.batch_size: {scale: 0.5, min: 1}, train.grad_accum: {scale: 2}}
  - when: nonfinite
    action: rollback
    margin: 2
    set: {optim.lr: {scale: 0.5}}
  - when: segfault
    action: restart
"""
CONFIG = "train: {steps: 14, batch_size: 8, grad_accum: 1, ckpt_every: 2, sleep: 0.01}\noptim: {lr: 0.1}\n"


def load(logdir: Path) -> EventAccumulator:
    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def scalars(acc: EventAccumulator, tag: str) -> list[tuple[int, float]]:
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def test_a_crashing_job_is_mirrored_with_its_restarts(tmp_path):
    (tmp_path / "p.yaml").write_text(POLICY)
    (tmp_path / "c.yaml").write_text(CONFIG)
    p = run_ftrain("run", str(CHILDREN / "job_train.py"), "--policy", "p.yaml", "--config", "c.yaml",
                   "--run-dir", "run", "--no-ui", "--tensorboard", "tb", "--inject", "oom@3,segv@6,nan@9",
                   cwd=tmp_path, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    evts = events(tmp_path / "run")
    assert [f["kind"] for f in of(evts, "failure")] == ["cuda_oom", "segfault", "nonfinite"]

    acc = load(tmp_path / "tb")
    loss = scalars(acc, "loss")
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    expected = [(r["step"], r["loss"]) for r in logged if "loss" in r]
    assert [s for s, _ in loss] == [s for s, _ in expected]      # every point, replayed steps too
    assert all(math.isclose(a, b, rel_tol=1e-6) or (math.isnan(a) and math.isnan(b))
               for (_, a), (_, b) in zip(loss, expected))
    assert any(math.isnan(v) for _, v in loss)
    assert [s for s, _ in scalars(acc, "grad_norm")] == [s for s, _ in expected]

    oom, crash, nan = of(evts, "decision")
    assert scalars(acc, "ftrain/restart") == [(oom["failure_step"], 1.0), (crash["failure_step"], 1.0)]
    assert scalars(acc, "ftrain/rollback") == [(nan["failure_step"], 1.0)]
    assert scalars(acc, "ftrain/rollback_to") == [(nan["failure_step"], float(nan["resume_step"]))]
    assert scalars(acc, "ftrain/override/train.batch_size") == [(oom["failure_step"], 4.0)]
    assert scalars(acc, "ftrain/override/train.grad_accum") == [(oom["failure_step"], 2.0)]
    assert scalars(acc, "ftrain/override/optim.lr") == [(nan["failure_step"], pytest.approx(0.05))]
    assert [v for _, v in scalars(acc, "ftrain/attempt")] == [1.0, 2.0, 3.0, 4.0]
    starts = of(evts, "attempt_start")
    assert [s for s, _ in scalars(acc, "ftrain/attempt")] == [st["resume_step"] or 0 for st in starts]
    assert [s for s, _ in scalars(acc, "ftrain/failure")] == [f["step"] for f in of(evts, "failure")]
    assert scalars(acc, "ftrain/anomaly") == [(nan["failure_step"], 1.0)]

    text = [e.tensor_proto.string_val[0].decode() for e in acc.Tensors("ftrain/events")]
    assert text[0].startswith("run started: ")
    assert any(t.startswith("attempt 1 failed: cuda_oom") for t in text)
    assert any(t.startswith("decision (rollback): nonfinite") for t in text)
    assert text[-1].startswith("run succeeded: ")


def test_the_mirror_writes_without_torch_or_tensorflow(tmp_path):
    """Not even where TensorFlow is installed (a stand-in here, that any attempt to import
    it would find): tensorboard's own EventFileWriter would import it."""
    fake = tmp_path / "site" / "tensorflow"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    code = f"""
import sys, time
from ftrain.tensorboard import TensorBoardMirror
m = TensorBoardMirror({str(tmp_path / "tb")!r})
m.on_metrics({{"step": 1, "t": time.time(), "attempt": 1, "loss": 2.0, "note": "x", "ok": True}})
m.on_metrics({{"ftrain": "save_start", "step": 1, "t": time.time()}})
m.on_event({{"event": "failure", "t": time.time(), "attempt": 1, "kind": "segfault", "step": 1, "evidence": []}})
m.close()
m.on_metrics({{"step": 2, "t": time.time(), "loss": 1.0}})   # after close: ignored
print(sorted(n for n in ("torch", "tensorflow") if n in sys.modules))
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(fake.parent), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    assert out.stdout.strip() == "[]", out.stderr
    acc = load(tmp_path / "tb")
    assert scalars(acc, "loss") == [(1, 2.0)] and scalars(acc, "ftrain/failure") == [(1, 1.0)]
    assert set(acc.Tags()["scalars"]) == {"loss", "ftrain/failure"}
    assert [p.name.endswith(".ftrain") for p in (tmp_path / "tb").iterdir()] == [True]


def _without_tensorboard(tmp_path: Path, init: str) -> dict[str, str]:
    """An environment where ``import tensorboard`` finds a package made of ``init``."""
    fake = tmp_path / "site" / "tensorboard"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text(init)
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(fake.parent), os.environ.get("PYTHONPATH", "")])}


NOT_INSTALLED = "raise ModuleNotFoundError(\"No module named 'tensorboard'\", name='tensorboard')\n"


@pytest.mark.parametrize("init, message", [
    (NOT_INSTALLED, MISSING),
    ("import protobuf_of_another_version\n",
     "--tensorboard: the tensorboard package does not import: No module named 'protobuf_of_another_version'"),
])
def test_missing_tensorboard_is_a_usage_error(tmp_path, init, message):
    code = f"""
from ftrain.errors import UsageError
from ftrain.tensorboard import TensorBoardMirror, require_tensorboard
for make in (require_tensorboard, lambda: TensorBoardMirror({str(tmp_path / "tb")!r})):
    try:
        make()
    except UsageError as exc:
        print(exc)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env=_without_tensorboard(tmp_path, init))
    assert out.stdout.splitlines() == [message, message], out.stderr
    assert not (tmp_path / "tb").exists()
    require_tensorboard()                 # here it is installed


def test_run_without_tensorboard_fails_in_one_line_before_launch(tmp_path):
    (tmp_path / "s.py").write_text("import ftrain\nprint('the script ran')\nftrain.log(0, loss=1.0)\n")
    env = _without_tensorboard(tmp_path, NOT_INSTALLED)
    p = run_ftrain("run", "s.py", "--run-dir", "run", "--no-ui", "--tensorboard", "tb", cwd=tmp_path,
                   env={"PYTHONPATH": env["PYTHONPATH"]})
    assert p.returncode == 2 and p.stderr.splitlines() == [f"ftrain: error: {MISSING}"], p.stderr
    assert "the script ran" not in p.stdout and not (tmp_path / "run" / "attempts").exists()
    assert not (tmp_path / "tb").exists()


def test_an_unwritable_folder_is_a_usage_error(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(UsageError, match="cannot write there"):
        TensorBoardMirror(tmp_path / "file" / "tb")
