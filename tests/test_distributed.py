"""Past one process: torchrun under ftrain, root causes among ranks, a stuck rank, and
several nodes that agree on one decision per failure.

The end-to-end tests run real DDP training (tests/children/dist_train.py: a tiny model,
gloo on CPU, two ranks, tens of steps) under ``ftrain run --nproc-per-node 2``, and two
"nodes" as two ftrain processes rendezvousing on 127.0.0.1. Faults on a rank other than 0
come from the child's environment (``--inject`` fires on rank 0 only). Every test collects
the ranks' pids from their heartbeat files while the job runs and checks that none
outlives its attempt.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
from conftest import CHILDREN, events, ftrain_cmd, of, pid_alive

from ftrain.classify import rank_root
from ftrain.coord import Coordinator, NodeOutcome, Nodes, pick_root, read_decision
from ftrain.errors import RunDirError, UsageError
from ftrain.kinds import Failure, FailureKind
from ftrain.outcome import RankReport
from ftrain.policy import Action, Decision
from ftrain.ranks import CHECK_EVERY, Ranks, in_torch, innermost_frame, read_heartbeats
from ftrain.state import RunState
from ftrain.topology import Single, Topology, Verdict, job_dir_of, make_topology, node_dir
from ftrain.torchrun import DistSpec, parse_report, rank_reports, read_error_file, report_root, torchrun_command

pytest.importorskip("torch.distributed")

DIST = str(CHILDREN / "dist_train.py")

POLICY = """
version: 1
max_restarts: 4
no_progress: 3
grace: 3s
backoff: 0s
detect:
  hang: {{timeout: {hang}, startup: 90s}}
rules:
  - when: cuda_oom
    action: restart
    set: {{train.batch_size: {{scale: 0.5, min: 1}}}}
  - when: [segfault, aborted, killed, cuda_error, nccl_error, hang, preempted, host_oom, exit_nonzero, exception]
    action: restart
"""
CONFIG = "train: {steps: 20, batch_size: 16, ckpt_every: 5, sleep: 0.02}\n"


# --------------------------------------------------------------------------- helpers
class PidWatch:
    """Collects rank pids from heartbeat files (their content) while a run goes on."""

    def __init__(self, *folders: Path) -> None:
        self.folders = folders
        self.pids: dict[int, set[int]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            for folder in self.folders:
                for rank, hb in read_heartbeats(folder).items():
                    if hb.pid is not None:
                        self.pids.setdefault(rank, set()).add(hb.pid)
            time.sleep(0.05)

    def stop(self) -> set[int]:
        self._stop.set()
        self._thread.join()
        return {pid for pids in self.pids.values() for pid in pids}


def assert_no_rank_survives(watch: PidWatch, *run_dirs: Path) -> None:
    pids = watch.stop()
    for run_dir in run_dirs:   # the ranks print their pid too; both sources must agree on "dead"
        for log in run_dir.glob("attempts/*/output.log"):
            pids |= {int(p) for p in re.findall(r"rank \d+ pid (\d+)", log.read_text(errors="replace"))}
    assert pids, "no rank pid was seen"
    alive = [pid for pid in pids if pid_alive(pid)]
    assert not alive, f"rank processes outlived their attempt: {alive}"


def start(tmp_path: Path, *args: str, env: dict[str, str] | None = None, name: str = "ftrain") -> subprocess.Popen:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("FTRAIN_", "DIST_", "PET_", "SLURM_"))}
    full_env.update(env or {})
    out = open(tmp_path / f"{name}.out", "wb")
    return subprocess.Popen(ftrain_cmd(*args), cwd=tmp_path, env=full_env, stdout=out, stderr=subprocess.STDOUT)


def finish(proc: subprocess.Popen, timeout: float) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        for p in [psutil.Process(proc.pid)] + psutil.Process(proc.pid).children(recursive=True):
            p.kill()
        proc.wait()
        raise


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def job(tmp_path):
    def _job(hang: str = "4s") -> tuple[Path, Path]:
        policy = tmp_path / "policy.yaml"
        policy.write_text(POLICY.format(hang=hang))
        config = tmp_path / "config.yaml"
        config.write_text(CONFIG)
        return policy, config
    return _job


def run_two_ranks(tmp_path: Path, policy: Path, config: Path, *extra: str, env: dict[str, str] | None = None,
                  timeout: float = 150) -> tuple[int, Path, str, PidWatch]:
    run = tmp_path / "run"
    watch = PidWatch(run / "heartbeat")
    proc = start(tmp_path, "run", DIST, "--nproc-per-node", "2", "--policy", str(policy), "--config", str(config),
                 "--run-dir", str(run), "--no-ui", *extra, env=env)
    code = finish(proc, timeout)
    return code, run, (tmp_path / "ftrain.out").read_text(errors="replace"), watch


# --------------------------------------------------------------------------- values, no processes
def test_torchrun_command_turns_off_its_restarts_and_keeps_rank_logs(tmp_path):
    one = torchrun_command(DistSpec(nproc_per_node=4), (sys.executable, "/x/train.py", "--lr", "1"),
                           tmp_path / "ranks", rdzv_id="ftrain-r-1")
    assert one[:3] == (sys.executable, "-m", "torch.distributed.run")
    text = " ".join(one)
    assert "--nproc-per-node 4" in text and "--max-restarts 0" in text and "--standalone" in text
    assert f"--log-dir {tmp_path / 'ranks'} --redirects 3 --tee 3" in text
    assert one[-3:] == ("/x/train.py", "--lr", "1")
    many = torchrun_command(DistSpec(nproc_per_node=2, nnodes=3, node_rank=2, rdzv_endpoint="head:29400"),
                            ("/bin/train",), tmp_path, rdzv_id="ftrain-r-7")
    text = " ".join(many)
    assert "--standalone" not in text and "--nnodes 3 --node-rank 2 --rdzv-backend c10d" in text
    assert "--rdzv-endpoint head:29400 --rdzv-id ftrain-r-7 --rdzv-conf is_host=0" in text
    assert many[-2:] == ("--no-python", "/bin/train")


def test_dist_spec_from_the_command_line_slurm_and_torchrun_variables():
    assert DistSpec.from_cli(1, 1, 0, None, env={}) is None
    assert DistSpec.from_cli(2, 1, 0, None, env={}) == DistSpec(nproc_per_node=2)
    slurm = {"SLURM_STEP_NUM_NODES": "4", "SLURM_NODEID": "3", "SLURM_JOB_ID": "777", "MASTER_ADDR": "n01",
             "MASTER_PORT": "29500", "FTRAIN_NODE_TIMEOUT": "12"}
    spec = DistSpec.from_cli(8, 1, 0, None, env=slurm)
    assert spec == DistSpec(nproc_per_node=8, nnodes=4, node_rank=3, rdzv_endpoint="n01:29500", rdzv_id="777",
                            node_timeout=12.0)
    pet = {"PET_NNODES": "2", "PET_NODE_RANK": "1", "PET_NPROC_PER_NODE": "4", "PET_RDZV_ENDPOINT": "svc:1234"}
    assert DistSpec.from_cli(1, 1, 0, None, env=pet) == DistSpec(4, 2, 1, "svc:1234")
    assert DistSpec.from_cli(1, 2, 1, "h:1", env=slurm).node_rank == 1   # the flags win
    with pytest.raises(UsageError, match="needs --rdzv-endpoint"):
        DistSpec.from_cli(1, 2, 0, None, env={})
    with pytest.raises(UsageError, match="--node-rank 2: must be in 0..1"):
        DistSpec.from_cli(1, 2, 2, "h:1", env={})
    with pytest.raises(UsageError, match="expected HOST:PORT"):
        DistSpec.from_cli(1, 2, 0, "nohost", env={})


@pytest.mark.parametrize("args, message", [
    (["--rdzv-endpoint", "h:1"], "--rdzv-endpoint: only meaningful with --nnodes > 1"),
    (["--nnodes", "2", "--rdzv-endpoint", "h:1"], "give every node the same --run-dir"),
    (["--nnodes", "2", "--run-dir", "r"], "needs --rdzv-endpoint HOST:PORT"),
    (["--nproc-per-node", "0"], "--nproc-per-node 0: needs at least 1"),
])
def test_bad_distributed_flags_are_one_line_exit_2(tmp_path, args, message):
    from conftest import run_ftrain

    p = run_ftrain("run", DIST, *args, cwd=tmp_path)
    assert p.returncode == 2 and message in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "runs").exists() and not (tmp_path / "r").exists()


REPORT = """\
torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
=======================================================
/work/train.py FAILED
-------------------------------------------------------
Failures:
[1]:
  time      : 2026-11-29_06:23:57
  host      : localhost
  rank      : 1 (local_rank: 1)
  exitcode  : -11 (pid: 11986)  (SIGSEGV)
  error_file: <N/A>
  traceback : Signal 11 (SIGSEGV) received by PID 11986
