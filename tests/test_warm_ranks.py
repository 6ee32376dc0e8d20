"""Warm ranks: a torchrun job's next attempt runs its ranks in an interpreter that imported
the script's modules before the failure (ftrain.warm.WarmRanks, ftrain/rankentry.py).

Real torchrun, two ranks over gloo on CPU. The job imports a module of its own from a
PYTHONPATH folder (``early``) that stamps the time it was imported: a rank that imported it
before its attempt began is a warm one. After every test no process of the run is left: no
rank (heartbeat files, the ranks' own ``rank R pid P`` lines), no server, nothing carrying
the run's FTRAIN_RUN_DIR.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import events, ftrain_cmd, of, pid_alive
from test_distributed import PidWatch

from ftrain.process import marked
from ftrain.torchrun import DistSpec, entry_command, split_command, torchrun_command
from ftrain.warm import RANK_ENTRY

pytest.importorskip("torch.distributed")

EARLY = "import time\nT = time.time()\n"

JOB = '''
import os, sys, time
import torch
import torch.distributed as dist
from torch import nn
import early
import ftrain

dist.init_process_group("gloo")
rank = dist.get_rank()
attempt = os.environ["FTRAIN_ATTEMPT"]
print(f"rank {rank} pid {os.getpid()} imported {early.T:.6f} nice {os.nice(0)}", flush=True)
fault = os.environ.get(f"FAULT_{attempt}", "")        # kind@step, on rank 1
kind, _, at = fault.partition("@")
model = nn.parallel.DistributedDataParallel(nn.Linear(4, 1))
opt = torch.optim.SGD(model.parameters(), lr=0.01)
state = ftrain.load_checkpoint()
start = state["step"] + 1 if state else 0
for step in range(start, int(os.environ.get("STEPS", "12"))):
    if rank == 1 and kind and step == int(at):
        if kind == "segv":
            os.kill(os.getpid(), 11)
        while kind == "hang":                   # outside torch: rank 0 waits in its allreduce
            time.sleep(3600)
        raise ValueError(f"bad shard at step {step}")
    loss = model(torch.randn(8, 4)).pow(2).mean()
    opt.zero_grad(); loss.backward(); opt.step()
    time.sleep(float(os.environ.get("SLEEP", "0.05")))
    ftrain.log(step, loss=loss.detach())
    if step % 3 == 2:
        ftrain.save_checkpoint({"step": step}, step)
    stop = torch.tensor([int(ftrain.should_stop())])
    dist.all_reduce(stop)
    if stop.item():
        break
dist.destroy_process_group()
print(f"rank {rank} done", flush=True)
'''

POLICY = """
version: 1
max_restarts: 3
grace: 5s
backoff: 0s
detect:
  hang: {{timeout: {hang}, startup: 90s}}
rules:
  - when: [segfault, killed, aborted, hang]
    action: restart
  - when: exception
    action: stop
