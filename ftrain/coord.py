"""Several machines, one job: the nodes agree on one verdict per attempt through files.

One ftrain per machine, all pointed at one run folder on a shared file system. Every node
publishes what its attempt showed; the deciding node (node 0, until it is lost) picks the
root cause among the nodes, its loop decides by the policy (and moves checkpoints), and
``announce`` publishes the decision; the others wait for it and apply it verbatim, so every
node starts the next attempt with the same overrides, checkpoint, skip windows and attempt
number. The coordinator never decides and never moves checkpoints.

When the deciding node is lost and the job is elastic (``--nnodes MIN:MAX``), the lowest
surviving node takes the role over (``coord/lead.json``), decides the attempt it was
waiting on, and serves the next rendezvous; the job goes on with the nodes that remain. A
fixed-size job stops instead (it cannot go on without the node): resume when it is back.

``Nodes`` is the ``Topology`` of such a job (``ftrain.topology``): ``Ranks`` on this
machine plus the ``Coordinator``.

Everything read from ``coord/`` was written by another process, possibly another version
or a dying one: it is read bounded and typed. Another node's unreadable outcome counts as
missing (with a warning); a ``decision.json`` that does not decode is a ``RunDirError``.
"""

from __future__ import annotations

import json
import math
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ftrain.detect import Anomaly, StragglerSpec
from ftrain.errors import RunDirError
from ftrain.files import read_bounded, write_json_atomic
from ftrain.kinds import Failure, FailureKind
from ftrain.policy import Action, Decision
from ftrain.ranks import Ranks
from ftrain.state import RunState
from ftrain.topology import Verdict
from ftrain.torchrun import DistSpec

__all__ = ["Coordinator", "NodeOutcome", "Nodes"]

COORD_LIMIT = 1 << 22       # bytes: the largest coord/ file read (a state with a big config)

Say = Callable[[str, str], None]


@dataclass(frozen=True)
class NodeOutcome:
    """What one node saw of an attempt (``coord/NNNN/outcome-node-K.json``): its failure or
    none, whether that was only a consequence of another node's, and when (wall clock)."""

    node: int
    failure: Failure | None
    secondary: bool = False
    t_fail: float = math.inf

    def to_json(self, attempt: int) -> dict[str, Any]:
        return {"node": self.node, "attempt": attempt, "failure": self.failure.to_json() if self.failure else None,
                "secondary": self.secondary, "t_fail": self.t_fail if math.isfinite(self.t_fail) else None,
                "t": time.time()}

    @classmethod
    def from_json(cls, data: Any) -> NodeOutcome:
        """``ValueError`` naming the field on bad content."""
        if not isinstance(data, dict):
            raise ValueError(f"expected an object, got {data!r}"[:200])
        node, secondary, t_fail = data.get("node"), data.get("secondary", False), data.get("t_fail")
        if type(node) is not int:
            raise ValueError(f"node: expected an integer, got {node!r}"[:200])
        if not isinstance(secondary, bool):
            raise ValueError(f"secondary: expected true or false, got {secondary!r}"[:200])
        if t_fail is not None and type(t_fail) not in (int, float):
            raise ValueError(f"t_fail: expected a number, got {t_fail!r}"[:200])
        failure = Failure.from_json(data["failure"]) if data.get("failure") is not None else None
        return cls(node, failure, secondary, float(t_fail) if t_fail is not None else math.inf)


def _read_json(path: Path) -> Any:
    """A coord/ file's JSON; ``FileNotFoundError`` when absent, ``ValueError`` (or another
    ``OSError``) when it cannot be read as JSON."""
    return json.loads(read_bounded(path, COORD_LIMIT).decode("utf-8"))


def _read_quiet(path: Path) -> dict[str, Any] | None:
    """A small coord/ object (a heartbeat, a mark) or None: any problem reads as absent."""
    try:
        data = _read_json(path)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


