"""The policy's ``script:`` section (``ftrain.adapter``): validation, how overrides reach a
script (flags, a config file, environment variables), resume arguments, the script's own
checkpoints, metrics read from its output — as values, then end to end with a child that
knows nothing of ftrain."""

from __future__ import annotations

import json
import math
import os
import random
import string
import time
from pathlib import Path

import pytest
import yaml
from conftest import CHILDREN, ROOT, events, of, run_ftrain

from ftrain.adapter import MissingCheckpoint, ScriptAdapter, TrainerLines, render_value
from ftrain.checkpoints import CheckpointStatus
from ftrain.errors import PolicyError
from ftrain.kinds import Failure, FailureKind
from ftrain.policy import Action, Decision, History
from ftrain.policyfile import load_policy, parse_policy
from ftrain.state import RunState

CONFIG = {"train": {"batch_size": 32, "grad_accum": 1, "steps": 100}, "optim": {"lr": 3e-4}, "amp": True}
EXT = str(CHILDREN / "ext_env.py")


def adapter(section: dict, config: dict = CONFIG, **kwargs) -> ScriptAdapter:
    return ScriptAdapter.from_policy(section, source="p.yaml", config=config, **kwargs)


def problems(section: dict, config: dict = CONFIG) -> list[str]:
    with pytest.raises(PolicyError) as info:
        adapter(section, config)
    return info.value.errors


# --------------------------------------------------------------------------- validation
def test_every_problem_is_listed_with_file_line_and_key(tmp_path):
    text = """version: 1
rules: [{when: segfault, action: restart}]
script:
  argz: "--{key}={value}"
  args: ["--lr={optim.lrr}", "--x={checkpoint}"]
  resume_args: "--resume {checkpoint} {value}"
  config_file: out/config.toml
  env: "FTRAIN_{KEY}"
  on_missing_checkpoint: maybe
  metrics_regex: ['loss (?P<loss>\\S+)', '(?P<step>\\d+']
"""
    path = tmp_path / "p.yaml"
    path.write_text(text)
    policy = load_policy(path)
    with pytest.raises(PolicyError) as info:
        ScriptAdapter.from_policy(policy.script, source=policy.source, config=CONFIG)
    errors = "\n".join(info.value.errors)
    src = str(path)
    assert f"{src}:4: script.argz: unknown key 'argz'" in errors
    assert f"{src}:5: script.args[0]: {{optim.lrr}}: the config has no key 'optim.lrr'" in errors
    assert f"{src}:5: script.args[1]: {{checkpoint}} is available only in resume_args" in errors
    assert f"{src}:6: script.resume_args: {{value}} is a per-key placeholder: only in `args`" in errors
    assert f"{src}:7: script.config_file: 'out/config.toml'" in errors
    assert f"{src}:8: script.env: 'FTRAIN_TRAIN_BATCH_SIZE': FTRAIN_* variables are ftrain's own" in errors
    assert f"{src}:9: script.on_missing_checkpoint: must be fresh or stop, not 'maybe'" in errors
    assert f"{src}:9: script.on_missing_checkpoint: applies only with `checkpoints:`" in errors
    assert f"{src}:10: script.metrics_regex[0]: needs a named group (?P<step>" in errors
    assert f"{src}:10: script.metrics_regex[1]: does not compile" in errors
    assert len(info.value.errors) == 10, errors


@pytest.mark.parametrize("section, message", [
    ({"args": "--{name}={value}"}, "'a.lr' and 'b.lr' render as the same argument; use {key}"),
    ({"args": "{value}"}, "renders every config value but names no key"),
    ({"args": "--x='unclosed"}, "No closing quotation"),
    ({"args": "--x={"}, "stray '{'"),
    ({"args": "--x={}"}, "empty {}"),
    ({"args": 3}, "must be a template string or a list of them"),
    ({"env": "P_{value}"}, "needs {KEY}"),
    ({"env": {"LR": "{a.lr}", "BAD=NAME": "1"}}, "'BAD=NAME' is not a usable environment variable name"),
    ({"env": {"LR": "{key}"}}, "{key} is a per-key placeholder: only in `args` and an `env` name template"),
    ({"checkpoints": []}, "must be a glob pattern or a list of them"),
    ({"metrics_regex": "(?P<step>\\d+) (?P<t>\\S+)"}, "group name(s) t are reserved"),
    ({"config_file": ""}, "must be a file path"),
    ({"metrics_dicts": "yes"}, "must be true or false"),
])
def test_single_problems(section, message):
    errors = problems(section, {"a": {"lr": 1}, "b": {"lr": 2}})
    assert any(message in e for e in errors), errors
    assert all(e.startswith("p.yaml:1: script") for e in errors)


