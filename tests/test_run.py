"""`ftrain run` end to end with real children: crash kinds, decisions, overrides, resume
steps, budgets, signals, bad input, and no stray processes."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import CHILDREN, events, ftrain_cmd, of, pid_alive, run_ftrain

JOB = str(CHILDREN / "job_train.py")
MISBEHAVE = str(CHILDREN / "job_misbehave.py")

FAST_POLICY = """
version: 1
max_restarts: 6
no_progress: 3
grace: 2s
backoff: 0s
detect:
  hang: {timeout: 30s, startup: 60s}
rules:
  - when: cuda_oom
    action: restart
    set: {train.batch_size: {scale: 0.5, min: 1}, train.grad_accum: {scale: 2}}
    max: 2
  - when: [segfault, aborted, killed, cuda_error, nccl_error, hang, preempted, host_oom, exit_nonzero]
    action: restart
  - when: [nonfinite, spike]
    action: rollback
    margin: 2
    skip_steps: 3
  - when: exception
    action: stop
"""

CONFIG = "train: {steps: 12, batch_size: 8, grad_accum: 1, ckpt_every: 0, sleep: 0.01}\noptim: {lr: 0.1}\n"


@pytest.fixture
def files(write):
    return write("policy.yaml", FAST_POLICY), write("config.yaml", CONFIG)


def test_success_writes_the_run_folder(tmp_path, files):
    policy, config = files
    run = tmp_path / "run"
    p = run_ftrain("run", JOB, "--policy", str(policy), "--config", str(config), "--run-dir", str(run),
                   "--no-ui", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert "finished" in p.stdout  # the child's output passes through
    evts = events(run)
    assert [e["event"] for e in evts] == ["run_start", "attempt_start", "attempt_end", "run_end"]
    assert evts[-1]["status"] == "succeeded"
    assert (run / "run.json").exists() and (run / "attempts/0001/config.yaml").exists()
    assert "finished" in (run / "attempts/0001/output.log").read_text()
    steps = [r["step"] for r in map(__import__("json").loads, (run / "metrics.jsonl").read_text().splitlines())
             if "loss" in r]
    assert steps == list(range(12))


@pytest.mark.parametrize("fault, kind, signal_name", [
    ("segv", "segfault", "SIGSEGV"),
    ("abort", "aborted", "SIGABRT"),
    ("kill", "killed", "SIGKILL"),
    ("cuda", "cuda_error", None),
    ("nccl", "nccl_error", None),
])
def test_crash_kinds_are_classified_and_restarted(tmp_path, files, fault, kind, signal_name):
    policy, config = files
    run = tmp_path / "run"
    p = run_ftrain("run", JOB, "--policy", str(policy), "--config", str(config), "--run-dir", str(run),
                   "--no-ui", "--inject", f"{fault}@5", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    evts = events(run)
    (failure,) = of(evts, "failure")
    assert failure["kind"] == kind and failure["signal"] == signal_name and failure["step"] == 4  # the last step seen
    assert failure["evidence"]
    (decision,) = of(evts, "decision")
    assert decision["action"] == "restart" and decision["rule"] == 2
    assert [e["attempt"] for e in of(evts, "attempt_start")] == [1, 2]
    assert "FTRAIN_INJECT" not in str(of(evts, "attempt_start")[1].get("inject") or "")  # fired once per run


def test_oom_halves_batch_doubles_accum_and_resumes_from_checkpoint(tmp_path, write, files):
    policy, _ = files
    config = write("config.yaml", CONFIG.replace("ckpt_every: 0", "ckpt_every: 4"))
    run = tmp_path / "run"
    p = run_ftrain("run", JOB, "--policy", str(policy), "--config", str(config), "--run-dir", str(run),
                   "--no-ui", "--inject", "oom@6", cwd=tmp_path, timeout=120)
    assert p.returncode == 0, p.stderr
    evts = events(run)
    assert of(evts, "failure")[0]["kind"] == "cuda_oom"
    assert any("CUDA out of memory" in line for line in of(evts, "failure")[0]["evidence"])
    decision = of(evts, "decision")[0]
    assert decision["overrides"] == {"train.batch_size": 4, "train.grad_accum": 2}
    assert decision["resume_step"] == 3 and decision["resume_from"].endswith("step-00000003.pt")
    second = yaml.safe_load((run / "attempts/0002/config.yaml").read_text())
    assert second["train"]["batch_size"] == 4 and second["train"]["grad_accum"] == 2
    log2 = (run / "attempts/0002/output.log").read_text()
    assert "config batch_size=4 grad_accum=2" in log2 and "resumed from step 3" in log2


def test_exception_stops_with_exit_1(tmp_path, files):
    policy, config = files
    run = tmp_path / "run"
    p = run_ftrain("run", JOB, "--policy", str(policy), "--config", str(config), "--run-dir", str(run),
                   "--no-ui", "--inject", "exc@3", cwd=tmp_path)
    assert p.returncode == 1
    evts = events(run)
    assert of(evts, "failure")[0]["kind"] == "exception"
    assert evts[-1]["event"] == "run_end" and evts[-1]["status"] == "stopped"
    assert "says stop" in evts[-1]["reason"] and "says stop" in p.stderr


def test_crash_loop_gives_up_with_a_reason(tmp_path, files):
    policy, config = files
    run = tmp_path / "run"
    p = run_ftrain("run", MISBEHAVE, "--policy", str(policy), "--config", str(config), "--run-dir", str(run),
                   "--no-ui", "--", "exit", "3", cwd=tmp_path)
    assert p.returncode == 1
    evts = events(run)
    assert {f["kind"] for f in of(evts, "failure")} == {"exit_nonzero"}
    assert len(of(evts, "attempt_start")) == 4  # first + 3 restarts without progress
    assert evts[-1]["status"] == "gave_up" and "no progress in 3 restarts" in evts[-1]["reason"]


def test_oom_budget_is_finite(tmp_path, write):
    policy = write("p.yaml", FAST_POLICY.replace("no_progress: 3", "no_progress: 50"))
    config = write("c.yaml", CONFIG)
    run = tmp_path / "run"
    p = run_ftrain("run", JOB, "--policy", str(policy), "--config", str(config), "--run-dir", str(run),
                   "--no-ui", "--inject", "oom@1,oom@2,oom@3,oom@4", cwd=tmp_path)
    assert p.returncode == 1
    evts = events(run)
    assert evts[-1]["status"] == "gave_up" and "budget (2) spent" in evts[-1]["reason"]
    assert len(of(evts, "attempt_start")) == 3


def test_no_stray_processes_after_a_crash(tmp_path, files):
    """A grandchild in a session of its own (as torchrun starts ranks) dies with its attempt."""
    policy, config = files
    run = tmp_path / "run"
    p = run_ftrain("run", JOB, "--policy", str(policy), "--config", str(config), "--run-dir", str(run),
                   "--no-ui", "--inject", "segv@4", "--", "spawn-grandchild", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    pids = [int(m) for m in re.findall(r"grandchild (\d+)", p.stdout)]
    assert len(pids) == 2
    for pid in pids:
        assert not pid_alive(pid), f"grandchild {pid} outlived its attempt"
    assert all(e["strays_killed"] >= 1 for e in of(events(run), "attempt_end"))


def test_hang_that_ignores_sigterm_is_killed(tmp_path, write, files):
    _, config = files
    policy = write("hang.yaml", FAST_POLICY.replace("startup: 60s", "startup: 3s").replace("max_restarts: 6",
                   "max_restarts: 0").replace("timeout: 30s", "timeout: 3s"))
    run = tmp_path / "run"
    t0 = time.monotonic()
    p = run_ftrain("run", MISBEHAVE, "--policy", str(policy), "--config", str(config), "--run-dir", str(run), "--no-ui",
                   "--", "ignore-term-hang", cwd=tmp_path, timeout=120)
    # no metrics ever: the startup allowance (3 s) fires, TERM is ignored, KILL after grace (2 s)
    assert p.returncode == 1
    evts = events(run)
    assert of(evts, "failure")[0]["kind"] == "hang"
    assert "max_restarts (0) spent" in evts[-1]["reason"]
    workers = [int(m) for m in re.findall(r"worker (\d+)", p.stdout)]
    assert workers and not any(pid_alive(w) for w in workers)
    assert time.monotonic() - t0 < 30


def test_hung_shim_child_deaf_to_sigterm_dumps_stacks_and_is_gone(tmp_path, write, files):
    _, config = files
    policy = write("hang.yaml", FAST_POLICY.replace("max_restarts: 6", "max_restarts: 0")
                   .replace("timeout: 30s", "timeout: 3s"))
    run = tmp_path / "run"
    t0 = time.monotonic()
    p = run_ftrain("run", JOB, "--policy", str(policy), "--config", str(config), "--run-dir", str(run), "--no-ui",
                   "--", "hang-ignoring-term", cwd=tmp_path, timeout=60)
    assert p.returncode == 1
    evts = events(run)
    (failure,) = of(evts, "failure")
    assert failure["kind"] == "hang" and failure["step"] == 2
    assert failure["signal"] == "SIGKILL"  # TERM was ignored; KILL after the grace period
    log = (run / "attempts/0001/output.log").read_text()
    assert "most recent call first" in log and "job_train.py" in log  # faulthandler's stacks
    pid = of(evts, "attempt_start")[0]["pid"]
    assert not pid_alive(pid)
    assert time.monotonic() - t0 < 30


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_to_ftrain_reaches_child_first(tmp_path, write, sig, code):
    policy = write("p.yaml", FAST_POLICY.replace("grace: 2s", "grace: 60s"))  # the save imports torch
    config = write("c.yaml", CONFIG.replace("steps: 12", "steps: 100000").replace("ckpt_every: 0", "ckpt_every: 1000"))
    run = tmp_path / "run"
    proc = subprocess.Popen(ftrain_cmd("run", JOB, "--policy", str(policy), "--config", str(config),
                                       "--run-dir", str(run), "--no-ui"),
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = run / "metrics.jsonl"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and (not metrics.exists() or metrics.stat().st_size < 2000):
        time.sleep(0.05)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=90)
    assert proc.returncode == code, err
    assert "stopping at step" in out  # should_stop() turned true and the script saved
    evts = events(run)
    assert evts[-1]["status"] == "interrupted"
    assert list((run / "checkpoints").glob("step-*.pt"))


@pytest.mark.parametrize("args, message", [
    (["run", "missing.py"], "missing.py: script not found"),
    (["run", JOB, "--policy", "nope.yaml"], "nope.yaml: policy file not found"),
    (["run", JOB, "--config", "nope.yaml"], "nope.yaml: config file not found"),
    (["run", JOB, "--set", "train.lr"], "expected KEY=VALUE"),
    (["run", JOB, "--inject", "oom@x"], "--inject"),
    (["run", JOB, "--inject", "boom@3"], "--inject"),
    (["policy", "check", "bad.yaml"], "bad.yaml:3: rules[0].when: unknown failure kind 'segfualt'"),
    (["run", JOB, "--policy", "bad.yaml"], "bad.yaml:3: rules[0].when: unknown failure kind"),
    (["run", JOB, "--policy", "keys.yaml", "--config", "config.yaml"], "'train.micro' is not a key of the config"),
    (["run", JOB, "--config", "broken.yaml"], "broken.yaml:3: malformed YAML"),
    (["run", JOB, "--config", "config.yaml", "--set", "train.nope=1"], "train.nope"),
])
def test_bad_input_is_one_line_exit_2_nothing_launched(tmp_path, write, args, message):
    write("bad.yaml", "version: 1\nrules:\n  - when: segfualt\n    action: restart\n")
    write("keys.yaml", "rules:\n  - when: cuda_oom\n    action: restart\n    set: {train.micro: {scale: 0.5}}\n")
    write("config.yaml", CONFIG)
    write("broken.yaml", "train:\n  steps: [1,\n")
    p = run_ftrain(*args, cwd=tmp_path)
    assert p.returncode == 2, p.stderr
    assert message in p.stderr
    assert "Traceback" not in p.stderr
    assert not (tmp_path / "runs").exists()


def test_finished_run_dir_is_refused(tmp_path, files):
    policy, config = files
    run = tmp_path / "run"
    args = ("run", JOB, "--policy", str(policy), "--config", str(config), "--run-dir", str(run), "--no-ui")
    assert run_ftrain(*args, cwd=tmp_path).returncode == 0
    p = run_ftrain(*args, cwd=tmp_path)
    assert p.returncode == 2 and "already holds a finished run" in p.stderr
    assert len(of(events(run), "run_start")) == 1


def test_policy_check_ok_explains(tmp_path, files):
    policy, config = files
    p = run_ftrain("policy", "check", str(policy), "--config", str(config), cwd=tmp_path)
    assert p.returncode == 0 and "ok" in p.stdout and "rule 1 (restart) when cuda_oom" in p.stdout


def test_a_flood_of_output_does_not_grow_the_supervisor(tmp_path, files):
    """256 MB through the pipe: all of it lands in output.log, none of it stays in memory.
    A wrapper process runs ftrain so that its peak RSS counts only this run's processes."""
    policy, config = files
    run = tmp_path / "run"
    cmd = ftrain_cmd("run", MISBEHAVE, "--policy", str(policy), "--config", str(config), "--run-dir", str(run),
                     "--no-ui", "--", "flood", "4000")
    wrapper = ("import resource, subprocess, sys; "
               f"p = subprocess.run({cmd!r}, stdout=subprocess.DEVNULL); "
               "print(p.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    out = subprocess.run([sys.executable, "-c", wrapper], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    code, peak_kib = map(int, out.stdout.split())
    assert code == 0, out.stderr
    assert (run / "attempts/0001/output.log").stat().st_size == 4000 * 64 * 1024
    assert peak_kib / 1024 < 100, f"a process of the run peaked at {peak_kib / 1024:.0f} MiB"


def test_rollback_quarantines_and_skips_in_the_next_attempt(tmp_path, write, files):
    policy, _ = files
    config = write("c.yaml", CONFIG.replace("steps: 12", "steps: 24").replace("ckpt_every: 0", "ckpt_every: 4"))
    run = tmp_path / "run"
    p = run_ftrain("run", JOB, "--policy", str(policy), "--config", str(config), "--run-dir", str(run),
                   "--no-ui", "--inject", "nan@14", cwd=tmp_path, timeout=120)
    assert p.returncode == 0, p.stderr
    evts = events(run)
    (anomaly,) = of(evts, "anomaly")
    assert anomaly["kind"] == "nonfinite" and anomaly["step"] == 14 and anomaly["metric"] == "loss"
    (decision,) = of(evts, "decision")
    # newest ok checkpoint at or before 14 - margin 2: step 11 (saved at 3, 7, 11)
    assert decision["action"] == "rollback" and decision["resume_step"] == 11
    assert decision["skip_steps"] == ["14-16"]
    second = of(evts, "attempt_start")[1]
    assert second["skip_steps"] == ["14-16"] and second["resume_from"].endswith("step-00000011.pt")
    log2 = (run / "attempts/0002/output.log").read_text()
    assert "resumed from step 11" in log2 and "skipped 14" in log2 and "skipped 16" in log2
    assert "skipped 17" not in log2
    quarantined = sorted(p.name for p in (run / "checkpoints" / "quarantine").glob("*.pt"))
    assert quarantined and all(int(n.split("-")[1].split(".")[0]) > 11 for n in quarantined)


def run_with_the_supervisor_stopped(tmp_path: Path, write, action: str, *args: str) -> tuple[int, list[dict]]:
    """``late_nan.py`` stops its supervisor, logs a NaN at step 5 and exits 0; the supervisor is
    continued once that process is a zombie: the NaN is read only after the exit. The policy's
    rule for nonfinite is ``action``. Returns the exit code and the journal."""
    policy = write("policy.yaml", FAST_POLICY.replace("    action: rollback\n    margin: 2\n    skip_steps: 3\n",
                                                      f"    action: {action}\n"))
    config = write("config.yaml", CONFIG)
    run, pidfile = tmp_path / "run", tmp_path / "pids"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FTRAIN_")}
    p = subprocess.Popen(ftrain_cmd("run", str(CHILDREN / "late_nan.py"), str(pidfile), *args, "--policy", str(policy),
                                    "--config", str(config), "--run-dir", str(run), "--no-ui"),
                         cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not (pidfile.exists() and pidfile.read_text().endswith("\n")) and time.monotonic() < deadline:
            time.sleep(0.01)
        child, supervisor = map(int, pidfile.read_text().split())
        assert supervisor == p.pid
        while pid_alive(child) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not pid_alive(child)
        assert Path(f"/proc/{p.pid}/stat").read_text().split(")")[-1].split()[0] == "T"   # still stopped
    finally:
        os.kill(p.pid, signal.SIGCONT)
    p.communicate(timeout=60)
    return p.returncode, events(run)


def test_a_nan_read_only_after_the_exit_is_acted_on_as_if_read_in_time(tmp_path, write):
    code, evts = run_with_the_supervisor_stopped(tmp_path, write, "restart")
    assert code == 0
    (failure,) = of(evts, "failure")
    assert failure["kind"] == "nonfinite" and failure["step"] == 5 and failure["exit_code"] == 0
    assert of(evts, "decision")[0]["action"] == "restart"
    assert len(of(evts, "attempt_start")) == 2 and evts[-1]["status"] == "succeeded"


def test_a_late_nan_before_a_crash_is_the_failure_with_the_crash_after_it(tmp_path, write):
    code, evts = run_with_the_supervisor_stopped(tmp_path, write, "restart", "segv")
    assert code == 0
    (failure,) = of(evts, "failure")
    assert failure["kind"] == "nonfinite" and failure["step"] == 5 and failure["signal"] == "SIGSEGV"
    assert "then the script ended: segfault" in failure["evidence"]


def test_an_ignored_nan_read_only_after_the_exit_is_journaled_as_ignored(tmp_path, write):
    code, evts = run_with_the_supervisor_stopped(tmp_path, write, "ignore")
    assert code == 0
    (anomaly,) = of(evts, "anomaly")
    assert anomaly["step"] == 5 and anomaly["action"] == "ignore"
    assert not of(evts, "failure") and len(of(evts, "attempt_start")) == 1


def test_ignore_action_journals_the_anomaly_and_keeps_training(tmp_path, write, files):
    _, config = files
    policy = write("ignore.yaml", FAST_POLICY.replace("  - when: [nonfinite, spike]\n    action: rollback\n"
                                                       "    margin: 2\n    skip_steps: 3\n",
                                                       "  - when: [nonfinite, spike]\n    action: ignore\n"))
    run = tmp_path / "run"
    p = run_ftrain("run", JOB, "--policy", str(policy), "--config", str(config), "--run-dir", str(run),
                   "--no-ui", "--inject", "nan@5", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    evts = events(run)
    (anomaly,) = of(evts, "anomaly")
    assert anomaly["action"] == "ignore" and anomaly["step"] == 5
    assert len(of(evts, "attempt_start")) == 1 and evts[-1]["status"] == "succeeded"
    assert "ignored by policy" in p.stderr
