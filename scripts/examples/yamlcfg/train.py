"""A regression model trained in the style of research repositories driven by one YAML
file (`python train.py --config configs/run.yaml`): sections `model`, `train`, `data`;
progress through the `logging` module on stderr; checkpoints `ckpt_dir/model_step{N}.pt`
every `train.ckpt_every` steps; `--resume PATH` to continue. It knows nothing of ftrain;
configs/examples/yamlcfg.policy.yaml tells ftrain to write the config file it reads.

The data is made up so that nothing is downloaded: y = sin(w·x) + noise for a fixed w.

    $ python scripts/examples/yamlcfg/train.py --config configs/examples/yamlcfg.config.yaml

Rehearsal knobs, read from the environment so a supervisor can be tried on this script
without editing it:
  EXAMPLE_CRASH_AT=N   at step N of a run started from scratch the process aborts
                       (a failed assertion in native code, once)
  EXAMPLE_NAN_AT=N     at step N of a run started from scratch a weight turns NaN
                       (silent data corruption on a flaky device, once)
  EXAMPLE_STEP_MS=T    every step takes at least T ms, as on a real device
"""

import argparse
import logging
import os
import time

import torch
import torch.nn as nn
import yaml

log = logging.getLogger("train")


def build_model(cfg):
    layers, width = [], cfg["inputs"]
    for _ in range(cfg["depth"]):
        layers += [nn.Linear(width, cfg["hidden"]), nn.GELU()]
        width = cfg["hidden"]
    return nn.Sequential(*layers, nn.Linear(width, 1))


def batches(cfg, step, micro):
    """The batch of a step is a function of the step, so a resumed run sees the same data."""
    g = torch.Generator().manual_seed(cfg["data"]["seed"] * 1_000_003 + step * 31 + micro)
    w = torch.linspace(-1.0, 1.0, cfg["model"]["inputs"])
    x = torch.randn(cfg["train"]["batch_size"], cfg["model"]["inputs"], generator=g)
    y = torch.sin(x @ w).unsqueeze(1) + cfg["data"]["noise"] * torch.randn(x.shape[0], 1, generator=g)
    return x, y


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True, help="YAML file with model, train and data sections")
    parser.add_argument("--resume", default=None, help="checkpoint to continue from")
    args = parser.parse_args()
    with open(args.config) as f:
        cfg = yaml.safe_load(f)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    tc = cfg["train"]
    torch.manual_seed(tc["seed"])
    torch.set_num_threads(1)
    crash_at = int(os.environ.get("EXAMPLE_CRASH_AT", -1))
    nan_at = int(os.environ.get("EXAMPLE_NAN_AT", -1))
    step_s = int(os.environ.get("EXAMPLE_STEP_MS", 0)) / 1000

    model = build_model(cfg["model"])
    opt = torch.optim.AdamW(model.parameters(), lr=tc["lr"], weight_decay=tc["weight_decay"])
    start = 0
    if args.resume:
        state = torch.load(args.resume, map_location="cpu")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optim"])
        start = state["step"]
        log.info("resumed from %s at step %d", args.resume, start)
    for group in opt.param_groups:  # the config wins over the learning rate saved with the optimizer
        group["lr"] = tc["lr"]
    log.info("batch_size=%d grad_accum=%d lr=%g", tc["batch_size"], tc["grad_accum"], tc["lr"])
    os.makedirs(tc["ckpt_dir"], exist_ok=True)

    t0 = time.time()
    for step in range(start + 1, tc["steps"] + 1):
        if step == crash_at and not args.resume:
            os.abort()
        if step_s:
            time.sleep(step_s)
        if step == nan_at and not args.resume:
            with torch.no_grad():
                model[0].weight[0, 0] = float("nan")
        opt.zero_grad(set_to_none=True)
        for micro in range(tc["grad_accum"]):
            x, y = batches(cfg, step, micro)
            loss = nn.functional.mse_loss(model(x), y) / tc["grad_accum"]
            loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc["clip"])
        opt.step()
        if step % tc["log_every"] == 0:
            dt, t0 = time.time() - t0, time.time()
            log.info("step=%d loss=%.6f grad_norm=%.4f lr=%.3g samples/s=%.0f", step,
                     loss.item() * tc["grad_accum"], grad_norm.item(), tc["lr"],
                     tc["log_every"] * tc["batch_size"] * tc["grad_accum"] / max(dt, 1e-9))
        if step % tc["ckpt_every"] == 0:
            path = os.path.join(tc["ckpt_dir"], f"model_step{step}.pt")
            torch.save({"model": model.state_dict(), "optim": opt.state_dict(), "step": step}, path)
            log.info("saved %s", path)
    log.info("done: %d steps", tc["steps"])


if __name__ == "__main__":
    main()
