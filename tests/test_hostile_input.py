"""What ftrain reads cannot hurt it (issue 11, "bad content"; issue 12, overrides and the
default policy's copy): every case through the real CLI, or the real shim in a child.

Alias bombs, 5000-digit integers, non-finite numbers, empty rules and duplicate keys in a
policy, a config or a ``--set`` are one line ``file:line: ...`` and exit 2, quickly; a step
or a loss a script logs in an odd type is read as it means, or refused at the call; a copy
of the default policy works; and a script configured only by ``ftrain.config(defaults=...)``
gets its overrides.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import events, of, run_ftrain

from ftrain.overrides import NODE_LIMIT, load_yaml
from ftrain.policyfile import default_policy_path


def bomb(levels: int = 9, width: int = 9) -> str:
    """A "billion laughs": each level a list of ``width`` aliases of the one before."""
    lines = ["a: &a [" + ", ".join(['"lol"'] * width) + "]"]
    for i in range(1, levels):
        this, before = chr(ord("a") + i), chr(ord("a") + i - 1)
        lines.append(f"{this}: &{this} [" + ", ".join([f"*{before}"] * width) + "]")
    return "\n".join(lines) + "\n"


def one_error(p: subprocess.CompletedProcess[str], where: str) -> str:
    """The single error line of a refused command, which names ``where`` (file:line)."""
    assert p.returncode == 2, p.stdout + p.stderr
    assert "Traceback" not in p.stderr, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    assert where in lines[0], lines[0]
    return lines[0]


CONFIG = "train:\n  batch_size: 32\n  lr: 0.1\n  steps: 4\noptim:\n  lr: 0.1\n"
JOB = "import ftrain\ncfg = ftrain.config()\nfor s in range(3):\n    ftrain.log(s, loss=1.0)\n"


@pytest.fixture
def job(tmp_path: Path) -> Path:
    (tmp_path / "job.py").write_text(JOB)
    (tmp_path / "config.yaml").write_text(CONFIG)
    return tmp_path


# --------------------------------------------------------------------------- YAML that bites
def test_alias_bombs_are_refused_quickly_in_policy_config_and_set(job: Path) -> None:
    text = bomb()
    assert len(text) < 450
    (job / "bomb.yaml").write_text(text)
    t0 = time.monotonic()
    line = one_error(run_ftrain("policy", "check", "bomb.yaml", cwd=job), "bomb.yaml:")
    assert "alias" in line and time.monotonic() - t0 < 10   # a fresh interpreter; the parse: below
    one_error(run_ftrain("policy", "check", str(default_policy_path()), "--config", "bomb.yaml", cwd=job),
              "bomb.yaml:")
    one_error(run_ftrain("run", "job.py", "--config", "bomb.yaml", "--no-ui", cwd=job), "bomb.yaml:")
    flow = "[" + ", ".join(f"&{c} [" + ", ".join([f"*{chr(ord(c) - 1)}" if c > "a" else "1"] * 9) + "]"
                           for c in "abcdefghi") + "]"
    line = one_error(run_ftrain("run", "job.py", "--config", "config.yaml", "--set", f"train.lr={flow}", "--no-ui",
                                cwd=job), "--set train.lr")
    assert "alias" in line
    assert not (job / "runs").exists()   # refused before anything was made

    t0 = time.perf_counter()
    with pytest.raises(yaml.YAMLError, match="alias"):
        load_yaml(text)
    assert time.perf_counter() - t0 < 0.1


def test_ordinary_anchors_still_work(job: Path) -> None:
    (job / "anchored.yaml").write_text("base: &base {batch_size: 32, grad_accum: 1}\n"
                                       "train:\n  <<: *base\n  batch_size: 64\neval: *base\n"
                                       "optim: {lr: 0.1}\n")
    p = run_ftrain("policy", "check", str(default_policy_path()), "--config", "anchored.yaml", cwd=job)
    assert p.returncode == 0, p.stderr
    assert load_yaml((job / "anchored.yaml").read_text())["train"] == {"batch_size": 64, "grad_accum": 1}
    wide = "x: &x [" + ", ".join(["1"] * 100) + "]\n" + "".join(f"k{i}: *x\n" for i in range(NODE_LIMIT // 200))
    assert len(load_yaml(wide)) == NODE_LIMIT // 200 + 1   # aliases within the bound are fine


def test_a_5000_digit_integer_is_one_line(job: Path) -> None:
    digits = "1" * 5000
    (job / "p.yaml").write_text(f"version: 1\nmax_restarts: {digits}\n")
    assert "too large" in one_error(run_ftrain("policy", "check", "p.yaml", cwd=job), "p.yaml:2:")
    (job / "big.yaml").write_text(f"train:\n  batch_size: {digits}\n")
    one_error(run_ftrain("run", "job.py", "--config", "big.yaml", "--no-ui", cwd=job), "big.yaml:2:")
    one_error(run_ftrain("run", "job.py", "--config", "config.yaml", "--set", f"train.lr={digits}", "--no-ui",
                         cwd=job), "--set train.lr")
    one_error(run_ftrain("run", "job.py", "--config", "config.yaml", "--set", "train.lr=1e999", "--no-ui",
                         cwd=job), "--set train.lr")
    (job / "p.yaml").write_text("rules:\n  - when: cuda_oom\n    action: restart\n"
                                "    set: {train.batch_size: {scale: 1e999}}\n")
    assert "finite" in one_error(run_ftrain("policy", "check", "p.yaml", cwd=job), "p.yaml:4:")


@pytest.mark.parametrize("text, line, message", [
    ("version: 1\nbackoff: {initial: 1s, factor: .nan}\n", 2, "backoff.factor: must be a finite number"),
    ("version: 1\nbackoff: {initial: 1s, factor: .inf}\n", 2, "backoff.factor: must be a finite number"),
    ("version: 1\nbackoff: {initial: .inf}\n", 2, "backoff.initial: inf is not a duration: it must be a finite"),
    ("version: 1\ngrace: 1e400\n", 2, "grace: inf is not a duration: it must be a finite"),
    ("version: 1\nmax_restarts: .nan\n", 2, "max_restarts: must be an integer"),
    ("detect:\n  spike: {loss: {zscore: .nan}}\n", 2, "zscore: must be a finite number"),
    ("rules:\n  - when: []\n    action: restart\n", 2, "rules[0].when: names no failure kind"),
    ("max_restarts: 3\nno_progress: 2\nmax_restarts: 4\n", 3, "duplicate key 'max_restarts' (first on line 1)"),
    ("rules:\n  - when: hang\n    action: restart\n    action: stop\n", 4, "duplicate key 'action'"),
])
def test_policy_values_that_make_no_sense_are_refused_with_file_and_line(job: Path, text: str, line: int,
                                                                          message: str) -> None:
    (job / "p.yaml").write_text(text)
    assert message in one_error(run_ftrain("policy", "check", "p.yaml", cwd=job), f"p.yaml:{line}:")


def test_duplicate_keys_in_a_config_are_refused_with_its_line(job: Path) -> None:
    (job / "dup.yaml").write_text("train:\n  batch_size: 32\n  lr: 0.1\n  batch_size: 64\n")
    line = one_error(run_ftrain("run", "job.py", "--config", "dup.yaml", "--no-ui", cwd=job), "dup.yaml:4:")
    assert "duplicate key 'batch_size' (first on line 2)" in line


def test_a_set_that_turns_a_number_into_text_is_refused_before_launch(job: Path) -> None:
    line = one_error(run_ftrain("run", "job.py", "--config", "config.yaml", "--set", "train.lr=abc", "--no-ui",
                                cwd=job), "--set train.lr")
    assert "0.1" in line and "'abc'" in line
    assert not (job / "runs").exists()
    p = run_ftrain("run", "job.py", "--config", "config.yaml", "--set", "train.lr=3e-4", "--set",
                   "train.batch_size=16", "--no-ui", cwd=job)
    assert p.returncode == 0, p.stderr


# --------------------------------------------------------------------------- what a script logs
LOGGER = """
import math, sys
import ftrain
ftrain.log(0, loss=1.0)
ftrain.log(1.0, loss=0.9)                 # a whole-number float is a step
try:
    import numpy as np
    ftrain.log(np.int64(2), loss=0.8)
    ftrain.log(np.float64(3.0), loss=0.7)
