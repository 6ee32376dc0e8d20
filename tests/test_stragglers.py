"""Stragglers: per-rank step times from the heartbeats, a score per rank, a ``straggler``
anomaly that is reported (live and in ``inspect``) and that a rule may act on.

The end-to-end tests run the real 2-rank DDP job of the distributed tests
(tests/children/dist_train.py, gloo on CPU) where rank 1 sleeps longer per step inside its
``ftrain.timed()`` section (``DIST_SLOW_RANK``), and the same job balanced.
"""

from __future__ import annotations

import json
import subprocess
import time

import pytest
from conftest import events, ftrain_cmd, of
from test_distributed import DIST, PidWatch, assert_no_rank_survives, finish, start

import ftrain
from ftrain.detect import Stragglers, StragglerSpec
from ftrain.errors import PolicyError
from ftrain.kinds import FailureKind
from ftrain.policyfile import load_policy
from ftrain.ranks import RankWatch, read_heartbeats

pytest.importorskip("torch.distributed")


# --------------------------------------------------------------------------- values
def test_a_rank_persistently_slower_by_the_factor_is_a_straggler_once():
    watch = Stragglers(StragglerSpec(factor=1.5, window=10))
    even = {0: [0.040] * 10, 1: [0.041] * 10}
    assert watch.check(even, 10) is None
    assert 0.97 < watch.last[1] < 1.03
    slow = {0: [0.040] * 12, 1: [0.040] * 4 + [0.090] * 8}   # slow in more than half of its window
    found = watch.check(slow, 12)
    assert found is not None and found.kind is FailureKind.STRAGGLER and found.metric == "step_time"
    assert found.reason.startswith("rank 1 straggling: rank 1's median step time 0.09 s over its last 10 steps "
                                   "is 2.25x the other ranks' 0.04 s (straggler factor 1.5)")
    assert found.evidence == ("rank 0: median step time 0.04 s, score 0.44",
                              "rank 1: median step time 0.09 s, score 2.25")
    assert watch.check(slow, 13) is None   # once per rank per attempt
    watch.start_attempt()
    assert watch.check(slow, 14) is not None


def test_one_slow_step_or_a_short_window_is_not_a_straggler():
    watch = Stragglers(StragglerSpec(factor=1.5, window=10))
    spiky = {0: [0.04] * 10, 1: [0.04] * 6 + [2.0] * 4}      # a save, a page fault: a minority of the window
    assert watch.check(spiky, 10) is None
    assert watch.check({0: [0.04] * 10, 1: [0.2] * 9}, 10) is None   # rank 1's window is not full yet
    assert watch.check({0: [0.2] * 30}, 30) is None                  # one rank: nobody to compare with


def test_with_many_ranks_the_score_is_against_the_median_of_the_others():
    watch = Stragglers(StragglerSpec(factor=1.5, window=5))
    times = {r: [0.1] * 5 for r in range(7)} | {3: [0.16] * 5, 5: [0.3] * 5}
    found = watch.check(times, 5)
    assert found is not None and found.reason.startswith("rank 5, 3 straggling: rank 5's")
    assert watch.last[3] == pytest.approx(1.6) and watch.last[0] == pytest.approx(1.0)


def test_policy_spelling_defaults_and_errors(tmp_path):
    def policy(text: str):
        p = tmp_path / "p.yaml"
        p.write_text("version: 1\n" + text)
        return load_policy(p)

    assert policy("rules: []\n").detect.straggler == StragglerSpec(factor=1.5, window=20)
    assert policy("detect: {straggler: {factor: 2, window: 8}}\n").detect.straggler == StragglerSpec(2.0, 8)
    assert policy("detect: {straggler: false}\n").detect.straggler is None
    rule = policy("rules:\n  - when: straggler\n    action: ignore\n").rules[0]
    assert rule.kinds == {FailureKind.STRAGGLER}
    for bad, message in [("detect: {straggler: {factor: 1}}\n", "straggler: needs factor > 1"),
                         ("detect: {straggler: {window: 2}}\n", "window"),
                         ("detect: {straggler: {speed: 2}}\n", "speed"),
                         ("detect: {straggler: 3}\n", "must be a mapping (factor, window) or false")]:
        with pytest.raises(PolicyError, match=r"p\.yaml:\d+") as err:
            policy(bad)
        assert message in str(err.value) and "\n" not in str(err.value).strip()


def test_the_heartbeat_carries_pid_step_and_step_times_and_timed_sections_count(tmp_path, monkeypatch):
    from ftrain.shim import ProcessState, metrics

    st = ProcessState({"FTRAIN_RUN_DIR": str(tmp_path), "RANK": "1"})
    for step in range(5):
        st.last_step = step
        with_section = step % 2 == 0
        if with_section:
            st.timed_used = True
            st.timed_total = 0.25
        metrics.step_time(st, step)
    assert len(st.step_times) == 4 and st.step_times[1] == 0.25   # step 2: its section's time
    metrics.heartbeat(st)
    (beat,) = read_heartbeats(tmp_path / "heartbeat").values()
    assert beat.rank == 1 and beat.pid is not None and beat.step == 4 and beat.times == tuple(st.step_times)
    # what is not a heartbeat of ours reads as no times, never an error
    (tmp_path / "heartbeat" / "rank-2").write_text("12\n7 0.1 nan 0.3\n")
    (tmp_path / "heartbeat" / "rank-3").write_text("garbage\n\x00\x01 x y\n")
    beats = read_heartbeats(tmp_path / "heartbeat")
    assert beats[2].pid == 12 and beats[2].step == 7 and beats[2].times == ()
    assert beats[3].pid is None and beats[3].times == ()
    assert isinstance(ftrain.timed(), object)   # usable without the supervisor
    with ftrain.timed():
        pass


