"""Under Slurm: self-requeue after the pre-timeout USR1, resume after a requeue, a crash
inside the allocation, and a step-wide USR1 that must not kill torchrun.

Two layers. Without Slurm (always): ``ftrain.slurm`` itself, and the supervisor's requeue
at its end against a fake ``scontrol`` on PATH, and a USR1 sent to every process of an
attempt (what ``proctrack/linuxproc`` does). With a real one-node Slurm (the
``slurm_cluster`` fixture: the cluster ``.ci/run`` started, or one started here when root
and Debian's slurm-wlm are installed, else the tests skip with the reason): the batch script
users get (scripts/slurm/ftrain.sbatch) under real ``sbatch``, ``scontrol requeue`` and
``scancel --signal``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from conftest import CHILDREN, ROOT, events, ftrain_cmd, of

from ftrain import slurm

SLURM = ROOT / "scripts" / "slurm"
SBATCH = SLURM / "ftrain.sbatch"


# ---------------------------------------------------------------- without Slurm
def test_detect_reads_the_job_from_slurm_variables():
    assert slurm.detect({}) is None
    job = slurm.detect({"SLURM_JOB_ID": "42", "SLURM_NODEID": "1", "SLURM_RESTART_COUNT": "3"})
    assert job == slurm.SlurmJob("42", node_id=1, restart_count=3) and not job.leader
    assert slurm.detect({"SLURM_JOB_ID": "7"}) == slurm.SlurmJob("7", 0, 0)


def test_only_a_run_stopped_by_a_signal_is_worth_a_requeue():
    assert slurm.requeue_wanted(143)
    for code in (0, slurm.DO_NOT_REQUEUE, 2, 3, 130):
        assert not slurm.requeue_wanted(code), code


def test_policy_slurm_requeue_defaults_to_on_and_is_checked(tmp_path):
    from ftrain.errors import PolicyError
    from ftrain.policyfile import load_policy, parse_policy

    assert slurm.requeue_allowed(load_policy(None))
    assert slurm.requeue_allowed(parse_policy("slurm: {requeue: true}\n", "p.yaml"))
    assert not slurm.requeue_allowed(parse_policy("version: 1\nslurm: {requeue: false}\n", "p.yaml"))
    for text, where in (("slurm: {requeue: 'no'}\n", "p.yaml:1: slurm.requeue: must be true or false"),
                        ("slurm:\n  requeue: true\n  requeu: false\n", "p.yaml:3: slurm.requeu: unknown key"),
                        ("slurm: yes\n", "p.yaml:1: slurm: must be a mapping")):
        with pytest.raises(PolicyError) as err:
            parse_policy(text, "p.yaml")
        assert str(err.value).startswith(where), (text, str(err.value))


@pytest.fixture
def fake_scontrol(tmp_path: Path) -> Iterator[tuple[dict[str, str], Path]]:
    """An ``scontrol`` on PATH that answers ``show job`` with ``Requeue=$FAKE_REQUEUE`` and logs
    every call; the env to run under it (a Slurm job 42)."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "scontrol.calls"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(
        "#!/bin/sh\n"
        f'echo "$*" >> {calls}\n'
        'if [ "$1" = show ]; then echo "JobId=$4 JobName=x Requeue=${FAKE_REQUEUE:-1} Restarts=0"; fi\n')
    (bin_dir / "scontrol").chmod(0o755)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "42", "SLURM_NODEID": "0"}
    yield env, calls


def test_requeue_if_allowed_asks_scontrol_only_for_usr1_on_node_0(fake_scontrol, monkeypatch):
    env, calls = fake_scontrol
    monkeypatch.setenv("PATH", env["PATH"])
    slurm_env = {"SLURM_JOB_ID": "42"}
    assert slurm.requeue_if_allowed(signal.SIGUSR1, 143, env={}) is None                 # not under Slurm
    assert slurm.requeue_if_allowed(signal.SIGTERM, 143, env=slurm_env) is None          # scancel, Slurm's own requeue
    assert slurm.requeue_if_allowed(signal.SIGUSR1, 1, env=slurm_env) is None            # gave up: never
    assert slurm.requeue_if_allowed(signal.SIGUSR1, 143, env={**slurm_env, "SLURM_NODEID": "1"}) is None
    assert "slurm: {requeue: false}" in str(slurm.requeue_if_allowed(signal.SIGUSR1, 143, allowed=False,
                                                                     env=slurm_env))
    assert not calls.exists()
    monkeypatch.setenv("FAKE_REQUEUE", "0")
    assert "not submitted with --requeue" in str(slurm.requeue_if_allowed(signal.SIGUSR1, 143, env=slurm_env))
    assert calls.read_text().splitlines() == ["show job -o 42"]
    monkeypatch.setenv("FAKE_REQUEUE", "1")
    assert slurm.requeue_if_allowed(signal.SIGUSR1, 143, env=slurm_env) == \
        "requeued Slurm job 42: it runs again and resumes from the save"
    assert calls.read_text().splitlines()[-1] == "requeue 42"


