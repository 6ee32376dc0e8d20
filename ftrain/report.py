"""``ftrain inspect``: a run's story (attempts, decisions, goodput) or a checkpoint folder.

Everything is read from files — the journal, the metrics stream, the manifests — so it
works on a live run, a finished one, or one copied off a cluster. An unreadable part is
reported in a line and the rest is still shown.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ftrain import checkpoints, ckptfmt
from ftrain.errors import RunDirError
from ftrain.journal import Event, read_journal
from ftrain.protocol import format_skip, parse_skip


@dataclass
class AttemptRow:
    """One attempt as the timeline shows it."""

    attempt: int
    start: float
    end: float | None = None
    first_step_t: float | None = None
    first_step: int | None = None
    last_step: int | None = None
    steps: int = 0
    resume_step: int | None = None
    kind: str | None = None
    exit_code: int | None = None
    decision: str | None = None
    reason: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    steps_lost: int = 0
    kept_seconds: float = 0.0
    warm: bool = False   # ran in a spare interpreter started ahead (ftrain.warm)
    skip: list[tuple[int, int]] = field(default_factory=list)   # the windows it was told to skip
    total_steps: int | None = None   # the job's length from its config, when a known key says it

    @property
    def duration(self) -> float | None:
        return None if self.end is None else self.end - self.start

    @property
    def time_to_first_step(self) -> float | None:
        return None if self.first_step_t is None else self.first_step_t - self.start

    def to_json(self) -> dict[str, Any]:
        return {
            "attempt": self.attempt, "start": self.start, "end": self.end, "duration": self.duration,
            "time_to_first_step": self.time_to_first_step, "first_step": self.first_step,
            "last_step": self.last_step, "steps": self.steps, "resume_step": self.resume_step,
            "kind": self.kind, "exit_code": self.exit_code, "decision": self.decision, "reason": self.reason,
            "overrides": self.overrides, "steps_lost": self.steps_lost, "warm": self.warm,
            "skip_steps": [f"{a}-{b}" for a, b in self.skip],
            "steps_skipped": count_steps(self.skip, self.total_steps),
        }


@dataclass
class RunStory:
    run_dir: Path
    attempts: list[AttemptRow]
    status: str
    reason: str
    wall: float
    goodput: float | None
    anomalies: list[dict[str, Any]]
    problems: list[str]

    @property
    def total_steps(self) -> int | None:
        """The job's length as the last attempt's config says it (None: no known key)."""
        return self.attempts[-1].total_steps if self.attempts else None

    @property
    def skip(self) -> list[tuple[int, int]]:
        """Every window any attempt was told to skip, merged and cut at the job's end."""
        return merge_windows((w for a in self.attempts for w in a.skip), self.total_steps)

    def to_json(self) -> dict[str, Any]:
        skip = self.skip
        return {"run_dir": str(self.run_dir), "status": self.status, "reason": self.reason, "wall": self.wall,
                "goodput": self.goodput, "attempts": [a.to_json() for a in self.attempts],
                "anomalies": self.anomalies, "problems": self.problems,
                "skip_steps": [f"{a}-{b}" for a, b in skip], "steps_skipped": count_steps(skip),
                "total_steps": self.total_steps}


def merge_windows(windows: Iterable[tuple[int, int]], total: int | None = None) -> list[tuple[int, int]]:
    """Step windows sorted, overlapping or touching ones joined; with ``total`` (the job's
    length) cut at its last step, windows past it dropped."""
    merged: list[list[int]] = []
    for a, b in sorted(windows):
        if total is not None:
            if a >= total:
                continue
            b = min(b, total - 1)
        if merged and a <= merged[-1][1] + 1:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    return [(a, b) for a, b in merged]


def count_steps(windows: Iterable[tuple[int, int]], total: int | None = None) -> int:
    """How many distinct steps ``windows`` name (within the job's ``total`` when known)."""
    return sum(b - a + 1 for a, b in merge_windows(windows, total))