def test_rank_watch_reports_a_straggler_from_the_heartbeat_files(tmp_path):
    import os

    folder = tmp_path / "heartbeat"
    folder.mkdir()
    watch = RankWatch(folder, straggler=StragglerSpec(factor=1.5, window=5))
    watch.start(tmp_path, os.getpid())
    watch.rank_pids = lambda: {0: 1, 1: 2}   # type: ignore[method-assign]  (no torchrun here)
    (folder / "rank-0").write_text("1\n9 " + " ".join(["0.05"] * 9) + "\n")
    (folder / "rank-1").write_text("2\n9 " + " ".join(["0.12"] * 9) + "\n")
    found = watch.check(float("inf"), 9)
    assert found is not None and found.kind is FailureKind.STRAGGLER and "rank 1 straggling" in found.reason


# --------------------------------------------------------------------------- a real 2-rank job
POLICY = """
version: 1
max_restarts: 2
backoff: 0s
grace: 3s
detect:
  hang: {{timeout: 30s, startup: 90s}}
  straggler: {{factor: 1.5, window: 10}}
rules:
{rules}  - when: [segfault, aborted, killed, hang, exit_nonzero, exception]
    action: stop
"""


def run_job(tmp_path, *, slow: str | None, rules: str = "", steps: int = 40):
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY.format(rules=rules))
    config = tmp_path / "config.yaml"
    config.write_text(f"train: {{steps: {steps}, batch_size: 16, ckpt_every: 10, sleep: 0.03}}\n")
    run = tmp_path / "run"
    watch = PidWatch(run / "heartbeat")
    proc = start(tmp_path, "run", DIST, "--nproc-per-node", "2", "--policy", str(policy), "--config", str(config),
                 "--run-dir", str(run), "--no-ui", env={"DIST_SLOW_RANK": slow} if slow else None)
    began = time.monotonic()
    code = finish(proc, 150)
    return code, run, (tmp_path / "ftrain.out").read_text(errors="replace"), watch, time.monotonic() - began


def test_a_rank_that_sleeps_longer_per_step_is_found_reported_live_and_in_inspect(tmp_path):
    code, run, out, watch, _ = run_job(tmp_path, slow="1:0.09")
    assert code == 0, out   # no rule names straggler: reported, training goes on
    (anomaly,) = [a for a in of(events(run), "anomaly") if a["kind"] == "straggler"]
    assert anomaly["reason"].startswith("rank 1 straggling: rank 1's median step time")
    assert anomaly["action"] == "ignore" and anomaly["value"] >= 1.5
    assert "[ftrain] anomaly: rank 1 straggling" in out and "(reported only: no rule names straggler)" in out
    assert events(run)[-1]["status"] == "succeeded"
    shown = subprocess.run(ftrain_cmd("inspect", str(run)), capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0 and "rank 1 straggling" in shown.stdout, shown.stdout + shown.stderr
    as_json = subprocess.run(ftrain_cmd("inspect", str(run), "--json"), capture_output=True, text=True, timeout=60)
    assert "rank 1 straggling" in as_json.stdout
    assert_no_rank_survives(watch, run)


def test_a_balanced_job_has_no_straggler(tmp_path):
    code, run, out, watch, _ = run_job(tmp_path, slow=None)
    assert code == 0, out
    assert not [a for a in of(events(run), "anomaly") if a["kind"] == "straggler"]
    assert "straggl" not in out
    beats = list((run / "heartbeat").glob("rank-*"))
    assert len(beats) == 2   # both ranks did report their step times
    for beat in beats:
        times = [float(t) for t in beat.read_text().splitlines()[1].split()[1:]]
        assert len(times) >= 10 and 0.02 < sorted(times)[len(times) // 2] < 0.5
    assert_no_rank_survives(watch, run)


def test_a_rule_acts_on_a_straggler_like_on_any_anomaly(tmp_path):
    rules = "  - when: straggler\n    action: stop\n"
    code, run, out, watch, _ = run_job(tmp_path, slow="1:0.09", rules=rules, steps=400)
    assert code == 1, out
    evts = events(run)
    (failure,) = of(evts, "failure")
    assert failure["kind"] == "straggler" and failure["evidence"][0].startswith("rank 1 straggling")
    (decision,) = of(evts, "decision")
    assert decision["action"] == "stop" and evts[-1]["status"] == "stopped"
    assert failure["step"] < 399   # stopped for it, long before the end
    assert_no_rank_survives(watch, run)
    assert json.loads((run / "journal.jsonl").read_text().splitlines()[-1])["event"] == "run_end"
