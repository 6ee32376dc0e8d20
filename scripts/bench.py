"""Measure ftrain against its budgets (DESIGN §9), side by side with torchrun where both do
the same work. Run: ``python scripts/bench.py [--quick] [--only NAME ...] [--json FILE]``.

Each figure prints as ``name: value (budget …) [peer: …]``. Nothing here is a test: the
numbers depend on the machine; they go into the README and the closing notes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
RESULTS: dict[str, Any] = {}

CRASH_SH = """#!/bin/sh
# One attempt of a crashing job: stamp the start, stamp the end, exit 1. The attempt is
# ftrain's number or torchrun's restart count (ranks of one attempt share it).
A="${FTRAIN_ATTEMPT:-}${TORCHELASTIC_RESTART_COUNT:-}"
echo "start $(date +%s.%N) $A" >> "$STAMPS"
echo "end $(date +%s.%N) $A" >> "$STAMPS"
exit 1
"""

RESTART_POLICY = """
version: 1
max_restarts: {n}
no_progress: 1000
backoff: 0s
detect: {{hang: false, spike: {{}}, nonfinite: []}}
rules:
  - when: [exit_nonzero, exception, segfault, aborted, killed]
    action: restart
"""


def report(name: str, value: Any, unit: str = "", budget: str = "", peer: str = "") -> None:
    RESULTS[name] = value
    text = f"{value:.3g}" if isinstance(value, float) else str(value)
    line = f"{name}: {text}{(' ' + unit) if unit else ''}"
    if budget:
        line += f"  (budget {budget})"
    if peer:
        line += f"  [{peer}]"
    print(line, flush=True)


def gaps_from(stamps: Path) -> list[float]:
    """Child exit → next child start, from the stamps each attempt wrote: with several
    ranks, the last exit of an attempt → the first start of the next."""
    starts: dict[str, float] = {}
    ends: dict[str, float] = {}
    for line in stamps.read_text().splitlines():
        kind, t, *attempt = line.split()
        key = attempt[0] if attempt else ""
        if kind == "start":
            starts[key] = min(starts.get(key, math.inf), float(t))
        else:
            ends[key] = max(ends.get(key, 0.0), float(t))
    order = sorted(starts, key=starts.get)
    return [starts[b] - ends[a] for a, b in zip(order, order[1:]) if a in ends]


def peak_rss(proc: subprocess.Popen, only_self: bool = True) -> Callable[[], float]:
    """Sample a process's resident memory until it exits; returns a getter for the peak MiB."""
    import threading

    peak = [0.0]

    def sample() -> None:
        try:
            p = psutil.Process(proc.pid)
            while proc.poll() is None:
                peak[0] = max(peak[0], p.memory_info().rss / 2**20)
                time.sleep(0.01)
        except psutil.Error:
            pass

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    return lambda: (thread.join(5), peak[0])[1]


