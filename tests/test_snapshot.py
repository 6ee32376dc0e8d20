"""ftrain.snapshot: a copy of the state in host memory that survives the crash of the child."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from conftest import CHILDREN, events, of, run_ftrain

from ftrain.memtier import MemoryTier

JOB = str(CHILDREN / "snap_train.py")
POLICY = """version: 1
max_restarts: 8
backoff: 0s
detect: {nonfinite: [loss]}
rules:
  - when: [segfault, aborted, killed, cuda_oom]
    action: restart
  - when: nonfinite
    action: rollback
    margin: 5
"""


def logged_steps(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
            if '"loss"' in line]


def redone(run: Path) -> list[int]:
    """Steps logged again by each restart: the work a crash cost."""
    evts = events(run)
    out = []
    for fail, nxt in zip(of(evts, "failure"), of(evts, "attempt_start")[1:]):
        out.append(fail["step"] - (nxt["resume_step"] if nxt["resume_step"] is not None else -1))
    return out


@pytest.fixture
def job(tmp_path: Path) -> Path:
    (tmp_path / "p.yaml").write_text(POLICY)
    return tmp_path


@pytest.mark.parametrize("fault, kind", [("segv", "segfault"), ("kill", "killed"), ("abort", "aborted"),
                                         ("oom", "cuda_oom")])
def test_a_snapshot_survives_the_crash_and_the_restart_resumes_from_it_exactly(job: Path, fault: str,
                                                                              kind: str) -> None:
    p = run_ftrain("run", JOB, "--policy", "p.yaml", "--run-dir", "run", "--no-ui", "--inject", f"{fault}@30",
                   cwd=job, timeout=180)
    assert p.returncode == 0, p.stderr[-3000:]
    run = job / "run"
    assert [f["kind"] for f in of(events(run), "failure")] == [kind]
    start = of(events(run), "attempt_start")[1]
    assert start["resume_step"] is not None and start["resume_step"] > 0      # not the durable step 0
    # (the budget, <= 3 steps per crash, is measured by scripts/bench.py; without snapshots
    # this crash would redo 30 steps, back to the durable save of step 0)
    assert redone(run) and max(redone(run)) < 15, redone(run)
    manifest = json.loads((run / "checkpoints" / f"step-{start['resume_step']:08d}.json").read_text())
    assert manifest["tier"] == "memory"
    assert set(logged_steps(run)) == set(range(100))          # the child asserted its state at every step
    assert "snapshot of step" in p.stderr
    assert f"step-{start['resume_step']:08d}.pt read from host memory" in p.stderr   # not from disk
    assert not MemoryTier(run).dir.exists()                     # the shared memory is gone after the run


def test_four_crashes_each_resume_from_a_snapshot(job: Path) -> None:
    p = run_ftrain("run", JOB, "--policy", "p.yaml", "--run-dir", "run", "--no-ui",
                   "--inject", "segv@15,kill@35,abort@55,oom@75", cwd=job, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    costs = redone(job / "run")
    assert len(costs) == 4 and max(costs) < 15 and min(costs) >= 0, costs


def test_a_nan_never_resumes_from_a_poisoned_snapshot(job: Path) -> None:
    p = run_ftrain("run", JOB, "--policy", "p.yaml", "--run-dir", "run", "--no-ui", "--inject", "nan@70",
                   cwd=job, timeout=180)
    assert p.returncode == 0, p.stderr[-3000:]
    run = job / "run"
    decision = of(events(run), "decision")[0]
    assert decision["action"] == "rollback" and decision["resume_step"] == 50   # the durable one, margin 5
    for manifest in (run / "checkpoints").glob("step-*.json"):
        meta = json.loads(manifest.read_text())
        assert not (meta.get("tier") == "memory" and meta["step"] > 65), meta


def test_without_the_supervisor_snapshot_does_nothing(tmp_path: Path) -> None:
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("FTRAIN_")}
    code = "import ftrain, torch; print(ftrain.snapshot({'w': torch.zeros(3)}, 1))"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, env=env,
                         timeout=60)
    assert out.stdout.strip() == "False" and not any(tmp_path.iterdir())


def test_the_overhead_budget_spaces_snapshots(tmp_path: Path) -> None:
    """With steps far shorter than a snapshot's copy, most calls are refused at once."""
    import subprocess
    import sys

    shm = MemoryTier(tmp_path / "run")
    assert shm.open()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FTRAIN_")}
    env.update(shm.env(), FTRAIN_RUN_DIR=str(tmp_path / "run"), FTRAIN_METRICS_PATH=str(tmp_path / "m.jsonl"),
               FTRAIN_ATTEMPT="1")
    code = """
import time, torch, ftrain
w = torch.zeros(4_000_000)
taken, blocked = 0, 0.0
for step in range(200):
    t = time.perf_counter()
    taken += ftrain.snapshot({"w": w, "step": step}, step)
    blocked += time.perf_counter() - t
    time.sleep(0.001)
print(taken, blocked)
"""
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
        taken, blocked = out.stdout.split()
        assert 1 <= int(taken) < 50, out.stdout
        names = sorted(os.listdir(shm.dir))
        assert len([n for n in names if n.endswith(".pt")]) == 1, names    # the newest complete only
    finally:
        shm.release()
    assert not shm.dir.exists()


