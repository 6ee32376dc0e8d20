"""Driving a script that does not use the shim: the policy's ``script:`` section (DESIGN §6).

A third-party training script knows nothing of ftrain. ``ScriptAdapter`` tells the
supervisor how to reach it anyway:

* overrides reach it as command-line flags (``args``), as a config file it reads
  (``config_file``), or as environment variables (``env``);
* a restart from a checkpoint adds ``resume_args`` naming the chosen file;
* its own checkpoints are found by ``checkpoints`` globs, relative to the run's working
  directory, so restarts and rollbacks pick from them;
* its progress lines become metrics records through ``metrics_regex``, or, with
  ``metrics_dicts``, the Python dicts it prints, as Hugging Face's ``Trainer`` does
  (``TrainerLines``), so every detector (NaN, threshold, spike, hang) works as with the shim.

Templates are split like a shell line into argv items, then each item's ``{placeholders}``
are filled: ``{key}`` (dotted config key), ``{name}`` (its last part), ``{KEY}`` /
``{NAME}`` (upper case, dots → underscores), ``{value}``; in ``resume_args`` also
``{checkpoint}`` and ``{checkpoint_dir}``; any other name is a dotted key of the config
(``--lr={optim.lr}``). ``{{`` and ``}}`` are literal braces. A template that uses a
per-key placeholder is rendered once for every leaf key of the effective config.

Nothing here imports torch or touches a process.
"""

from __future__ import annotations

import ast
import glob
import json
import math
import os
import re
import shlex
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ftrain import ckptfmt, overrides
from ftrain.checkpoints import Checkpoint, CheckpointStatus
from ftrain.errors import PolicyError
from ftrain.files import write_atomic
from ftrain.intake import OutputTalk, ShimTalk, Talk
from ftrain.policy import CheckpointSource, Decision, MissingCheckpoint
from ftrain.policyfile import _Checker, _line_map
from ftrain.protocol import RESERVED_METRICS
from ftrain.script import SHIM

__all__ = ["MissingCheckpoint", "SCRIPT_KEYS", "ScriptAdapter", "TrainerLines", "render_value"]

SCRIPT_KEYS = ("args", "config_file", "env", "resume_args", "checkpoints", "on_missing_checkpoint",
               "metrics_regex", "metrics_dicts")
LEAF_FIELDS = frozenset({"key", "name", "KEY", "NAME", "value"})
RESUME_FIELDS = frozenset({"checkpoint", "checkpoint_dir"})
CONFIG_FILE_SUFFIXES = (".yaml", ".yml", ".json")
_FIELD_RE = re.compile(r"\{\{|\}\}|\{([^{}]*)\}|[{}]")
_READ_BACK = 1 << 20   # bytes per backward read of metrics.jsonl
# A printed dict of numbers (``{'loss': 2.3, 'epoch': 0.5}``), flat, at the end of a drawing:
# no nested brackets or calls, so nothing but literals and the names nan/inf can be in it.
_DICT_LINE = re.compile(r"\{'[^{}\[\]()]*\}\s*$")
_DICT_MAX = 4096       # characters; a longer "dict" is not a log line
_NONFINITE = {"nan": math.nan, "inf": math.inf}
# tqdm's default bar without a description: "  5%|▌         | 10/200 [00:01<00:19,  9.87it/s]"
_BAR = re.compile(r"^\s*\d{1,3}%\|[^|]*\|\s*(\d+)/(\d+) \[")
# A checkpoint without a step in its name is placed at the step of the last line stamped at
# or before the file's mtime: never later than the step it was written at. The kernel's file
# times run up to a clock tick (1-10 ms) behind the write, and a progress line read from the
# script's output (``metrics_regex``) is stamped when it is read, up to DESIGN §9's 100 ms
# (p99) after the script wrote it, so a line stamped at or before the mtime was written before
# the file; the lines of those last milliseconds may be missed (the step placed a little
# early), never a line written after it.


