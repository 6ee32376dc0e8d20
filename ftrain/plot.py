"""``ftrain inspect RUN_DIR --plot FILE``: the watched metrics against the step.

``plot_panels`` decides what is drawn — one curve per attempt, the steps rollbacks told the
script to skip (shaded), where each rollback went back to (a vertical line), failures and
anomalies, a log y axis for a metric that spans more than two decades — as plain values a
test can read; ``render`` draws them with matplotlib (the ``ftrain[plot]`` extra), each
kind of mark with an SVG id (``gid``) and a legend entry.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ftrain.errors import RunDirError
from ftrain.report import RunStory, read_metrics, run_story

__all__ = ["Panel", "plot_panels", "plot_run", "render"]

LOG_DECADES = 2.0   # a positive metric whose max/min exceeds 10**LOG_DECADES gets a log axis
MAX_PANELS = 3


@dataclass
class Panel:
    """One metric's plot: what ``render`` draws on one axis."""

    metric: str
    curves: list[tuple[str, list[int], list[float]]] = field(default_factory=list)   # (label, steps, values)
    skipped: list[tuple[int, int]] = field(default_factory=list)      # step windows skipped by rollbacks
    rollbacks: list[tuple[int, str]] = field(default_factory=list)    # (target step, label)
    failures: list[tuple[int, str]] = field(default_factory=list)     # (step, kind)
    anomalies: list[int] = field(default_factory=list)                # steps
    log_y: bool = False


def spans_decades(values: Iterable[float], decades: float = LOG_DECADES) -> bool:
    """Whether the finite values are all positive and their max/min exceeds 10**decades."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite or min(finite) <= 0:
        return False
    return math.log10(max(finite) / min(finite)) > decades


def plot_panels(story: RunStory, records: Sequence[dict[str, Any]],
                metrics: Iterable[str] | None = None) -> list[Panel]:
    """What ``--plot`` draws: a panel per metric (the named ones, else the first three numeric
    metrics logged). RunDirError when there is nothing numeric to plot."""
    names = list(metrics or [])
    if not names:
        for rec in records:
            for k, v in rec.items():
                if k not in ("step", "t", "attempt") and _number(v) and k not in names:
                    names.append(k)
        names = names[:MAX_PANELS]
    if not names:
        raise RunDirError(f"{story.run_dir}: no numeric metrics to plot")
    rollbacks: list[tuple[int, str]] = []
    for row, after in zip(story.attempts, story.attempts[1:]):
        if row.decision == "rollback":
            target = after.resume_step
            rollbacks.append((target if target is not None else 0,
                              f"rollback to step {target}" if target is not None else "rollback: from scratch"))
    failures = [(a.last_step, a.kind) for a in story.attempts if a.kind and a.last_step is not None]
    anomalies = sorted({an["step"] for an in story.anomalies if type(an.get("step")) is int})
    panels = []
    for name in names:
        panel = Panel(name, skipped=list(story.skip), rollbacks=rollbacks, failures=failures, anomalies=anomalies)
        for row in story.attempts:
            pts = [(r["step"], float(r[name])) for r in records
                   if r.get("attempt") == row.attempt and _number(r.get(name))]
            if pts:
                panel.curves.append((f"attempt {row.attempt}", [p[0] for p in pts],
                                     [y if math.isfinite(y) else math.nan for _, y in pts]))
        panel.log_y = spans_decades(y for _, _, ys in panel.curves for y in ys)
        panels.append(panel)
    return panels


def _number(v: Any) -> bool:
    return type(v) in (int, float)


def render(panels: Sequence[Panel], out: Path, title: str) -> None:
    """Draw ``panels`` into ``out`` (the format follows its extension: .png, .svg, .pdf …)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RunDirError("--plot needs matplotlib: pip install 'ftrain[plot]'") from None
    matplotlib.rcParams["svg.fonttype"] = "none"   # text stays text in an SVG (searchable, smaller)
    fig, axes = plt.subplots(len(panels), 1, figsize=(10, 2.8 * len(panels)), sharex=True, squeeze=False)
    try:
        for ax, panel in zip(axes[:, 0], panels):
            _draw(ax, panel)
        axes[-1, 0].set_xlabel("step")
        fig.suptitle(title)
        fig.tight_layout()
        try:
            fig.savefig(out, dpi=110)
        except ValueError as exc:   # an extension matplotlib has no writer for
            raise RunDirError(f"{out}: cannot write a plot: {exc}") from None
        except OSError as exc:
            raise RunDirError(f"{out}: cannot write a plot: {exc.strerror or exc}") from None
    finally:
        plt.close(fig)


def _draw(ax: Any, panel: Panel) -> None:
    for a, b in panel.skipped:
        ax.axvspan(a - 0.5, b + 0.5, color="0.6", alpha=0.25, lw=0, gid=f"skipped-{a}-{b}",
                   label="skipped by rollbacks" if (a, b) == panel.skipped[0] else None)
    for label, xs, ys in panel.curves:
        ax.plot(xs, ys, lw=1, label=label, gid=f"curve-{label.replace(' ', '-')}")
    for i, (step, kind) in enumerate(panel.failures):
        ax.axvline(step, color="red", ls="--", lw=0.8, gid=f"failure-{step}", label="failure" if i == 0 else None)
        ax.annotate(kind, (step, 1), xycoords=("data", "axes fraction"), fontsize=7, rotation=90,
                    va="top", ha="right", color="red")
    for i, (step, label) in enumerate(panel.rollbacks):
        ax.axvline(step, color="purple", ls="-", lw=1.2, gid=f"rollback-{step}",
                   label="rollback target" if i == 0 else None)
        ax.annotate(f"◀ {label}", (step, 0.02), xycoords=("data", "axes fraction"), fontsize=7, color="purple")
    for i, step in enumerate(panel.anomalies):
        ax.axvline(step, color="orange", ls=":", lw=1, gid=f"anomaly-{step}", label="anomaly" if i == 0 else None)
    if panel.log_y:
        ax.set_yscale("log")
    ax.set_gid(f"axes-{panel.metric}-{ax.get_yscale()}")
    ax.set_ylabel(panel.metric + (" (log)" if panel.log_y else ""))
    ax.legend(fontsize=7, loc="upper right").set_gid(f"legend-{panel.metric}")


def plot_run(run_dir: Path, out: Path, metrics: Iterable[str] | None = None) -> Path:
    """Plot a run folder's metrics into ``out``; returns the path written."""
    story = run_story(run_dir)
    records, _ = read_metrics(run_dir / "metrics.jsonl")
    render(plot_panels(story, records, metrics), out, f"{run_dir.name}: {story.status}")
    return out
