"""Warm restarts (ftrain.warm): the next attempt's interpreter is started early with the
script's imports done, and runs the script as `python script.py` would; and a hung script
that cannot use the grace period does not get it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import events, of, run_ftrain

from ftrain.process import Child
from ftrain.warm import SPARE, Spare

POLICY = """
version: 1
max_restarts: 4
grace: 2s
backoff: 0s
warm_start: WARM
detect: {hang: {timeout: 30s, startup: 60s}}
rules:
  - when: [segfault, killed, exit_nonzero, hang]
    action: restart
  - when: exception
    action: stop
"""

# A third-party-looking package outside the script's folder: it notes, at import, which
# process imported it and which attempt that process was then (none: imported ahead).
HEAVY = """
import os, sys, time, types
time.sleep(0.3)
ops = types.ModuleType(__name__ + "_ops")   # as torch.ops: a module whose __file__ is a bare name
ops.__file__ = "_ops.py"
sys.modules[ops.__name__] = ops
with open(os.environ["WARM_TEST_LOG"], "a") as f:
    f.write(f"{__name__} {os.getpid()} {os.environ.get('FTRAIN_ATTEMPT', '-')}\\n")
"""

SCRIPT = '''"""A shim script whose leading imports include a slow package; `lazyheavy` is imported
only inside main(), before the first step (as torch imports torch._dynamo for an optimizer)."""
from __future__ import annotations

import os
import sys

import heavy
import ftrain

LOCAL = 1


def main():
    import lazyheavy
    cfg = ftrain.config({"fail_at": {}, "touch": {}})
    attempt = os.environ["FTRAIN_ATTEMPT"]
    print(json.dumps({"attempt": attempt, "name": __name__, "argv": sys.argv, "path0": sys.path[0],
                      "pid": os.getpid(), "main_is_us": sys.modules["__main__"].__dict__ is globals(),
                      "adj": open("/proc/self/oom_score_adj").read().strip()}),
          flush=True)
    for step in range(6):
        ftrain.log(step, loss=1.0 / (step + 1))
        time.sleep(0.4)
        if step == 2 and attempt in cfg["touch"]:     # as if the user edited a library now
            os.utime(cfg["touch"][attempt])
        if step == 3 and attempt in cfg["fail_at"]:
            how = cfg["fail_at"][attempt]
            if how == "segv":
                import ctypes
                ctypes.string_at(0)
            if how == "exception":
                raise ValueError("bad shape (3, 4) at step 3")
            if how == "exit":
                sys.exit(7)
            if how == "oom-kill-the-spare":   # as the kernel's OOM killer would, by its score
                import signal
                for _ in range(200):           # among our supervisor's children only
                    spares = [pid for pid in _children(os.getppid()) if pid != os.getpid() and _adj(pid) == "1000"]
                    if spares:
                        break
                    time.sleep(0.05)
                for pid in spares:
                    os.kill(pid, signal.SIGKILL)
                while any(_adj(pid) is not None and not _zombie(pid) for pid in spares):
                    time.sleep(0.01)           # dead before we crash, as an OOM kill would be
                print(json.dumps({"spares_killed": len(spares)}), flush=True)
                import ctypes
                ctypes.string_at(0)


def _adj(pid):
    try:
        with open(f"/proc/{pid}/oom_score_adj") as f:
            return f.read().strip()
    except OSError:
        return None


def _children(ppid):
    out = []
    for name in os.listdir("/proc"):
        try:
            with open(f"/proc/{name}/stat") as f:
                if name.isdigit() and int(f.read().rsplit(")", 1)[1].split()[1]) == ppid:
                    out.append(int(name))
        except (OSError, ValueError, IndexError):
            pass
    return out


def _zombie(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


import json
import time

if __name__ == "__main__":
    main()
'''


@pytest.fixture
def setup(tmp_path, write):
    site = tmp_path / "site"
    site.mkdir()
    (site / "heavy.py").write_text(HEAVY)
    (site / "lazyheavy.py").write_text(HEAVY)
    script_dir = tmp_path / "proj"
    script_dir.mkdir()
    script = script_dir / "train.py"
    script.write_text(SCRIPT)
    script = script.resolve()
    log = tmp_path / "imports.log"
    base_env = {"PYTHONPATH": str(site), "WARM_TEST_LOG": str(log)}

    def run(fail_at: dict, warm: str = "true", extra=(), touch: dict | None = None, env: dict | None = None):
        config = write("config.yaml", json.dumps({"fail_at": fail_at, "touch": touch or {}}))
        policy = write("policy.yaml", POLICY.replace("WARM", warm))
        run_dir = tmp_path / "run"
        p = run_ftrain("run", str(script), "--policy", str(policy), "--config", str(config), "--run-dir",
                       str(run_dir), "--no-ui", *extra, cwd=tmp_path, env={**base_env, **(env or {})}, timeout=120)
        imports = [line.split() for line in log.read_text().splitlines()] if log.exists() else []
        return p, run_dir, imports

    run.site = site
    return run, script


def _reports(p) -> list[dict]:
    return [json.loads(line) for line in p.stdout.splitlines() if line.startswith('{"attempt"')]


def _no_spare_left(script: Path) -> None:
    for proc in psutil.process_iter(["cmdline"]):
        cmd = proc.info["cmdline"] or []
        assert not (len(cmd) > 3 and cmd[1] == SPARE and str(script) in cmd), f"spare left: {proc.pid}"


def test_restart_runs_in_the_spare_with_imports_done_as_python_would(setup):
    run, script = setup
    p, run_dir, imports = run({"1": "segv", "2": "exit"})
    assert p.returncode == 0, p.stderr
    starts = of(events(run_dir), "attempt_start")
    assert [s["warm"] for s in starts] == [False, True, True]
    reports = _reports(p)
    assert [r["attempt"] for r in reports] == ["1", "2", "3"]
    for r, start in zip(reports, starts):
        # what `python script.py` gives a script: __main__, argv, its folder first on sys.path
        assert r["name"] == "__main__" and r["main_is_us"]
        assert r["argv"] == [str(script)] and r["path0"] == str(script.parent)
        assert r["pid"] == start["pid"]
    # attempt 1 imported both packages itself; the spares did it ahead, before they knew
    # their attempt, in the process that then ran it
    by_pid = {}
    for name, pid, attempt in imports:
        by_pid.setdefault(int(pid), {})[name] = attempt
    assert by_pid[reports[0]["pid"]] == {"heavy": "1", "lazyheavy": "1"}
    for r in reports[1:]:
        assert by_pid[r["pid"]] == {"heavy": "-", "lazyheavy": "-"}
    assert (run_dir / "attempts/0001/modules.txt").read_text().split().count("lazyheavy") == 1
    # a waiting spare is the OOM killer's first pick; as an attempt it has what we have
    assert {r["adj"] for r in reports} == {Path("/proc/self/oom_score_adj").read_text().strip()}
    # the spare that was never needed is gone with the run
    _no_spare_left(script)


def test_warm_attempt_reports_an_exception_like_a_cold_one(setup):
    run, script = setup
    p, run_dir, _ = run({"1": "segv", "2": "exception"})   # attempt 2 (warm) raises
    evts = events(run_dir)
    assert p.returncode == 1, p.stderr
    assert [s["warm"] for s in of(evts, "attempt_start")][-1] is True
    failure = of(evts, "failure")[-1]
    assert failure["kind"] == "exception" and failure["exit_code"] == 1
    out = (run_dir / "attempts/0002/output.log").read_text()
    tb = out[out.index("Traceback"):]
    assert tb.splitlines()[-1] == "ValueError: bad shape (3, 4) at step 3"
    assert "<string>" not in tb and "ftrain/warm" not in tb and "ftrain/spare" not in tb   # our frames are left out
    assert f'File "{script}", line' in tb
    _no_spare_left(script)


def test_a_library_edited_since_the_spare_imported_it_is_imported_again(setup):
    run, script = setup
    p, run_dir, imports = run({"1": "segv"}, touch={"1": str(run.site / "lazyheavy.py")})
    assert p.returncode == 0, p.stderr
    reports = _reports(p)
    assert [s["warm"] for s in of(events(run_dir), "attempt_start")] == [False, True]
    # the spare saw the edit and started cold in the same process: both imports are attempt 2's
    second = {name: attempt for name, pid, attempt in imports if int(pid) == reports[1]["pid"]}
    assert second == {"heavy": "2", "lazyheavy": "2"}, imports
    assert reports[1]["name"] == "__main__" and reports[1]["argv"] == [str(script)]
    log = (run_dir / "attempts/0002/output.log").read_text()   # journaled warm: it says why it is not
    assert "[ftrain] code changed since this interpreter was started ahead: starting cold" in log


def test_a_package_installed_since_the_spare_began_makes_it_start_cold(setup):
    """pip install, upgrade and uninstall change an installed-packages folder: its new time
    (as if `pip install --user` ran while attempt 1 trained) makes the spare start cold in
    place. The user site of a PYTHONUSERBASE of our own: the venv is left alone."""
    run, script = setup
    user_site = Path(subprocess.run([sys.executable, "-c", "import site; print(site.getusersitepackages())"],
                                    env={**os.environ, "PYTHONUSERBASE": str(run.site.parent / "userbase")},
                                    capture_output=True, text=True, check=True).stdout.strip())
    user_site.mkdir(parents=True)
    p, run_dir, imports = run({"1": "segv"}, touch={"1": str(user_site)},
                              env={"PYTHONUSERBASE": str(run.site.parent / "userbase")})
    assert p.returncode == 0, p.stderr
    reports = _reports(p)
    assert [s["warm"] for s in of(events(run_dir), "attempt_start")] == [False, True]
    second = {name: attempt for name, pid, attempt in imports if int(pid) == reports[1]["pid"]}
    assert second == {"heavy": "2", "lazyheavy": "2"}, imports


def test_a_spare_the_oom_killer_took_is_replaced_by_a_cold_start(setup):
    if Path("/proc/self/oom_score_adj").read_text().strip() == "1000":
        pytest.skip("every process here already has oom_score_adj 1000: a spare cannot stand out")
    run, script = setup
    p, run_dir, _ = run({"1": "oom-kill-the-spare"})
    assert p.returncode == 0, p.stderr
    assert '{"spares_killed": 1}' in p.stdout      # found by its oom_score_adj of 1000
    assert "spare interpreter was killed by SIGKILL while it waited; starting cold" in p.stderr
    assert [s["warm"] for s in of(events(run_dir), "attempt_start")] == [False, False]
    assert [f["kind"] for f in of(events(run_dir), "failure")] == ["segfault"]


STALE_PROBE = """
import os, sys, site, time
from ftrain.spare import stale
user_site = site.getusersitepackages()
os.makedirs(user_site)
os.symlink(sys.argv[1], os.path.join(user_site, "mylib"))   # flit install --symlink
sys.path.insert(0, user_site)
import mylib
began = time.time()
time.sleep(0.05)
before = stale(began)
with open(os.path.join(sys.argv[1], "__init__.py"), "a") as f:
    f.write("FIXED = True\\n")