@dataclass(frozen=True)
class Template:
    """One template: its text split into argv items, and the placeholder names it uses."""

    text: str
    items: tuple[str, ...]
    fields: frozenset[str]

    @classmethod
    def parse(cls, text: str, *, split: bool = True) -> Template:
        """Split ``text`` like a shell line (unless ``split`` is false); ValueError naming a
        stray brace, an empty ``{}`` or an unclosed quote."""
        try:
            items = tuple(shlex.split(text)) if split else (text,)
        except ValueError as exc:   # an unclosed quote
            raise ValueError(f"{text!r}: {exc}") from None
        names: set[str] = set()
        for item in items:
            for match in _FIELD_RE.finditer(item):
                token = match.group(0)
                if token in ("{{", "}}"):
                    continue
                if match.group(1) is None:
                    raise ValueError(f"stray {token!r} in {text!r} (write {token * 2} for a literal brace)")
                name = match.group(1).strip()
                if not name:
                    raise ValueError(f"empty {{}} in {text!r}")
                names.add(name)
        return cls(text, items, frozenset(names))

    @property
    def per_leaf(self) -> bool:
        return bool(self.fields & LEAF_FIELDS)

    def render(self, lookup: Callable[[str], str]) -> list[str]:
        return [_FIELD_RE.sub(lambda m: m.group(0)[0] if m.group(1) is None else lookup(m.group(1).strip()), item)
                for item in self.items]


def render_value(value: Any) -> str:
    """A config value as text a Python script reads back: ``True``, ``None``, ``0.0003``,
    ``nan``; lists and mappings as JSON."""
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value, default=str)
    return str(value)