def read_metrics(path: Path, defaults: dict[int, dict[str, Any]] | None = None) -> tuple[list[dict[str, Any]], int]:
    """All metric records (control lines excluded) and how many lines were unreadable; with
    ``defaults``, also each attempt's ``ftrain.config(defaults=...)`` (its ``config`` control line)."""
    records: list[dict[str, Any]] = []
    bad = 0
    try:
        data = path.read_bytes()
    except OSError:
        return records, 0
    for raw in data.split(b"\n"):
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw)
        except ValueError:
            bad += 1
            continue
        if isinstance(rec, dict) and "ftrain" not in rec and isinstance(rec.get("step"), int):
            records.append(rec)
        elif defaults is not None and isinstance(rec, dict) and rec.get("ftrain") == "config" \
                and isinstance(rec.get("defaults"), dict) and type(rec.get("attempt")) is int:
            defaults[rec["attempt"]] = rec["defaults"]
        elif not isinstance(rec, dict):
            bad += 1
    return records, bad


def run_story(run_dir: Path) -> RunStory:
    """Rebuild the attempts' timeline and the goodput from the journal and metrics."""
    events = read_journal(run_dir / "journal.jsonl")
    problems: list[str] = []
    rows: dict[int, AttemptRow] = {}
    anomalies: list[dict[str, Any]] = []
    status, reason = "running", "no run_end in the journal (still running, or its supervisor died)"
    start_t = next((e["t"] for e in events if e.get("event") == Event.RUN_START.value), None)
    end_t: float | None = None
    skip_so_far: list[tuple[int, int]] = []   # for journals whose attempt_start lacks skip_steps
    for ev in events:
        name, n = ev.get("event"), ev.get("attempt")
        if name == Event.ATTEMPT_START.value and isinstance(n, int):
            rows[n] = AttemptRow(n, ev["t"], overrides=dict(ev.get("overrides") or {}), warm=bool(ev.get("warm")))
            rr = ev.get("resume_from")
            rows[n].resume_step = ev.get("resume_step", ckptfmt.guess_step(Path(rr).name) if rr else None)
            told = ev.get("skip_steps")
            rows[n].skip = _windows(told, problems) if told is not None else list(skip_so_far)
        elif name == Event.ATTEMPT_END.value and n in rows:
            row = rows[n]
            row.end, row.kind, row.exit_code = ev["t"], ev.get("kind"), ev.get("exit_code")
            row.first_step, row.last_step, row.steps = ev.get("first_step"), ev.get("last_step"), ev.get("steps", 0)
            if ev.get("supervisor_lost"):
                row.reason = "the supervisor died during this attempt"
        elif name == Event.FAILURE.value and n in rows:
            rows[n].kind = ev.get("kind")
        elif name == Event.DECISION.value and n in rows:
            rows[n].decision, rows[n].reason = ev.get("action"), ev.get("reason")
            skip_so_far += _windows(ev.get("skip_steps") or [], problems)
        elif name == Event.ANOMALY.value:
            anomalies.append({k: ev.get(k) for k in ("attempt", "kind", "step", "metric", "value", "reason", "action")})
        elif name == Event.RUN_END.value:
            status, reason, end_t = ev.get("status", "?"), ev.get("reason", ""), ev["t"]
        elif name == Event.RUN_START.value and start_t is None:
            start_t = ev["t"]
    if start_t is None:
        raise RunDirError(f"{run_dir}: the journal has no run_start")
    ordered = [rows[k] for k in sorted(rows)]

    defaults: dict[int, dict[str, Any]] = {}
    records, bad = read_metrics(run_dir / "metrics.jsonl", defaults)
    for row in ordered:
        row.total_steps = _attempt_total(run_dir, row.attempt, defaults.get(row.attempt, {}))
    if bad:
        problems.append(f"metrics.jsonl: {bad} unreadable line(s) skipped")
    by_attempt: dict[int, list[dict[str, Any]]] = {}
    for rec in records:
        by_attempt.setdefault(int(rec.get("attempt", 0)), []).append(rec)
    for row in ordered:
        recs = by_attempt.get(row.attempt, [])
        if recs:
            row.first_step_t = recs[0]["t"]
            row.first_step = recs[0]["step"] if row.first_step is None else row.first_step
            row.last_step = recs[-1]["step"] if row.last_step is None else row.last_step
            row.steps = row.steps or len(recs)

    # A step is kept if no later attempt resumed from before it. Lost steps are counted as
    # step numbers: a script that logs several lines per step loses each step once.
    limit = math.inf
    for row in reversed(ordered):
        recs = by_attempt.get(row.attempt, [])
        kept = [r for r in recs if r["step"] <= limit]
        row.steps_lost = len({r["step"] for r in recs if r["step"] > limit})
        row.kept_seconds = _step_seconds(recs, kept)
        resumed = row.resume_step if row.resume_step is not None else -1
        limit = min(limit, resumed)
    wall = (end_t or time.time()) - start_t
    kept_total = sum(r.kept_seconds for r in ordered)
    goodput = kept_total / wall if wall > 0 and records else None
    return RunStory(run_dir, ordered, status, reason, wall, goodput, anomalies, problems)


