"""classify: every pattern against the real texts, precedence, real dying children (and a
real torchrun), torchelastic error files, and the cgroup OOM-kill counter.

Texts that need a GPU or a cluster are the exact strings PyTorch, CUDA, NCCL, gloo, Slurm
and the kernel print (FAILURES.md); those marked "this machine" were captured from torch
2.13 here.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

import ftrain.classify as classify_module
from ftrain.classify import PATTERNS, classify, classify_error_file, read_oom_kill_count
from ftrain.kinds import Failure
from ftrain.kinds import FailureKind as K

CHILD = Path(__file__).resolve().parent / "children" / "crash_child.py"

CUDA_OOM_LINE = (
    "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of "
    "79.15 GiB of which 1.06 GiB is free. Including non-PyTorch memory, this process has 78.08 GiB memory in "
    "use. Of the allocated memory 75.52 GiB is allocated by PyTorch, and 1.03 GiB is reserved by PyTorch but "
    "unallocated. If reserved but unallocated memory is large try setting "
    "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to avoid fragmentation.  See documentation for Memory "
    "Management  (https://pytorch.org/docs/stable/notes/cuda.html#environment-variables)"
)
CUDA_OOM = f"""\
Traceback (most recent call last):
  File "/home/user/train.py", line 212, in <module>
    main()
  File "/home/user/train.py", line 187, in main
    loss = model(batch).loss
           ^^^^^^^^^^^^
  File "/usr/local/lib/python3.11/site-packages/torch/nn/modules/linear.py", line 125, in forward
    return F.linear(input, self.weight, self.bias)
           ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^
{CUDA_OOM_LINE}
"""
CUDA_OOM_CAPACTY = """\
  File "/home/vscode/.local/lib/python3.10/site-packages/torch/nn/modules/linear.py", line 114, in forward
    return F.linear(input, self.weight, self.bias)
torch.cuda.OutOfMemoryError: CUDA out of memory. Tried to allocate 1.15 GiB. GPU 0 has a total capacty of 23.69 GiB of which 912.81 MiB is free. Process 454738 has 22.79 GiB memory in use. Of the allocated memory 21.50 GiB is allocated by PyTorch, and 1001.89 MiB is reserved by PyTorch but unallocated. If reserved but unallocated memory is large try setting max_split_size_mb to avoid fragmentation.  See documentation for Memory Management and PYTORCH_CUDA_ALLOC_CONF
"""
CUDA_OOM_AS_RUNTIME_ERROR = """\
Traceback (most recent call last):
  File "train.py", line 77, in <module>
    outputs = model(inputs)
RuntimeError: CUDA out of memory. Tried to allocate 36.00 MiB (GPU 0; 7.93 GiB total capacity; 130.35 MiB already allocated; 47.06 MiB free; 188.00 MiB reserved in total by PyTorch) If reserved memory is >> allocated memory try setting max_split_size_mb to avoid fragmentation.  See documentation for Memory Management and PYTORCH_CUDA_ALLOC_CONF
"""
ILLEGAL_ACCESS = """\
Traceback (most recent call last):
  File "/home/user/train.py", line 90, in <module>
    torch.cuda.synchronize()
  File "/usr/local/lib/python3.11/site-packages/torch/cuda/__init__.py", line 1040, in synchronize
    return torch._C._cuda_synchronize()
           ^^^^^^^^^^^^^^^^^^^^^^^^^^^^