@pytest.mark.parametrize("value, share", [("2%", 0.02), ("0.5 %", 0.005), (0.05, 0.05), (1, 1.0)])
def test_snapshot_overhead_is_a_percentage_or_a_fraction(value: object, share: float) -> None:
    from ftrain.policyfile import parse_policy

    assert parse_policy("version: 1\n", "p.yaml").checkpoints.snapshot_overhead == 0.02
    assert parse_policy(f"version: 1\ncheckpoints:\n  snapshot_overhead: {value}\n",
                        "p.yaml").checkpoints.snapshot_overhead == pytest.approx(share)


@pytest.mark.parametrize("value", ["lots", "0%", "150%", "2", "-0.1", "true", "x%"])
def test_a_bad_snapshot_overhead_is_a_one_line_error_and_exit_2(job: Path, value: str) -> None:
    (job / "bad.yaml").write_text(f"version: 1\ncheckpoints:\n  keep_last: 3\n  snapshot_overhead: {value}\n")
    p = run_ftrain("run", JOB, "--policy", "bad.yaml", "--run-dir", "run", "--no-ui", cwd=job, timeout=60)
    assert p.returncode == 2, p.stderr
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "bad.yaml:4: checkpoints.snapshot_overhead: must be a share" in lines[0], p.stderr
    assert not (job / "run" / "journal.jsonl").exists()          # nothing was launched


def test_a_lower_overhead_budget_takes_fewer_snapshots(job: Path) -> None:
    taken = {}
    for name, budget in (("default", None), ("low", "0.01%")):
        policy = POLICY + (f"checkpoints: {{snapshot_overhead: {budget}}}\n" if budget else "")
        (job / f"{name}.yaml").write_text(policy)
        p = run_ftrain("run", JOB, "--policy", f"{name}.yaml", "--run-dir", name, "--no-ui",
                       "--set", "train.steps=40", cwd=job, timeout=120)
        assert p.returncode == 0, p.stderr[-3000:]
        out = (job / name / "attempts" / "0001" / "output.log").read_text()
        taken[name] = int(out.split("done; ")[1].split()[0])
    # 2 %: a 4 MB copy blocks ~0.5-2 ms, so most of the 40 steps of 50 ms are snapshotted;
    # 0.01 %: the next one waits 5-20 s, longer than the job
    assert taken["default"] >= 15 and taken["low"] <= 2, taken