class Coordinator:
    """Several ftrains, one per machine, agree through files in a shared folder.

    Why files: every node already needs the run folder on a shared file system (the
    checkpoints rank 0 writes must be readable by every node's supervisor when it chooses
    one), the supervisor must not import torch (so no c10d store, which in any case lives
    in node 0's torchrun and is gone between attempts, when the decision is taken), and a
    file outlives the process that wrote it, so a node that rejoins after a crash reads
    what it missed. Node 0 decides; nobody votes, so there is nothing to reconcile. ::

        coord/node-K.json               K's heartbeat: a counter, every BEAT s, from a thread
        coord/lead.json                 the deciding node, once it is not node 0 (who took over,
                                        at which attempt, its host)
        coord/NNNN/state.json           the RunState node 0 starts attempt NNNN from
        coord/NNNN/failed               exists once some node's attempt NNNN failed (or a node
                                        was lost): one stat tells every node to stop its ranks
        coord/NNNN/outcome-node-K.json  what K saw of attempt NNNN (``NodeOutcome``)
        coord/NNNN/decision.json        node 0's verdict: the root failure and the decision

    Per attempt: every node runs it; when one node's attempt fails it publishes its outcome
    and the ``failed`` mark, and the others, seeing the mark, stop theirs at once instead of
    waiting for a collective to time out. ``agree`` on node 0 waits for every node's outcome
    (a node whose heartbeat has not moved for ``node_timeout`` is lost, and counted as
    ``killed``) and picks the root cause (a failure of its own before a consequence, then the
    earliest, then the lowest node); node 0's loop decides and calls ``announce``. The others'
    ``agree`` waits for the decision (as long as node 0 beats) and returns it as it is.

    Cost per poll: a follower stats one mark and reads node 0's heartbeat; node 0 reads
    every heartbeat. Lost-node detection watches a counter change with the reader's own
    monotonic clock, so the machines' clocks need not agree.
    """

    BEAT = 1.0
    POLL = 0.1    # seconds between looks while waiting for outcomes or a decision

    def __init__(self, spec: DistSpec, coord_dir: Path, *, say: Say | None = None) -> None:
        self.spec = spec
        self.dir = Path(coord_dir)
        self.say: Say = say or (lambda message, level: None)
        self.node = spec.node_rank
        self._seen: dict[int, tuple[Any, float]] = {}     # node → (last beat mark, monotonic when it changed)
        self._absent: set[int] = set()                    # lost before this attempt began
        self._watch_from = time.monotonic()
        self._attempt = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._beats = 0
        self._warned: set[Path] = set()
        self._pending: dict[int, dict[str, Any]] = {}      # attempt → what announce records with the decision
        self.lead = 0                                       # the node that decides (see take_over)
        self.lead_host: str | None = None                   # its host, once it is not node 0
        self.gone: set[int] = set()                         # nodes lost and not back since
        self._lost_lead: dict[int, float] = {}              # the lost node whose role this one took

    @property
    def is_lead(self) -> bool:
        """This node decides for every node."""
        return self.node == self.lead

    def attempt_dir(self, n: int) -> Path:
        return self.dir / f"{n:04d}"

    # ---------------------------------------------------------------- heartbeat
    def start(self) -> None:
        """Create the folder and start beating (a daemon thread: it only writes a file)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        self._read_lead()
        self._beat()
        self._thread = threading.Thread(target=self._beat_loop, name="ftrain-node-heartbeat", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2 * self.BEAT)
            self._thread = None

    def _beat_loop(self) -> None:
        while not self._stop.wait(self.BEAT):
            try:
                self._beat()
            except OSError:
                pass   # a slow or full shared disk: the others will count us as lost, rightly

    def _beat(self) -> None:
        self._beats += 1
        write_json_atomic(self.dir / f"node-{self.node}.json", {
            "node": self.node, "pid": os.getpid(), "host": socket.gethostname(), "beat": self._beats,
            "attempt": self._attempt, "t": time.time()}, durable=False)

    def lost_nodes(self, nodes: Iterable[int] | None = None, *,
                   never_seen_after: float | None = None) -> dict[int, float]:
        """``node → seconds silent`` for the other nodes (all, or ``nodes``) whose heartbeat
        stopped moving for longer than ``node_timeout``. A node never seen counts only once
        ``never_seen_after`` seconds have passed since we started watching."""
        now = time.monotonic()
        lost: dict[int, float] = {}
        for node in range(self.spec.nnodes) if nodes is None else nodes:
            if node == self.node:
                continue
            data = _read_quiet(self.dir / f"node-{node}.json")
            mark = (str(data.get("pid")), str(data.get("beat"))) if data else None
            seen = self._seen.get(node)
            if mark is not None and (seen is None or seen[0] != mark):
                self._seen[node] = (mark, now)
                self._absent.discard(node)   # it beats (again)
                self.gone.discard(node)
                continue
            if seen is not None:
                silent = now - seen[1]
                if silent > self.spec.node_timeout:
                    lost[node] = silent
            elif never_seen_after is not None and now - self._watch_from > never_seen_after:
                lost[node] = now - self._watch_from
        return lost

    def _watched(self) -> list[int] | None:
        """The deciding node watches every node; the others watch it (it tells them about the rest)."""
        return None if self.is_lead else [self.lead]

    # ---------------------------------------------------------------- the deciding role
    def _read_lead(self) -> None:
        """Who decides now: ``coord/lead.json`` where a node took over, else node 0."""
        data = _read_quiet(self.dir / "lead.json")
        node = data.get("node") if data else None
        if type(node) is int and 0 <= node < self.spec.nnodes:
            self.lead = node
            host = data.get("host") if data else None
            self.lead_host = host if isinstance(host, str) else None

    def take_over(self, n: int, lost: int) -> bool:
        """The deciding node ``lost`` is gone during attempt ``n``: in an elastic job the
        lowest node left that still beats decides from now on. True when that is this node
        (it wrote ``coord/lead.json``); the others follow the new one."""
        self.gone.add(lost)
        if not self.spec.elastic:
            return False
        left = [k for k in range(self.spec.nnodes) if k not in self.gone]
        silent = self.lost_nodes([k for k in left if k < self.node], never_seen_after=self.spec.node_timeout)
        self.gone.update(silent)
        self.lead = min(k for k in range(self.spec.nnodes) if k not in self.gone)
        if not self.is_lead:
            self.say(f"node {lost} lost: node {self.lead} decides from attempt {n} on", "warn")
            return False
        self.lead_host = socket.gethostname()
        write_json_atomic(self.dir / "lead.json", {"node": self.node, "host": self.lead_host, "attempt": n,
                                                   "after": lost, "t": time.time()}, durable=True)
        self.say(f"node {lost}, which decided, is lost: this node (node {self.node}) decides from attempt {n} on",
                 "warn")
        return True

    def rdzv_endpoint(self) -> str | None:
        """Where the next rendezvous is served: the spec's endpoint, but on the deciding
        node's host once the role moved off node 0 (a loopback endpoint stays: every node is
        on this machine)."""
        endpoint = self.spec.rdzv_endpoint
        if endpoint is None or self.lead == 0 or not self.lead_host:
            return endpoint
        host, _, port = endpoint.rpartition(":")
        if host in ("localhost", "::1", "[::1]") or host.startswith("127."):
            return endpoint
        return f"{self.lead_host}:{port}"

    def _outcome(self, path: Path) -> NodeOutcome | None:
        """Another node's outcome, or None while it is missing or unreadable (warned once)."""
        try:
            return NodeOutcome.from_json(_read_json(path))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            if path not in self._warned:
                self._warned.add(path)
                self.say(f"{path}: unreadable ({str(exc)[:120]}); counting it as missing", "warn")
            return None

    # ---------------------------------------------------------------- during an attempt
    def start_attempt(self, n: int) -> None:
        """A node already lost when the attempt starts is not a reason to stop it: torchrun's
        rendezvous waits for it (bounded by the hang detector's startup allowance)."""
        self._attempt = n
        self.attempt_dir(n).mkdir(parents=True, exist_ok=True)
        self._absent = set(self.lost_nodes(self._watched())) | (self.gone if self.spec.elastic else set())

    def peer_trouble(self, n: int) -> Anomaly | None:
        """Another node's attempt ``n`` failed, or a node went silent: stop ours now."""
        folder = self.attempt_dir(n)
        if (folder / "failed").exists():
            for path in sorted(folder.glob("outcome-node-*.json")):
                outcome = self._outcome(path)
                if outcome is not None and outcome.failure is not None and outcome.node != self.node:
                    failure = outcome.failure
                    return Anomaly(failure.kind, failure.step, None, None,
                                   f"node {outcome.node} reported {failure.kind.value} in attempt {n}: stopping "
                                   "this node's ranks", failure.evidence[:3])
            mark = _read_quiet(folder / "failed") or {}
            if mark.get("node") != self.node:
                why = mark.get("reason") if isinstance(mark.get("reason"), str) else "a node failed"
                return Anomaly(FailureKind.KILLED, None, None, None,
                               f"attempt {n} failed elsewhere: {why}; stopping this node's ranks")
        lost = {node: silent for node, silent in self.lost_nodes(self._watched()).items()
                if node not in self._absent}
        if lost:
            node, silent = max(lost.items(), key=lambda kv: kv[1])
            reason = (f"node {node} lost: its ftrain heartbeat has not moved for {silent:.1f} s "
                      f"(node timeout {self.spec.node_timeout:g} s)")
            self._mark_failed(n, reason)
            return Anomaly(FailureKind.KILLED, None, None, silent, reason)
        return None

    def _mark_failed(self, n: int, reason: str) -> None:
        path = self.attempt_dir(n) / "failed"
        if not path.exists():
            write_json_atomic(path, {"node": self.node, "reason": reason, "t": time.time()}, durable=True)

    # ---------------------------------------------------------------- after an attempt
    def publish_outcome(self, n: int, outcome: NodeOutcome) -> None:
        folder = self.attempt_dir(n)
        folder.mkdir(parents=True, exist_ok=True)
        write_json_atomic(folder / f"outcome-node-{self.node}.json", outcome.to_json(n), durable=True)
        if outcome.failure is not None:
            self._mark_failed(n, f"node {self.node}: {outcome.failure.kind.value}")

    def agree(self, n: int, failure: Failure | None, *, secondary: bool, t_fail: float,
              interrupted: Callable[[], bool]) -> Verdict:
        """Publish this node's outcome of attempt ``n`` and return the job's verdict.

        Node 0 gathers the nodes' outcomes and returns the root cause among them, to be
        decided by its loop and ``announce``d. The others wait for node 0's decision and
        return it. A node interrupted (SIGINT/SIGTERM to its ftrain) before or while it waits
        returns ``Verdict(failure, None, must_decide=False)``; node 0 then tells the others
        to stop.
        """
        mine = NodeOutcome(self.node, failure, secondary, t_fail)
        self.publish_outcome(n, mine)
        if not self.is_lead:
            if interrupted():
                return Verdict(failure, None, must_decide=False)
            verdict = self._follow(n, failure, interrupted)
            if verdict is not None:
                return verdict
            if interrupted():   # took the role over, then was interrupted
                return Verdict(failure, None, must_decide=False)
        verdict = None if interrupted() else self._lead(n, mine, interrupted)
        if verdict is None:   # tell the others now rather than by falling silent
            stop = Decision(Action.STOP, reason=f"node {self.node} was interrupted during attempt {n}; resume "
                                                "every node's run folder to continue")
            self._write_decision(n, {"node": self.node, "failure": failure.to_json() if failure else None,
                                     "decision": stop.to_json()})
            return Verdict(failure, None, must_decide=False)
        return verdict

    def _lead(self, n: int, mine: NodeOutcome, interrupted: Callable[[], bool]) -> Verdict | None:
        folder = self.attempt_dir(n)
        outcomes: dict[int, NodeOutcome] = {self.node: mine}
        # an elastic job's attempt is over the nodes that joined it: not one lost before it began
        absent = self._absent if self.spec.elastic else set()
        waiting = set(range(self.spec.nnodes)) - {self.node} - absent
        lost: dict[int, float] = {k: silent for k, silent in self._lost_lead.items() if k in waiting}
        waiting -= lost.keys()
        if waiting:
            self.say(f"waiting for the other {len(waiting)} node(s) to report attempt {n}", "info")
        self._watch_from = time.monotonic()
        while waiting:
            if interrupted():
                return None
            for node in sorted(waiting):
                found = self._outcome(folder / f"outcome-node-{node}.json")
                if found is not None:
                    outcomes[node] = replace(found, node=node)
                    waiting.discard(node)
            if not waiting:
                break
            for node, silent in self.lost_nodes(sorted(waiting), never_seen_after=self.spec.node_timeout).items():
                lost[node] = silent
                waiting.discard(node)
            if waiting:
                time.sleep(self.POLL)
        where, root = pick_root(n, outcomes.values(), lost, now=time.time())
        record = {"outcomes": {str(k): v.to_json(n) for k, v in sorted(outcomes.items())},
                  "lost": {str(k): v for k, v in lost.items()}}
        if root is None:
            self._write_decision(n, {"node": None, "failure": None, "decision": None, **record})
            return Verdict(None, None, must_decide=False)
        if where != self.node:
            self.say(f"root cause of attempt {n} is on node {where}: {root.kind.value}", "warn")
        self._pending[n] = {"node": where, **record}
        return Verdict(root, None, must_decide=True)

    def announce(self, n: int, failure: Failure, decision: Decision) -> None:
        """The deciding node, once its loop decided (and set checkpoints aside): the others may go on."""
        record = self._pending.pop(n, {"node": None})
        self._write_decision(n, {**record, "failure": failure.to_json(), "decision": decision.to_json()})

    def _write_decision(self, n: int, record: dict[str, Any]) -> None:
        folder = self.attempt_dir(n)
        folder.mkdir(parents=True, exist_ok=True)
        write_json_atomic(folder / "decision.json", {"attempt": n, "leader": self.node, **record}, durable=True)

    def _follow(self, n: int, failure: Failure | None, interrupted: Callable[[], bool]) -> Verdict | None:
        """Wait for the deciding node's verdict on attempt ``n``. None: that node was lost
        and this one took its role over (``take_over``); its loop decides the attempt."""
        path = self.attempt_dir(n) / "decision.json"
        self.say(f"waiting for node {self.lead}'s decision on attempt {n}", "info")
        self._watch_from = time.monotonic()
        while True:
            found = read_decision(path)
            if found is not None:
                break
            if interrupted():
                return Verdict(failure, None, must_decide=False)
            lead = self.lead
            lost = self.lost_nodes([lead], never_seen_after=self.spec.node_timeout)
            if lead in lost:
                if self.take_over(n, lead):
                    self._lost_lead = {lead: lost[lead]}
                    return None
                if self.lead != lead:    # another node decides now: wait for it
                    self._watch_from = time.monotonic()
                    continue
                reason = (f"node {lead} lost while this node waited for its decision on attempt {n} "
                          f"(no heartbeat for {lost[lead]:.1f} s); resume this node when node {lead} is back"
                          + ("" if self.spec.elastic else
                             f" (--nnodes {self.spec.nnodes} is fixed: --nnodes MIN:{self.spec.nnodes} would "
                             "let the others go on without it)"))
                return Verdict(failure or Failure(FailureKind.KILLED, evidence=(reason,)),
                               Decision(Action.STOP, reason), must_decide=False)
            time.sleep(self.POLL)
        root, decision = found
        if decision is None:
            return Verdict(None, None, must_decide=False)
        root = root or failure
        if root is None:   # node 0 stopped without a failure of its own (interrupted)
            root = Failure(FailureKind.PREEMPTED, evidence=(decision.reason,))
        return Verdict(root, decision, must_decide=False)

    # ---------------------------------------------------------------- rejoining
    def before_attempt(self, state: RunState) -> RunState:
        """The deciding node: publish the state it starts the next attempt from. Others: its
        state when it is as far or further (this node missed decisions while it was down)."""
        nxt = state.attempt + 1
        self._lost_lead = {}
        self._read_lead()
        if self.is_lead:
            self.attempt_dir(nxt).mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.attempt_dir(nxt) / "state.json", state.to_json(), durable=True)
            return state
        numbers = sorted((int(p.name) for p in self.dir.glob("[0-9]*") if p.name.isdigit()), reverse=True)
        for k in numbers:
            path = self.attempt_dir(k) / "state.json"
            try:
                leader = RunState.from_json(_read_json(path))
            except FileNotFoundError:
                continue
            except (OSError, ValueError) as exc:
                if path not in self._warned:
                    self._warned.add(path)
                    self.say(f"{path}: unreadable ({str(exc)[:120]}); not adopting it", "warn")
                continue
            if leader.attempt + 1 < nxt:
                return state
            if leader.attempt + 1 > nxt:
                self.say(f"rejoining the job at attempt {leader.attempt + 1} (node {self.lead}'s state)", "warn")
            return leader
        return state