"""


class Job:
    def __init__(self, tmp_path: Path, hang: str = "60s") -> None:
        (tmp_path / "lib").mkdir()
        (tmp_path / "lib" / "early.py").write_text(EARLY)
        (tmp_path / "job").mkdir()
        self.script = tmp_path / "job" / "train.py"
        self.script.write_text(JOB)
        (tmp_path / "policy.yaml").write_text(POLICY.format(hang=hang))
        self.tmp = tmp_path
        self.run = tmp_path / "run"
        self.watch = PidWatch(self.run / "heartbeat")
        self.servers: set[int] = set()

    def start(self, **env: str) -> subprocess.Popen:
        full = {k: v for k, v in os.environ.items() if not k.startswith(("FTRAIN_", "PET_", "SLURM_", "FAULT_"))}
        full["PYTHONPATH"] = os.pathsep.join([str(self.tmp / "lib"), full.get("PYTHONPATH", "")])
        full.update(env)
        self.out = open(self.tmp / "ftrain.out", "wb")
        self.proc = subprocess.Popen(ftrain_cmd("run", str(self.script), "--nproc-per-node", "2", "--policy",
                                                str(self.tmp / "policy.yaml"), "--run-dir", str(self.run), "--no-ui"),
                                     cwd=self.tmp, env=full, stdout=self.out, stderr=subprocess.STDOUT)
        return self.proc

    def server(self) -> psutil.Process | None:
        """The warm ranks server, once the supervisor started one."""
        try:
            for p in psutil.Process(self.proc.pid).children():
                if p.cmdline()[2:3] == ["--ranks"]:
                    self.servers.add(p.pid)
                    return p
        except psutil.Error:
            pass
        return None

    def until(self, what, timeout: float = 90.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.server()
            found = what()
            if found:
                return found
            assert self.proc.poll() is None, self.output()
            time.sleep(0.05)
        raise AssertionError(f"timed out; output:\n{self.output()}")

    def wait(self, timeout: float = 150.0) -> int:
        try:
            while self.proc.poll() is None and timeout > 0:
                self.server()
                time.sleep(0.05)
                timeout -= 0.05
            return self.proc.wait(timeout=1)
        except subprocess.TimeoutExpired:
            for p in [psutil.Process(self.proc.pid), *psutil.Process(self.proc.pid).children(recursive=True)]:
                p.kill()
            self.proc.wait()
            raise

    def output(self) -> str:
        return (self.tmp / "ftrain.out").read_text(errors="replace")

    def ranks(self, attempt: int) -> dict[int, tuple[int, float]]:
        """rank -> (pid, when it imported ``early``) from attempt ``attempt``'s output."""
        log = (self.run / "attempts" / f"{attempt:04d}" / "output.log").read_text(errors="replace")
        return {int(r): (int(p), float(t)) for r, p, t in re.findall(r"rank (\d) pid (\d+) imported ([\d.]+)", log)}

    def assert_nothing_left(self) -> None:
        pids = self.watch.stop() | self.servers
        for n in (1, 2, 3):
            if (self.run / "attempts" / f"{n:04d}").exists():
                pids |= {pid for pid, _ in self.ranks(n).values()}
        assert pids
        deadline = time.monotonic() + 2.0   # reaped by the supervisor before it exits; allow the kernel a moment
        while time.monotonic() < deadline and any(pid_alive(p) for p in pids):
            time.sleep(0.05)
        assert not [p for p in pids if pid_alive(p)], "processes of the run outlived it"
        assert marked(str(self.run.resolve())) == [] and marked(str(self.run)) == []


@pytest.fixture
def job(tmp_path, request):
    j = Job(tmp_path, **getattr(request, "param", {}))
    yield j
    if getattr(j, "proc", None) is not None and j.proc.poll() is None:
        j.proc.kill()
        j.proc.wait()


def starts(run: Path) -> list[dict]:
    return of(events(run), "attempt_start")


# --------------------------------------------------------------------------- values
def test_the_entry_command_keeps_torchrun_and_runs_each_rank_through_the_entry(tmp_path):
    cmd = torchrun_command(DistSpec(nproc_per_node=3), (sys.executable, "/x/t.py", "--lr", "1"), tmp_path,
                           rdzv_id="r-1")
    head, script, nproc = split_command(cmd)
    assert head[:3] == (sys.executable, "-m", "torch.distributed.run") and script == ("/x/t.py", "--lr", "1")
    assert nproc == 3
    warm = entry_command(cmd, RANK_ENTRY, "ftrain-ranks-1")
    assert warm == (*head, "--no-python", sys.executable, RANK_ENTRY, "ftrain-ranks-1", "/x/t.py", "--lr", "1")
    assert split_command(warm) is None   # no warm ranks for a command that is not python SCRIPT
    assert split_command(torchrun_command(DistSpec(nproc_per_node=2), ("/bin/train",), tmp_path, rdzv_id="r")) is None
    assert split_command((sys.executable, "/x/t.py")) is None