def _ftrain(tmp_path: Path, env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith(("FTRAIN_", "SLURM_"))}
    full.update(env)
    return subprocess.Popen(ftrain_cmd(*args), cwd=tmp_path, env=full, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen[str], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    metrics = run_dir / "metrics.jsonl"
    while time.monotonic() < deadline:
        if metrics.exists() and any((json.loads(line).get("step") or -1) >= step
                                    for line in metrics.read_text().splitlines() if line.strip()):
            return
        assert proc.poll() is None, proc.communicate()[0]
        time.sleep(0.1)
    raise AssertionError(f"no step {step} within {timeout}s")


def test_usr1_under_slurm_saves_journals_and_requeues_its_own_job(tmp_path, write, fake_scontrol):
    """The pre-timeout notice: the script saves, ``preempted`` is journaled, then
    ``scontrol requeue 42``; exit 143 and the run folder resumable."""
    env, calls = fake_scontrol
    write("c.yaml", "train: {steps: 400, ckpt_every: 50, sleep: 0.05}\n")
    run_dir = tmp_path / "run"
    proc = _ftrain(tmp_path, env, "run", str(CHILDREN / "job_train.py"), "--config", "c.yaml",
                   "--run-dir", str(run_dir), "--no-ui")
    _wait_for_step(run_dir, 3, proc)
    proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 143, out
    evts = events(run_dir)
    assert [f["kind"] for f in of(evts, "failure")] == ["preempted"]
    end = of(evts, "run_end")[-1]
    assert end["status"] == "interrupted" and "requeued Slurm job 42" in end["reason"], end
    assert calls.read_text().splitlines()[-1] == "requeue 42"
    assert "stopping at step" in out and any((run_dir / "checkpoints").glob("step-*.json"))


def test_a_policy_with_requeue_false_saves_and_exits_143_without_requeueing(tmp_path, write, fake_scontrol):
    env, calls = fake_scontrol
    write("c.yaml", "train: {steps: 400, ckpt_every: 50, sleep: 0.05}\n")
    write("p.yaml", "slurm: {requeue: false}\n")
    run_dir = tmp_path / "run"
    proc = _ftrain(tmp_path, env, "run", str(CHILDREN / "job_train.py"), "--config", "c.yaml",
                   "--policy", "p.yaml", "--run-dir", str(run_dir), "--no-ui")
    _wait_for_step(run_dir, 3, proc)
    proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 143, out
    end = of(events(run_dir), "run_end")[-1]
    assert end["status"] == "interrupted" and "slurm: {requeue: false}" in end["reason"], end
    assert "requeue 42" not in (calls.read_text() if calls.exists() else "")


def test_a_run_that_gave_up_never_requeues(tmp_path, write, fake_scontrol):
    """exit 1 (``DO_NOT_REQUEUE``): the policy gave up; scontrol is never asked."""
    env, calls = fake_scontrol
    write("p.yaml", "max_restarts: 0\n")
    proc = _ftrain(tmp_path, env, "run", str(CHILDREN / "job_train.py"), "--policy", "p.yaml",
                   "--run-dir", str(tmp_path / "run"), "--inject", "exc@2", "--no-ui")
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == slurm.DO_NOT_REQUEUE, out
    assert of(events(tmp_path / "run"), "run_end")[-1]["status"] in {"gave_up", "stopped"}
    assert not calls.exists()


def test_a_usr1_to_every_process_of_the_attempt_kills_none_of_them(tmp_path, write):
    """``proctrack/linuxproc`` signals every process of the step: a child that does not
    handle USR1 (here a shell) must survive it; ftrain relays it as its cooperative stop."""
    script = write("loop.sh", "#!/bin/bash\necho started\nwhile true; do sleep 0.1; done\n")
    script.chmod(0o755)
    run_dir = tmp_path / "run"
    proc = _ftrain(tmp_path, {}, "run", str(script), "--run-dir", str(run_dir), "--no-ui")
    deadline = time.monotonic() + 30
    while not (run_dir / "attempts" / "0001" / "output.log").exists() or \
            "started" not in (run_dir / "attempts" / "0001" / "output.log").read_text():
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)
    for p in [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]:
        os.kill(p.pid, signal.SIGUSR1)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 143, out
    end = of(events(run_dir), "attempt_end")[-1]
    assert end["signal"] != "SIGUSR1", end   # before: the shell died of it, and ftrain ran it again


