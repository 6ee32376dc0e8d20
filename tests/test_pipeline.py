"""The attempt loop as a pipeline of values (DESIGN §7).

The merge rules of DESIGN §5 are pure functions of an ``AttemptOutcome`` (``classify.judge``),
tested here on plain values; the loop itself is tested with real children and with fakes
passed in through the Supervisor's constructor (a topology, a launcher), never by patching.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from conftest import events, of

from ftrain.classify import failure_of, judge
from ftrain.detect import Anomaly
from ftrain.kinds import Failure, FailureKind
from ftrain.launch import Cold, Launched, LaunchSpec
from ftrain.outcome import AttemptOutcome
from ftrain.policy import Action, Decision
from ftrain.policyfile import parse_policy
from ftrain.process import OutputSink
from ftrain.supervisor import Supervisor
from ftrain.topology import Single, Verdict
from ftrain.view import Progress

K = FailureKind
NAN = Anomaly(K.NONFINITE, 20, "loss", math.nan, "loss = nan at step 20", ('{"step": 20, "loss": NaN}',))
SEGV_TAIL = ("Fatal Python error: Segmentation fault", "", "Current thread 0x0001 (most recent call first):")


# --------------------------------------------------------------------------- the merge rules
def test_an_anomaly_acted_on_in_time_is_the_failure_whatever_the_exit() -> None:
    out = AttemptOutcome(exit_code=-15, signal="SIGTERM", tail=SEGV_TAIL, anomaly=NAN, last_step=20)
    failure = failure_of(out)
    assert failure is not None and failure.kind is K.NONFINITE
    assert (failure.exit_code, failure.signal, failure.step) == (-15, "SIGTERM", 20)
    assert not any("then the script ended" in e for e in failure.evidence)


def test_a_late_nan_before_a_crash_is_the_nan_with_the_crash_after_it() -> None:
    """The NaN was written before the script segfaulted, and read only after the exit."""
    out = AttemptOutcome(exit_code=-11, signal="SIGSEGV", tail=SEGV_TAIL, anomaly=NAN, anomaly_after_exit=True,
                         last_step=21)
    failure = failure_of(out)
    assert failure is not None and failure.kind is K.NONFINITE and failure.step == 20
    assert "then the script ended: segfault" in failure.evidence


def test_a_late_nan_of_a_script_that_then_exited_0_is_the_nan() -> None:
    out = AttemptOutcome(exit_code=0, anomaly=NAN, anomaly_after_exit=True, last_step=29)
    failure = failure_of(out)
    assert failure is not None and failure.kind is K.NONFINITE
    assert not any("then the script ended" in e for e in failure.evidence)


def test_exit_0_while_the_last_watched_value_is_nan_is_nonfinite() -> None:
    failure = failure_of(AttemptOutcome(exit_code=0, last_step=99, last_values={"loss": math.nan}))
    assert failure is not None and failure.kind is K.NONFINITE and failure.step == 99
    assert failure.evidence == ("exit 0 but the last loss is nan",)
    assert failure_of(AttemptOutcome(exit_code=0, last_values={"loss": 0.5})) is None


def test_an_oom_kill_counts_only_when_it_was_not_the_waiting_spares() -> None:
    killed = dict(exit_code=-9, signal="SIGKILL", tail=("Killed",))
    assert failure_of(AttemptOutcome(**killed, oom_kills=1)).kind is K.HOST_OOM   # type: ignore[union-attr]
    assert failure_of(AttemptOutcome(**killed, oom_kills=1, spare_oom_killed=True)).kind is K.KILLED  # type: ignore[union-attr]
    assert failure_of(AttemptOutcome(**killed, oom_kills=2, spare_oom_killed=True)).kind is K.HOST_OOM  # type: ignore[union-attr]
    assert failure_of(AttemptOutcome(**killed, oom_kills=None)).kind is K.KILLED  # type: ignore[union-attr]


def test_a_stop_ftrain_asked_for_is_preempted_and_text_still_wins() -> None:
    stopped = failure_of(AttemptOutcome(exit_code=-15, signal="SIGTERM", interrupted=True))
    assert stopped is not None and stopped.kind is K.PREEMPTED
    oom = ("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB.",)
    assert failure_of(AttemptOutcome(exit_code=1, tail=oom, interrupted=True)).kind is K.CUDA_OOM  # type: ignore[union-attr]


def test_judge_is_deterministic_and_carries_no_rank_verdict_for_one_process() -> None:
    out = AttemptOutcome(exit_code=-11, signal="SIGSEGV", tail=SEGV_TAIL, last_step=3)
    assert judge(out) == judge(out)
    assert judge(out).secondary is False and judge(out).t is None


# --------------------------------------------------------------------------- the loop, with fakes
POLICY = """version: 1
backoff: {initial: 0s}
detect: {hang: false}
rules:
  - {when: exit_nonzero, action: restart, max: 2}
  - {when: exception, action: stop}