def bench_restart_gap(tmp: Path, n: int) -> None:
    """ftrain's restart gap and resident memory vs torchrun --max-restarts on the same script."""
    script = tmp / "crash.sh"
    script.write_text(CRASH_SH)
    script.chmod(0o755)
    policy = tmp / "restart.yaml"
    policy.write_text(RESTART_POLICY.format(n=n))
    env = {**os.environ, "STAMPS": str(tmp / "ftrain.stamps")}
    proc = subprocess.Popen([PY, "-m", "ftrain", "run", str(script), "--policy", str(policy), "--no-ui",
                             "--run-dir", str(tmp / "gap-run")], env=env, cwd=tmp,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    peak = peak_rss(proc)
    proc.wait()
    gaps = gaps_from(tmp / "ftrain.stamps")
    ftrain_rss = peak()

    env["STAMPS"] = str(tmp / "torchrun.stamps")
    torchrun = shutil.which("torchrun") or str(Path(PY).with_name("torchrun"))
    peer = "torchrun not installed"
    t_gaps: list[float] = []
    t_rss = 0.0
    if Path(torchrun).exists():
        proc = subprocess.Popen([torchrun, "--standalone", "--nproc-per-node", "1", f"--max-restarts={n}",
                                 "--monitor-interval", "0.1", "--no-python", str(script)],
                                env=env, cwd=tmp, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        peak_t = peak_rss(proc)
        proc.wait()
        t_gaps = gaps_from(tmp / "torchrun.stamps")
        t_rss = peak_t()
    med = statistics.median(gaps) * 1000
    if t_gaps:
        t_med = statistics.median(t_gaps) * 1000
        peer = f"torchrun --max-restarts: {t_med:.1f} ms, {t_med / med:.1f}x slower"
    report("restart_gap_median_ms", med, "ms", "<= 25 ms", peer)
    report("restart_gap_p90_ms", sorted(gaps)[int(0.9 * (len(gaps) - 1))] * 1000, "ms")
    report("supervisor_rss_peak_mib", ftrain_rss, "MiB", "<= 60 MiB",
           f"torchrun agent: {t_rss:.0f} MiB" if t_rss else "")


RANK_PY = """
# A rank of a crashing two-rank job: stamp the start, log a step (rank 0: the run is under
# way), train a while, stamp the end, exit 1. No torch import: the gap is the launchers'.
import os, sys, time
A = os.environ.get("FTRAIN_ATTEMPT", "") + os.environ.get("TORCHELASTIC_RESTART_COUNT", "")
with open(os.environ["STAMPS"], "a") as f:
    f.write(f"start {time.time()} {A}\\n")
import ftrain
if os.environ.get("RANK") == "0":
    ftrain.log(0, loss=1.0)
time.sleep(float(os.environ["HOLD"]))
with open(os.environ["STAMPS"], "a") as f:
    f.write(f"end {time.time()} {A}\\n")
sys.exit(1)
"""


def bench_dist_restart_gap(tmp: Path, n: int) -> None:
    """Two ranks through torchrun: ftrain's restart (a new torchrun agent for each attempt,
    warm or cold) vs torchrun's own --max-restarts (its agent stays), same rank script."""
    torchrun = shutil.which("torchrun") or str(Path(PY).with_name("torchrun"))
    if not Path(torchrun).exists():
        print("dist_restart_gap: torchrun not installed")
        return
    script = tmp / "rank.py"
    script.write_text(RANK_PY)
    medians = {}
    for warm in ("true", "false"):
        policy = tmp / f"restart-{warm}.yaml"
        policy.write_text(RESTART_POLICY.format(n=n) + f"warm_start: {warm}\n")
        stamps = tmp / f"ftrain-{warm}.stamps"
        env = {**os.environ, "STAMPS": str(stamps), "HOLD": "4"}   # time for a spare to get ready
        subprocess.run([PY, "-m", "ftrain", "run", str(script), "--nproc-per-node", "2", "--policy", str(policy),
                        "--no-ui", "--run-dir", str(tmp / f"dist-run-{warm}")], env=env, cwd=tmp,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        gaps = gaps_from(stamps)
        medians[warm] = statistics.median(gaps) * 1000 if gaps else math.nan
    env = {**os.environ, "STAMPS": str(tmp / "torchrun.stamps"), "HOLD": "0.5"}
    subprocess.run([torchrun, "--standalone", "--nproc-per-node", "2", f"--max-restarts={n}",
                    "--monitor-interval", "0.1", str(script)],
                   env=env, cwd=tmp, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t_gaps = gaps_from(tmp / "torchrun.stamps")
    t_med = statistics.median(t_gaps) * 1000 if t_gaps else math.nan
    report("dist_restart_gap_median_ms", medians["true"], "ms", "",
           f"2 ranks, {n} restarts; cold (warm_start: false) {medians['false']:.0f} ms; "
           f"torchrun --max-restarts: {t_med:.0f} ms")


RANKS_PY = """
import os, sys, time
import torch, torch.distributed as dist
from torch import nn
import ftrain

def stamp(what):
    with open(os.environ["STAMPS"], "a") as f:
        f.write(f"{what} {time.time():.6f} {os.environ.get('FTRAIN_ATTEMPT', '-')} {os.environ['RANK']}\\n")

dist.init_process_group("gloo")
rank = dist.get_rank()
model = nn.parallel.DistributedDataParallel(nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1)))
opt = torch.optim.SGD(model.parameters(), lr=0.05)
state = ftrain.load_checkpoint()
start = state["step"] + 1 if state else 0
die = int(os.environ.get("DIE_AT", "-1")) if os.environ.get("FTRAIN_ATTEMPT", "1") == "1" else -1
for step in range(start, int(os.environ.get("STEPS", "30"))):
    if step == die and rank == 1:
        stamp("death")
        os.kill(os.getpid(), 11)
    x = torch.randn(16, 8)
    loss = model(x).pow(2).mean()
    opt.zero_grad(); loss.backward(); opt.step()
    if step == start:
        stamp("first")
    time.sleep(0.02)
    ftrain.log(step, loss=loss.detach())
    if step % 5 == 4:
        ftrain.save_checkpoint({"step": step}, step)
dist.destroy_process_group()
"""

RANKS_POLICY = """
version: 1
max_restarts: 2
backoff: 0s
warm_start: {warm}
detect: {{hang: {{timeout: 60s, startup: 120s}}}}
rules:
  - when: [segfault, exit_nonzero, exception, killed, aborted]
    action: restart
"""


def _stamps(path: Path) -> list[tuple[str, float, str, str]]:
    out = []
    for line in path.read_text().splitlines() if path.exists() else []:
        what, t, attempt, rank = line.split()
        out.append((what, float(t), attempt, rank))
    return out


def _server_rss(proc: subprocess.Popen) -> Callable[[], list[float]]:
    """Sample, while ``proc`` runs, the RSS (MiB) of its warm ranks server while it waits
    (``spare.py --ranks``, before it forked a rank); returns a function that stops and gives
    the samples."""
    import threading

    samples: list[float] = []
    done = threading.Event()

    def loop() -> None:
        while not done.is_set():
            try:
                for p in psutil.Process(proc.pid).children():
                    if "--ranks" in p.cmdline()[2:3] and not p.children():
                        samples.append(p.memory_info().rss / 2**20)
            except psutil.Error:
                pass
            time.sleep(0.05)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()

    def stop() -> list[float]:
        done.set()
        thread.join()
        return samples
    return stop


# The step rank 1 dies at: some 5 s after the first, so that what ftrain readies for the next
# attempt once the first step is seen (a warm agent, warm ranks: seconds of imports at low
# priority) is ready, as it is for a job that fails minutes in.
DIE_AT = 200


def bench_ranks(tmp: Path, n: int) -> None:
    """Two ranks (DDP, gloo on CPU) under ftrain; rank 1 dies by SIGSEGV at step DIE_AT of attempt
    1. Rank death → decision (journal) and rank death → the restarted job's first step, ftrain
    warm (warm ranks and a warm torchrun agent) and cold, against a cold torchrun start →
    first step; the waiting warm ranks server's memory, per rank."""
    torchrun = shutil.which("torchrun") or str(Path(PY).with_name("torchrun"))
    script = tmp / "ranks.py"
    script.write_text(RANKS_PY)
    env0 = {k: v for k, v in os.environ.items() if not k.startswith("FTRAIN_")}
    env0["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env0.get("PYTHONPATH", "")) if p)
    results: dict[str, dict[str, list[float]]] = {}
    waiting_rss: list[float] = []
    warm_ranks_runs = 0
    for warm in ("true", "false"):
        rows = results.setdefault(warm, {"decide": [], "first": []})
        for i in range(n):
            policy = tmp / f"p-{warm}.yaml"
            policy.write_text(RANKS_POLICY.format(warm=warm))
            stamps = tmp / f"s-{warm}-{i}"
            run = tmp / f"run-{warm}-{i}"
            proc = subprocess.Popen([PY, "-m", "ftrain", "run", str(script), "--nproc-per-node", "2", "--policy",
                                     str(policy), "--no-ui", "--run-dir", str(run)], cwd=tmp,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                    env={**env0, "STAMPS": str(stamps), "DIE_AT": str(DIE_AT),
                                         "STEPS": str(DIE_AT + 4)})
            sampled = _server_rss(proc)
            proc.wait(timeout=300)
            rss = sampled()
            if rss:
                waiting_rss.append(max(rss))
            st = _stamps(stamps)
            death = next((t for w, t, a, _ in st if w == "death"), None)
            first = min((t for w, t, a, _ in st if w == "first" and a == "2"), default=None)
            journal = [json.loads(line) for line in (run / "journal.jsonl").read_text().splitlines()]
            decided = [e["t"] for e in journal if e["event"] == "decision"]
            warm_ranks_runs += any(e["event"] == "attempt_start" and e.get("warm_ranks") for e in journal)
            if death is None or first is None or not decided:
                print(f"ranks: run {warm}/{i} did not restart as planned")
                continue
            rows["decide"].append(decided[0] - death)
            rows["first"].append(first - death)
    cold_start: list[float] = []
    for i in range(n):
        stamps = tmp / f"t-{i}"
        began = time.time()
        subprocess.run([torchrun, "--standalone", "--nproc-per-node", "2", "--monitor-interval", "0.1", str(script)],
                       cwd=tmp, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       env={**env0, "STAMPS": str(stamps), "STEPS": "2"}, timeout=300)
        firsts = [t for w, t, _, _ in _stamps(stamps) if w == "first"]
        if firsts:
            cold_start.append(min(firsts) - began)
    med = {w: {k: statistics.median(v) if v else math.nan for k, v in r.items()} for w, r in results.items()}
    t_cold = statistics.median(cold_start) if cold_start else math.nan
    report("ranks_death_to_decision_s", med["true"]["decide"], "s", "",
           f"2 ranks, {n} runs each; cold (warm_start: false) {med['false']['decide']:.2f} s")
    report("ranks_death_to_first_step_warm_s", med["true"]["first"], "s", "<= 0.5x a cold torchrun start",
           f"ftrain warm ranks ({warm_ranks_runs}/{n} runs on warm ranks; each: "
           f"{', '.join(f'{x:.2f}' for x in results['true']['first'])}); "
           f"cold {med['false']['first']:.2f} s; a cold torchrun start to first step {t_cold:.2f} s; "
           f"warm/torchrun {med['true']['first'] / t_cold:.2f}x")
    rss = statistics.median(waiting_rss) if waiting_rss else math.nan
    report("ranks_warm_waiting_rss_per_rank_mib", rss / 2, "MiB", "",
           f"one server for 2 ranks, {rss:.0f} MiB while it waits; the forked ranks share its pages")
    RESULTS["ranks_death_to_first_step_cold_s"] = med["false"]["first"]
    RESULTS["ranks_torchrun_cold_start_s"] = t_cold


def bench_startup(tmp: Path, n: int = 7) -> None:
    """Supervisor start → child exec: `ftrain run` launched → the child's first instruction."""
    script = tmp / "stamp.sh"
    script.write_text('#!/bin/sh\necho "$(date +%s.%N)" > "$STAMP"\n')
    script.chmod(0o755)
    times = []
    for i in range(n):
        stamp = tmp / f"start-{i}"
        env = {**os.environ, "STAMP": str(stamp)}
        t0 = time.time()
        subprocess.run([PY, "-m", "ftrain", "run", str(script), "--no-ui", "--run-dir", str(tmp / f"start-run-{i}")],
                       env=env, cwd=tmp, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
        times.append(float(stamp.read_text()) - t0)
    report("start_to_child_exec_ms", statistics.median(times) * 1000, "ms", "<= 150 ms",
           f"python -c pass alone: {python_startup_ms():.0f} ms")


def python_startup_ms() -> float:
    t = []
    for _ in range(5):
        t0 = time.perf_counter()
        subprocess.run([PY, "-c", "pass"], check=True)
        t.append(time.perf_counter() - t0)
    return statistics.median(t) * 1000


def bench_log_cost(tmp: Path) -> None:
    """ftrain.log per call, 3 float metrics, supervised (writes to a real file)."""
    code = textwrap.dedent(f"""
        import os, time, statistics
        os.environ.update(FTRAIN_RUN_DIR={str(tmp)!r}, FTRAIN_METRICS_PATH={str(tmp / 'log-bench.jsonl')!r},
                          FTRAIN_ATTEMPT='1')
        import ftrain
        per = []
        for rep in range(7):
            n = 20000
            t0 = time.perf_counter()
            for i in range(n):
                ftrain.log(i, loss=2.31, lr=3e-4, grad_norm=0.87)
            per.append((time.perf_counter() - t0) / n * 1e6)
        print(statistics.median(per))
    """)
    out = subprocess.run([PY, "-c", code], capture_output=True, text=True, check=True, cwd=tmp)
    report("log_call_median_us", float(out.stdout.strip()), "µs", "<= 10 µs")


def bench_ingest(tmp: Path, lines: int = 500_000) -> None:
    """Tailer + detectors (default spec) on a file of metric lines."""
    sys.path.insert(0, str(ROOT))
    from ftrain.detect import Detectors, DetectSpec
    from ftrain.tail import Tailer

    path = tmp / "ingest.jsonl"
    with open(path, "w") as f:
        for i in range(lines):
            f.write(json.dumps({"step": i, "t": 1.7e9 + i * 0.01, "attempt": 1, "loss": 2.0 + (i % 17) * 0.01,
                                "grad_norm": 0.5 + (i % 5) * 0.01, "lr": 3e-4}) + "\n")
    tailer, det = Tailer(path), Detectors(DetectSpec.default())
    det.start_attempt(0.0)
    t0 = time.perf_counter()
    seen = 0
    while seen < lines:
        batch = tailer.read_new()
        if not batch:
            break
        for rec in batch:
            det.feed(rec, 1.0)
        seen += len(batch)
    rate = seen / (time.perf_counter() - t0)
    report("ingest_lines_per_s", rate, "lines/s", ">= 200,000")


DETECT_CHILD = """
import os, signal, sys, time
import ftrain
out = os.environ["LATENCY_OUT"]
def on_term(signum, frame):
    with open(out, "a") as f:
        f.write(f"{time.time()}\\n")
    os._exit(0)
signal.signal(signal.SIGTERM, on_term)
for step in range(20):
    ftrain.log(step, loss=2.0 - step * 0.01)
    time.sleep(0.005)
with open(out, "a") as f:
    f.write(f"w {time.time()}\\n")
ftrain.log(20, loss=float("nan"))
time.sleep(30)
"""


def bench_detect_latency(tmp: Path, n: int) -> None:
    """NaN line written → the child signalled (its SIGTERM handler stamps the time)."""
    script = tmp / "nan_child.py"
    script.write_text(DETECT_CHILD)
    policy = tmp / "nan.yaml"
    policy.write_text(f"""
version: 1
max_restarts: {n - 1}
no_progress: 1000
backoff: 0s
grace: 5s
detect: {{nonfinite: [loss], spike: {{}}, hang: false}}
rules:
  - when: nonfinite
    action: restart
""")
    out = tmp / "latency.txt"
    env = {**os.environ, "LATENCY_OUT": str(out)}
    subprocess.run([PY, "-m", "ftrain", "run", str(script), "--policy", str(policy), "--no-ui",
                    "--run-dir", str(tmp / "latency-run")], env=env, cwd=tmp,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    lat, written = [], None
    for line in out.read_text().splitlines():
        if line.startswith("w "):
            written = float(line[2:])
        elif written is not None:
            lat.append((float(line) - written) * 1000)
            written = None
    lat.sort()
    report("detect_latency_p50_ms", statistics.median(lat), "ms", "<= 25 ms")
    report("detect_latency_p99_ms", lat[min(len(lat) - 1, int(0.99 * len(lat)))], "ms", "<= 100 ms",
           f"{len(lat)} detections")


STEADY_CHILD = """
import time, ftrain
end = time.time() + float(__import__("os").environ["SECONDS_TO_LOG"])
step = 0
next_t = time.time()
while time.time() < end:
    ftrain.log(step, loss=2.0 + (step % 13) * 0.01, grad_norm=0.5, lr=3e-4)
    step += 1
    next_t += 0.001
    pause = next_t - time.time()
    if pause > 0:
        time.sleep(pause)
print("lines", step)
"""


def bench_cpu(tmp: Path, seconds: float) -> None:
    """Supervisor CPU while the child logs 1,000 lines/s."""
    script = tmp / "steady.py"
    script.write_text(STEADY_CHILD)
    env = {**os.environ, "SECONDS_TO_LOG": str(seconds)}
    proc = subprocess.Popen([PY, "-m", "ftrain", "run", str(script), "--no-ui", "--run-dir", str(tmp / "cpu-run")],
                            env=env, cwd=tmp, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    p = psutil.Process(proc.pid)
    time.sleep(min(2.0, seconds / 4))  # past start-up
    c0, t0 = sum(p.cpu_times()[:2]), time.monotonic()
    time.sleep(seconds / 2)
    c1, t1 = sum(p.cpu_times()[:2]), time.monotonic()
    out, _ = proc.communicate()
    lines = int(out.split()[-1]) if out.strip() else 0
    report("supervisor_cpu_at_1000_lines_per_s_pct", (c1 - c0) / (t1 - t0) * 100, "% of one core", "<= 2 %",
           f"child logged {lines / seconds:.0f} lines/s")


def bench_checkpoint(tmp: Path, mb: int, rounds: int = 9) -> None:
    """Shim save vs plain torch.save of a ~mb MB state; time blocked by a non-blocking save."""
    code = textwrap.dedent(f"""
        import glob, os, time, statistics, torch
        os.environ.update(FTRAIN_RUN_DIR={str(tmp)!r}, FTRAIN_CHECKPOINT_DIR={str(tmp / 'ckpt')!r},
                          FTRAIN_METRICS_PATH={str(tmp / 'ck.jsonl')!r}, FTRAIN_ATTEMPT='1')
        import ftrain
        state = {{"w": torch.randn({mb} * 2**20 // 4 // 4, 4)}}
        plain, plain_sync, shim, nb_block = [], [], [], []

        def plain_fsync(path):
            with open(path, "wb") as f:
                torch.save(state, f); f.flush(); os.fsync(f.fileno())

        def timed(times, fn, *args, **kwargs):
            # os.sync() first: on ext4 (data=ordered) an fsync also flushes the dirty pages
            # other files left behind, which would bill one save for another's writes.
            os.sync(); t0 = time.perf_counter(); fn(*args, **kwargs); times.append(time.perf_counter() - t0)

        for i in range({rounds}):
            # Every save writes a new file, as the shim does (an overwrite would bill the plain
            # save for freeing the old blocks); the last round's files go before the sync.
            for old in glob.glob({str(tmp)!r} + "/*.pt") + glob.glob({str(tmp / 'ckpt')!r} + "/*"):
                os.unlink(old)
            timed(plain, torch.save, state, {str(tmp)!r} + f"/plain-{{i}}.pt")
            timed(plain_sync, plain_fsync, {str(tmp)!r} + f"/plain-sync-{{i}}.pt")
            timed(shim, ftrain.save_checkpoint, state, i)
            timed(nb_block, ftrain.save_checkpoint, state, 100 + i, blocking=False)
            ftrain.shim._wait_for_save(raise_error=True)
        m = statistics.median
        print(m(plain), m(plain_sync), m(shim), m(nb_block))
    """)
    out = subprocess.run([PY, "-c", code], capture_output=True, text=True, cwd=tmp)
    if out.returncode != 0:
        print(out.stderr[-2000:])
        return
    plain, plain_sync, shim, nb = map(float, out.stdout.split())
    report("ckpt_save_vs_torch_save", shim / plain, "x", "<= 1.10x",
           f"{mb} MB, median of {rounds}: torch.save {plain * 1000:.0f} ms, +fsync {plain_sync * 1000:.0f} ms, "
           f"ftrain {shim * 1000:.0f} ms; vs torch.save+fsync {shim / plain_sync:.2f}x")
    report("ckpt_nonblocking_blocked_share", nb / shim, "of a blocking save", "<= 0.10",
           f"blocked {nb * 1000:.0f} ms")


SHARDED_BENCH = """
import os, statistics, sys, time
import torch, torch.distributed as dist, torch.distributed.checkpoint as dcp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor
import ftrain

dist.init_process_group("gloo")
world, mb, rounds = dist.get_world_size(), int(sys.argv[1]), int(sys.argv[2])
mesh = init_device_mesh("cpu", (world,))
n = world * mb * (1 << 18) // 4   # four float32 DTensors: mb MiB of shards per rank
state = {f"w{i}": distribute_tensor(torch.randn(n), mesh, [Shard(0)]) for i in range(4)}
state["step"] = 0
plain, ours = [], []
for r in range(rounds):
    for name, out in (("dcp", plain), ("ftrain", ours)):
        dist.barrier()
        t0 = time.perf_counter()
        if name == "dcp":
            dcp.save(state, checkpoint_id=f"plain/{r}")
        else:
            ftrain.save_checkpoint(state, r, sharded=True)
        dist.barrier()
        out.append(time.perf_counter() - t0)
if dist.get_rank() == 0:
    print(statistics.median(plain), statistics.median(ours))
dist.destroy_process_group()
"""


def bench_sharded(tmp: Path, mb: int, rounds: int) -> None:
    """A sharded save of 2 ranks (gloo, CPU): ``ftrain.save_checkpoint(sharded=True)`` (DCP,
    then every rank hashes its files and rank 0 writes the manifest) vs a plain
    ``torch.distributed.checkpoint.save`` of the same DTensor state, alternating, median."""
    script = tmp / "sharded_bench.py"
    script.write_text(SHARDED_BENCH)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FTRAIN_", "PET_"))}
    env.update(FTRAIN_CHECKPOINT_DIR=str(tmp / "ckpt"), PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    out = subprocess.run([PY, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
                          str(script), str(mb), str(rounds)], capture_output=True, text=True, cwd=tmp, env=env)
    if out.returncode != 0:
        print(out.stderr[-2000:])
        return
    plain, ours = map(float, out.stdout.split()[-2:])
    report("sharded_save_vs_dcp_save", ours / plain, "x", "",
           f"2 ranks x {mb} MiB, median of {rounds}: dcp.save {plain * 1000:.0f} ms, "
           f"ftrain sharded {ours * 1000:.0f} ms ({(ours - plain) * 1000:+.0f} ms: hashing, manifest)")


def bench_goodput(tmp: Path, steps: int) -> None:
    """The demo job with 5 injected faults of different kinds vs the same job without faults."""
    faults = ",".join(f"{k}@{int(steps * f)}" for k, f in
                      (("oom", 0.15), ("segv", 0.3), ("nan", 0.5), ("hang", 0.65), ("kill", 0.8)))
    walls = {}
    for name, extra in (("clean", []), ("faults", ["--inject", faults])):
        t0 = time.monotonic()
        p = subprocess.run([PY, "-m", "ftrain", "run", str(ROOT / "scripts/train_charlm.py"),
                            "--config", str(ROOT / "configs/demo.yaml"),
                            "--policy", str(ROOT / "configs/policy.demo.yaml"), "--set", f"train.steps={steps}",
                            "--no-ui", "--run-dir", str(tmp / f"goodput-{name}"), *extra],
                           cwd=tmp, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        walls[name] = time.monotonic() - t0
        if p.returncode != 0:
            print(p.stderr[-3000:])
            return
    report("demo_goodput_with_5_faults", walls["clean"] / walls["faults"], "of the fault-free wall time",
           ">= 0.80", f"{steps} steps: clean {walls['clean']:.1f}s, with {faults}: {walls['faults']:.1f}s")


def bench_warm(tmp: Path, steps: int) -> None:
    """A restart's time to the script's first step, warm (the default) vs cold: the demo job
    with three segfaults, each restart timed from the decision to the first step logged."""
    faults = ",".join(f"segv@{int(steps * f)}" for f in (0.25, 0.5, 0.75))
    firsts = {}
    for name, warm in (("warm", "true"), ("cold", "false")):
        policy = tmp / f"policy-{name}.yaml"
        policy.write_text((ROOT / "configs/policy.demo.yaml").read_text() + f"warm_start: {warm}\n")
        run_dir = tmp / f"warm-{name}"
        p = subprocess.run([PY, "-m", "ftrain", "run", str(ROOT / "scripts/train_charlm.py"),
                            "--config", str(ROOT / "configs/demo.yaml"), "--policy", str(policy),
                            "--set", f"train.steps={steps}", "--no-ui", "--run-dir", str(run_dir), "--inject", faults],
                           cwd=tmp, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if p.returncode != 0:
            print(p.stderr[-3000:])
            return
        story = json.loads(subprocess.run([PY, "-m", "ftrain", "inspect", str(run_dir), "--json"], cwd=tmp,
                                          capture_output=True, text=True, check=True).stdout)
        firsts[name] = [a["time_to_first_step"] for a in story["attempts"][1:]]
    warm, cold = statistics.median(firsts["warm"]), statistics.median(firsts["cold"])
    report("restart_to_first_step_warm_s", warm, "s", "",
           f"cold start (a new python, as torchrun does): {cold:.2f} s; "
           f"per restart warm {', '.join(f'{x:.2f}' for x in firsts['warm'])}")


SNAP_JOB = """
# The snapshot bench's job: a 4 MB state changed by every step (w = 0.999 w + sin(k (step+1))),
# ~50 ms a step, a durable checkpoint every `every` steps and, with train.snapshot, an
# ftrain.snapshot every step. Each line logs what the previous step's snapshot blocked and
# how long that step took; a resumed attempt prints how long its load took and, for the same
# file on disk with a cold page cache, how long torch.load took. The end prints the state's
# sha256: equal to a replay without faults when every resume was exact.
import hashlib, json, os, sys, time
import torch
import ftrain

cfg = ftrain.config(defaults={"train": {"steps": 300, "every": 50, "sleep": 0.045, "snapshot": True}})
train = cfg["train"]
torch.set_num_threads(1)
k = torch.linspace(0, 1, 1_000_000)

def fresh():
    return torch.randn(1_000_000, generator=torch.Generator().manual_seed(0))

def advance(w, step):
    w.mul_(0.999).add_(torch.sin(k * (step + 1)))

def digest(w):
    return hashlib.sha256(w.numpy().tobytes()).hexdigest()

if "--replay" in sys.argv:   # the fault-free state after N steps, without the supervisor
    w = fresh()
    for step in range(int(sys.argv[sys.argv.index("--replay") + 1])):
        advance(w, step)
    print("STATE", digest(w))
    raise SystemExit(0)
t0 = time.perf_counter()
state = ftrain.load_checkpoint()
load_s = time.perf_counter() - t0
w, start = fresh(), 0
if state is not None:
    w, start = state["w"], state["step"] + 1
    path = os.environ["FTRAIN_RESUME_FROM"]
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)   # drop it from the page cache
    os.close(fd)
    t0 = time.perf_counter()
    torch.load(path, weights_only=True)
    cold_s = time.perf_counter() - t0
    shm = os.path.join(os.environ.get("FTRAIN_MEMORY_DIR", ""), os.path.basename(path))
    memory_s = None
    if os.path.exists(shm):   # the same bytes in host memory, read the same way
        t0 = time.perf_counter()
        torch.load(shm, weights_only=True)
        memory_s = time.perf_counter() - t0
    print("LOAD " + json.dumps({"step": state["step"], "load_s": load_s, "disk_cold_s": cold_s,
                                "memory_s": memory_s}), flush=True)
blocked = took = step_s = None
for step in range(start, train["steps"]):
    t0 = time.perf_counter()
    advance(w, step)
    time.sleep(train["sleep"])
    extra = {} if step_s is None else {"blocked_s": blocked, "took": took, "step_s": step_s}
    ftrain.log(step, loss=float(w[0]), **extra)
    if step % train["every"] == 0:
        ftrain.save_checkpoint({"w": w, "step": step}, step)
    if train["snapshot"]:
        t1 = time.perf_counter()
        took = int(ftrain.snapshot({"w": w, "step": step}, step))
        blocked = time.perf_counter() - t1
    else:
        took, blocked = 0, 0.0
    step_s = time.perf_counter() - t0
print("STATE", digest(w), flush=True)
"""

SNAP_POLICY = """
version: 1
max_restarts: 8
no_progress: 1000
backoff: 0s
detect: {hang: false, spike: {}, nonfinite: []}
rules:
  - when: [segfault, killed, aborted, cuda_oom]
    action: restart
"""


def bench_snapshot(tmp: Path, steps: int) -> None:
    """ftrain.snapshot on a real job with 4 crashes (segfault, SIGKILL, abort, an OOM
    exception), beside the same job with its durable checkpoints alone (every 50 steps):
    steps redone per crash, the blocking share, the state exact, and the restart's read of
    the resume point from host memory vs from disk with a cold page cache."""
    job, policy = tmp / "snap_job.py", tmp / "snap_policy.yaml"
    job.write_text(SNAP_JOB)
    policy.write_text(SNAP_POLICY)
    faults = ",".join(f"{kind}@{int(steps * f) + 7}" for kind, f in
                      (("segv", 0.2), ("kill", 0.4), ("abort", 0.6), ("oom", 0.8)))
    reference = subprocess.run([PY, str(job), "--replay", str(steps)], cwd=tmp, capture_output=True, text=True,
                               env=_bare_env())
    results: dict[str, dict[str, Any]] = {}
    for name, on in (("snapshots", "true"), ("checkpoints only", "false")):
        run = tmp / name.replace(" ", "-")
        t0 = time.monotonic()
        p = subprocess.run([PY, "-m", "ftrain", "run", str(job), "--policy", str(policy), "--no-ui",
                            "--run-dir", str(run), "--set", f"train.steps={steps}", "--set", f"train.snapshot={on}",
                            "--inject", faults], cwd=tmp, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                           env=_bare_env())
        wall = time.monotonic() - t0
        if p.returncode != 0:
            print(p.stderr[-3000:])
            return
        results[name] = _snapshot_run(run) | {"wall": wall}
    snap, disk = results["snapshots"], results["checkpoints only"]
    want = reference.stdout.split()[-1] if reference.returncode == 0 and reference.stdout.strip() else None
    exact = snap["state"] == disk["state"] and (want is None or snap["state"] == want)
    report("snapshot_steps_redone_per_crash", max(snap["redone"]), "steps (worst of 4)", "<= 3",
           f"per crash {snap['redone']}; checkpoints every 50 steps alone: {disk['redone']} "
           f"(mean {statistics.mean(disk['redone']):.1f})")
    report("snapshot_blocking_share_pct", snap["share"] * 100, "% of step time", "<= 2 %",
           f"{snap['taken']} snapshots in {snap['steps']} steps of {snap['step_ms']:.1f} ms (median), "
           f"median call {snap['blocked_ms']:.2f} ms, p99 {snap['blocked_p99_ms']:.2f} ms")
    report("snapshot_state_exact", exact, "", "bit-exact",
           f"final state sha256 {snap['state'][:12]}… with snapshots, {disk['state'][:12]}… without"
           + (f", {want[:12]}… replayed without faults" if want else ""))
    report("snapshot_resume_load_checkpoint_ms", statistics.median(snap["load_ms"]), "ms", "",
           f"the restart's ftrain.load_checkpoint, read from host memory {snap['from_memory']}/"
           f"{len(snap['load_ms'])} times; checkpoints-only run, from disk (page cache warm): "
           f"{statistics.median(disk['load_ms']):.1f} ms (medians, first torch.load of the process)")
    memory = [x for x in snap["memory_ms"] if x is not None]
    if memory:
        report("snapshot_read_memory_vs_cold_disk", statistics.median(memory) / statistics.median(snap["cold_ms"]),
               "x", "", f"torch.load of the resume point from /dev/shm {statistics.median(memory):.2f} ms, "
               f"the same file on disk with a cold page cache {statistics.median(snap['cold_ms']):.2f} ms")
    report("snapshot_failure_to_first_step_s", statistics.median(snap["gap"]), "s", "",
           f"resuming from a promoted snapshot; from the disk checkpoint: {statistics.median(disk['gap']):.2f} s "
           f"(medians of 4); wall {snap['wall']:.1f} s vs {disk['wall']:.1f} s")


def _bare_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("FTRAIN_")}


def _snapshot_run(run: Path) -> dict[str, Any]:
    """What one run of the snapshot bench's job shows: from its journal, metrics and logs."""
    evts = [json.loads(line) for line in (run / "journal.jsonl").read_text().splitlines() if line.strip()]
    fails = [e for e in evts if e["event"] == "failure"]
    starts = [e for e in evts if e["event"] == "attempt_start"][1:]
    redone = [f["step"] - (s["resume_step"] if s.get("resume_step") is not None else -1)
              for f, s in zip(fails, starts)]
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"step_s"' in line]
    first: dict[int, float] = {}
    for rec in (json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()):
        if isinstance(rec.get("step"), int) and "ftrain" not in rec:
            first.setdefault(rec["attempt"], rec["t"])
    gap = [first[s["attempt"]] - f["t"] for f, s in zip(fails, starts) if s["attempt"] in first]
    loads, state, from_memory = [], "", 0
    for log in sorted((run / "attempts").glob("*/output.log")):
        text = log.read_text()
        from_memory += "read from host memory" in text
        for line in text.splitlines():
            if line.startswith("LOAD "):
                loads.append(json.loads(line[5:]))
            elif line.startswith("STATE "):
                state = line.split()[1]
    blocked = sorted(r["blocked_s"] for r in lines if r["took"])
    step_times = sorted(r["step_s"] for r in lines)
    return {"redone": redone, "gap": gap, "state": state, "from_memory": from_memory,
            "share": sum(r["blocked_s"] for r in lines) / sum(step_times), "taken": len(blocked),
            "steps": len(lines), "step_ms": statistics.median(step_times) * 1e3,
            "blocked_ms": statistics.median(blocked) * 1e3 if blocked else 0.0,
            "blocked_p99_ms": blocked[int(len(blocked) * 0.99)] * 1e3 if blocked else 0.0,
            "load_ms": [x["load_s"] * 1e3 for x in loads], "cold_ms": [x["disk_cold_s"] * 1e3 for x in loads],
            "memory_ms": [x["memory_s"] * 1e3 if x["memory_s"] is not None else None for x in loads]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer repetitions")
    ap.add_argument("--only", nargs="*", help="run only these benches")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    q = args.quick
    benches: dict[str, Callable[[Path], None]] = {
        "restart": lambda t: bench_restart_gap(t, 10 if q else 30),
        "dist_gap": lambda t: bench_dist_restart_gap(t, 3 if q else 6),
        "ranks": lambda t: bench_ranks(t, 2 if q else 5),
        "startup": lambda t: bench_startup(t, 3 if q else 7),
        "log": bench_log_cost,
        "ingest": lambda t: bench_ingest(t, 200_000 if q else 500_000),
        "latency": lambda t: bench_detect_latency(t, 20 if q else 60),
        "cpu": lambda t: bench_cpu(t, 6 if q else 20),
        "checkpoint": lambda t: bench_checkpoint(t, 20 if q else 100),
        "sharded": lambda t: bench_sharded(t, 32 if q else 128, 3 if q else 7),
        "warm": lambda t: bench_warm(t, 200 if q else 400),
        "goodput": lambda t: bench_goodput(t, 300 if q else 1200),
        "snapshot": lambda t: bench_snapshot(t, 150 if q else 300),
    }
    import compileall

    # Measure what an installed ftrain does: with its bytecode cached (this sandbox sets
    # PYTHONDONTWRITEBYTECODE, which would make every start-up recompile the sources).
    compileall.compile_dir(str(ROOT / "ftrain"), quiet=1)
    print(f"# ftrain bench on {os.cpu_count()} cores, Python {sys.version.split()[0]}", flush=True)
    for name, fn in benches.items():
        if args.only and name not in args.only:
            continue
        with tempfile.TemporaryDirectory(prefix=f"ftrain-bench-{name}-") as tmp:
            fn(Path(tmp))
    if args.json:
        args.json.write_text(json.dumps(RESULTS, indent=2))


if __name__ == "__main__":
    main()