def leaves(config: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """``(dotted key, value)`` of every leaf of a nested config, in the config's order."""
    for key, value in config.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            yield from leaves(value, dotted + ".")
        else:
            yield dotted, value


def env_name(key: str) -> str:
    """``train.batch_size`` → ``TRAIN_BATCH_SIZE``."""
    return key.upper().replace(".", "_")


def _leaf_lookup(key: str, value: Any, config: Mapping[str, Any]) -> Callable[[str], str]:
    """Placeholder values for the leaf ``key``; other names are keys of ``config``."""
    name = key.rsplit(".", 1)[-1]
    fields = {"key": key, "name": name, "KEY": env_name(key), "NAME": env_name(name), "value": render_value(value)}
    return lambda n: fields[n] if n in fields else render_value(overrides.get_key(config, n))


class ScriptAdapter:
    """How the supervisor drives one script without the shim; built by ``from_policy``.

    ``cwd`` is the run's working directory, where ``config_file`` is written and the
    ``checkpoints`` globs are matched (default: the current one). ``run_dir`` (default:
    learnt from the first ``env`` call) lets a checkpoint whose name carries no step be
    placed by the metrics logged before it was written; ``started`` (run.json's
    ``created``) leaves out files older than the run.
    """

    def __init__(self, *, source: str, args: Sequence[Template] = (), resume_args: Sequence[Template] = (),
                 config_file: str | None = None, env_each: Template | None = None,
                 env_fixed: Mapping[str, Template] | None = None, patterns: Sequence[str] = (),
                 on_missing: MissingCheckpoint = MissingCheckpoint.FRESH,
                 regexes: Sequence[re.Pattern[str]] = (), dicts: bool = False, cwd: Path | None = None,
                 run_dir: Path | None = None, started: float | None = None) -> None:
        self.source = source
        self.args = tuple(args)
        self.resume_args = tuple(resume_args)
        self.config_file = config_file
        self.env_each = env_each
        self.env_fixed = dict(env_fixed or {})
        self.patterns = tuple(patterns)
        self.on_missing = on_missing
        self.regexes = tuple(regexes)
        self.trainer = TrainerLines() if dicts else None
        self.cwd = Path(cwd) if cwd is not None else None
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.started = started   # when the run began: older files are an earlier run's

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_policy(cls, section: Mapping[str, Any], *, source: str, config: Mapping[str, Any] | None,
                    cwd: Path | None = None, run_dir: Path | None = None,
                    started: float | None = None) -> ScriptAdapter:
        """Validate a policy's ``script:`` section against ``config`` (None: the section alone,
        as ``ftrain policy check`` without ``--config`` does); PolicyError listing every
        problem as ``file:line: script.key: message``."""
        c = _Checker(source, _policy_lines(source))
        path = ("script",)
        if not isinstance(section, Mapping):
            c.error(path, "must be a mapping")
            raise PolicyError(c.errors)
        c.keys(section, SCRIPT_KEYS, path)

        def templates(key: str, allowed: frozenset[str]) -> list[Template]:
            raw = section.get(key)
            if raw is None:
                return []
            texts = [raw] if isinstance(raw, str) else raw
            if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
                c.error(path + (key,), "must be a template string or a list of them")
                return []
            out = []
            for i, text in enumerate(texts):
                where = path + (key,) if isinstance(raw, str) else path + (key, i)
                try:
                    template = Template.parse(text)
                except ValueError as exc:
                    c.error(where, str(exc))
                    continue
                _check_fields(c, where, template, allowed, config)
                out.append(template)
            return out

        args = templates("args", LEAF_FIELDS)
        for template in args:
            _check_unique(c, path + ("args",), template, config, "argument")
        resume_args = templates("resume_args", RESUME_FIELDS)

        config_file = section.get("config_file")
        if config_file is not None:
            if not isinstance(config_file, str) or not config_file.strip():
                c.error(path + ("config_file",), "must be a file path")
                config_file = None
            elif not config_file.endswith(CONFIG_FILE_SUFFIXES):
                c.error(path + ("config_file",), f"{config_file!r}: the format follows the extension: "
                                                 f"use {', '.join(CONFIG_FILE_SUFFIXES)}")

        env_each, env_fixed = _parse_env(c, section.get("env"), path + ("env",), config)

        patterns: list[str] = []
        raw_patterns = section.get("checkpoints")
        if raw_patterns is not None:
            patterns = [raw_patterns] if isinstance(raw_patterns, str) else raw_patterns
            if not isinstance(patterns, list) or not patterns or \
                    not all(isinstance(p, str) and p.strip() for p in patterns):
                c.error(path + ("checkpoints",), "must be a glob pattern or a list of them (e.g. \"out/*.pt\")")
                patterns = []

        on_missing = MissingCheckpoint.FRESH
        if "on_missing_checkpoint" in section:
            try:
                on_missing = MissingCheckpoint(section["on_missing_checkpoint"])
            except ValueError:
                c.error(path + ("on_missing_checkpoint",),
                        f"must be fresh or stop, not {section['on_missing_checkpoint']!r}")
            if raw_patterns is None:
                c.error(path + ("on_missing_checkpoint",), "applies only with `checkpoints:`")

        regexes = _parse_regexes(c, section.get("metrics_regex"), path + ("metrics_regex",))
        dicts = section.get("metrics_dicts", False)
        if not isinstance(dicts, bool):
            c.error(path + ("metrics_dicts",), "must be true or false")
        if c.errors:
            raise PolicyError(c.errors)
        return cls(source=source, args=args, resume_args=resume_args, config_file=config_file,
                   env_each=env_each, env_fixed=env_fixed, patterns=patterns, on_missing=on_missing,
                   regexes=regexes, dicts=dicts is True, cwd=cwd, run_dir=run_dir, started=started)

    # ------------------------------------------------------------------ the Script interface
    def talk(self, metrics_path: Path) -> Talk:
        """Metrics from the output lines with ``metrics_regex`` or ``metrics_dicts``; else the
        shim's stream (a script driven by its flags may still log through the shim)."""
        if not self.reads_output:
            return ShimTalk(metrics_path)
        return _AdapterTalk(self.parse_line, metrics_path, self.trainer)

    def checkpoint_source(self) -> CheckpointSource:
        """What ``policy.decide`` needs to know of where restarts find checkpoints."""
        if not self.patterns:
            return CheckpointSource()
        return CheckpointSource(script=", ".join(self.patterns), on_missing=self.on_missing)

    def usable(self, checkpoint_dir: Path, set_aside: Sequence[tuple[int, float]]) -> list[Any]:
        """The checkpoints a restart may use, oldest first: the script's own with
        ``checkpoints:``, else ftrain's folder."""
        if not self.patterns:
            return SHIM.usable(checkpoint_dir, set_aside)
        return sorted(self.checkpoints(self.cwd, set_aside), key=lambda c: c.step)

    def roll_back(self, decision: Decision, checkpoint_dir: Path) -> str | None:
        """A rollback sets newer checkpoints aside: the script's own are set aside in the
        run's state (``RunState.set_aside``); ftrain's own are quarantined."""
        return None if self.patterns else SHIM.roll_back(decision, checkpoint_dir)

    @property
    def reads_output(self) -> bool:
        """Whether the supervisor must feed the script's output lines to ``parse_line``."""
        return bool(self.regexes) or self.trainer is not None

    @property
    def owns_checkpoints(self) -> bool:
        """Whether restarts pick from the script's own checkpoints (``checkpoints:``)."""
        return bool(self.patterns)

    @property
    def delivers_config(self) -> bool:
        """Whether overrides reach the script through ``args``, ``config_file`` or ``env``
        (then a script that never calls ``ftrain.config()`` still gets them)."""
        return bool(self.args or self.config_file or self.env_each or self.env_fixed)

    @property
    def missing_checkpoint_policy(self) -> MissingCheckpoint:
        """``on_missing_checkpoint``: what a restart does when no checkpoint matches."""
        return self.on_missing

    def command(self, base: Sequence[str], config: Mapping[str, Any], resume_from: str | None) -> tuple[str, ...]:
        """``base`` + the override flags of ``config`` + ``resume_args`` when resuming."""
        argv = list(base)
        for template in self.args:
            argv += _render_all(template, config)
        if resume_from is not None:
            where = {"checkpoint": str(resume_from), "checkpoint_dir": str(Path(resume_from).parent)}
            for template in self.resume_args:
                argv += template.render(lambda n: where[n] if n in where else
                                        render_value(overrides.get_key(config, n)))
        return tuple(argv)

    def env(self, config: Mapping[str, Any], attempt_dir: Path) -> dict[str, str]:
        """The override variables of ``config``; writes ``config_file`` first (atomically),
        so the script finds this attempt's values when it starts."""
        if self.run_dir is None:
            self.run_dir = Path(attempt_dir).resolve().parent.parent
        if self.config_file is not None:
            self._write_config(config)
        out: dict[str, str] = {}
        if self.env_each is not None:
            for key, value in leaves(config):
                out[self.env_each.render(_leaf_lookup(key, value, config))[0]] = render_value(value)
        for name, template in self.env_fixed.items():
            out[name] = template.render(lambda n: render_value(overrides.get_key(config, n)))[0]
        return out

    def parse_line(self, line: str) -> dict[str, Any] | None:
        """A metrics record ``{"step": int, name: float …}`` from a progress line, or None.
        The first regex that matches wins; a line whose groups do not read as numbers is
        None, never an error. A line redrawn with carriage returns (a progress bar) is read
        from its latest drawing that matches. With ``metrics_dicts`` every drawing also goes
        to ``TrainerLines`` (which follows the bar), whose record counts when no regex matched."""
        segments = line.split("\r") if "\r" in line else [line]
        dict_record = None
        if self.trainer is not None:
            for segment in segments:
                dict_record = self.trainer.parse(segment) or dict_record
        for segment in reversed(segments):
            for regex in self.regexes:
                match = regex.search(segment)
                record = _record(match) if match is not None else None
                if record is not None:
                    return record
        return dict_record

    def checkpoints(self, cwd: Path | None = None, set_aside: Sequence[tuple[int, float]] = ()) -> list[Checkpoint]:
        """The script's checkpoints of this run that the globs match, ``unverified``, each
        with a step: the one in its name (``ckptfmt.guess_step``), else the step of the last
        line stamped at or before the file's mtime (never a step logged after it was written).
        Files with neither are left out, and so are those a rollback set aside (``set_aside``:
        ``(after step, when)`` of each rollback, ``RunState.set_aside``) that the script has
        not written since."""
        root = Path(cwd) if cwd is not None else (self.cwd or Path.cwd())
        since = self.started
        found: dict[str, tuple[Path, float, int | None]] = {}
        for pattern in self.patterns:
            for match in glob.glob(os.path.expanduser(pattern), root_dir=root, recursive=True):
                path = root / match
                try:
                    mtime = path.stat().st_mtime
                except OSError:
                    continue   # vanished between the glob and the stat
                if since is not None and mtime < since:
                    continue   # a leftover of an earlier run in the same folder
                found[str(path)] = (path, mtime, ckptfmt.guess_step(path.name))
        unnamed = sorted({mtime for _, mtime, step in found.values() if step is None}, reverse=True)
        placed = _steps_at(self.run_dir / "metrics.jsonl", unnamed) if unnamed and self.run_dir else {}
        result: list[Checkpoint] = []
        for path, mtime, step in sorted(found.values(), key=lambda f: f[1]):
            note = f"matched {', '.join(self.patterns)}; step from the file name"
            if step is None:
                step = placed.get(mtime)
                note = f"matched {', '.join(self.patterns)}; step logged before it was written"
            if step is None or any(step > after and mtime <= when for after, when in set_aside):
                continue
            result.append(Checkpoint(path, step, CheckpointStatus.UNVERIFIED, bytes=_size(path), t=mtime,
                                     note=note))
        return result

    # ------------------------------------------------------------------ internals
    def _write_config(self, config: Mapping[str, Any]) -> None:
        cwd = self.cwd or Path.cwd()
        path = cwd / os.path.expanduser(self.config_file or "")
        text = json.dumps(dict(config), indent=2) + "\n" if path.suffix == ".json" \
            else overrides.dump_config(config)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, text, durable=True)