@pytest.mark.parametrize("node, journal, expected", [
    ("0", False, "run {train} --run-dir {run} --nproc-per-node 8 --nnodes 2 --node-rank 0 "
                 "--rdzv-endpoint head:29400 --config c.yaml --no-ui"),
    ("1", False, "run {train} --run-dir {run} --nproc-per-node 8 --nnodes 2 --node-rank 1 "
                 "--rdzv-endpoint head:29400 --config c.yaml --no-ui"),
    ("0", True, "resume {run} --no-ui"),
    ("1", True, "resume {run}/nodes/node-1 --no-ui"),
])
def test_the_batch_script_runs_one_ftrain_per_node_and_resumes_each_nodes_folder(tmp_path, node, journal, expected):
    """Several nodes: srun starts the same command on each (a fake srun here, as node
    ``node`` of 2); first start ``ftrain run`` with ``--node-rank`` from SLURM_NODEID, a
    restart ``ftrain resume`` of that node's own folder."""
    bin_dir, run = tmp_path / "bin", tmp_path / "run"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(f'#!/bin/bash\nshift 2\nSLURM_NODEID={node} SLURM_STEP_NUM_NODES=2 exec "$@"\n')
    (bin_dir / "srun").chmod(0o755)
    if journal:
        mine = run if node == "0" else run / "nodes" / f"node-{node}"
        mine.mkdir(parents=True)
        (mine / "journal.jsonl").write_text("")
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_NAME": "exp1", "SLURM_JOB_NODELIST": "head",
           "MASTER_ADDR": "head", "RUN": str(run), "TRAIN": "train.py", "NPROC": "8", "FTRAIN": "echo",
           "RUN_ARGS": "--config c.yaml"}
    done = subprocess.run(["bash", str(SBATCH)], capture_output=True, text=True, env=env, timeout=30)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == expected.format(train="train.py", run=run)


def test_the_docs_show_the_batch_script_as_tested():
    docs = (ROOT / "docs" / "distributed.md").read_text()
    section = docs[docs.index("## Under Slurm"):docs.index("## Under Kubernetes")]
    assert "```bash\n" + SBATCH.read_text() + "```" in section


# ---------------------------------------------------------------- a real Slurm
class Cluster:
    """The one-node Slurm the tests use; ``use`` switches its ProctrackType (a restart)."""

    def __init__(self, proctrack: str, started_here: bool) -> None:
        self.original = self.proctrack = proctrack
        self.started_here = started_here
        self.can_restart = os.geteuid() == 0

    def use(self, proctrack: str) -> None:
        if proctrack == self.proctrack:
            return
        if not self.can_restart:
            pytest.skip(f"Slurm runs proctrack/{self.proctrack}; switching needs root")
        done = subprocess.run(["bash", str(SLURM / "start.sh"), proctrack], capture_output=True, text=True,
                              timeout=120)
        if done.returncode != 0:
            subprocess.run(["bash", str(SLURM / "start.sh"), self.original], capture_output=True, timeout=120)
            self.proctrack = self.original
            pytest.skip(f"Slurm did not start with proctrack/{proctrack}: {(done.stderr or done.stdout).strip()}")
        self.proctrack = proctrack


