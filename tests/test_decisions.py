"""Decisions a user can trust at a glance: what a rollback skips, said in the decision."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ftrain.kinds import Failure, FailureKind
from ftrain.policy import Action, History
from ftrain.policyfile import parse_policy

POLICY = """version: 1
rules:
  - when: nonfinite
    action: rollback
    margin: 10
    skip_steps: 200
"""


@dataclass(frozen=True)
class Ref:
    path: Path
    step: int | None


def decide(step: int, config: dict) -> str:
    policy = parse_policy(POLICY, "p.yaml")
    refs = [Ref(Path(f"step-{s:08d}.pt"), s) for s in (50, 100, 120)]
    decision = policy.decide(Failure(FailureKind.NONFINITE, step=step), History(config=config), refs)
    assert decision.action is Action.ROLLBACK and decision.resume_step == 120
    return decision.reason


def test_a_rollback_says_how_many_steps_it_skips() -> None:
    reason = decide(130, {"train": {"steps": 5000}})
    assert "skip steps 130-329 (200 steps)" in reason and "WARNING" not in reason


def test_a_window_past_the_jobs_end_is_a_warning_with_the_share_of_the_job() -> None:
    reason = decide(130, {"train": {"steps": 300}})
    assert "WARNING: the window reaches past the job's end (step 299)" in reason
    assert "all 170 steps left are skipped, 57% of the job" in reason


def test_without_a_known_length_there_is_no_guess() -> None:
    assert "WARNING" not in decide(130, {"optim": {"lr": 0.1}})


def test_a_success_that_skipped_steps_says_how_many_in_its_end(tmp_path: Path) -> None:
    from conftest import CHILDREN, events, of, run_ftrain

    (tmp_path / "p.yaml").write_text(POLICY.replace("margin: 10", "margin: 5") + "detect: {nonfinite: [loss]}\n"
                                     "backoff: 0s\n")
    (tmp_path / "c.yaml").write_text("train: {steps: 300, batch_size: 8, grad_accum: 1, ckpt_every: 20, "
                                     "sleep: 0.002}\noptim: {lr: 0.1}\n")
    p = run_ftrain("run", str(CHILDREN / "job_train.py"), "--policy", "p.yaml", "--config", "c.yaml",
                   "--run-dir", "run", "--no-ui", "--inject", "nan@130", cwd=tmp_path, timeout=120)
    assert p.returncode == 0, p.stderr
    evts = events(tmp_path / "run")
    assert "WARNING: the window reaches past the job's end" in of(evts, "decision")[0]["reason"]
    end = of(evts, "run_end")[0]
    assert end["status"] == "succeeded"
    assert "170 steps skipped by rollbacks (130-299, 57% of the job)" in end["reason"], end["reason"]
