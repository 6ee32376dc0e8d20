"""ftrain drives real training scripts that know nothing of it (scripts/examples/), with the
example policies as shipped (configs/examples/): a real crash (SIGSEGV, an exception,
SIGABRT) is restarted with the script's own resume flag from its own checkpoint, and a NaN
read from its progress lines is rolled back to an earlier checkpoint with a lower learning
rate. The faults come from the scripts' EXAMPLE_* environment knobs; no script is edited."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, events, of, run_ftrain

pytest.importorskip("torch")

EXAMPLES = ROOT / "scripts" / "examples"
CONFIGS = ROOT / "configs" / "examples"

# The shipped configs, shrunk so that an attempt takes a second or two on a CPU.
SMALL = {
    "nanogpt": {"eval_interval": 10, "eval_iters": 2, "batch_size": 8, "block_size": 32, "n_layer": 1,
                "n_head": 2, "n_embd": 32, "max_iters": 40, "warmup_iters": 5, "lr_decay_iters": 40},
    "classifier": {"epochs": 4, "train_size": 640, "log_interval": 1},   # 10 steps an epoch
    "yamlcfg": {"train": {"steps": 40, "ckpt_every": 10}},
}


def merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        out[key] = merge(base[key], value) if isinstance(value, dict) else value
    return out


def run_example(tmp_path: Path, name: str, step_ms: int = 50, **knobs: int) -> tuple[int, list[dict], Path]:
    """Steps take ``step_ms`` at least, as on a device. The watcher has up to DESIGN §9's
    100 ms (p99) to see a line: a NaN must not outrun it past the next checkpoint, and a
    checkpoint without a step in its name is placed by the time its lines were read, which
    is as late as the watcher is (checked to within 3 lines here)."""
    knobs["step_ms"] = step_ms
    config = merge(yaml.safe_load((CONFIGS / f"{name}.config.yaml").read_text()), SMALL[name])
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    p = run_ftrain("run", str(EXAMPLES / name / "train.py"), "--policy", str(CONFIGS / f"{name}.policy.yaml"),
                   "--config", "config.yaml", "--run-dir", "run", "--no-ui", cwd=tmp_path, timeout=120,
                   env={f"EXAMPLE_{k.upper()}": str(v) for k, v in knobs.items()})
    run = tmp_path / "run"
    assert (run / "journal.jsonl").exists(), p.stdout + p.stderr
    return p.returncode, events(run), run


def steps_of(run: Path, attempt: int) -> list[int]:
    records = (json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines())
    return [r["step"] for r in records if r.get("attempt") == attempt and "loss" in r]


def test_nanogpt_simulated_cuda_oom_then_segfault(tmp_path):
    """A micro-batch too big for the (simulated) device: halved, accumulation doubled, through
    the configurator's flags; then a real SIGSEGV: resumed with --init_from=resume."""
    code, evts, run = run_example(tmp_path, "nanogpt", max_micro_batch=4, crash_at=25)
    assert code == 0, evts[-1]
    assert [f["kind"] for f in of(evts, "failure")] == ["cuda_oom", "segfault"]
    oom, crash = of(evts, "decision")
    assert oom["overrides"] == {"batch_size": 4, "gradient_accumulation_steps": 2}
    assert "set batch_size=4, gradient_accumulation_steps=2" in oom["reason"]
    starts = of(evts, "attempt_start")
    assert "--batch_size=4" in starts[1]["command"] and "--gradient_accumulation_steps=2" in starts[1]["command"]
    assert "--init_from=resume" not in starts[1]["command"]
    assert crash["action"] == "restart" and crash["resume_from"] == str(tmp_path / "out" / "ckpt.pt")
    # ckpt.pt has no step in its name: it is placed at the step logged last before it was
    # written (the eval line "step 20: …"), give or take the lines of a clock tick
    assert 17 <= crash["resume_step"] <= 22
    assert starts[2]["command"][-1] == "--init_from=resume" and "--batch_size=4" in starts[2]["command"]
    assert steps_of(run, 3)[0] == 20 and steps_of(run, 3)[-1] == 40
    assert of(evts, "run_end")[0]["status"] == "succeeded"


