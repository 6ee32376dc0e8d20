"""Processes under hostile conditions (issue 11): resume signals only this run's processes,
a daemon that left the tree and the group dies with its attempt (or at the resume after a
kill -9), SIGHUP is a SIGTERM, a child stopped by SIGSTOP is named in the hang's evidence
and still stopped, and a waiting warm spare is this run's but no stray of the attempt."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import CHILDREN, events, ftrain_cmd, of, pid_alive, run_ftrain

from ftrain.process import Child, marked, read_environ
from ftrain.warm import Spare

HOSTILE = str(CHILDREN / "hostile_procs.py")
JOB = str(CHILDREN / "job_train.py")
POLICY = """
version: 1
max_restarts: MAX
grace: GRACE
backoff: 0s
detect: {hang: {timeout: 2s, startup: 20s}}
rules:
  - when: [segfault, killed, exit_nonzero, hang]
    action: restart
  - when: exception
    action: stop
"""


def policy(write, max_restarts: int = 3, grace: str = "2s") -> Path:
    return write("policy.yaml", POLICY.replace("MAX", str(max_restarts)).replace("GRACE", grace))


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FTRAIN_")}
    env.update(extra)
    return env


def wait_for(check, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise AssertionError(f"{what} never came")


def last_step(run: Path, attempt: int) -> int:
    metrics = run / "metrics.jsonl"
    best = -1
    if metrics.exists():
        for line in metrics.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if rec.get("attempt") == attempt and isinstance(rec.get("step"), int):
                best = max(best, rec["step"])
    return best


def start_and_kill_9(tmp_path: Path, write, *args: str, attempt: int = 1, step: int = 5) -> Path:
    """``ftrain run`` ARGS, killed with SIGKILL once ``attempt`` logged ``step``."""
    run = tmp_path / "run"
    proc = subprocess.Popen(ftrain_cmd("run", *args, "--policy", str(policy(write)), "--run-dir", str(run),
                                       "--no-ui"), cwd=tmp_path, env=clean_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: last_step(run, attempt) >= step, f"step {step} of attempt {attempt}")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    return run


def stray(pid: int) -> None:
    if pid_alive(pid):
        os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("how", ["other-run", "other-host"])
def test_resume_leaves_alone_a_pid_that_is_not_this_runs(tmp_path, write, how):
    run = start_and_kill_9(tmp_path, write, HOSTILE, "plain", str(tmp_path / "pid"), "60", "0.03")
    trainer = of(events(run), "attempt_start")[0]["pid"]
    wait_for(lambda: not pid_alive(trainer), "the trainer's exit (parent-death signal)")
    # The pid the journal names is now an unrelated process's: a sleep of another run's
    # attempt 1, or (a Slurm requeue) the journal says it ran on another host.
    other = subprocess.Popen(["sleep", "60"], env=clean_env(FTRAIN_RUN_DIR=str(tmp_path / "elsewhere"),
                                                            FTRAIN_ATTEMPT="1"))
    try:
        lines = (run / "journal.jsonl").read_text().splitlines()
        for i, line in enumerate(lines):
            rec = json.loads(line)
            if rec["event"] == "attempt_start":
                rec["pid"] = other.pid
                if how == "other-host":
                    rec["host"] = "node-that-is-not-this-one"
                lines[i] = json.dumps(rec)
        (run / "journal.jsonl").write_text("\n".join(lines) + "\n")
        p = run_ftrain("resume", str(run), "--no-ui", cwd=tmp_path, timeout=120)
        assert p.returncode == 0, p.stderr
        assert pid_alive(other.pid), "resume signalled a process that is not this run's"
        assert f"pid {other.pid} named by attempt 1 is not this run's process" in p.stderr
        assert "left alone" in p.stderr
        (lost,) = [e for e in of(events(run), "attempt_end") if e.get("supervisor_lost")]
        assert lost["orphan_stopped"] is False
        assert ("host node-that-is-not-this-one" if how == "other-host" else "FTRAIN_RUN_DIR") \
            in lost["orphan_reason"]
    finally:
        other.kill()
        other.wait()


def test_resume_stops_a_real_orphan_and_the_daemon_that_left_its_tree(tmp_path, write):
    pidfile = tmp_path / "daemon"
    run = start_and_kill_9(tmp_path, write, HOSTILE, "deaf,daemon", str(pidfile), "200", "0.05")
    trainer = of(events(run), "attempt_start")[0]["pid"]
    daemon = int(Path(f"{pidfile}.1").read_text())
    try:
        time.sleep(0.5)
        assert pid_alive(trainer) and pid_alive(daemon)   # deaf to SIGTERM; a daemon has no parent-death signal
        p = run_ftrain("resume", str(run), "--no-ui", cwd=tmp_path, timeout=120)
        assert p.returncode == 0, p.stderr
        assert not pid_alive(trainer), "the orphaned trainer outlived the resume"
        assert not pid_alive(daemon), "the daemon of the lost attempt outlived the resume"
        assert f"stopped pid {trainer} left running by the previous supervisor" in p.stderr
        evts = events(run)
        (lost,) = [e for e in of(evts, "attempt_end") if e.get("supervisor_lost")]
        assert lost["orphan_stopped"] is True and lost["strays_killed"] >= 1
        second = int(Path(f"{pidfile}.2").read_text())   # the resumed attempt's own daemon: stopped at its end
        assert not pid_alive(second)
        assert of(evts, "attempt_end")[-1]["strays_killed"] >= 1
    finally:
        for pid in (trainer, daemon):
            stray(pid)


def test_a_daemon_that_left_the_tree_dies_with_its_attempt_found_by_its_environment(tmp_path):
    """No subreaper here (as where ftrain is not the parent of all): once the middle process
    exits, the daemon is init's child, in a session of its own; only its environment says
    whose it is."""
    pidfile = tmp_path / "daemon"
    env = clean_env(FTRAIN_RUN_DIR=str(tmp_path), FTRAIN_ATTEMPT="1",
                    FTRAIN_METRICS_PATH=str(tmp_path / "metrics.jsonl"))
    child = Child([sys.executable, HOSTILE, "daemon", str(pidfile), "3", "0.01"], env=env, cwd=tmp_path,
                  log_path=tmp_path / "out.log")
    while child.pump(0.05):
        pass
    daemon = int(Path(f"{pidfile}.1").read_text())
    try:
        assert pid_alive(daemon)
        assert os.getpgid(daemon) == os.getsid(daemon) != child.pid   # a session of its own, not the attempt's
        assert Path(f"/proc/{daemon}/stat").read_text().rsplit(")", 1)[1].split()[1] != str(os.getpid())
        t0 = time.perf_counter()
        assert marked(str(tmp_path), "1") == [daemon]
        scan_ms = (time.perf_counter() - t0) * 1000
        assert marked(str(tmp_path), "2") == [] and marked(str(tmp_path / "x")) == []
        exit_ = child.finish()
        assert exit_.returncode == 0 and exit_.strays_killed >= 1
        assert not pid_alive(daemon)
        print(f"/proc scan: {scan_ms:.2f} ms for {sum(1 for n in os.listdir('/proc') if n.isdigit())} processes")
    finally:
        stray(daemon)


def test_a_waiting_spare_is_this_runs_but_no_stray_of_the_attempt(tmp_path):
    script = tmp_path / "s.py"
    script.write_text("import ftrain\nprint('ran')\n")
    env = clean_env(FTRAIN_RUN_DIR=str(tmp_path), FTRAIN_ATTEMPT="1",
                    FTRAIN_METRICS_PATH=str(tmp_path / "metrics.jsonl"))
    attempt = Child([sys.executable, str(script)], env=env, cwd=tmp_path, log_path=tmp_path / "out.log")
    spare = Spare([sys.executable, str(script)], env, tmp_path)
    try:
        while attempt.pump(0.05):
            pass
        assert attempt.finish().strays_killed == 0
        assert pid_alive(spare.child.pid), "the attempt's end killed the spare waiting for the next"
        marks = read_environ(spare.child.pid)
        assert marks is not None and marks["FTRAIN_RUN_DIR"] == str(tmp_path) and "FTRAIN_SPARE" in marks
        assert "FTRAIN_ATTEMPT" not in marks
        assert spare.child.pid in marked(str(tmp_path))   # what a resume stops
    finally:
        spare.discard()
    assert not pid_alive(spare.child.pid)


def test_a_warm_attempt_left_by_a_dead_supervisor_is_proven_ours_and_stopped(tmp_path, write):
    run = start_and_kill_9(tmp_path, write, HOSTILE, "deaf", str(tmp_path / "pid"), "400", "0.05",
                           "--inject", "segv@5", attempt=2, step=3)
    second = of(events(run), "attempt_start")[-1]
    assert second["attempt"] == 2 and second["warm"] is True
    try:
        assert pid_alive(second["pid"])
        p = run_ftrain("resume", str(run), "--no-ui", cwd=tmp_path, timeout=120)
        assert p.returncode == 0, p.stderr
        assert not pid_alive(second["pid"])
        (lost,) = [e for e in of(events(run), "attempt_end") if e.get("supervisor_lost")]
        assert lost["orphan_stopped"] is True, lost
    finally:
        stray(second["pid"])


def test_sighup_is_handled_like_sigterm(tmp_path, write):
    run = tmp_path / "run"
    proc = subprocess.Popen(ftrain_cmd("run", HOSTILE, "plain", str(tmp_path / "pid"), "100000", "0.01",
                                       "--policy", str(policy(write, grace="20s")), "--run-dir", str(run), "--no-ui"),
                            cwd=tmp_path, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: last_step(run, 1) >= 5, "step 5")
    proc.send_signal(signal.SIGHUP)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "stopping at step" in out   # should_stop() turned true: the script left on its own
    evts = events(run)
    assert evts[-1]["status"] == "interrupted" and evts[-1]["reason"].startswith("SIGHUP received")
    assert not pid_alive(of(evts, "attempt_start")[0]["pid"])
    assert "ftrain resume" in evts[-1]["reason"]


def test_a_child_stopped_by_sigstop_is_named_in_the_hang_and_still_stopped(tmp_path, write):
    run = tmp_path / "run"
    t0 = time.monotonic()
    p = run_ftrain("run", HOSTILE, "stop-self", str(tmp_path / "pid"), "100", "0.05", "--policy",
                   str(policy(write, max_restarts=0, grace="30s")), "--run-dir", str(run), "--no-ui",
                   cwd=tmp_path, timeout=90)
    took = time.monotonic() - t0
    assert p.returncode == 1, p.stderr
    evts = events(run)
    (failure,) = of(evts, "failure")
    assert failure["kind"] == "hang"
    trainer = of(evts, "attempt_start")[0]["pid"]
    # the reason first, then the processes that were stopped, not hung
    assert f"pid {trainer} (python" in failure["evidence"][1] and "stopped (state T" in failure["evidence"][1]
    assert not pid_alive(trainer)
    # continued with its TERM, it acts on it: not the 30 s grace a silent process keeps
    assert took < 20, took


def test_a_closed_terminal_ends_the_run_interrupted_not_in_an_error(tmp_path, write):
    """The real SIGHUP: ftrain's controlling terminal (a pty) is closed. Its writes to the
    hung-up terminal would fail (EIO); it still stops the script and journals why."""
    import fcntl
    import pty
    import termios

    def own_terminal() -> None:
        os.setsid()
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    master, slave = pty.openpty()
    run = tmp_path / "run"
    proc = subprocess.Popen(ftrain_cmd("run", HOSTILE, "plain", str(tmp_path / "pid"), "100000", "0.01",
                                       "--policy", str(policy(write, grace="20s")), "--run-dir", str(run), "--no-ui"),
                            cwd=tmp_path, env=clean_env(), stdin=slave, stdout=slave, stderr=slave,
                            preexec_fn=own_terminal)
    os.close(slave)
    try:
        os.set_blocking(master, False)

        def drained_and_going() -> bool:
            try:
                while os.read(master, 1 << 16):
                    pass
            except OSError:
                pass
            return last_step(run, 1) >= 5
        wait_for(drained_and_going, "step 5")
    finally:
        os.close(master)   # the terminal goes: the kernel hangs it up and sends SIGHUP
    assert proc.wait(timeout=60) == 143
    evts = events(run)
    assert evts[-1]["status"] == "interrupted" and evts[-1]["reason"].startswith("SIGHUP received"), evts[-1]
    assert not (run / "ftrain-error.log").exists()
    assert not pid_alive(of(evts, "attempt_start")[0]["pid"])
