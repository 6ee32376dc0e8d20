"""State that survives: retention, resume after kill -9, preemption, locks, inspect."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import CHILDREN, events, ftrain_cmd, of, pid_alive, run_ftrain

JOB = str(CHILDREN / "job_train.py")
POLICY = """
version: 1
max_restarts: 5
no_progress: 3
grace: 20s
backoff: 0s
detect: {hang: {timeout: 10s, startup: 60s}}
checkpoints: {keep_last: 2, keep_every: 10, keep_best: {metric: loss, mode: min}}
rules:
  - when: [nonfinite, spike]
    action: rollback
    margin: 5
  - when: [segfault, aborted, killed, exit_nonzero, preempted, hang]
    action: restart
  - when: exception
    action: stop
"""


def config(steps: int, every: int, sleep: float = 0.01) -> str:
    return f"train: {{steps: {steps}, batch_size: 8, grad_accum: 1, ckpt_every: {every}, sleep: {sleep}}}\n" \
           "optim: {lr: 0.1}\n"


def wait_for_step(run: Path, step: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    metrics = run / "metrics.jsonl"
    while time.monotonic() < deadline:
        if metrics.exists():
            for line in metrics.read_text().splitlines()[-5:]:
                try:
                    if (json.loads(line).get("step") or -1) >= step:
                        return
                except ValueError:
                    pass
        time.sleep(0.05)
    raise AssertionError(f"step {step} never came")


def steps_of(run: Path, attempt: int) -> list[int]:
    out = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec.get("attempt") == attempt and "loss" in rec:
            out.append(rec["step"])
    return out


def test_retention_keeps_last_every_best_and_what_rollback_needs(tmp_path, write):
    policy, cfg = write("p.yaml", POLICY), write("c.yaml", config(30, 1))
    run = tmp_path / "run"
    p = run_ftrain("run", JOB, "--policy", str(policy), "--config", str(cfg), "--run-dir", str(run), "--no-ui",
                   cwd=tmp_path, timeout=120)
    assert p.returncode == 0, p.stderr
    kept = sorted(int(f.stem.split("-")[1]) for f in (run / "checkpoints").glob("step-*.pt"))
    # loss = 1/(s+1) + 0.01*(s%3): the best is step 27; last two 28, 29; every 10: 0, 10, 20;
    # and always one at least `margin` (5) behind the newest step, for a rollback
    assert {0, 10, 20, 27, 28, 29} <= set(kept)
    assert any(s <= 29 - 5 for s in kept)
    assert len(kept) < 10
    assert all((run / "checkpoints" / f"step-{s:08d}.json").exists() for s in kept)
    text = run_ftrain("inspect", str(run / "checkpoints"), cwd=tmp_path).stdout
    assert "★ the best by the policy's keep_best" in text and "step-00000027.pt (step 27)" in text


def test_kill_9_of_the_supervisor_then_resume_finishes_without_a_second_trainer(tmp_path, write):
    policy = write("p.yaml", POLICY.replace("grace: 20s", "grace: 3s"))
    cfg = write("c.yaml", config(600, 10, 0.02))
    run = tmp_path / "run"
    proc = subprocess.Popen(ftrain_cmd("run", JOB, "--policy", str(policy), "--config", str(cfg),
                                       "--run-dir", str(run), "--no-ui", "--", "deaf-to-term"),
                            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_step(run, 45)
    child = of(events(run), "attempt_start")[0]["pid"]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert pid_alive(child)  # deaf to SIGTERM: the orphan trains on
    p = run_ftrain("resume", str(run), "--no-ui", cwd=tmp_path, timeout=120)
    assert p.returncode == 0, p.stderr
    assert not pid_alive(child)
    evts = events(run)
    lost = [e for e in of(evts, "attempt_end") if e.get("supervisor_lost")]
    assert lost and lost[0]["orphan_stopped"] is True
    second = of(evts, "attempt_start")[-1]
    assert second["attempt"] == 2 and second["resume_step"] >= 39
    assert steps_of(run, 2)[0] == second["resume_step"] + 1  # no lost steps beyond the checkpoint
    assert evts[-1]["event"] == "run_end" and evts[-1]["status"] == "succeeded"
    # the second trainer only started after the first was gone
    first_lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    last_t_1 = max(r["t"] for r in first_lines if r.get("attempt") == 1)
    first_t_2 = min(r["t"] for r in first_lines if r.get("attempt") == 2)
    assert last_t_1 < first_t_2


def test_sigterm_preemption_then_resume_continues_from_the_save(tmp_path, write):
    policy, cfg = write("p.yaml", POLICY), write("c.yaml", config(120, 50, 0.02))
    run = tmp_path / "run"
    proc = subprocess.Popen(ftrain_cmd("run", JOB, "--policy", str(policy), "--config", str(cfg),
                                       "--run-dir", str(run), "--no-ui"),
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_step(run, 20)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=90)
    assert proc.returncode == 143, err
    evts = events(run)
    assert of(evts, "failure")[-1]["kind"] == "preempted"
    assert evts[-1]["status"] == "interrupted"
    stopped_at = of(evts, "attempt_end")[-1]["last_step"]
    assert (run / "checkpoints" / f"step-{stopped_at:08d}.pt").exists()  # saved at should_stop()
    p = run_ftrain("resume", str(run), "--no-ui", cwd=tmp_path, timeout=120)
    assert p.returncode == 0, p.stderr
    assert steps_of(run, 2)[0] == stopped_at + 1
    assert events(run)[-1]["status"] == "succeeded"


def test_a_run_that_gave_up_resumes_only_with_a_new_budget(tmp_path, write):
    policy = write("p.yaml", POLICY.replace("no_progress: 3", "no_progress: 10").replace("max_restarts: 5",
                                                                                        "max_restarts: 1"))
    cfg = write("c.yaml", config(5, 0))
    run = tmp_path / "run"
    args = ("run", str(CHILDREN / "job_misbehave.py"), "--policy", str(policy), "--config", str(cfg),
            "--run-dir", str(run), "--no-ui", "--", "exit", "3")
    assert run_ftrain(*args, cwd=tmp_path).returncode == 1
    p = run_ftrain("resume", str(run), "--no-ui", cwd=tmp_path)
    assert p.returncode == 2 and "give it a new budget with --max-restarts" in p.stderr
    p = run_ftrain("resume", str(run), "--no-ui", "--max-restarts", "1", cwd=tmp_path)
    assert p.returncode == 1
    evts = events(run)
    assert [e["attempt"] for e in of(evts, "attempt_start")] == [1, 2, 3, 4]
    assert evts[-1]["status"] == "gave_up"


def test_torn_journal_line_is_ignored_on_resume(tmp_path, write):
    policy, cfg = write("p.yaml", POLICY), write("c.yaml", config(10, 5))
    run = tmp_path / "run"
    proc = subprocess.Popen(ftrain_cmd("run", JOB, "--policy", str(policy), "--config", str(cfg),
                                       "--run-dir", str(run), "--no-ui"), cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_step(run, 2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with open(run / "journal.jsonl", "a") as f:
        f.write('{"t": 1, "event": "deci')  # power loss mid-line
    p = run_ftrain("resume", str(run), "--no-ui", cwd=tmp_path, timeout=120)
    assert p.returncode == 0, p.stderr
    assert events_tolerant(run)[-1]["status"] == "succeeded"


def events_tolerant(run: Path) -> list[dict]:
    out = []
    for line in (run / "journal.jsonl").read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            pass
    return out


def test_two_supervisors_never_share_a_run_folder(tmp_path, write):
    policy, cfg = write("p.yaml", POLICY), write("c.yaml", config(400, 0, 0.02))
    run = tmp_path / "run"
    proc = subprocess.Popen(ftrain_cmd("run", JOB, "--policy", str(policy), "--config", str(cfg),
                                       "--run-dir", str(run), "--no-ui"), cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_step(run, 2)
        p = run_ftrain("resume", str(run), "--no-ui", cwd=tmp_path)
        assert p.returncode == 2 and f"in use by a running supervisor (pid {proc.pid})" in p.stderr
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("setup, message", [
    (lambda run: None, "no such folder"),
    (lambda run: run.mkdir(), "not a run folder"),
])
def test_resume_refuses_what_is_not_a_run(tmp_path, setup, message):
    run = tmp_path / "run"
    setup(run)
    p = run_ftrain("resume", str(run), cwd=tmp_path)
    assert p.returncode == 2 and message in p.stderr and "Traceback" not in p.stderr


def test_resume_refuses_a_journal_from_a_newer_ftrain(tmp_path, write):
    policy, cfg = write("p.yaml", POLICY), write("c.yaml", config(3, 0))
    run = tmp_path / "run"
    assert run_ftrain("run", JOB, "--policy", str(policy), "--config", str(cfg), "--run-dir", str(run),
                      "--no-ui", "--inject", "kill@1", cwd=tmp_path).returncode == 0
    lines = (run / "journal.jsonl").read_text().splitlines()
    first = json.loads(lines[0])
    first["journal_version"] = 99
    lines = [json.dumps(first)] + [x for x in lines[1:] if '"run_end"' not in x]
    (run / "journal.jsonl").write_text("\n".join(lines) + "\n")
    p = run_ftrain("resume", str(run), cwd=tmp_path)
    assert p.returncode == 2 and "newer ftrain" in p.stderr


def test_inspect_shows_every_checkpoint_status(tmp_path):
    ckdir = tmp_path / "ck"
    code = f"""