except ImportError:
    ftrain.log(2, loss=0.8)
    ftrain.log(3, loss=0.7)
for bad in (True, 4.5, "5", None, float("nan")):
    try:
        ftrain.log(bad, loss=0.6)
    except (TypeError, ValueError) as exc:
        print(type(exc).__name__, exc, flush=True)
    else:
        print("accepted", repr(bad), flush=True)
ftrain.log(4, loss=sys.argv[1])
"""


def test_log_reads_whole_float_steps_and_refuses_the_rest_at_the_call(tmp_path: Path) -> None:
    (tmp_path / "logger.py").write_text(LOGGER)
    metrics = tmp_path / "metrics.jsonl"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FTRAIN_")}
    env.update(FTRAIN_RUN_DIR=str(tmp_path), FTRAIN_ATTEMPT="1", FTRAIN_METRICS_PATH=str(metrics))
    p = subprocess.run([sys.executable, "logger.py", "2.5"], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    said = p.stdout.splitlines()
    assert len(said) == 5 and not any(s.startswith("accepted") for s in said), said
    assert said[0].startswith("TypeError") and "bool" in said[0]
    assert said[1].startswith("ValueError") and "4.5 is not a whole number" in said[1]
    assert said[2].startswith("TypeError") and "str" in said[2]
    lines = [json.loads(x) for x in metrics.read_text().splitlines()]
    assert [r["step"] for r in lines] == [0, 1, 2, 3, 4] and all(type(r["step"]) is int for r in lines)
    assert lines[-1]["loss"] == 2.5


def test_a_loss_logged_as_the_text_nan_is_seen_as_nan(job: Path) -> None:
    (job / "logger.py").write_text(LOGGER)
    (job / "stop.yaml").write_text("version: 1\nwarm_start: false\nrules:\n  - when: nonfinite\n    action: stop\n")
    p = run_ftrain("run", "logger.py", "--policy", "stop.yaml", "--run-dir", "r", "--no-ui", "--", "NaN", cwd=job)
    assert p.returncode == 1, p.stdout + p.stderr
    failure, = of(events(job / "r"), "failure")
    assert failure["kind"] == "nonfinite" and failure["step"] == 4


# --------------------------------------------------------------------------- issue 12: overrides
def test_a_copy_of_the_default_policy_works_and_strictness_carries_file_and_line(job: Path) -> None:
    copy = job / "my-policy.yaml"
    copy.write_text(default_policy_path().read_text())
    (job / "small.yaml").write_text("train:\n  batch_size: 32\n")   # no grad_accum, no optim.lr
    p = run_ftrain("policy", "check", "my-policy.yaml", "--config", "small.yaml", cwd=job)
    assert p.returncode == 0, p.stderr
    p = run_ftrain("run", "job.py", "--policy", "my-policy.yaml", "--config", "small.yaml", "--no-ui", cwd=job)
    assert p.returncode == 0, p.stderr
    # without the rule's `if_missing: skip` the missing key is an error, with its line
    text = copy.read_text()
    strict = text.replace("    if_missing: skip         #", "    #", 1)
    assert strict != text
    copy.write_text(strict)
    line_no = next(i for i, line in enumerate(strict.splitlines(), 1) if "train.grad_accum" in line)
    line = one_error(run_ftrain("policy", "check", "my-policy.yaml", "--config", "small.yaml", cwd=job),
                     f"my-policy.yaml:{line_no}:")
    assert "'train.grad_accum' is not a key of the config" in line and "if_missing: skip" in line


DEFAULTS_JOB = """
import sys
import ftrain
cfg = ftrain.config(defaults={"train": {"batch_size": 32}})
print("batch_size", cfg["train"]["batch_size"], "amp", cfg["train"].get("amp"), flush=True)
for step in range(6):
    ftrain.log(step, loss=1.0 / (step + 1), batch_size=cfg["train"]["batch_size"])
