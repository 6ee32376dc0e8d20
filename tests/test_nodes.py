"""Lost nodes (issue 14): the deciding role moves to the lowest surviving node of an elastic
job (``--nnodes MIN:MAX``), which goes on with the nodes that remain; a fixed-size job stops.

The coordinator is tested on files; the whole path with two ftrains on loopback, each with
its torchrun and ranks, node 0 killed outright.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import psutil
import pytest
from conftest import events, of
from test_distributed import DIST, PidWatch, assert_no_rank_survives, finish, free_port, start

from ftrain.coord import Coordinator, read_decision
from ftrain.errors import UsageError
from ftrain.kinds import Failure, FailureKind
from ftrain.policy import Action, Decision
from ftrain.state import RunState
from ftrain.torchrun import DistSpec, parse_nnodes, torchrun_command

pytest.importorskip("torch.distributed")


def spec(node: int, *, nnodes: int = 2, least: int | None = 1, timeout: float = 0.3,
         endpoint: str = "127.0.0.1:29400") -> DistSpec:
    return DistSpec(nnodes=nnodes, node_rank=node, rdzv_endpoint=endpoint, node_timeout=timeout, min_nodes=least)


# --------------------------------------------------------------------------- the flags
def test_nnodes_min_max_is_torchruns_spelling_and_bad_ranges_are_one_line() -> None:
    assert parse_nnodes("2") == (2, 2) and parse_nnodes("1:3") == (1, 3) and parse_nnodes(4) == (4, 4)
    for bad in ("3:2", "a", "1:", ":2", "1.5"):
        with pytest.raises(UsageError, match="--nnodes"):
            parse_nnodes(bad)
    s = DistSpec.from_cli(1, "1:2", 1, "h:29400", env={})
    assert s is not None and (s.min_nodes, s.nnodes, s.elastic, s.nnodes_text) == (1, 2, True, "1:2")
    fixed = DistSpec.from_cli(1, "2:2", 1, "h:29400", env={})
    assert fixed is not None and not fixed.elastic and fixed.nnodes_text == "2"
    assert DistSpec.from_json(s.to_json()) == s


def test_the_deciding_node_serves_the_rendezvous_and_an_elastic_one_closes_soon(tmp_path: Path) -> None:
    text = " ".join(torchrun_command(spec(1), ["python", "t.py"], tmp_path, rdzv_id="j-1"))
    assert "--nnodes 1:2" in text and "is_host=0,last_call_timeout=3" in text
    text = " ".join(torchrun_command(spec(1), ["python", "t.py"], tmp_path, rdzv_id="j-1", serve=True,
                                     rdzv_endpoint="n2:29400"))
    assert "is_host=1," in text and "--rdzv-endpoint n2:29400" in text
    text = " ".join(torchrun_command(spec(0, least=None), ["python", "t.py"], tmp_path, rdzv_id="j-1"))
    assert "--nnodes 2 " in text and "is_host=1" in text and "last_call_timeout" not in text


# --------------------------------------------------------------------------- the coordinator
def test_an_elastic_follower_whose_deciding_node_is_lost_takes_over_and_decides(tmp_path: Path) -> None:
    follow = Coordinator(spec(1), tmp_path / "coord")
    follow.BEAT = 0.05
    follow.start()
    try:
        mine = Failure(FailureKind.EXCEPTION, step=7, evidence=("RuntimeError: Connection closed by peer",))
        verdict = follow.agree(3, mine, secondary=True, t_fail=time.time(), interrupted=lambda: False)
        assert verdict.must_decide and verdict.decision is None
        assert verdict.failure is not None and verdict.failure.kind is FailureKind.KILLED   # node 0's loss, the root
        assert "node 0 lost" in verdict.failure.evidence[0]
        lead = json.loads((tmp_path / "coord/lead.json").read_text())
        assert (lead["node"], lead["attempt"], lead["after"]) == (1, 3, 0) and follow.is_lead
        decision = Decision(Action.RESTART, reason="killed: restart")
        follow.announce(3, verdict.failure, decision)
        record = json.loads((tmp_path / "coord/0003/decision.json").read_text())
        assert record["leader"] == 1 and read_decision(tmp_path / "coord/0003/decision.json") == (verdict.failure,
                                                                                               decision)
        state = RunState(config={}, inject=[])
        state.attempt = 3
        follow.before_attempt(state)   # it publishes the state the next attempt starts from
        assert RunState.from_json(json.loads((tmp_path / "coord/0004/state.json").read_text())).attempt == 3
        follow.start_attempt(4)
        assert follow.peer_trouble(4) is None   # the lost node is not of this attempt
        assert follow.rdzv_endpoint() == "127.0.0.1:29400"   # loopback: every node is here
    finally:
        follow.close()
    other = Coordinator(spec(2, nnodes=3, endpoint="n0:29400"), tmp_path / "coord")
    other.start()   # a node that (re)starts reads who decides now, and where the rendezvous moves
    try:
        assert other.lead == 1 and not other.is_lead
        assert other.rdzv_endpoint() == f"{lead['host']}:29400"
    finally:
        other.close()


def test_a_fixed_size_job_stops_when_its_deciding_node_is_lost(tmp_path: Path) -> None:
    follow = Coordinator(spec(1, least=None), tmp_path / "coord")
    follow.dir.mkdir()
    verdict = follow.agree(4, None, secondary=False, t_fail=1.0, interrupted=lambda: False)
    assert verdict.decision is not None and verdict.decision.action is Action.STOP and not verdict.must_decide
    assert "--nnodes MIN:2 would let the others go on without it" in verdict.decision.reason
    assert not (tmp_path / "coord/lead.json").exists()


# --------------------------------------------------------------------------- two ftrains on loopback
POLICY = """
version: 1
max_restarts: 4
grace: 3s
backoff: 0s
detect:
  hang: {timeout: 15s, startup: 90s}
