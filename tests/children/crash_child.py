"""A child that ends in one real way, for the classifier's tests. argv[1] names the way.

Deaths are real (SIGSEGV from a null read, SIGBUS from a truncated mapping, abort(), signals
sent to itself, a real MemoryError, torch's real CPU allocator failure, a DataLoader worker
that dies). What needs a GPU or a cluster is raised with the exact type and text PyTorch
uses: CUDA OOM, an illegal memory access, an NCCL error, the NCCL watchdog's abort.

    rank-segv / rank-record   run under torchrun: rank 1 fails, rank 0 waits to be stopped
    forked OUTDIR WAY...      import torch once, end each WAY in a forked copy of this process
                              (output in OUTDIR/WAY.log), print {way: exit code} as JSON
    oom-cgroup PROCS_FILE     join that cgroup, run a memory hog in it, print the OOM-kill
                              counter before and after, the hog's exit code and output
"""

from __future__ import annotations

import ctypes
import faulthandler
import json
import mmap
import os
import signal
import subprocess
import sys
import tempfile
import time

# The exact texts, as PyTorch 2.x prints them (c10/cuda/CUDACachingAllocator.cpp,
# c10/cuda/CUDAException.cpp, torch/csrc/distributed/c10d/NCCLUtils.hpp, ProcessGroupNCCL.cpp).
CUDA_OOM = (
    "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.15 GiB of which "
    "1.06 GiB is free. Including non-PyTorch memory, this process has 78.08 GiB memory in use. Of the "
    "allocated memory 75.52 GiB is allocated by PyTorch, and 1.03 GiB is reserved by PyTorch but "
    "unallocated. If reserved but unallocated memory is large try setting "
    "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to avoid fragmentation.  See documentation for "
    "Memory Management  (https://pytorch.org/docs/stable/notes/cuda.html#environment-variables)"
)
ILLEGAL_ACCESS = (
    "CUDA error: an illegal memory access was encountered\n"
    "Search for `cudaErrorIllegalAddress' in "
    "https://docs.nvidia.com/cuda/cuda-runtime-api/group__CUDART__TYPES.html for more information.\n"
    "CUDA kernel errors might be asynchronously reported at some other API call, so the stacktrace "
    "below might be incorrect.\n"
    "For debugging consider passing CUDA_LAUNCH_BLOCKING=1\n"
    "Compile with `TORCH_USE_CUDA_DSA` to enable device-side assertions.\n"
)
NCCL_ERROR = (
    "NCCL error in: /pytorch/torch/csrc/distributed/c10d/NCCLUtils.hpp:275, unhandled system error "
    "(run with NCCL_DEBUG=INFO for details), NCCL version 2.21.5\n"
    "ncclSystemError: System call (e.g. socket, malloc) or external library call failed or device error. \n"
    "Last error:\n"
    "socketStartConnect: Connect to 10.0.3.17<43521> failed : Software caused connection abort"
)
WATCHDOG_TIMEOUT = """\
[rank1]:[E1129 06:27:39.715298746 ProcessGroupNCCL.cpp:632] [Rank 1] Watchdog caught collective operation timeout: WorkNCCL(SeqNum=7753, OpType=ALLREDUCE, NumelIn=544997376, NumelOut=544997376, Timeout(ms)=600000) ran for 600061 milliseconds before timing out.
[rank1]:[E1129 06:27:39.715588844 ProcessGroupNCCL.cpp:2271] [PG ID 0 PG GUID 0(default_pg) Rank 1] failure detected by watchdog at work sequence id: 7753 PG status: last enqueued work: 7755, last completed work: 7752
[rank1]:[E1129 06:27:39.715601227 ProcessGroupNCCL.cpp:670] Stack trace of the failed collective not found, potentially because FlightRecorder is disabled. You can enable it by setting TORCH_NCCL_TRACE_BUFFER_SIZE to a non-zero value.
[rank1]:[E1129 06:27:39.715610883 ProcessGroupNCCL.cpp:684] [Rank 1] Some NCCL operations have failed or timed out. Due to the asynchronous nature of CUDA kernels, subsequent GPU operations might run on corrupted/incomplete data.
[rank1]:[E1129 06:27:39.715617156 ProcessGroupNCCL.cpp:698] [Rank 1] To avoid data inconsistency, we are taking the entire process down.
terminate called after throwing an instance of 'c10::DistBackendError'
  what():  [PG ID 0 PG GUID 0(default_pg) Rank 1] Process group watchdog thread terminated with exception: [Rank 1] Watchdog caught collective operation timeout: WorkNCCL(SeqNum=7753, OpType=ALLREDUCE, NumelIn=544997376, NumelOut=544997376, Timeout(ms)=600000) ran for 600061 milliseconds before timing out.
Exception raised from checkTimeout at /pytorch/torch/csrc/distributed/c10d/ProcessGroupNCCL.cpp:635 (most recent call first):
frame #0: c10::Error::Error(c10::SourceLocation, std::string) + 0x96 (0x7f298896c1b6 in /usr/local/lib/python3.11/site-packages/torch/lib/libc10.so)
"""
WATCHDOG_ILLEGAL_ACCESS = """\
[rank0]:[E1129 06:27:39.735407831 ProcessGroupNCCL.cpp:1515] [PG ID 0 PG GUID 0(default_pg) Rank 0] Process group watchdog thread terminated with exception: CUDA error: an illegal memory access was encountered
CUDA kernel errors might be asynchronously reported at some other API call, so the stacktrace below might be incorrect.
For debugging consider passing CUDA_LAUNCH_BLOCKING=1
Compile with `TORCH_USE_CUDA_DSA` to enable device-side assertions.

Exception raised from c10_cuda_check_implementation at /pytorch/c10/cuda/CUDAException.cpp:43 (most recent call first):
frame #0: c10::Error::Error(c10::SourceLocation, std::string) + 0x96 (0x7f9ce26cbf86 in /usr/local/lib/python3.11/site-packages/torch/lib/libc10.so)
frame #3: c10d::ProcessGroupNCCL::WorkNCCL::finishedGPUExecutionInternal() const + 0x56 (0x7f9c937c33e6 in /usr/local/lib/python3.11/site-packages/torch/lib/libtorch_cuda.so)

terminate called after throwing an instance of 'c10::DistBackendError'
  what():  [PG ID 0 PG GUID 0(default_pg) Rank 0] Process group watchdog thread terminated with exception: CUDA error: an illegal memory access was encountered
"""