class TrainerLines:
    """Metrics from the dicts a script prints on a line of their own, as Hugging Face's
    ``Trainer`` does (``{'loss': 2.3, 'grad_norm': 1.2, 'learning_rate': 5e-05, 'epoch': 0.5}``,
    ``{'loss': nan, ...}``), also at the end of a progress bar's drawing.

    Read safely: at most ``_DICT_MAX`` characters, a flat dict of quoted names to numbers,
    the bare names ``nan`` and ``inf`` mapped to those floats, then ``ast.literal_eval``;
    never ``eval``. Values that are not numbers (strings, booleans) are left out.

    The step is the count of the training bar (tqdm's ``n/total``, the first bar without a
    description that the attempt draws: Trainer's, whose count is its global step), the
    latest count drawn before the dict; other bars (an evaluation's, of another total) are
    not followed. Each new count is also a step record of its own, a heartbeat, so a bar
    that stops moving is a hang from its last move. Without a bar, the step is the dict's
    number in the attempt: 1, 2, 3 …
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """A new attempt: no bar seen, no dict counted."""
        self.total: int | None = None
        self.step: int | None = None
        self.dicts = 0

    def parse(self, segment: str) -> dict[str, Any] | None:
        """The record of one drawing or line, or None."""
        bar = _BAR.match(segment)
        moved = False
        if bar is not None:
            n, total = int(bar.group(1)), int(bar.group(2))
            if self.total is None:
                self.total = total
            if total == self.total:
                moved, self.step = n != self.step, n
        found = _DICT_LINE.search(segment) if len(segment) <= _DICT_MAX else None
        metrics = _dict_metrics(found.group(0)) if found is not None else None
        if not metrics:
            return {"step": self.step} if moved and self.step is not None else None
        self.dicts += 1
        return {"step": self.step if self.step is not None else self.dicts, **metrics}


def _dict_metrics(text: str) -> dict[str, float] | None:
    """``{'loss': 2.3, 'x': nan}`` → ``{"loss": 2.3, "x": nan}``; None unless it is a dict
    of literals (with ``nan``/``inf`` names) that has a number."""
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        return None
    if not isinstance(tree.body, ast.Dict):
        return None

    class Nonfinite(ast.NodeTransformer):
        def visit_Name(self, node: ast.Name) -> ast.AST:
            return ast.Constant(_NONFINITE[node.id]) if node.id in _NONFINITE else node

    try:
        value = ast.literal_eval(Nonfinite().visit(tree.body))
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return None
    out = {k: float(v) for k, v in value.items()
           if isinstance(k, str) and k not in RESERVED_METRICS and k != "step"
           and isinstance(v, (int, float)) and not isinstance(v, bool)}
    return out or None


class _AdapterTalk(OutputTalk):
    """``OutputTalk`` whose ``TrainerLines`` start afresh with each attempt."""

    def __init__(self, parse: Callable[[str], dict[str, Any] | None], metrics_path: Path,
                 trainer: TrainerLines | None) -> None:
        super().__init__(parse, metrics_path)
        self._trainer = trainer

    def begin(self, attempt: int) -> None:
        super().begin(attempt)
        if self._trainer is not None:
            self._trainer.reset()


def _policy_lines(source: str) -> dict[tuple[Any, ...], int]:
    """Line of every key of the policy file, for messages; empty if it cannot be read."""
    try:
        node = yaml.compose(Path(source).read_text(), Loader=overrides.ConfigLoader)
    except (OSError, yaml.YAMLError):
        return {}
    return _line_map(node) if node is not None else {}


def _check_fields(c: _Checker, where: tuple[Any, ...], template: Template, allowed: frozenset[str],
                  config: Mapping[str, Any] | None) -> None:
    """Every placeholder is one this key allows, or a key of the config."""
    for name in sorted(template.fields):
        if name in allowed:
            continue
        if name in RESUME_FIELDS:
            c.error(where, f"{{{name}}} is available only in resume_args")
        elif name in LEAF_FIELDS:
            c.error(where, f"{{{name}}} is a per-key placeholder: only in `args` and an `env` name template")
        elif config is not None and not overrides.has_key(config, name):
            c.error(where, f"{{{name}}}: the config has no key {name!r}")


def _check_unique(c: _Checker, where: tuple[Any, ...], template: Template, config: Mapping[str, Any] | None,
                  what: str) -> None:
    """A per-key template that uses only ``{name}`` must not render two keys alike."""
    if config is None or not template.per_leaf or template.fields & {"key", "KEY"}:
        return
    if not template.fields & {"name", "NAME"}:
        if template.fields & LEAF_FIELDS == {"value"} and sum(1 for _ in leaves(config)) > 1:
            c.error(where, "renders every config value but names no key: use {key} or {name}")
        return
    seen: dict[str, str] = {}
    for key, _ in leaves(config):
        name = key.rsplit(".", 1)[-1]
        if name in seen:
            c.error(where, f"{seen[name]!r} and {key!r} render as the same {what}; use {{key}} instead of {{name}}")
            return
        seen[name] = key


def _parse_env(c: _Checker, raw: Any, path: tuple[Any, ...],
               config: Mapping[str, Any] | None) -> tuple[Template | None, dict[str, Template]]:
    """``env: "PREFIX_{KEY}"`` (one variable per leaf) or ``env: {NAME: "{dotted.key}"}``."""
    if raw is None:
        return None, {}
    if isinstance(raw, str):
        try:
            template = Template.parse(raw, split=False)
        except ValueError as exc:
            c.error(path, str(exc))
            return None, {}
        if not template.fields & {"key", "name", "KEY", "NAME"} or "value" in template.fields:
            c.error(path, "a per-key variable name needs {KEY} (or {key}, {NAME}, {name}) and no {value}; "
                          "or map names to values: {LR: \"{optim.lr}\"}")
            return None, {}
        before = len(c.errors)
        _check_fields(c, path, template, LEAF_FIELDS, config)
        _check_unique(c, path, template, config, "variable")
        for key, value in leaves(config or {}):
            if len(c.errors) > before:
                break   # one message for the template, not one per key
            _check_env_name(c, path, template.render(_leaf_lookup(key, value, config or {}))[0])
        return template, {}
    if isinstance(raw, dict):
        fixed: dict[str, Template] = {}
        for name, text in raw.items():
            where = path + (name,)
            if not isinstance(text, str):
                text = render_value(text)
            try:
                template = Template.parse(text, split=False)
            except ValueError as exc:
                c.error(where, str(exc))
                continue
            _check_fields(c, where, template, frozenset(), config)
            _check_env_name(c, where, str(name))
            fixed[str(name)] = template
        return None, fixed
    c.error(path, "must be a variable-name template (\"PREFIX_{KEY}\") or a mapping NAME: template")
    return None, {}


def _check_env_name(c: _Checker, where: tuple[Any, ...], name: str) -> None:
    if not name or "=" in name or "\0" in name:
        c.error(where, f"{name!r} is not a usable environment variable name")
    elif name.startswith("FTRAIN_"):
        c.error(where, f"{name!r}: FTRAIN_* variables are ftrain's own (DESIGN §2)")


def _parse_regexes(c: _Checker, raw: Any, path: tuple[Any, ...]) -> list[re.Pattern[str]]:
    if raw is None:
        return []
    texts = [raw] if isinstance(raw, str) else raw
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        c.error(path, "must be a regular expression or a list of them")
        return []
    out: list[re.Pattern[str]] = []
    for i, text in enumerate(texts):
        where = path if isinstance(raw, str) else path + (i,)
        try:
            regex = re.compile(text)
        except re.error as exc:
            c.error(where, f"does not compile: {exc}")
            continue
        if "step" not in regex.groupindex:
            c.error(where, "needs a named group (?P<step>\\d+) for the step")
            continue
        reserved = sorted(set(regex.groupindex) & RESERVED_METRICS)
        if reserved:
            c.error(where, f"group name(s) {', '.join(reserved)} are reserved in metrics records")
            continue
        out.append(regex)
    return out


# --------------------------------------------------------------------------- rendering & reading
def _render_all(template: Template, config: Mapping[str, Any]) -> list[str]:
    """A fixed template once; a per-key one once for every leaf of ``config``."""
    if not template.per_leaf:
        return template.render(lambda n: render_value(overrides.get_key(config, n)))
    out: list[str] = []
    for key, value in leaves(config):
        out += template.render(_leaf_lookup(key, value, config))
    return out


def _record(match: re.Match[str]) -> dict[str, Any] | None:
    """The match's groups as a record: ``step`` an int, the other named groups floats."""
    groups = match.groupdict()
    try:
        record: dict[str, Any] = {"step": int(groups.pop("step") or "")}
        for name, text in groups.items():
            if text is not None:
                record[name] = float(text)
    except ValueError:
        return None
    return record