def test_without_a_config_only_the_section_itself_is_checked():
    """``ftrain policy check`` without ``--config``: key names cannot be checked yet."""
    section = {"args": ["--lr={optim.lr}", "--{name}={value}"], "env": "P_{KEY}", "bogus": 1}
    with pytest.raises(PolicyError) as info:
        ScriptAdapter.from_policy(section, source="p.yaml", config=None)
    assert info.value.errors == ["p.yaml:1: script.bogus: unknown key 'bogus' (expected one of: args, "
                                 "config_file, env, resume_args, checkpoints, on_missing_checkpoint, metrics_regex, "
                                 "metrics_dicts)"]


def test_a_valid_section_and_its_properties():
    a = adapter({"args": "--{key}={value}", "checkpoints": "out/*.pt", "on_missing_checkpoint": "stop",
                 "metrics_regex": r"(?P<step>\d+)"})
    assert a.reads_output and a.owns_checkpoints and a.delivers_config
    assert a.missing_checkpoint_policy is MissingCheckpoint.STOP
    bare = adapter({"checkpoints": ["a/*.pt", "b/*"]})
    assert not bare.reads_output and bare.owns_checkpoints and not bare.delivers_config
    assert bare.missing_checkpoint_policy is MissingCheckpoint.FRESH


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "examples").glob("*.policy.yaml")), ids=lambda p: p.name)
def test_example_policies_validate_against_their_configs(path):
    policy = load_policy(path)
    config_path = path.with_name(path.name.replace(".policy.", ".config."))
    config = yaml.safe_load(config_path.read_text()) if config_path.exists() else {}
    assert policy.check_config(config) == []
    ScriptAdapter.from_policy(policy.script, source=policy.source, config=config)


# --------------------------------------------------------------------------- command and env
def test_flags_for_every_leaf_follow_the_overrides():
    a = adapter({"args": "--{key}={value}", "resume_args": "--resume {checkpoint}"})
    config = {"train": {"batch_size": 16, "grad_accum": 2}, "optim": {"lr": 0.00015}, "amp": False}
    assert a.command(("python", "t.py", "--data", "x"), config, None) == (
        "python", "t.py", "--data", "x",
        "--train.batch_size=16", "--train.grad_accum=2", "--optim.lr=0.00015", "--amp=False")
    resumed = a.command(("t",), config, "/ck/step 5.pt")
    assert resumed[-2:] == ("--resume", "/ck/step 5.pt")   # one argv item, space and all


def test_leaf_names_pairs_and_named_keys():
    config = {"train": {"batch_size": 16, "grad_accum": 2}, "optim": {"lr": 0.5}}
    assert adapter({"args": "--{name}={value}"}, config).command((), config, None) == (
        "--batch_size=16", "--grad_accum=2", "--lr=0.5")
    assert adapter({"args": "--{name} {value}"}, config).command((), config, None) == (
        "--batch_size", "16", "--grad_accum", "2", "--lr", "0.5")
    named = adapter({"args": ["--batch-size {train.batch_size}", "--lr={optim.lr}", "'{{literal}}'"]}, config)
    assert named.command(("s",), config, None) == ("s", "--batch-size", "16", "--lr=0.5", "{literal}")
    resume = adapter({"resume_args": "--init_from=resume --ckpt-dir {checkpoint_dir} --lr {optim.lr}"}, config)
    assert resume.command(("s",), config, None) == ("s",)
    assert resume.command(("s",), config, "/out/ckpt.pt") == (
        "s", "--init_from=resume", "--ckpt-dir", "/out", "--lr", "0.5")


@pytest.mark.parametrize("value, text", [
    (True, "True"), (None, "None"), (3, "3"), (3e-4, "0.0003"), (1e-05, "1e-05"), (float("nan"), "nan"),
    ([1, "a"], '[1, "a"]'), ("cosine", "cosine"),
])
def test_values_render_as_a_python_script_reads_them(value, text):
    assert render_value(value) == text


