"""The README's code blocks, run as a new user would: they cannot drift from what ftrain does."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import ROOT, events, of, run_ftrain

README = (ROOT / "README.md").read_text()


def blocks(lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", README, flags=re.S | re.M)


def section(title: str) -> str:
    start = README.index(title)
    end = README.find("\n## ", start + 1)
    return README[start:end if end > 0 else None]


def test_the_shim_example_trains_survives_a_segfault_and_a_kill_and_resumes_where_it_saved(tmp_path: Path) -> None:
    code, = [b for b in blocks("python") if "ftrain.config(" in b]
    (tmp_path / "train.py").write_text(code)
    p = run_ftrain("run", "train.py", "--no-ui", "--run-dir", "run", "--inject", "segv@120,kill@230",
                   cwd=tmp_path, timeout=240)
    assert p.returncode == 0, p.stdout + p.stderr
    run = tmp_path / "run"
    evts = events(run)
    assert [e["kind"] for e in of(evts, "failure")] == ["segfault", "killed"]
    starts = of(evts, "attempt_start")
    assert [s.get("resume_step") for s in starts] == [None, 100, 200]
    steps = {json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
             if '"loss"' in line}
    assert steps == set(range(300))
    assert of(evts, "run_end")[0]["status"] == "succeeded"
    # "What ftrain writes" names what is there
    for name in re.findall(r"^  ([\w.]+)\s", section("## What ftrain writes"), flags=re.M):
        assert (run / name).exists(), name
    assert (run / "attempts" / "0001" / "output.log").exists()


def test_the_shim_example_runs_without_ftrain(tmp_path: Path) -> None:
    import subprocess
    import sys

    code, = [b for b in blocks("python") if "ftrain.config(" in b]
    (tmp_path / "train.py").write_text(code)
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, "train.py"], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                       env=env)
    assert p.returncode == 0, p.stderr
    assert not (tmp_path / "runs").exists()     # no supervisor, no run folder


def test_the_policy_shown_is_the_built_in_one_verbatim() -> None:
    """"## The policy" shows the default that `ftrain run` applies without --policy, whole."""
    from ftrain.policyfile import default_policy_path

    shown = re.findall(r"^```yaml\n(.*?)^```", section("## The policy"), flags=re.S | re.M)[0]
    assert shown == default_policy_path().read_text()


def test_the_policy_shown_is_valid_and_the_error_example_is_what_ftrain_prints(tmp_path: Path) -> None:
    policy, = [b for b in blocks("yaml") if "version: 1" in b.splitlines()]
    (tmp_path / "p.yaml").write_text(policy)
    p = run_ftrain("policy", "check", "p.yaml", cwd=tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    shown = re.search(r"^ftrain: error: p\.yaml:(\d+): (.*)$", README, flags=re.M)
    assert shown is not None
    lines = policy.splitlines()
    line = int(shown.group(1))
    assert "cuda_oom" in lines[line - 1]
    lines[line - 1] = lines[line - 1].replace("cuda_oom", "cuda_oomm")
    (tmp_path / "p.yaml").write_text("\n".join(lines) + "\n")
    p = run_ftrain("policy", "check", "p.yaml", cwd=tmp_path)
    assert p.returncode == 2 and shown.group(0) in p.stderr, p.stderr


@pytest.mark.parametrize("code", ["0", "1", "2", "3", "130", "143"])
def test_every_exit_code_in_the_readme_is_one_the_cli_documents(code: str) -> None:
    table = section("## Exit status")
    assert f"| {code} |" in table
    from ftrain.supervisor import ExitCode

    assert int(code) in {int(c) for c in ExitCode}


def test_the_notify_example_is_a_valid_policy_section(tmp_path: Path) -> None:
    block, = [b for b in blocks("yaml") if b.startswith("notify:")]
    (tmp_path / "p.yaml").write_text(block)
    p = run_ftrain("policy", "check", "p.yaml", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
