"""A run folder under hostile conditions (issue 11): floods, full disks, read-only media, stray
and bad checkpoints, folders that never started, files planted to make ftrain write elsewhere."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import CHILDREN, events, ftrain_cmd, of, pid_alive, run_ftrain

from ftrain import tail
from ftrain.intake import ShimTalk

JOB = str(CHILDREN / "job_train.py")
ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="mounting a small tmpfs needs root (CI runs as root)")

STOP_ON_NAN = """
version: 1
max_restarts: 2
grace: 5s
backoff: 0s
detect: {hang: {timeout: 60s, startup: 60s}}
rules:
  - when: [nonfinite]
    action: stop
  - when: [exit_nonzero, killed, exception]
    action: restart
"""

FLOOD = """
import os, sys, time
n = int(sys.argv[1])
fd = os.open(os.environ["FTRAIN_METRICS_PATH"], os.O_WRONLY | os.O_APPEND)
t = time.time()
for start in range(0, n, 20000):
    os.write(fd, "".join(f'{{"step": {s}, "t": {t}, "attempt": 1, "loss": 0.5}}\\n'
                         for s in range(start, min(n, start + 20000))).encode())
os.write(fd, f'{{"step": {n}, "t": {time.time()}, "attempt": 1, "loss": NaN}}\\n'.encode())
if sys.argv[2] == "stay":
    time.sleep(60)
"""


def cfg(tmp_path: Path, steps: int, every: int, sleep: float = 0.01) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(f"train: {{steps: {steps}, batch_size: 8, grad_accum: 1, ckpt_every: {every}, "
                    f"sleep: {sleep}}}\noptim: {{lr: 0.1}}\n")
    return path


def hwm_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM"))
    except (OSError, StopIteration):
        return 0


@contextlib.contextmanager
def tmpfs(path: Path, size: str = "2m") -> Iterator[Path]:
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


# ------------------------------------------------------------------------ bounded memory
def test_the_tailer_reads_a_backlog_in_bounded_batches_and_misses_nothing(tmp_path):
    path = tmp_path / "m.jsonl"
    n = 200_000
    path.write_text("".join(f'{{"step": {s}, "loss": 0.5}}\n' for s in range(n)))
    size = path.stat().st_size
    seen: list[int] = []
    reads = 0
    with tail.Tailer(path) as tailer:
        while True:
            before = tailer.offset
            batch = tailer.read_new()
            reads += 1
            assert tailer.offset - before <= tail.BATCH
            seen += [r["step"] for r in batch]
            if not tailer.backlog:
                break
    assert seen == list(range(n)) and reads >= size // tail.BATCH


@pytest.mark.parametrize("then", ["stay", "exit"])
def test_a_flood_of_millions_of_lines_keeps_the_supervisor_small_and_its_nan_is_acted_on(tmp_path, write, then):
    """DESIGN §9: ≤ 60 MiB resident under any metrics flood. Measured here: ~33 MiB for 2.5
    million lines (310 MiB for 2 million before the tailer read in batches)."""
    policy, child = write("p.yaml", STOP_ON_NAN), write("flood.py", FLOOD)
    n = 2_500_000 if then == "stay" else 1_500_000
    run = tmp_path / "run"
    proc = subprocess.Popen(ftrain_cmd("run", str(child), "--policy", str(policy), "--run-dir", str(run),
                                       "--no-ui", "--", str(n), then),
                            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, hwm_kib(proc.pid))
        time.sleep(0.02)
    err = proc.stderr.read() if proc.stderr else ""
    assert proc.returncode == 1, err
    anomaly = of(events(run), "anomaly")
    assert anomaly and anomaly[0]["kind"] == "nonfinite" and anomaly[0]["step"] == n
    print(f"supervisor peak RSS (VmHWM) under a flood of {n} lines: {peak / 1024:.1f} MiB")
    assert 0 < peak <= 60 * 1024
    assert not pid_alive(of(events(run), "attempt_start")[0]["pid"])


# ------------------------------------------------------------------------ full disk, read-only
WAITER = """
import os, sys, time
import ftrain
attempt = int(os.environ["FTRAIN_ATTEMPT"])
for s in range(5):
    ftrain.log(s, loss=1.0)