def read_decision(path: Path) -> tuple[Failure | None, Decision | None] | None:
    """``coord/NNNN/decision.json`` as ``(root failure, decision)``: None while it is absent,
    ``RunDirError`` naming the file when it does not decode."""
    try:
        data = _read_json(path)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise RunDirError(f"{path}: unreadable: {str(exc)[:200]}") from None
    try:
        if not isinstance(data, dict):
            raise ValueError(f"expected an object, got {data!r}"[:200])
        failure = Failure.from_json(data["failure"]) if data.get("failure") is not None else None
        decision = Decision.from_json(data["decision"]) if data.get("decision") is not None else None
    except ValueError as exc:
        raise RunDirError(f"{path}: {exc}") from None
    return failure, decision


def pick_root(n: int, outcomes: Iterable[NodeOutcome], lost: dict[int, float], *,
              now: float) -> tuple[int | None, Failure | None]:
    """The root cause among the nodes of attempt ``n``: ``(node, failure)``, ``(None, None)``
    when none failed. A node's own failure before a consequence, then the earliest, then the
    lowest node; a lost node (``node → seconds silent``) counts as ``killed`` when it fell
    silent. The failure of another node than the first names it in its first line."""
    candidates = [(o.secondary, o.t_fail, o.node, o.failure) for o in outcomes if o.failure is not None]
    for node, silent in lost.items():
        candidates.append((False, now - silent, node, Failure(
            FailureKind.KILLED, evidence=(f"node {node} lost: no outcome for attempt {n} and its ftrain "
                                          f"heartbeat has not moved for {silent:.1f} s",))))
    if not candidates:
        return None, None
    _, _, node, root = min(candidates, key=lambda c: (c[0], c[1], c[2]))
    head = root.evidence[0] if root.evidence else root.kind.value
    if node != 0 and f"node {node}" not in head:
        root = replace(root, evidence=(f"node {node}: {head}", *root.evidence[1:]))
    return node, root


