"""The point of rollback-and-skip, measured: a run with a bad shard of data (steps 150-169,
records that overflow) diverges on its own and recovers under ftrain.

Three runs of scripts/train_charlm.py, 300 steps each, and their held-out loss:
  clean                 no bad data, no ftrain
  bad data, alone       the bad shard, no ftrain: the loss turns NaN and stays there
  bad data, ftrain      the bad shard under ftrain: NaN seen → roll back to a checkpoint
                        before it, skip the bad steps, halve the learning rate → finishes

Run: python scripts/bad_batches.py   (about two minutes on two cores)
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "scripts" / "train_charlm.py"
BAD = "150-169"


def eval_loss(output: str) -> float:
    match = re.findall(r"eval loss (\S+)", output)
    return float(match[-1].rstrip(")")) if match else float("nan")


def run(args: list[str], cwd: Path) -> tuple[float, str]:
    p = subprocess.run(args, cwd=cwd, capture_output=True, text=True)
    return eval_loss(p.stdout), p.stdout + p.stderr


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="ftrain-bad-batches-") as tmp:
        cwd = Path(tmp)
        clean, _ = run([sys.executable, str(TRAIN)], cwd)
        alone, _ = run([sys.executable, str(TRAIN), f"data.corrupt_steps={BAD}"], cwd)
        rescued, out = run([sys.executable, "-m", "ftrain", "run", str(TRAIN), "--no-ui",
                            "--config", str(ROOT / "configs/demo.yaml"),
                            "--policy", str(ROOT / "configs/policy.demo.yaml"),
                            "--set", f"data.corrupt_steps={BAD}", "--run-dir", str(cwd / "run")], cwd)
        decisions = [line for line in out.splitlines() if "decision:" in line]
    print(f"held-out loss after 300 steps (bad shard at steps {BAD}):")
    print(f"  clean run                 {clean:.4f}")
    print(f"  bad data, without ftrain  {alone:.4f}")
    print(f"  bad data, with ftrain     {rescued:.4f}")
    for line in decisions:
        print(f"  {line.strip()}")
    return 0 if rescued == rescued and rescued < clean + 0.1 else 1


if __name__ == "__main__":
    raise SystemExit(main())
