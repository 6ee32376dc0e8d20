"""Alerts (policy ``notify:``): a real command and a real local HTTP server receive the
events a person wants (restart, rollback, stop, run_end) as JSON; destinations that fail,
hang or are not there never hold up or break the run, are journaled and told once."""

from __future__ import annotations

import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import CHILDREN, events, of, pid_alive, run_ftrain

from ftrain.errors import PolicyError
from ftrain.policyfile import parse_policy

JOB = str(CHILDREN / "job_train.py")


class Hook:
    """A local webhook: records every POST's path, headers and JSON body."""

    def __init__(self, status: int = 200) -> None:
        self.received: list[dict] = []
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:   # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers["Content-Length"]))
                hook.received.append({"path": self.path, "type": self.headers["Content-Type"],
                                      "json": json.loads(body)})
                self.send_response(status)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/ftrain"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hook():
    h = Hook()
    yield h
    h.close()


def _recorder(tmp_path: Path) -> tuple[Path, Path]:
    """A command that appends its stdin (one JSON message) and its event variable to a file."""
    out = tmp_path / "alerts.jsonl"
    script = tmp_path / "alert.py"
    script.write_text(
        "import json, os, sys\n"
        "msg = json.load(sys.stdin)\n"
        "msg['env_event'] = os.environ.get('FTRAIN_NOTIFY_EVENT')\n"
        f"open({str(out)!r}, 'a').write(json.dumps(msg) + '\\n')\n")
    return script, out


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_restart_rollback_and_run_end_reach_a_command_and_a_webhook(tmp_path, write, hook):
    script, out = _recorder(tmp_path)
    write("c.yaml", "train: {steps: 30, ckpt_every: 4, sleep: 0.01}\noptim: {lr: 0.1}\n")
    write("p.yaml", f"""
version: 1
max_restarts: 4
backoff: 0s
rules:
  - when: [segfault]
    action: restart
  - when: [nonfinite]
    action: rollback
    margin: 2
notify:
  command: [{sys.executable!r}, {str(script)!r}]
  webhook: {hook.url}
""")
    p = run_ftrain("run", JOB, "--policy", "p.yaml", "--config", "c.yaml", "--run-dir", "run", "--no-ui",
                   "--inject", "segv@6,nan@14", cwd=tmp_path, timeout=120)
    assert p.returncode == 0, p.stderr
    sent = _lines(out)
    assert [m["event"] for m in sent] == ["restart", "rollback", "run_end"], sent
    assert [m["env_event"] for m in sent] == ["restart", "rollback", "run_end"]
    restart, rollback, end = sent
    assert "attempt 1 failed: segfault at step 5" in restart["text"] and "restart" in restart["text"]
    assert restart["record"]["event"] == "decision" and restart["record"]["action"] == "restart"
    assert "nonfinite" in rollback["text"] and rollback["record"]["resume_step"] is not None
    assert end["record"]["status"] == "succeeded" and "run succeeded after 3 attempt(s), 2 restart(s)" in end["text"]
    assert end["run_dir"] == str((tmp_path / "run").resolve())
    posted = hook.received
    assert [m["json"] for m in posted] == [{k: v for k, v in m.items() if k != "env_event"} for m in sent]
    assert {m["path"] for m in posted} == {"/hooks/ftrain"} and {m["type"] for m in posted} == {"application/json"}
    assert not of(events(tmp_path / "run"), "notify_failed")


def test_giving_up_is_sent_as_stop_and_the_chosen_events_only(tmp_path, write):
    script, out = _recorder(tmp_path)
    write("p.yaml", f"""
max_restarts: 1
backoff: 0s
rules:
  - when: [exception]
    action: restart
notify:
  command: {sys.executable} {script}
  events: [failure, stop]
""")
    p = run_ftrain("run", JOB, "--policy", "p.yaml", "--run-dir", "run", "--no-ui", "--inject", "exc@2,exc@4",
                   cwd=tmp_path, timeout=120)
    assert p.returncode == 1, p.stderr
    sent = _lines(out)
    assert [m["event"] for m in sent] == ["failure", "failure", "stop"], sent
    assert sent[-1]["record"]["gave_up"] is True and "attempt 2 failed: exception at step 3" in sent[-1]["text"]


