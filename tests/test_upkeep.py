"""ftrain.upkeep on plain values: the skipped-steps text and a new attempt's environment."""

from __future__ import annotations

from pathlib import Path

import pytest

from ftrain import upkeep
from ftrain.state import RunState


def test_skipped_text_merges_windows_and_stops_at_the_jobs_end() -> None:
    assert upkeep.skipped_text([], 100) == ""
    assert upkeep.skipped_text([(10, 19)], None) == "; 10 steps skipped by rollbacks (10-19)"
    # overlapping and touching windows count once; past the end (steps 0..99) not at all
    text = upkeep.skipped_text([(30, 49), (10, 19), (20, 25), (90, 300)], 100)
    assert text == "; 46 steps skipped by rollbacks (10-25,30-49,90-99, 46% of the job)"
    assert upkeep.skipped_text([(120, 200)], 100) == ""


def test_child_env_drops_an_outer_runs_variables_and_names_this_attempts(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FTRAIN_RESUME_FROM", "/elsewhere/step-1.pt")   # an outer ftrain's
    monkeypatch.setenv("FTRAIN_INJECT", "segv@3")
    state = RunState(config={}, inject=[])
    state.skip = [(5, 9)]
    env = upkeep.child_env(2, run_dir=tmp_path, config_path=tmp_path / "c.yaml", metrics_path=tmp_path / "m",
                           checkpoint_dir=tmp_path / "ck", state=state, extra={"FTRAIN_SNAPSHOT_DIR": "/dev/shm/x"})
    assert env["FTRAIN_ATTEMPT"] == "2" and env["FTRAIN_RUN_DIR"] == str(tmp_path.resolve())
    assert "FTRAIN_RESUME_FROM" not in env and "FTRAIN_INJECT" not in env
    assert env["FTRAIN_SKIP_STEPS"] == "5-9" and env["FTRAIN_SNAPSHOT_DIR"] == "/dev/shm/x"