def _windows(told: Any, problems: list[str]) -> list[tuple[int, int]]:
    """The ``a-b`` strings of a journal's ``skip_steps`` as windows; a bad one is a problem line."""
    try:
        return list(parse_skip(",".join(told), what="skip_steps"))
    except (TypeError, ValueError) as exc:
        problems.append(f"journal.jsonl: {exc}"[:300])
        return []


def _attempt_total(run_dir: Path, attempt: int, defaults: dict[str, Any]) -> int | None:
    """The job's length from the config attempt ``attempt`` ran with: its attempts/NNNN/config.yaml
    over the script's ``ftrain.config(defaults=...)``, as the shim merges them."""
    from ftrain.errors import FtrainError
    from ftrain.overrides import load_config, merged
    from ftrain.view import total_steps

    try:
        config = load_config(run_dir / "attempts" / f"{attempt:04d}" / "config.yaml")
    except FtrainError:
        config = {}
    return total_steps(merged(defaults, config))


def _step_seconds(recs: Sequence[dict[str, Any]], kept: Sequence[dict[str, Any]]) -> float:
    """Time spent on the kept steps: each step's interval since the previous line; the first
    step of an attempt counts the attempt's median interval (its start-up is overhead)."""
    if not kept:
        return 0.0
    intervals = {id(b): b["t"] - a["t"] for a, b in zip(recs, recs[1:])}
    values = sorted(intervals.values())
    median = values[len(values) // 2] if values else 0.0
    return sum(max(0.0, intervals.get(id(r), median)) for r in kept)


# --------------------------------------------------------------------------- rendering

def _fmt_t(t: float | None) -> str:
    return "-" if t is None else time.strftime("%H:%M:%S", time.localtime(t))


def _fmt_s(s: float | None) -> str:
    if s is None:
        return "-"
    return f"{s:.1f}s" if s < 120 else f"{s / 60:.1f}m"


def _windows_text(windows: Sequence[tuple[int, int]], total: int | None) -> str:
    """``130-329 (200 steps; 170 before the job's end at step 299)``."""
    if not windows:
        return "none (no window left)"
    named, within = count_steps(windows), count_steps(windows, total)
    text = f"{format_skip(windows)} ({named} steps"
    if total is not None and within != named:
        text += f"; {within} before the job's end at step {total - 1}"
    return text + ")"


def _fmt_v(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def inspect_path(path: Path, *, as_json: bool, plot: Path | None) -> int:
    """Entry point of ``ftrain inspect``: a run folder or a checkpoint folder."""
    if not path.exists():
        raise RunDirError(f"{path}: no such file or folder")
    if (path / "journal.jsonl").exists():
        story = run_story(path)
        wrote = plot_run(path, plot) if plot is not None else None
        tier = memory_report(path)
        if as_json:
            print(json.dumps(dict(story.to_json(), memory=tier), indent=2, default=str))
        else:
            print_story(story)
            print_memory(tier)
        if wrote is not None:   # on stderr under --json, which keeps stdout one JSON document
            print(f"plot written to {wrote}", file=sys.stderr if as_json else sys.stdout)
        return 0
    if plot is not None:
        raise RunDirError(f"{path}: --plot needs a run folder (one with journal.jsonl)")
    runs = list_runs(path)
    if runs:
        if as_json:
            print(json.dumps(runs, indent=2, default=str))
        else:
            print_runs(path, runs)
        return 0
    found = checkpoints.scan(path)
    if not found and not as_json:
        what = "a file" if path.is_file() else "a folder"
        print(f"{path}: {what} with no run and no checkpoint (a run folder holds journal.jsonl; "
              "a checkpoint folder, step-*.pt or other checkpoint files)")
        return 0
    if as_json:
        print(json.dumps([c.to_json() for c in found], indent=2, default=str))
    else:
        print_checkpoints(path, found)
    return 0


def memory_report(run_dir: Path) -> dict[str, Any]:
    """The run's memory tier (``ftrain.snapshot``, DESIGN §3) for ``inspect``: the folder in
    host shared memory, the bytes it holds now and how many complete snapshots, and the
    checkpoints promoted from it (manifest ``"tier": "memory"``), each with the step of the
    newest disk checkpoint before it: a crash resumed from disk would have gone back there."""
    from ftrain.memtier import MemoryTier

    tier = MemoryTier(run_dir)
    held = [c for c in checkpoints.scan(tier.dir, verify=False) if c.status is checkpoints.CheckpointStatus.OK] \
        if tier.dir.is_dir() else []
    found = checkpoints.scan(run_dir / "checkpoints", verify=False)
    promoted = []
    for c in found:
        if c.tier != "memory" or c.step is None:
            continue
        before = [d.step for d in found if d.tier == "disk" and d.step is not None and d.step < c.step]
        disk = max(before, default=None)
        promoted.append({"step": c.step, "path": str(c.path), "bytes": c.bytes, "status": c.status.value,
                         "disk_step_before": disk, "steps_saved": c.step - (disk if disk is not None else -1)})
    return {"dir": str(tier.dir), "exists": tier.dir.is_dir(), "bytes": tier.usage(), "snapshots": len(held),
            "snapshot_steps": [c.step for c in held], "promoted": promoted}


def print_memory(tier: dict[str, Any]) -> None:
    """The memory tier's lines under the story (nothing when the run never used it)."""
    if not tier["exists"] and not tier["promoted"]:
        return
    console = _console()
    if tier["exists"]:
        steps = ", ".join(str(s) for s in tier["snapshot_steps"])
        console.print(f"memory tier: {_size(tier['bytes'])} in {tier['dir']}, {tier['snapshots']} snapshot(s) held"
                      + (f" (step {steps})" if steps else ""))
    else:
        console.print("memory tier: nothing held in host memory (released)")
    for p in tier["promoted"]:
        disk = p["disk_step_before"]
        since = f"disk had step {disk}" if disk is not None else "no checkpoint on disk before it"
        console.print(f"  step {p['step']} promoted from memory ({p['status']}): {p['steps_saved']} step(s) "
                      f"not redone ({since})")


def list_runs(path: Path) -> list[dict[str, Any]]:
    """The run folders directly inside ``path`` (a ``runs/`` folder), oldest first: name,
    status, attempts and last step of each, from its journal. A journal that cannot be read
    is listed with its problem; an empty list when ``path`` holds no run."""
    if not path.is_dir():
        return []
    try:
        entries = sorted(p for p in path.iterdir() if not p.is_symlink() and (p / "journal.jsonl").is_file())
    except OSError:
        return []
    runs: list[dict[str, Any]] = []
    for run in entries:
        row: dict[str, Any] = {"run_dir": str(run), "name": run.name, "status": None, "attempts": 0,
                               "last_step": None, "problem": None}
        try:
            events = read_journal(run / "journal.jsonl")
        except RunDirError as exc:
            row["problem"] = str(exc)
            runs.append(row)
            continue
        row["status"] = "not started" if not any(e.get("event") == Event.RUN_START.value for e in events) \
            else "running"
        for ev in events:
            name = ev.get("event")
            if name == Event.ATTEMPT_START.value:
                row["attempts"] = max(row["attempts"], ev["attempt"])
            elif name == Event.ATTEMPT_END.value and isinstance(ev.get("last_step"), int):
                row["last_step"] = max(row["last_step"] if row["last_step"] is not None else -1, ev["last_step"])
            elif name == Event.RUN_END.value:
                row["status"] = ev["status"]
        runs.append(row)
    return runs


def print_runs(path: Path, runs: Sequence[dict[str, Any]]) -> None:
    from rich.table import Table

    console = _console()
    table = Table(title=f"{path}: {len(runs)} run folder(s)", title_justify="left")
    for col in ("run", "status", "attempts", "last step"):
        table.add_column(col, justify="right" if col in ("attempts", "last step") else "left", no_wrap=True)
    for r in runs:
        table.add_row(r["name"], r["status"] or f"unreadable: {r['problem']}", str(r["attempts"]),
                      "-" if r["last_step"] is None else str(r["last_step"]))
    console.print(table)
    console.print(f"`ftrain inspect {path}/NAME` shows one run's story")


def print_story(story: RunStory) -> None:
    from rich.table import Table

    console = _console()
    table = Table(title=f"{story.run_dir}", title_justify="left")
    for col in ("#", "start", "ran", "1st step", "steps", "lost", "from", "ended", "then"):
        table.add_column(col, justify="right" if col in ("#", "lost", "from") else "left", no_wrap=True)
    for a in story.attempts:
        reached = "-" if a.last_step is None else f"{a.first_step}-{a.last_step}"
        table.add_row(str(a.attempt), _fmt_t(a.start), _fmt_s(a.duration), _fmt_s(a.time_to_first_step), reached,
                      str(a.steps_lost), "-" if a.resume_step is None else str(a.resume_step),
                      a.kind or ("ok" if a.end else "running"), a.decision or "-")
    console.print(table)
    warm = [str(a.attempt) for a in story.attempts if a.warm]
    if warm:
        console.print(f"  warm start (interpreter and imports ready ahead): attempt{'s' if len(warm) > 1 else ''} "
                      + ", ".join(warm))
    previous: dict[str, Any] = {}
    told: list[tuple[int, int]] = []
    for a in story.attempts:
        changed = {k: v for k, v in a.overrides.items() if previous.get(k) != v}
        if changed:
            console.print(f"  attempt {a.attempt} ran with "
                          + ", ".join(f"{k}={_fmt_v(v)}" for k, v in changed.items()))
        previous = a.overrides
        if a.skip != told:
            console.print(f"  attempt {a.attempt} told to skip steps {_windows_text(a.skip, a.total_steps)}")
            told = a.skip
        if a.reason:
            console.print(f"  attempt {a.attempt}: {a.reason}")
    for an in story.anomalies:
        console.print(f"  [yellow]anomaly[/] attempt {an['attempt']}: {an['reason']}"
                      + (" (ignored)" if an.get("action") == "ignore" else ""))
    color = {"succeeded": "green", "gave_up": "red", "stopped": "red"}.get(story.status, "yellow")
    goodput = "-" if story.goodput is None else f"{story.goodput:.0%}"
    console.print(f"status: [{color}]{story.status}[/] — {story.reason}")
    console.print(f"wall time {_fmt_s(story.wall)}, goodput {goodput}"
                  " (share of wall time spent on steps that were kept)")
    if story.skip:
        total = story.total_steps
        share = f", {count_steps(story.skip) / total:.0%} of the job's {total}" if total else ""
        console.print(f"[yellow]skipped by rollbacks:[/] {count_steps(story.skip)} steps "
                      f"({format_skip(story.skip)}){share}")
    for problem in story.problems:
        console.print(f"[yellow]note:[/] {problem}")


def print_checkpoints(path: Path, found: Sequence[checkpoints.Checkpoint]) -> None:
    from rich.table import Table

    console = _console()
    chosen = checkpoints.newest_usable(found)
    best = _pinned_best(path, found)
    foreign = any(ckptfmt.parse_step(Path(c.path).name) is None for c in found)
    table = Table(title=str(path), title_justify="left")
    columns = ["", "step", "saved", "size", "att", "metrics", "status"] + (["file"] if foreign else [])
    for col in columns:
        table.add_column(col, justify="right" if col in ("step", "size", "att") else "left",
                         no_wrap=col not in ("metrics", "file"), min_width=10 if col == "metrics" else None)
    colors = {"ok": "green", "corrupt": "red", "partial": "red", "unverified": "yellow", "quarantined": "magenta"}
    for c in found:
        mark = "→" if chosen is not None and c.path == chosen.path else ""
        if best is not None and c.path == best.path:
            mark += "★"
        metrics = ", ".join(f"{k}={_fmt_v(v)}" for k, v in list((c.metrics or {}).items())[:2]) or "-"
        status = c.status.value
        row = [mark, "-" if c.step is None else str(c.step), _fmt_t(c.t), _size(c.bytes),
               "-" if c.attempt is None else str(c.attempt), metrics, f"[{colors.get(status, 'white')}]{status}[/]"]
        if foreign:
            row.append(Path(c.path).name)
        table.add_row(*row)
    console.print(table)
    for c in found:
        note = getattr(c, "note", None)
        if note and c.status is not checkpoints.CheckpointStatus.OK:
            console.print(f"  {Path(c.path).name}: {c.status.value}: {note}")
    if best is not None:
        console.print(f"★ the best by the policy's keep_best, kept whatever retention says: "
                      f"{Path(best.path).name} (step {best.step})")
    if chosen is not None:
        console.print(f"→ a restart would resume from {Path(chosen.path).name} (step {chosen.step})")
    else:
        console.print("no usable checkpoint: a restart would start from scratch")


def _pinned_best(path: Path, found: Sequence[checkpoints.Checkpoint]) -> checkpoints.Checkpoint | None:
    """The checkpoint the run's ``keep_best`` pins, when ``path`` is a run's checkpoint folder."""
    from ftrain.errors import FtrainError
    from ftrain.rundir import read_run_json, read_run_policy

    if not (path.parent / "run.json").is_file():
        return None
    try:
        policy = read_run_policy(path.parent, read_run_json(path.parent))
    except FtrainError:
        return None
    keep = policy.checkpoints
    if not keep.keep_best_metric:
        return None
    return checkpoints.best_of(found, keep.keep_best_metric, keep.keep_best_mode)


def _size(size: int | None) -> str:
    if size is None:
        return "-"
    n = float(size)
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def plot_run(run_dir: Path, out: Path, metrics: Iterable[str] | None = None) -> Path:
    """Watched metrics against step, one colour per attempt, skipped steps, rollback targets,
    failures and anomalies marked (``ftrain.plot``); returns the path written."""
    from ftrain.plot import plot_run as draw

    return draw(run_dir, out, metrics)


PIPED_WIDTH = 160   # columns of inspect's tables in a pipe or a file: rich's 80 cut the "then" column


def _console() -> Any:
    """A rich console on stdout: the terminal's width, else COLUMNS, else PIPED_WIDTH."""
    import os

    from rich.console import Console

    if sys.stdout.isatty() or os.environ.get("COLUMNS"):
        return Console()
    return Console(width=PIPED_WIDTH)
