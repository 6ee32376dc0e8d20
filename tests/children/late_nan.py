"""Logs a NaN while its supervisor is stopped (SIGSTOP), then finishes and exits 0: the
supervisor, continued only after this process is gone, reads the NaN after the exit, as a
supervisor descheduled on a loaded machine would. Only in attempt 1; later attempts are clean.

    late_nan.py PIDFILE [segv]    (segv: die by SIGSEGV after the NaN, not exit 0)
"""

import os
import signal
import sys
import time

import ftrain

first = os.environ.get("FTRAIN_ATTEMPT") == "1"
for step in range(10):
    if step == 5 and first:
        with open(sys.argv[1], "w") as f:
            f.write(f"{os.getpid()} {os.getppid()}\n")
        os.kill(os.getppid(), signal.SIGSTOP)
        while open(f"/proc/{os.getppid()}/stat").read().rsplit(")", 1)[1].split()[0] != "T":
            time.sleep(0.001)   # stopped for sure, not about to read one more line
    ftrain.log(step, loss=float("nan") if step == 5 and first else 1.0 / (step + 1))
    if step == 7 and first and sys.argv[2:] == ["segv"]:
        import ctypes
        ctypes.string_at(0)
print("done", flush=True)