def test_environment_variables_per_key_and_by_name(tmp_path):
    config = {"train": {"batch_size": 16}, "optim": {"lr": 0.5}, "name": "run a"}
    per_key = adapter({"env": "APP_{KEY}"}, config)
    assert per_key.env(config, tmp_path / "run" / "attempts" / "0001") == {
        "APP_TRAIN_BATCH_SIZE": "16", "APP_OPTIM_LR": "0.5", "APP_NAME": "run a"}
    by_name = adapter({"env": {"LEARNING_RATE": "{optim.lr}", "MODE": "fast"}}, config)
    assert by_name.env(config, tmp_path) == {"LEARNING_RATE": "0.5", "MODE": "fast"}


def test_config_file_goes_to_the_folder_the_run_records(tmp_path, monkeypatch):
    """On ``ftrain resume`` from another folder, the file still lands where the run started
    (runs.resume_run builds the adapter with run.json's cwd)."""
    run = tmp_path / "run"
    (run / "attempts").mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({"cwd": str(tmp_path / "work"), "created": 0}))
    monkeypatch.chdir(tmp_path)
    adapter({"config_file": "c.yaml"}, cwd=tmp_path / "work").env({"a": 1}, run / "attempts" / "0003")
    assert yaml.safe_load((tmp_path / "work" / "c.yaml").read_text()) == {"a": 1}
    assert not (tmp_path / "c.yaml").exists()


@pytest.mark.parametrize("name, load", [("cfg/run.yaml", yaml.safe_load), ("run.json", json.loads)])
def test_config_file_written_atomically_relative_to_cwd(tmp_path, name, load):
    config = {"train": {"batch_size": 16, "lr": 0.001}}
    a = adapter({"config_file": name}, config, cwd=tmp_path)
    assert a.env(config, tmp_path / "run" / "attempts" / "0001") == {}
    assert load((tmp_path / name).read_text()) == config
    assert a.env({"train": {"batch_size": 8, "lr": 0.001}}, tmp_path / "run" / "attempts" / "0002") == {}
    assert load((tmp_path / name).read_text())["train"]["batch_size"] == 8
    assert [p.name for p in (tmp_path / name).parent.iterdir() if p.name.startswith(".")] == []


# --------------------------------------------------------------------------- metrics lines
def test_progress_lines_become_records():
    a = adapter({"metrics_regex": [r"^iter (?P<step>\d+): loss (?P<loss>[^,\s]+)(?:, gn (?P<grad_norm>\S+))?",
                                   r"^step (?P<step>\d+): val loss (?P<val_loss>\S+)"]})
    assert a.parse_line("iter 120: loss 2.3100, time 41.20ms") == {"step": 120, "loss": 2.31}
    assert a.parse_line("iter 7: loss 1e-3, gn 0.5") == {"step": 7, "loss": 0.001, "grad_norm": 0.5}
    assert a.parse_line("step 100: val loss 1.9") == {"step": 100, "val_loss": 1.9}
    nan, inf, ninf = (a.parse_line(f"iter 3: loss {v}") for v in ("nan", "inf", "-inf"))
    assert math.isnan(nan["loss"]) and inf["loss"] == math.inf and ninf["loss"] == -math.inf
    assert math.isnan(a.parse_line("iter 3: loss NaN")["loss"])
    assert a.parse_line("iter 3: loss 2.0, \riter 4: loss 1.5, \riter 5: loss -") == {"step": 4, "loss": 1.5}
    for near in ("iter x: loss 1.0", "iter 3: loss 1.0.0", "iter 3: loss --", "iter : loss 1", "",
                 "Epoch 1/3 ━━━━━━━━ 50%", "iter 3: loss"):
        assert a.parse_line(near) is None, near


def test_parse_line_never_raises():
    a = adapter({"metrics_regex": r"(?P<step>\S+) (?P<loss>\S+)"})
    rng = random.Random(5)
    alphabet = string.printable + "é—\x00\ufffd"
    for _ in range(3000):
        line = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        record = a.parse_line(line)
        assert record is None or (type(record["step"]) is int and isinstance(record["loss"], float))


