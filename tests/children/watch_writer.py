"""Appends metrics lines the way the shim does (one os.write per line), with small sleeps.

Usage: watch_writer.py PATH COUNT [DELAY_S]. Waits before creating the file (a file that
appears late), then writes COUNT metric lines, one of them split across two writes with a
pause in between, plus a control line with step null, one garbage line, one JSON array and
one metric line without a step. Prints "done" when finished.
"""

from __future__ import annotations

import json
import os
import sys
import time


def main() -> None:
    path, count = sys.argv[1], int(sys.argv[2])
    delay = float(sys.argv[3]) if len(sys.argv) > 3 else 0.002
    time.sleep(0.2)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.write(fd, (json.dumps({"ftrain": "config", "step": None, "t": time.time(), "attempt": 1,
                              "digest": "abc"}) + "\n").encode())
    split_at = count // 2
    for step in range(count):
        line = (json.dumps({"step": step, "t": time.time(), "attempt": 1, "loss": 4.0 / (1 + step),
                            "grad_norm": 1.0}) + "\n").encode()
        if step == split_at:
            os.write(fd, line[:10])
            time.sleep(0.5)  # the reader polls in between (even when descheduled a while) and must keep the half line
            os.write(fd, line[10:])
        else:
            os.write(fd, line)
        if step == count // 4:
            os.write(fd, b"Traceback (most recent call last): not json\n")
        if step == count // 3:
            os.write(fd, b"[1, 2, 3]\n")
            os.write(fd, b'{"loss": 1.0, "t": 0}\n')
        time.sleep(delay)
    os.close(fd)
    print("done", flush=True)


if __name__ == "__main__":
    main()
