"""The shim (``import ftrain``, DESIGN §3), mostly through real child processes.

Children live in ``tests/children/shim_*.py`` and run with this interpreter and a prepared
environment (DESIGN §2), so signals, exit statuses and the metrics file are the real ones.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import ftrain
from ftrain import checkpoints

CHILDREN = Path(__file__).resolve().parent / "children"
OOM_MESSAGE = (
    "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.15 GiB of which 1.06 GiB "
    "is free. Including non-PyTorch memory, this process has 78.08 GiB memory in use. Of the allocated memory "
    "75.52 GiB is allocated by PyTorch, and 1.03 GiB is reserved by PyTorch but unallocated. If reserved but "
    "unallocated memory is large try setting PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to avoid "
    "fragmentation.  See documentation for Memory Management  "
    "(https://pytorch.org/docs/stable/notes/cuda.html#environment-variables)"
)


# --------------------------------------------------------------------------- helpers
def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without anything of a supervisor or of torchrun."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("FTRAIN_") and k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    env.update(extra)
    return env


class Run:
    """A run folder laid out as the supervisor lays it out, and the child environment for it."""

    def __init__(self, root: Path, config_text: str = "") -> None:
        self.root = root
        self.metrics = root / "metrics.jsonl"
        self.checkpoints = root / "checkpoints"
        self.config = root / "attempts" / "0001" / "config.yaml"
        self.checkpoints.mkdir(parents=True)
        self.config.parent.mkdir(parents=True)
        self.config.write_text(config_text)

    def env(self, **extra: str) -> dict[str, str]:
        env = {"FTRAIN_RUN_DIR": str(self.root), "FTRAIN_ATTEMPT": "1", "FTRAIN_CONFIG_PATH": str(self.config),
               "FTRAIN_METRICS_PATH": str(self.metrics), "FTRAIN_CHECKPOINT_DIR": str(self.checkpoints)}
        return clean_env(**{**env, **extra})

    def lines(self) -> list[dict[str, Any]]:
        if not self.metrics.exists():
            return []
        return [json.loads(line) for line in self.metrics.read_text().splitlines()]

    def steps(self) -> dict[int, dict[str, Any]]:
        return {r["step"]: r for r in self.lines() if "ftrain" not in r}

    def controls(self, event: str) -> list[dict[str, Any]]:
        return [r for r in self.lines() if r.get("ftrain") == event]


@pytest.fixture
def run(tmp_path: Path) -> Run:
    return Run(tmp_path / "run")


def child(script: str, *args: str, env: dict[str, str], cwd: Path | None = None,
          timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(CHILDREN / script), *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


def spawn(script: str, *args: str, env: dict[str, str], stderr_path: Path) -> subprocess.Popen[str]:
    err = open(stderr_path, "w")
    try:
        return subprocess.Popen([sys.executable, str(CHILDREN / script), *args], env=env,
                                stdout=subprocess.PIPE, stderr=err, text=True)
    finally:
        err.close()


def wait_for(condition: Callable[[], bool], timeout: float = 15.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def finish(proc: subprocess.Popen[str], timeout: float = 20.0) -> int:
    try:
        return proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# --------------------------------------------------------------------------- surface and import
def test_public_surface() -> None:
    assert ftrain.__all__ == ["config", "is_supervised", "load_checkpoint", "log", "save_checkpoint",
                              "should_skip", "should_stop", "snapshot", "timed"]
    assert all(callable(getattr(ftrain, name)) for name in ftrain.__all__)
    assert ftrain.__version__ == "0.1.0"


@pytest.mark.parametrize("supervised", [False, True])
def test_import_does_not_load_torch_or_yaml(run: Run, supervised: bool) -> None:
    code = ("import sys, json, ftrain; "
            "print(json.dumps({m: m in sys.modules for m in ('torch', 'yaml', 'numpy', 'hashlib')}))")
    env = run.env(FTRAIN_INJECT="oom@5") if supervised else clean_env()
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"torch": False, "yaml": False, "numpy": False, "hashlib": False}


@pytest.mark.parametrize("inject", ["", "oom@5"])
def test_a_supervised_import_loads_only_what_it_needs(run: Run, inject: str) -> None:
    """Not even typing (milliseconds of its own), nor the checkpoint writer or the fault
    firing: those wait for a save or a fault due."""
    code = ("import sys, json; before = set(sys.modules); import ftrain; "
            "print(json.dumps(sorted(set(sys.modules) - before)))")
    out = subprocess.run([sys.executable, "-c", code], env=run.env(FTRAIN_INJECT=inject), capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    loaded = set(json.loads(out.stdout))
    assert {"ftrain.shim", "ftrain.shim.metrics", "ftrain.shim.signals"} <= loaded
    assert not loaded & {"typing", "ftrain.shim.writer", "ftrain.shim.faults", "ftrain.files", "ftrain.ckptfmt"}


def test_a_supervised_import_arms_the_shim_before_any_call(run: Run) -> None:
    """DESIGN §3: on import under the supervisor, SIGUSR1 dumps the stacks (a hang during
    set-up, before the script's first ftrain call, is not killed by it) and SIGTERM asks to stop."""
    code = ("import os, signal, time, ftrain; os.kill(os.getpid(), signal.SIGUSR1); time.sleep(0.2); "
            "print('survived', signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, None))")
    out = subprocess.run([sys.executable, "-c", code], env=run.env(), capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["survived", "True"]
    assert "most recent call first" in out.stderr


def test_ftrain_run_does_not_load_the_shim() -> None:
    code = "import sys, ftrain.runs; print('ftrain.shim' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], env=clean_env(), capture_output=True, text=True, timeout=30)
    assert out.stdout.split() == ["False"], out.stderr


# --------------------------------------------------------------------------- unsupervised
def test_unsupervised_everything_works_and_writes_nothing(tmp_path: Path) -> None:
    out = child("shim_values.py", env=clean_env(), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result == {"config": {"train": {"batch_size": 32, "lr": 0.1, "amp": True}, "name": "default"},
                      "skip": [], "supervised": False, "resume": None}
    assert list(tmp_path.iterdir()) == []


def test_unsupervised_in_process_calls_are_cheap_no_ops() -> None:
    if ftrain.is_supervised():
        pytest.skip("this test process itself runs under ftrain")
    defaults = {"a": {"b": [1, 2]}}
    cfg = ftrain.config(defaults)
    assert cfg == defaults and cfg["a"] is not defaults["a"] and cfg["a"]["b"] is not defaults["a"]["b"]
    assert ftrain.config() == {}
    ftrain.log(3, loss=1.0)
    assert not ftrain.should_skip(3)
    assert not ftrain.should_stop()
    assert ftrain.load_checkpoint() is None


# --------------------------------------------------------------------------- supervised: lines
def test_supervised_lines_config_digest_skip_and_values(tmp_path: Path) -> None:
    config_text = "train:\n  batch_size: 16\n  grad_accum: 2\nname: tuned\n"
    run = Run(tmp_path / "run", config_text)
    before = time.time()
    out = child("shim_values.py", "--torch", "--save", env=run.env(FTRAIN_SKIP_STEPS="3-5, 10,18-19"))
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    # the config file wins, mappings merge key by key
    assert result["config"] == {"train": {"batch_size": 16, "lr": 0.1, "amp": True, "grad_accum": 2},
                                "name": "tuned"}
    assert result["skip"] == [3, 4, 5, 10, 18, 19]
    assert result["supervised"] is True and result["resume"] is None

    lines = run.lines()
    assert lines[0] == {"ftrain": "config", "step": None, "t": lines[0]["t"], "attempt": 1,
                        "digest": hashlib.sha256(config_text.encode()).hexdigest(), "path": str(run.config),
                        "defaults": {"train": {"batch_size": 32, "lr": 0.1, "amp": True}, "name": "default"}}
    line = run.steps()[1]
    assert before <= line["t"] <= time.time() and line["attempt"] == 1
    assert math.isnan(line["nan"]) and line["inf"] == math.inf and line["ninf"] == -math.inf
    assert line["tensor"] == 0.25 and line["np32"] == 1.5 and line["np64"] == 2.5
    assert line["npint"] == 7 and line["npbool"] is True and line["flag"] is True and line["count"] == 3
    assert line["name"] == "warmup" and line["long"] == "x" * 256
    # every line is one os.write: whole lines only
    assert run.metrics.read_bytes().endswith(b"\n")

    # the save: control lines around it, a verified checkpoint, the last log's metrics in it
    assert result["saved"] == str(run.checkpoints / "step-00000005.pt")
    start, = run.controls("save_start")
    end, = run.controls("save_end")
    assert start["step"] == end["step"] == 5 and end["path"] == result["saved"]
    assert lines.index(start) < lines.index(end)
    ckpt, = checkpoints.scan(run.checkpoints)
    assert ckpt.status is checkpoints.CheckpointStatus.OK and ckpt.step == 5 and ckpt.attempt == 1
    assert ckpt.metrics["tensor"] == 0.25 and math.isnan(ckpt.metrics["nan"])
    assert ftrain.load_checkpoint(result["saved"]) == {"w": [0.0, 0.0, 0.0]}

    # the next attempt resumes from it
    again = child("shim_values.py", env=run.env(FTRAIN_RESUME_FROM=result["saved"], FTRAIN_ATTEMPT="2"))
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["resume"] == ["w"]


def test_log_rejects_what_it_cannot_write(run: Run) -> None:
    code = ("import ftrain\n"
            "for bad in ({'loss': [1, 2]}, {'t': 1.0}, {'loss': object()}):\n"
            "    try:\n"
            "        ftrain.log(1, **bad)\n"
            "    except (TypeError, ValueError) as exc:\n"
            "        print(type(exc).__name__, exc)\n")
    out = subprocess.run([sys.executable, "-c", code], env=run.env(), capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    reports = out.stdout.splitlines()
    assert reports[0].startswith("TypeError ftrain.log: metric 'loss' is a list")
    assert reports[1].startswith("ValueError ftrain.log: the metric names")
    assert reports[2].startswith("TypeError ftrain.log: metric 'loss' is a object")
    assert run.steps() == {}


def test_bad_skip_spec_fails_loudly(run: Run) -> None:
    out = subprocess.run([sys.executable, "-c", "import ftrain; ftrain.should_skip(1)"],
                         env=run.env(FTRAIN_SKIP_STEPS="10-5"), capture_output=True, text=True, timeout=30)
    assert out.returncode == 1
    assert "FTRAIN_SKIP_STEPS='10-5': range '10-5' ends before it starts" in out.stderr


@pytest.mark.parametrize("rank", ["0", "1"])
def test_under_several_ranks_only_rank_zero_writes_and_every_rank_beats(run: Run, rank: str) -> None:
    out = child("shim_values.py", *(["--save"] if rank == "1" else []),
                env=run.env(RANK=rank, LOCAL_RANK=rank, WORLD_SIZE="2"))
    assert out.returncode == 0, out.stderr
    assert (run.root / "heartbeat" / f"rank-{rank}").is_file()
    result = json.loads(out.stdout)
    if rank == "0":
        assert 1 in run.steps() and run.controls("config")
    else:
        assert run.lines() == [] and result["saved"] is None
        assert list(run.checkpoints.iterdir()) == []


def test_log_cost(run: Run, record_property: Callable[[str, object], None]) -> None:
    out = child("shim_bench.py", "20000", env=run.env())
    assert out.returncode == 0, out.stderr
    median_us = float(out.stdout)
    record_property("log_median_us", median_us)
    print(f"ftrain.log median: {median_us:.2f} µs per call (3 float metrics)")
    assert len(run.steps()) == 20000
    assert median_us < 100


# --------------------------------------------------------------------------- supervised: signals
@pytest.mark.parametrize("sig, save", [(signal.SIGTERM, True), (signal.SIGUSR2, False)])
def test_stop_signal_to_a_cooperating_child(run: Run, tmp_path: Path, sig: signal.Signals, save: bool) -> None:
    args = ["--steps", "0", "--sleep", "0.02", "--cooperate"] + (["--save-on-stop"] if save else [])
    proc = spawn("shim_train.py", *args, env=run.env(), stderr_path=tmp_path / "err")
    try:
        wait_for(lambda: len(run.steps()) >= 3, what="three steps")
        proc.send_signal(sig)
        assert finish(proc) == 0, (tmp_path / "err").read_text()
    finally:
        finish(proc)
    assert proc.stdout is not None and "stopped at step" in proc.stdout.read()
    stop, = run.controls("stop_requested")
    assert stop["signal"] == sig.name and stop["cooperative"] is True
    assert stop["step"] in run.steps() and stop["attempt"] == 1
    if save:
        ckpt, = checkpoints.scan(run.checkpoints)
        assert ckpt.status is checkpoints.CheckpointStatus.OK and ckpt.step >= stop["step"]


def test_sigterm_to_a_non_cooperating_child_kills_it(run: Run, tmp_path: Path) -> None:
    proc = spawn("shim_train.py", "--steps", "0", "--sleep", "0.02", env=run.env(), stderr_path=tmp_path / "err")
    try:
        wait_for(lambda: len(run.steps()) >= 2, what="two steps")
        proc.send_signal(signal.SIGTERM)
        assert finish(proc) == -signal.SIGTERM
    finally:
        finish(proc)
    stop, = run.controls("stop_requested")
    assert stop["signal"] == "SIGTERM" and stop["cooperative"] is False


def test_sigusr1_dumps_python_stacks_and_the_child_lives_on(run: Run, tmp_path: Path) -> None:
    err = tmp_path / "err"
    proc = spawn("shim_train.py", "--steps", "0", "--sleep", "0.02", env=run.env(), stderr_path=err)
    try:
        wait_for(lambda: len(run.steps()) >= 2, what="two steps")
        proc.send_signal(signal.SIGUSR1)
        wait_for(lambda: "shim_train.py" in err.read_text(), what="a stack dump")
        seen = len(run.steps())
        wait_for(lambda: len(run.steps()) > seen + 2, what="more steps after the dump")
        assert proc.poll() is None
        dump = err.read_text()
        assert "most recent call first" in dump and 'in main' in dump
    finally:
        proc.kill()
        finish(proc)


def test_a_scripts_own_handlers_are_not_clobbered(run: Run) -> None:
    code = ("import signal\n"
            "def mine(signum, frame): pass\n"
            "signal.signal(signal.SIGTERM, mine)\n"
            "signal.signal(signal.SIGUSR2, signal.SIG_IGN)\n"
            "import ftrain\n"
            "print(signal.getsignal(signal.SIGTERM) is mine, signal.getsignal(signal.SIGUSR2) is signal.SIG_IGN)\n")
    out = subprocess.run([sys.executable, "-c", code], env=run.env(), capture_output=True, text=True, timeout=30)
    assert out.stdout.split() == ["True", "True"], out.stderr


# --------------------------------------------------------------------------- fault injection
HARD = {
    # kind: (returncode, text in stderr)
    "oom": (1, "torch.OutOfMemoryError: " + OOM_MESSAGE),
    "cuda": (1, "torch.AcceleratorError: CUDA error: an illegal memory access was encountered\n"
                "CUDA kernel errors might be asynchronously reported at some other API call"),
    "nccl": (1, "torch.distributed.DistBackendError: NCCL error in: "),
    "exc": (1, "RuntimeError: ftrain --inject: exception at step 3"),
    "segv": (-signal.SIGSEGV, "Fatal Python error: Segmentation fault"),
    "abort": (-signal.SIGABRT, "Fatal Python error: Aborted"),
    "kill": (-signal.SIGKILL, ""),
}


@pytest.mark.parametrize("kind", sorted(HARD))
def test_inject_hard_fault_is_real_and_announced_first(run: Run, kind: str) -> None:
    code, text = HARD[kind]
    out = child("shim_train.py", "--steps", "6", env=run.env(FTRAIN_INJECT=f"{kind}@3"))
    assert out.returncode == code, out.stderr
    assert text in out.stderr
    if kind == "nccl":
        assert "ncclUnhandledCudaError: Call to CUDA function failed." in out.stderr
    lines = run.lines()
    # the steps before the fault completed; the announcement is the last line, the step never finished
    assert [r["step"] for r in lines if "ftrain" not in r] == [0, 1, 2]
    assert lines[-1] == {"ftrain": "inject", "step": 3, "t": lines[-1]["t"], "attempt": 1, "fault": kind, "at": 3}


def test_inject_nan_and_spike_change_the_logged_values(run: Run) -> None:
    out = child("shim_train.py", "--steps", "8", env=run.env(FTRAIN_INJECT="nan@3,spike@5"))
    assert out.returncode == 0, out.stderr
    steps = run.steps()
    assert sorted(steps) == list(range(8))
    assert math.isnan(steps[3]["loss"]) and steps[3]["lr"] == 0.1
    assert steps[5]["loss"] == pytest.approx(1000 * 2.0 / 6)
    assert steps[4]["loss"] == pytest.approx(2.0 / 5) and steps[6]["loss"] == pytest.approx(2.0 / 7)
    lines = run.lines()
    nan_at, spike_at = (next(i for i, r in enumerate(lines) if r.get("fault") == k) for k in ("nan", "spike"))
    assert lines.index(steps[3]) == nan_at + 1 and lines.index(steps[5]) == spike_at + 1


def test_inject_term_is_a_stop_request(run: Run) -> None:
    out = child("shim_train.py", "--steps", "10", "--cooperate", env=run.env(FTRAIN_INJECT="term@3"))
    assert out.returncode == 0, out.stderr
    assert "stopped at step 3" in out.stdout
    events = [r.get("ftrain") for r in run.lines() if "ftrain" in r]
    assert events == ["inject", "stop_requested"]


def test_inject_hang_blocks_and_still_shows_its_stack(run: Run, tmp_path: Path) -> None:
    err = tmp_path / "err"
    proc = spawn("shim_train.py", "--steps", "0", "--sleep", "0.01", env=run.env(FTRAIN_INJECT="hang@3"),
                 stderr_path=err)
    try:
        wait_for(lambda: any(r.get("fault") == "hang" for r in run.lines()), what="the hang")
        time.sleep(0.3)
        assert proc.poll() is None and max(run.steps()) == 2
        proc.send_signal(signal.SIGUSR1)
        wait_for(lambda: "in raise_fault" in err.read_text(), what="a stack dump")
        proc.send_signal(signal.SIGTERM)   # the script never cooperated: TERM ends it
        assert finish(proc) == -signal.SIGTERM
    finally:
        finish(proc)


def test_each_fault_fires_once_even_when_the_script_survives_it(run: Run) -> None:
    out = child("shim_train.py", "--steps", "10", "--catch", env=run.env(FTRAIN_INJECT="exc@5,exc@3,nan@7"))
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["caught at step 3: RuntimeError", "caught at step 5: RuntimeError",
                                       "finished 10 steps"]
    assert [(r["fault"], r["at"]) for r in run.controls("inject")] == [("exc", 3), ("exc", 5), ("nan", 7)]
    steps = run.steps()
    assert sorted(steps) == [0, 1, 2, 4, 6, 7, 8, 9] and math.isnan(steps[7]["loss"])


def test_a_fault_already_passed_fires_at_the_first_step_logged(run: Run) -> None:
    out = child("shim_train.py", "--steps", "3", env=run.env(FTRAIN_INJECT="exc@0"))
    assert out.returncode == 1 and "exception at step 0" in out.stderr


# --------------------------------------------------------------------------- non-blocking save
def test_non_blocking_save_snapshots_the_state_now(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if ftrain.is_supervised():
        pytest.skip("this test process itself runs under ftrain")
    import torch

    monkeypatch.chdir(tmp_path)
    weights = torch.zeros(1 << 20)
    state = {"model": {"w": weights}, "history": [torch.ones(2)], "step": 7}
    path = ftrain.save_checkpoint(state, 7, blocking=False, metrics={"loss": torch.tensor(1.5)})
    weights.add_(1.0)                 # training goes on while the save runs
    state["history"][0].mul_(3.0)
    loaded = ftrain.load_checkpoint(path)
    assert path == str(tmp_path / "checkpoints" / "step-00000007.pt")
    assert torch.equal(loaded["model"]["w"], torch.zeros(1 << 20))
    assert torch.equal(loaded["history"][0], torch.ones(2)) and loaded["step"] == 7
    ckpt, = checkpoints.scan(tmp_path / "checkpoints")
    assert ckpt.status is checkpoints.CheckpointStatus.OK and ckpt.metrics == {"loss": 1.5}


def test_the_next_non_blocking_save_copies_into_the_last_ones_memory(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    if ftrain.is_supervised():
        pytest.skip("this test process itself runs under ftrain")
    import torch

    monkeypatch.chdir(tmp_path)
    weights, bias = torch.zeros(1 << 18), torch.zeros(3, 4).t()    # bias: not contiguous
    state = {"model": {"w": weights, "b": bias}, "extra": [torch.zeros(5)]}
    paths, kept = [], []
    for step in range(3):
        paths.append(ftrain.save_checkpoint(state, step, blocking=False))
        snapshot = ftrain.shim._st.last_snapshot
        kept.append(snapshot["model"]["w"].data_ptr())
        assert snapshot["model"]["w"].data_ptr() != weights.data_ptr()   # a copy, never the live tensor
        weights.add_(1.0)
        bias.add_(2.0)
        state["extra"][0].add_(3.0)
        if step == 1:
            state["extra"].append(torch.zeros(7))   # a new tensor: fresh memory, the rest reused
    ftrain.shim._wait_for_save(raise_error=True)
    assert kept[1] == kept[0] and kept[2] == kept[0]
    for step, path in enumerate(paths):
        loaded = ftrain.load_checkpoint(path)
        assert torch.equal(loaded["model"]["w"], torch.full((1 << 18,), float(step)))
        assert torch.equal(loaded["model"]["b"], torch.full((4, 3), 2.0 * step))
        assert torch.equal(loaded["extra"][0], torch.full((5,), 3.0 * step))
    assert len(ftrain.load_checkpoint(paths[2])["extra"]) == 2
    assert all(c.status is checkpoints.CheckpointStatus.OK for c in checkpoints.scan(tmp_path / "checkpoints"))
