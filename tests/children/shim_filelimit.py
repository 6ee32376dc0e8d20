"""Saves one checkpoint, then another under a 1 MiB file-size limit (RLIMIT_FSIZE), so the
second save meets a real write error (EFBIG) from the kernel. Prints the error as JSON."""

from __future__ import annotations

import json
import resource
import signal
import sys

import torch

import ftrain


def main() -> int:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # get EFBIG from write() instead of dying
    first = ftrain.save_checkpoint({"w": torch.zeros(1000)}, 10)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    try:
        ftrain.save_checkpoint({"w": torch.zeros(1 << 20)}, 20)
    except OSError as exc:
        print(json.dumps({"first": first, "type": type(exc).__name__, "errno": exc.errno, "message": str(exc)}))
        return 0
    print(json.dumps({"first": first, "type": None}))
    return 1


if __name__ == "__main__":
    sys.exit(main())