go = sys.argv[1]
while attempt == 1 and not os.path.exists(go):
    time.sleep(0.01)
ftrain.log(5, loss=float("nan") if attempt == 1 else 1.0)
for s in range(6, 400):
    if ftrain.should_stop():
        sys.exit(0)
    time.sleep(0.005)
    if attempt > 1:
        ftrain.log(s, loss=1.0)
"""


def _fill(mount: Path) -> Path:
    """Fill the file system to its last page: whole pages first, then the slack of the
    journal and metrics files' last pages with blank lines (which readers skip)."""
    filler = mount / "filler"
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:
            pass
    for name in ("journal.jsonl", "metrics.jsonl"):
        path = mount / "run" / name
        with open(path, "ab", buffering=0) as f:
            f.write(b"\n" * (-path.stat().st_size % 4096))
    return filler


@needs_root
def test_journal_write_on_a_full_disk_stops_the_child_says_where_and_exits_3(tmp_path, write):
    policy, child = write("p.yaml", STOP_ON_NAN), write("waiter.py", WAITER)
    go = tmp_path / "go"
    with tmpfs(tmp_path / "mnt") as mount:
        run = mount / "run"
        proc = subprocess.Popen(ftrain_cmd("run", str(child), "--policy", str(policy), "--run-dir", str(run),
                                           "--no-ui", "--", str(go)),
                                cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 30
        while '"step": 4' not in ((run / "metrics.jsonl").read_text() if (run / "metrics.jsonl").exists() else ""):
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.02)
        time.sleep(0.2)
        pid = of(events(run), "attempt_start")[0]["pid"]
        filler = _fill(mount)
        os.truncate(filler, filler.stat().st_size - 4096)   # one page: the NaN line takes it
        go.touch()
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 3, err
        lines = [x for x in err.splitlines() if x.strip() and not x.startswith("[ftrain]")]
        assert len(lines) == 1 and "Traceback" not in err
        assert f"{run}/journal.jsonl: cannot write to the journal (anomaly 'loss = nan at step 5')" in lines[0]
        assert "No space left on device" in lines[0] and f"ftrain resume {run}" in lines[0]
        assert not pid_alive(pid)
        assert not of(events(run), "anomaly")          # the disk was full: it could not be
        filler.unlink()                                 # room again: the run continues
        p = run_ftrain("resume", str(run), "--no-ui", cwd=tmp_path, timeout=120)
        assert p.returncode == 0, p.stderr
        evts = events(run)
        assert of(evts, "attempt_end")[0]["supervisor_lost"] and evts[-1]["status"] == "succeeded"


def test_journal_write_error_without_root_is_the_same_one_line_and_exit_3(tmp_path, write):
    """The same path without a tmpfs: the journal's descriptor turned into /dev/full (the
    kernel's ENOSPC on every write) at the first anomaly."""
    driver = write("driver.py", """
import os, sys
from ftrain import cli, journal
write = journal.Journal.write
def full(self, event, **fields):
    if event is journal.Event.ANOMALY:
        fd = os.open("/dev/full", os.O_WRONLY)
        os.dup2(fd, self._fd)
        os.close(fd)
    return write(self, event, **fields)
journal.Journal.write = full
sys.argv = ["ftrain", *sys.argv[1:]]
cli.main()
""")
    policy, child = write("p.yaml", STOP_ON_NAN), write("waiter.py", WAITER)
    (tmp_path / "go").touch()
    run = tmp_path / "run"
    p = subprocess.run([sys.executable, str(driver), "run", str(child), "--policy", str(policy), "--run-dir",
                        str(run), "--no-ui", "--", str(tmp_path / "go")],
                       cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert p.returncode == 3, p.stderr
    assert [x for x in p.stderr.splitlines() if x.strip() and not x.startswith("[ftrain]")] == [
        f"ftrain: error: {run}/journal.jsonl: cannot write to the journal (anomaly 'loss = nan at step 5'): "
        f"No space left on device; the script was asked to save and stop; make room, then "
        f"`ftrain resume {run}` continues"]
    assert not pid_alive(of(events(run), "attempt_start")[0]["pid"])
    assert not (run / "ftrain-error.log").exists()      # not a bug: no traceback file


@needs_root
def test_resume_on_a_read_only_file_system_is_one_line_and_exit_2(tmp_path, write):
    policy = write("p.yaml", STOP_ON_NAN.replace("max_restarts: 2", "max_restarts: 0"))
    with tmpfs(tmp_path / "mnt") as mount:
        run = mount / "run"
        p = run_ftrain("run", str(CHILDREN / "job_misbehave.py"), "--policy", str(policy), "--run-dir", str(run),
                       "--no-ui", "--", "exit", "3", cwd=tmp_path)
        assert p.returncode == 1, p.stderr
        subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)
        p = run_ftrain("resume", str(run), "--no-ui", "--max-restarts", "1", cwd=tmp_path)
        assert p.returncode == 2
        assert len(errors(p.stderr)) == 1 and "Read-only file system" in p.stderr, p.stderr