# --------------------------------------------------------------------------- the topology
class Nodes(Ranks):
    """torchrun's ranks on this machine, one node of several (``ftrain.topology.Topology``):
    ``Ranks`` plus the ``Coordinator`` over ``job_dir/coord``, which beats from ``open``
    to ``close``, stops this node's ranks when another node fails or falls silent, and
    agrees on each attempt's verdict."""

    def __init__(self, spec: DistSpec, run_dir: Path, job_dir: Path, *, say: Say | None = None,
                 straggler: StragglerSpec | None = None) -> None:
        super().__init__(spec, run_dir, job_dir, straggler=straggler)
        self.coordinator = Coordinator(spec, Path(job_dir) / "coord", say=say)
        self._attempt = 0
        self._peer_stopped_at: float | None = None   # this attempt was stopped because another node failed

    @property
    def node(self) -> int | None:
        return self.spec.node_rank

    def open(self) -> None:
        self.coordinator.start()

    def close(self) -> None:
        self.coordinator.close()

    def before_attempt(self, state: RunState) -> RunState:
        state = self.coordinator.before_attempt(state)
        self.serves_rendezvous = self.coordinator.is_lead   # the deciding node serves the rendezvous
        self.rdzv_endpoint = self.coordinator.rdzv_endpoint()
        return state

    def started(self, n: int, attempt_dir: Path, pid: int) -> None:
        super().started(n, attempt_dir, pid)
        self._attempt = n
        self._peer_stopped_at = None
        self.coordinator.start_attempt(n)

    def check(self, hang_timeout: float, step: int | None) -> Anomaly | None:
        if not self.watch.due():
            return None
        peer = self.coordinator.peer_trouble(self._attempt)
        if peer is not None:
            self._peer_stopped_at = time.time()
            return peer if peer.step is not None else replace(peer, step=step)
        return self.watch.check(hang_timeout, step)

    def agree(self, n: int, failure: Failure | None, *, secondary: bool, t_fail: float | None,
              interrupted: Callable[[], bool]) -> Verdict:
        """An attempt stopped because another node failed is a consequence here, whatever
        its own ranks showed when they were stopped."""
        when = t_fail if t_fail is not None else time.time()
        if self._peer_stopped_at is not None:
            secondary, when = True, min(when, self._peer_stopped_at)
        return self.coordinator.agree(n, failure, secondary=secondary, t_fail=when, interrupted=interrupted)

    def announce(self, n: int, failure: Failure, decision: Decision) -> None:
        self.coordinator.announce(n, failure, decision)