def die_by(sig: int) -> None:
    """Flush, then take the signal's default action: a real death by ``sig``."""
    sys.stdout.flush()
    sys.stderr.flush()
    if sig != signal.SIGKILL:    # KILL cannot be caught, nor its handler reset
        signal.signal(sig, signal.SIG_DFL)
    os.kill(os.getpid(), sig)
    time.sleep(10)


def bus_error() -> None:
    """Read a mapped page whose file was truncated under it: the kernel answers SIGBUS."""
    with tempfile.TemporaryFile() as f:
        f.write(b"\0" * mmap.PAGESIZE)
        f.flush()
        view = mmap.mmap(f.fileno(), mmap.PAGESIZE)
        f.truncate(0)
        view[0]


class Dying:
    """A dataset whose DataLoader worker dies by ``sig`` on its first item."""

    def __init__(self, sig: int) -> None:
        self.sig = sig

    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int) -> int:
        if self.sig == signal.SIGSEGV:
            ctypes.string_at(0)
        os.kill(os.getpid(), self.sig)
        time.sleep(10)
        return i


def dataloader(sig: int) -> None:
    from torch.utils.data import DataLoader

    for _ in DataLoader(Dying(sig), num_workers=1):  # type: ignore[arg-type]
        pass


def oom_cgroup(procs_file: str) -> None:
    """Join the cgroup, then run a hog that its memory limit kills; report what we saw."""
    from ftrain.classify import read_oom_kill_count

    with open(procs_file, "w") as f:
        f.write(str(os.getpid()))
    before = read_oom_kill_count()
    hog = ("blocks = []\n"
           "for _ in range(512):\n"
           "    blocks.append(bytearray(1 << 20))\n"
           "print('the limit did not hold', flush=True)\n")
    proc = subprocess.run([sys.executable, "-c", hog], capture_output=True, text=True, timeout=20)
    after = read_oom_kill_count()
    print(json.dumps({"before": before, "after": after, "returncode": proc.returncode,
                      "output": (proc.stdout + proc.stderr).splitlines()}))