-------------------------------------------------------
Root Cause (first observed failure):
[0]:
  time      : 2026-11-29_06:23:57
  host      : localhost
  rank      : 0 (local_rank: 0)
  exitcode  : 1 (pid: 11985)
  error_file: {error_file}
  traceback : Traceback (most recent call last):
    File "/work/train.py", line 94, in main
  RuntimeError: [../gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:1934.
=======================================================
"""


def _rank_folder(ranks: Path, local: int, stderr: str, error: str | None, t: float) -> Path:
    folder = ranks / "run_abc" / "attempt_0" / str(local)
    folder.mkdir(parents=True)
    (folder / "stdout.log").write_text("")
    (folder / "stderr.log").write_text(stderr)
    os.utime(folder / "stderr.log", (t, t))
    if error is not None:
        (folder / "error.json").write_text(json.dumps({"message": {"message": error, "extraInfo": {
            "py_callstack": f"Traceback (most recent call last):\n{error}\n", "timestamp": str(int(t))}}}))
        os.utime(folder / "error.json", (t, t))
    return folder


def test_report_block_is_parsed_root_cause_first(tmp_path):
    failures = parse_report(("[default0]:" if i % 2 else "") + line
                            for i, line in enumerate(REPORT.format(error_file="/e.json").splitlines()))
    assert [(f.rank, f.local_rank, f.exit_code, f.pid, f.root) for f in failures] == [
        (0, 0, 1, 11985, True), (1, 1, -11, 11986, False)]
    assert failures[0].error_file == "/e.json" and failures[1].error_file is None
    root, other = parse_report(REPORT.format(error_file="/e.json").splitlines())
    assert root.traceback == ("Traceback (most recent call last):", '  File "/work/train.py", line 94, in main',
                              "RuntimeError: [../gloo/transport/tcp/pair.cc:553] Connection closed by peer "
                              "[127.0.0.1]:1934.")
    assert other.traceback == ("Signal 11 (SIGSEGV) received by PID 11986",)
    assert parse_report(["nothing to see"]) == []


def test_the_last_report_counts_and_the_agent_line_stands_in_for_a_lost_one():
    first = REPORT.format(error_file="<N/A>").splitlines()
    second = [line.replace("11985", "22222") for line in first]
    (root, *_) = parse_report(first + ["restarted"] + second)
    assert root.pid == 22222 and root.root
    agent = ["E1129 api.py:1002] failed (exitcode: -9) local_rank: 1 (pid: 4242) of binary: /usr/bin/python3"]
    unreadable = [line for line in first if "exitcode" not in line]
    assert report_root(unreadable + agent) is None   # a report without a readable root: nothing stands in
    found = report_root(["noise", *agent])
    assert found is not None and (found.rank, found.local_rank, found.exit_code, found.pid) == (None, 1, -9, 4242)
    assert found.summary == "torchrun root cause: local_rank 1 exitcode -9 (pid 4242)"
    assert report_root(["nothing"]) is None


def test_dist_spec_round_trips_and_its_reader_is_strict():
    spec = DistSpec(nproc_per_node=2, nnodes=3, node_rank=1, rdzv_endpoint="h:29400", rdzv_id="7", node_timeout=12)
    assert DistSpec.from_json(json.loads(json.dumps(spec.to_json()))) == spec
    assert DistSpec.from_json({"nproc_per_node": 2}) == DistSpec(nproc_per_node=2)
    for bad, field in [({"nproc_per_node": "2"}, "nproc_per_node"), ({"nnodes": 2.0}, "nnodes"),
                       ({"node_rank": True}, "node_rank"), ({"rdzv_endpoint": 5}, "rdzv_endpoint"),
                       ({"rdzv_id": []}, "rdzv_id"), ({"node_timeout": "x"}, "node_timeout"),
                       ({"node_timeout": 0}, "node_timeout"), ([], "object"),
                       ({"nproc_per_node": 0}, "--nproc-per-node 0")]:
        with pytest.raises(ValueError, match=field):
            DistSpec.from_json(bad)


# --------------------------------------------------------------------------- root cause among ranks
def rank(r: int, code: int | None, *lines: str, t: float = 100.0, root: bool = False,
         message: str | None = None) -> RankReport:
    return RankReport(rank=r, local_rank=r, pid=1000 + r, exit_code=code, lines=lines, message=message, t=t,
                      root=root, folder=f"/run/ranks/{r}")


GLOO_PEER = "[rank0]: RuntimeError: [../gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:1934."
OOM = ("[rank1]: torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB. GPU 1 has a total "
       "capacity of 79.15 GiB of which 1.06 GiB is free.")


def test_rank_root_an_oom_beats_the_peer_loss_it_caused_even_when_torchrun_saw_that_first():
    verdict = rank_root([rank(0, 1, GLOO_PEER, t=100.0, root=True), rank(1, 1, OOM, t=100.5)],
                        step=12, oom_killed=False)
    assert verdict is not None and not verdict.secondary and verdict.t == 100.5
    failure = verdict.failure
    assert failure.kind is FailureKind.CUDA_OOM and failure.exit_code == 1 and failure.step == 12
    assert failure.evidence[0] == "root cause: rank 1 (local_rank 1, pid 1001) failed first: cuda_oom (exit 1)"
    assert failure.evidence[1].startswith("[rank1]: torch.OutOfMemoryError: CUDA out of memory")
    assert ("then rank 0 (local_rank 0, pid 1000): nccl_error (exit 1) — " + GLOO_PEER + " [a consequence]"
            in failure.evidence)
    assert failure.evidence[-1] == "logs: /run/ranks/1"


def test_rank_root_ranks_torchrun_stopped_are_consequences():
    traceback = ("Traceback (most recent call last):", '  File "/work/train.py", line 3, in main',
                 "ValueError: bad shard")
    verdict = rank_root([rank(0, -15, "training…", t=99.0), rank(1, 3, *traceback, t=101.0)],
                        step=None, oom_killed=False)
    assert verdict is not None and verdict.failure.kind is FailureKind.EXCEPTION and not verdict.secondary
    assert verdict.failure.evidence[0].startswith("root cause: rank 1 ")
    assert any(line.startswith("then rank 0 (local_rank 0, pid 1000): preempted (SIGTERM)") and
               line.endswith("[a consequence]") for line in verdict.failure.evidence)
    only = rank_root([rank(0, -15, "training…", t=99.0)], step=4, oom_killed=False, node=1)
    assert only is not None and only.secondary and only.failure.signal == "SIGTERM"
    assert only.failure.evidence[0] == ("root cause: rank 0 (local_rank 0, pid 1000) on node 1 failed first: "
                                        "preempted (SIGTERM)")


def test_rank_root_two_own_failures_the_earlier_then_torchruns_root_then_the_lower_rank():
    segv = "Fatal Python error: Segmentation fault"
    abort = "terminate called after throwing an instance of 'c10::Error'"
    earlier = rank_root([rank(0, -6, abort, t=50.0, root=True), rank(1, -11, segv, t=49.0)], step=3,
                        oom_killed=False)
    assert earlier is not None and earlier.failure.kind is FailureKind.SEGFAULT and earlier.failure.signal == "SIGSEGV"
    tie = rank_root([rank(0, -6, abort, t=50.0), rank(1, -11, segv, t=50.0, root=True)], step=3, oom_killed=False)
    assert tie is not None and tie.failure.kind is FailureKind.SEGFAULT
    lower = rank_root([rank(1, -11, segv), rank(0, -6, abort)], step=3, oom_killed=False)
    assert lower is not None and lower.failure.kind is FailureKind.ABORTED


def test_rank_root_an_oom_kill_is_the_cause_not_torchruns_stop_and_unknown_exits_count_as_1():
    killed = rank_root([rank(0, -15, t=99.0), rank(1, -9, t=100.0)], step=2, oom_killed=True)
    assert killed is not None and killed.failure.kind is FailureKind.HOST_OOM and not killed.secondary
    assert rank_root([rank(0, -9)], step=2, oom_killed=False).secondary   # torchrun's KILL after its grace
    unlisted = rank_root([RankReport(rank=1, local_rank=1, pid=None, exit_code=None, message="ValueError: boom")],
                         step=None, oom_killed=False)
    assert unlisted is not None and unlisted.failure.exit_code == 1
    assert unlisted.failure.evidence[0] == "root cause: rank 1 (local_rank 1) failed first: exit_nonzero (exit 1)"
    assert rank_root([rank(0, 0, "done")], step=5, oom_killed=False) is None
    assert rank_root([], step=5, oom_killed=False) is None


def test_a_segfault_beats_the_gloo_error_torchrun_saw_first(tmp_path):
    """torchrun names rank 0 (its gloo error has an error file, so it looks first); the
    segfault on rank 1 is what broke the collective."""
    ranks = tmp_path / "ranks"
    t = time.time() - 10
    err0 = _rank_folder(ranks, 0, "[rank0]: RuntimeError: [../gloo/transport/tcp/pair.cc:553] Connection closed "
                                  "by peer [127.0.0.1]:1934.\n",
                        "RuntimeError: [../gloo/transport/tcp/pair.cc:553] Connection closed by peer "
                        "[127.0.0.1]:1934.", t)
    _rank_folder(ranks, 1, "Fatal Python error: Segmentation fault\n\nCurrent thread 0x00007f (most recent call "
                           "first):\n  File \"/work/train.py\", line 39 in fire\n", None, t + 0.3)
    console = REPORT.format(error_file=err0 / "error.json").splitlines()
    reports = rank_reports(ranks, console)
    assert [(r.rank, r.exit_code, r.pid, r.root) for r in reports] == [(0, 1, 11985, True), (1, -11, 11986, False)]
    assert reports[0].message is not None and reports[0].message.startswith("RuntimeError: [../gloo")
    assert reports[0].t == pytest.approx(t) and reports[1].t == pytest.approx(t + 0.3)
    assert reports[1].folder == str(ranks / "run_abc" / "attempt_0" / "1")
    verdict = rank_root(reports, step=6, oom_killed=False)
    assert verdict is not None and not verdict.secondary
    failure = verdict.failure
    assert failure.kind is FailureKind.SEGFAULT and failure.signal == "SIGSEGV"
    assert failure.evidence[0].startswith("root cause: rank 1 (local_rank 1, pid 11986) failed first: segfault")
    assert any("then rank 0" in line and "[a consequence]" in line for line in failure.evidence)


def test_a_timeout_caused_by_an_oom_is_that_oom(tmp_path):
    """The waiting rank's collective times out before the OOM'd rank's error file is
    written: the OOM is still the root cause."""
    ranks = tmp_path / "ranks"
    t = time.time() - 10
    _rank_folder(ranks, 0, "", "RuntimeError: [../gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting "
                               "1800000ms for recv operation to complete", t)
    _rank_folder(ranks, 1, "", "OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB. GPU 1 has a "
                               "total capacity of 79.15 GiB of which 1.06 GiB is free.", t + 2)
    reports = rank_reports(ranks, [], rank_of={0: 4, 1: 5})   # several nodes: the global ranks from the pids
    assert [(r.rank, r.local_rank, r.exit_code, r.pid) for r in reports] == [(4, 0, None, None), (5, 1, None, None)]
    verdict = rank_root(reports, step=40, oom_killed=False)
    assert verdict is not None and verdict.failure.kind is FailureKind.CUDA_OOM
    assert "rank 5" in verdict.failure.evidence[0]


def test_error_files_are_read_bounded_never_a_device_or_a_fifo(tmp_path):
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    big = tmp_path / "big.json"
    big.write_text(json.dumps({"message": "x" * (1 << 20)}))
    for path in ("/dev/zero", fifo, big, tmp_path, tmp_path / "missing.json"):
        assert read_error_file(path) is None
    garbage = tmp_path / "garbage.json"
    garbage.write_bytes(b"\xff{")
    assert read_error_file(garbage) is None
    ranks = tmp_path / "ranks"
    _rank_folder(ranks, 0, "boom\n", None, time.time())
    for named in ("/dev/zero", str(fifo)):
        console = REPORT.format(error_file=named).splitlines()
        reports = rank_reports(ranks, console)   # returns: neither blocks nor reads forever
        assert [(r.rank, r.message) for r in reports] == [(0, None), (1, None)]


def test_innermost_frame_of_a_faulthandler_dump():
    dump = ('Thread 0x00007f01 (most recent call first):\n  File "/usr/lib/python3.11/threading.py", line 331 in '
            'wait\n\nCurrent thread 0x00007f00 (most recent call first):\n  File "/site-packages/torch/autograd/'
            'graph.py", line 979 in _engine_run_backward\n  File "/work/train.py", line 94 in main\n')
    frame = innermost_frame(dump)
    assert frame == 'File "/site-packages/torch/autograd/graph.py", line 979 in _engine_run_backward'
    assert in_torch(frame) and not in_torch('File "/work/train.py", line 41 in fire')
    assert innermost_frame("no dump here") is None


# --------------------------------------------------------------------------- the topologies
SPEC0 = DistSpec(nnodes=2, node_rank=0, rdzv_endpoint="h:1", node_timeout=5)
SPEC1 = DistSpec(nnodes=2, node_rank=1, rdzv_endpoint="h:1", node_timeout=5)


def test_make_topology_builds_each_shape_and_each_has_every_method_of_the_protocol(tmp_path):
    single = make_topology(None, tmp_path, tmp_path)
    ranks = make_topology(DistSpec(nproc_per_node=2), tmp_path, tmp_path)
    nodes = make_topology(SPEC1, node_dir(SPEC1, tmp_path), tmp_path)
    assert type(single) is Single and type(ranks) is Ranks and type(nodes) is Nodes
    wanted = {name for name in vars(Topology) if not name.startswith("_")}
    for topology in (ranks, nodes):
        assert wanted <= set(dir(topology)), wanted - set(dir(topology))
    assert (ranks.node, ranks.distributed, ranks.job_dir) == (None, True, tmp_path)
    assert (nodes.node, nodes.distributed, nodes.job_dir) == (1, True, tmp_path)
    assert DistSpec.from_json(nodes.to_json()) == SPEC1
    assert node_dir(SPEC1, tmp_path) == tmp_path / "nodes" / "node-1" and node_dir(SPEC0, tmp_path) == tmp_path
    assert job_dir_of(SPEC1, node_dir(SPEC1, tmp_path)) == tmp_path and job_dir_of(SPEC0, tmp_path) == tmp_path
    command = ranks.wrap((sys.executable, "train.py"), 3, tmp_path / "attempts" / "0003")
    assert f"--log-dir {(tmp_path / 'attempts' / '0003').resolve() / 'ranks'}" in " ".join(command)
    assert "--standalone" in command and "--rdzv-id" not in command
    failure = Failure(FailureKind.SEGFAULT, exit_code=-11)
    assert ranks.agree(3, failure, secondary=False, t_fail=None, interrupted=lambda: False) == Verdict(failure)
    assert ranks.dump_stacks() is True and ranks.rank_reports(["x"]) == ()   # no attempt started: nothing to read


def test_stale_rank_check_ignores_heartbeats_of_an_earlier_attempt(tmp_path):
    beats = tmp_path / "heartbeat"
    beats.mkdir()
    (beats / "rank-0").write_text(f"{os.getpid()}\n")
    old = time.time() - 100
    os.utime(beats / "rank-0", (old, old))
    ranks = Ranks(DistSpec(nproc_per_node=2), tmp_path)
    ranks.started(2, tmp_path / "attempts" / "0002", os.getppid())
    assert ranks.check(1.0, None) is None                    # older than the attempt: a previous rank's
    assert read_heartbeats(beats)[0].pid == os.getpid()


def test_a_stale_rank_of_this_attempt_is_a_hang(tmp_path):
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        beats = tmp_path / "heartbeat"
        beats.mkdir()
        ranks = Ranks(DistSpec(nproc_per_node=2), tmp_path)
        ranks.started(1, tmp_path / "attempts" / "0001", os.getpid())   # this process stands in for torchrun
        (beats / "rank-0").write_text(f"{child.pid}\n")
        (beats / "rank-1").write_text("\n")
        later = time.time() + 5
        os.utime(beats / "rank-1", (later, later))
        anomaly = ranks.watch.check(2.0, 7, now=time.time() + 4)
        assert anomaly is not None and anomaly.kind is FailureKind.HANG and anomaly.step == 7
        assert anomaly.reason.startswith("rank 0: no heartbeat for 4.") and "while rank 1 still beat" in anomaly.reason
    finally:
        child.kill()
        child.wait()


def _beating(coordinator: Coordinator) -> Coordinator:
    coordinator.BEAT = 0.05
    coordinator.start()
    return coordinator


def test_node_0_gathers_the_root_cause_and_announces_its_loops_decision(tmp_path):
    said: list[tuple[str, str]] = []
    lead = _beating(Coordinator(SPEC0, tmp_path / "coord", say=lambda m, level: said.append((m, level))))
    follow = _beating(Coordinator(SPEC1, tmp_path / "coord"))
    segv = Failure(FailureKind.SEGFAULT, exit_code=-11, signal="SIGSEGV", step=6, evidence=("rank 1: SIGSEGV",))
    consequence = Failure(FailureKind.NCCL_ERROR, exit_code=1, step=6, evidence=("Connection closed by peer",))
    decision = Decision(Action.ROLLBACK, reason="segfault: roll back", rule=2, overrides={"train.batch_size": 8},
                        resume_from="/ckpt/step-00000004.pt", resume_step=4, skip=((5, 9),), quarantine_after=4)
    result: dict[str, Verdict] = {}
    thread = threading.Thread(target=lambda: result.update(follower=follow.agree(
        1, segv, secondary=False, t_fail=time.time() + 1, interrupted=lambda: False)))
    thread.start()
    try:
        verdict = lead.agree(1, consequence, secondary=True, t_fail=time.time(), interrupted=lambda: False)
        assert verdict.must_decide and verdict.decision is None
        root = verdict.failure
        assert root is not None and root.kind is FailureKind.SEGFAULT and root.evidence[0] == "node 1: rank 1: SIGSEGV"
        assert thread.is_alive()   # the follower waits for the decision, which only the loop makes
        lead.announce(1, root, decision)
        thread.join(10)
    finally:
        lead.close()
        follow.close()
    assert result["follower"] == Verdict(root, decision, must_decide=False)
    assert ("root cause of attempt 1 is on node 1: segfault", "warn") in said
    recorded = json.loads((tmp_path / "coord/0001/decision.json").read_text())
    assert recorded["node"] == 1 and recorded["failure"]["kind"] == "segfault"
    assert recorded["decision"]["quarantine_after"] == 4 and set(recorded["outcomes"]) == {"0", "1"}
    assert (tmp_path / "coord/0001/failed").exists()


def test_pick_root_own_failures_first_then_the_earliest_then_the_lowest_node():
    oom = Failure(FailureKind.CUDA_OOM, evidence=("rank 3: OOM",))
    term = Failure(FailureKind.PREEMPTED, evidence=("SIGTERM",))
    outcomes = [NodeOutcome(0, term, secondary=True, t_fail=1.0), NodeOutcome(2, oom, t_fail=5.0),
                NodeOutcome(1, oom, t_fail=5.0), NodeOutcome(3, None)]
    assert pick_root(4, outcomes, {}, now=10.0) == (1, Failure(FailureKind.CUDA_OOM, evidence=("node 1: rank 3: OOM",)))
    node, lost = pick_root(4, outcomes, {3: 7.0}, now=10.0)   # silent since t=3: before the OOMs
    assert node == 3 and lost is not None and lost.kind is FailureKind.KILLED and "node 3 lost" in lost.evidence[0]
    assert pick_root(4, [NodeOutcome(0, None), NodeOutcome(1, None)], {}, now=1.0) == (None, None)


def test_when_no_node_failed_every_node_hears_so(tmp_path):
    lead = _beating(Coordinator(SPEC0, tmp_path / "coord"))
    follow = Coordinator(SPEC1, tmp_path / "coord")
    try:
        follow.publish_outcome(5, NodeOutcome(1, None))
        assert lead.agree(5, None, secondary=False, t_fail=1.0, interrupted=lambda: False) == \
            Verdict(None, None, must_decide=False)
        assert follow.agree(5, None, secondary=False, t_fail=1.0, interrupted=lambda: False) == \
            Verdict(None, None, must_decide=False)
    finally:
        lead.close()


def test_a_node_that_never_reports_is_lost_after_the_node_timeout(tmp_path):
    spec = DistSpec(nnodes=2, node_rank=0, rdzv_endpoint="h:1", node_timeout=0.5)
    lead = _beating(Coordinator(spec, tmp_path / "coord"))
    t0 = time.monotonic()
    try:
        verdict = lead.agree(3, None, secondary=False, t_fail=time.time(), interrupted=lambda: False)
    finally:
        lead.close()
    assert 0.5 <= time.monotonic() - t0 < 5
    assert verdict.must_decide and verdict.decision is None
    assert verdict.failure is not None and verdict.failure.kind is FailureKind.KILLED
    assert "node 1 lost" in verdict.failure.evidence[0]


@pytest.mark.parametrize("content", [b"{garbage", b"[1, 2]", b'{"node": "1", "failure": null}',
                                     b'{"node": 1, "failure": {"kind": "nope"}}', b'{"node": 1, "secondary": "no"}'])
def test_an_unreadable_outcome_of_another_node_counts_as_missing(tmp_path, content):
    spec = DistSpec(nnodes=2, node_rank=0, rdzv_endpoint="h:1", node_timeout=0.5)
    said: list[tuple[str, str]] = []
    lead = _beating(Coordinator(spec, tmp_path / "coord", say=lambda m, level: said.append((m, level))))
    (tmp_path / "coord/0002").mkdir(parents=True)
    (tmp_path / "coord/0002/outcome-node-1.json").write_bytes(content)
    try:
        verdict = lead.agree(2, None, secondary=False, t_fail=time.time(), interrupted=lambda: False)
    finally:
        lead.close()
    assert verdict.failure is not None and "node 1 lost" in verdict.failure.evidence[0]
    warnings = [m for m, level in said if level == "warn" and "outcome-node-1.json: unreadable" in m]
    assert len(warnings) == 1, said   # once, not on every poll


@pytest.mark.parametrize("content, problem", [(b"{garbage", "unreadable"), (b"[]", "expected an object"),
                                              (b'{"failure": null, "decision": {"action": "explode"}}', "action"),
                                              (b'{"failure": null, "decision": {"action": "stop", "rule": [1]}}',
                                               "rule")])
def test_a_decision_that_does_not_decode_is_one_run_dir_error(tmp_path, content, problem):
    path = tmp_path / "coord/0001/decision.json"
    path.parent.mkdir(parents=True)
    path.write_bytes(content)
    follow = Coordinator(SPEC1, tmp_path / "coord")
    with pytest.raises(RunDirError, match=problem) as caught:
        follow.agree(1, None, secondary=False, t_fail=1.0, interrupted=lambda: False)
    assert str(path) in str(caught.value) and "\n" not in str(caught.value)
    assert read_decision(tmp_path / "missing.json") is None


def test_an_interrupted_node_0_tells_the_others_to_stop(tmp_path):
    spec0 = DistSpec(nnodes=2, node_rank=0, rdzv_endpoint="h:1", node_timeout=30)
    spec1 = DistSpec(nnodes=2, node_rank=1, rdzv_endpoint="h:1", node_timeout=30)
    lead = Coordinator(spec0, tmp_path / "coord")
    follow = Coordinator(spec1, tmp_path / "coord")
    lead.dir.mkdir()
    preempted = Failure(FailureKind.PREEMPTED, exit_code=-15, signal="SIGTERM", evidence=("SIGTERM",))
    assert lead.agree(2, preempted, secondary=False, t_fail=time.time(), interrupted=lambda: True) == \
        Verdict(preempted, None, must_decide=False)
    t0 = time.monotonic()
    verdict = follow.agree(2, None, secondary=False, t_fail=time.time(), interrupted=lambda: False)
    assert time.monotonic() - t0 < 2
    assert verdict.decision is not None and verdict.decision.action is Action.STOP
    assert "node 0 was interrupted during attempt 2" in verdict.decision.reason
    assert verdict.failure == preempted and not verdict.must_decide
    mine = Failure(FailureKind.KILLED, evidence=("x",))   # interrupted itself: no wait, nothing decided
    assert follow.agree(3, mine, secondary=False, t_fail=1.0, interrupted=lambda: True) == \
        Verdict(mine, None, must_decide=False)


def test_a_follower_whose_node_0_is_lost_stops(tmp_path):
    spec1 = DistSpec(nnodes=2, node_rank=1, rdzv_endpoint="h:1", node_timeout=0.3)
    follow = Coordinator(spec1, tmp_path / "coord")
    follow.dir.mkdir()
    verdict = follow.agree(4, None, secondary=False, t_fail=1.0, interrupted=lambda: False)
    assert verdict.decision is not None and verdict.decision.action is Action.STOP and not verdict.must_decide
    assert verdict.failure is not None and verdict.failure.kind is FailureKind.KILLED
    assert "node 0 lost while this node waited for its decision on attempt 4" in verdict.decision.reason


def test_a_rejoining_node_adopts_node_0s_state(tmp_path):
    from ftrain.inject import parse_inject

    said: list[str] = []
    lead = Coordinator(SPEC0, tmp_path / "coord")
    follow = Coordinator(SPEC1, tmp_path / "coord", say=lambda m, level: said.append(m))
    leader = RunState(attempt=4, config={"train": {"batch_size": 4}}, overrides={"train.batch_size": 4},
                      skip=[(100, 199)], inject=list(parse_inject("oom@300")), resume_from="/c/step-99.pt",
                      resume_step=99, restarts=4, rule_uses={1: 2, 3: 2}, rollbacks=[(150, 99)],
                      set_aside=[(99, 12.5)], best_step=160)
    assert lead.before_attempt(leader) is leader
    assert json.loads((tmp_path / "coord/0005/state.json").read_text())["attempt"] == 4
    behind = RunState(attempt=2, config={"train": {"batch_size": 16}})
    adopted = follow.before_attempt(behind)
    assert adopted == leader and adopted.attempt + 1 == 5
    assert said == ["rejoining the job at attempt 5 (node 0's state)"]
    ahead = RunState(attempt=7)
    assert follow.before_attempt(ahead) is ahead   # node 0's newest state is older: keep this node's


def test_an_unreadable_state_of_node_0_is_not_adopted(tmp_path):
    said: list[str] = []
    follow = Coordinator(SPEC1, tmp_path / "coord", say=lambda m, level: said.append(m))
    (tmp_path / "coord/0003").mkdir(parents=True)
    (tmp_path / "coord/0003/state.json").write_text('{"attempt": "two"}')
    own = RunState(attempt=1)
    assert follow.before_attempt(own) is own
    assert len(said) == 1 and "state.json: unreadable (attempt: expected an integer" in said[0]


def test_a_node_stopped_for_another_nodes_failure_is_a_consequence(tmp_path):
    lead = Nodes(SPEC0, tmp_path, tmp_path, say=lambda m, level: None)
    other = Coordinator(SPEC1, tmp_path / "coord")
    lead.coordinator.BEAT = other.BEAT = 0.05
    lead.open()
    other.start()
    try:
        lead.started(1, tmp_path / "attempts" / "0001", os.getpid())
        assert lead.check(30.0, 3) is None
        segv = Failure(FailureKind.SEGFAULT, exit_code=-11, signal="SIGSEGV", step=3, evidence=("rank 2: SIGSEGV",))
        other.publish_outcome(1, NodeOutcome(1, segv, t_fail=time.time() + 60))   # a later clock, even
        time.sleep(CHECK_EVERY)   # the next look at coord/ is due
        peer = lead.check(30.0, 3)
        assert peer is not None and peer.kind is FailureKind.SEGFAULT and peer.step == 3
        assert peer.reason == "node 1 reported segfault in attempt 1: stopping this node's ranks"
        stopped = peer.to_failure()
        verdict = lead.agree(1, stopped, secondary=False, t_fail=None, interrupted=lambda: False)
    finally:
        lead.close()
        other.close()
    assert verdict.must_decide and verdict.failure is not None
    assert verdict.failure.evidence[0] == "node 1: rank 2: SIGSEGV"
    mine = json.loads((tmp_path / "coord/0001/outcome-node-0.json").read_text())
    assert mine["secondary"] is True


# --------------------------------------------------------------------------- one machine, two ranks
def test_segfault_on_rank_1_is_the_root_cause_and_the_job_finishes(tmp_path, job):
    policy, config = job()
    code, run, out, watch = run_two_ranks(tmp_path, policy, config, env={"DIST_FAULT": "segv@7"})
    assert code == 0, out
    evts = events(run)
    (failure,) = of(evts, "failure")
    assert failure["kind"] == "segfault" and failure["signal"] == "SIGSEGV" and failure["exit_code"] == -11
    assert failure["evidence"][0].startswith("root cause: rank 1 (local_rank 1")
    assert any("Segmentation fault" in line for line in failure["evidence"])
    (decision,) = of(evts, "decision")
    assert decision["action"] == "restart" and decision["resume_step"] == 4
    assert evts[-1]["status"] == "succeeded" and [e["attempt"] for e in of(evts, "attempt_start")] == [1, 2]
    ranks = list((run / "attempts/0001/ranks").glob("*/attempt_0/1/stderr.log"))
    assert ranks and "Segmentation fault" in ranks[0].read_text()
    assert "[default1]:" in (run / "attempts/0001/output.log").read_text()   # the console still shows ranks
    assert_no_rank_survives(watch, run)


def test_oom_on_rank_0_halves_the_batch_of_every_rank(tmp_path, job):
    policy, config = job()
    code, run, out, watch = run_two_ranks(tmp_path, policy, config, "--inject", "oom@7")
    assert code == 0, out
    evts = events(run)
    (failure,) = of(evts, "failure")
    assert failure["kind"] == "cuda_oom" and failure["evidence"][0].startswith("root cause: rank 0 (local_rank 0")
    (decision,) = of(evts, "decision")
    assert decision["overrides"] == {"train.batch_size": 8}
    second = (run / "attempts/0002/output.log").read_text()
    assert len(re.findall(r"rank \d pid \d+ world 2 batch_size 8", second)) == 2
    # attempt 2's torchrun was the spare started during attempt 1, its imports done
    starts = of(evts, "attempt_start")
    assert [s["warm"] for s in starts] == [False, True]
    spares = [p for p in psutil.process_iter(["cmdline", "cwd"])   # the one started in attempt 2 went with the run
              if (p.info["cmdline"] or [])[-2:] == ["-m", "torch.distributed.run"] and p.info["cwd"] == str(tmp_path)]
    assert not spares
    errors = list((run / "attempts/0001/ranks").glob("*/attempt_0/0/error.json"))   # written by the shim
    assert errors and "OutOfMemoryError" in json.loads(errors[0].read_text())["message"]["message"]
    assert_no_rank_survives(watch, run)


def test_a_rank_stuck_outside_a_collective_is_a_hang_with_every_rank_stack(tmp_path, job):
    policy, config = job(hang="4s")
    code, run, out, watch = run_two_ranks(tmp_path, policy, config, env={"DIST_FAULT": "hang@7"})
    assert code == 0, out
    evts = events(run)
    (failure,) = of(evts, "failure")
    assert failure["kind"] == "hang"
    text = "\n".join(failure["evidence"])
    assert "rank 1 stuck outside torch" in text and "in fire" in text
    assert re.search(r"rank 0 stack: File \".*/torch/", text)
    first_end = of(evts, "attempt_end")[0]
    assert first_end["signal"] != "SIGUSR1"    # torchrun was never sent SIGUSR1
    for local in (0, 1):   # each rank dumped its stacks into its own stderr.log
        (log,) = (run / "attempts/0001/ranks").glob(f"*/attempt_0/{local}/stderr.log")
        assert "most recent call first" in log.read_text()
    assert evts[-1]["status"] == "succeeded"
    assert_no_rank_survives(watch, run)


# --------------------------------------------------------------------------- two nodes on one machine
def start_node(tmp_path: Path, k: int, port: int, policy: Path, config: Path, env: dict[str, str] | None = None,
               name: str | None = None) -> subprocess.Popen:
    return start(tmp_path, "run", DIST, "--nnodes", "2", "--node-rank", str(k), "--rdzv-endpoint",
                 f"127.0.0.1:{port}", "--policy", str(policy), "--config", str(config), "--run-dir",
                 str(tmp_path / "run"), "--no-ui", env={"FTRAIN_NODE_TIMEOUT": "5", **(env or {})},
                 name=name or f"node{k}")


def decisions(run_dir: Path) -> list[dict]:
    return [{k: e[k] for k in ("attempt", "action", "resume_from", "resume_step", "overrides", "skip_steps")}
            for e in of(events(run_dir), "decision")]


def test_two_nodes_agree_on_the_decision_after_a_fault_on_one(tmp_path, job):
    policy, config = job(hang="8s")
    run = tmp_path / "run"
    watch = PidWatch(run / "heartbeat", run / "nodes/node-1/heartbeat")
    port = free_port()
    node0 = start_node(tmp_path, 0, port, policy, config)
    node1 = start_node(tmp_path, 1, port, policy, config, env={"DIST_FAULT": "segv@7", "DIST_FAULT_RANK": "*"})
    assert finish(node0, 180) == 0, (tmp_path / "node0.out").read_text()
    assert finish(node1, 60) == 0, (tmp_path / "node1.out").read_text()
    lead, other = events(run), events(run / "nodes/node-1")
    assert decisions(run) == decisions(run / "nodes/node-1") and decisions(run)[0]["resume_step"] == 4
    assert [e["attempt"] for e in of(lead, "attempt_start")] == [e["attempt"] for e in of(other, "attempt_start")]
    assert lead[-1]["status"] == other[-1]["status"] == "succeeded"
    verdict = json.loads((run / "coord/0001/decision.json").read_text())
    assert verdict["node"] == 1 and verdict["failure"]["kind"] == "segfault"
    assert of(other, "failure")[0]["kind"] == "segfault"
    assert_no_rank_survives(watch, run, run / "nodes/node-1")


def test_a_node_killed_outright_is_noticed_and_rejoins_when_resumed(tmp_path, job):
    policy, config = job(hang="8s")
    config.write_text(CONFIG.replace("steps: 20", "steps: 60"))   # far from done when node 1 is killed
    run = tmp_path / "run"
    watch = PidWatch(run / "heartbeat", run / "nodes/node-1/heartbeat")
    port = free_port()
    node0 = start_node(tmp_path, 0, port, policy, config)
    node1 = start_node(tmp_path, 1, port, policy, config)
    metrics = run / "metrics.jsonl"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        steps = [json.loads(line).get("step") for line in metrics.read_text().splitlines()
                 if '"loss"' in line] if metrics.exists() else []
        if steps and max(steps) >= 8:
            break
        time.sleep(0.05)
    else:
        pytest.fail("the two nodes never reached step 8")
    tree = [psutil.Process(node1.pid)] + psutil.Process(node1.pid).children(recursive=True)
    for p in tree:   # the whole node at once: its ftrain, torchrun and rank
        p.kill()
    killed_at = time.monotonic()
    node1.wait()
    verdict_path = run / "coord/0001/decision.json"
    while not verdict_path.exists() and time.monotonic() - killed_at < 30:
        time.sleep(0.05)
    noticed = time.monotonic() - killed_at
    assert verdict_path.exists() and noticed < 5 + 10, f"node 0 took {noticed:.1f} s to decide"
    verdict = json.loads(verdict_path.read_text())
    assert verdict["failure"]["kind"] == "killed" and verdict["decision"]["action"] == "restart"
    resumed = start(tmp_path, "resume", str(run / "nodes/node-1"), "--no-ui", env={"FTRAIN_NODE_TIMEOUT": "5"},
                    name="node1b")
    assert finish(node0, 180) == 0, (tmp_path / "node0.out").read_text()
    assert finish(resumed, 60) == 0, (tmp_path / "node1b.out").read_text()
    lead, other = events(run), events(run / "nodes/node-1")
    assert lead[-1]["status"] == other[-1]["status"] == "succeeded"
    assert of(lead, "attempt_start")[-1]["attempt"] == of(other, "attempt_start")[-1]["attempt"]
    assert of(lead, "attempt_start")[-1]["resume_step"] == of(other, "attempt_start")[-1]["resume_step"]
    assert_no_rank_survives(watch, run, run / "nodes/node-1")
