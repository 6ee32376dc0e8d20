"""How ftrain reads real scripts (issue 12): progress bars read live, progress that is not
only new step numbers, a spike detector that fires when a person would (and not on clean
curves), injected faults that no detector saw, divergences that surface as exceptions."""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import CHILDREN, events, of, run_ftrain

from ftrain.classify import classify
from ftrain.detect import Detectors, DetectSpec
from ftrain.kinds import FailureKind
from ftrain.state import QUIET_PROGRESS, RunState

BAR = str(CHILDREN / "bar_train.py")
PROGRESS = str(CHILDREN / "restart_counter.py")
BAR_REGEX = r"(?P<step>\d+)/\d+ \[.*loss=(?P<loss>[^,\]\s]+)"
LINE_REGEX = r"step (?P<step>\d+) \| loss (?P<loss>\S+)"


def policy(tmp_path: Path, rules: str, *, regex: str = BAR_REGEX, detect: str = "", script: str = "") -> str:
    (tmp_path / "p.yaml").write_text(f"""version: 1
max_restarts: 8
backoff: {{initial: 0s, factor: 1, max: 0s}}
detect:
  nonfinite: [loss]
  spike: {{loss: {{window: 200, zscore: 6, warmup: 50}}}}
  hang: {{timeout: 2s, startup: 60s}}
{detect}rules:
{rules}
script:
  metrics_regex: '{regex}'
{script}""")
    return "p.yaml"


def run(tmp_path: Path, script: str, *args: str, timeout: float = 60, extra: tuple[str, ...] = ()
        ) -> tuple[int, list[dict]]:
    p = run_ftrain("run", script, "--policy", "p.yaml", "--run-dir", "run", "--no-ui", *extra, "--", *args,
                   cwd=tmp_path, timeout=timeout)
    assert (tmp_path / "run" / "journal.jsonl").exists(), p.stderr
    return p.returncode, events(tmp_path / "run")


# ------------------------------------------------------------------ 1. progress bars, live
def test_a_nan_in_a_tqdm_bar_is_seen_at_its_step_and_output_log_keeps_the_bar(tmp_path: Path) -> None:
    """Without reading at ``\\r``, the bar is one line until it closes: the NaN drawn at step
    60 of 300 would be seen at step 300."""
    policy(tmp_path, "  - when: nonfinite\n    action: stop\n")
    code, evts = run(tmp_path, BAR, "--nan-at", "60")
    assert code == 1
    failure = of(evts, "failure")[0]
    assert failure["kind"] == "nonfinite" and 60 <= failure["step"] <= 70, failure
    anomaly = of(evts, "anomaly")[0]
    assert anomaly["kind"] == "nonfinite" and 60 <= anomaly["step"] <= 70
    log = (tmp_path / "run" / "attempts" / "0001" / "output.log").read_bytes()
    assert b"\r" in log and b"loss=nan" in log and b"training for 300 steps\n" in log   # as the script wrote it
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len({r["step"] for r in records}) > 30   # read at every drawing
    assert len(records) == len({(r["step"], str(r["loss"])) for r in records})   # a redraw is no new record


def test_a_bar_that_stops_moving_is_a_hang_from_its_last_update(tmp_path: Path) -> None:
    """The bar freezes at step 90 (2 s in); the hang timeout is 2 s and the start-up allowance
    60 s. Read live, the hang fires about 2 s after the last drawing, at step ~90; read at
    ``\\n`` only, no step is ever seen and only the start-up allowance would end it (60 s)."""
    policy(tmp_path, "  - when: hang\n    action: stop\n")
    start = time.monotonic()
    code, evts = run(tmp_path, BAR, "--freeze-at", "90", timeout=40)
    took = time.monotonic() - start
    assert code == 1
    failure = of(evts, "failure")[0]
    assert failure["kind"] == "hang" and 85 <= failure["step"] <= 90, failure
    assert "no new step for" in failure["evidence"][0] and "after step" in failure["evidence"][0]
    assert took < 25, took


def test_output_lines_end_at_cr_and_streams_do_not_splice() -> None:
    """``Child`` hands over a line at ``\\n`` or ``\\r``; a bar on stderr and a line on stdout
    written between its drawings stay apart (one stream's unfinished line does not swallow
    the other's); ``\\r\\n`` is one line end."""
    from ftrain.process import Child

    code = ("import sys, time\n"
            "sys.stderr.write('\\r 1/3 [a]'); sys.stderr.flush(); time.sleep(0.05)\n"
            "sys.stdout.write('out line\\r\\n'); sys.stdout.flush(); time.sleep(0.05)\n"
            "sys.stderr.write('\\r 2/3 [b]'); sys.stderr.flush(); time.sleep(0.05)\n"
            "sys.stderr.write('\\r 3/3 [c]\\n'); sys.stdout.write('tail without newline')\n")
    lines: list[str] = []
    child = Child([sys.executable, "-c", code], env=dict(os.environ), cwd=None, log_path=None,
                  line_hook=lines.append)
    while child.pump(0.02):
        pass
    child.finish()
    # a drawing ends where the next one starts: " 1/3 [a]" is whole once "\r 2/3" arrives
    assert lines == ["out line", " 1/3 [a]", " 2/3 [b]", " 3/3 [c]", "tail without newline"]


