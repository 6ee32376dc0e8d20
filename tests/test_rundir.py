"""The run folder is read by typed readers (DESIGN §4): bad content is one line and exit 2.

One real run (a kill and a restart) is made once; each test edits a copy of its folder the
way a careless hand, a disk error or another tool would, then runs `ftrain resume` and
`ftrain inspect` on it as a user would.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from conftest import CHILDREN, run_ftrain

from ftrain.errors import RunDirError
from ftrain.journal import check_event, read_journal

JOB = str(CHILDREN / "job_train.py")
POLICY = """
version: 1
max_restarts: 3
backoff: 0s
rules:
  - when: [killed, segfault]
    action: restart
"""


@pytest.fixture(scope="module")
def made_run(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("made")
    (base / "p.yaml").write_text(POLICY)
    (base / "c.yaml").write_text("train: {steps: 4, batch_size: 8, grad_accum: 1, ckpt_every: 2, sleep: 0.01}\n"
                                 "optim: {lr: 0.1}\n")
    p = run_ftrain("run", JOB, "--policy", "p.yaml", "--config", "c.yaml", "--run-dir", "run", "--no-ui",
                   "--inject", "kill@3", cwd=base, timeout=120)
    assert p.returncode == 0, p.stderr
    return base / "run"


@pytest.fixture
def run(made_run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(made_run, copy, symlinks=True)
    return copy


def edit_journal(run: Path, event: str, **changes: object) -> int:
    """Change the first ``event`` line of the journal; its line number."""
    lines = (run / "journal.jsonl").read_text().splitlines()
    for i, line in enumerate(lines):
        record = json.loads(line)
        if record["event"] == event:
            record.update(changes)
            lines[i] = json.dumps(record)
            (run / "journal.jsonl").write_text("\n".join(lines) + "\n")
            return i + 1
    raise AssertionError(f"no {event} in the journal")


def refused(run: Path, *words: str) -> None:
    """Both `resume` and `inspect` refuse the folder: one line naming it, exit 2."""
    for args in (("resume", str(run), "--no-ui"), ("inspect", str(run))):
        p = run_ftrain(*args, cwd=run.parent, timeout=30)
        assert p.returncode == 2, (args, p.returncode, p.stdout, p.stderr)
        assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
        for word in words:
            assert word in p.stderr, (word, p.stderr)


def test_the_run_as_made_resumes_to_the_end_and_inspects(run: Path) -> None:
    p = run_ftrain("inspect", str(run), cwd=run.parent)
    assert p.returncode == 0, p.stderr
    assert "succeeded" in p.stdout


def test_an_attempt_number_that_is_a_string_is_refused_with_file_and_line(run: Path) -> None:
    line = edit_journal(run, "attempt_start", attempt="x")
    refused(run, f"journal.jsonl:{line}", "attempt_start", "attempt", "'x'")


def test_a_decision_rule_that_is_a_list_is_refused_with_file_and_line(run: Path) -> None:
    line = edit_journal(run, "decision", rule=[1])
    refused(run, f"journal.jsonl:{line}", "decision", "rule", "[1]")


@pytest.mark.parametrize("event, changes, words", [
    ("failure", {"kind": "gremlins"}, ("failure", "kind", "gremlins")),
    ("attempt_end", {"max_step": 3.5}, ("attempt_end", "max_step")),
    ("run_end", {"status": "fine"}, ("run_end", "status")),
    ("attempt_start", {"overrides": [1, 2]}, ("attempt_start", "overrides")),
    ("run_start", {"t": "yesterday"}, ("run_start", "t")),
])
def test_wrong_types_in_any_event_are_refused(run: Path, event: str, changes: dict, words: tuple) -> None:
    line = edit_journal(run, event, **changes)
    refused(run, f"journal.jsonl:{line}", *words)


def test_a_torn_last_line_and_unknown_events_are_not_errors(tmp_path: Path) -> None:
    path = tmp_path / "journal.jsonl"
    path.write_text('{"t": 1, "event": "run_start"}\n{"t": 2, "event": "later_feature", "x": [1]}\n'
                    '{"t": 3, "event": "attempt_st')
    assert [e["event"] for e in read_journal(path)] == ["run_start", "later_feature"]


def test_check_event_on_plain_values() -> None:
    assert check_event({"t": 1.5, "event": "attempt_start", "attempt": 1, "pid": 7, "host": "h"}) is None
    assert "attempt: missing" in (check_event({"t": 1, "event": "attempt_start"}) or "")
    assert "expected an integer" in (check_event({"t": 1, "event": "attempt_start", "attempt": True}) or "")
    assert "rule" in (check_event({"t": 1, "event": "decision", "attempt": 1, "action": "restart",
                                   "rule": "0"}) or "")
    assert "action" in (check_event({"t": 1, "event": "decision", "attempt": 1, "action": "dance"}) or "")
    assert check_event({"t": 1, "event": "decision", "attempt": 1, "action": "stop", "rule": None}) is None


@pytest.mark.parametrize("changes, words", [
    ({"command": "python train.py"}, ("run.json", "command")),
    ({"base_config": [1]}, ("run.json", "base_config")),
    ({"cwd": 7}, ("run.json", "cwd")),
    ({"distributed": "yes"}, ("run.json", "distributed")),
])
def test_a_run_json_of_wrong_types_is_refused_by_resume(run: Path, changes: dict, words: tuple) -> None:
    info = json.loads((run / "run.json").read_text())
    info.update(changes)
    (run / "run.json").write_text(json.dumps(info))
    p = run_ftrain("resume", str(run), "--no-ui", cwd=run.parent, timeout=30)
    assert p.returncode == 2 and "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    for word in words:
        assert word in p.stderr


def test_a_run_json_that_points_at_dev_zero_is_refused_at_once(run: Path) -> None:
    (run / "run.json").unlink()
    (run / "run.json").symlink_to("/dev/zero")
    p = run_ftrain("resume", str(run), "--no-ui", cwd=run.parent, timeout=30)
    assert p.returncode == 2 and "run.json" in p.stderr and "Traceback" not in p.stderr, p.stderr


def test_a_journal_that_is_a_fifo_does_not_hang_the_reader(run: Path) -> None:
    (run / "journal.jsonl").unlink()
    os.mkfifo(run / "journal.jsonl")
    refused(run, "journal.jsonl", "not a regular file")


def test_a_huge_journal_is_refused_not_read(tmp_path: Path) -> None:
    path = tmp_path / "journal.jsonl"
    with open(path, "wb") as f:
        f.truncate((256 << 20) + 1)        # sparse: costs no disk
    with pytest.raises(RunDirError, match="not a journal"):
        read_journal(path)


def test_a_policy_copy_that_leads_out_of_the_run_folder_is_refused(run: Path, tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere.yaml"
    outside.write_text((run / "policy.yaml").read_text())
    (run / "policy.yaml").unlink()
    (run / "policy.yaml").symlink_to(outside)
    p = run_ftrain("resume", str(run), "--no-ui", cwd=run.parent, timeout=30)
    assert p.returncode == 2 and "policy.yaml" in p.stderr and "Traceback" not in p.stderr, p.stderr


@pytest.mark.parametrize("changes, note", [
    ({"bytes": "12"}, "lacks bytes or sha256"),
    ({"step": True}, "the manifest is of step"),
    ({"sha256": "../../etc/passwd"}, "not a digest"),
    ({"attempt": {"x": 1}, "metrics": [1], "t": "now"}, None),    # harmless fields: dropped, still ok
])
def test_a_manifest_of_wrong_types_makes_the_checkpoint_corrupt_not_a_traceback(run: Path, changes: dict,
                                                                                  note: str | None) -> None:
    manifest = sorted((run / "checkpoints").glob("step-*.json"))[-1]
    meta = json.loads(manifest.read_text())
    meta.update(changes)
    manifest.write_text(json.dumps(meta))
    p = run_ftrain("inspect", str(run / "checkpoints"), "--json", cwd=run.parent)
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr
    entry = next(c for c in json.loads(p.stdout) if Path(c["path"]).name == manifest.name.replace(".json", ".pt"))
    if note is None:
        assert entry["status"] == "ok" and entry["attempt"] is None and entry["metrics"] == {}
    else:
        assert entry["status"] == "corrupt" and note in (entry.get("note") or ""), entry


def test_a_checkpoint_that_is_a_symlink_out_of_its_folder_is_not_ok(run: Path, tmp_path: Path) -> None:
    data = sorted((run / "checkpoints").glob("step-*.pt"))[-1]
    outside = tmp_path / "outside.pt"
    shutil.copy(data, outside)
    data.unlink()
    data.symlink_to(outside)
    p = run_ftrain("inspect", str(run / "checkpoints"), "--json", cwd=run.parent)
    entry = next(c for c in json.loads(p.stdout) if Path(c["path"]).name == data.name)
    assert entry["status"] == "corrupt", entry