torch.AcceleratorError: CUDA error: an illegal memory access was encountered
Search for `cudaErrorIllegalAddress' in https://docs.nvidia.com/cuda/cuda-runtime-api/group__CUDART__TYPES.html for more information.
CUDA kernel errors might be asynchronously reported at some other API call, so the stacktrace below might be incorrect.
For debugging consider passing CUDA_LAUNCH_BLOCKING=1
Compile with `TORCH_USE_CUDA_DSA` to enable device-side assertions.
"""
DEVICE_ASSERT = """\
/pytorch/aten/src/ATen/native/cuda/IndexKernel.cu:93: operator(): block: [0,0,0], thread: [32,0,0] Assertion `-sizes[i] <= index && index < sizes[i] && "index out of bounds"` failed.
/pytorch/aten/src/ATen/native/cuda/IndexKernel.cu:93: operator(): block: [0,0,0], thread: [33,0,0] Assertion `-sizes[i] <= index && index < sizes[i] && "index out of bounds"` failed.
Traceback (most recent call last):
  File "train.py", line 51, in <module>
    loss.item()
RuntimeError: CUDA error: device-side assert triggered
CUDA kernel errors might be asynchronously reported at some other API call, so the stacktrace below might be incorrect.
For debugging consider passing CUDA_LAUNCH_BLOCKING=1
Compile with `TORCH_USE_CUDA_DSA` to enable device-side assertions.
"""
NCCL_UNHANDLED_CUDA = """\
[rank7]: Traceback (most recent call last):
[rank7]:   File "/workspace/train.py", line 40, in <module>
[rank7]:     dist.barrier()
[rank7]: torch.distributed.DistBackendError: NCCL error in: ../torch/csrc/distributed/c10d/NCCLUtils.hpp:275, unhandled cuda error (run with NCCL_DEBUG=INFO for details), NCCL version 2.20.5
[rank7]: ncclUnhandledCudaError: Call to CUDA function failed.
[rank7]: Last error:
[rank7]: Cuda failure 1 'invalid argument'
"""
WATCHDOG_TIMEOUT = """\
[rank0]:[E321 02:07:08.408271257 ProcessGroupNCCL.cpp:607] [Rank 0] Watchdog caught collective operation timeout: WorkNCCL(SeqNum=1580, OpType=ALLREDUCE, NumelIn=466119168, NumelOut=466119168, Timeout(ms)=600000) ran for 600060 milliseconds before timing out.
[rank4]:[E321 02:07:08.414640780 ProcessGroupNCCL.cpp:607] [Rank 4] Watchdog caught collective operation timeout: WorkNCCL(SeqNum=1580, OpType=ALLREDUCE, NumelIn=466119168, NumelOut=466119168, Timeout(ms)=600000) ran for 600067 milliseconds before timing out.
[rank0]:[E321 02:07:08.465150152 ProcessGroupNCCL.cpp:1664] [PG 1 Rank 0] Exception (either an error or timeout) detected by watchdog at work: 1580, last enqueued NCCL work: 1582, last completed NCCL work: 1579.
[rank0]:[E321 02:07:08.465300000 ProcessGroupNCCL.cpp:630] [Rank 0] Some NCCL operations have failed or timed out. Due to the asynchronous nature of CUDA kernels, subsequent GPU operations might run on corrupted/incomplete data.
[rank0]:[E321 02:07:08.465400000 ProcessGroupNCCL.cpp:636] [Rank 0] To avoid data inconsistency, we are taking the entire process down.
"""
WATCHDOG_ILLEGAL_ACCESS = """\
[rank1]:[E1126 15:19:49.735407831 ProcessGroupNCCL.cpp:1515] [PG 0 (default_pg) Rank 1] Process group watchdog thread terminated with exception: CUDA error: an illegal memory access was encountered
Compile with `TORCH_USE_CUDA_DSA` to enable device-side assertions.

Exception raised from c10_cuda_check_implementation at ../c10/cuda/CUDAException.cpp:43 (most recent call first):
frame #0: c10::Error::Error(c10::SourceLocation, std::string) + 0x96 (0x7f9ce26cbf86 in /home/ubuntu/.venv/lib/python3.12/site-packages/torch/lib/libc10.so)
frame #3: c10d::ProcessGroupNCCL::WorkNCCL::finishedGPUExecutionInternal() const + 0x56 (0x7f9c937c33e6 in /home/ubuntu/.venv/lib/python3.12/site-packages/torch/lib/libtorch_cuda.so)
frame #5: c10d::ProcessGroupNCCL::watchdogHandler() + 0x1da (0x7f2b54d772ba in /home/ubuntu/.venv/lib/python3.12/site-packages/torch/lib/libtorch_cuda.so)

terminate called after throwing an instance of 'c10::DistBackendError'
  what():  [PG ID 0 PG GUID 0(default_pg) Rank 1] Process group watchdog thread terminated with exception: CUDA error: an illegal memory access was encountered
CUDA kernel errors might be asynchronously reported at some other API call, so the stacktrace below might be incorrect.
For debugging consider passing CUDA_LAUNCH_BLOCKING=1
Compile with `TORCH_USE_CUDA_DSA` to enable device-side assertions.
"""
WATCHDOG_STUCK = """\
[rank2]:[E704 13:48:58.260494728 ProcessGroupNCCL.cpp:1746] [PG ID 0 PG GUID 0(default_pg) Rank 2] ProcessGroupNCCL's watchdog got stuck for 480 seconds without making progress in monitoring enqueued collectives. This typically indicates a NCCL/CUDA API (e.g., CudaEventDestroy) hang blocking the watchdog, and could be triggered by another thread holding the GIL inside a CUDA api (for example, CudaEventDestroy), or other deadlock-prone behaviors.If you suspect the watchdog is not actually stuck and a longer timeout would help, you can either increase the timeout (TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC) to a larger value or disable the heartbeat monitor (TORCH_NCCL_ENABLE_MONITORING=0).If either of aforementioned helps, feel free to file an issue to PyTorch about the short timeout or false positive abort; otherwise, please attempt to debug the hang.
[rank2]:[E704 13:48:58.260620373 ProcessGroupNCCL.cpp:1533] [PG ID 0 PG GUID 0(default_pg) Rank 2] ProcessGroupNCCL preparing to dump debug info. Include stack trace: 1
"""
DATALOADER_KILLED = """\
Traceback (most recent call last):
  File "/usr/local/lib/python3.11/site-packages/torch/utils/data/_utils/signal_handling.py", line 73, in handler
    _error_if_any_worker_fails()
RuntimeError: DataLoader worker (pid 4242) is killed by signal: Killed. 

The above exception was the direct cause of the following exception:

Traceback (most recent call last):
  File "train.py", line 120, in <module>
    for batch in loader:
  File "/usr/local/lib/python3.11/site-packages/torch/utils/data/dataloader.py", line 1304, in _try_get_data
    raise RuntimeError(
RuntimeError: DataLoader worker (pid(s) 4242) exited unexpectedly
"""
# This machine: torchrun 2.13, rank 1 of 2 died by SIGSEGV (faulthandler on, as under the shim).
TORCHRUN_SEGV = """\
Fatal Python error: Segmentation fault

Current thread 0x00007f0f8a49bb80 (most recent call first):
  File "/root/.pyenv/versions/3.11.7/lib/python3.11/ctypes/__init__.py", line 519 in string_at
  File "/tmp/cls/seg.py", line 8 in main
W1129 06:27:39.212000 12715 torch/distributed/elastic/multiprocessing/api.py:1028] Sending process 12720 closing signal SIGTERM
E1129 06:27:39.246000 12715 torch/distributed/elastic/multiprocessing/api.py:1002] failed (exitcode: -11) local_rank: 1 (pid: 12721) of binary: /work/venv/bin/python3
Traceback (most recent call last):
  File "/work/venv/bin/torchrun", line 8, in <module>
    sys.exit(main())
             ^^^^^^
  File "/work/venv/lib/python3.11/site-packages/torch/distributed/launcher/api.py", line 383, in launch_agent
    raise ChildFailedError(
torch.distributed.elastic.multiprocessing.errors.ChildFailedError: 
=======================================================
seg.py FAILED
-------------------------------------------------------
Failures:
[1]:
  time      : 2026-11-29_06:27:39
  host      : localhost
  rank      : 0 (local_rank: 0)
  exitcode  : -15 (pid: 12720)  (SIGTERM)
  error_file: <N/A>
  traceback : Signal 15 (SIGTERM) received by PID 12720
-------------------------------------------------------
Root Cause (first observed failure):
[0]:
  time      : 2026-11-29_06:27:39
  host      : localhost
  rank      : 1 (local_rank: 1)
  exitcode  : -11 (pid: 12721)  (SIGSEGV)
  error_file: <N/A>
  traceback : Signal 11 (SIGSEGV) received by PID 12721
=======================================================
"""


def _report(exitcode: str, error_file: str = "<N/A>", traceback: str = "To enable traceback see: "
            "https://pytorch.org/docs/stable/elastic/errors.html") -> str:
    """torchrun 2.13's report block (this machine), for one root cause."""
    return f"""\
Traceback (most recent call last):
  File "/work/venv/bin/torchrun", line 8, in <module>
    sys.exit(main())
torch.distributed.elastic.multiprocessing.errors.ChildFailedError: 
============================================================
train.py FAILED
------------------------------------------------------------
Failures:
  <NO_OTHER_FAILURES>
------------------------------------------------------------
Root Cause (first observed failure):
[0]:
  time      : 2026-11-29_06:28:06
  host      : localhost
  rank      : 1 (local_rank: 1)
  exitcode  : {exitcode}
  error_file: {error_file}
  traceback : {traceback}
============================================================
"""


# Every entry of the table, with real samples. The test below fails if one is missing.
SAMPLES: dict[str, tuple[str, ...]] = {
    "cuda_error_oom": ("""\
Traceback (most recent call last):
  File "train.py", line 30, in <module>
    model.to("cuda")
RuntimeError: CUDA error: out of memory
CUDA kernel errors might be asynchronously reported at some other API call, so the stacktrace below might be incorrect.
For debugging consider passing CUDA_LAUNCH_BLOCKING=1
Compile with `TORCH_USE_CUDA_DSA` to enable device-side assertions.
""",),
    "cublas_alloc_failed": ("""\
  File "/usr/local/lib/python3.10/site-packages/torch/nn/modules/linear.py", line 114, in forward
    return F.linear(input, self.weight, self.bias)
RuntimeError: CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`
""",),
    "cuda_error": (ILLEGAL_ACCESS, """\
RuntimeError: CUDA error: uncorrectable ECC error encountered
CUDA kernel errors might be asynchronously reported at some other API call, so the stacktrace below might be incorrect.
""", """\
RuntimeError: CUDA driver error: unspecified launch failure
""", DEVICE_ASSERT),
    "triton_cuda_error": ("""\
  File "/usr/local/lib/python3.12/dist-packages/triton/backends/nvidia/driver.py", line 365, in __call__
    self.launch(*args, **kwargs)