def test_failing_hanging_and_absent_destinations_never_hold_up_the_run(tmp_path, write):
    """A command that exits 1, one that hangs past the timeout (killed, with its own child),
    a webhook nobody listens on: the run succeeds in about its own time, every failure is in
    the journal, each destination's first failure is told once."""
    pids = tmp_path / "pids"
    hang = write("hang.sh", f"#!/bin/bash\nsleep 300 &\necho $$ $! >> {pids}\nwait\n")
    hang.chmod(0o755)
    write("c.yaml", "train: {steps: 12, ckpt_every: 3, sleep: 0.01}\n")
    for name, command in (("fails", f"{sys.executable} -c 'import sys; sys.stderr.write(\"no route\"); sys.exit(1)'"),
                          ("hangs", str(hang))):
        write(f"{name}.yaml", f"""
backoff: 0s
max_restarts: 3
rules:
  - when: [segfault]
    action: restart
notify:
  command: {json.dumps(command)}
  webhook: http://127.0.0.1:9/nobody
  timeout: 1s
""")
        started = time.monotonic()
        p = run_ftrain("run", JOB, "--policy", f"{name}.yaml", "--config", "c.yaml", "--run-dir", name, "--no-ui",
                       "--inject", "segv@3,segv@7", cwd=tmp_path, timeout=120)
        took = time.monotonic() - started
        assert p.returncode == 0, p.stderr
        failed = of(events(tmp_path / name), "notify_failed")
        assert {f["to"] for f in failed} == {"command", "webhook"}, failed
        told = [line for line in p.stdout.splitlines() + p.stderr.splitlines() if "notify:" in line]
        assert len(told) == 2 and any("webhook failed" in t for t in told), told   # once per destination
        if name == "fails":
            assert any("exited 1: no route" in f["problem"] for f in failed)
            assert took < 20, took
        else:
            assert any("did not finish in 1s (killed)" in f["problem"] for f in failed)
            for line in pids.read_text().splitlines():
                for pid in map(int, line.split()):
                    assert not pid_alive(pid), line
        assert of(events(tmp_path / name), "run_end")[-1]["status"] == "succeeded"


def test_a_webhook_answering_500_is_a_journaled_failure(tmp_path, write):
    bad = Hook(status=500)
    try:
        write("p.yaml", f"notify: {{webhook: {bad.url}, events: [run_end]}}\n")
        p = run_ftrain("run", JOB, "--policy", "p.yaml", "--run-dir", "run", "--no-ui", cwd=tmp_path)
        assert p.returncode == 0, p.stderr
        assert len(bad.received) == 1 and bad.received[0]["json"]["event"] == "run_end"
        (failed,) = of(events(tmp_path / "run"), "notify_failed")
        assert failed["to"] == "webhook" and "HTTP 500" in failed["problem"]
    finally:
        bad.close()


@pytest.mark.parametrize("text, message", [
    ("notify: {command: x, events: [restart, rolback]}\n", "p.yaml:1: notify.events: unknown event 'rolback'"),
    ("notify:\n  webhook: ftp://host/x\n", "p.yaml:2: notify.webhook: must be an http:// or https:// URL"),
    ("notify:\n  command: x\n  timeout: 0s\n", "p.yaml:3: notify.timeout: must be more than 0s"),
    ("notify:\n  events: [restart]\n", "p.yaml:1: notify: names no destination"),
    ("notify:\n  command: 'unclosed \"quote'\n", "p.yaml:2: notify.command: must be a command line"),
    ("notify:\n  command: x\n  url: y\n", "p.yaml:3: notify.url: unknown key"),
])
def test_a_bad_notify_section_is_one_line_with_file_and_line(text, message):
    with pytest.raises(PolicyError) as err:
        parse_policy(text, "p.yaml")
    assert str(err.value).startswith(message), str(err.value)


def test_a_bad_notify_section_stops_ftrain_run_with_exit_2(tmp_path, write):
    write("p.yaml", "notify: {command: x, events: [everything]}\n")
    p = run_ftrain("run", JOB, "--policy", "p.yaml", "--no-ui", cwd=tmp_path)
    assert p.returncode == 2 and "p.yaml:1: notify.events: unknown event 'everything'" in p.stderr
    assert "Traceback" not in p.stderr