def test_nanogpt_nan_rolls_back_with_half_the_learning_rate(tmp_path):
    # ckpt.pt is rewritten at iteration 30, before its sleep: the sleeps of 28 and 29 (200 ms)
    # are the time to see the NaN and stop the script
    code, evts, run = run_example(tmp_path, "nanogpt", nan_at=27, step_ms=100)
    assert code == 0, evts[-1]
    anomaly, decision = of(evts, "anomaly")[0], of(evts, "decision")[0]
    assert anomaly["kind"] == "nonfinite" and anomaly["step"] == 27
    assert decision["action"] == "rollback" and decision["resume_from"] == str(tmp_path / "out" / "ckpt.pt")
    assert decision["overrides"] == {"learning_rate": 0.0005}
    command = of(evts, "attempt_start")[1]["command"]
    assert "--learning_rate=0.0005" in command and command[-1] == "--init_from=resume"
    assert steps_of(run, 2)[0] == 20 and steps_of(run, 2)[-1] == 40


def test_classifier_io_error_resumes_from_the_epoch_checkpoint(tmp_path):
    code, evts, run = run_example(tmp_path, "classifier", crash_at=25)
    assert code == 0, evts[-1]
    failure, decision = of(evts, "failure")[0], of(evts, "decision")[0]
    assert failure["kind"] == "exception" and "Input/output error" in failure["evidence"][0]
    assert decision["action"] == "restart" and 17 <= decision["resume_step"] <= 22
    assert decision["resume_from"] == str(tmp_path / "checkpoint_epoch2.pth")
    assert of(evts, "attempt_start")[1]["command"][-2:] == ["--resume", str(tmp_path / "checkpoint_epoch2.pth")]
    assert steps_of(run, 2) == list(range(21, 41))


def test_classifier_nan_rolls_back_past_the_newest_epoch(tmp_path):
    code, evts, run = run_example(tmp_path, "classifier", nan_at=35)
    assert code == 0, evts[-1]
    decision = of(evts, "decision")[0]
    assert decision["action"] == "rollback"   # margin 20: epochs 2 and 3 are too close to step 35
    assert decision["resume_from"] == str(tmp_path / "checkpoint_epoch1.pth") and 7 <= decision["resume_step"] <= 12
    assert decision["overrides"] == {"lr": 0.5}
    command = of(evts, "attempt_start")[1]["command"]
    assert command[command.index("--lr") + 1] == "0.5" and command[-1].endswith("checkpoint_epoch1.pth")
    assert steps_of(run, 2)[0] == 11 and steps_of(run, 2)[-1] == 40


def test_yamlcfg_abort_resumes_and_reads_the_written_config(tmp_path):
    code, evts, run = run_example(tmp_path, "yamlcfg", crash_at=25)
    assert code == 0, evts[-1]
    assert of(evts, "failure")[0]["kind"] == "aborted"
    decision = of(evts, "decision")[0]
    assert decision["resume_from"] == str(tmp_path / "ckpts" / "model_step20.pt")
    assert of(evts, "attempt_start")[1]["command"][-4:] == [
        "--config", "ftrain-config.yaml", "--resume", str(tmp_path / "ckpts" / "model_step20.pt")]
    assert steps_of(run, 2)[0] == 21


def test_yamlcfg_nan_rolls_back_and_the_config_file_carries_the_new_lr(tmp_path):
    code, evts, run = run_example(tmp_path, "yamlcfg", nan_at=35)
    assert code == 0, evts[-1]
    decision = of(evts, "decision")[0]
    assert decision["action"] == "rollback" and decision["resume_step"] == 20   # 30 is within the margin
    assert decision["overrides"] == {"train.lr": 0.0015}
    assert yaml.safe_load((tmp_path / "ftrain-config.yaml").read_text())["train"]["lr"] == 0.0015
    assert "lr=0.0015" in (run / "attempts" / "0002" / "output.log").read_text()
    assert steps_of(run, 2)[0] == 21 and steps_of(run, 2)[-1] == 40