RuntimeError: Triton Error [CUDA]: an illegal memory access was encountered
""",),
    "device_assert": (DEVICE_ASSERT,),
    "cudnn_error": ("""\
  File "/usr/local/lib/python3.10/site-packages/torch/nn/modules/conv.py", line 456, in _conv_forward
    return F.conv2d(input, weight, bias, self.stride,
RuntimeError: cuDNN error: CUDNN_STATUS_INTERNAL_ERROR
""", """\
RuntimeError: cuDNN Frontend error: [cudnn_frontend] Error: No execution plans support the graph.
"""),
    "nvrm_xid": ("[1032.537183] NVRM: Xid (PCI:0000:3b:00): 79, pid=4242, GPU has fallen off the bus.\n",
                 "[ 881.010204] NVRM: Xid (PCI:0000:86:00): 48, pid=1969, An uncorrectable double bit error (DBE)"
                 " has been detected on GPU in the framebuffer at partition 3, subpartition 0.\n"),
    "cuda_alloc_oom": (CUDA_OOM, CUDA_OOM_CAPACTY, CUDA_OOM_AS_RUNTIME_ERROR),
    # The device-generic caching allocator of recent PyTorch (c10/core/CachingDeviceAllocator.h).
    "device_alloc_oom": ("""\
torch.OutOfMemoryError: Out of memory. Tried to allocate 4.00 GiB. GPU 0 has a total capacity of 79.19 GiB of which 2.31 GiB is free. Of the allocated memory 74.02 GiB is allocated by PyTorch, and 1.20 GiB is reserved by PyTorch but unallocated. If reserved but unallocated memory is large try setting PYTORCH_ALLOC_CONF=expandable_segments:True to avoid fragmentation.  See documentation for Memory Management  (https://pytorch.org/docs/stable/notes/cuda.html#environment-variables)
""",),
    "xpu_alloc_oom": ("""\
torch.OutOfMemoryError: XPU out of memory. Tried to allocate 1024.00 MiB. GPU 0 has a total capacity of 15.11 GiB of which 0 bytes is free. Of the allocated memory 14.50 GiB is allocated by PyTorch, and 104.00 MiB is reserved by PyTorch but unallocated. Please use `empty_cache` to release all unoccupied cached memory.
""",),
    "mps_oom": ("""\
RuntimeError: MPS backend out of memory (MPS allocated: 17.79 GB, other allocations: 1.05 GB, max allowed: 18.13 GB). Tried to allocate 512.00 MB on private pool. Use PYTORCH_MPS_HIGH_WATERMARK_RATIO=0.0 to disable upper limit for memory allocations (may cause system failure).
""",),
    "torch_oom_error": (CUDA_OOM, CUDA_OOM_CAPACTY),
    "nccl_cuda_oom": ("""\
[rank3]: torch.distributed.DistBackendError: NCCL error in: ../torch/csrc/distributed/c10d/NCCLUtils.hpp:275, unhandled cuda error (run with NCCL_DEBUG=INFO for details), NCCL version 2.20.5
[rank3]: ncclUnhandledCudaError: Call to CUDA function failed.
[rank3]: Last error:
[rank3]: Cuda failure 2 'out of memory'
""", "gpu-node-3:4242:4300 [0] include/alloc.h:103 NCCL WARN Cuda failure 'out of memory'\n"),
    # This machine.
    "cpu_alloc": ("""\
Traceback (most recent call last):
  File "train.py", line 3, in <module>
    torch.empty(1 << 50, dtype=torch.uint8)
RuntimeError: [enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you tried to allocate 1125899906842624 bytes. Error code 12 (Cannot allocate memory)
""",),
    "memory_error": ("""\
Traceback (most recent call last):
  File "prepare.py", line 14, in <module>
    tokens = bytearray(1 << 60)
             ^^^^^^^^^^^^^^^^^^
MemoryError
""", """\
[rank1]: Traceback (most recent call last):
[rank1]:   File "/workspace/train.py", line 88, in load_shard
[rank1]:     data = f.read()
[rank1]: MemoryError
""", _report("1 (pid: 4242) ", traceback="Traceback (most recent call last):\n"
             "    File \"/workspace/train.py\", line 88, in load_shard\n"
             "      data = f.read()\n"
             "  MemoryError: out of memory while reading shard 3\n  ")),
    "numpy_memory_error": ("""\
  File "/usr/local/lib/python3.10/site-packages/numpy/core/numeric.py", line 204, in ones
    a = empty(shape, dtype, order)
numpy.core._exceptions._ArrayMemoryError: Unable to allocate 74.5 GiB for an array with shape (100000, 100000) and data type float64
""",),
    "enomem": ("""\
  File "/usr/lib/python3.10/multiprocessing/popen_fork.py", line 66, in _launch
    self.pid = os.fork()
OSError: [Errno 12] Cannot allocate memory
""",),
    "bad_alloc": ("terminate called after throwing an instance of 'std::bad_alloc'\n  what():  std::bad_alloc\n",),
    "dataloader_killed": (DATALOADER_KILLED,),
    "kernel_oom_kill": (
        "[612345.123456] Out of memory: Killed process 4242 (python) total-vm:98765432kB, anon-rss:61234567kB, "
        "file-rss:0kB, shmem-rss:0kB, UID:1000 pgtables:123456kB oom_score_adj:0\n",
        "[612345.123456] Memory cgroup out of memory: Killed process 4242 (python) total-vm:98765432kB, "
        "anon-rss:61234567kB, file-rss:0kB, shmem-rss:0kB, UID:1000 pgtables:123456kB oom_score_adj:0\n"),
    "slurm_oom_kill": (
        "slurmstepd: error: Detected 1 oom_kill event in StepId=123456.batch. "
        "Some of the step tasks have been OOM Killed.\n",
        "slurmstepd: error: Detected 2 oom-kill event(s) in step 123456.0 cgroup. Some of your processes may "
        "have been killed by the cgroup out-of-memory handler.\n"),
    "nccl_error_in": (NCCL_UNHANDLED_CUDA, """\
RuntimeError: NCCL error in: /pytorch/torch/lib/c10d/ProcessGroupNCCL.cpp:911, unhandled cuda error, NCCL version 2.7.8
ncclUnhandledCudaError: Call to CUDA function failed.
"""),
    "nccl_result": (NCCL_UNHANDLED_CUDA, """\
[rank3]:[E1129 10:01:02.000000000 ProcessGroupNCCL.cpp:1536] [PG ID 0 PG GUID 0(default_pg) Rank 3] Process group watchdog thread terminated with exception: NCCL error: remote process exited or there was a network error, NCCL version 2.21.5
ncclRemoteError: A call failed possibly due to a network error or a remote process exiting prematurely.
Last error:
NET/IB : Got completion from peer 10.0.3.17<47031> with status=12 opcode=0 len=0 vendor err 129 (Recv)
""", "ncclInternalError: Internal check failed.\n"),
    "nccl_watchdog_timeout": (WATCHDOG_TIMEOUT,),
    "nccl_watchdog_stuck": (WATCHDOG_STUCK,),
    "nccl_heartbeat": ("[rank25]:[E ProcessGroupNCCL.cpp:1316] [PG 0 Rank 25] Heartbeat monitor timed out! Process will "
                       "be terminated after dumping debug info. workMetaList_.size()=2\n"
                       "[rank25]:[E ProcessGroupNCCL.cpp:1153] [PG 0 Rank 25] ProcessGroupNCCL preparing to dump "
                       "debug info.\n",),
    "nccl_comm_aborted": ("""\
[rank2]: torch.distributed.DistBackendError: NCCL communicator was aborted on rank 2.  Original reason for failure was: [Rank 2] Watchdog caught collective operation timeout
""", "RuntimeError: NCCL communicator was aborted on rank 1. \n"),
    # This machine: gloo on CPU, two ranks.
    "gloo_timeout": ("""\
[rank0]:   File "/work/venv/lib/python3.11/site-packages/torch/distributed/distributed_c10d.py", line 3252, in all_reduce
[rank0]:     work.wait()
[rank0]: RuntimeError: [/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 2000ms for recv operation to complete
""",),
    "gloo_peer_closed": ("""\
[rank0]:     work.wait()
[rank0]: RuntimeError: [/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:48828. This is typically caused by a remote worker crashing. Check the logs of the remote worker before reporting an error. GLHF! \U0001f3d6\ufe0f
""",),
    "dist_error": (
        "torch.distributed.DistNetworkError: The client socket has timed out after 600000ms while trying to "
        "connect to (10.0.3.1, 29500).\n",
        "torch.distributed.DistStoreError: Timed out after 901 seconds waiting for clients. 1/2 clients joined.\n"),
    # This machine: faulthandler's report (the shim enables it).
    "fatal_segv": ("""\
Fatal Python error: Segmentation fault

Current thread 0x00007f860fe79b80 (most recent call first):
  File "/root/.pyenv/versions/3.11.7/lib/python3.11/ctypes/__init__.py", line 519 in string_at
  File "<string>", line 2 in <module>
""", """\
Fatal Python error: Bus error

Current thread 0x00007f1444244b80 (most recent call first):
  File "/work/main/tests/children/crash_child.py", line 94 in bus_error
"""),
    "shell_segv": ("bash: line 1: 12748 Segmentation fault      python train.py --config big.yaml\n",
                   "Segmentation fault (core dumped)\n"),
    "shell_bus_error": ("run.sh: line 3:  4242 Bus error               (core dumped) python train.py\n",
                        "Bus error (core dumped)\n"),
    "dataloader_segv": ("""\
ERROR: Unexpected segmentation fault encountered in worker.
\x00Traceback (most recent call last):
  File "/work/venv/lib/python3.11/site-packages/torch/utils/data/_utils/signal_handling.py", line 73, in handler
    _error_if_any_worker_fails()
RuntimeError: DataLoader worker (pid 16257) is killed by signal: Segmentation fault. 
""", "RuntimeError: DataLoader worker (pid 4242) is killed by signal: Bus error. It is possible that dataloader's "
     "workers are out of shared memory. Please try to raise your shared memory limit.\n"),
    "dataloader_worker_fault": ("""\
ERROR: Unexpected bus error encountered in worker. This might be caused by insufficient shared memory (shm).
\x00Traceback (most recent call last):
RuntimeError: DataLoader worker (pid(s) 4242) exited unexpectedly
""",),
    "fatal_abort": ("""\
Fatal Python error: Aborted

Current thread 0x00007efdf6810b80 (most recent call first):
  File "/home/user/train.py", line 99 in step
""",),
    "cxx_terminate": ("terminate called after throwing an instance of 'c10::Error'\n"
                      "  what():  [enforce fail at inline_container.cc:595] . unexpected pos 64 vs 0\n",),
    "dataloader_abort": ("RuntimeError: DataLoader worker (pid 4242) is killed by signal: Aborted. \n",),
    "slurm_cancelled": (
        "slurmstepd: error: *** JOB 123456 ON gpu-node-017 CANCELLED AT 2024-03-14T02:11:09 DUE TO TIME LIMIT ***\n",
        "slurmstepd: error: *** STEP 123456.0 ON gpu-node-017 CANCELLED AT 2024-03-14T02:11:09 DUE TO PREEMPTION ***\n",
        "srun: error: *** JOB 123456 ON gpu-node-017 CANCELLED AT 2024-03-14T02:11:09 DUE TO NODE FAILURE, "
        "SEE SLURMCTLD LOG FOR DETAILS ***\n"),
    # This machine: SIGTERM sent to torchrun.
    "torchrun_sigterm": ("""\
W1129 06:28:23.461000 12919 torch/distributed/elastic/agent/server/api.py:753] Received 15 death signal, shutting down workers
W1129 06:28:23.462000 12919 torch/distributed/elastic/multiprocessing/api.py:1028] Sending process 12942 closing signal SIGTERM
Traceback (most recent call last):
  File "/work/venv/lib/python3.11/site-packages/torch/distributed/elastic/multiprocessing/api.py", line 86, in _terminate_process_handler
    raise SignalException(f"Process {os.getpid()} got signal: {sigval}", sigval=sigval)
torch.distributed.elastic.multiprocessing.api.SignalException: Process 12919 got signal: 15
""", "torch.distributed.elastic.multiprocessing.api.SignalException: Process 4242 got signal: Signals.SIGTERM\n"),
    "torchelastic_death_signal": (
        "W1129 06:28:23.461000 12919 torch/distributed/elastic/agent/server/api.py:753] Received 15 death signal, "
        "shutting down workers\n",),
    # As torch 2.13 and CPython 3.12 print them (issue 12: makemore, word_language_model).
    "multinomial_nonfinite": ("""\
Traceback (most recent call last):
  File "/tmp/mn.py", line 3, in <module>
    idx = torch.multinomial(p, num_samples=1)
          ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^
RuntimeError: probability tensor contains either `inf`, `nan` or element < 0
""",),
    "math_overflow": ("""\
Traceback (most recent call last):
  File "/tmp/ov.py", line 3, in <module>
    print("ppl", math.exp(loss))
                 ^^^^^^^^^^^^^^
OverflowError: math range error
""",),
}


def _pattern(name: str) -> Any:
    return next(p for p in PATTERNS if p.name == name)


def _lines(text: str) -> list[str]:
    return text.splitlines()


# --------------------------------------------------------------------------- the table
def test_every_pattern_has_a_sample_and_a_unique_name() -> None:
    names = [p.name for p in PATTERNS]
    assert len(names) == len(set(names))
    assert set(SAMPLES) == set(names)
    assert all(SAMPLES[name] for name in names)


def test_the_public_surface() -> None:
    assert {"PATTERNS", "Pattern", "classify", "read_oom_kill_count", "judge", "failure_of",
            "Judgement", "RankVerdict", "rank_root"} <= set(classify_module.__all__)
    for name in classify_module.__all__:
        assert hasattr(classify_module, name)


@pytest.mark.parametrize("name, sample", [(name, sample) for name, samples in SAMPLES.items()
                                          for sample in samples],
                         ids=[f"{name}-{i}" for name, samples in SAMPLES.items() for i in range(len(samples))])
def test_each_pattern_classifies_its_real_text(name: str, sample: str) -> None:
    pattern = _pattern(name)
    assert pattern.regex.search(sample), "the sample must show what the pattern looks for"
    failure = classify(1, _lines(sample))
    assert failure is not None
    assert failure.kind is pattern.kind
    assert any(pattern.regex.search(line) for line in failure.evidence), failure.evidence
    assert 1 <= len(failure.evidence) <= 5
    assert all(len(line) <= 300 for line in failure.evidence)


@pytest.mark.parametrize("pattern", PATTERNS, ids=[p.name for p in PATTERNS])
def test_needles_begin_every_match(pattern: Any) -> None:
    """The substring pre-check may never hide a match."""
    assert len(pattern.needle) >= 4
    for sample in SAMPLES[pattern.name]:
        for m in pattern.regex.finditer(sample):
            assert m.group(0).startswith(pattern.needle)


def test_table_order_is_cuda_then_oom_then_nccl_then_crashes_then_preemption() -> None:
    order = [p.kind for p in PATTERNS]
    names = [p.name for p in PATTERNS]

    def first(kind: K) -> int:
        return order.index(kind)

    def last(kind: K) -> int:
        return len(order) - 1 - order[::-1].index(kind)

    assert names.index("cuda_error_oom") < names.index("cuda_error")
    assert names.index("cublas_alloc_failed") < names.index("cuda_error")
    assert last(K.CUDA_ERROR) < names.index("cuda_alloc_oom")
    assert last(K.CUDA_OOM) < first(K.HOST_OOM)
    assert last(K.HOST_OOM) < first(K.NCCL_ERROR)
    assert last(K.NCCL_ERROR) < first(K.SEGFAULT)
    assert last(K.SEGFAULT) < first(K.ABORTED)
    assert last(K.ABORTED) < first(K.PREEMPTED)
    assert last(K.ABORTED) < first(K.NONFINITE) < last(K.NONFINITE) < first(K.PREEMPTED)
    assert order[-1] is K.PREEMPTED


# --------------------------------------------------------------------------- precedence
def test_a_cuda_oom_raised_as_runtime_error_is_cuda_oom_not_exception() -> None:
    failure = classify(1, _lines(CUDA_OOM_AS_RUNTIME_ERROR))
    assert failure is not None and failure.kind is K.CUDA_OOM
    assert failure.evidence[0].startswith("RuntimeError: CUDA out of memory. Tried to allocate 36.00 MiB")


def test_cuda_error_out_of_memory_is_oom_not_a_cuda_error() -> None:
    failure = classify(1, _lines(SAMPLES["cuda_error_oom"][0]))
    assert failure is not None and failure.kind is K.CUDA_OOM


def test_a_watchdog_abort_caused_by_an_illegal_access_is_cuda_error() -> None:
    failure = classify(-6, _lines(WATCHDOG_ILLEGAL_ACCESS))
    assert failure is not None
    assert failure.kind is K.CUDA_ERROR
    assert "illegal memory access" in failure.evidence[0]
    assert failure.signal == "SIGABRT"
    assert "died by signal SIGABRT (exit -6)" in failure.evidence


def test_a_watchdog_timeout_abort_is_nccl_error_not_aborted() -> None:
    text = WATCHDOG_TIMEOUT + "terminate called after throwing an instance of 'c10::DistBackendError'\n"
    failure = classify(-6, _lines(text))
    assert failure is not None and failure.kind is K.NCCL_ERROR
    assert "Watchdog caught collective operation timeout" in failure.evidence[0]


@pytest.mark.parametrize("oom_killed", [True, False])
def test_a_dataloader_worker_killed_is_host_oom(oom_killed: bool) -> None:
    failure = classify(1, _lines(DATALOADER_KILLED), oom_killed=oom_killed)
    assert failure is not None and failure.kind is K.HOST_OOM
    assert failure.evidence[0] == "RuntimeError: DataLoader worker (pid 4242) is killed by signal: Killed."


def test_torchrun_report_with_a_segfaulted_rank_is_segfault() -> None:
    failure = classify(1, _lines(TORCHRUN_SEGV))
    assert failure is not None
    assert failure.kind is K.SEGFAULT
    assert failure.exit_code == 1 and failure.signal == "SIGSEGV"
    assert "died by signal SIGSEGV (exit -11, rank 1 under torchrun)" in failure.evidence
    assert "torchrun root cause: rank 1 (local_rank 1) exitcode -11 (pid 12721)" in failure.evidence


def test_torchrun_report_root_cause_not_the_other_ranks_sigterm() -> None:
    """Rank 0's -15 is listed under Failures; only the Root Cause counts."""
    failure = classify(1, _lines(TORCHRUN_SEGV.replace("Fatal Python error: Segmentation fault", "")))
    assert failure is not None and failure.kind is K.SEGFAULT
    assert failure.evidence[0] == "died by signal SIGSEGV (exit -11, rank 1 under torchrun)"


def test_torchrun_root_cause_that_exited_3_is_exit_nonzero() -> None:
    failure = classify(1, _lines(_report("3 (pid: 12806) ")))
    assert failure is not None and failure.kind is K.EXIT_NONZERO
    assert failure.evidence == ("torchrun root cause: rank 1 (local_rank 1) exitcode 3 (pid 12806)",)


def test_torchrun_root_cause_killed_by_the_oom_killer() -> None:
    failure = classify(1, _lines(_report("-9 (pid: 4242)  (SIGKILL)", traceback="Signal 9 (SIGKILL) received by "
                                                                                   "PID 4242")), oom_killed=True)
    assert failure is not None and failure.kind is K.HOST_OOM
    assert failure.signal == "SIGKILL"


def test_torchrun_agent_log_line_stands_in_for_a_report_that_left_the_tail() -> None:
    tail = ["E1129 06:27:39.246000 12715 torch/distributed/elastic/multiprocessing/api.py:1002] failed "
            "(exitcode: -9) local_rank: 0 (pid: 12721) of binary: /usr/bin/python3"]
    failure = classify(1, tail)
    assert failure is not None and failure.kind is K.KILLED
    assert failure.signal == "SIGKILL"


def test_torchrun_root_cause_exception_comes_from_the_report_not_child_failed_error() -> None:
    traceback = ("Traceback (most recent call last):\n"
                 "    File \"/workspace/train.py\", line 9, in main\n"
                 "      raise ValueError(\"boom on rank 1\")\n"
                 "  ValueError: boom on rank 1\n  ")
    failure = classify(1, _lines(_report("1 (pid: 12730) ", traceback=traceback)))
    assert failure is not None and failure.kind is K.EXCEPTION
    assert failure.evidence[:2] == ("ValueError: boom on rank 1", 'File "/workspace/train.py", line 9, in main')


def test_torchrun_root_cause_reads_the_rank_error_file(tmp_path: Path) -> None:
    """The rank's output has left the tail; its error file still names the cause."""
    error_file = tmp_path / "attempt_0" / "1" / "error.json"
    error_file.parent.mkdir(parents=True)
    error_file.write_text(json.dumps({"message": {
        "message": "OutOfMemoryError: " + CUDA_OOM_LINE.split(": ", 1)[1],
        "extraInfo": {"py_callstack": "Traceback (most recent call last):\n...", "timestamp": "1795933663"}}}))
    failure = classify(1, _lines(_report("1 (pid: 12730) ", error_file=str(error_file))))
    assert failure is not None and failure.kind is K.CUDA_OOM
    assert failure.evidence[0].startswith("OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB")


def test_torchrun_sigterm_is_preempted() -> None:
    failure = classify(1, _lines(SAMPLES["torchrun_sigterm"][0]))
    assert failure is not None and failure.kind is K.PREEMPTED


# --------------------------------------------------------------------------- stop requests
def test_stop_requested_and_exit_0_is_preempted() -> None:
    failure = classify(0, ["step 120 loss 2.31", "stop requested: saved and leaving"], stop_requested=True, step=120)
    assert failure == Failure(K.PREEMPTED, exit_code=0, signal=None, step=120,
                              evidence=("stopped on request; exit 0",))


def test_stop_requested_does_not_hide_a_cuda_oom() -> None:
    failure = classify(1, _lines(CUDA_OOM), stop_requested=True)
    assert failure is not None and failure.kind is K.CUDA_OOM
    failure = classify(-15, _lines(CUDA_OOM), stop_requested=True)
    assert failure is not None and failure.kind is K.CUDA_OOM


@pytest.mark.parametrize("text, kind", [(NCCL_UNHANDLED_CUDA, K.NCCL_ERROR), (ILLEGAL_ACCESS, K.CUDA_ERROR),
                                        (SAMPLES["cpu_alloc"][0], K.HOST_OOM)])
def test_stop_requested_does_not_hide_strong_evidence(text: str, kind: K) -> None:
    failure = classify(0, _lines(text), stop_requested=True)
    assert failure is not None and failure.kind is kind


@pytest.mark.parametrize("returncode", [-15, 143, -9, 137, -2, -12, 0, None])
def test_stop_requested_explains_the_stop_signals(returncode: int | None) -> None:
    failure = classify(returncode, ["step 7 loss 1.0"], stop_requested=True)
    assert failure is not None and failure.kind is K.PREEMPTED
    assert failure.evidence[0].startswith("stopped on request; ")


def test_stop_requested_but_killed_while_the_cgroup_counted_an_oom_kill() -> None:
    failure = classify(-9, [], stop_requested=True, oom_killed=True)
    assert failure is not None and failure.kind is K.HOST_OOM


def test_stop_requested_does_not_explain_a_crash_or_a_bug() -> None:
    assert classify(-11, [], stop_requested=True).kind is K.SEGFAULT  # type: ignore[union-attr]
    text = 'Traceback (most recent call last):\n  File "t.py", line 3, in save\nValueError: bad checkpoint path'
    assert classify(1, _lines(text), stop_requested=True).kind is K.EXCEPTION  # type: ignore[union-attr]
    interrupt = 'Traceback (most recent call last):\n  File "t.py", line 3, in step\nKeyboardInterrupt'
    assert classify(1, _lines(interrupt), stop_requested=True).kind is K.PREEMPTED  # type: ignore[union-attr]
    assert classify(1, ["saving..."], stop_requested=True).kind is K.PREEMPTED  # type: ignore[union-attr]


# --------------------------------------------------------------------------- exits and signals
def test_clean_exit_is_none_even_with_error_text_in_the_tail() -> None:
    assert classify(0, _lines(CUDA_OOM)) is None
    assert classify(0, []) is None


@pytest.mark.parametrize("returncode, kind, name", [
    (-11, K.SEGFAULT, "SIGSEGV"), (139, K.SEGFAULT, "SIGSEGV"),
    (-7, K.SEGFAULT, "SIGBUS"), (135, K.SEGFAULT, "SIGBUS"),
    (-6, K.ABORTED, "SIGABRT"), (134, K.ABORTED, "SIGABRT"),
    (-9, K.KILLED, "SIGKILL"), (137, K.KILLED, "SIGKILL"),
    (-15, K.PREEMPTED, "SIGTERM"), (143, K.PREEMPTED, "SIGTERM"),
    (-4, K.EXIT_NONZERO, "SIGILL"), (-99, K.EXIT_NONZERO, "SIG99"),
])
def test_deaths_by_signal(returncode: int, kind: K, name: str) -> None:
    failure = classify(returncode, ["step 3 loss 0.5"], step=3)
    assert failure is not None
    assert (failure.kind, failure.signal, failure.exit_code, failure.step) == (kind, name, returncode, 3)
    assert failure.evidence[0].startswith(f"died by signal {name} (exit {returncode})")


@pytest.mark.parametrize("returncode, kind", [(-9, K.HOST_OOM), (137, K.HOST_OOM), (-11, K.SEGFAULT),
                                              (1, K.EXIT_NONZERO)])
def test_oom_killed_matters_only_for_a_sigkill(returncode: int, kind: K) -> None:
    failure = classify(returncode, [], oom_killed=True)
    assert failure is not None and failure.kind is kind


def test_text_outranks_the_signal() -> None:
    failure = classify(-11, _lines(CUDA_OOM))
    assert failure is not None and failure.kind is K.CUDA_OOM and failure.signal == "SIGSEGV"


def test_plain_nonzero_exit_names_the_last_output() -> None:
    failure = classify(2, ["epoch 1", "usage: train.py [-h] --config CONFIG", ""])
    assert failure is not None and failure.kind is K.EXIT_NONZERO
    assert failure.evidence == ("exit 2", "last output: usage: train.py [-h] --config CONFIG")


def test_unknown_exit_status() -> None:
    failure = classify(None, [])
    assert failure is not None and failure.kind is K.EXIT_NONZERO
    assert failure.evidence == ("exit status unknown",)


def test_exception_evidence_is_the_last_line_and_the_innermost_frame() -> None:
    text = """\
Traceback (most recent call last):
  File "data.py", line 10, in load
    return json.loads(raw)
json.decoder.JSONDecodeError: Expecting value: line 1 column 1 (char 0)

During handling of the above exception, another exception occurred:

Traceback (most recent call last):
  File "train.py", line 5, in <module>
    main()
  File "train.py", line 3, in main
    raise KeyError("tokenizer")
    ~~~~~~~~~~~~~~^^^^^^^^^^^^^
KeyError: 'tokenizer'
W1129 06:27:39.212000 12715 some logging after the traceback
"""
    failure = classify(1, _lines(text))
    assert failure is not None and failure.kind is K.EXCEPTION
    assert failure.evidence == ("KeyError: 'tokenizer'", 'File "train.py", line 3, in main')


def test_rank_prefixed_traceback() -> None:
    text = """\
[rank0]: Traceback (most recent call last):
[rank0]:   File "/workspace/train.py", line 12, in <module>
[rank0]:     assert world_size == 8
[rank0]: AssertionError
"""
    failure = classify(1, _lines(text))
    assert failure is not None and failure.kind is K.EXCEPTION
    assert failure.evidence[0] == "[rank0]: AssertionError"


def test_colour_codes_carriage_returns_and_nul_bytes_are_read_through() -> None:
    tail = ["Epoch 1:  50%|#####     | 5/10 [00:01<00:01]\rEpoch 1:  60%|######    | 6/10 [00:01<00:01]"
            "\r\x1b[31mRuntimeError: CUDA error: an illegal memory access was encountered\x1b[0m",
            "\x00ERROR: something"]
    failure = classify(1, tail)
    assert failure is not None and failure.kind is K.CUDA_ERROR
    assert failure.evidence[0] == "RuntimeError: CUDA error: an illegal memory access was encountered"


def test_evidence_is_deduplicated_bounded_and_keeps_the_match_in_view() -> None:
    line = "[rank{r}]:[E321 02:07:08 ProcessGroupNCCL.cpp:607] " + "x" * 400 + \
           " Watchdog caught collective operation timeout: WorkNCCL(SeqNum=1580, OpType=ALLREDUCE)"
    tail = [line.format(r=r % 8) for r in range(200)] + ["[rank0]: ncclSystemError: System call failed."] * 3
    failure = classify(-6, tail)
    assert failure is not None and failure.kind is K.NCCL_ERROR
    assert len(failure.evidence) <= 5
    assert len(set(failure.evidence)) == len(failure.evidence)
    assert all(len(e) <= 300 for e in failure.evidence)
    assert any("Watchdog caught collective operation timeout" in e for e in failure.evidence)
    assert "[rank0]: ncclSystemError: System call failed." in failure.evidence
    assert "died by signal SIGABRT (exit -6)" in failure.evidence


def test_classifying_a_long_tail_is_fast() -> None:
    tail = [f"step {i} loss {1 / (i + 1):.5f} lr 3.0e-04 grad_norm 0.8123 tokens/s 182734.2 | epoch 3"
            for i in range(480)]
    tail += _lines(SAMPLES["memory_error"][0].replace("MemoryError", "ValueError: bad shard"))
    runs = []
    for _ in range(30):
        start = time.perf_counter()
        assert classify(1, tail).kind is K.EXCEPTION  # type: ignore[union-attr]
        runs.append(time.perf_counter() - start)
    # About a millisecond here; the bound leaves room for a busy machine and catches a regex
    # that scans the tail position by position (a few ms each, forty entries).
    assert sorted(runs)[len(runs) // 2] < 0.010, f"median {sorted(runs)[len(runs) // 2] * 1e3:.2f} ms"


def test_the_classifier_does_not_import_torch() -> None:
    code = "import sys, ftrain.classify; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=10).returncode == 0


# --------------------------------------------------------------------------- error files
def test_error_file_in_torchelastics_format(tmp_path: Path) -> None:
    path = tmp_path / "error.json"
    path.write_text(json.dumps({"message": {"message": "ValueError: boom on rank 1", "extraInfo": {
        "py_callstack": "Traceback (most recent call last):\n...", "timestamp": "1795933663"}}}))
    assert classify_error_file(path) == "ValueError: boom on rank 1"
    assert classify_error_file(str(path)) == "ValueError: boom on rank 1"


def test_error_file_with_a_plain_string_message(tmp_path: Path) -> None:
    path = tmp_path / "error.json"
    path.write_text(json.dumps({"message": "RuntimeError: worker lost\n", "timestamp": 1795933663}))
    assert classify_error_file(path) == "RuntimeError: worker lost"


@pytest.mark.parametrize("content", [b"", b"{not json", b"[1, 2]", b'{"message": 3}', b'{"message": {"x": 1}}',
                                     b'{"message": {"message": "  "}}', b"\xff\xfe\x00garbage",
                                     b'{"message": "' + b"x" * (1 << 20) + b'"}'])
def test_error_file_garbage_is_none(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "error.json"
    path.write_bytes(content)
    assert classify_error_file(path) is None


def test_error_file_missing_or_a_folder_is_none(tmp_path: Path) -> None:
    assert classify_error_file(tmp_path / "missing.json") is None
    assert classify_error_file(tmp_path) is None
    assert classify_error_file("<N/A>") is None


# --------------------------------------------------------------------------- cgroup OOM-kill counter
def _tree(tmp_path: Path, cgroup: str, files: dict[str, str]) -> tuple[Path, Path]:
    proc = tmp_path / "proc_self_cgroup"
    proc.write_text(cgroup)
    root = tmp_path / "sys_fs_cgroup"
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return proc, root


def test_oom_kill_count_cgroup_v2(tmp_path: Path) -> None:
    proc, root = _tree(tmp_path, "0::/user.slice/job-42.scope\n", {
        "user.slice/job-42.scope/memory.events": "low 0\nhigh 0\nmax 17\noom 3\noom_kill 2\noom_group_kill 0\n",
        "memory.events": "oom_kill 99\n"})
    assert read_oom_kill_count(proc, root) == 2


def test_oom_kill_count_v2_inside_a_container_uses_the_mount(tmp_path: Path) -> None:
    proc, root = _tree(tmp_path, "0::/kubepods/burstable/pod1234/abcd\n", {"memory.events": "oom 1\noom_kill 4\n"})
    assert read_oom_kill_count(proc, root) == 4


def test_oom_kill_count_cgroup_v1_and_hybrid(tmp_path: Path) -> None:
    proc, root = _tree(tmp_path, "9:name=systemd:/\n4:memory:/process_api/8a86\n1:cpu,cpuacct:/\n0::/\n", {
        "memory/process_api/8a86/memory.oom_control": "oom_kill_disable 0\nunder_oom 0\noom_kill 5\n",
        "unified/cgroup.procs": ""})
    assert read_oom_kill_count(proc, root) == 5


@pytest.mark.parametrize("cgroup, files", [
    ("0::/a\n", {}),
    ("0::/a\n", {"a/memory.events": "oom 1\n"}),
    ("0::/a\n", {"a/memory.events": "oom_kill many\n"}),
    ("garbage without colons\n", {"memory.events": "oom_kill 1\n"}),
    ("", {"memory.events": "oom_kill 1\n"}),
])
def test_oom_kill_count_unreadable_is_none(tmp_path: Path, cgroup: str, files: dict[str, str]) -> None:
    proc, root = _tree(tmp_path, cgroup, files)
    assert read_oom_kill_count(proc, root) is None


def test_oom_kill_count_without_proc_is_none(tmp_path: Path) -> None:
    assert read_oom_kill_count(tmp_path / "no-such-file", tmp_path) is None


def test_oom_kill_count_of_this_process() -> None:
    count = read_oom_kill_count()
    assert count is None or (isinstance(count, int) and count >= 0)


def _memory_cgroup_dir() -> Path | None:
    """Where this process's memory cgroup can get a child: v1's memory hierarchy, else None."""
    try:
        entries = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for entry in entries:
        parts = entry.split(":", 2)
        if len(parts) == 3 and "memory" in parts[1].split(","):
            path = parts[2]
            for base in (Path("/sys/fs/cgroup/memory") / path.lstrip("/"), Path("/sys/fs/cgroup/memory")):
                if (base / "memory.oom_control").exists() and os.access(base, os.W_OK):
                    return base
    return None


def test_a_real_oom_kill_in_a_memory_limited_cgroup_is_host_oom() -> None:
    """A hog in a 64 MB cgroup: the kernel's OOM killer sends SIGKILL and counts it."""
    parent = _memory_cgroup_dir()
    if parent is None:
        pytest.skip("no writable cgroup-v1 memory hierarchy here (needs root)")
    group = parent / f"ftrain-test-{os.getpid()}"
    try:
        group.mkdir()
    except OSError as exc:
        pytest.skip(f"cannot create a memory cgroup: {exc}")
    try:
        limit = 64 << 20
        try:
            (group / "memory.limit_in_bytes").write_text(str(limit))
            if (group / "memory.memsw.limit_in_bytes").exists():
                (group / "memory.memsw.limit_in_bytes").write_text(str(limit))
        except OSError as exc:
            pytest.skip(f"cannot limit the cgroup: {exc}")
        if int((group / "memory.limit_in_bytes").read_text()) > 2 * limit:
            pytest.skip("the memory limit did not take")
        proc = subprocess.run([sys.executable, str(CHILD), "oom-cgroup", str(group / "cgroup.procs")],
                              capture_output=True, text=True, timeout=30, env=_env())
        assert proc.returncode == 0, proc.stderr
        seen = json.loads(proc.stdout.splitlines()[-1])
    finally:
        for _ in range(50):
            try:
                group.rmdir()
                break
            except OSError:
                time.sleep(0.1)
    assert seen["returncode"] == -signal.SIGKILL
    assert seen["before"] is not None and seen["after"] == seen["before"] + 1
    failure = classify(seen["returncode"], seen["output"], oom_killed=seen["after"] > seen["before"])
    assert failure is not None and failure.kind is K.HOST_OOM
    assert failure.evidence == ("died by signal SIGKILL (exit -9); the cgroup recorded an OOM kill",)


# --------------------------------------------------------------------------- real children
def _env(tmp: Path | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FTRAIN_", "PYTHONFAULTHANDLER", "TORCHELASTIC"))}
    env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    if tmp is not None:
        env["TMPDIR"] = str(tmp)     # torchrun's per-rank error files land here
    return env


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
PLAIN = ("segv", "segv-faulthandler", "bus", "abort", "kill", "term", "stop-exit0", "exit3", "value-error",
         "memory-error", "nccl-watchdog", "watchdog-illegal-access")
WITH_TORCH = ("cpu-alloc", "cuda-oom", "cuda-error", "nccl-error", "dataloader-killed", "dataloader-segv")
PLAIN_TIMEOUT = 10.0
TORCH_TIMEOUT = 45.0    # seconds: importing torch takes a few on a busy two-core machine


@pytest.fixture(scope="module")
def ran(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[int, list[str]]]:
    """Every child at once, each way as ``{way: (return code, combined output lines)}``.

    The plain ways run one process each. The ways that need torch end in forked copies of
    one process that imported torch once (``crash_child.py forked``): a torch import costs
    seconds, a fork nothing. torchrun runs twice for real.
    """
    tmp = tmp_path_factory.mktemp("children")
    env = _env(tmp)
    commands = {way: ([sys.executable, str(CHILD), way], PLAIN_TIMEOUT) for way in PLAIN}
    commands["forked"] = ([sys.executable, str(CHILD), "forked", str(tmp), *WITH_TORCH], TORCH_TIMEOUT)
    commands["torchrun-segv"] = ([*TORCHRUN, str(CHILD), "rank-segv"], TORCH_TIMEOUT)
    commands["torchrun-record"] = ([*TORCHRUN, str(CHILD), "rank-record"], TORCH_TIMEOUT)
    procs = {way: subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=tmp,
                                   start_new_session=True)
             for way, (cmd, _) in commands.items()}
    started = time.monotonic()
    results: dict[str, tuple[int, list[str]]] = {}
    try:
        for way, proc in procs.items():
            left = max(0.1, commands[way][1] - (time.monotonic() - started))
            out, _ = proc.communicate(timeout=left)
            results[way] = (proc.returncode, out.decode("utf-8", "replace").splitlines())
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    code, output = results.pop("forked")
    assert code == 0, "\n".join(output)
    for way, returncode in json.loads(output[-1]).items():
        results[way] = (returncode, (tmp / f"{way}.log").read_text(errors="replace").splitlines())
    return results


# way, kwargs for classify, kind, exit code, signal, evidence lines expected (substrings, in order)
REAL: list[tuple[str, dict[str, Any], K, int, str | None, tuple[str, ...]]] = [
    ("segv", {}, K.SEGFAULT, -11, "SIGSEGV", ("died by signal SIGSEGV (exit -11)",)),
    ("segv-faulthandler", {}, K.SEGFAULT, -11, "SIGSEGV",
     ("Fatal Python error: Segmentation fault", "died by signal SIGSEGV (exit -11)")),
    ("bus", {}, K.SEGFAULT, -7, "SIGBUS", ("Fatal Python error: Bus error", "died by signal SIGBUS (exit -7)")),
    ("abort", {}, K.ABORTED, -6, "SIGABRT", ("died by signal SIGABRT (exit -6)",)),
    ("kill", {}, K.KILLED, -9, "SIGKILL", ("died by signal SIGKILL (exit -9); no OOM kill was recorded",)),
    ("kill", {"oom_killed": True}, K.HOST_OOM, -9, "SIGKILL",
     ("died by signal SIGKILL (exit -9); the cgroup recorded an OOM kill",)),
    ("term", {}, K.PREEMPTED, -15, "SIGTERM", ("died by signal SIGTERM (exit -15)",)),
    ("term", {"stop_requested": True}, K.PREEMPTED, -15, "SIGTERM",
     ("stopped on request; died by signal SIGTERM (exit -15)",)),
    ("stop-exit0", {"stop_requested": True}, K.PREEMPTED, 0, None, ("stopped on request; exit 0",)),
    ("exit3", {}, K.EXIT_NONZERO, 3, None, ("exit 3", "last output: epoch 3: validation data missing, giving up")),
    ("value-error", {}, K.EXCEPTION, 1, None,
     ("ValueError: learning rate must be positive, got -0.1", 'crash_child.py", line')),
    ("memory-error", {}, K.HOST_OOM, 1, None, ("MemoryError",)),
    ("cpu-alloc", {}, K.HOST_OOM, 1, None,
     ("RuntimeError: [enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: "
      "you tried to allocate 1125899906842624 bytes. Error code 12 (Cannot allocate memory)",)),
    ("cuda-oom", {}, K.CUDA_OOM, 1, None,
     ("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of",)),
    ("cuda-error", {}, K.CUDA_ERROR, 1, None,
     ("torch.AcceleratorError: CUDA error: an illegal memory access was encountered",)),
    ("nccl-error", {}, K.NCCL_ERROR, 1, None,
     ("torch.distributed.DistBackendError: NCCL error in: /pytorch/torch/csrc/distributed/c10d/NCCLUtils.hpp:275",
      "ncclSystemError: System call (e.g. socket, malloc) or external library call failed")),
    ("nccl-watchdog", {}, K.NCCL_ERROR, -6, "SIGABRT",
     ("Watchdog caught collective operation timeout: WorkNCCL(SeqNum=7753", "died by signal SIGABRT (exit -6)")),
    ("watchdog-illegal-access", {}, K.CUDA_ERROR, -6, "SIGABRT",
     ("Process group watchdog thread terminated with exception: CUDA error: an illegal memory access",
      "died by signal SIGABRT (exit -6)")),
    ("dataloader-killed", {}, K.HOST_OOM, 1, None, ("is killed by signal: Killed.",)),
    ("dataloader-killed", {"oom_killed": True}, K.HOST_OOM, 1, None, ("is killed by signal: Killed.",)),
    ("dataloader-segv", {}, K.SEGFAULT, 1, None,
     ("is killed by signal: Segmentation fault.", "ERROR: Unexpected segmentation fault encountered in worker.")),
    ("torchrun-segv", {}, K.SEGFAULT, 1, "SIGSEGV",
     ("died by signal SIGSEGV (exit -11, rank 1 under torchrun)", "torchrun root cause: rank 1 (local_rank 1) "
      "exitcode -11", "Signal 11 (SIGSEGV) received by PID")),
    ("torchrun-record", {}, K.EXCEPTION, 1, None,
     ("ValueError: rank 1 could not parse shard 17: unexpected end of data",
      "torchrun root cause: rank 1 (local_rank 1) exitcode 1")),
]


@pytest.mark.parametrize("way, kwargs, kind, returncode, sig, expected", REAL,
                         ids=[f"{r[0]}{'-' + '-'.join(r[1]) if r[1] else ''}" for r in REAL])
def test_real_child(ran: dict[str, tuple[int, list[str]]], way: str, kwargs: dict[str, Any], kind: K,
                    returncode: int, sig: str | None, expected: tuple[str, ...]) -> None:
    code, output = ran[way]
    assert code == returncode, "\n".join(output[-30:])
    failure = classify(code, output, step=12, **kwargs)
    assert failure is not None, "\n".join(output[-30:])
    assert (failure.kind, failure.exit_code, failure.signal, failure.step) == (kind, returncode, sig, 12), failure
    position = -1
    for piece in expected:
        hits = [i for i, line in enumerate(failure.evidence) if piece in line]
        assert hits and hits[0] > position, f"{piece!r} not (in order) in {failure.evidence}"
        position = hits[0]


def test_real_cooperative_stop_without_a_request_is_success(ran: dict[str, tuple[int, list[str]]]) -> None:
    code, output = ran["stop-exit0"]
    assert classify(code, output) is None


def test_real_torchrun_error_file(ran: dict[str, tuple[int, list[str]]]) -> None:
    """The report names the rank's error file; @record wrote it in torchelastic's format."""
    _, output = ran["torchrun-record"]
    paths = [m.group(1) for line in output if (m := re.match(r"\s*error_file: (/\S+)", line))]
    assert paths, "\n".join(output[-30:])
    assert classify_error_file(paths[-1]) == "ValueError: rank 1 could not parse shard 17: unexpected end of data"
