"""Policy schema, validation messages (file, line, key) and decisions — from plain values."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from ftrain.errors import PolicyError
from ftrain.kinds import Failure
from ftrain.kinds import FailureKind as K
from ftrain.policy import Action, History
from ftrain.policyfile import default_policy_path, load_policy, parse_policy

ROOT = Path(__file__).resolve().parents[1]
CONFIG = {"train": {"batch_size": 32, "grad_accum": 1}, "optim": {"lr": 0.004}}


@dataclass(frozen=True)
class Ckpt:
    step: int
    path: str


CKPTS = [Ckpt(s, f"/c/step-{s:08d}.pt") for s in (100, 200, 300, 400, 500)]


def policy(text: str):
    return parse_policy(text, "p.yaml")


def test_default_policy_loads_and_matches_configs_copy():
    pol = load_policy(None)
    assert pol.rule_for(K.CUDA_OOM).action is Action.RESTART
    assert pol.rule_for(K.EXCEPTION).action is Action.STOP
    assert (ROOT / "configs" / "policy.default.yaml").read_text() == default_policy_path().read_text()


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("policy*.yaml")), ids=lambda p: p.name)
def test_shipped_policies_validate(path):
    load_policy(path)


def test_every_error_with_file_line_and_key():
    text = """version: 1
max_restarts: lots
bogus: 1
rules:
  - when: cuda_oomm
    action: restart
  - when: segfault
    action: explode
  - on: hang
    action: restart
  - when: exception
    action: stop
    set: {optim.lr: {scale: 0.5}}
"""
    with pytest.raises(PolicyError) as err:
        policy(text)
    errors = err.value.errors
    joined = "\n".join(errors)
    assert "p.yaml:2: max_restarts: must be an integer" in joined
    assert "p.yaml:3: bogus: unknown key" in joined
    assert "p.yaml:5: rules[0].when: unknown failure kind 'cuda_oomm' (did you mean 'cuda_oom'?)" in joined
    assert "p.yaml:8: rules[1].action: unknown action 'explode'" in joined
    assert "p.yaml:9: rules[2].on: YAML reads `on:` as true" in joined
    assert "rules[3].set: `set` has no effect with action stop" in joined
    assert len(errors) >= 6


def test_malformed_yaml():
    with pytest.raises(PolicyError, match=r"p\.yaml:2: malformed YAML"):
        policy("rules:\n  - when: [a\n")


def test_warm_start_is_a_boolean_on_by_default():
    assert policy("version: 1\n").warm_start is True
    assert policy("version: 1\nwarm_start: false\n").warm_start is False
    with pytest.raises(PolicyError, match=r"p\.yaml:2: warm_start: must be true or false, not 'sometimes'"):
        policy("version: 1\nwarm_start: sometimes\n")


def test_ignore_only_for_anomalies():
    with pytest.raises(PolicyError, match="ignore applies to anomalies only, not segfault"):
        policy("rules:\n  - when: [spike, segfault]\n    action: ignore\n")


def test_keys_missing_from_config():
    pol = policy("rules:\n  - when: cuda_oom\n    action: restart\n    set: {train.micro_batch: {scale: 0.5}}\n")
    assert pol.check_config(CONFIG) == ["p.yaml:4: rule 1: set: 'train.micro_batch' is not a key of the config "
                                        "(add it to the config, or give the rule `if_missing: skip`)"]
    assert load_policy(None).check_config({}) == []  # the default's rules say `if_missing: skip`
    assert pol.check_config(None) == []  # no --config: the script's defaults, learnt when it runs


def test_if_missing_skip_is_a_rule_choice_and_leaves_out_with_reason():
    text = ("rules:\n  - when: cuda_oom\n    action: restart\n    if_missing: skip\n"
            "    set: {train.batch_size: {scale: 0.5}, train.micro_batch: {scale: 0.5}, train.amp: false}\n")
    pol = policy(text)
    assert pol.check_config(CONFIG) == []
    d = pol.decide(Failure(K.CUDA_OOM), History(config=CONFIG), CKPTS)
    assert dict(d.overrides) == {"train.batch_size": 16}
    assert "not set: train.micro_batch (not in the script's config), train.amp" in d.reason
    # without `if_missing: skip` a literal still reaches the script (the shim reports it)
    strict = policy(text.replace("    if_missing: skip\n", ""))
    d = strict.decide(Failure(K.CUDA_OOM), History(config=CONFIG), CKPTS)
    assert dict(d.overrides) == {"train.batch_size": 16, "train.amp": False}
    assert "not set: train.micro_batch" in d.reason
    with pytest.raises(PolicyError, match=r"p.yaml:4: rules\[0\].if_missing: must be skip or error"):
        policy(text.replace("if_missing: skip", "if_missing: maybe"))


def test_scaling_a_non_number_of_the_config_is_refused_with_its_line():
    pol = policy("rules:\n  - when: cuda_oom\n    action: restart\n    set:\n      train.batch_size: {scale: 0.5}\n")
    assert pol.check_config({"train": {"batch_size": "auto"}}) == [
        "p.yaml:5: rule 1: set: 'train.batch_size' is 'auto' in the config, not a number to scale or add to"]


OOM_POLICY = """
max_restarts: 5
backoff: {initial: 1s, factor: 2, max: 3s}
rules:
  - when: cuda_oom
    action: restart
    set: {train.batch_size: {scale: 0.5, min: 1}, train.grad_accum: {scale: 2}}
    max: 2
  - when: [nonfinite, spike]
    action: rollback
    margin: 100
    skip_steps: 50
    set: {optim.lr: {scale: 0.5}}
  - when: exception
    action: stop