# --------------------------------------------------------------------------- checkpoints
def _touch(path: Path, mtime: float, folder: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if folder:
        path.mkdir()
        (path / "model.bin").write_bytes(b"x" * 10)
    else:
        path.write_bytes(b"x" * 7)
    os.utime(path, (mtime, mtime))


def _run_folder(run: Path, created: float, lines: list[tuple[int, float]]) -> None:
    run.mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({"created": created}))
    records = [{"step": s, "t": t, "attempt": 1, "loss": 1.0} for s, t in lines]
    records.insert(1, {"ftrain": "save_start", "step": 999, "t": lines[0][1] + 0.1})   # a control line
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 12, "t"')


def test_checkpoints_by_name_or_by_the_step_logged_before_them(tmp_path):
    now = time.time()
    run = tmp_path / "run"
    _run_folder(run, now - 100, [(s, now - 90 + s) for s in range(50)])
    _touch(tmp_path / "out" / "model_step20.pt", now - 70)
    _touch(tmp_path / "out" / "checkpoint-40", now - 50, folder=True)
    _touch(tmp_path / "out" / "ckpt.pt", now - 64.5)              # no step in the name: logged 25 before it
    _touch(tmp_path / "out" / "last.ckpt", now - 500)             # older than the run: a leftover
    _touch(tmp_path / "out" / "old_step900.pt", now - 500)        # ditto, even with a step
    _touch(tmp_path / "out" / "notes.txt", now - 10)              # not matched by the patterns
    a = adapter({"checkpoints": ["out/*.pt", "out/checkpoint-*", "out/*.ckpt"]}, run_dir=run, started=now - 100)
    found = a.checkpoints(tmp_path)
    assert [(c.path.name, c.step) for c in found] == [("model_step20.pt", 20), ("ckpt.pt", 25),
                                                       ("checkpoint-40", 40)]
    assert all(c.status is CheckpointStatus.UNVERIFIED for c in found)
    assert [c.bytes for c in found] == [7, 7, 10]
    assert "logged before" in found[1].note


def test_a_checkpoint_is_never_placed_after_the_step_it_was_written_at(tmp_path):
    """The last line stamped at or before the file's mtime gives its step, whether the lines
    were stamped when written (the shim) or when read (``metrics_regex``, up to 100 ms late):
    lines stamped after the file are never taken, however close."""
    now = time.time()
    run = tmp_path / "run"
    _run_folder(run, now - 100, [(s, now - 10 + s * 0.03) for s in range(40)])   # a line per 30 ms
    _touch(tmp_path / "out" / "ckpt.pt", now - 10 + 20 * 0.03 + 0.001)          # just after step 20's line
    read = adapter({"checkpoints": "out/ckpt.pt", "metrics_regex": r"^iter (?P<step>\d+)"}, run_dir=run)
    assert [(c.path.name, c.step) for c in read.checkpoints(tmp_path)] == [("ckpt.pt", 20)]
    written = adapter({"checkpoints": "out/ckpt.pt"}, run_dir=run)
    assert [(c.path.name, c.step) for c in written.checkpoints(tmp_path)] == [("ckpt.pt", 20)]
    _touch(tmp_path / "out" / "ckpt.pt", now - 10 + 20 * 0.03 - 0.001)          # just before it
    assert [c.step for c in written.checkpoints(tmp_path)] == [19]


def test_checkpoints_without_a_run_folder_use_names_only(tmp_path):
    _touch(tmp_path / "ck" / "step_5.state", time.time())
    _touch(tmp_path / "ck" / "latest.state", time.time())
    a = adapter({"checkpoints": str(tmp_path / "ck" / "*.state")})   # an absolute pattern
    assert [(c.path.name, c.step) for c in a.checkpoints(Path("/nonexistent"))] == [("step_5.state", 5)]


def test_rollback_picks_an_older_script_checkpoint():
    """The decision logic sees the adapter's checkpoints as it sees the shim's."""
    policy = parse_policy("""version: 1
rules: [{when: nonfinite, action: rollback, margin: 10}]
""", "p.yaml")
    a = adapter({"checkpoints": "out/*"})

    class Ref:
        def __init__(self, step: int) -> None:
            self.step, self.path = step, Path(f"out/ckpt_{step}")

    decision = policy.decide(Failure(FailureKind.NONFINITE, step=35), History(), [Ref(10), Ref(20), Ref(30)],
                             a.checkpoint_source())
    assert decision.action is Action.ROLLBACK and decision.resume_step == 20
    assert decision.reason.endswith("; 1 newer checkpoint(s) of the script set aside until it writes them again")