def _steps_at(metrics_path: Path, times: Sequence[float]) -> dict[float, int]:
    """For each time in ``times`` (newest first), the step of the last metrics record
    stamped at or before it: the latest step a checkpoint written then can hold.
    Reads ``metrics.jsonl`` backwards from its end, so recent times cost little."""
    out: dict[float, int] = {}
    pending = list(times)
    try:
        f = open(metrics_path, "rb")
    except OSError:
        return out
    with f:
        end = f.seek(0, os.SEEK_END)
        carry = b""
        while pending and end > 0:
            start = max(0, end - _READ_BACK)
            f.seek(start)
            lines = (f.read(end - start) + carry).split(b"\n")
            carry = lines.pop(0) if start > 0 else b""
            for raw in reversed(lines):
                step, t = _step_and_time(raw)
                while step is not None and pending and t <= pending[0]:
                    out[pending.pop(0)] = step
                if not pending:
                    break
            end = start
    return out


def _step_and_time(raw: bytes) -> tuple[int | None, float]:
    if b'"step"' not in raw or b'"ftrain"' in raw:
        return None, math.inf
    try:
        record = json.loads(raw)
    except ValueError:
        return None, math.inf
    step, t = record.get("step"), record.get("t")
    if type(step) is not int or not isinstance(t, (int, float)):
        return None, math.inf
    return step, float(t)


def _size(path: Path) -> int:
    """Bytes of a file, or of every file in a checkpoint folder."""
    if not path.is_dir():
        try:
            return path.stat().st_size
        except OSError:
            return 0
    total = 0
    for folder, _, files in os.walk(path):
        for name in files:
            try:
                total += os.stat(os.path.join(folder, name)).st_size
            except OSError:
                pass
    return total