print(before, stale(began))
"""


def test_an_edit_to_a_package_linked_into_site_packages_is_seen(tmp_path):
    src = tmp_path / "checkout" / "mylib"
    src.mkdir(parents=True)
    (src / "__init__.py").write_text("X = 1\n")
    out = subprocess.run([sys.executable, "-c", STALE_PROBE, str(src)], capture_output=True, text=True,
                         env={**os.environ, "PYTHONUSERBASE": str(tmp_path / "ub")}, cwd=tmp_path)
    assert out.stdout.split() == ["False", "True"], out.stderr


def test_warm_start_false_starts_every_attempt_cold(setup):
    run, script = setup
    p, run_dir, imports = run({"1": "segv"}, warm="false")
    assert p.returncode == 0, p.stderr
    assert [s["warm"] for s in of(events(run_dir), "attempt_start")] == [False, False]
    assert all(attempt != "-" for _, _, attempt in imports)


def test_a_spare_stands_down_when_the_environment_changed(tmp_path):
    script = tmp_path / "s.py"
    script.write_text("import os\nprint('ran', os.environ.get('FTRAIN_ATTEMPT'))\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("FTRAIN_")}
    command = (sys.executable, str(script))
    spare = Spare(command, env, tmp_path)
    pid = spare.child.pid
    assert spare.usable_for(command, {**env, "FTRAIN_ATTEMPT": "2"})          # FTRAIN_* may differ
    assert not spare.usable_for(command, {**env, "CUDA_VISIBLE_DEVICES": "1"})  # anything else not
    assert not spare.usable_for((sys.executable, str(tmp_path / "other.py")), env)
    assert spare.launch(command, {**env, "OMP_NUM_THREADS": "3"}, tmp_path / "out.log") is None
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_a_spare_launch_runs_the_script_with_the_attempts_env(tmp_path):
    script = tmp_path / "s.py"
    script.write_text("import os, sys\nprint('ran', os.environ.get('FTRAIN_ATTEMPT'), sys.argv[1:])\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("FTRAIN_")}
    spare = Spare((sys.executable, str(script)), env, tmp_path)
    time.sleep(0.3)
    script.write_text(script.read_text().replace("'ran'", "'ran as edited'"))   # a fix meanwhile: still warm
    log = tmp_path / "out.log"
    child = spare.launch((sys.executable, str(script), "--lr", "0.1"), {**env, "FTRAIN_ATTEMPT": "7"}, log)
    assert child is not None
    while child.pump(0.05):
        pass
    assert child.finish().returncode == 0
    assert log.read_text() == "ran as edited 7 ['--lr', '0.1']\n"


# What a script can see of how it was started, on stdout; a warning on stderr.
REPORT = """\"\"\"The docstring.\"\"\"
import json, os, sys, warnings
warnings.warn("an old API", DeprecationWarning)
print(json.dumps({
    "name": __name__, "file": __file__, "doc": __doc__, "argv": sys.argv, "orig_argv": sys.orig_argv,
    "path0": sys.path[0], "cwd": os.getcwd(), "package": __package__, "spec": repr(__spec__),
    "cached": __cached__, "loader": [type(__loader__).__name__, __loader__.name, __loader__.path],
    "dunders": sorted(k for k in globals() if k.startswith("__")),
    "main_is_us": sys.modules["__main__"].__dict__ is globals(),
    "ftrain": sorted(m for m in sys.modules if m.partition(".")[0] == "ftrain"),
}))
"""

# A thread and an atexit handler that pickle a class of the script after its code returned.
LATE = """
import atexit, pickle, sys, threading, time