def rank_fault(kind: str) -> None:
    """Under torchrun: rank 1 fails, rank 0 waits until torchrun stops it."""
    if os.environ.get("RANK") != "1":
        time.sleep(30)
        return
    if kind == "segv":
        sys.stdout.flush()
        ctypes.string_at(0)
    from torch.distributed.elastic.multiprocessing.errors import record

    @record
    def main() -> None:
        raise ValueError("rank 1 could not parse shard 17: unexpected end of data")

    main()


def forked(outdir: str, *ways: str) -> None:
    """Pay torch's import (seconds) once, then let each way end a copy of this process.

    Each copy ends as a fresh process would: a signal kills it; an uncaught exception is
    printed by ``sys.excepthook`` and the copy exits 1, as the interpreter does, but by
    ``os._exit``: a forked torch process's normal teardown takes seconds of copy-on-write.
    The parent reaps each and reports ``os.waitstatus_to_exitcode``, as ``subprocess`` does.
    """
    import torch.distributed  # noqa: F401
    import torch.utils.data  # noqa: F401

    pids: dict[str, int] = {}
    for way in ways:
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            fd = os.open(os.path.join(outdir, f"{way}.log"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            os.close(fd)
            code = 0
            try:
                main(way)
            except BaseException:
                sys.excepthook(*sys.exc_info())
                code = 1
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        pids[way] = pid
    codes = {way: os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for way, pid in pids.items()}
    print(json.dumps(codes), flush=True)


def main(way: str, *args: str) -> None:
    print(f"crash_child {way} pid {os.getpid()}", flush=True)
    if way == "segv":
        ctypes.string_at(0)
    elif way == "segv-faulthandler":
        faulthandler.enable()
        ctypes.string_at(0)
    elif way == "bus":
        faulthandler.enable()
        bus_error()
    elif way == "abort":
        os.abort()
    elif way == "kill":
        die_by(signal.SIGKILL)
    elif way == "term":
        die_by(signal.SIGTERM)
    elif way == "stop-exit0":    # a cooperative script: TERM sets a flag, the loop leaves cleanly
        stop: list[int] = []
        signal.signal(signal.SIGTERM, lambda signum, frame: stop.append(signum))
        os.kill(os.getpid(), signal.SIGTERM)
        while not stop:
            time.sleep(0.01)
        print("stop requested: saved and leaving", flush=True)
        sys.exit(0)
    elif way == "exit3":
        print("epoch 3: validation data missing, giving up", flush=True)
        sys.exit(3)
    elif way == "value-error":
        raise ValueError("learning rate must be positive, got -0.1")
    elif way == "memory-error":
        bytearray(1 << 60)
    elif way == "cpu-alloc":
        import torch

        torch.empty(1 << 50, dtype=torch.uint8)
    elif way == "cuda-oom":
        import torch

        raise torch.OutOfMemoryError(CUDA_OOM)
    elif way == "cuda-error":
        import torch

        raise torch.AcceleratorError(ILLEGAL_ACCESS)
    elif way == "nccl-error":
        from torch.distributed import DistBackendError

        raise DistBackendError(NCCL_ERROR)
    elif way == "nccl-watchdog":
        sys.stderr.write(WATCHDOG_TIMEOUT)
        os.abort()
    elif way == "watchdog-illegal-access":
        sys.stderr.write(WATCHDOG_ILLEGAL_ACCESS)
        os.abort()
    elif way == "dataloader-killed":
        dataloader(signal.SIGKILL)
    elif way == "dataloader-segv":
        dataloader(signal.SIGSEGV)
    elif way == "oom-cgroup":
        oom_cgroup(args[0])
    elif way == "forked":
        forked(*args)
    elif way.startswith("rank-"):
        rank_fault(way.removeprefix("rank-"))
    else:
        raise SystemExit(f"crash_child: unknown way {way!r}")


if __name__ == "__main__":
    main(*sys.argv[1:])