def test_a_missing_script_checkpoint_is_an_input_of_the_decision():
    """on_missing_checkpoint is the policy's to apply (policy.decide), from values only."""
    policy = parse_policy("""version: 1
rules: [{when: segfault, action: restart}, {when: exception, action: stop}]
""", "p.yaml")
    segv, exc = Failure(FailureKind.SEGFAULT, step=3), Failure(FailureKind.EXCEPTION, step=3)
    strict = adapter({"checkpoints": "out/*.pt", "on_missing_checkpoint": "stop"}).checkpoint_source()
    stop = policy.decide(segv, History(), [], strict)
    assert stop.action is Action.STOP and not stop.gave_up and stop.rule == 1
    assert "no checkpoint of this run matches out/*.pt (on_missing_checkpoint: stop)" in stop.reason
    fresh = policy.decide(segv, History(), [], adapter({"checkpoints": "out/*.pt"}).checkpoint_source())
    assert fresh.action is Action.RESTART and fresh.reason.endswith("matches out/*.pt: starting fresh")
    assert policy.decide(exc, History(), [], strict).reason == "exception: rule 2 (stop) says stop"
    plain = policy.decide(segv, History(), [], adapter({"args": "--{key}={value}"}).checkpoint_source())
    assert plain == policy.decide(segv, History(), [])


def test_a_rollback_sets_newer_script_checkpoints_aside_until_rewritten(tmp_path):
    now = time.time()
    for step in (10, 20, 30):
        _touch(tmp_path / "out" / f"step_{step}.pt", now - 5)
    a = adapter({"checkpoints": "out/*.pt"})
    state = RunState()
    assert sorted(c.step for c in a.checkpoints(tmp_path, state.set_aside)) == [10, 20, 30]
    rollback = Decision(Action.ROLLBACK, reason="nonfinite: roll back to step 10", resume_from="out/step_10.pt",
                        resume_step=10)
    state.apply(rollback, 35, t=time.time())
    assert [c.step for c in a.checkpoints(tmp_path, state.set_aside)] == [10]
    _touch(tmp_path / "out" / "step_20.pt", time.time() + 1)   # the script passed step 20 again
    assert [c.step for c in a.checkpoints(tmp_path, state.set_aside)] == [10, 20]


def test_what_a_rollback_set_aside_stays_aside_after_a_resume(tmp_path):
    """`ftrain resume` rebuilds the set-aside from the journal's rollback decisions (RunState.replay)."""
    now = time.time()
    for step in (10, 20, 30):
        _touch(tmp_path / "out" / f"step_{step}.pt", now - 5)
    journal = [{"event": "decision", "t": now - 4, "action": "rollback", "resume_step": 10, "reason": "r"},
               {"event": "decision", "t": now - 3, "action": "restart", "resume_step": 30, "reason": "r"}]
    resumed = adapter({"checkpoints": "out/*.pt"})
    assert sorted(c.step for c in resumed.checkpoints(tmp_path)) == [10, 20, 30]
    state = RunState.replay(journal, {}, ())
    assert [c.step for c in resumed.checkpoints(tmp_path, state.set_aside)] == [10]


# --------------------------------------------------------------------------- end to end
EXT_POLICY = """
version: 1
max_restarts: 4
grace: 2s
backoff: 0s
detect: {{nonfinite: [loss], hang: {{timeout: 10s, startup: 20s}}}}
rules:
  - when: cuda_oom
    action: restart
    set: {{train.batch_size: {{scale: 0.5, min: 1}}, train.grad_accum: {{scale: 2}}}}
  - when: nonfinite
    action: rollback
    margin: 4
    set: {{optim.lr: {{scale: 0.5}}}}
  - when: segfault
    action: restart
script:
  env: "EXT_{{KEY}}"
  resume_args: "--resume {{checkpoint}}"
  checkpoints: "ckpt/step_*.state"
  metrics_regex: '^step (?P<step>\\d+) \\| loss (?P<loss>\\S+)'
{extra}
"""
EXT_CONFIG = "train: {steps: 20, batch_size: 32, grad_accum: 1}\noptim: {lr: 0.1}\n"