"""
CHILD = """import os, sys
n = int(os.environ["FTRAIN_ATTEMPT"])
sys.exit(3 if n < 3 else 0)
"""


class Reports:
    """A reporter that keeps what the supervisor says."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def output(self, data: bytes, is_err: bool) -> None:
        pass

    def event(self, message: str, *, level: str = "info") -> None:
        self.lines.append(message)

    def status(self, progress: Progress) -> None:
        pass

    def close(self) -> None:
        pass


class CountingLauncher(Cold):
    """A cold launcher that counts its starts and says when it is closed."""

    def __init__(self, cwd: Path) -> None:
        super().__init__(cwd, "child.py")
        self.starts = 0
        self.closed = False

    def start(self, command: Sequence[str], env: Mapping[str, str], log_path: Path,
              sink: OutputSink | None, line_hook: Callable[[str], None] | None) -> Launched:
        self.starts += 1
        return super().start(command, env, log_path, sink, line_hook)

    def close(self) -> None:
        self.closed = True


class FollowerTopology(Single):
    """Node 1 of a job: node 0 decided, and its decision is applied verbatim."""

    def __init__(self, run_dir: Path, decision: Decision) -> None:
        super().__init__(run_dir)
        self.decision = decision
        self.agreed: list[tuple[int, FailureKind | None]] = []
        self.announced = 0

    def agree(self, n: int, failure: Failure | None, *, secondary: bool, t_fail: float | None,
              interrupted: Callable[[], bool]) -> Verdict:
        self.agreed.append((n, failure.kind if failure else None))
        if failure is None:
            return Verdict(None, must_decide=False)
        return Verdict(failure, self.decision, must_decide=False)

    def announce(self, n: int, failure: Failure, decision: Decision) -> None:
        self.announced += 1


def _supervisor(tmp_path: Path, **parts: Any) -> Supervisor:
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    policy = parse_policy(POLICY, "p.yaml")
    launch = LaunchSpec(command=(sys.executable, str(script)), cwd=tmp_path, base_config={}, script=str(script))
    return Supervisor(tmp_path / "run", policy, launch, Reports(), **parts)


def test_the_loop_restarts_through_the_launcher_it_was_given(tmp_path: Path) -> None:
    launcher = CountingLauncher(tmp_path)
    sup = _supervisor(tmp_path, launcher=launcher)
    assert sup.run() == 0
    assert launcher.starts == 3 and launcher.closed
    evts = events(tmp_path / "run")
    assert [d["rule"] for d in of(evts, "decision")] == [1, 1]
    assert of(evts, "run_end")[0]["status"] == "succeeded"


def test_a_follower_applies_the_decision_it_is_given_and_decides_nothing(tmp_path: Path) -> None:
    """The journal shows node 0's decisions (its reasons), not the local policy's."""
    elsewhere = Decision(Action.RESTART, reason="node 0: restart", rule=1, overrides={})
    topology = FollowerTopology(tmp_path / "run", elsewhere)
    sup = _supervisor(tmp_path, topology=topology, launcher=CountingLauncher(tmp_path))
    assert sup.run() == 0
    assert topology.agreed == [(1, K.EXIT_NONZERO), (2, K.EXIT_NONZERO), (3, None)]
    assert topology.announced == 0   # only the deciding node announces
    decisions = of(events(tmp_path / "run"), "decision")
    assert [d["reason"] for d in decisions] == ["node 0: restart", "node 0: restart"]


def test_an_unexpected_error_in_the_loop_stops_the_child_and_journals_the_end(tmp_path: Path) -> None:
    """A bug of ours (here: a topology that raises) must not leave the child running nor
    end without run_end; the exit code is ftrain's own (3), not 1 (the policy) or 2 (usage)."""

    class Broken(Single):
        def started(self, n: int, attempt_dir: Path, pid: int) -> None:
            self.pid = pid
            raise RuntimeError("boom")

    script = tmp_path / "child.py"
    script.write_text("import time\ntime.sleep(60)\n")
    topology = Broken(tmp_path / "run")
    launch = LaunchSpec(command=(sys.executable, str(script)), cwd=tmp_path, base_config={}, script=str(script))
    reports = Reports()
    sup = Supervisor(tmp_path / "run", parse_policy(POLICY, "p.yaml"), launch, reports, topology=topology,
                     launcher=CountingLauncher(tmp_path))
    assert sup.run() == 3
    from conftest import pid_alive
    assert not pid_alive(topology.pid)
    end = of(events(tmp_path / "run"), "run_end")[0]
    assert end["status"] == "interrupted" and end["exit_code"] == 3
    assert end["reason"].startswith("ftrain failed: RuntimeError: boom")
    assert "Traceback" in (tmp_path / "run" / "ftrain-error.log").read_text()