# --------------------------------------------------------------------------- real torchrun
def test_a_segfault_restarts_on_warm_ranks_that_imported_before_the_attempt(job):
    job.start(FAULT_1="segv@30", SLEEP="0.15", STEPS="34")   # 4.5 s in: the server has imported
    assert job.wait() == 0, job.output()
    first, second = starts(job.run)
    assert not first.get("warm_ranks") and second["warm_ranks"] == 2
    assert RANK_ENTRY in second["command"] and "--no-python" in second["command"]
    failure = of(events(job.run), "failure")[0]
    assert failure["kind"] == "segfault" and failure["signal"] == "SIGSEGV"   # as a cold rank's
    assert any("root cause: rank 1" in line for line in failure["evidence"])
    warm = job.ranks(2)
    assert sorted(warm) == [0, 1]
    assert all(t < second["t"] for _, t in warm.values()), "attempt 2's ranks imported after it began"
    cold = job.ranks(1)
    assert all(t > first["t"] for _, t in cold.values())
    assert "2 warm ranks" in job.output()
    log = (job.run / "attempts" / "0002" / "output.log").read_text()
    assert log.count(" nice 0") == 2   # the server imported at nice 19; its ranks run as a cold one would
    # the ranks wrote where torchrun pointed them (--redirects/--tee through the passed fds)
    logs = list((job.run / "attempts" / "0002" / "ranks").glob("*/attempt_0/1/stdout.log"))
    assert logs and "rank 1 done" in logs[0].read_text()
    job.assert_nothing_left()


def test_a_warm_ranks_exception_still_has_torchruns_error_file_as_root_cause(job):
    job.start(FAULT_1="segv@4", FAULT_2="exc@7")
    assert job.wait() == 1, job.output()
    assert starts(job.run)[1]["warm_ranks"] == 2
    failure = of(events(job.run), "failure")[1]
    assert failure["kind"] == "exception"
    assert any("ValueError: bad shard at step 7" in line for line in failure["evidence"])
    assert any("root cause: rank 1" in line for line in failure["evidence"])
    errors = list((job.run / "attempts" / "0002" / "ranks").glob("*/attempt_0/1/error.json"))
    assert errors and "bad shard at step 7" in errors[0].read_text()
    job.assert_nothing_left()


def test_sigterm_of_the_supervisor_stops_warm_ranks_and_their_server(job):
    job.start(FAULT_1="segv@3", STEPS="400", SLEEP="0.05")
    metrics = job.run / "metrics.jsonl"
    job.until(lambda: metrics.exists() and any(
        json.loads(line).get("attempt") == 2 for line in metrics.read_text().splitlines() if line.endswith("}")))
    assert starts(job.run)[1]["warm_ranks"] == 2
    job.proc.send_signal(signal.SIGTERM)
    assert job.wait(60) == 143, job.output()
    assert of(events(job.run), "run_end")[-1]["status"] == "interrupted"
    job.assert_nothing_left()


def test_a_server_killed_while_it_waits_means_cold_ranks_with_a_note(job):
    job.start(FAULT_1="segv@40", SLEEP="0.1", STEPS="44")
    server = job.until(job.server)
    job.until(lambda: server.cmdline() and len(server.cmdline()) > 2)
    server.kill()
    assert job.wait() == 0, job.output()
    second = starts(job.run)[1]
    assert not second.get("warm_ranks") and RANK_ENTRY not in second["command"]
    assert "warm ranks' interpreter was killed by SIGKILL while it waited; starting the ranks cold" in job.output()
    assert all(t > second["t"] for _, t in job.ranks(2).values())
    job.assert_nothing_left()


@pytest.mark.parametrize("job", [{"hang": "4s"}], indirect=True)
def test_a_warm_rank_stuck_outside_a_collective_is_a_hang_with_every_rank_stack(job):
    job.start(FAULT_1="segv@3", FAULT_2="hang@6")
    assert job.wait() == 0, job.output()
    assert starts(job.run)[1]["warm_ranks"] == 2
    failure = of(events(job.run), "failure")[1]
    assert failure["kind"] == "hang"
    text = "\n".join(failure["evidence"])
    assert "rank 1 stuck outside torch" in text and "train.py" in text
    for local in (0, 1):   # the warm ranks, not their entries, dumped their stacks into their stderr.log
        (log,) = (job.run / "attempts/0002/ranks").glob(f"*/attempt_0/{local}/stderr.log")
        assert "most recent call first" in log.read_text()
    job.assert_nothing_left()
