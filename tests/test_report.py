"""``ftrain inspect`` of a real run with a rollback: skipped steps (text and JSON), lost steps
counted as steps, and ``--plot`` read back from the file it wrote."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from conftest import CHILDREN, events, of, run_ftrain

CHILD = str(CHILDREN / "multi_line.py")
POLICY = """\
version: 1
max_restarts: 3
backoff: 0s
warm_start: false
detect: {hang: {timeout: 30s, startup: 60s}}
rules:
  - when: [nonfinite, spike]
    action: rollback
    margin: 5
    skip_steps: 40
  - when: [segfault, aborted, killed, exit_nonzero, preempted, hang]
    action: restart
  - when: exception
    action: stop
"""


@pytest.fixture(scope="module")
def rolled_back(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 60-step job (3 lines per step) whose loss turns NaN at step 35: rolled back to the
    checkpoint of step 29, told to skip 35-74 (the job ends at 59)."""
    tmp = tmp_path_factory.mktemp("rolled")
    (tmp / "p.yaml").write_text(POLICY)
    p = run_ftrain("run", CHILD, "--policy", "p.yaml", "--run-dir", "run", "--no-ui", "--inject", "nan@35",
                   cwd=tmp, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    return tmp / "run"


def metrics(run: Path) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "ftrain" not in r]


def test_inspect_json_shows_the_skipped_steps_per_attempt_and_for_the_run(rolled_back: Path) -> None:
    p = run_ftrain("inspect", str(rolled_back), "--json", cwd=rolled_back.parent)
    assert p.returncode == 0, p.stderr
    story = json.loads(p.stdout)
    first, second = story["attempts"]
    assert first["skip_steps"] == [] and first["steps_skipped"] == 0
    assert second["skip_steps"] == ["35-74"]            # what the decision told it (FTRAIN_SKIP_STEPS)
    assert second["steps_skipped"] == 25                # 35-59: the job has 60 steps (the script's defaults)
    assert story["skip_steps"] == ["35-59"] and story["steps_skipped"] == 25 and story["total_steps"] == 60
    decision, = of(events(rolled_back), "decision")
    assert decision["skip_steps"] == ["35-74"] and decision["resume_step"] == 29
    # the script did skip them: attempt 2 logged 30-34 and nothing after
    assert sorted({r["step"] for r in metrics(rolled_back) if r["attempt"] == 2}) == list(range(30, 35))


def test_inspect_text_says_what_was_skipped(rolled_back: Path) -> None:
    p = run_ftrain("inspect", str(rolled_back), cwd=rolled_back.parent, env={"COLUMNS": "200"})
    assert p.returncode == 0, p.stderr
    assert "attempt 2 told to skip steps 35-74 (40 steps; 25 before the job's end at step 59)" in p.stdout
    assert "skipped by rollbacks: 25 steps (35-59), 42% of the job's 60" in p.stdout


def test_lost_counts_steps_not_lines(rolled_back: Path) -> None:
    recs = [r for r in metrics(rolled_back) if r["attempt"] == 1 and r["step"] > 29]
    lost = {r["step"] for r in recs}
    assert len(recs) >= 3 * len(lost) - 2 > len(lost) > 0    # three lines per step (the last step may be cut)
    story = json.loads(run_ftrain("inspect", str(rolled_back), "--json", cwd=rolled_back.parent).stdout)
    assert story["attempts"][0]["steps_lost"] == len(lost)
    assert story["attempts"][1]["steps_lost"] == 0


def test_plot_panels_mark_skips_rollbacks_and_choose_a_log_axis(rolled_back: Path) -> None:
    from ftrain.plot import plot_panels, spans_decades
    from ftrain.report import read_metrics, run_story

    records, _ = read_metrics(rolled_back / "metrics.jsonl")
    panels = {p.metric: p for p in plot_panels(run_story(rolled_back), records)}
    assert list(panels) == ["loss", "lr", "samples_per_s"]
    loss = panels["loss"]
    assert loss.log_y and not panels["lr"].log_y                    # 10 -> 0.01: three decades; lr is flat
    assert loss.skipped == [(35, 59)]
    assert loss.rollbacks == [(29, "rollback to step 29")]
    assert loss.anomalies == [35] and [k for _, k in loss.failures] == ["nonfinite"]
    assert [label for label, _, _ in loss.curves] == ["attempt 1", "attempt 2"]
    # the log rule itself: positive values over more than two decades only
    assert spans_decades([1.0, 1000.0]) and not spans_decades([1.0, 90.0])
    assert not spans_decades([-1.0, 1000.0]) and not spans_decades([float("nan")])
    assert spans_decades([0.001, float("nan"), 1.0])


def test_plot_svg_has_the_legend_the_marks_and_a_log_axis(rolled_back: Path, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    out = tmp_path / "curves.svg"
    p = run_ftrain("inspect", str(rolled_back), "--plot", str(out), cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip().splitlines()[-1] == f"plot written to {out}"
    svg = ET.parse(out).getroot()                                   # a well-formed SVG document
    assert svg.tag.endswith("svg")
    ids = {el.get("id") for el in svg.iter() if el.get("id")}
    assert {"legend-loss", "skipped-35-59", "rollback-29", "anomaly-35", "curve-attempt-1", "curve-attempt-2"} <= ids
    legend = next(el for el in svg.iter() if el.get("id") == "legend-loss")
    texts = " ".join(t.text or "" for t in legend.iter() if t.tag.endswith("text"))
    for entry in ("attempt 1", "attempt 2", "skipped by rollbacks", "rollback target", "anomaly"):
        assert entry in texts, texts
    assert {"axes-loss-log", "axes-lr-linear"} <= ids                # the loss axis is logarithmic
    assert any("loss (log)" == (t.text or "").strip() for t in svg.iter() if t.tag.endswith("text"))


def test_plot_png_and_json_keep_stdout_one_document(rolled_back: Path, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    out = tmp_path / "curves.png"
    p = run_ftrain("inspect", str(rolled_back), "--plot", str(out), "--json", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["status"] == "succeeded"
    assert f"plot written to {out}" in p.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_to_an_unknown_format_is_one_line_and_exit_2(rolled_back: Path, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    p = run_ftrain("inspect", str(rolled_back), "--plot", str(tmp_path / "curves.xyz"), cwd=tmp_path)
    assert p.returncode == 2
    assert len(p.stderr.strip().splitlines()) == 1 and "curves.xyz" in p.stderr, p.stderr