class Config:
    pass

def late():
    time.sleep(0.2)
    print("thread", pickle.loads(pickle.dumps(Config())).__class__ is Config, flush=True)

threading.Thread(target=late).start()
atexit.register(lambda: print("atexit", sys.modules["__main__"].Config is Config, "__file__" in globals()))
"""

RAISES = """
def parse(shape):
    raise ValueError(f"bad shape {shape}")

try:
    {}["missing"]
except KeyError:
    parse((3, 4))
"""

AS_PLAIN = {
    "report": REPORT,
    "late": LATE,
    "exception": RAISES,
    "exit-3": "import sys\nsys.exit(3)\n",
    "exit-message": "import sys\nprint('out', flush=True)\nsys.exit('going: bad config')\n",
    "interrupt": "def train():\n    raise KeyboardInterrupt\n\ntrain()\n",
    "syntax-error": "import os\nx = (1,\n",
    "deleted": REPORT,
    "linked": REPORT,
}


def _run_attempt(command, env, cwd: Path, warm: bool, before=None) -> tuple[int, str, str]:
    """Run ``command`` as an attempt, cold (a plain Child) or in a spare: exit, stdout, stderr."""
    out = {False: b"", True: b""}

    def sink(data: bytes, is_err: bool) -> None:
        out[is_err] += data

    if warm:
        spare = Spare(command, env, cwd)
        time.sleep(0.3)                 # waiting, its imports done
        if before:
            before()
        child = spare.launch(command, env, cwd / "warm.log", sink)
        assert child is not None
    else:
        if before:
            before()
        child = Child(command, env=env, cwd=cwd, log_path=cwd / "cold.log", sink=sink)
    while child.pump(0.05):
        pass
    return child.finish().returncode, out[False].decode(), out[True].decode()


@pytest.mark.parametrize("case", sorted(AS_PLAIN))
def test_a_warm_attempt_is_what_python_script_py_would_be(tmp_path, case):
    """Output, warnings, tracebacks, exit status and what the script sees of its start:
    the same from a spare as from `python script.py` (run from another folder)."""
    folder = tmp_path / "proj"
    folder.mkdir()
    script = folder / "train.py"
    script.write_text(AS_PLAIN[case])
    if case == "linked":                # sys.path[0] is the real folder, __file__ the link
        (tmp_path / "elsewhere").mkdir()
        script = tmp_path / "elsewhere" / "train.py"
        script.symlink_to(folder / "train.py")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FTRAIN_", "PYTHONWARNINGS"))}
    command = (sys.executable, str(script), "--lr", "0.1")
    before = script.unlink if case == "deleted" else None
    results = []
    for warm in (False, True):
        if case == "deleted":
            script.write_text(REPORT)
        results.append(_run_attempt(command, env, tmp_path, warm, before))
    cold, warm_ = results
    if case in ("report", "linked"):   # a readable difference
        assert json.loads(warm_[1]) == json.loads(cold[1])
    assert warm_ == cold
    code, out, err = cold
    expected = {"exit-3": 3, "interrupt": -signal.SIGINT, "deleted": 2, "report": 0, "late": 0, "linked": 0}
    assert code == expected.get(case, 1), err
    if case in ("report", "linked"):
        assert "DeprecationWarning: an old API" in err
        assert json.loads(out)["path0"] == str(folder)
    if case == "late":
        assert out == "thread True\natexit True False\n"


@pytest.mark.parametrize("data", ['{"b": [1, 2], "a": null}', "{not json"])
def test_a_module_spare_runs_it_as_python_m_would(tmp_path, data):
    """The torchrun agent's way (``python -m torch.distributed.run``), shown with a module
    that is quicker to import."""
    (tmp_path / "in.json").write_text(data)
    env = {k: v for k, v in os.environ.items() if not k.startswith("FTRAIN_")}
    command = (sys.executable, "-m", "json.tool", "--sort-keys", "in.json")
    cold = _run_attempt(command, env, tmp_path, warm=False)
    assert _run_attempt(command, env, tmp_path, warm=True) == cold
    assert cold[0] == (0 if data.startswith('{"') else 1)


EARLY = """
import json, sys
early = sorted(m for m in sys.modules if m.partition(".")[0] == "ftrain")
import ftrain
print(json.dumps({"early": early, "ftrain": ftrain.__file__}))
"""


def test_a_spare_imports_nothing_of_ftrain_before_the_attempt(tmp_path):
    """Not even where the last attempt's list names it; and `ps` shows a short command
    line that names the spare's program file, not a program's text."""
    import ftrain

    script = tmp_path / "s.py"
    script.write_text(EARLY)
    modules = tmp_path / "modules.txt"
    modules.write_text("json\nftrain\nftrain.shim\nftrain.files\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("FTRAIN_")}
    command = (sys.executable, str(script))
    spare = Spare(command, env, tmp_path, modules)
    raw = Path(f"/proc/{spare.child.pid}/cmdline").read_bytes()
    cmdline = raw.decode().split("\0")[:-1]
    assert cmdline[:2] == [sys.executable, SPARE] and cmdline[3:] == [str(script), str(modules)]
    assert SPARE == str(Path(ftrain.__file__).parent / "spare.py") and Path(SPARE).is_file()
    assert len(raw) < 200 + len(str(tmp_path)) * 2, cmdline
    time.sleep(0.3)
    log = tmp_path / "out.log"
    child = spare.launch(command, env, log)
    assert child is not None
    while child.pump(0.05):
        pass
    assert child.finish().returncode == 0, log.read_text()
    report = json.loads(log.read_text())
    assert report == {"early": [], "ftrain": ftrain.__file__}


HUNG = '''
import signal, sys, time
import ftrain
for step in range(100):
    ftrain.log(step, loss=1.0)
    if ftrain.should_stop():
        ftrain.save_checkpoint({"step": step}, step)
        sys.exit(0)
    time.sleep(0.05 if step != 5 else SLEEP)
'''


@pytest.mark.parametrize("sleep, answers", [(3600, False), (3.1, True)])
def test_a_hung_script_gets_the_grace_only_if_it_answers(tmp_path, write, sleep, answers):
    """Hang timeout 2 s, grace 20 s. Stuck for good: KILL about 1 s after TERM. A step that
    was only slow logs again after the TERM: the script saves and leaves within the grace."""
    script = write("hung.py", HUNG.replace("SLEEP", str(sleep)))
    policy = write("p.yaml", "version: 1\nmax_restarts: 0\ngrace: 20s\ndetect: {hang: {timeout: 2s, startup: 30s}}\n"
                   "rules: [{when: hang, action: restart}]\n")
    run_dir = tmp_path / "run"
    t0 = time.monotonic()
    p = run_ftrain("run", str(script), "--policy", str(policy), "--run-dir", str(run_dir), "--no-ui", cwd=tmp_path,
                   timeout=60)
    elapsed = time.monotonic() - t0
    evts = events(run_dir)
    failure = of(evts, "failure")[0]
    assert failure["kind"] == "hang" and p.returncode == 1
    stop_took = failure["t"] - of(evts, "anomaly")[0]["t"]
    if answers:
        assert failure["exit_code"] == 0 and (run_dir / "checkpoints/step-00000006.pt").exists()
    else:
        assert failure["signal"] == "SIGKILL"
        assert stop_took < 4.0 and elapsed < 15, (stop_took, elapsed)   # not the 20 s grace


OWN_HANDLER = '''
import os, signal, sys, time

def on_term(signum, frame):       # the script's own handler: "saves" for 2 s, then leaves
    time.sleep(2.0)
    with open("saved-by-own-handler", "w") as f:
        f.write("ok")
    os._exit(0)

signal.signal(signal.SIGTERM, on_term)
import ftrain
for step in range(100):
    ftrain.log(step, loss=1.0)
    time.sleep(0.05 if step != 5 else 3600)
'''


def test_a_hung_script_with_its_own_term_handler_keeps_the_grace(tmp_path, write):
    script = write("own.py", OWN_HANDLER)
    policy = write("p.yaml", "version: 1\nmax_restarts: 0\ngrace: 20s\ndetect: {hang: {timeout: 2s, startup: 30s}}\n"
                   "rules: [{when: hang, action: restart}]\n")
    run_dir = tmp_path / "run"
    p = run_ftrain("run", str(script), "--policy", str(policy), "--run-dir", str(run_dir), "--no-ui", cwd=tmp_path,
                   timeout=60)
    failure = of(events(run_dir), "failure")[0]
    assert failure["kind"] == "hang" and p.returncode == 1
    assert failure["exit_code"] == 0 and (tmp_path / "saved-by-own-handler").read_text() == "ok"


WAITS = """
import os, sys, time
import ftrain
ftrain.log(0, loss=1.0)
deadline = time.monotonic() + 30
while not os.path.exists("go") and time.monotonic() < deadline:
    time.sleep(0.05)
