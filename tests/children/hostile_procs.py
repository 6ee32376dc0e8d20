"""A shim trainer that misbehaves as a process: argv MODES PIDFILE STEPS SLEEP.

MODES, comma-separated: ``daemon``: before training, leave a daemon (double fork, ``setsid``, stdio on
/dev/null, SIGTERM ignored) that writes its pid to PIDFILE.<attempt> and sleeps forever;
it left the process group and, once its parent exited, the tree. ``stop-self``: at step 3
the trainer stops itself (SIGSTOP). ``deaf``: SIGTERM ignored (outlives a dead supervisor).
Each attempt prints ``trainer PID``; it logs STEPS steps, SLEEP s apart, and leaves at
``should_stop()``.
"""

import os
import signal
import sys
import time

import ftrain

modes, pidfile, steps, pause = set(sys.argv[1].split(",")), sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
attempt = os.environ.get("FTRAIN_ATTEMPT", "0")
print(f"trainer {os.getpid()}", flush=True)
if "deaf" in modes:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
if "daemon" in modes:
    ready_r, ready_w = os.pipe()
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            null = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(null, fd)
            with open(f"{pidfile}.{attempt}.tmp", "w") as f:
                f.write(str(os.getpid()))
            os.rename(f"{pidfile}.{attempt}.tmp", f"{pidfile}.{attempt}")
            os.write(ready_w, b"x")
            while True:
                time.sleep(1)
        os._exit(0)
    os.close(ready_w)
    os.read(ready_r, 1)
    os.wait()
    print(f"daemon {open(f'{pidfile}.{attempt}').read()}", flush=True)
for step in range(steps):
    if "stop-self" in modes and step == 3:
        os.kill(os.getpid(), signal.SIGSTOP)
    ftrain.log(step, loss=1.0 / (step + 1))
    time.sleep(pause)
    if ftrain.should_stop():
        print(f"stopping at step {step}", flush=True)
        sys.exit(0)
print("finished", flush=True)
