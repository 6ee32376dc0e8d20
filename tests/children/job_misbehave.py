"""Children that misbehave without the shim's help: exit N, ignore SIGTERM and hang, print
gigabytes, crash at start-up. argv[1] names the behaviour."""

import os
import signal
import sys
import time

mode = sys.argv[1]
if mode == "exit":
    sys.exit(int(sys.argv[2]))
if mode == "ignore-term-hang":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    print("ignoring SIGTERM", flush=True)
    pid = os.fork()
    if pid == 0:  # a worker that ignores it too
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        while True:
            time.sleep(1)
    print(f"worker {pid}", flush=True)
    while True:
        time.sleep(1)
if mode == "flood":
    line = b"x" * 1023 + b"\n"
    out = sys.stdout.buffer
    for _ in range(int(sys.argv[2])):
        out.write(line * 64)
    out.flush()
    sys.exit(0)
raise SystemExit(f"unknown mode {mode}")