def _running_proctrack() -> str | None:
    """The ProctrackType of the local Slurm that takes jobs; None when none runs (asked only
    when a slurmctld runs here: sinfo retries a missing one for ~10 s)."""
    if not any(p.info["name"] == "slurmctld" for p in psutil.process_iter(["name"])):
        return None
    try:
        up = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=10)
        conf = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if up.returncode != 0 or not re.search(r"^(idle|mix|alloc)", up.stdout, re.M):
        return None
    found = re.search(r"^ProctrackType\s*=\s*proctrack/(\S+)", conf.stdout, re.M)
    return found.group(1) if found else "unknown"


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[Cluster]:
    """The running one-node Slurm, or one started here; skips with the reason otherwise."""
    running = _running_proctrack() if shutil.which("sinfo") else None
    if running is not None:
        cluster = Cluster(running, started_here=False)
    else:
        missing = [p for p in ("slurmctld", "slurmd", "munged", "sbatch") if shutil.which(p) is None]
        if missing:
            pytest.skip(f"no Slurm: {', '.join(missing)} not installed (scripts/slurm/setup.sh installs them)")
        if os.geteuid() != 0:
            pytest.skip("no Slurm running, and starting one needs root (scripts/slurm/start.sh)")
        done = subprocess.run(["bash", str(SLURM / "start.sh"), "linuxproc"], capture_output=True, text=True,
                              timeout=120)
        if done.returncode != 0:
            pytest.skip(f"Slurm did not start: {(done.stderr or done.stdout).strip()}")
        print(done.stdout.strip())
        cluster = Cluster("linuxproc", started_here=True)
    yield cluster
    if cluster.started_here:
        subprocess.run(["bash", str(SLURM / "stop.sh")], capture_output=True, timeout=120)
    elif cluster.proctrack != cluster.original:
        subprocess.run(["bash", str(SLURM / "start.sh"), cluster.original], capture_output=True, timeout=120)


def job_info(job: str) -> dict[str, str]:
    done = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True, timeout=10)
    return dict(part.split("=", 1) for part in done.stdout.split() if "=" in part)


def wait_job(job: str, until, timeout: float, what: str) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = job_info(job)
        if until(info):
            return info
        time.sleep(0.2)
    raise AssertionError(f"job {job}: {what} not within {timeout}s: {job_info(job)}")


def finished(info: dict[str, str]) -> bool:
    return info.get("JobState") in {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}