"""


def test_ps_shows_the_spare_of_a_real_run_as_a_short_command_line(tmp_path):
    """While an attempt of `ftrain run` trains, its spare waits beside it: /proc/PID/cmdline
    and `ps` show `python …/ftrain/spare.py FD SCRIPT MODULES_TXT`, a line a person can read
    (no program text, no environment), and it is gone when the run ends."""
    from conftest import ftrain_cmd

    script = tmp_path / "train.py"
    script.write_text(WAITS)
    env = {k: v for k, v in os.environ.items() if not k.startswith("FTRAIN_")}
    supervisor = subprocess.Popen(ftrain_cmd("run", str(script), "--run-dir", "run", "--no-ui"), cwd=tmp_path,
                                  env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline, spare = time.monotonic() + 30, None
        while spare is None and time.monotonic() < deadline and supervisor.poll() is None:
            for child in psutil.Process(supervisor.pid).children():
                pid = child.pid
                try:
                    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")[:-1]
                except OSError:
                    continue
                if cmdline[1:2] == [SPARE]:
                    spare = pid, cmdline
            time.sleep(0.05)
        assert spare is not None, "no spare started"
        pid, cmdline = spare
        assert cmdline[0] == sys.executable and cmdline[2].isdigit() and cmdline[3] == str(script), cmdline
        assert cmdline[4:] in ([], [str(tmp_path / "run" / "attempts" / "0001" / "modules.txt")]), cmdline
        ps = subprocess.run(["ps", "-ww", "-o", "args=", "-p", str(pid)], capture_output=True, text=True)
        shown = ps.stdout.strip()
        assert shown == " ".join(cmdline)
        assert len(shown) < len(sys.executable) + len(SPARE) + 2 * len(str(tmp_path)) + 60, shown
    finally:
        (tmp_path / "go").touch()
        out, _ = supervisor.communicate(timeout=30)
    assert supervisor.returncode == 0, out
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