def run_ext(tmp_path: Path, *script_args: str, extra: str = "") -> tuple[int, list[dict]]:
    (tmp_path / "p.yaml").write_text(EXT_POLICY.format(extra=extra))
    (tmp_path / "c.yaml").write_text(EXT_CONFIG)
    p = run_ftrain("run", EXT, "--policy", "p.yaml", "--config", "c.yaml", "--run-dir", "run", "--no-ui",
                   "--", *script_args, cwd=tmp_path)
    return p.returncode, events(tmp_path / "run")


def test_env_overrides_halve_the_batch_after_an_oom(tmp_path):
    code, evts = run_ext(tmp_path, "--max-batch", "16")
    assert code == 0
    decision = of(evts, "decision")[0]
    assert decision["action"] == "restart"
    assert decision["overrides"] == {"train.batch_size": 16, "train.grad_accum": 2}
    assert "set train.batch_size=16, train.grad_accum=2" in decision["reason"]
    assert "config batch_size=16 grad_accum=2" in (tmp_path / "run/attempts/0002/output.log").read_text()


def test_crash_resumes_from_the_scripts_own_checkpoint_not_a_leftover(tmp_path):
    _touch(tmp_path / "ckpt" / "step_500.state", time.time() - 3600)   # an earlier run's
    code, evts = run_ext(tmp_path, "--save-every", "5", "--crash-at", "12")
    assert code == 0
    assert of(evts, "failure")[0]["kind"] == "segfault"
    decision = of(evts, "decision")[0]
    assert decision["resume_from"] == str(tmp_path / "ckpt" / "step_9.state") and decision["resume_step"] == 9
    second = of(evts, "attempt_start")[1]
    assert second["command"][-2:] == ["--resume", str(tmp_path / "ckpt" / "step_9.state")]
    assert "--resume" not in of(evts, "attempt_start")[0]["command"]
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(12)) + list(range(10, 20))


def test_nan_in_the_output_rolls_back_with_a_lower_lr(tmp_path):
    code, evts = run_ext(tmp_path, "--save-every", "4", "--nan-at", "14")
    assert code == 0
    anomaly, decision = of(evts, "anomaly")[0], of(evts, "decision")[0]
    assert anomaly["kind"] == "nonfinite" and anomaly["step"] == 14
    assert decision["action"] == "rollback" and decision["resume_step"] == 7   # step 11 is within the margin
    assert decision["overrides"] == {"optim.lr": 0.05}
    assert "lr 0.05" in (tmp_path / "run/attempts/0002/output.log").read_text()


def test_on_missing_checkpoint_stop_ends_the_run(tmp_path):
    code, evts = run_ext(tmp_path, "--crash-at", "3", extra="  on_missing_checkpoint: stop")
    assert code == 1
    assert of(evts, "decision")[0]["action"] == "stop"
    assert "on_missing_checkpoint: stop" in of(evts, "run_end")[0]["reason"]
    assert len(of(evts, "attempt_start")) == 1


def test_on_missing_checkpoint_fresh_starts_over(tmp_path):
    code, evts = run_ext(tmp_path, "--crash-at", "3", extra="  on_missing_checkpoint: fresh")
    assert code == 0
    decision = of(evts, "decision")[0]
    assert decision["action"] == "restart" and decision["resume_from"] is None
    assert "--resume" not in of(evts, "attempt_start")[1]["command"]