import os
os.environ.update(FTRAIN_RUN_DIR={str(tmp_path)!r}, FTRAIN_CHECKPOINT_DIR={str(ckdir)!r},
                  FTRAIN_METRICS_PATH={str(tmp_path / 'm.jsonl')!r}, FTRAIN_ATTEMPT="1")
import torch, ftrain
for step in (10, 20, 30, 40):
    ftrain.log(step, loss=1.0 / step)
    ftrain.save_checkpoint({{"w": torch.ones(1000) * step}}, step)
"""
    subprocess.run([os.sys.executable, "-c", code], check=True, cwd=tmp_path)
    data = ckdir / "step-00000020.pt"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))                                        # corrupt
    from ftrain import checkpoints
    checkpoints.quarantine(ckdir, after_step=35)                         # 40 → quarantined
    (ckdir / ".tmp-step-00000050.pt.12345").write_bytes(b"half a save")  # partial
    subprocess.run([os.sys.executable, "-c", "import torch; torch.save({'x': 1}, 'ck/model_step35.pt')"],
                   check=True, cwd=tmp_path)                            # unverified (another tool's)
    p = run_ftrain("inspect", str(ckdir), "--json", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    status = {(Path(c["path"]).name, c["status"]) for c in json.loads(p.stdout)}
    assert ("step-00000010.pt", "ok") in status and ("step-00000030.pt", "ok") in status
    assert ("step-00000020.pt", "corrupt") in status
    assert any(s == "partial" for _, s in status)
    assert any(s == "quarantined" and "00000040" in n for n, s in status)
    for c in json.loads(p.stdout):
        assert {"path", "step", "status", "bytes", "attempt", "metrics"} <= set(c)
    text = run_ftrain("inspect", str(ckdir), cwd=tmp_path).stdout
    for word in ("ok", "corrupt", "partial", "unverified", "quarantined", "a restart would resume from"):
        assert word in text
    assert "model_step35.pt (step 35)" in text  # the unverified one is the newest usable


def test_inspect_run_story_and_plot(tmp_path, write):
    policy, cfg = write("p.yaml", POLICY), write("c.yaml", config(30, 5))
    run = tmp_path / "run"
    assert run_ftrain("run", JOB, "--policy", str(policy), "--config", str(cfg), "--run-dir", str(run), "--no-ui",
                      "--inject", "segv@12,nan@22", cwd=tmp_path, timeout=120).returncode == 0
    p = run_ftrain("inspect", str(run), "--json", cwd=tmp_path)
    story = json.loads(p.stdout)
    assert story["status"] == "succeeded" and 0 < story["goodput"] <= 1
    kinds = [a["kind"] for a in story["attempts"]]
    assert kinds == ["segfault", "nonfinite", None]
    assert story["attempts"][0]["steps_lost"] == 2   # steps 10, 11 redone after resuming from 9
    assert story["attempts"][1]["decision"] == "rollback"
    text = run_ftrain("inspect", str(run), cwd=tmp_path).stdout
    assert "goodput" in text and "segfault" in text and "rollback" in text
    pytest.importorskip("matplotlib")
    png = tmp_path / "run.png"
    assert run_ftrain("inspect", str(run), "--plot", str(png), cwd=tmp_path).returncode == 0
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_a_fault_that_fired_is_removed_once_and_only_it():
    """Resume takes fired faults from the metrics stream: the same report read twice must not
    remove a later fault of the same kind."""
    from ftrain.inject import parse_inject
    from ftrain.state import remove_fault

    faults = list(parse_inject("oom@1,oom@3,segv@5"))
    left = remove_fault(faults, "oom", 1)
    assert [str(f) for f in left] == ["oom@3", "segv@5"]
    assert remove_fault(left, "oom", 1) == left          # already gone: nothing else goes
    assert [str(f) for f in remove_fault(left, "oom", None)] == ["segv@5"]


def test_resume_keeps_the_faults_that_did_not_fire(tmp_path, write):
    policy, cfg = write("p.yaml", POLICY), write("c.yaml", config(400, 0, 0.02))
    run = tmp_path / "run"
    proc = subprocess.Popen(ftrain_cmd("run", JOB, "--policy", str(policy), "--config", str(cfg),
                                       "--run-dir", str(run), "--no-ui", "--inject", "kill@3,kill@300"),
                            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_step(run, 20)  # kill@3 fired in attempt 1; attempt 2 is running
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    p = run_ftrain("resume", str(run), "--no-ui", cwd=tmp_path, timeout=120)
    assert p.returncode == 0, p.stderr
    starts = of(events(run), "attempt_start")
    assert starts[-2]["inject"] == "kill@300"  # the resumed attempt still has the one to come
    assert [f["kind"] for f in of(events(run), "failure")] == ["killed", "preempted", "killed"]


def test_a_relative_run_folder_resumes_from_another_folder_with_the_policy_it_started_with(tmp_path, write):
    """Paths typed relative at `run` time, resumed from elsewhere: the resume point, the
    config and the policy are the run's own (absolute paths and the policy copy in the run
    folder), not whatever the new working folder holds."""
    here, there = tmp_path / "here", tmp_path / "there"
    here.mkdir()
    there.mkdir()
    (here / "p.yaml").write_text(POLICY)
    (here / "c.yaml").write_text(config(120, 50, 0.02))
    (there / "p.yaml").write_text("version: 1\nmax_restarts: 0\nrules: []\n")   # a different policy, same name
    proc = subprocess.Popen(ftrain_cmd("run", JOB, "--policy", "p.yaml", "--config", "c.yaml",
                                       "--run-dir", "runs/r1", "--no-ui"),
                            cwd=here, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run = here / "runs/r1"
    wait_for_step(run, 20)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=90)
    assert proc.returncode == 143, err
    stopped_at = of(events(run), "attempt_end")[-1]["last_step"]
    p = run_ftrain("resume", "../here/runs/r1", "--no-ui", cwd=there, timeout=120)
    assert p.returncode == 0, p.stderr
    second = of(events(run), "attempt_start")[-1]
    assert Path(second["resume_from"]).resolve() == (run / "checkpoints" / f"step-{stopped_at:08d}.pt").resolve()
    assert steps_of(run, 2)[0] == stopped_at + 1 and events(run)[-1]["status"] == "succeeded"
    assert (run / "policy.yaml").read_text() == POLICY   # the copy it resumed with
