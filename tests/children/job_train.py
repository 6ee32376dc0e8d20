"""A small shim-using training loop for end-to-end tests (no model; torch only with ckpt).

Config (via ftrain.config): train.steps, train.batch_size, train.grad_accum, train.ckpt_every
(0: no checkpoints, so torch is never imported), train.sleep (seconds per step).
Prints "resumed from step N" and "config batch_size=B grad_accum=G" so tests can check
what each attempt received. argv: optional "spawn-grandchild" starts a sleeping
grandchild in a session of its own (like torchrun's ranks) before training;
"hang-ignoring-term" hangs at step 3 with SIGTERM ignored.
"""

import subprocess
import sys
import time

import ftrain

cfg = ftrain.config(defaults={"train": {"steps": 20, "batch_size": 8, "grad_accum": 1, "ckpt_every": 0,
                                        "sleep": 0.01}, "optim": {"lr": 0.1}})
t = cfg["train"]
print(f"config batch_size={t['batch_size']} grad_accum={t['grad_accum']} lr={cfg['optim']['lr']}", flush=True)
if "spawn-grandchild" in sys.argv:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"], start_new_session=True)
    print(f"grandchild {child.pid}", flush=True)
if "deaf-to-term" in sys.argv:  # a trainer that ignores SIGTERM (and so outlives a dead supervisor)
    import signal
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
start = 0
state = ftrain.load_checkpoint() if t["ckpt_every"] else None
if state is not None:
    start = int(state["step"]) + 1
    print(f"resumed from step {state['step']}", flush=True)
for step in range(start, t["steps"]):
    if ftrain.should_skip(step):
        print(f"skipped {step}", flush=True)
        continue
    if "hang-ignoring-term" in sys.argv and step == 3:
        import signal
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print("hanging, deaf to SIGTERM", flush=True)
        while True:
            time.sleep(1)
    time.sleep(t["sleep"])
    ftrain.log(step, loss=1.0 / (step + 1) + 0.01 * (step % 3), grad_norm=0.5)
    stop = ftrain.should_stop()   # once a step: a TERM between two calls would exit unsaved
    if t["ckpt_every"] and ((step + 1) % t["ckpt_every"] == 0 or stop):
        ftrain.save_checkpoint({"step": step}, step)
    if stop:
        print(f"stopping at step {step}", flush=True)
        sys.exit(0)
print("finished", flush=True)