def test_a_script_checkpoint_is_placed_at_the_step_it_holds_not_at_the_lines_after_it(tmp_path):
    """A real script writes out/ckpt.json after its step-20 line, then logs a line every 2 ms
    and fails at 30: the lines after the file (read within 100 ms of it) do not move it
    later; the restart resumes from the step the file holds."""
    (tmp_path / "p.yaml").write_text("""version: 1
backoff: 0s
warm_start: false
rules:
  - when: exit_nonzero
    action: restart
script:
  resume_args: "--resume {checkpoint}"
  checkpoints: out/ckpt.json
  metrics_regex: '^iter (?P<step>\\d+): loss (?P<loss>\\S+)'
""")
    p = run_ftrain("run", str(CHILDREN / "own_ckpt.py"), "--policy", "p.yaml", "--run-dir", "run", "--no-ui",
                   "--", "20", "30", cwd=tmp_path, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr
    decision, = of(events(tmp_path / "run"), "decision")
    held = json.loads((tmp_path / "out" / "ckpt.json").read_text())["step"]
    assert held == 20 and decision["resume_from"] == str(tmp_path / "out" / "ckpt.json")
    assert 17 <= decision["resume_step"] <= held, decision      # never past the step it holds
    assert "resumed after step 20" in (tmp_path / "run" / "attempts" / "0002" / "output.log").read_text()


TRAIN_BAR = "{:3d}%|█▌        | {}/{} [00:01<00:19,  9.87it/s]"


def test_trainer_dicts_read_safely_at_the_training_bars_count():
    """Dicts as Hugging Face's Trainer prints them: nan/inf read as such, strings and
    booleans left out; the step is the training bar's latest count (an evaluation bar of
    another total, or a dataset's bar with a description, is not followed); code, nesting
    and overlong lines are never records."""
    lines = TrainerLines()
    assert lines.parse("Map: 100%|██████████| 300/300 [00:00<00:00, 9e3 examples/s]") is None
    assert lines.parse(TRAIN_BAR.format(5, 10, 200)) == {"step": 10}        # a heartbeat
    assert lines.parse(TRAIN_BAR.format(5, 10, 200)) is None                # redrawn, not moved
    record = lines.parse("{'loss': 2.3, 'grad_norm': 1.2, 'learning_rate': 5e-05, 'epoch': 0.5}")
    assert record == {"step": 10, "loss": 2.3, "grad_norm": 1.2, "learning_rate": 5e-05, "epoch": 0.5}
    lines.parse(TRAIN_BAR.format(6, 12, 200))
    assert lines.parse(TRAIN_BAR.format(50, 4, 8)) is None                  # the eval bar
    drawn = TRAIN_BAR.format(6, 12, 200) + "{'loss': nan, 'grad_norm': inf, 'x': -inf, 'm': 'adamw', 'ok': True}"
    record = lines.parse(drawn)
    assert record is not None and record["step"] == 12 and set(record) == {"step", "loss", "grad_norm", "x"}
    assert math.isnan(record["loss"]) and record["grad_norm"] == math.inf and record["x"] == -math.inf
    for bad in ("{'loss': __import__('os').system('true')}", "{'loss': [1, 2]}", "{'loss': (1)}",
                "{'loss': open}", "{'loss': 1, " + "'a': 1, " * 600 + "}", "{'t': 1.0}", "{'loss': 'x'}",
                "{'loss': 1.0} trailing words", "not {'loss': 1.0"):
        assert lines.parse(bad) is None, bad
    bare = TrainerLines()   # no bar drawn: the dict's number in the attempt
    assert [bare.parse("{'loss': 1.0}")["step"], bare.parse("{'eval_loss': 2.0}")["step"]] == [1, 2]


def test_a_trainer_scripts_nan_loss_is_seen_at_its_step(tmp_path):
    """A real child prints what Hugging Face's Trainer prints (tqdm bar on stderr, the log
    dict through ``bar.write(str(logs))`` every 5 steps) and logs loss nan at step 25: the
    script's dicts are metrics at the bar's step, the NaN is the anomaly at step 25, and
    the attempt is stopped at once, not when the bar closes at 40."""
    (tmp_path / "p.yaml").write_text("""version: 1
backoff: 0s
warm_start: false
rules:
  - when: nonfinite
    action: stop
script:
  metrics_dicts: true
""")
    p = run_ftrain("run", str(CHILDREN / "hf_log.py"), "--policy", "p.yaml", "--run-dir", "run", "--no-ui",
                   "--", "40", "5", "25", cwd=tmp_path, timeout=60)
    assert p.returncode == 1, p.stdout + p.stderr
    evts = events(tmp_path / "run")
    failure, = of(evts, "failure")
    assert failure["kind"] == "nonfinite" and failure["step"] == 25, failure
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = [(r["step"], r["loss"]) for r in records if "loss" in r]
    assert logged[:4] == [(5, 0.6), (10, 0.3), (15, 0.2), (20, 0.15)] and logged[4][0] == 25, logged
    assert math.isnan(logged[4][1]) and len(logged) == 5
    assert max(r["step"] for r in records) <= 27          # stopped within 0.25 s of the NaN
    assert [r["step"] for r in records if "loss" not in r][:6] == [0, 1, 2, 3, 4, 5]   # the bar: a heartbeat
