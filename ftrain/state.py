"""What the run has been through, in one place, and its one codec.

``RunState`` is folded from decisions as the run goes (``apply``) and rebuilt from the
journal on resume (``replay``). ``to_json``/``from_json`` are the one encoding of it: the
nodes of a job share it through ``coord/`` with them, and a rejoining node adopts node 0's.
``Failure``/``Decision`` have their own ``to_json``/``from_json`` beside their classes; the
journal replay and the nodes' files use those. Reading is strict: a value of the wrong type
raises ``ValueError`` naming the field, which the typed readers turn into a ``RunDirError``
with the file and line.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ftrain import overrides
from ftrain.inject import Fault, format_inject, parse_inject
from ftrain.policy import Action, Decision, History
from ftrain.protocol import format_skip, parse_skip

__all__ = ["QUIET_PROGRESS", "RunState", "remove_fault"]

QUIET_PROGRESS = 60.0   # seconds an attempt of a script that reports no steps must run to count as progress


@dataclass
class RunState:
    """The run's history and what the next attempt starts with."""

    attempt: int = 0
    config: dict[str, Any] = field(default_factory=dict)
    overrides: dict[str, Any] = field(default_factory=dict)   # accumulated, resolved
    skip: list[tuple[int, int]] = field(default_factory=list)
    inject: list[Fault] = field(default_factory=list)          # still to fire
    resume_from: str | None = None
    resume_step: int | None = None
    restarts: int = 0
    rule_uses: dict[int, int] = field(default_factory=dict)
    no_progress_streak: int = 0
    rollbacks: list[tuple[int, int | None]] = field(default_factory=list)
    set_aside: list[tuple[int, float]] = field(default_factory=list)   # (after step, when): the script's own
    best_step: int | None = None
    finished: dict[str, Any] | None = None   # the run_end event, if any
    defaults: dict[str, Any] = field(default_factory=dict)   # the script's config(defaults=...), as it said

    def history(self) -> History:
        """The values a decision reads; its config is the script's: defaults ← config (DESIGN §6)."""
        return History(restarts=self.restarts, rule_uses=dict(self.rule_uses),
                       no_progress_streak=self.no_progress_streak, rollbacks=tuple(self.rollbacks),
                       config=overrides.merged(self.defaults, self.config) if self.defaults else self.config)

    def apply(self, decision: Decision, failure_step: int | None, *, t: float | None = None) -> None:
        """Fold a restart/rollback decision into the state for the next attempt. ``t``: when
        it was taken (a rollback sets the script's newer checkpoints aside from then on)."""
        self.restarts += 1
        if decision.rule is not None:
            self.rule_uses[decision.rule] = self.rule_uses.get(decision.rule, 0) + 1
        if decision.overrides:
            self.config = overrides.apply(self.config, decision.overrides)
            self.overrides.update(decision.overrides)
        self.skip.extend(decision.skip)
        self.resume_from = decision.resume_from
        self.resume_step = decision.resume_step
        if decision.action is Action.ROLLBACK:
            self.rollbacks.append((failure_step or 0, decision.resume_step))
            if t is not None:
                self.set_aside.append((decision.resume_step if decision.resume_step is not None else -1, t))

    def attempt_ended(self, max_step: int | None, *, counts: bool, saved: bool = False,
                      lived: float = 0.0) -> bool:
        """Note how far an attempt got; ``counts``: it followed a restart (the first attempt
        of a run is not judged for progress). True when it made progress: a new step, or a
        checkpoint of its own (``saved``: a script whose counter restarts at 0 on resume still
        moves on), or — for a script that has never reported a step, which cannot be judged
        by steps — having run ``QUIET_PROGRESS`` seconds (``lived``) past its start-up. An
        attempt that dies before any of these is a crash loop's."""
        new_step = max_step is not None and (self.best_step is None or max_step > self.best_step)
        silent = self.best_step is None and max_step is None
        progress = new_step or saved or (silent and lived >= QUIET_PROGRESS)
        if counts:
            self.no_progress_streak = 0 if progress else self.no_progress_streak + 1
        if new_step:
            self.best_step = max_step
        return progress

    @classmethod
    def replay(cls, events: Sequence[Mapping[str, Any]], base_config: Mapping[str, Any],
               inject: Sequence[Fault]) -> RunState:
        """Rebuild the state from journal events (DESIGN §4), read by the typed reader.
        ``inject`` is what is still to fire: the caller takes the fired faults from the metrics
        stream, which also holds those of an attempt whose supervisor died before its end."""
        state = cls(config=dict(base_config), inject=list(inject))
        for ev in events:
            name = ev.get("event")
            if name == "attempt_start":
                state.attempt = max(state.attempt, int(ev.get("attempt", 0)))
                state.finished = None
            elif name == "attempt_end":
                reached = ev.get("max_step")
                if reached is not None and (state.best_step is None or reached > state.best_step):
                    state.best_step = reached
                state.no_progress_streak = int(ev.get("no_progress_streak", state.no_progress_streak))
            elif name == "decision" and ev.get("action") in (Action.RESTART.value, Action.ROLLBACK.value):
                state.apply(Decision.from_json(ev), ev.get("failure_step"), t=ev.get("t"))
            elif name == "run_end":
                state.finished = dict(ev)
        return state

    # ------------------------------------------------------------------ the codec
    def to_json(self) -> dict[str, Any]:
        """Everything another node needs to start the same next attempt (``finished`` is not)."""
        return {
            "attempt": self.attempt, "config": self.config, "overrides": self.overrides,
            "skip": format_skip(self.skip), "inject": format_inject(self.inject),
            "resume_from": self.resume_from, "resume_step": self.resume_step, "restarts": self.restarts,
            "rule_uses": {str(k): v for k, v in self.rule_uses.items()},
            "no_progress_streak": self.no_progress_streak,
            "rollbacks": [list(r) for r in self.rollbacks], "set_aside": [list(s) for s in self.set_aside],
            "best_step": self.best_step,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RunState:
        """The state ``to_json`` wrote; ``ValueError`` naming the field on bad content."""
        if not isinstance(data, Mapping):
            raise ValueError("not an object")
        return cls(
            attempt=_int(data, "attempt"), config=dict(_map(data, "config")),
            overrides=dict(_map(data, "overrides")),
            skip=list(parse_skip(_opt_str(data, "skip"), what="skip")),
            inject=list(_faults(data.get("inject"))),
            resume_from=_opt_str(data, "resume_from"), resume_step=_opt_int(data, "resume_step"),
            restarts=_int(data, "restarts"),
            rule_uses={_int_text(k, "rule_uses"): _int({"v": v}, "v") for k, v in _map(data, "rule_uses").items()},
            no_progress_streak=_int(data, "no_progress_streak"),
            rollbacks=[(_int({"a": a}, "a"), _opt_int({"b": b}, "b")) for a, b in _pairs(data, "rollbacks")],
            set_aside=[(_int({"a": a}, "a"), _num(b, "set_aside")) for a, b in _pairs(data, "set_aside")],
            best_step=_opt_int(data, "best_step"),
        )


def remove_fault(faults: Sequence[Fault], kind: str, at: int | None) -> list[Fault]:
    """``faults`` without the one that fired: ``kind@at`` as the shim reported it (or, when
    ``at`` is unknown, the earliest of that kind). A fault already removed stays removed."""
    out = list(faults)
    if at is not None:
        gone = next((f for f in out if f.kind == kind and f.step == at), None)
    else:
        gone = min((f for f in out if f.kind == kind), key=lambda f: f.step, default=None)
    if gone is not None:
        out.remove(gone)
    return out


# --------------------------------------------------------------------------- strict field readers
def _int(data: Mapping[str, Any], key: str) -> int:
    value = data.get(key, 0)
    if type(value) is not int:
        raise ValueError(f"{key}: expected an integer, got {value!r}"[:200])
    return value


def _opt_int(data: Mapping[str, Any], key: str) -> int | None:
    return None if data.get(key) is None else _int(data, key)


def _int_text(text: Any, key: str) -> int:
    if not (isinstance(text, str) and text.lstrip("-").isdigit() and len(text) < 19):
        raise ValueError(f"{key}: expected an integer key, got {text!r}"[:200])
    return int(text)


def _num(value: Any, key: str) -> float:
    if type(value) not in (int, float):
        raise ValueError(f"{key}: expected a number, got {value!r}"[:200])
    return float(value)


def _opt_str(data: Mapping[str, Any], key: str) -> str | None:
    value = data.get(key)
    if value is not None and not isinstance(value, str):
        raise ValueError(f"{key}: expected a string, got {value!r}"[:200])
    return value


def _map(data: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = data.get(key) or {}
    if not isinstance(value, Mapping):
        raise ValueError(f"{key}: expected an object, got {value!r}"[:200])
    return value


def _pairs(data: Mapping[str, Any], key: str) -> list[tuple[Any, Any]]:
    value = data.get(key) or []
    if not isinstance(value, list) or not all(isinstance(p, list) and len(p) == 2 for p in value):
        raise ValueError(f"{key}: expected a list of pairs, got {value!r}"[:200])
    return [(a, b) for a, b in value]


def _faults(value: Any) -> tuple[Fault, ...]:
    if value is None:
        return ()
    if not isinstance(value, str):
        raise ValueError(f"inject: expected a fault spec, got {value!r}"[:200])
    return parse_inject(value)