def sbatch(tmp_path: Path, name: str, *options: str, **variables: str) -> str:
    """Submit the users' batch script as written; ``options`` override its #SBATCH lines."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FTRAIN_", "SLURM_"))}
    env.update({"FTRAIN": f"{sys.executable} -m ftrain", "RUN": str(tmp_path / "run"), **variables})
    done = subprocess.run(["sbatch", "--parsable", f"--job-name={name}", f"--chdir={tmp_path}",
                           f"--output={tmp_path}/slurm.out", *options, str(SBATCH)],
                          capture_output=True, text=True, env=env, timeout=30)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().split(";")[0]


def slurm_out(tmp_path: Path) -> str:
    path = tmp_path / "slurm.out"
    return path.read_text(errors="replace") if path.exists() else ""


def wait_checkpoint(tmp_path: Path, job: str, step: int, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    ckpts = tmp_path / "run" / "checkpoints"
    while time.monotonic() < deadline:
        if any(json.loads(p.read_text())["step"] >= step for p in ckpts.glob("step-*.json")):
            return
        assert not finished(job_info(job)), slurm_out(tmp_path)
        time.sleep(0.2)
    raise AssertionError(f"no checkpoint at step {step} within {timeout}s:\n{slurm_out(tmp_path)}")


def segments(evts: list[dict]) -> list[str]:
    return [e["status"] for e in of(evts, "run_end")]


def test_slurm_requeue_resumes_from_the_save(slurm_cluster, tmp_path, write):
    """``scontrol requeue``: Slurm's TERM stops ftrain (the script saves), the same job id runs
    the batch script again, whose ``ftrain resume`` continues from the save."""
    slurm_cluster.use("linuxproc")
    write("c.yaml", "train: {steps: 60, ckpt_every: 5, sleep: 0.1}\n")
    job = sbatch(tmp_path, "requeue", "--time=5", TRAIN=str(CHILDREN / "job_train.py"), RUN_ARGS="--config c.yaml")
    wait_checkpoint(tmp_path, job, 9)
    subprocess.run(["scontrol", "requeue", job], check=True, timeout=10)
    info = wait_job(job, finished, 120, "the end")
    out = slurm_out(tmp_path)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", out
    evts = events(tmp_path / "run")
    assert segments(evts) == ["interrupted", "succeeded"], out
    assert "SIGTERM received" in of(evts, "run_end")[0]["reason"]
    second = of(evts, "attempt_start")[-1]
    assert second["resume_step"] is not None and second["resume_step"] >= 9, second
    assert f"resumed from step {second['resume_step']}" in out and "finished" in out


def test_pre_timeout_usr1_requeues_the_job_which_finishes_from_the_save(slurm_cluster, tmp_path, write):
    """``--signal=USR1@55 --time=1``: the notice comes at slurmctld's next 30-s look (it may
    be up to 60 s early); ftrain stops the script (it saves), journals ``preempted``, and
    requeues its own job. The rerun would get the same early notice, so the test gives it
    a longer limit while it waits in the queue."""
    slurm_cluster.use("linuxproc")
    write("c.yaml", "train: {steps: 600, ckpt_every: 100, sleep: 0.05}\n")
    job = sbatch(tmp_path, "usr1", "--time=1", "--signal=USR1@55", TRAIN=str(CHILDREN / "job_train.py"),
                 RUN_ARGS="--config c.yaml")
    wait_job(job, lambda i: i.get("Restarts") == "1" or finished(i), 100, "the requeue")
    subprocess.run(["scontrol", "update", f"JobId={job}", "TimeLimit=5"], check=True, timeout=10)
    info = wait_job(job, finished, 150, "the end")
    out = slurm_out(tmp_path)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", out
    evts = events(tmp_path / "run")
    assert segments(evts) == ["interrupted", "succeeded"], out
    first_end = of(evts, "run_end")[0]
    assert "SIGUSR1 received" in first_end["reason"] and f"requeued Slurm job {job}" in first_end["reason"]
    assert of(evts, "failure")[0]["kind"] == "preempted"
    stopped = int(re.search(r"stopping at step (\d+)", out).group(1))
    assert of(evts, "attempt_start")[-1]["resume_step"] == stopped
    assert f"resumed from step {stopped}" in out and "finished" in out


def test_a_segfault_inside_the_allocation_is_restarted_within_the_job(slurm_cluster, tmp_path, write):
    slurm_cluster.use("linuxproc")
    write("c.yaml", "train: {steps: 12, ckpt_every: 2, sleep: 0.05}\n")
    job = sbatch(tmp_path, "segv", "--time=5", TRAIN=str(CHILDREN / "job_train.py"),
                 RUN_ARGS="--config c.yaml --inject segv@5")
    info = wait_job(job, finished, 120, "the end")
    out = slurm_out(tmp_path)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "0", out
    evts = events(tmp_path / "run")
    assert [f["kind"] for f in of(evts, "failure")] == ["segfault"] and segments(evts) == ["succeeded"], out
    assert len(of(evts, "attempt_start")) == 2


@pytest.mark.parametrize("proctrack", ["linuxproc", "cgroup"])
def test_two_ranks_survive_a_usr1_to_the_whole_step_and_save(slurm_cluster, tmp_path, write, proctrack):
    """USR1 to every process of the step (``scancel --signal=USR1``: the path the
    ``--signal`` notice takes): torchrun must not die of it (exit -10, no checkpoint);
    ftrain relays it as TERM, rank 0 saves at the step where the ranks stop."""
    pytest.importorskip("torch.distributed")
    slurm_cluster.use(proctrack)
    write("c.yaml", "train: {steps: 400, ckpt_every: 1000, sleep: 0.05}\n")
    job = sbatch(tmp_path, f"ranks-{proctrack}", "--time=5", "--no-requeue", "--cpus-per-task=2",
                 TRAIN=str(CHILDREN / "dist_train.py"), NPROC="2", RUN_ARGS="--config c.yaml")
    run_dir = tmp_path / "run"
    deadline = time.monotonic() + 120
    while not ((run_dir / "metrics.jsonl").exists() and (run_dir / "metrics.jsonl").read_text().count("\n") >= 3):
        assert time.monotonic() < deadline and not finished(job_info(job)), slurm_out(tmp_path)
        time.sleep(0.2)
    subprocess.run(["scancel", "--signal=USR1", job], check=True, timeout=10)
    info = wait_job(job, finished, 90, "the end")
    out = slurm_out(tmp_path)
    assert info["ExitCode"] == "143:0", out
    evts = events(run_dir)
    end = of(evts, "attempt_end")[-1]
    assert end["signal"] is None and end["exit_code"] != -10, (end, out)
    assert [f["kind"] for f in of(evts, "failure")] == ["preempted"], out
    assert "not submitted with --requeue" in of(evts, "run_end")[-1]["reason"]
    stopped = int(re.search(r"rank 0 stopping at step (\d+)", out).group(1))
    assert (run_dir / "checkpoints" / f"step-{stopped:08d}.json").exists(), out