def test_inspect_shows_the_memory_tier_live_and_the_checkpoint_promoted_from_it(job: Path) -> None:
    import subprocess
    import time

    from conftest import ftrain_cmd

    env = {k: v for k, v in os.environ.items() if not k.startswith("FTRAIN_")}
    child = subprocess.Popen(ftrain_cmd("run", JOB, "--policy", "p.yaml", "--run-dir", "run", "--no-ui",
                                        "--inject", "kill@30", "--set", "train.steps=120"),
                             cwd=job, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    run = job / "run"
    tier = MemoryTier(run)
    try:
        deadline = time.monotonic() + 60
        live = None
        while time.monotonic() < deadline and child.poll() is None:
            held = [n for n in os.listdir(tier.dir) if n.endswith(".pt")] if tier.dir.is_dir() else []
            if held:
                out = run_ftrain("inspect", "run", "--json", cwd=job, timeout=60)
                assert out.returncode == 0, out.stderr
                live = json.loads(out.stdout)["memory"]
                break
            time.sleep(0.05)
        assert live is not None, "no snapshot appeared in the memory tier"
        assert live["dir"] == str(tier.dir) and live["exists"]
        assert live["snapshots"] >= 1 and live["bytes"] >= 4_000_000, live   # a 4 MB tensor held in RAM
        _, err = child.communicate(timeout=120)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == 0, err[-3000:]
    resumed = of(events(run), "attempt_start")[1]["resume_step"]
    assert resumed is not None and resumed > 0
    out = run_ftrain("inspect", "run", "--json", cwd=job, timeout=60)
    assert out.returncode == 0, out.stderr
    after = json.loads(out.stdout)["memory"]
    assert not after["exists"] and after["bytes"] == 0 and after["snapshots"] == 0      # released at the end
    [promoted] = [p for p in after["promoted"] if p["step"] == resumed]
    assert promoted["status"] == "ok" and promoted["disk_step_before"] == 0
    assert promoted["steps_saved"] == resumed
    text = run_ftrain("inspect", "run", cwd=job, timeout=60)
    assert text.returncode == 0, text.stderr
    assert "memory tier: nothing held in host memory (released)" in text.stdout
    assert f"step {resumed} promoted from memory (ok): {resumed} step(s) not redone (disk had step 0)" \
        in text.stdout
    listing = json.loads(run_ftrain("inspect", "run/checkpoints", "--json", cwd=job, timeout=60).stdout)
    tiers = {c["step"]: c["tier"] for c in listing}
    assert tiers[resumed] == "memory" and tiers[0] == "disk", tiers


def test_a_hang_resumes_from_the_snapshot_of_the_last_step_it_logged(job: Path) -> None:
    """A hung job's state is sound (unlike a NaN's): its newest snapshot is used."""
    (job / "hang.yaml").write_text(POLICY.replace("detect: {nonfinite: [loss]}",
                                                  "detect: {nonfinite: [loss], hang: {timeout: 2s, startup: 60s}}")
                                   .replace("[segfault, aborted, killed, cuda_oom]", "[hang]") + "grace: 1s\n")
    p = run_ftrain("run", JOB, "--policy", "hang.yaml", "--run-dir", "run", "--no-ui", "--inject", "hang@30",
                   "--set", "train.steps=40", cwd=job, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    run = job / "run"
    [failure] = of(events(run), "failure")
    assert failure["kind"] == "hang" and failure["step"] == 29
    resumed = of(events(run), "attempt_start")[1]["resume_step"]
    assert resumed is not None and resumed >= 25, resumed          # not the durable step 0
    assert json.loads((run / "checkpoints" / f"step-{resumed:08d}.json").read_text())["tier"] == "memory"
    assert set(logged_steps(run)) == set(range(40))


def test_the_demo_job_snapshots_every_step_and_a_kill_costs_at_most_a_few_steps(tmp_path: Path) -> None:
    """scripts/train_charlm.py (the demo) under a SIGKILL: the restart resumes from the
    snapshot promoted from memory, and the loss after it is the fault-free run's."""
    root = Path(__file__).resolve().parents[1]
    curve = json.loads((root / "tests" / "data" / "demo_loss.json").read_text())   # demo.yaml, no fault
    p = run_ftrain("run", str(root / "scripts" / "train_charlm.py"), "--config", str(root / "configs" / "demo.yaml"),
                   "--policy", str(root / "configs" / "policy.demo.yaml"), "--set", "train.steps=45",
                   "--inject", "kill@35", "--run-dir", "run", "--no-ui", cwd=tmp_path, timeout=180)
    assert p.returncode == 0, p.stderr[-3000:]
    run = tmp_path / "run"
    assert [f["kind"] for f in of(events(run), "failure")] == ["killed"]
    assert redone(run) and redone(run)[0] <= 3, redone(run)                # not back to step 24 on disk
    resumed = of(events(run), "attempt_start")[1]["resume_step"]
    assert f"step-{resumed:08d}.pt read from host memory" in p.stderr
    losses = {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
              if "loss" in r and r["attempt"] == 2}
    assert sorted(losses) == list(range(resumed + 1, 45))
    assert all(abs(losses[s] - curve[s]) < 6e-5 for s in losses), [(s, losses[s], curve[s]) for s in losses]
    story = run_ftrain("inspect", "run", cwd=tmp_path, timeout=60).stdout
    assert f"step {resumed} promoted from memory (ok): " in story


def test_the_snapshot_bench_runs_and_finds_the_state_exact(tmp_path: Path) -> None:
    """scripts/bench.py's snapshot section (--quick): 4 real crashes with and without snapshots."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("FTRAIN_")}
    env["PYTHONPATH"] = str(root)
    p = subprocess.run([sys.executable, str(root / "scripts" / "bench.py"), "--only", "snapshot", "--quick",
                        "--json", str(tmp_path / "b.json")], cwd=tmp_path, capture_output=True, text=True,
                       env=env, timeout=240)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    figures = json.loads((tmp_path / "b.json").read_text())
    assert figures["snapshot_state_exact"] is True, p.stdout
    assert figures["snapshot_steps_redone_per_crash"] <= 3, p.stdout
    assert 0 < figures["snapshot_blocking_share_pct"] < 50, p.stdout
    assert "checkpoints every 50 steps alone: [36, 16, 46, 26]" in p.stdout     # the same crashes, from disk


def test_a_tier_whose_run_folder_is_gone_is_swept_and_a_resumable_ones_kept(tmp_path: Path) -> None:
    """A supervisor killed outright leaves its tier for `resume`; once its run folder is
    deleted nothing will resume it, and the next run's tier removes it (its RAM back)."""
    root = tmp_path / "shm"
    root.mkdir()
    live, gone = tmp_path / "live", tmp_path / "gone"
    for run in (live, gone):
        run.mkdir()
        (run / "journal.jsonl").write_text("")
        tier = MemoryTier(run, root=root)
        assert tier.open()
        (tier.dir / "step-00000003.pt").write_bytes(b"x" * 1000)   # left by a killed supervisor
    stranger = root / f"ftrain-{os.getuid()}-0000000000000000"     # no owner note: not ours to judge
    stranger.mkdir()
    shutil.rmtree(gone)
    kept, swept = MemoryTier(live, root=root).dir, MemoryTier(gone, root=root).dir
    new = MemoryTier(tmp_path / "new", root=root)
    assert new.open()
    assert kept.exists() and (kept / "step-00000003.pt").exists() and stranger.exists()
    assert not swept.exists()
    new.clear()
    assert (new.dir / ".run-dir").read_text() == str((tmp_path / "new").absolute())
