"""Shared helpers: run the real `ftrain` CLI as a subprocess and read what it left behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHILDREN = Path(__file__).resolve().parent / "children"


def ftrain_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "ftrain", *args]


def run_ftrain(*args: str, cwd: Path, timeout: float = 60, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("FTRAIN_")}
    full_env.update(env or {})
    return subprocess.run(ftrain_cmd(*args), cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env=full_env)


def events(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "journal.jsonl").read_text().splitlines() if line.strip()]


def of(evts: list[dict], name: str) -> list[dict]:
    return [e for e in evts if e["event"] == name]


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead for our purposes
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


@pytest.fixture
def write(tmp_path):
    def _write(name: str, text: str) -> Path:
        path = tmp_path / name
        path.write_text(text)
        return path
    return _write