"""

USER_POLICY = """version: 1
backoff: 0s
warm_start: false
rules:
  - when: cuda_oom
    action: restart
    set:
      train.batch_size: {scale: 0.5, min: 1}
      train.amp: false
    max: 2
"""


@pytest.mark.parametrize("policy", ["built-in", "user"])
def test_overrides_reach_a_script_configured_only_by_its_defaults(tmp_path: Path, policy: str) -> None:
    (tmp_path / "job.py").write_text(DEFAULTS_JOB)
    args = ["run", "job.py", "--run-dir", "r", "--no-ui", "--inject", "oom@3"]
    if policy == "user":
        (tmp_path / "p.yaml").write_text(USER_POLICY)
        args += ["--policy", "p.yaml"]
    p = run_ftrain(*args, cwd=tmp_path, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    run = tmp_path / "r"
    evts = events(run)
    assert of(evts, "failure")[0]["kind"] == "cuda_oom"
    decision, = of(evts, "decision")
    assert decision["overrides"]["train.batch_size"] == 16
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    sizes = {(r["attempt"], r["batch_size"]) for r in lines if "batch_size" in r}
    assert sizes == {(1, 32), (2, 16)}                     # halved on the restart
    out2 = (run / "attempts" / "0002" / "output.log").read_text()
    assert "batch_size 16" in out2
    if policy == "built-in":   # its grad_accum is not in the script's config: left out, and said
        assert "not set: train.grad_accum (not in the script's config)" in decision["reason"]
    else:   # a literal of a key the defaults lack reaches the script, and is reported
        assert "amp False" in out2
        assert "ftrain: warning: override of train.amp=False: no such key" in out2
        ends = of(evts, "attempt_end")
        assert ends[1]["unknown_overrides"] == ["train.amp"]
        assert "the script's config has no train.amp" in p.stdout + p.stderr
