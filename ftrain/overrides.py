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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ftrain.errors import ConfigError
from ftrain.files import read_bounded

NODE_LIMIT = 100_000   # nodes a document may expand to through aliases: far beyond a config,
#                        far below a "billion laughs" bomb (a 400-byte file, 10^9 nodes)
CONFIG_LIMIT = 16 << 20   # bytes: a config is text, not a data set
INT_BITS = 256         # integers of a config or policy stay below 2^256 (77 digits)


class YAMLLimitError(yaml.MarkedYAMLError):
    """YAML that parses but that ftrain refuses to build: an alias bomb, a duplicate key, a
    number too long to convert. ``problem_mark`` is where it is."""

    def __init__(self, problem: str, mark: Any) -> None:
        super().__init__(problem=problem, problem_mark=mark)


class ConfigLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
    """Safe YAML (libyaml's parser when present), but ``3e-4`` is a float as YAML 1.2 (and
    every ML config author) reads it; and what it reads cannot hurt: aliases that expand
    beyond ``NODE_LIMIT`` nodes, duplicate keys and integers too long for ``int()`` are
    ``YAMLLimitError``s with their line, before anything is built."""

    def get_single_node(self) -> yaml.Node | None:
        node = super().get_single_node()
        if node is not None:
            check_expansion(node)
        return node

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[tuple[type, Any], int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                continue   # `<<: *base` may be overridden; a complex key is refused by the base class
            key = self.construct_object(key_node)
            line = key_node.start_mark.line + 1
            try:
                first = seen.get((type(key), key))
                seen[(type(key), key)] = line
            except TypeError:
                continue
            if first is not None:
                raise YAMLLimitError(f"duplicate key {key!r} (first on line {first})", key_node.start_mark)
        return super().construct_mapping(node, deep=deep)

    def construct_yaml_int(self, node: yaml.ScalarNode) -> int:
        try:
            value: int = super().construct_yaml_int(node)
        except ValueError:   # Python's int-str conversion limit (4300 digits)
            value = 1 << INT_BITS
        if value.bit_length() >= INT_BITS:   # also 0x… and 0b… forms: no str() of it would work
            raise YAMLLimitError(f"integer {str(node.value)[:20]}... ({len(str(node.value))} characters) "
                                 "is too large", node.start_mark)
        return value


ConfigLoader.add_constructor("tag:yaml.org,2002:int", ConfigLoader.construct_yaml_int)
ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                   |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                   |\.[0-9_]+(?:[eE][-+][0-9]+)?
                   |[-+]?\.(?:inf|Inf|INF)
                   |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


def check_expansion(root: yaml.Node, limit: int = NODE_LIMIT) -> None:
    """Refuse a node graph that aliases expand beyond ``limit`` nodes, or that refers to
    itself: counted once per distinct node (memoised), so the check itself stays cheap."""
    sizes: dict[int, int] = {}
    active: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        key = id(node)
        if done:
            active.discard(key)
            children = _children(node)
            size = 1 + sum(sizes[id(c)] for c in children)
            if size > limit:
                raise YAMLLimitError(f"aliases expand this to more than {limit} nodes (an alias bomb?)",
                                     node.start_mark)
            sizes[key] = size
            continue
        if key in sizes:
            continue
        if key in active:
            raise YAMLLimitError("an alias refers to the node that contains it", node.start_mark)
        active.add(key)
        stack.append((node, True))
        stack.extend((c, False) for c in _children(node) if id(c) not in sizes)


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


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


def yaml_problem(source: str, exc: yaml.YAMLError) -> str:
    """``file:line: what`` for a YAML error: malformed text, or content ftrain refuses."""
    line, problem = describe_yaml_error(exc)
    return f"{source}:{line}: {problem}" if isinstance(exc, YAMLLimitError) else \
        f"{source}:{line}: malformed YAML: {problem}"


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
            if k in raw and not math.isfinite(raw[k]):
                raise ValueError(f"override field {k!r} must be a finite number, not {raw[k]!r}")
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

    @property
    def literal(self) -> bool:
        """Sets a value whatever the current one (no ``scale``/``add``/clamp-only)."""
        return self.value is not _MISSING

    def resolve(self, current: Any) -> Any:
        """The new value for ``current``. An int stays an int; clamps apply last."""
        if self.value is not _MISSING:
            new = self.value
        elif self.scale is not None or self.add is not None:
            if isinstance(current, bool) or not isinstance(current, (int, float)):
                raise ConfigError(f"{self.key}: cannot scale or add to {current!r} (not a number)")
            try:
                new = current * self.scale if self.scale is not None else current + (self.add or 0)
                if isinstance(current, int):
                    new = int(math.floor(new + 0.5))
            except OverflowError:
                new = math.inf
            if isinstance(new, float) and not math.isfinite(new) and math.isfinite(current):
                raise ConfigError(f"{self.key}: {current!r} changed as asked is too large for a number")
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
    """Set a dotted key in place, adding the mappings above it that are missing;
    ``KeyError`` naming the part that is a value, not a mapping."""
    parts = key.split(".")
    node = config
    for part in parts[:-1]:
        nxt = node.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise KeyError(part)
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
    """A copy of ``config`` with resolved ``values`` set. A key the config lacks is added,
    with the mappings above it (a script configured only by its defaults gets it that way);
    a key below a value that is not a mapping is a ConfigError."""
    new = copy.deepcopy(dict(config))
    for key, value in values.items():
        try:
            set_key(new, key, value)
        except KeyError as exc:
            raise ConfigError(f"override of {key!r}: {exc.args[0]!r} is not a mapping in the config") from None
    return new


def merged(under: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """A deep copy of ``under`` with ``over`` merged in, mapping by mapping (``over`` wins):
    how the shim builds a script's config from its defaults and the file (DESIGN §6)."""
    out = copy.deepcopy(dict(under))
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def parse_set(text: str) -> tuple[str, Any]:
    """``--set train.lr=3e-4`` → ("train.lr", 0.0003); the value is read as YAML (text that
    is not YAML stays a string), but never an alias bomb, a duplicate key or a huge number."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE")
    key, _, raw = text.partition("=")
    key = key.strip()
    if not key:
        raise ConfigError(f"--set {text!r}: empty key")
    try:
        value = load_yaml(raw) if raw.strip() else ""
    except YAMLLimitError as exc:
        raise ConfigError(f"--set {key}: {describe_yaml_error(exc)[1]}") from None
    except yaml.YAMLError:
        value = raw
    if isinstance(value, float) and math.isinf(value) and "inf" not in raw.lower():
        raise ConfigError(f"--set {key}: {raw.strip()[:40]} is too large for a float")
    return key, value


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def with_sets(config: dict[str, Any], sets: Sequence[str], source: Path | None) -> dict[str, Any]:
    """``config`` (read from ``source``, None: no file) with each ``--set KEY=VALUE`` applied.

    With a file, a key must exist in it, and a number stays a number (``--set train.lr=abc``
    over ``lr: 0.1`` is a typo, refused before anything is launched)."""
    for text in sets:
        key, value = parse_set(text)
        if source is not None:
            try:
                current = get_key(config, key)
            except KeyError:
                raise ConfigError(f"--set {key}: {source} has no such key") from None
            if is_number(current) and not is_number(value):
                raise ConfigError(f"--set {key}: {source} has the number {current!r} there, "
                                  f"not {value!r}; give a number")
        try:
            set_key(config, key, value)
        except KeyError as exc:
            raise ConfigError(f"--set {key}: {exc.args[0]!r} is not a mapping in the config") from None
    return config


def load_config(path: Path | None) -> dict[str, Any]:
    """Read a YAML config file into a dict; ConfigError with file and line on failure."""
    if path is None:
        return {}
    try:
        text = read_bounded(Path(path), CONFIG_LIMIT).decode()
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: cannot read config: not UTF-8 text ({exc.reason})") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config: {exc.strerror or exc}") from exc
    try:
        data = load_yaml(text)
    except yaml.YAMLError as exc:
        raise ConfigError(yaml_problem(str(path), exc)) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}:1: a config must be a YAML mapping, not {type(data).__name__}")
    return data


def dump_config(config: Mapping[str, Any]) -> str:
    return yaml.safe_dump(dict(config), sort_keys=False, default_flow_style=False)
