"""watch: the tailer against a real writer process, the detectors on realistic streams,
and the ingest budget (DESIGN §9)."""

from __future__ import annotations

import json
import math
import os
import random
import selectors
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest

import ftrain.detect as detect
import ftrain.tail as tail
from ftrain.detect import (
    Anomaly,
    Detectors,
    DetectSpec,
    HangSpec,
    NonfiniteSpec,
    SpikeSpec,
    ThresholdSpec,
    parse_duration,
)
from ftrain.kinds import Failure, FailureKind
from ftrain.tail import Tailer

CHILDREN = Path(__file__).parent / "children"


def line(**record: Any) -> bytes:
    return (json.dumps(record) + "\n").encode()


def append(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def loss_curve(n: int, seed: int, sigma: float = 0.15) -> Iterator[float]:
    """A small LM's per-step loss: exponential decay to 1.5 with log-normal batch noise."""
    rng = random.Random(seed)
    for step in range(n):
        yield (1.5 + 3.0 * math.exp(-step / 600)) * math.exp(rng.gauss(0.0, sigma))


def feed_all(det: Detectors, values: Iterable[float], metric: str = "loss",
             now: float = 0.0) -> list[Anomaly]:
    out = []
    for step, v in enumerate(values):
        a = det.feed({"step": step, "t": 0.0, "attempt": 1, metric: v}, now)
        if a is not None:
            out.append(a)
    return out


# ------------------------------------------------------------------------------------ api

def test_public_surface() -> None:
    assert sorted(detect.__all__) == sorted(
        ["Anomaly", "DetectSpec", "Detectors", "HangSpec", "NonfiniteSpec", "SpikeSpec", "StragglerSpec",
         "Stragglers", "ThresholdSpec", "parse_duration"])
    assert sorted(tail.__all__) == ["ChangeNotifier", "Record", "TailStats", "Tailer"]
    for module in (detect, tail):
        for name in module.__all__:
            if name != "Record":
                assert getattr(module, name).__doc__


def test_watch_never_imports_torch() -> None:
    code = "import sys, ftrain.detect, ftrain.tail; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


# ------------------------------------------------------------------------------------ tailer

def test_tailer_follows_a_real_writer_process(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    count = 300
    child = subprocess.Popen([sys.executable, str(CHILDREN / "watch_writer.py"), str(path), str(count)],
                             stdout=subprocess.PIPE, text=True)
    tailer = Tailer(path, start_at_end=True)  # the file does not exist yet
    records: list[dict[str, Any]] = []
    saw_partial = False
    deadline = time.monotonic() + 20
    while child.poll() is None and time.monotonic() < deadline:
        records += tailer.read_new()
        data = path.read_bytes() if path.exists() else b""
        saw_partial = saw_partial or (tailer.offset == len(data) and data[-1:] not in (b"", b"\n"))
        time.sleep(0.005)
    assert child.wait(5) == 0 and child.stdout is not None and child.stdout.read() == "done\n"
    records += tailer.read_new()
    assert records[0]["ftrain"] == "config" and records[0]["step"] is None
    assert [r["step"] for r in records[1:]] == list(range(count))
    assert all(r["loss"] == pytest.approx(4.0 / (1 + r["step"])) for r in records[1:])
    s = tailer.stats
    assert (s.records, s.garbage, s.non_dict, s.no_step) == (count + 1, 1, 1, 1)
    assert (s.truncations, s.replaced, s.oversized) == (0, 0, 0)
    assert s.problems() == {"garbage": 1, "non_dict": 1, "no_step": 1}
    assert saw_partial, "the writer's split line should have been seen half-written"
    tailer.close()


def test_partial_line_is_kept_until_its_newline(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    with Tailer(path) as tailer:
        assert tailer.read_new() == []                 # no file yet
        data = line(step=1, loss=2.5) + line(step=2, loss=2.4)
        append(path, data[:-7])
        assert [r["step"] for r in tailer.read_new()] == [1]
        assert tailer.read_new() == []
        append(path, data[-7:])
        assert tailer.read_new() == [{"step": 2, "loss": 2.4}]
        assert tailer.stats.garbage == 0


def test_problems_are_counted_and_good_records_survive(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    append(path, b"".join([
        line(step=1, loss=1.0),
        b"garbage here\n",
        b"\xff\xfe not utf-8\n",
        b"\n",
        b'"a string"\n',
        b"42\n",
        line(loss=3.0),                        # no step: dropped
        line(step="7", loss=3.0),              # step not an int: dropped
        line(step=True, loss=3.0),             # bool is not a step
        line(ftrain="save_end", step=None, path="x"),  # control line, step null: kept
        b'{"step": 2, "loss": NaN, "grad_norm": Infinity, "x": -Infinity}\n',
    ]))
    tailer = Tailer(path)
    records = tailer.read_new()
    assert [r.get("step") for r in records] == [1, None, 2]
    assert math.isnan(records[2]["loss"]) and records[2]["grad_norm"] == math.inf
    s = tailer.stats
    assert (s.garbage, s.non_dict, s.no_step, s.records) == (2, 2, 3, 3)


def test_truncated_and_replaced_files_are_read_from_the_start(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    append(path, line(step=1) + line(step=2))
    tailer = Tailer(path)
    assert len(tailer.read_new()) == 2
    path.write_bytes(line(step=10))                    # truncated and rewritten shorter
    assert tailer.read_new() == [{"step": 10}]
    assert tailer.stats.truncations == 1
    append(path, line(step=11))
    tmp = tmp_path / "new.jsonl"
    tmp.write_bytes(line(step=20) + line(step=21) + line(step=22))
    os.replace(tmp, path)                              # a new file takes the path
    assert [r["step"] for r in tailer.read_new()] == [11, 20, 21, 22]  # old tail drained first
    assert tailer.stats.replaced == 1
    path.unlink()
    assert tailer.read_new() == []
    append(path, line(step=30))                        # appears again
    assert tailer.read_new() == [{"step": 30}]
    tailer.close()


def test_start_at_end_skips_history_and_a_half_line(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    append(path, line(step=1) + b'{"step": 2, "lo')
    tailer = Tailer(path, start_at_end=True)
    append(path, b'ss": 1.0}\n' + line(step=3))
    assert tailer.read_new() == [{"step": 3}]
    assert tailer.stats.garbage == 0


def test_an_endless_line_is_dropped_and_memory_stays_bounded(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    tailer = Tailer(path, max_line=1000)
    append(path, line(step=1) + b"x" * 700)
    assert tailer.read_new() == [{"step": 1}]
    append(path, b"x" * 700)                           # 1400 bytes and no newline yet
    assert tailer.read_new() == []
    assert tailer.stats.oversized == 1 and len(tailer._pending) == 0
    append(path, b"x" * 5000 + b"\n" + line(step=2))
    assert tailer.read_new() == [{"step": 2}]
    assert tailer.stats.oversized == 1 and tailer.stats.garbage == 0
    tailer.close()


def test_a_chunk_that_is_not_one_array_of_lines_is_parsed_line_by_line(tmp_path: Path) -> None:
    """The fast path parses a chunk as one JSON array; lines that would close it early, or
    join into one value, must not fool it."""
    path = tmp_path / "m.jsonl"
    append(path, b"".join([
        line(step=1, loss=1.0),
        b'{"step": 2}]\n',                   # would end the array early
        b'[{"step": 3}\n',                   # ... and start another
        b'{"step": 4, "loss": 2.0}\r\n',      # CRLF: the CR is JSON whitespace
        b'{"step": 5,\n',                     # one value over two lines: two broken lines
        b'"loss": 3.0}\n',
        line(step=6, loss=1.5),
    ]))
    tailer = Tailer(path)
    assert [r["step"] for r in tailer.read_new()] == [1, 4, 6]
    assert tailer.stats.garbage == 4 and tailer.stats.records == 3
    tailer.close()


def test_change_notifier_wakes_on_a_write_and_one_drain_empties_it(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    path.touch()
    notifier = tail.ChangeNotifier.create(path)
    if notifier is None:
        pytest.skip("no inotify on this system")
    sel = selectors.DefaultSelector()
    sel.register(notifier.fileno(), selectors.EVENT_READ)
    assert sel.select(0) == []
    for i in range(1000):
        append(path, line(step=i))
    assert len(sel.select(0)) == 1
    notifier.drain()
    assert sel.select(0) == []
    notifier.drain()                                   # nothing queued: no error, no wait
    sel.close()
    notifier.close()


def test_attempt_watch_takes_a_read_at_a_time() -> None:
    """intake.AttemptWatch.see, the supervisor's side of each read: steps, control lines,
    and one rate sample per read (all its lines were read at the same moment)."""
    from ftrain.intake import AttemptWatch

    w = AttemptWatch()
    w.see([], 10.0)
    assert (w.steps, w.first_step, w.last_step, w.rate, w.metrics) == (0, None, None, None, {})
    w.see([{"ftrain": "config", "step": None, "digest": "d"}, {"step": 5, "t": 1.0, "loss": 1.0},
           {"step": 3, "attempt": 1, "loss": 2.0}, {"loss": 3.0}, {"step": True},
           {"ftrain": "inject", "fault": "nan", "at": 4}], 10.0)
    assert (w.first_step, w.last_step, w.max_step, w.steps) == (5, 3, 5, 2)
    assert w.config_digest == "d" and w.fired == [("nan", 4)] and w.metrics == {"loss": 2.0}
    w.see([{"step": 6}, {"ftrain": "save_end", "step": 6, "path": "p"}, {"ftrain": "stop_requested"}], 10.5)
    assert w.saves == 1 and w.stop_requested and w.rate is None   # under a second since the mark
    w.see([{"step": 7}, {"step": 8}], 12.0)
    assert w.rate == pytest.approx((4 - 1) / 2.0) and (w.last_step, w.max_step, w.steps) == (8, 8, 5)


# ------------------------------------------------------------------------------------ spikes

def test_clean_noisy_loss_curve_raises_no_alarm() -> None:
    for seed, sigma in ((7, 0.1), (8, 0.15), (9, 0.2)):
        det = Detectors(DetectSpec.default())
        det.start_attempt(0.0)
        assert feed_all(det, loss_curve(5000, seed, sigma)) == [], (seed, sigma)


def test_one_tenfold_spike_raises_exactly_one_alarm_at_its_step() -> None:
    values = list(loss_curve(5000, seed=8))
    values[3210] *= 10
    det = Detectors(DetectSpec.default())
    det.start_attempt(0.0)
    alarms = feed_all(det, values)
    assert [(a.kind, a.step, a.metric) for a in alarms] == [(FailureKind.SPIKE, 3210, "loss")]
    a = alarms[0]
    assert a.value == values[3210]
    assert "loss" in a.reason and "at step 3210" in a.reason and "median" in a.reason
    assert json.loads(a.evidence[0])["step"] == 3210


@pytest.mark.parametrize("seed, patience, positive", [(1, 1, True), (2, 2, True), (3, 1, False), (4, 3, False)])
def test_spike_detector_agrees_with_the_obvious_implementation(seed: int, patience: int,
                                                              positive: bool) -> None:
    rng = random.Random(seed)
    values = []
    for i in range(3000):  # heavy-tailed noise, level changes and bursts; some series cross zero
        level = (3.0 if positive else 0.5) + (2.0 if (i // 500) % 2 else 0.0)
        noise = rng.gauss(0, 0.1 if positive else 0.3) * (5 if rng.random() < 0.02 else 1)
        v = level * math.exp(noise) if positive else level + noise
        values.append(v * (8 if rng.random() < 0.01 else 1))
    assert (min(values) > 0) == positive
    spec = SpikeSpec("x", window=40, zscore=3.0, warmup=15, patience=patience)
    det = Detectors(DetectSpec(spikes=(spec,)))
    det.start_attempt(0.0)
    got = [a.step for a in feed_all(det, values, metric="x")]
    assert got == [i for i, _ in reference_alarms(values, spec)] and len(got) > 5


def reference_alarms(values: list[float], spec: SpikeSpec) -> list[tuple[int, float]]:
    """The spike rules from scratch on every value, as (index, robust deviations) per alarm.
    The window keeps the raw values; while they are all positive they are judged as logs.
    The window rule first; else the recent rule (the step-to-step spread above the higher of
    the last value and the median of the last 10)."""
    base: list[float] = []
    log, seen, streak, alarms = True, 0, [], []
    for i, v in enumerate(values):
        log = log and v > 0
        if seen >= max(spec.warmup, min(10, spec.window)):
            g = math.log if log else float
            med = statistics.median([g(b) for b in base])
            mad = statistics.median([abs(g(b) - med) for b in base])
            scale = max(1.4826 * mad, 0.01 if log else 0.01 * abs(med) + 1e-12)
            z = (g(v) - med) / scale if g(v) - med > spec.zscore * scale else None
            if z is None:
                spread = 1.4826 / math.sqrt(2) * statistics.median(
                    [abs(g(b) - g(a)) for a, b in zip(base, base[1:])])
                level = max(g(base[-1]), statistics.median([g(b) for b in base[-min(10, spec.window):]]))
                scale = max(spread, 0.01 if log else 0.01 * abs(level) + 1e-12)
                z = (g(v) - level) / scale if g(v) - level > spec.zscore * scale else None
            if z is not None:
                streak.append(v)
                if len(streak) < spec.patience:
                    continue
                alarms.append((i, z))
            else:
                streak = []
        for y in streak or [v]:  # fired outliers join the baseline; pending ones do not
            base = (base + [y])[-spec.window:]
            seen += 1
        streak = []
    return alarms


def spiky_series(kind: str, n: int, seed: int) -> list[float]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        if kind == "lognormal":      # a decaying loss with 15 % noise, bursts and ×10 spikes
            v = (1.5 + 3.0 * math.exp(-i / 800)) * math.exp(rng.gauss(0, 0.15))
            v *= 10 if rng.random() < 0.003 else (3 if 2000 <= i < 2004 else 1)
        elif kind == "heavy":        # heavy tails and level changes
            v = (2.0 + (i // 700) % 3) * math.exp(rng.gauss(0, 0.05) / max(0.05, rng.random()))
        elif kind == "ties":         # a few distinct values, flat stretches, one jump
            v = 2.0 + 0.01 * rng.randrange(3) if i < 1500 else 2.0 + 1e-9 * (i % 2)
            v = 2.5 if i == 2500 else v
        elif kind == "crossing":     # positive, then around zero from step 1200: judged linearly
            v = (5.0 if i < 1200 else 0.2) + rng.gauss(0, 0.3) + (8.0 if rng.random() < 0.005 else 0.0)
        elif kind == "tiny":
            v = 1e-250 * math.exp(rng.gauss(0, 0.2)) * (100 if rng.random() < 0.004 else 1)
        else:                        # huge: near the top of the float range
            v = 1e305 * math.exp(rng.gauss(0, 0.2)) * (100 if rng.random() < 0.004 else 1)
        out.append(v)
    return out


@pytest.mark.parametrize("kind", ["lognormal", "heavy", "ties", "crossing", "tiny", "huge"])
@pytest.mark.parametrize("window, zscore, warmup, patience", [
    (200, 6.0, 50, 1), (200, 3.0, 10, 2), (64, 4.0, 100, 1), (30, 2.0, 5, 3), (200, 0.0, 50, 1),
    (200, 1e9, 50, 1),
])
def test_spike_alarms_are_exactly_those_of_judging_every_value(kind: str, window: int, zscore: float,
                                                               warmup: int, patience: int) -> None:
    """Most values join the window under a ceiling without being judged (see _SpikeWatch):
    the alarms, their steps and their robust deviations must not change for it."""
    values = spiky_series(kind, 3000, seed=window + patience)
    spec = SpikeSpec("x", window=window, zscore=zscore, warmup=warmup, patience=patience)
    det = Detectors(DetectSpec(spikes=(spec,)))
    det.start_attempt(0.0)
    got = feed_all(det, values, metric="x")
    want = reference_alarms(values, spec)
    assert [a.step for a in got] == [i for i, _ in want]
    for a, (_, z) in zip(got, want):
        assert f"{z:.1f} robust deviations" in a.reason
    if zscore == 6.0 and kind in ("lognormal", "ties"):
        assert want, "the series should hold spikes"


def test_a_ceiling_allows_for_the_window_changing_under_it() -> None:
    """A ceiling covers several values, so it must hold for every window they can make: here
    the 0 swapped in for a -10 halves the MAD (11 × -10, 19 × 0, 10 × 10 → 10 × -10, 20 × 0,
    10 × 10), and puts the 10 after it 1.3 robust deviations out (limit 1), not 0.7."""
    values = [-10.0] * 11 + [0.0] * 19 + [10.0] * 10 + [0.0, 10.0]
    spec = SpikeSpec("x", window=40, zscore=1.0, warmup=5)
    det = Detectors(DetectSpec(spikes=(spec,)))
    det.start_attempt(0.0)
    got = [a.step for a in feed_all(det, values, metric="x")]
    assert got == [i for i, _ in reference_alarms(values, spec)] and got[-1] == 41


def test_most_values_join_the_spike_window_unjudged() -> None:
    """The ceiling is what keeps the per-line cost down: on a noisy loss curve nearly every
    value after the first window is under it."""
    det = Detectors(DetectSpec.default())
    det.start_attempt(0.0)
    assert feed_all(det, loss_curve(5000, seed=8)) == []
    assert 0 < det.spike_values_judged < 200 + 100   # the first window, and about 1 % beyond


def test_spike_waits_for_warmup_and_ignores_a_falling_loss() -> None:
    det = Detectors(DetectSpec(spikes=(SpikeSpec("loss", window=50, warmup=20),)))
    det.start_attempt(0.0)
    early = [10.0, 9.0, 30.0, 8.0] + [5.0 + 0.01 * (i % 3) for i in range(10)]
    assert feed_all(det, early) == []                  # 30.0 came before the warmup
    assert feed_all(det, [0.01, 0.001, 1e-6]) == []    # a collapse downwards is not a spike


def test_patience_and_outliers_stay_out_of_the_baseline() -> None:
    det = Detectors(DetectSpec(spikes=(SpikeSpec("loss", window=50, warmup=20, patience=3),)))
    det.start_attempt(0.0)
    base = [2.0 + 0.02 * math.sin(i) for i in range(40)]
    assert feed_all(det, base) == []
    assert feed_all(det, [9.0, 9.0, 2.0, 9.0, 9.0, 2.0]) == []   # two in a row, twice
    alarms = feed_all(det, [9.0, 9.5, 9.9])
    assert len(alarms) == 1 and alarms[0].value == 9.9
    assert len(alarms[0].evidence) == 3 and "3 values in a row" in alarms[0].reason
    # none of the 9s entered the window: the median is still about 2
    assert "median 2" in alarms[0].reason


def test_flat_series_does_not_fire_on_rounding_noise_but_does_on_a_jump() -> None:
    det = Detectors(DetectSpec(spikes=(SpikeSpec("loss"),)))
    det.start_attempt(0.0)
    assert feed_all(det, [2.0 + (i % 2) * 1e-9 for i in range(300)] + [2.05]) == []
    assert [a.kind for a in feed_all(det, [2.5])] == [FailureKind.SPIKE]


def test_a_series_that_goes_negative_is_judged_linearly() -> None:
    rng = random.Random(3)
    det = Detectors(DetectSpec(spikes=(SpikeSpec("elbo"),)))
    det.start_attempt(0.0)
    values = [1.0 + rng.gauss(0, 0.5) for _ in range(400)]   # crosses zero often
    assert feed_all(det, values, metric="elbo") == []
    alarms = feed_all(det, [20.0], metric="elbo")
    assert len(alarms) == 1 and "robust deviations above its median" in alarms[0].reason


def test_spike_baseline_and_last_values_restart_with_each_attempt() -> None:
    det = Detectors(DetectSpec.default())
    det.start_attempt(0.0, attempt=1)
    feed_all(det, list(loss_curve(3000, seed=4))[2000:])   # a low, settled loss
    assert det.last_values["loss"] < 3
    det.start_attempt(0.0, attempt=2)
    assert det.last_values == {}
    # a fresh start with no checkpoint begins from a high loss: not a spike
    alarms = [det.feed({"step": i, "attempt": 2, "loss": v}, 0.0) for i, v in enumerate(loss_curve(300, 5))]
    assert not any(alarms)
    # a line of another attempt (a straggler) is ignored entirely
    assert det.feed({"step": 5, "attempt": 1, "loss": math.nan}, 0.0) is None
    assert math.isfinite(det.last_values["loss"])


# ------------------------------------------------------------------------------------ values

def test_nonfinite_fires_with_the_step_and_odd_values_are_ignored() -> None:
    det = Detectors(DetectSpec.default())
    det.start_attempt(0.0)
    assert det.feed({"step": 1, "loss": 2.0, "grad_norm": True}) is None
    assert det.feed({"step": 2, "loss": "nan", "grad_norm": [1]}) is None
    assert det.feed({"ftrain": "inject", "fault": "nan", "step": 812, "loss": math.nan}) is None
    a = det.feed({"step": 812, "loss": math.nan, "grad_norm": 1.0})
    assert a is not None and (a.kind, a.step, a.metric) == (FailureKind.NONFINITE, 812, "loss")
    assert a.reason == "loss = nan at step 812"
    assert math.isnan(det.last_values["loss"])
    b = det.feed({"step": 813, "loss": 2.0, "grad_norm": -math.inf})
    assert b is not None and b.metric == "grad_norm" and b.reason == "grad_norm = -inf at step 813"


def test_threshold_fires_when_a_bound_is_crossed() -> None:
    spec = DetectSpec(thresholds=(ThresholdSpec("loss", max=1000.0), ThresholdSpec("acc", min=0.1)))
    det = Detectors(spec)
    det.start_attempt(0.0)
    assert det.feed({"step": 1, "loss": 999.0, "acc": 0.5}) is None
    a = det.feed({"step": 2, "loss": 1200, "acc": 0.5})
    assert a is not None and (a.kind, a.step, a.value) == (FailureKind.THRESHOLD, 2, 1200.0)
    assert a.reason == "loss 1200 at step 2 is above its max 1000"
    b = det.feed({"step": 3, "loss": 1.0, "acc": 0.05})
    assert b is not None and b.metric == "acc" and "below its min 0.1" in b.reason
    assert det.feed({"step": 4, "loss": math.nan}) is None   # NaN is nonfinite's, not watched here
    assert det.feed({"step": 5, "loss": math.inf}) is not None


def test_anomaly_becomes_a_failure_with_reason_first() -> None:
    a = Anomaly(FailureKind.SPIKE, 10, "loss", 9.0, "loss 9 at step 10 is …", ('{"step": 10}',))
    f = a.to_failure(exit_code=-15, signal="SIGTERM")
    assert f == Failure(FailureKind.SPIKE, exit_code=-15, signal="SIGTERM", step=10,
                        evidence=("loss 9 at step 10 is …", '{"step": 10}'))


# ------------------------------------------------------------------------------------ hangs

def hang_detectors(hang: HangSpec) -> tuple[Detectors, FakeClock, Callable[..., Anomaly | None]]:
    clock = FakeClock()
    det = Detectors(DetectSpec(hang=hang), clock=clock)
    det.start_attempt()

    def step(n: int, dt: float = 0.0, **extra: Any) -> Anomaly | None:
        clock.advance(dt)
        return det.feed({"step": n, "attempt": 1, **extra})
    return det, clock, step


def test_a_stream_that_stops_is_a_hang_after_the_timeout() -> None:
    det, clock, step = hang_detectors(HangSpec(timeout=2.0, startup=5.0))
    for n in range(5):
        step(n, 0.1)
    clock.advance(1.9)
    assert det.check_hang() is None
    clock.advance(0.2)
    a = det.check_hang()
    assert a is not None and (a.kind, a.step) == (FailureKind.HANG, 4)
    assert a.reason == "no new step for 2.1 s after step 4 (timeout 2.0 s)"
    assert json.loads(a.evidence[0])["step"] == 4
    assert det.check_hang() is None                    # once per silence
    step(5)
    assert det.check_hang(clock.now + 2.5) is not None  # a new silence fires again


def test_startup_allowance_applies_before_the_first_step() -> None:
    det, clock, step = hang_detectors(HangSpec(timeout=2.0, startup=10.0))
    clock.advance(5)
    det.feed({"ftrain": "config", "step": None, "attempt": 1, "digest": "x"})  # a heartbeat
    clock.advance(9.5)
    assert det.check_hang() is None
    clock.advance(1.0)
    a = det.check_hang()
    assert a is not None and a.step is None
    assert a.reason == "no step yet and nothing new for 10.5 s (startup allowance 10.0 s)"


def test_no_hang_while_a_checkpoint_is_being_saved() -> None:
    det, clock, step = hang_detectors(HangSpec(timeout=2.0, startup=10.0))
    step(1, 0.5)
    det.feed({"ftrain": "save_start", "step": 1, "attempt": 1})
    clock.advance(8.0)                                 # far past the timeout, within startup
    assert det.check_hang() is None
    det.feed({"ftrain": "save_end", "step": 1, "attempt": 1, "path": "p"})
    clock.advance(1.9)
    assert det.check_hang() is None
    clock.advance(0.2)
    assert det.check_hang() is not None
    # a save that never ends is a hang too, after the startup allowance
    step(2)
    det.feed({"ftrain": "save_start", "step": 2, "attempt": 1})
    clock.advance(10.5)
    a = det.check_hang()
    assert a is not None
    assert a.reason == ("nothing new for 10.5 s while the checkpoint save at step 2 is in flight "
                        "(allowance 10.0 s)")


def test_a_background_save_keeps_its_allowance_until_save_end() -> None:
    """The shim may save in a thread: steps go on, and the next save waits for it silently."""
    det, clock, step = hang_detectors(HangSpec(timeout=2.0, startup=10.0))
    step(1, 0.5)
    det.feed({"ftrain": "save_start", "step": 1, "attempt": 1, "blocking": False})
    for n in range(2, 6):
        step(n, 0.5)
    clock.advance(8.0)                                 # the loop waits for the save, no line
    assert det.check_hang() is None
    det.feed({"ftrain": "save_end", "step": 1, "attempt": 1, "path": "p"})
    step(6, 0.1)
    clock.advance(2.1)
    assert det.check_hang() is not None


def test_auto_timeout_is_learnt_from_step_intervals_and_skips_saves() -> None:
    det, clock, step = hang_detectors(HangSpec(timeout=None, startup=30.0, floor=2.0, factor=5.0))
    clock.advance(20)                                  # slow start: not learnt
    step(0)
    assert det.hang_timeout == 30.0                    # nothing learnt yet: startup still
    for n in range(1, 20):
        step(n, 1.0)
    det.feed({"ftrain": "save_start", "step": 19, "attempt": 1})
    clock.advance(7.0)
    det.feed({"ftrain": "save_end", "step": 19, "attempt": 1})
    step(20, 0.5)                                      # this 7.5 s interval spans a save
    step(21, 3.0)
    assert det.hang_timeout == pytest.approx(15.0)     # 5 × 3.0 s
    clock.advance(14.9)
    assert det.check_hang() is None
    clock.advance(0.2)
    a = det.check_hang()
    assert a is not None
    assert a.reason == ("no new step for 15.1 s after step 21 "
                        "(timeout 15.0 s, learnt from a 3.0 s max step interval × 5)")
    # the learnt interval carries over; the startup allowance comes back until the first step
    det.start_attempt(clock.now, attempt=2)
    clock.advance(25)
    assert det.check_hang() is None
    assert det.feed({"step": 22, "attempt": 2}) is None
    clock.advance(15.1)
    assert det.check_hang() is not None


def test_fast_steps_get_the_floor_and_no_hang_spec_never_fires() -> None:
    det, clock, step = hang_detectors(HangSpec(floor=60.0))
    for n in range(10):
        step(n, 0.01)
    assert det.hang_timeout == 60.0
    clock.advance(61)
    a = det.check_hang()
    assert a is not None and "the floor" in a.reason
    quiet = Detectors(DetectSpec(), clock=clock)
    quiet.start_attempt()
    assert quiet.check_hang(clock.now + 1e9) is None and quiet.hang_timeout == math.inf


# ------------------------------------------------------------------------------------ specs

def test_default_spec_matches_the_design() -> None:
    spec = DetectSpec.default()
    assert spec.nonfinite == NonfiniteSpec(("loss", "grad_norm"))
    assert spec.thresholds == ()
    assert spec.spikes == (SpikeSpec("loss", window=200, zscore=6.0, warmup=50, patience=1),)
    assert spec.hang == HangSpec(timeout=None, startup=600.0, floor=60.0, factor=5.0)
    assert spec.metrics == ("loss", "grad_norm")


@pytest.mark.parametrize("make", [
    lambda: ThresholdSpec("loss"),
    lambda: ThresholdSpec("loss", min=2.0, max=1.0),
    lambda: SpikeSpec("loss", window=2),
    lambda: SpikeSpec("loss", patience=0),
    lambda: SpikeSpec("loss", zscore=math.nan),
    lambda: HangSpec(timeout=0.0),
    lambda: HangSpec(factor=0.5),
])
def test_nonsense_specs_are_refused(make: Callable[[], object]) -> None:
    with pytest.raises(ValueError):
        make()


@pytest.mark.parametrize("text, seconds", [
    ("2s", 2.0), ("500ms", 0.5), ("10m", 600.0), ("1h", 3600.0), ("1.5h", 5400.0), (" 3 s ", 3.0),
    ("90", 90.0), (45, 45.0), (0.25, 0.25), ("0", 0.0), (".5s", 0.5),
])
def test_parse_duration(text: str | float, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "ten", "10x", "-5s", "5 sec", "1h30m", True, None, -1, math.inf])
def test_parse_duration_refuses_with_a_clear_message(text: Any) -> None:
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration(text)


# ------------------------------------------------------------------------------------ budget

def test_ingest_rate(tmp_path: Path, record_property: Callable[[str, object], None]) -> None:
    """DESIGN §9: ≥ 200,000 lines/s on the project's machine; asserted loosely for CI."""
    n = 200_000
    rng = random.Random(1)
    path = tmp_path / "metrics.jsonl"
    t0 = 1_700_000_000.0
    with open(path, "w") as f:
        for step in range(n):
            loss = (1.5 + 3.0 * math.exp(-step / 20_000)) * math.exp(rng.gauss(0, 0.1))
            f.write(json.dumps({"step": step, "t": round(t0 + step * 0.01, 2), "attempt": 1,
                                "loss": loss, "grad_norm": rng.uniform(0.5, 1.5), "lr": 3e-4}) + "\n")
    det = Detectors(DetectSpec.default())
    best = 0.0
    for _ in range(2):                                 # best of two: the figure, not the noise
        tailer = Tailer(path)
        det.start_attempt(0.0)
        start = time.perf_counter()
        now = time.monotonic()
        count = 0
        while True:                                    # bounded batches (tail.BATCH bytes each)
            for record in tailer.read_new():
                if det.feed(record, now) is not None:
                    raise AssertionError("a clean stream raised an alarm")
                count += 1
            if not tailer.backlog:
                break
        rate = count / (time.perf_counter() - start)
        best = max(best, rate)
        tailer.close()
        assert count == n
    # the idle poll: what the supervisor pays every 5-10 ms when nothing is new
    tailer = Tailer(path, start_at_end=True)
    polls = 20_000
    start = time.perf_counter()
    for _ in range(polls):
        tailer.read_new()
    idle_us = (time.perf_counter() - start) / polls * 1e6
    tailer.close()
    print(f"\ningest: {best:,.0f} lines/s (Tailer + default Detectors); idle poll: {idle_us:.1f} µs")
    record_property("ingest_lines_per_s", round(best))
    record_property("idle_poll_us", round(idle_us, 2))
    assert best > 50_000
    assert idle_us < 100