"""


def test_restart_with_overrides_from_newest_checkpoint():
    pol = policy(OOM_POLICY)
    d = pol.decide(Failure(K.CUDA_OOM, exit_code=1, step=512), History(config=CONFIG), CKPTS)
    assert d.action is Action.RESTART and d.rule == 1
    assert d.overrides == {"train.batch_size": 16, "train.grad_accum": 2}
    assert d.resume_from.endswith("step-00000500.pt") and d.resume_step == 500
    assert d.backoff == 1.0
    assert "cuda_oom" in d.reason and "train.batch_size=16" in d.reason


def test_rule_budget_and_max_restarts():
    pol = policy(OOM_POLICY)
    d = pol.decide(Failure(K.CUDA_OOM), History(rule_uses={1: 2}, config=CONFIG))
    assert d.action is Action.STOP and d.gave_up and "budget (2) spent" in d.reason
    d = pol.decide(Failure(K.NONFINITE, step=450), History(restarts=5, config=CONFIG))
    assert d.action is Action.STOP and d.gave_up and "max_restarts (5) spent" in d.reason


def test_stop_and_no_rule():
    pol = policy(OOM_POLICY)
    d = pol.decide(Failure(K.EXCEPTION), History(config=CONFIG))
    assert d.action is Action.STOP and not d.gave_up and "says stop" in d.reason
    d = pol.decide(Failure(K.SEGFAULT), History(config=CONFIG))
    assert d.action is Action.STOP and "no rule matches" in d.reason


def test_no_progress_breaker():
    pol = policy(OOM_POLICY)
    d = pol.decide(Failure(K.CUDA_OOM), History(no_progress_streak=3, config=CONFIG))
    assert d.action is Action.STOP and d.gave_up and "no progress in 3 restarts" in d.reason


def test_backoff_grows_without_progress_and_caps():
    pol = policy(OOM_POLICY)
    delays = [pol.decide(Failure(K.CUDA_OOM), History(no_progress_streak=s, config=CONFIG)).backoff
              for s in range(3)]
    assert delays == [1.0, 2.0, 3.0]


def test_rollback_margin_skip_and_quarantine():
    pol = policy(OOM_POLICY)
    d = pol.decide(Failure(K.NONFINITE, step=480), History(config=CONFIG), CKPTS)
    assert d.action is Action.ROLLBACK
    assert d.resume_step == 300 and d.quarantine_after == 300  # newest at or before 480-100
    assert d.skip == ((480, 529),)
    assert d.overrides == {"optim.lr": 0.002}


def test_second_anomaly_in_same_place_rolls_back_further():
    pol = policy(OOM_POLICY)
    d = pol.decide(Failure(K.SPIKE, step=470), History(rollbacks=((480, 300),), config=CONFIG), CKPTS)
    assert d.resume_step == 200


def test_rollback_without_old_enough_checkpoint_starts_over():
    pol = policy(OOM_POLICY)
    d = pol.decide(Failure(K.NONFINITE, step=150), History(config=CONFIG), CKPTS)
    assert d.action is Action.ROLLBACK and d.resume_from is None and d.quarantine_after == -1
    assert "from scratch" in d.reason


@pytest.mark.parametrize("detect, message", [
    ("hang: {timeout: 0}", "detect.hang"),
    ("threshold: {loss: {min: 5, max: 1}}", "detect.threshold.loss"),
    ("hang: {timeout: 10x}", "is not a duration"),
])
def test_impossible_detector_values_are_errors_not_tracebacks(detect, message):
    with pytest.raises(PolicyError, match=message):
        policy(f"detect:\n  {detect}\n")