TORN = """
import os, sys, time
import ftrain
if os.environ["FTRAIN_ATTEMPT"] == "1":
    ftrain.log(0, loss=1.0)
    fd = os.open(os.environ["FTRAIN_METRICS_PATH"], os.O_WRONLY | os.O_APPEND)
    os.write(fd, b'{"step": 1, "t": 1.0, "attempt": 1, "lo')   # the disk filled mid-line
    sys.exit(3)
for s in range(3):
    ftrain.log(s, loss=1.0)
"""


def test_a_line_cut_mid_write_does_not_swallow_the_next_attempts_first_line(tmp_path, write):
    policy, child = write("p.yaml", STOP_ON_NAN), write("torn.py", TORN)
    run = tmp_path / "run"
    p = run_ftrain("run", str(child), "--policy", str(policy), "--run-dir", str(run), "--no-ui", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    second = of(events(run), "attempt_end")[-1]
    assert second["attempt"] == 2 and second["first_step"] == 0 and second["steps"] == 3


def test_the_shim_starts_its_first_line_on_a_fresh_line(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_bytes(b'{"step": 1, "lo')
    env = {**os.environ, "FTRAIN_METRICS_PATH": str(metrics), "FTRAIN_ATTEMPT": "2"}
    subprocess.run([sys.executable, "-c", "import ftrain; ftrain.log(7, loss=1.0)"], env=env, check=True)
    assert json.loads(metrics.read_text().splitlines()[-1])["step"] == 7


def test_the_supervisor_ends_a_torn_line_before_the_next_attempt_follows_the_stream(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_bytes(b'{"step": 1, "lo')
    talk = ShimTalk(metrics)
    talk.begin(2)
    with open(metrics, "ab") as f:   # a writer that does not check (not the shim)
        f.write(b'{"step": 0, "attempt": 2}\n')
    assert [r["step"] for r in talk.read_new()] == [0]
    talk.close()


LEFTOVER = """
import os, signal, sys
import ftrain
ckpt = os.environ["FTRAIN_CHECKPOINT_DIR"]
if os.environ["FTRAIN_ATTEMPT"] == "1":
    ftrain.log(0, loss=1.0)
    os.makedirs(ckpt, exist_ok=True)
    with open(os.path.join(ckpt, f".tmp-step-00000005.pt.{os.getpid()}"), "wb") as f:
        f.write(b"half a save")
    os.kill(os.getpid(), signal.SIGKILL)   # killed mid-save
print("leftovers", sorted(n for n in os.listdir(ckpt) if n.startswith(".tmp-")), flush=True)
ftrain.log(0, loss=1.0)
"""


def test_leftovers_of_an_interrupted_save_are_removed_before_the_next_attempt_but_not_a_live_writers(
        tmp_path, write):
    policy, child = write("p.yaml", STOP_ON_NAN), write("leftover.py", LEFTOVER)
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    live = run / "checkpoints" / f".tmp-step-00000009.pt.{os.getpid()}"   # this test's pid: alive
    live.write_bytes(b"being written")
    os.utime(live, (time.time() - 3600, time.time() - 3600))
    p = run_ftrain("run", str(child), "--policy", str(policy), "--run-dir", str(run), "--no-ui", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    output = (run / "attempts" / "0002" / "output.log").read_text()
    assert f"leftovers ['{live.name}']" in output
    assert "removed 1 leftover file(s) of interrupted saves: .tmp-step-00000005.pt." in p.stderr


# ------------------------------------------------------------------------ checkpoints that lie
def _killed_at(tmp_path: Path, write, step: int, steps: int = 60) -> Path:
    policy = write("p.yaml", STOP_ON_NAN)
    run = tmp_path / "run"
    proc = subprocess.Popen(ftrain_cmd("run", JOB, "--policy", str(policy), "--config",
                                       str(cfg(tmp_path, steps, 10, 0.02)), "--run-dir", str(run), "--no-ui"),
                            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not (run / "checkpoints" / f"step-{step:08d}.json").exists():
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    return run


def test_a_stray_file_without_a_manifest_never_outranks_ok_checkpoints(tmp_path, write):
    run = _killed_at(tmp_path, write, 19)
    (run / "checkpoints" / "step-00000100.pt").write_bytes(b"not a checkpoint at all!!")   # 25 bytes
    newest_ok = of(events(run), "attempt_end")[-1]["last_step"]
    p = run_ftrain("resume", str(run), "--no-ui", cwd=tmp_path, timeout=120)
    assert p.returncode == 0, p.stderr
    second = of(events(run), "attempt_start")[-1]
    assert second["resume_step"] == newest_ok and second["resume_from"].endswith(f"step-{newest_ok:08d}.pt")


def test_a_checkpoint_that_fails_to_load_is_set_aside_and_the_restart_falls_back(tmp_path, write):
    import hashlib

    run = _killed_at(tmp_path, write, 19)
    good = of(events(run), "attempt_end")[-1]["last_step"]
    bad = run / "checkpoints" / "step-00000200.pt"   # a manifest that matches: "ok", but no torch file
    data = b"PK\x03\x04 garbage that torch.load refuses"
    bad.write_bytes(data)
    (run / "checkpoints" / "step-00000200.json").write_text(json.dumps(
        {"step": 200, "attempt": 1, "t": time.time(), "bytes": len(data),
         "sha256": hashlib.sha256(data).hexdigest(), "metrics": {}}))
    p = run_ftrain("resume", str(run), "--no-ui", cwd=tmp_path, timeout=120)
    assert p.returncode == 0, p.stderr
    evts = events(run)
    starts = of(evts, "attempt_start")
    assert starts[-2]["resume_step"] == 200 and starts[-1]["resume_step"] == good
    decision = of(evts, "decision")[-1]
    assert "step-00000200.pt failed to load" in decision["reason"] and "set aside" in decision["reason"]
    assert (run / "checkpoints" / "quarantine" / "step-00000200.pt").exists()
    assert evts[-1]["status"] == "succeeded"


# ------------------------------------------------------------------------ folders that can be continued
def test_a_folder_whose_supervisor_died_before_run_start_is_started_by_run_and_resume_says_so(tmp_path, write):
    run = tmp_path / "run"
    run.mkdir()
    (run / "journal.jsonl").write_text("")
    p = run_ftrain("resume", str(run), "--no-ui", cwd=tmp_path)
    assert p.returncode == 2 and f"start it with `ftrain run SCRIPT ... --run-dir {run}`" in p.stderr, p.stderr
    policy = write("p.yaml", STOP_ON_NAN)
    p = run_ftrain("run", JOB, "--policy", str(policy), "--config", str(cfg(tmp_path, 5, 0)), "--run-dir",
                   str(run), "--no-ui", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert [e["event"] for e in events(run)][0] == "run_start" and events(run)[-1]["status"] == "succeeded"


def test_resume_after_a_kill_between_a_rollback_decision_and_its_quarantine_uses_the_journaled_target(
        tmp_path, write):
    run = _killed_at(tmp_path, write, 29)
    ckpts = sorted(int(p.stem.split("-")[1]) for p in (run / "checkpoints").glob("step-*.pt"))
    target, poisoned = ckpts[0], ckpts[-1]
    assert target < poisoned
    # the journal as a supervisor killed right after journaling a rollback leaves it
    n = of(events(run), "attempt_start")[-1]["attempt"]
    with open(run / "journal.jsonl", "a") as f:
        for line in (
                {"event": "failure", "attempt": n, "kind": "nonfinite", "exit_code": None, "signal": None,
                 "step": poisoned + 1, "evidence": ["loss = nan"]},
                {"event": "decision", "attempt": n, "failure_step": poisoned + 1, "action": "rollback", "rule": 1,
                 "reason": "nonfinite: rollback", "overrides": {},
                 "resume_from": str(run / "checkpoints" / f"step-{target:08d}.pt"), "resume_step": target,
                 "skip_steps": [], "backoff": 0, "quarantine_after": target}):
            f.write(json.dumps({"t": time.time(), **line}) + "\n")
    p = run_ftrain("resume", str(run), "--no-ui", cwd=tmp_path, timeout=120)
    assert p.returncode == 0, p.stderr
    assert of(events(run), "attempt_start")[-1]["resume_step"] == target
    assert (run / "checkpoints" / "quarantine" / f"step-{poisoned:08d}.pt").exists()


# ------------------------------------------------------------------------ planted files
def errors(stderr: str) -> list[str]:
    """The error lines of ftrain's stderr (the plain reporter's [ftrain] lines left out)."""
    return [x for x in stderr.splitlines() if x.strip() and not x.startswith("[ftrain]")]


def test_a_lock_symlink_is_refused_and_its_target_untouched(tmp_path, write):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    run = tmp_path / "run"
    run.mkdir()
    (run / ".lock").symlink_to(victim)
    p = run_ftrain("run", JOB, "--config", str(cfg(tmp_path, 3, 0)), "--run-dir", str(run), "--no-ui",
                   cwd=tmp_path)
    assert p.returncode == 2 and ".lock: cannot lock the run folder: it is a symlink" in p.stderr, p.stderr
    assert victim.read_text() == "precious\n"
    (run / ".lock").unlink()
    os.link(victim, run / ".lock")   # a hard link would be truncated the same way
    p = run_ftrain("run", JOB, "--config", str(cfg(tmp_path, 3, 0)), "--run-dir", str(run), "--no-ui",
                   cwd=tmp_path)
    assert p.returncode == 2 and "not a regular file of its own" in p.stderr, p.stderr
    assert victim.read_text() == "precious\n"


def test_a_symlinked_attempt_folder_is_refused_in_one_line(tmp_path, write):
    policy = write("p.yaml", STOP_ON_NAN)
    run = tmp_path / "run"
    outside = tmp_path / "outside"
    outside.mkdir()
    (run / "attempts").mkdir(parents=True)
    (run / "attempts" / "0002").symlink_to(outside)
    p = run_ftrain("run", str(CHILDREN / "job_misbehave.py"), "--policy", str(policy), "--run-dir", str(run),
                   "--no-ui", "--", "exit", "3", cwd=tmp_path)
    assert p.returncode == 2, p.stderr
    assert len(errors(p.stderr)) == 1 and "attempts/0002: not a folder of" in p.stderr
    assert list(outside.iterdir()) == []


def test_resume_runs_the_command_of_run_start_and_refuses_an_edited_run_json(tmp_path, write):
    run = _killed_at(tmp_path, write, 9)
    info = json.loads((run / "run.json").read_text())
    info["command"] = ["sh", "-c", f"touch {tmp_path}/pwned"]
    (run / "run.json").write_text(json.dumps(info))
    p = run_ftrain("resume", str(run), "--no-ui", cwd=tmp_path)
    assert p.returncode == 2 and "is not the one the run started with" in p.stderr, p.stderr
    assert len(errors(p.stderr)) == 1 and not (tmp_path / "pwned").exists()


# ------------------------------------------------------------------------ inspect
def test_inspect_of_a_runs_folder_lists_its_runs_and_never_reads_a_timestamp_as_a_step(tmp_path, write):
    runs = tmp_path / "runs"
    policy = write("p.yaml", STOP_ON_NAN)
    for name in ("run-20261207-053000", "run-20261207-054500"):
        p = run_ftrain("run", JOB, "--policy", str(policy), "--config", str(cfg(tmp_path, 4, 0)), "--run-dir",
                       str(runs / name), "--no-ui", cwd=tmp_path)
        assert p.returncode == 0, p.stderr
    p = run_ftrain("inspect", str(runs), "--json", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    listed = json.loads(p.stdout)
    assert [(r["name"], r["status"], r["attempts"], r["last_step"]) for r in listed] == [
        ("run-20261207-053000", "succeeded", 1, 3), ("run-20261207-054500", "succeeded", 1, 3)]
    text = run_ftrain("inspect", str(runs), cwd=tmp_path).stdout
    assert "2 run folder(s)" in text and "53000" not in text.replace("053000", "")
    other = tmp_path / "empty"
    (other / "run-20261207-053000").mkdir(parents=True)   # a folder named like a run, not one
    p = run_ftrain("inspect", str(other), "--json", cwd=tmp_path)
    assert all(c["step"] is None for c in json.loads(p.stdout))
    p = run_ftrain("inspect", str(tmp_path / "outside-nothing"), cwd=tmp_path)
    assert p.returncode == 2


# ------------------------------------------------------------------------ kill -9 at random moments
KILL9_POLICY = """
version: 1
max_restarts: 5
grace: 3s
backoff: 0s
detect: {hang: {timeout: 20s, startup: 60s}}
rules:
  - when: [segfault, aborted, killed, exit_nonzero, preempted, hang]
    action: restart
"""


def _metric_lines(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    out = []
    for line in (path.read_text().splitlines() if path.exists() else []):
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and "loss" in rec:
            out.append(rec)
    return out


def test_kill_9_of_the_supervisor_at_random_moments_then_resume_loses_nothing(tmp_path, write):
    """The kill -9 / resume test of test_state.py at N random moments (20 in CI or with
    RUN_SLOW=1, else 3): from before the run folder exists to the last step. Each time the run
    ends succeeded, every attempt after the first starts right after its checkpoint, no two
    attempts ever trained at once, and no process of any attempt is left."""
    import random

    n = 20 if os.environ.get("CI") or os.environ.get("RUN_SLOW") == "1" else 3
    seed = int(os.environ.get("FTRAIN_KILL9_SEED") or time.time())
    rng = random.Random(seed)
    policy, config = write("p.yaml", KILL9_POLICY), cfg(tmp_path, 60, 5, 0.02)
    args = (JOB, "--policy", str(policy), "--config", str(config), "--no-ui")
    for i in range(n):
        run = tmp_path / f"run{i}"
        delay = rng.uniform(0.0, 2.5)
        where = f"seed {seed}, trial {i}, kill after {delay:.2f}s"
        proc = subprocess.Popen(ftrain_cmd("run", *args, "--run-dir", str(run)), cwd=tmp_path,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        started = run.is_dir() and (run / "journal.jsonl").exists() and \
            any(e["event"] == "run_start" for e in events(run))
        if started:
            p = run_ftrain("resume", str(run), "--no-ui", cwd=tmp_path, timeout=120)
        else:   # killed before the run started: `run --run-dir` takes the folder (resume says so)
            if run.is_dir() and (run / "journal.jsonl").exists():
                r = run_ftrain("resume", str(run), "--no-ui", cwd=tmp_path)
                assert r.returncode == 2 and "--run-dir" in r.stderr, (where, r.stderr)
            p = run_ftrain("run", *args, "--run-dir", str(run), cwd=tmp_path, timeout=120)
        assert p.returncode == 0, (where, p.stderr)
        evts = events(run)
        assert evts[-1]["event"] == "run_end" and evts[-1]["status"] == "succeeded", where
        lines = _metric_lines(run)
        by_attempt: dict[int, list[dict]] = {}
        for rec in lines:
            by_attempt.setdefault(rec["attempt"], []).append(rec)
        for start in of(evts, "attempt_start")[1:]:
            steps = [r["step"] for r in by_attempt.get(start["attempt"], [])]
            expected = 0 if start["resume_step"] is None else start["resume_step"] + 1
            if expected == 60:   # killed after the last step's save, before run_end: nothing left to train
                assert not steps, (where, start, steps[:3])
            else:
                assert steps and steps[0] == expected, (where, start, steps[:3])
        attempts = sorted(by_attempt)
        for a, b in zip(attempts, attempts[1:]):   # never two trainers at once
            assert max(r["t"] for r in by_attempt[a]) < min(r["t"] for r in by_attempt[b]), (where, a, b)
        assert max(r["step"] for r in lines) == 59, where
        for start in of(evts, "attempt_start"):
            assert not pid_alive(start["pid"]), (where, start["attempt"])
