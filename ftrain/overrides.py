"""Dotted-key overrides of a YAML config.

An override spec is either a literal (``train.amp: false``) or a mapping with one of
``scale``, ``add``, ``value`` and the clamps ``min``/``max``. Specs are *resolved* against
the current config into plain new values (``{"train.batch_size": 16}``); the resolved values
are what the journal records and what accumulates across attempts, so a run's effective
config can always be rebuilt by applying them in order.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ftrain.errors import ConfigError


class ConfigLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
    """Safe YAML (libyaml's parser when present), but ``3e-4`` is a float as YAML 1.2 (and
    every ML config author) reads it."""


ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                   |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                   |\.[0-9_]+(?:[eE][-+][0-9]+)?
                   |[-+]?\.(?:inf|Inf|INF)
                   |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


def load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=ConfigLoader)


def compose_and_load(text: str) -> tuple[yaml.Node | None, Any]:
    """The node tree (for line numbers) and the data, from one parse."""
    loader = ConfigLoader(text)
    try:
        node = loader.get_single_node()
        return node, (loader.construct_document(node) if node is not None else None)
    finally:
        loader.dispose()


def describe_yaml_error(exc: yaml.YAMLError) -> tuple[int, str]:
    """(1-based line, problem) of a YAML error: where the broken construct began, if known."""
    mark = getattr(exc, "context_mark", None) or getattr(exc, "problem_mark", None)
    line = mark.line + 1 if mark is not None else 1
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    return line, problem


SPEC_KEYS = frozenset({"scale", "add", "value", "min", "max"})
_MISSING = object()


@dataclass(frozen=True)
class OverrideSpec:
    """How one key changes: a literal ``value``, or ``scale``/``add``, then clamped."""

    key: str
    value: Any = _MISSING
    scale: float | None = None
    add: float | None = None
    min: float | None = None
    max: float | None = None

    @classmethod
    def parse(cls, key: str, raw: Any) -> OverrideSpec:
        """Build from the YAML form; raise ValueError naming the problem."""
        if not isinstance(raw, dict):
            return cls(key, value=raw)
        unknown = set(raw) - SPEC_KEYS
        if unknown:
            raise ValueError(f"unknown override field {sorted(unknown)[0]!r} (use scale, add, value, min, max)")
        ops = [k for k in ("scale", "add", "value") if k in raw]
        if len(ops) > 1:
            raise ValueError(f"override has both {ops[0]!r} and {ops[1]!r}; give one")
        for k in ("scale", "add", "min", "max"):
            if k in raw and (isinstance(raw[k], bool) or not isinstance(raw[k], (int, float))):
                raise ValueError(f"override field {k!r} must be a number, not {raw[k]!r}")
        if not ops and not ({"min", "max"} & set(raw)):
            raise ValueError("override mapping needs one of scale, add, value (and optional min/max)")
        return cls(
            key,
            value=raw.get("value", _MISSING),
            scale=raw.get("scale"),
            add=raw.get("add"),
            min=raw.get("min"),
            max=raw.get("max"),
        )

    def resolve(self, current: Any) -> Any:
        """The new value for ``current``. An int stays an int; clamps apply last."""
        if self.value is not _MISSING:
            new = self.value
        elif self.scale is not None or self.add is not None:
            if isinstance(current, bool) or not isinstance(current, (int, float)):
                raise ConfigError(f"{self.key}: cannot scale or add to {current!r} (not a number)")
            new = current * self.scale if self.scale is not None else current + (self.add or 0)
            if isinstance(current, int):
                new = int(math.floor(new + 0.5))
        else:
            new = current
        if isinstance(new, (int, float)) and not isinstance(new, bool):
            if self.min is not None and new < self.min:
                new = type(new)(self.min) if isinstance(new, int) else float(self.min)
            if self.max is not None and new > self.max:
                new = type(new)(self.max) if isinstance(new, int) else float(self.max)
        return new


def get_key(config: Mapping[str, Any], key: str) -> Any:
    """The value at a dotted key; KeyError naming the missing part."""
    node: Any = config
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            raise KeyError(key)
        node = node[part]
    return node


def has_key(config: Mapping[str, Any], key: str) -> bool:
    try:
        get_key(config, key)
    except KeyError:
        return False
    return True


def set_key(config: dict[str, Any], key: str, value: Any) -> None:
    """Set a dotted key in place; intermediate mappings must exist."""
    parts = key.split(".")
    node = config
    for part in parts[:-1]:
        nxt = node.get(part)
        if not isinstance(nxt, dict):
            raise KeyError(key)
        node = nxt
    node[parts[-1]] = value


def resolve(specs: Mapping[str, OverrideSpec], config: Mapping[str, Any]) -> dict[str, Any]:
    """Resolve every spec against ``config`` into new plain values."""
    out: dict[str, Any] = {}
    for key, spec in specs.items():
        try:
            current = get_key(config, key)
        except KeyError:
            raise ConfigError(f"override of {key!r}: the config has no such key") from None
        out[key] = spec.resolve(current)
    return out


def apply(config: Mapping[str, Any], values: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``config`` with resolved ``values`` set."""
    new = copy.deepcopy(dict(config))
    for key, value in values.items():
        try:
            set_key(new, key, value)
        except KeyError:
            raise ConfigError(f"override of {key!r}: the config has no such key") from None
    return new


def parse_set(text: str) -> tuple[str, Any]:
    """``--set train.lr=3e-4`` → ("train.lr", 0.0003); the value is read as YAML."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE")
    key, _, raw = text.partition("=")
    key = key.strip()
    if not key:
        raise ConfigError(f"--set {text!r}: empty key")
    try:
        value = load_yaml(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def load_config(path: Path | None) -> dict[str, Any]:
    """Read a YAML config file into a dict; ConfigError with file and line on failure."""
    if path is None:
        return {}
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config: {exc.strerror}") from exc
    try:
        data = load_yaml(text)
    except yaml.YAMLError as exc:
        line, problem = describe_yaml_error(exc)
        raise ConfigError(f"{path}:{line}: malformed YAML: {problem}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config must be a YAML mapping, not {type(data).__name__}")
    return data


def dump_config(config: Mapping[str, Any]) -> str:
    return yaml.safe_dump(dict(config), sort_keys=False, default_flow_style=False)
