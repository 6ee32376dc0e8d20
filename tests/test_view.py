"""What a person sees: the status line, progress bars in the live view, the terminal left as found."""

from __future__ import annotations

import os
import pty
import re
import select
import signal
import subprocess
import sys
import termios
import time
from pathlib import Path

from conftest import ROOT

from ftrain.view import Progress, _Lines, status_text, total_steps

BAR = """
import time, sys
import ftrain
cfg = ftrain.config(defaults={"train": {"steps": 400}})
print("a line of its own", flush=True)
for step in range(cfg["train"]["steps"]):
    ftrain.log(step, loss=1.0 / (1 + step))
    sys.stderr.write(f"\\r{step * 100 // 400:3d}%|{'#' * (step // 40):10}| {step}/400")
    sys.stderr.flush()
    time.sleep(0.02)
"""


def test_status_shows_the_step_of_the_total_an_eta_and_the_restarts_used() -> None:
    text = status_text(Progress(2, 99, {"loss": 0.123456}, 10.0, 400, 1, 8))
    assert "attempt 2" in text and "step 99/400 (25%)" in text and "loss=0.1235" in text
    assert "ETA 30s" in text and "restarts 1/8" in text
    assert "ETA" not in status_text(Progress(1, 99, {}, 10.0))     # no total, no ETA


def test_the_total_comes_from_the_usual_config_keys() -> None:
    assert total_steps({"train": {"steps": 300, "batch_size": 8}}) == 300
    assert total_steps({"max_steps": 5000}) == 5000
    assert total_steps({"train": {"lr": 0.1}}) is None
    assert total_steps({"train": {"steps": True}}) is None


def test_a_bar_redrawn_with_carriage_returns_is_one_line_as_a_terminal_shows_it() -> None:
    lines = _Lines()
    assert lines.feed("start\n 10%|#   | 1/10\r") == ["start"]
    assert lines.drawing == " 10%|#   | 1/10"
    assert lines.feed(" 20%|##  | 2") == [] and lines.drawing == " 20%|##  | 2"
    assert lines.feed("/10\r 30%|### | 3/10\n") == [" 30%|### | 3/10"]
    assert lines.feed("dos line\r\n") == ["dos line"]
    assert lines.flush() == []


def test_the_live_view_in_a_terminal_draws_the_bar_and_gives_the_terminal_back_after_ctrl_c(tmp_path: Path) -> None:
    (tmp_path / "bar.py").write_text(BAR)
    master, slave = pty.openpty()
    termios.tcsetattr(slave, termios.TCSANOW, termios.tcgetattr(slave))
    before = termios.tcgetattr(slave)[3]
    env = {k: v for k, v in os.environ.items() if not k.startswith("FTRAIN_")}
    env.update(PYTHONPATH=str(ROOT), COLUMNS="100", LINES="30", TERM="xterm-256color")
    proc = subprocess.Popen([sys.executable, "-m", "ftrain", "run", "bar.py", "--run-dir", "run"], cwd=tmp_path,
                            stdin=slave, stdout=slave, stderr=slave, env=env, start_new_session=True)
    os.close(slave)
    out = b""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and b"/400" not in out:
        if select.select([master], [], [], 0.5)[0]:
            out += os.read(master, 65536)
    assert b"/400" in out, out[-2000:]
    during = termios.tcgetattr(master)[3]
    proc.send_signal(signal.SIGINT)
    while True:
        try:
            if not select.select([master], [], [], 10)[0]:
                break
            chunk = os.read(master, 65536)
        except OSError:
            break
        if not chunk:
            break
        out += chunk
    assert proc.wait(30) == 130
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", out.decode("utf-8", "replace"))
    assert "a line of its own" in text and "ftrain" in text and "restarts 0/8" in text
    assert "run interrupted" in text
    assert during & termios.ECHOCTL == 0            # ^C not echoed over the panel while it is up
    assert before & termios.ECHOCTL                 # (it was on before)
    assert termios.tcgetattr(master)[3] & termios.ECHOCTL   # and is on again after
    os.close(master)


DEFAULTS_ONLY = """
import time
import ftrain
cfg = ftrain.config(defaults={"train": {"steps": 400}})
for step in range(cfg["train"]["steps"]):
    ftrain.log(step, loss=1.0 / (1 + step))
    time.sleep(0.02)
"""


def test_the_live_view_shows_the_total_and_an_eta_of_a_script_configured_only_by_its_defaults(
        tmp_path: Path) -> None:
    """No --config: the job's length (``train.steps``) is learnt from the script's
    ``ftrain.config(defaults=...)`` as attempt 1 runs, and the panel in a real terminal
    shows the step of the total, its share and an ETA (the script prints no count itself)."""
    (tmp_path / "train.py").write_text(DEFAULTS_ONLY)
    master, slave = pty.openpty()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FTRAIN_")}
    env.update(PYTHONPATH=str(ROOT), COLUMNS="120", LINES="30", TERM="xterm-256color")
    proc = subprocess.Popen([sys.executable, "-m", "ftrain", "run", "train.py", "--run-dir", "run"], cwd=tmp_path,
                            stdin=slave, stdout=slave, stderr=slave, env=env, start_new_session=True)
    os.close(slave)
    out, shown = b"", None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and shown is None and proc.poll() is None:
        if select.select([master], [], [], 0.5)[0]:
            try:
                out += os.read(master, 65536)
            except OSError:   # the run ended: the terminal's other side is closed
                break
        text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", out.decode("utf-8", "replace"))
        shown = re.search(r"step (\d+)/400 \((\d+)%\).*ETA \d+s", text)
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
    while select.select([master], [], [], 10)[0]:   # drain, so the supervisor's last writes never block
        try:
            if not os.read(master, 65536):
                break
        except OSError:
            break
    code = proc.wait(30)
    os.close(master)
    assert shown is not None, text[-2000:]
    assert code == 130
    assert 0 < int(shown.group(1)) < 400 and 0 <= int(shown.group(2)) <= 100