# ------------------------------------------------------------------ 2. progress is progress
def counter_policy(tmp_path: Path) -> None:
    policy(tmp_path, "  - when: segfault\n    action: restart\n", regex=LINE_REGEX,
           script='  checkpoints: "out/*.pt"\n  resume_args: "--resume {checkpoint}"\n')


def test_a_counter_that_restarts_at_0_but_saves_a_checkpoint_is_progress(tmp_path: Path) -> None:
    """makemore's way: the step counter starts at 0 after --resume, a new checkpoint is saved
    and the loss improves every attempt. Four crashes in a row at the same step: by steps
    alone that is no progress three times, and the run would give up before attempt 5."""
    counter_policy(tmp_path)
    code, evts = run(tmp_path, PROGRESS, "--crash-rounds", "4")
    assert code == 0, [e.get("reason") for e in evts]
    assert len(of(evts, "attempt_start")) == 5
    assert [e["no_progress_streak"] for e in of(evts, "attempt_end")] == [0] * 5
    assert of(evts, "run_end")[0]["status"] == "succeeded"


def test_a_true_crash_loop_still_gives_up_for_no_progress(tmp_path: Path) -> None:
    """After a first attempt that saved, every resumed attempt dies before any step or save."""
    counter_policy(tmp_path)
    code, evts = run(tmp_path, PROGRESS, "--crash-rounds", "99", "--die-on-resume")
    assert code == 1
    end = of(evts, "run_end")[0]
    assert end["status"] == "gave_up" and "no progress in 3 restarts" in end["reason"]
    assert len(of(evts, "attempt_start")) == 4


def test_progress_rules_as_values() -> None:
    s = RunState()
    assert s.attempt_ended(30, counts=False) and s.best_step == 30
    assert not s.attempt_ended(30, counts=True) and s.no_progress_streak == 1
    assert s.attempt_ended(20, counts=True, saved=True) and s.no_progress_streak == 0 and s.best_step == 30
    assert s.attempt_ended(31, counts=True) and s.best_step == 31
    # a script that reports no steps at all is judged by its checkpoints, else by running past start-up
    quiet = RunState()
    assert not quiet.attempt_ended(None, counts=True, lived=1.0) and quiet.no_progress_streak == 1
    assert quiet.attempt_ended(None, counts=True, lived=QUIET_PROGRESS) and quiet.no_progress_streak == 0
    assert quiet.attempt_ended(None, counts=True, saved=True, lived=0.5)
    # once the script has reported steps, steps (or checkpoints) decide
    assert not s.attempt_ended(None, counts=True, lived=QUIET_PROGRESS * 10)


# ------------------------------------------------------------------ 3. detectors that fire when a person would
def steep_descent(n: int, seed: int, spike_at: int | None = None) -> list[float]:
    """3.0 → 0.15 in 80 steps, then a plateau, with 5 % noise; one value ×1000 at ``spike_at``."""
    rng = random.Random(seed)
    out = []
    for step in range(n):
        level = 3.0 * (0.05 ** (step / 80)) if step < 80 else 0.15
        out.append(level * math.exp(rng.gauss(0.0, 0.05)) * (1000 if step == spike_at else 1))
    return out


def alarms(values: list[float]) -> list[tuple[FailureKind, int | None]]:
    det = Detectors(DetectSpec.default())
    det.start_attempt(0.0)
    found = (det.feed({"step": i, "attempt": 1, "loss": v}, 0.0) for i, v in enumerate(values))
    return [(a.kind, a.step) for a in found if a is not None]


@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5])
def test_a_1000x_spike_after_a_steep_descent_fires_at_its_step(seed: int) -> None:
    assert alarms(steep_descent(300, seed, spike_at=120)) == [(FailureKind.SPIKE, 120)]


@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5])
def test_the_same_descent_without_a_spike_raises_nothing(seed: int) -> None:
    assert alarms(steep_descent(3000, seed)) == []


# scripts/train_charlm.py's loss (the demo, configs/demo.yaml, 300 steps, no fault), recorded
# with `ftrain run scripts/train_charlm.py --config configs/demo.yaml`.
DEMO_CURVE = json.loads((Path(__file__).parent / "data" / "demo_loss.json").read_text())


def test_the_demo_curve_raises_nothing_and_a_spike_in_it_fires() -> None:
    assert len(DEMO_CURVE) == 300
    assert alarms(DEMO_CURVE) == []
    spiked = list(DEMO_CURVE)
    spiked[200] *= 10
    assert alarms(spiked) == [(FailureKind.SPIKE, 200)]


