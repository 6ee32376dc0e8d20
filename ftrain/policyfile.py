"""Policy files: YAML, version 1 (DESIGN §6), read and validated with file, line and key.

``load_policy`` reads and validates a policy, collecting every problem before raising one
``PolicyError`` whose lines read ``file:line: key: message``; ``parse_policy`` does the same
for text. The values it builds are ``ftrain.policy``'s.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from ftrain.detect import (
    DetectSpec,
    HangSpec,
    NonfiniteSpec,
    SpikeSpec,
    StragglerSpec,
    ThresholdSpec,
    parse_duration,
)
from ftrain.errors import PolicyError
from ftrain.files import read_bounded
from ftrain.kinds import ANOMALY_KINDS, FailureKind
from ftrain.notify import NOTIFY_EVENTS, NotifySpec, parse_command
from ftrain.overrides import OverrideSpec, compose_and_load, yaml_problem
from ftrain.policy import Action, Backoff, CheckpointRetention, IfMissing, Policy, Rule, SlurmSpec

__all__ = ["DEFAULT_SOURCE", "default_policy_path", "load_policy", "load_policy_copy", "parse_policy"]

RULE_KINDS = frozenset(FailureKind) - {FailureKind.NO_PROGRESS}
TOP_KEYS = ("version", "max_restarts", "backoff", "no_progress", "grace", "warm_start", "detect", "rules",
            "checkpoints", "script", "notify", "slurm")
RULE_KEYS = ("when", "action", "set", "if_missing", "max", "margin", "skip_steps")
BACKOFF_KEYS = ("initial", "factor", "max")
DETECT_KEYS = ("nonfinite", "threshold", "spike", "hang", "straggler")
SPIKE_KEYS = ("window", "zscore", "warmup", "patience")
HANG_KEYS = ("timeout", "startup", "floor", "factor")
STRAGGLER_KEYS = ("factor", "window")
CHECKPOINT_KEYS = ("keep_last", "keep_every", "keep_best", "snapshot_overhead")
NOTIFY_KEYS = ("command", "webhook", "events", "timeout")
SLURM_KEYS = ("requeue",)

DEFAULT_SOURCE = "<default policy>"


def default_policy_path() -> Path:
    """The built-in default policy, shipped inside the package."""
    return Path(__file__).with_name("policy.default.yaml")


POLICY_LIMIT = 1 << 20   # a policy is a page or two of YAML
NUMBER_LIMIT = 1e15      # counts, factors, steps: far beyond any run, short of float trouble
DURATION_LIMIT = 365 * 86400.0


def load_policy(path: Path | None) -> Policy:
    """Read and validate a policy file (None: the built-in default)."""
    if path is None:
        text = default_policy_path().read_text()
        return _replace(parse_policy(text, DEFAULT_SOURCE), text=text)
    try:
        text = read_bounded(path, POLICY_LIMIT).decode()
    except FileNotFoundError:
        raise PolicyError([f"{path}: policy file not found"]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PolicyError([f"{path}: cannot read policy: {getattr(exc, 'strerror', None) or exc}"]) from exc
    return _replace(parse_policy(text, str(path)), text=text)


def load_policy_copy(copy: Path, source: str) -> Policy:
    """The copy of a run's policy kept in its folder (``policy.yaml``), read as the file it
    was copied from (``source``, named in messages)."""
    try:
        text = read_bounded(copy, POLICY_LIMIT, inside=Path(copy).parent).decode()
    except (OSError, UnicodeDecodeError) as exc:
        raise PolicyError([f"{copy}: cannot read the run's policy copy: {getattr(exc, 'strerror', None) or exc}"]) \
            from exc
    return _replace(parse_policy(text, source), text=text)


def _replace(policy: Policy, **changes: Any) -> Policy:

    return dataclasses.replace(policy, **changes)


def _line_map(node: yaml.Node, path: tuple[Any, ...] = (), out: dict | None = None) -> dict[tuple[Any, ...], int]:
    """1-based line of every key path in a composed YAML tree."""
    out = {} if out is None else out
    out.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = key_node.value
            out[path + (key,)] = key_node.start_mark.line + 1
            _line_map(value_node, path + (key,), out)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _line_map(item, path + (i,), out)
    return out


class _Checker:
    """Collects every problem with its line, so `policy check` can print them all at once."""

    def __init__(self, source: str, lines: Mapping[tuple[Any, ...], int]) -> None:
        self.source = source
        self.lines = lines
        self.errors: list[str] = []

    def line(self, path: tuple[Any, ...]) -> int:
        """The line of ``path``, or of the nearest key above it that has one."""
        probe = path
        while probe and probe not in self.lines:
            probe = probe[:-1]
        return self.lines.get(probe, 1)

    def error(self, path: tuple[Any, ...], message: str) -> None:
        line = self.line(path)
        key = ".".join(str(p) if not isinstance(p, int) else f"[{p}]" for p in path).replace(".[", "[")
        self.errors.append(f"{self.source}:{line}: {key or '(top)'}: {message}")

    def keys(self, data: Mapping[Any, Any], allowed: Sequence[str], path: tuple[Any, ...]) -> None:
        for key in data:
            if key is True and "when" in allowed:
                self.error(path + ("on",), "YAML reads `on:` as true; name the kinds under `when:`")
            elif key not in allowed:
                self.error(path + (key,), f"unknown key {key!r} (expected one of: {', '.join(allowed)})")

    def number(self, data: Mapping[str, Any], key: str, path: tuple[Any, ...], *, integer: bool = False,
               minimum: float | None = None, default: Any = None) -> Any:
        if key not in data:
            return default
        value = data[key]
        ok = isinstance(value, int) if integer else isinstance(value, (int, float))
        if isinstance(value, bool) or not ok:
            self.error(path + (key,), f"must be {'an integer' if integer else 'a number'}, not {value!r}")
            return default
        if not math.isfinite(value) or abs(value) > NUMBER_LIMIT:
            self.error(path + (key,), f"must be a finite number below {NUMBER_LIMIT:.0e}, not {value!r}")
            return default
        if minimum is not None and value < minimum:
            self.error(path + (key,), f"must be at least {minimum}, not {value!r}")
            return default
        return value

    def duration(self, data: Mapping[str, Any], key: str, path: tuple[Any, ...], default: float | None) -> float | None:
        if key not in data:
            return default
        try:
            seconds = parse_duration(data[key])
        except (ValueError, TypeError, OverflowError) as exc:
            self.error(path + (key,), str(exc))
            return default
        if not math.isfinite(seconds) or seconds > DURATION_LIMIT:
            self.error(path + (key,), f"must be a finite duration of at most a year, not {data[key]!r}")
            return default
        return seconds


def parse_policy(text: str, source: str) -> Policy:
    """Validate policy text; raise PolicyError listing every problem with file:line: key."""
    try:
        node, data = compose_and_load(text)
    except yaml.YAMLError as exc:
        raise PolicyError([yaml_problem(source, exc)]) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise PolicyError([f"{source}:1: a policy must be a YAML mapping, not {type(data).__name__}"])
    c = _Checker(source, _line_map(node) if node is not None else {})
    c.keys(data, TOP_KEYS, ())

    version = data.get("version", 1)
    if version != 1:
        c.error(("version",), f"unsupported policy version {version!r} (this ftrain reads version 1)")
    max_restarts = c.number(data, "max_restarts", (), integer=True, minimum=0, default=8)
    no_progress = c.number(data, "no_progress", (), integer=True, minimum=1, default=3)
    grace = c.duration(data, "grace", (), 30.0)
    warm_start = data.get("warm_start", True)
    if not isinstance(warm_start, bool):
        c.error(("warm_start",), f"must be true or false, not {warm_start!r}")
    backoff = _parse_backoff(c, data.get("backoff"))
    detect = _parse_detect(c, data.get("detect", {}))
    rules = _parse_rules(c, data.get("rules", []))
    retention = _parse_retention(c, data.get("checkpoints", {}))
    script = data.get("script") or {}
    if not isinstance(script, dict):
        c.error(("script",), "must be a mapping")
        script = {}
    notify = _parse_notify(c, data.get("notify"))
    slurm = _parse_slurm(c, data.get("slurm"))
    if c.errors:
        raise PolicyError(c.errors)
    return Policy(source=source, rules=tuple(rules), max_restarts=max_restarts, backoff=backoff,
                  no_progress=no_progress, grace=grace if grace is not None else 30.0, detect=detect,
                  checkpoints=retention, script=script, warm_start=warm_start, notify=notify, slurm=slurm)


def _parse_notify(c: _Checker, raw: Any) -> NotifySpec:
    path = ("notify",)
    if raw is None:
        return NotifySpec()
    if not isinstance(raw, dict):
        c.error(path, "must be a mapping (command, webhook, events, timeout)")
        return NotifySpec()
    c.keys(raw, NOTIFY_KEYS, path)
    command: tuple[str, ...] = ()
    if raw.get("command") is not None:
        command = parse_command(raw["command"]) or ()
        if not command:
            c.error(path + ("command",), f"must be a command line or a list of its words, not {raw['command']!r}")
    webhook = raw.get("webhook")
    if webhook is not None and not (isinstance(webhook, str) and webhook.startswith(("http://", "https://"))
                                    and len(webhook) > len("https://")):
        c.error(path + ("webhook",), f"must be an http:// or https:// URL, not {webhook!r}")
        webhook = None
    events = NotifySpec.events
    if "events" in raw:
        given = raw["events"]
        if isinstance(given, str):
            given = [given]
        if not isinstance(given, list) or not all(isinstance(e, str) for e in given):
            c.error(path + ("events",), f"must be a list of event names ({', '.join(NOTIFY_EVENTS)})")
        else:
            unknown = [e for e in given if e not in NOTIFY_EVENTS]
            for e in unknown:
                c.error(path + ("events",), f"unknown event {e!r} (expected one of: {', '.join(NOTIFY_EVENTS)})")
            events = tuple(given)
    timeout = c.duration(raw, "timeout", path, 10.0)
    if timeout is not None and not 0 < timeout <= 300:
        c.error(path + ("timeout",), f"must be more than 0s and at most 300s, not {raw['timeout']!r}")
        timeout = 10.0
    if not command and not webhook and "command" not in raw and "webhook" not in raw:
        c.error(path, "names no destination: give a `command`, a `webhook`, or both")
    return NotifySpec(command=command, webhook=webhook, events=events,
                      timeout=timeout if timeout is not None else 10.0)


def _parse_slurm(c: _Checker, raw: Any) -> SlurmSpec:
    path = ("slurm",)
    if raw is None:
        return SlurmSpec()
    if not isinstance(raw, dict):
        c.error(path, "must be a mapping (requeue)")
        return SlurmSpec()
    c.keys(raw, SLURM_KEYS, path)
    requeue = raw.get("requeue", True)
    if not isinstance(requeue, bool):
        c.error(path + ("requeue",), f"must be true or false, not {requeue!r}")
        requeue = True
    return SlurmSpec(requeue=requeue)


def _parse_backoff(c: _Checker, raw: Any) -> Backoff:
    path = ("backoff",)
    if raw is None:
        return Backoff()
    if not isinstance(raw, dict):
        constant = c.duration({"backoff": raw}, "backoff", (), 2.0)
        return Backoff(initial=constant or 0.0, factor=1.0, max=constant or 0.0)
    c.keys(raw, BACKOFF_KEYS, path)
    initial = c.duration(raw, "initial", path, 2.0) or 0.0
    factor = c.number(raw, "factor", path, minimum=1.0, default=2.0)
    cap = c.duration(raw, "max", path, 120.0)
    return Backoff(initial=initial, factor=factor, max=cap if cap is not None else 120.0)


def _metric_list(c: _Checker, raw: Any, path: tuple[Any, ...]) -> tuple[str, ...]:
    if isinstance(raw, str):
        return (raw,)
    if isinstance(raw, list) and all(isinstance(m, str) for m in raw):
        return tuple(raw)
    c.error(path, "must be a metric name or a list of metric names")
    return ()


def _parse_detect(c: _Checker, raw: Any) -> DetectSpec:
    path = ("detect",)
    default = DetectSpec.default()
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        c.error(path, "must be a mapping")
        return default
    c.keys(raw, DETECT_KEYS, path)

    nonfinite = default.nonfinite
    if "nonfinite" in raw:
        nf = raw["nonfinite"]
        nonfinite = None if nf in (False, None, []) else NonfiniteSpec(_metric_list(c, nf, path + ("nonfinite",)))

    thresholds = default.thresholds
    if "threshold" in raw:
        thresholds = ()
        th = raw["threshold"] or {}
        if not isinstance(th, dict):
            c.error(path + ("threshold",), "must map metric names to {min, max}")
            th = {}
        for metric, bounds in th.items():
            p = path + ("threshold", metric)
            if not isinstance(bounds, dict):
                c.error(p, "must be a mapping with min and/or max")
                continue
            c.keys(bounds, ("min", "max"), p)
            lo = c.number(bounds, "min", p)
            hi = c.number(bounds, "max", p)
            if lo is None and hi is None:
                c.error(p, "needs min or max")
                continue
            spec = _build(c, p, ThresholdSpec, str(metric), lo, hi)
            thresholds += (spec,) if spec else ()

    spikes = default.spikes
    if "spike" in raw:
        spikes = ()
        sp = raw["spike"] or {}
        if not isinstance(sp, dict):
            c.error(path + ("spike",), "must map metric names to {window, zscore, warmup, patience}")
            sp = {}
        for metric, opts in sp.items():
            p = path + ("spike", metric)
            opts = opts or {}
            if not isinstance(opts, dict):
                c.error(p, "must be a mapping")
                continue
            c.keys(opts, SPIKE_KEYS, p)
            spike = _build(
                c, p, SpikeSpec, str(metric),
                window=c.number(opts, "window", p, integer=True, minimum=5, default=200),
                zscore=c.number(opts, "zscore", p, minimum=0.0, default=6.0),
                warmup=c.number(opts, "warmup", p, integer=True, minimum=0, default=50),
                patience=c.number(opts, "patience", p, integer=True, minimum=1, default=1),
            )
            spikes += (spike,) if spike else ()

    hang = default.hang
    hg = _switchable(c, raw, "hang", HANG_KEYS, path)
    if hg is None:
        hang = None
    elif hg:
        hp = path + ("hang",)
        base = default.hang or HangSpec()
        timeout = hg.get("timeout", "auto")
        timeout_s = None if timeout == "auto" else c.duration(hg, "timeout", hp, None)
        hang = _build(
            c, hp, HangSpec,
            timeout=timeout_s,
            startup=c.duration(hg, "startup", hp, base.startup) or base.startup,
            floor=c.duration(hg, "floor", hp, base.floor) or base.floor,
            factor=c.number(hg, "factor", hp, minimum=1.0, default=base.factor),
        )
    straggler = default.straggler
    sg = _switchable(c, raw, "straggler", STRAGGLER_KEYS, path)
    if sg is None:
        straggler = None
    elif sg:
        sp = path + ("straggler",)
        base_s = default.straggler or StragglerSpec()
        straggler = _build(
            c, sp, StragglerSpec,
            factor=c.number(sg, "factor", sp, default=base_s.factor),
            window=c.number(sg, "window", sp, integer=True, minimum=3, default=base_s.window),
        )
    return DetectSpec(nonfinite=nonfinite, thresholds=thresholds, spikes=spikes, hang=hang, straggler=straggler)


def _switchable(c: _Checker, raw: Mapping[str, Any], name: str, keys: Sequence[str],
                path: tuple[Any, ...]) -> dict[str, Any] | None:
    """A detector section that may be turned off: None for ``false``/null, its checked
    mapping when given, ``{}`` when absent or not a mapping (the default stays; an error is
    recorded for the latter)."""
    if name not in raw:
        return {}
    value = raw[name]
    if value in (False, None):
        return None
    if not isinstance(value, dict):
        c.error(path + (name,), f"must be a mapping ({', '.join(keys)}) or false")
        return {}
    c.keys(value, keys, path + (name,))
    return value


def _build(c: _Checker, path: tuple[Any, ...], cls: Any, *args: Any, **kwargs: Any) -> Any:
    """Construct a detector spec; its own checks become errors on ``path``."""
    try:
        return cls(*args, **kwargs)
    except (ValueError, TypeError) as exc:
        c.error(path, str(exc))
        return None


def _parse_rules(c: _Checker, raw: Any) -> list[Rule]:
    if not isinstance(raw, list):
        c.error(("rules",), "must be a list of rules")
        return []
    rules: list[Rule] = []
    for i, item in enumerate(raw):
        path = ("rules", i)
        if not isinstance(item, dict):
            c.error(path, "a rule must be a mapping with `when` and `action`")
            continue
        c.keys(item, RULE_KEYS, path)
        kinds = _parse_kinds(c, item.get("when"), path + ("when",))
        if_missing = IfMissing.ERROR
        if "if_missing" in item:
            try:
                if_missing = IfMissing(item["if_missing"])
            except ValueError:
                c.error(path + ("if_missing",), f"must be skip or error, not {item['if_missing']!r}")
        action_raw = item.get("action")
        try:
            action = Action(action_raw)
        except ValueError:
            c.error(path + ("action",), f"unknown action {action_raw!r} (expected one of: "
                                        f"{', '.join(a.value for a in Action)})")
            continue
        if action is Action.IGNORE:
            crash = sorted(k.value for k in kinds - ANOMALY_KINDS)
            if crash:
                c.error(path + ("action",), f"ignore applies to anomalies only, not {', '.join(crash)}")
        sets: dict[str, OverrideSpec] = {}
        raw_set = item.get("set") or {}
        if not isinstance(raw_set, dict):
            c.error(path + ("set",), "must map dotted config keys to values or {scale, add, value, min, max}")
            raw_set = {}
        for key, spec in raw_set.items():
            try:
                sets[str(key)] = OverrideSpec.parse(str(key), spec)
            except ValueError as exc:
                c.error(path + ("set", key), str(exc))
        if sets and action in (Action.STOP, Action.IGNORE):
            c.error(path + ("set",), f"`set` has no effect with action {action.value}")
        for key in ("margin", "skip_steps"):
            if key in item and action is not Action.ROLLBACK:
                c.error(path + (key,), f"`{key}` applies to action rollback only")
        lines = {str(key): c.line(path + ("set", key)) for key in raw_set}
        lines[""] = c.line(path)
        rules.append(Rule(
            index=i + 1, kinds=frozenset(kinds), action=action, set=sets, if_missing=if_missing, lines=lines,
            max=c.number(item, "max", path, integer=True, minimum=0),
            margin=c.number(item, "margin", path, integer=True, minimum=0, default=0),
            skip_steps=c.number(item, "skip_steps", path, integer=True, minimum=0, default=0),
        ))
    return rules


def _parse_kinds(c: _Checker, raw: Any, path: tuple[Any, ...]) -> set[FailureKind]:
    if raw is None:
        c.error(path, "missing: name the failure kinds this rule handles")
        return set()
    names = [raw] if isinstance(raw, str) else raw if isinstance(raw, list) else None
    if names is None:
        c.error(path, "must be a failure kind or a list of kinds")
        return set()
    if not names:
        c.error(path, "names no failure kind: a rule for nothing is a mistake (list its kinds)")
        return set()
    kinds: set[FailureKind] = set()
    valid = sorted(k.value for k in RULE_KINDS)
    for name in names:
        try:
            kind = FailureKind(name)
        except ValueError:
            hint = _closest(str(name), valid)
            c.error(path, f"unknown failure kind {name!r}" + (f" (did you mean {hint!r}?)" if hint else
                                                               f" (kinds: {', '.join(valid)})"))
            continue
        if kind not in RULE_KINDS:
            c.error(path, f"{name!r} is a verdict, not a kind a rule can handle; use top-level `no_progress:`")
            continue
        kinds.add(kind)
    return kinds


def _closest(name: str, options: Iterable[str]) -> str | None:
    import difflib

    match = difflib.get_close_matches(name, list(options), n=1, cutoff=0.6)
    return match[0] if match else None


def _parse_retention(c: _Checker, raw: Any) -> CheckpointRetention:
    path = ("checkpoints",)
    if not raw:
        return CheckpointRetention()
    if not isinstance(raw, dict):
        c.error(path, "must be a mapping (keep_last, keep_every, keep_best, snapshot_overhead)")
        return CheckpointRetention()
    c.keys(raw, CHECKPOINT_KEYS, path)
    best = raw.get("keep_best") or {}
    metric, mode = None, "min"
    if best:
        if not isinstance(best, dict) or not isinstance(best.get("metric"), str):
            c.error(path + ("keep_best",), "must be {metric: NAME, mode: min|max}")
        else:
            c.keys(best, ("metric", "mode"), path + ("keep_best",))
            metric, mode = best["metric"], best.get("mode", "min")
            if mode not in ("min", "max"):
                c.error(path + ("keep_best", "mode"), f"must be min or max, not {mode!r}")
    return CheckpointRetention(
        keep_last=c.number(raw, "keep_last", path, integer=True, minimum=1),
        keep_every=c.number(raw, "keep_every", path, integer=True, minimum=1),
        keep_best_metric=metric, keep_best_mode=mode,
        snapshot_overhead=_parse_share(c, raw, "snapshot_overhead", path, CheckpointRetention.snapshot_overhead),
    )


def _parse_share(c: _Checker, raw: Mapping[str, Any], key: str, path: tuple[Any, ...], default: float) -> float:
    """A share of time: ``2%`` (a percentage) or ``0.02`` (a fraction), above 0 and at most 100 %."""
    if key not in raw:
        return default
    value = raw[key]
    share: float | None = None
    if isinstance(value, str) and value.strip().endswith("%"):
        try:
            share = float(value.strip()[:-1]) / 100
        except ValueError:
            share = None
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        share = float(value)
    if share is None or not math.isfinite(share) or not 0 < share <= 1:
        c.error(path + (key,), f"must be a share of step time above 0 and at most 100 % (2% or 0.02), "
                               f"not {value!r}")
        return default
    return share
