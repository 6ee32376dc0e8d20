"""The job's shape, behind one interface: one process, torchrun's ranks, several machines.

The attempt loop is the same for every job (DESIGN §7); what differs by shape is plugged in
here, once, where the run is built (``runs``). A topology wraps the command (torchrun
around the script), adds liveness checks while the attempt runs (a rank's stale heartbeat,
a lost node), dumps the ranks' stacks and explains a hang, reports how each rank ended, and
agrees with the other nodes on one verdict per attempt. It never decides (``policy``
does, on node 0 for every node) and never moves checkpoints (the loop does, before it
announces the decision).

    Single      one process: every hook is a no-op
    Ranks       torchrun on this machine (ftrain.torchrun, ftrain.ranks)
    Nodes       Ranks, plus the coordinator of several machines (ftrain.coord)

What the loop calls, per run and per attempt (``n``)::

    open()
    ┌► state = before_attempt(state);  n = state.attempt + 1
    │  command = wrap(command, n, attempt_dir);  start it;  started(n, attempt_dir, pid)
    │  while it runs: check(hang_timeout, step)
    │      a hang: dump_stacks() (False: signal the child's group), stop it;  explain(anomaly)
    │  it ended with a non-zero exit, not interrupted: rank_reports(console tail)
    │  judged = classify.judge(outcome);  verdict = agree(n, failure, secondary=, t_fail=, interrupted=)
    │  verdict.must_decide and failed: decide, move checkpoints, announce(n, failure, decision)
    └─ restart/rollback: next attempt
    close()
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from ftrain.detect import Anomaly
from ftrain.kinds import Failure
from ftrain.outcome import RankReport
from ftrain.policy import Decision
from ftrain.state import RunState

if TYPE_CHECKING:
    from ftrain.detect import StragglerSpec
    from ftrain.torchrun import DistSpec

__all__ = ["Single", "Topology", "Verdict", "job_dir_of", "make_topology", "node_dir"]


@dataclass(frozen=True)
class Verdict:
    """The job's view of an attempt, once the nodes agreed.

    ``failure``: the root failure among the nodes (None: the attempt succeeded everywhere);
    ``decision``: node 0's decision, on the other nodes (apply it verbatim); None where this
    node must decide (one machine, or node 0 of several), or when a wait was interrupted;
    ``must_decide``: this node decides and then ``announce``s.
    """

    failure: Failure | None
    decision: Decision | None = None
    must_decide: bool = True


class Topology(Protocol):
    """What the attempt loop asks of the job's shape (see the module docstring)."""

    @property
    def job_dir(self) -> Path:
        """The folder the nodes share (metrics, checkpoints, coord/); the run folder on one."""

    @property
    def node(self) -> int | None:
        """This machine's node rank in a job of several; None on one machine."""

    @property
    def distributed(self) -> bool:
        """The child is torchrun (its ranks' TERMs and exits are torchrun's, not the script's)."""

    def to_json(self) -> dict[str, Any] | None:
        """For run.json ("distributed"): how to build the same topology on resume."""

    def open(self) -> None:
        """Before the first attempt (several nodes start beating in coord/)."""

    def close(self) -> None:
        """After the last attempt, whatever happened."""

    def before_attempt(self, state: RunState) -> RunState:
        """Node 0 publishes the state it starts the next attempt with; a node that rejoins
        returns node 0's newer state to start from. Elsewhere ``state`` itself."""

    def wrap(self, command: Sequence[str], n: int, attempt_dir: Path) -> tuple[str, ...]:
        """The command of attempt ``n`` (torchrun around the script, its logs in attempt_dir)."""

    def started(self, n: int, attempt_dir: Path, pid: int) -> None:
        """Attempt ``n`` runs as ``pid`` (the launcher's, torchrun's)."""

    def check(self, hang_timeout: float, step: int | None) -> Anomaly | None:
        """A liveness problem the metrics stream cannot show: one rank's stale heartbeat, a
        failed or lost node. Called on every poll; cheap when there is nothing to look at."""

    def dump_stacks(self) -> bool:
        """Before a hung attempt is stopped: ask its processes for their Python stacks.
        True if done here (each rank signalled, never torchrun, whom SIGUSR1 kills); False:
        the loop signals the child's group as for one process."""

    def explain(self, anomaly: Anomaly) -> Anomaly:
        """A hang's evidence with each rank's innermost frame; other anomalies unchanged."""

    def rank_reports(self, console: Sequence[str]) -> tuple[RankReport, ...]:
        """How the attempt's failed ranks ended (torchrun's report in ``console``, each rank's
        files), for ``classify``; () for one process."""

    def agree(self, n: int, failure: Failure | None, *, secondary: bool, t_fail: float | None,
              interrupted: Callable[[], bool]) -> Verdict:
        """This node's failure of attempt ``n`` → the job's verdict. ``secondary``: it failed
        only as a consequence of another rank or node; ``t_fail``: when (wall clock)."""

    def announce(self, n: int, failure: Failure, decision: Decision) -> None:
        """Node 0, after deciding (and moving checkpoints): tell the other nodes."""


