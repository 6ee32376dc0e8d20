"""The restart policy as values, and the decision: the one place an action is chosen.

``Policy.decide`` maps a classified ``Failure``, the run's ``History`` and the usable
checkpoints (plain values) to a frozen ``Decision``. Reading and validating a policy file
(DESIGN §6) is ``ftrain.policyfile``'s. Nothing here touches a process or a file.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from ftrain.detect import DetectSpec
from ftrain.errors import ConfigError
from ftrain.kinds import Failure, FailureKind
from ftrain.notify import NotifySpec
from ftrain.overrides import OverrideSpec, get_key, is_number


class IfMissing(str, enum.Enum):
    """A rule's ``if_missing``: what its ``set`` does with a key the config lacks.

    error  ``policy check --config`` and ``run --config`` refuse the policy (the default)
    skip   that override is left out, and the decision says so (the default policy's OOM
           rule: not every script has ``train.grad_accum``)
    """

    ERROR = "error"
    SKIP = "skip"

    def __str__(self) -> str:
        return self.value


class Action(str, enum.Enum):
    """What a rule does with a failure.

    restart   start a new attempt from the newest usable checkpoint
    rollback  start from a checkpoint at least ``margin`` steps before the failure's step,
              set newer checkpoints aside, optionally skip the steps that went wrong
    stop      end the run (status ``stopped``)
    ignore    (anomalies only) journal it and keep training
    """

    RESTART = "restart"
    ROLLBACK = "rollback"
    STOP = "stop"
    IGNORE = "ignore"

    def __str__(self) -> str:
        return self.value




@dataclass(frozen=True)
class Backoff:
    """Delay before attempt n+1: ``initial × factor^k`` capped at ``max``, k = failed
    attempts in a row that made no progress (a run that moves forward restarts quickly)."""

    initial: float = 2.0
    factor: float = 2.0
    max: float = 120.0

    def delay(self, streak: int) -> float:
        return min(self.max, self.initial * self.factor ** max(0, streak))


@dataclass(frozen=True)
class Rule:
    """One entry of ``rules:``; ``index`` is 1-based as a reader counts them."""

    index: int
    kinds: frozenset[FailureKind]
    action: Action
    set: Mapping[str, OverrideSpec] = field(default_factory=dict)
    max: int | None = None
    margin: int = 0
    skip_steps: int = 0
    if_missing: IfMissing = IfMissing.ERROR
    lines: Mapping[str, int] = field(default_factory=dict, compare=False)   # set key (and "") -> line

    def label(self) -> str:
        return f"rule {self.index} ({self.action.value})"

    def missing(self, config: Mapping[str, Any]) -> list[tuple[str, str]]:
        """``(key, why)`` of each ``set`` key that ``config`` cannot take as the rule says."""
        out = []
        for key, spec in self.set.items():
            try:
                current = get_key(config, key)
            except KeyError:
                out.append((key, "is not a key of the config"))
                continue
            if not spec.literal and (spec.scale is not None or spec.add is not None) and not is_number(current):
                out.append((key, f"is {current!r} in the config, not a number to scale or add to"))
        return out

    def overrides_for(self, config: Mapping[str, Any]) -> tuple[dict[str, Any], str]:
        """The resolved new values of ``set`` against ``config``, and in words what was left
        out: a key the config lacks (a literal is still set, unless ``if_missing: skip``: the
        shim reports it to the script), or a value that cannot be changed as asked."""
        values: dict[str, Any] = {}
        left: list[str] = []
        for key, spec in self.set.items():
            try:
                current = get_key(config, key)
            except KeyError:
                if spec.literal and self.if_missing is IfMissing.ERROR:
                    values[key] = spec.resolve(None)
                else:
                    left.append(f"{key} (not in the script's config)")
                continue
            try:
                values[key] = spec.resolve(current)
            except ConfigError as exc:
                left.append(f"{key} ({str(exc).partition(': ')[2] or exc})")
        return values, (f"not set: {', '.join(left)}" if left else "")


@dataclass(frozen=True)
class CheckpointRetention:
    keep_last: int | None = None
    keep_every: int | None = None
    keep_best_metric: str | None = None
    keep_best_mode: str = "min"
    snapshot_overhead: float = 0.02   # the share of step time ftrain.snapshot may block training


class MissingCheckpoint(str, enum.Enum):
    """``script: on_missing_checkpoint``: what a restart does when none of the script's
    checkpoints of this run is found."""

    FRESH = "fresh"   # start from scratch, and say so
    STOP = "stop"     # stop the run with the reason

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class CheckpointSource:
    """Where the checkpoints a decision picks from come from: ftrain's own folder
    (``script`` None), or the script's own files matching the ``script: checkpoints``
    globs (``script``, for the reasons), with what to do when none is found."""

    script: str | None = None
    on_missing: MissingCheckpoint = MissingCheckpoint.FRESH


class CheckpointRef(Protocol):
    """What a decision needs to know of a checkpoint (``checkpoints.Checkpoint`` fits)."""

    @property
    def path(self) -> Any: ...
    @property
    def step(self) -> int | None: ...


@dataclass(frozen=True)
class History:
    """What the run has been through, as values.

    ``restarts``: restarts and rollbacks so far. ``rule_uses``: decisions per rule index.
    ``no_progress_streak``: attempts in a row, after a restart, that reached no new step.
    ``rollbacks``: ``(failure_step, resumed_step)`` of earlier rollbacks, to roll back
    further when an anomaly comes back at the same place. ``config``: the effective config.
    """

    restarts: int = 0
    rule_uses: Mapping[int, int] = field(default_factory=dict)
    no_progress_streak: int = 0
    rollbacks: tuple[tuple[int, int | None], ...] = ()
    config: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Decision:
    """What to do after a failure, with the reason in words.

    ``overrides`` are resolved new values (``{"train.batch_size": 16}``); ``skip`` the step
    windows this decision adds; ``quarantine_after`` (rollback) the step after which
    checkpoints are set aside; ``gave_up`` marks a stop because a budget ran out.
    """

    action: Action
    reason: str
    rule: int | None = None
    overrides: Mapping[str, Any] = field(default_factory=dict)
    resume_from: str | None = None
    resume_step: int | None = None
    skip: tuple[tuple[int, int], ...] = ()
    backoff: float = 0.0
    gave_up: bool = False
    quarantine_after: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "action": self.action.value,
            "rule": self.rule,
            "reason": self.reason,
            "overrides": dict(self.overrides),
            "resume_from": self.resume_from,
            "resume_step": self.resume_step,
            "skip_steps": [f"{a}-{b}" for a, b in self.skip],
            "backoff": self.backoff,
            "gave_up": self.gave_up,
            "quarantine_after": self.quarantine_after,
        }

    @classmethod
    def from_json(cls, data: Any) -> Decision:
        """The decision ``to_json`` wrote (a journal ``decision`` event fits too);
        ``ValueError`` naming the field on bad content."""
        from ftrain.protocol import parse_skip

        if not isinstance(data, Mapping):
            raise ValueError(f"decision: expected an object, got {data!r}"[:200])
        try:
            action = Action(data.get("action"))
        except ValueError:
            raise ValueError(f"action: not an action: {data.get('action')!r}"[:200]) from None
        for key in ("rule", "resume_step", "quarantine_after"):
            value = data.get(key)
            if value is not None and type(value) is not int:
                raise ValueError(f"{key}: expected an integer, got {value!r}"[:200])
        for key in ("reason", "resume_from"):
            value = data.get(key)
            if value is not None and not isinstance(value, str):
                raise ValueError(f"{key}: expected a string, got {value!r}"[:200])
        found = data.get("overrides") or {}
        if not isinstance(found, Mapping) or not all(isinstance(k, str) for k in found):
            raise ValueError(f"overrides: expected an object, got {found!r}"[:200])
        windows = data.get("skip_steps") or []
        if not isinstance(windows, list) or not all(isinstance(w, str) for w in windows):
            raise ValueError(f"skip_steps: expected a list of a-b strings, got {windows!r}"[:200])
        backoff = data.get("backoff", 0.0)
        if type(backoff) not in (int, float) or not backoff >= 0:
            raise ValueError(f"backoff: expected seconds, got {backoff!r}"[:200])
        return cls(action, reason=data.get("reason") or "", rule=data.get("rule"), overrides=dict(found),
                   resume_from=data.get("resume_from"), resume_step=data.get("resume_step"),
                   skip=parse_skip(",".join(windows), what="skip_steps"), backoff=float(backoff),
                   gave_up=bool(data.get("gave_up")), quarantine_after=data.get("quarantine_after"))


@dataclass(frozen=True)
class SlurmSpec:
    """The policy's ``slurm:`` section: after the pre-timeout notice (USR1) under Slurm,
    whether ftrain requeues its own job (``ftrain.slurm``)."""

    requeue: bool = True


@dataclass(frozen=True)
class Policy:
    """A validated policy. ``source`` is the file it came from (or ``<default>``)."""

    source: str
    rules: tuple[Rule, ...]
    max_restarts: int = 8
    backoff: Backoff = Backoff()
    no_progress: int = 3
    grace: float = 30.0
    warm_start: bool = True     # start the next attempt's interpreter early (ftrain.warm)
    detect: DetectSpec = field(default_factory=DetectSpec.default)
    checkpoints: CheckpointRetention = CheckpointRetention()
    script: Mapping[str, Any] = field(default_factory=dict)
    notify: NotifySpec = NotifySpec()
    slurm: SlurmSpec = SlurmSpec()
    text: str = field(default="", repr=False, compare=False)   # the YAML it was read from

    def rule_for(self, kind: FailureKind) -> Rule | None:
        """The first rule that names ``kind``."""
        return next((r for r in self.rules if kind in r.kinds), None)

    def override_keys(self) -> set[str]:
        return {key for rule in self.rules for key in rule.set}

    def check_config(self, config: Mapping[str, Any] | None) -> list[str]:
        """``file:line: rule N: set: ...`` for each key a rule overrides that ``config`` lacks
        (or cannot scale), except in rules with ``if_missing: skip``. ``config`` None: not
        known before the script runs (no ``--config``: its ``ftrain.config(defaults=...)``)."""
        if config is None:
            return []
        return [
            f"{self.source}:{rule.lines.get(key, rule.lines.get('', 1))}: rule {rule.index}: set: {key!r} {why}"
            + (" (add it to the config, or give the rule `if_missing: skip`)" if "not a key" in why else "")
            for rule in self.rules if rule.if_missing is IfMissing.ERROR for key, why in rule.missing(config)
        ]

    def decide(
        self,
        failure: Failure,
        history: History,
        checkpoints: Sequence[CheckpointRef] = (),
        source: CheckpointSource = CheckpointSource(),
    ) -> Decision:
        """The decision for ``failure``; pure, from values only. ``checkpoints``: the usable
        ones, from ``source``."""
        decision = self._decide(failure, history, checkpoints)
        if source.script is None or decision.action not in (Action.RESTART, Action.ROLLBACK):
            return decision
        # The script's own checkpoints: none found follows on_missing_checkpoint; a rollback
        # sets the newer ones aside (RunState.apply) until the script writes them again.
        if not checkpoints and decision.resume_from is None:
            if source.on_missing is MissingCheckpoint.STOP:
                return Decision(Action.STOP, rule=decision.rule,
                                reason=f"{decision.reason}; but no checkpoint of this run matches {source.script} "
                                       "(on_missing_checkpoint: stop)")
            return replace(decision, reason=f"{decision.reason}; no checkpoint of this run matches "
                                            f"{source.script}: starting fresh")
        if decision.action is Action.ROLLBACK:
            after = decision.resume_step if decision.resume_step is not None else -1
            newer = sum(1 for c in checkpoints if c.step is not None and c.step > after)
            if newer:
                return replace(decision, reason=f"{decision.reason}; {newer} newer checkpoint(s) of the "
                                                "script set aside until it writes them again")
        return decision

    def _decide(self, failure: Failure, history: History, checkpoints: Sequence[CheckpointRef]) -> Decision:
        kind = failure.kind
        if history.no_progress_streak >= self.no_progress:
            return Decision(Action.STOP, gave_up=True,
                            reason=f"no progress in {history.no_progress_streak} restarts in a row "
                                   f"(no_progress: {self.no_progress}); last failure {kind.value}")
        rule = self.rule_for(kind)
        if rule is None:
            return Decision(Action.STOP, reason=f"{kind.value}: no rule matches; stopping")
        if rule.action is Action.STOP:
            return Decision(Action.STOP, rule=rule.index, reason=f"{kind.value}: {rule.label()} says stop")
        used = history.rule_uses.get(rule.index, 0)
        if rule.max is not None and used >= rule.max:
            return Decision(Action.STOP, rule=rule.index, gave_up=True,
                            reason=f"{kind.value}: {rule.label()} budget ({rule.max}) spent")
        if rule.action is Action.IGNORE:
            return Decision(Action.IGNORE, rule=rule.index, reason=f"{kind.value}: {rule.label()} ignores it")
        if history.restarts >= self.max_restarts:
            return Decision(Action.STOP, rule=rule.index, gave_up=True,
                            reason=f"{kind.value}: max_restarts ({self.max_restarts}) spent")

        overrides, left_out = rule.overrides_for(history.config)
        backoff = self.backoff.delay(history.no_progress_streak)
        usable = sorted((c for c in checkpoints if c.step is not None), key=lambda c: c.step)  # type: ignore[arg-type, return-value]
        changes = ", ".join(f"{k}={v!r}" for k, v in overrides.items())
        suffix = (f"; set {changes}" if changes else "") + (f"; {left_out}" if left_out else "")

        if rule.action is Action.RESTART:
            newest = usable[-1] if usable else None
            where = f"from step {newest.step}" if newest else "from scratch (no usable checkpoint)"
            return Decision(Action.RESTART, rule=rule.index, overrides=overrides, backoff=backoff,
                            resume_from=str(newest.path) if newest else None,
                            resume_step=newest.step if newest else None,
                            reason=f"{kind.value}: {rule.label()}: restart {where}{suffix}")

        # Rollback: a checkpoint at least `margin` steps before the failure; further back if
        # an earlier rollback near this step did not cure it.
        at = failure.step if failure.step is not None else 0
        limit = at - rule.margin
        reach = max(rule.margin, rule.skip_steps, 1)
        for prev_at, prev_resumed in history.rollbacks:
            if abs(prev_at - at) <= reach:
                limit = min(limit, (prev_resumed if prev_resumed is not None else 0) - 1)
        chosen = next((c for c in reversed(usable) if c.step <= limit), None)  # type: ignore[operator]
        skip = ((at, at + rule.skip_steps - 1),) if rule.skip_steps > 0 else ()
        skip_text = _skip_text(at, rule.skip_steps, history.config) if skip else ""
        if chosen is None:
            where = f"from scratch: no usable checkpoint at or before step {limit}"
        else:
            where = f"to step {chosen.step} (failure at step {at}, margin {rule.margin})"
        return Decision(Action.ROLLBACK, rule=rule.index, overrides=overrides, backoff=backoff,
                        resume_from=str(chosen.path) if chosen else None,
                        resume_step=chosen.step if chosen else None, skip=skip,
                        quarantine_after=chosen.step if chosen else -1,
                        reason=f"{kind.value}: {rule.label()}: roll back {where}{skip_text}{suffix}")


def _skip_text(at: int, count: int, config: Mapping[str, Any]) -> str:
    """The skip window in words: how many steps, and whether it reaches past the job's end."""
    from ftrain.view import total_steps

    text = f"; skip steps {at}-{at + count - 1} ({count} steps)"
    total = total_steps(config)
    if total is not None and at + count > total:
        left = max(total - at, 0)
        text += (f"; WARNING: the window reaches past the job's end (step {total - 1}): "
                 f"all {left} steps left are skipped, {left / total:.0%} of the job")
    return text