def test_a_spike_after_a_steep_descent_is_caught_end_to_end(tmp_path: Path) -> None:
    policy(tmp_path, "  - when: spike\n    action: stop\n", regex=LINE_REGEX)
    code, evts = run(tmp_path, BAR, "--lines", "--spike-at", "120", "--step-time", "0.005")
    assert code == 1
    failure = of(evts, "failure")[0]
    assert failure["kind"] == "spike" and failure["step"] == 120, failure
    assert "recent level" in failure["evidence"][0]


# ------------------------------------------------------------------ 4. an injected fault nobody saw
def test_an_injected_nan_that_no_detector_watches_is_told_at_the_end(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text("""version: 1
detect: {nonfinite: [grad_norm], spike: {}, hang: false}
rules:
  - when: segfault
    action: restart
""")
    p = run_ftrain("run", str(CHILDREN / "shim_train.py"), "--policy", "p.yaml", "--run-dir", "run", "--no-ui",
                   "--inject", "nan@3", "--", "--steps", "8", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    end = of(events(tmp_path / "run"), "run_end")[0]
    assert end["status"] == "succeeded" and end["undetected"] == ["nan@3"]
    assert "nan@3 fired but no detector saw them" in p.stdout + p.stderr


def test_an_injected_nan_that_is_detected_is_not_reported(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text("""version: 1
detect: {nonfinite: [loss], hang: false}
rules:
  - when: nonfinite
    action: restart
""")
    p = run_ftrain("run", str(CHILDREN / "shim_train.py"), "--policy", "p.yaml", "--run-dir", "run", "--no-ui",
                   "--inject", "nan@3", "--", "--steps", "8", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    end = of(events(tmp_path / "run"), "run_end")[0]
    assert end.get("undetected") is None and "no detector saw" not in p.stdout + p.stderr


# ------------------------------------------------------------------ 5. divergences that surface as exceptions
MULTINOMIAL = """Traceback (most recent call last):
  File "/work/makemore/makemore.py", line 302, in generate
    idx_next = torch.multinomial(probs, num_samples=1)
               ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^
RuntimeError: probability tensor contains either `inf`, `nan` or element < 0"""
OVERFLOW = """Traceback (most recent call last):
  File "/work/examples/word_language_model/main.py", line 217, in train
    elapsed * 1000 / args.log_interval, cur_loss, math.exp(cur_loss)))
                                                  ^^^^^^^^^^^^^^^^^^
OverflowError: math range error"""


@pytest.mark.parametrize("tail", [MULTINOMIAL, OVERFLOW], ids=["multinomial", "math_exp"])
def test_a_divergence_raised_by_the_script_is_nonfinite(tail: str) -> None:
    failure = classify(1, tail.splitlines(), step=41)
    assert failure is not None and failure.kind is FailureKind.NONFINITE
    assert failure.evidence[0] == tail.splitlines()[-1]


def test_other_overflow_and_runtime_errors_stay_exceptions() -> None:
    for last in ("OverflowError: int too large to convert to float", "RuntimeError: shape mismatch"):
        failure = classify(1, ["Traceback (most recent call last):", '  File "t.py", line 1', last])
        assert failure is not None and failure.kind is FailureKind.EXCEPTION


@pytest.mark.parametrize("code", [
    "import math\nloss = 1000.0\nprint('ppl', math.exp(loss))\n",
    "import torch\np = torch.tensor([float('nan'), 1.0])\nidx = torch.multinomial(p, num_samples=1)\n",
], ids=["math_exp", "torch_multinomial"])
def test_the_real_texts_as_python_and_torch_print_them(code: str, tmp_path: Path) -> None:
    if "torch" in code:
        pytest.importorskip("torch")
    script = tmp_path / "diverge.py"
    script.write_text(code)
    p = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    failure = classify(p.returncode, p.stderr.splitlines())
    assert failure is not None and failure.kind is FailureKind.NONFINITE, p.stderr


def test_a_divergence_exception_is_rolled_back_not_stopped(tmp_path: Path) -> None:
    """End to end with the default policy's rules: ``nonfinite`` rolls back, ``exception`` stops."""
    script = tmp_path / "ppl.py"
    script.write_text("import math, os, time\n"
                      "for step in range(30):\n"
                      "    loss = 2.0\n"
                      "    if step == 20 and not os.path.exists('diverged'):\n"
                      "        open('diverged', 'w').close()\n"
                      "        loss = 2000.0\n"
                      "    print(f'step {step} | loss {loss:.4g} | ppl {math.exp(loss):.4g}', flush=True)\n"
                      "    time.sleep(0.01)\n")
    policy(tmp_path, "  - when: nonfinite\n    action: restart\n  - when: exception\n    action: stop\n",
           regex=LINE_REGEX)
    code, evts = run(tmp_path, str(script))
    failures = of(evts, "failure")
    assert [f["kind"] for f in failures] == ["nonfinite"], failures
    assert code == 0