class Single:
    """One process on one machine: nothing to wrap, check, explain or agree on."""

    job_dir: Path
    node = None
    distributed = False

    def __init__(self, run_dir: Path) -> None:
        self.job_dir = Path(run_dir)

    def to_json(self) -> dict[str, Any] | None:
        return None

    def open(self) -> None:
        pass

    def close(self) -> None:
        pass

    def before_attempt(self, state: RunState) -> RunState:
        return state

    def wrap(self, command: Sequence[str], n: int, attempt_dir: Path) -> tuple[str, ...]:
        return tuple(command)

    def started(self, n: int, attempt_dir: Path, pid: int) -> None:
        pass

    def check(self, hang_timeout: float, step: int | None) -> Anomaly | None:
        return None

    def dump_stacks(self) -> bool:
        return False

    def explain(self, anomaly: Anomaly) -> Anomaly:
        return anomaly

    def rank_reports(self, console: Sequence[str]) -> tuple[RankReport, ...]:
        return ()

    def agree(self, n: int, failure: Failure | None, *, secondary: bool, t_fail: float | None,
              interrupted: Callable[[], bool]) -> Verdict:
        return Verdict(failure)

    def announce(self, n: int, failure: Failure, decision: Decision) -> None:
        pass


# --------------------------------------------------------------------------- building one
def make_topology(spec: DistSpec | None, run_dir: Path, job_dir: Path, *,
                  say: Callable[[str, str], None] | None = None,
                  straggler: StragglerSpec | None = None) -> Topology:
    """One process (no spec), torchrun's ranks on this machine, or one node of several.
    ``say(message, level)``: where the nodes' coordination tells a person what it waits for
    (default: ``[ftrain]`` lines on stderr); ``straggler``: the policy's straggler detector
    (``detect: straggler``), run over this machine's ranks."""
    if spec is None:
        return Single(run_dir)
    if not spec.multi_node:
        from ftrain.ranks import Ranks

        return Ranks(spec, run_dir, job_dir, straggler=straggler)
    from ftrain.coord import Nodes

    return Nodes(spec, run_dir, job_dir, say=say or _say_on_stderr, straggler=straggler)


def _say_on_stderr(message: str, level: str) -> None:
    import sys

    print(f"[ftrain] {message}", file=sys.stderr, flush=True)


def node_dir(spec: DistSpec, job_dir: Path) -> Path:
    """This node's own run folder: the job's folder on node 0, ``nodes/node-K/`` inside it on
    the others (each node keeps its own journal, attempts and rank logs; the metrics stream,
    the checkpoints and ``coord/`` are the job's, shared)."""
    if spec.multi_node and not spec.leader:
        return Path(job_dir) / "nodes" / f"node-{spec.node_rank}"
    return Path(job_dir)


def job_dir_of(spec: DistSpec, run_dir: Path) -> Path:
    """The job's shared folder, from a node's own run folder (``node_dir`` inverted)."""
    if spec.multi_node and not spec.leader:
        return Path(run_dir).parent.parent
    return Path(run_dir)