rules:
  - when: [segfault, aborted, killed, nccl_error, hang, preempted, exit_nonzero, exception]
    action: restart
"""


def two_node_job(tmp_path: Path, steps: int) -> tuple[list[str], Path, PidWatch]:
    """An elastic two-node job on loopback: the flags both ftrains share, its run folder, a
    watch on every rank's pid."""
    policy, config = tmp_path / "policy.yaml", tmp_path / "config.yaml"
    policy.write_text(POLICY)
    config.write_text(f"train: {{steps: {steps}, batch_size: 16, ckpt_every: 5, sleep: 0.05}}\n")
    run = tmp_path / "run"
    common = ["--nnodes", "1:2", "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "--policy", str(policy),
              "--config", str(config), "--run-dir", str(run), "--no-ui"]
    return common, run, PidWatch(run / "heartbeat", run / "nodes/node-1/heartbeat")


def start_node(tmp_path: Path, *args: str, name: str):
    return start(tmp_path, *args, env={"FTRAIN_NODE_TIMEOUT": "3", "DIST_GLOO_TIMEOUT": "30"}, name=name)


def wait_for_step(run: Path, n: int, timeout: float) -> None:
    """Until the job's newest logged step is at least ``n``."""
    metrics = run / "metrics.jsonl"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        steps = [json.loads(line).get("step") for line in metrics.read_text().splitlines()
                 if '"loss"' in line] if metrics.exists() else []
        if steps and steps[-1] >= n:
            return
        time.sleep(0.05)
    pytest.fail(f"the job never reached step {n}")


def kill_node(proc) -> None:
    """A whole machine at once: its ftrain, torchrun and ranks."""
    for p in [psutil.Process(proc.pid)] + psutil.Process(proc.pid).children(recursive=True):
        p.kill()
    proc.wait()


def test_losing_node_0_moves_the_decision_and_the_job_finishes_on_the_node_left(tmp_path: Path) -> None:
    common, run, watch = two_node_job(tmp_path, 40)
    node0 = start_node(tmp_path, "run", DIST, "--node-rank", "0", *common, name="node0")
    node1 = start_node(tmp_path, "run", DIST, "--node-rank", "1", *common, name="node1")
    wait_for_step(run, 8, 120)
    kill_node(node0)   # the deciding machine
    out = tmp_path / "node1.out"
    assert finish(node1, 240) == 0, out.read_text()[-4000:]
    mine = events(run / "nodes/node-1")
    assert mine[-1]["status"] == "succeeded"
    lead = json.loads((run / "coord/lead.json").read_text())
    assert lead["node"] == 1 and lead["after"] == 0
    first = of(mine, "decision")[0]
    assert first["attempt"] == 1 and first["action"] == "restart"
    verdict = json.loads((run / "coord/0001/decision.json").read_text())
    assert verdict["leader"] == 1 and verdict["failure"]["kind"] == "killed" and verdict["node"] == 0
    text = out.read_text()
    assert "this node (node 1) decides from attempt 1 on" in text
    starts = of(mine, "attempt_start")
    assert len(starts) >= 2 and "is_host=1" in " ".join(starts[1]["command"])
    assert starts[1]["resume_step"] is not None and starts[1]["resume_step"] >= 4
    worlds = [line for line in (run / "nodes/node-1/attempts/0002/output.log").read_text().splitlines()
              if " world " in line]
    assert worlds and all(" world 1 " in line for line in worlds), worlds   # the job went on with one node
    assert_no_rank_survives(watch, run / "nodes/node-1")


def test_node_0_resumed_after_losing_its_role_follows_the_new_deciding_node_and_rejoins(tmp_path: Path) -> None:
    """Node 0 comes back while node 1 trains alone: it reads coord/lead.json, follows node 1
    and joins the group. Today it joins the attempt under way: torchrun's elastic agent on
    node 1 stops for the newcomer, which ftrain sees as a hang, and the next attempt runs
    on both nodes again (world 2). Joining at the attempt boundary instead is not done."""
    common, run, watch = two_node_job(tmp_path, 120)
    node0 = start_node(tmp_path, "run", DIST, "--node-rank", "0", *common, name="node0")
    node1 = start_node(tmp_path, "run", DIST, "--node-rank", "1", *common, name="node1")
    wait_for_step(run, 8, 120)
    kill_node(node0)
    deadline = time.monotonic() + 60
    while not (run / "coord/lead.json").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert (run / "coord/lead.json").exists(), (tmp_path / "node1.out").read_text()[-3000:]
    wait_for_step(run, 30, 120)   # node 1 trains alone
    back = start_node(tmp_path, "resume", str(run), "--no-ui", name="node0b")
    assert finish(node1, 240) == 0, (tmp_path / "node1.out").read_text()[-4000:]
    assert finish(back, 60) == 0, (tmp_path / "node0b.out").read_text()[-4000:]
    assert "waiting for node 1's decision" in (tmp_path / "node0b.out").read_text()   # it follows node 1
    assert json.loads((run / "coord/0002/decision.json").read_text())["leader"] == 1   # node 1 kept the role
    assert events(run)[-1]["status"] == events(run / "nodes/node-1")[-1]["status"] == "succeeded"
    worlds = " ".join(line for line in (tmp_path / "node0b.out").read_text().splitlines() if " world " in line)
    assert " world 2 " in worlds, worlds   # it rejoined: the group is two nodes again
    assert_no_rank_survives(watch, run, run / "nodes/node-1")
