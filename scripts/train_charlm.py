"""A small real training job for the ftrain demo: a character-level transformer language
model on Tiny Shakespeare (shipped in scripts/data/), on the CPU, in well under a minute.

It uses the shim the way a real script would: config from ftrain, resume from the
checkpoint ftrain hands it, overrides applied *after* loading (an old checkpoint must not
undo a lowered learning rate), metrics through ftrain.log, periodic checkpoints, a snapshot in host memory every
step (``ftrain.snapshot``: a crash costs about a step, not half the checkpoint interval), skip
windows, and a clean save-and-exit on preemption. It also runs without ftrain:
``python scripts/train_charlm.py``.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import ftrain

DEFAULTS = {
    "data": {"path": str(Path(__file__).parent / "data" / "tinyshakespeare.txt"), "corrupt_steps": "",
             "corrupt_scale": 1e38},
    "model": {"dim": 64, "heads": 4, "layers": 2, "context": 64},
    "train": {"steps": 300, "batch_size": 32, "grad_accum": 1, "ckpt_every": 25, "seed": 1234,
              "clip": 1.0, "threads": 1},
    "optim": {"lr": 3e-3, "weight_decay": 0.01},
}


class CharLM(nn.Module):
    def __init__(self, vocab: int, dim: int, heads: int, layers: int, context: int) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(context, dim)
        layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(dim, vocab)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(context), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[1]
        h = self.tok(x) + self.pos(torch.arange(t))
        h = self.blocks(h, mask=self.mask[:t, :t], is_causal=True)
        return self.head(h)


def parse_ranges(text: str) -> list[tuple[int, int]]:
    out = []
    for part in filter(None, (p.strip() for p in str(text).split(","))):
        a, _, b = part.partition("-")
        out.append((int(a), int(b or a)))
    return out


def batch(data: torch.Tensor, step: int, micro: int, cfg: dict, corrupt: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch of a step is a function of the step: a resumed run sees the same data."""
    g = torch.Generator().manual_seed(cfg["train"]["seed"] * 1_000_003 + step * 101 + micro)
    n, ctx = cfg["train"]["batch_size"], cfg["model"]["context"]
    ix = torch.randint(len(data) - ctx - 1, (n,), generator=g)
    x = torch.stack([data[i:i + ctx] for i in ix])
    y = torch.stack([data[i + 1:i + ctx + 1] for i in ix])
    if corrupt:  # a bad shard: every target is the same rare character
        y = torch.full_like(y, int(data.max()))
    return x, y


def forward_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, scale: float) -> torch.Tensor:
    """Cross-entropy; ``scale`` != 1 stands for a corrupted record whose values overflow (a bad
    fp16 sample, a broken image): the loss explodes and the gradients poison the weights."""
    logits = model(x)
    if scale != 1.0:
        logits = logits * scale
    return F.cross_entropy(logits.flatten(0, 1), y.flatten())


def apply_cli(cfg: dict, args: list[str]) -> None:
    """``key.sub=value`` arguments, for running without ftrain: ``python train_charlm.py train.steps=50``."""
    for arg in args:
        key, _, raw = arg.partition("=")
        *parents, leaf = key.split(".")
        node = cfg
        for part in parents:
            node = node[part]
        node[leaf] = type(node[leaf])(raw) if node.get(leaf) is not None else raw


@torch.no_grad()
def evaluate(model: nn.Module, data: torch.Tensor, cfg: dict, batches: int = 8) -> float:
    """Mean loss on fixed batches of ``data`` (the held-out text after the training slice)."""
    ctx = cfg["model"]["context"]
    g = torch.Generator().manual_seed(7)
    losses = []
    for _ in range(batches):
        ix = torch.randint(len(data) - ctx - 1, (32,), generator=g)
        x = torch.stack([data[i:i + ctx] for i in ix])
        y = torch.stack([data[i + 1:i + ctx + 1] for i in ix])
        losses.append(F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item())
    return sum(losses) / len(losses)


def main() -> None:
    cfg = ftrain.config(defaults=DEFAULTS)
    apply_cli(cfg, sys.argv[1:])
    torch.set_num_threads(cfg["train"]["threads"])
    torch.manual_seed(cfg["train"]["seed"])
    text = Path(cfg["data"]["path"]).read_text()
    chars = sorted(set(text))
    index = {c: i for i, c in enumerate(chars)}
    data = torch.tensor([index[c] for c in text[:200_000]], dtype=torch.long)
    held_out = torch.tensor([index[c] for c in text[200_000:260_000]], dtype=torch.long)
    m = cfg["model"]
    model = CharLM(len(chars), m["dim"], m["heads"], m["layers"], m["context"])
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["optim"]["lr"], weight_decay=cfg["optim"]["weight_decay"])

    start = 0
    state = ftrain.load_checkpoint()
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optim"])
        start = state["step"] + 1
        print(f"resumed from step {state['step']}", flush=True)
    for group in opt.param_groups:  # overrides win over what the checkpoint restored
        group["lr"] = cfg["optim"]["lr"]

    corrupt = parse_ranges(cfg["data"]["corrupt_steps"])
    accum = cfg["train"]["grad_accum"]
    t0 = time.time()
    for step in range(start, cfg["train"]["steps"]):
        if ftrain.should_skip(step):
            continue
        bad = any(a <= step <= b for a, b in corrupt)
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for micro in range(accum):
            x, y = batch(data, step, micro, cfg, bad)
            loss = forward_loss(model, x, y, cfg["data"]["corrupt_scale"] if bad else 1.0) / accum
            loss.backward()
            total += loss.item()
        grad_norm = nn.utils.clip_grad_norm_(model.parameters(), cfg["train"]["clip"])
        opt.step()
        ftrain.log(step, loss=total, grad_norm=grad_norm, lr=opt.param_groups[0]["lr"])
        if step % 50 == 0:
            print(f"step {step:4d}  loss {total:.3f}  ({time.time() - t0:.1f}s)", flush=True)
        last = step == cfg["train"]["steps"] - 1
        if (step + 1) % cfg["train"]["ckpt_every"] == 0 or last or ftrain.should_stop():
            ftrain.save_checkpoint({"model": model.state_dict(), "optim": opt.state_dict(), "step": step}, step)
        if ftrain.should_stop():
            print(f"asked to stop: saved step {step}, leaving", flush=True)
            return
        # a copy in the supervisor's host memory, every step the budget allows: a crash
        # resumes from it (about a step back) instead of from the last checkpoint
        ftrain.snapshot({"model": model.state_dict(), "optim": opt.state_dict(), "step": step}, step)
    print(f"done: final loss {total:.3f}, eval loss {evaluate(model, held_out, cfg):.4f} ({time.time() - t0:.1f}s)",
          flush=True)
    if math.isnan(total):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
