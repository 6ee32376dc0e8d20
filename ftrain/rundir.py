"""Typed readers of what a run folder holds besides the journal (DESIGN §4, last paragraph).

Nothing read back is trusted: ``run.json`` may have been edited, truncated, replaced by a
symlink to /dev/zero or written by another tool. Each reader here is bounded in size, reads
regular files only, refuses a symlink that leads out of the run folder, and turns bad
content into one ``RunDirError`` naming the file and the field. The journal's own reader is
``journal.read_journal``; manifests are read by ``checkpoints``; ``coord/`` files by ``coord``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ftrain.errors import RunDirError
from ftrain.files import TooLarge, read_bounded

if TYPE_CHECKING:
    from ftrain.policy import Policy

__all__ = ["POLICY_COPY", "RUN_JSON_LIMIT", "RunInfo", "read_json_object", "read_run_json", "read_run_policy"]

RUN_JSON_LIMIT = 16 << 20   # the base config is in it; a few KB usually
POLICY_COPY = "policy.yaml"   # the run's policy, copied at `run` (DESIGN §4)


def read_json_object(path: Path, limit: int, *, inside: Path | None = None) -> dict[str, Any]:
    """One JSON object from a regular file of at most ``limit`` bytes (``inside``: a folder
    it must not lead out of); ``RunDirError`` naming the file otherwise."""
    try:
        data = json.loads(read_bounded(path, limit, inside=inside))
    except FileNotFoundError:
        raise
    except TooLarge as exc:
        raise RunDirError(str(exc)) from None   # names the file and its size
    except PermissionError as exc:
        raise RunDirError(f"{path}: {exc.strerror or exc}") from None
    except OSError as exc:
        raise RunDirError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except (ValueError, RecursionError) as exc:
        raise RunDirError(f"{path}: not JSON: {str(exc)[:120]}") from None
    if not isinstance(data, dict):
        raise RunDirError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


@dataclass(frozen=True)
class RunInfo:
    """``run.json``: how the run was started, so that ``resume`` starts the same thing."""

    command: tuple[str, ...]
    script: str = ""
    args: tuple[str, ...] = ()
    cwd: str | None = None
    policy: str | None = None
    config_path: str | None = None
    sets: dict[str, Any] = field(default_factory=dict)
    tensorboard: str | None = None
    distributed: dict[str, Any] | None = None
    base_config: dict[str, Any] = field(default_factory=dict)
    inject: str | None = None
    created: float | None = None


def _strs(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


_CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "command": (lambda v: _strs(v) and bool(v), "a non-empty list of strings"),
    "script": (lambda v: isinstance(v, str), "a string"),
    "args": (_strs, "a list of strings"),
    "cwd": (lambda v: isinstance(v, str), "a string"),
    "policy": (lambda v: isinstance(v, str), "a string"),
    "config_path": (lambda v: isinstance(v, str), "a string"),
    "sets": (lambda v: isinstance(v, dict), "an object"),
    "tensorboard": (lambda v: isinstance(v, str), "a string"),
    "distributed": (lambda v: isinstance(v, dict), "an object"),
    "base_config": (lambda v: isinstance(v, dict), "an object"),
    "inject": (lambda v: isinstance(v, str), "a string"),
    "created": (lambda v: type(v) in (int, float), "a number"),
}


def read_run_json(run_dir: Path) -> RunInfo:
    """The run's ``run.json``, every field checked; ``RunDirError`` naming the field."""
    path = run_dir / "run.json"
    if not run_dir.is_dir():
        raise RunDirError(f"{run_dir}: no such folder")
    try:
        data = read_json_object(path, RUN_JSON_LIMIT, inside=run_dir)
    except FileNotFoundError:
        raise RunDirError(f"{run_dir}: not a run folder (no run.json)") from None
    if "command" not in data:
        raise RunDirError(f"{path}: not an ftrain run.json (no command)")
    values: dict[str, Any] = {}
    for key, (ok, expected) in _CHECKS.items():
        value = data.get(key)
        if value is None:
            continue
        if not ok(value):
            raise RunDirError(f"{path}: {key}: expected {expected}, got {value!r}"[:300])
        values[key] = value
    return RunInfo(
        command=tuple(values["command"]), script=values.get("script", ""), args=tuple(values.get("args", ())),
        cwd=values.get("cwd"), policy=values.get("policy"), config_path=values.get("config_path"),
        sets=dict(values.get("sets", {})), tensorboard=values.get("tensorboard"),
        distributed=values.get("distributed"), base_config=dict(values.get("base_config", {})),
        inject=values.get("inject"),
        created=float(values["created"]) if "created" in values else None,
    )



def read_run_policy(run_dir: Path, info: RunInfo) -> Policy:
    """The run's own policy: its copy in the run folder (``policy.yaml``), read as the file it
    came from; a run of an older ftrain, with no copy, by the path it names."""
    from ftrain.policyfile import DEFAULT_SOURCE, load_policy, load_policy_copy

    source = info.policy or DEFAULT_SOURCE
    copy = run_dir / POLICY_COPY
    if copy.is_file():
        return load_policy_copy(copy, source)
    return load_policy(None if source.startswith("<") else Path(source))
