"""Under Slurm: where the job is, and putting it back in the queue after a notice to stop.

Slurm requeues a job by itself only on node failure, preemption with ``PreemptMode=REQUEUE``
or ``scontrol requeue``; a job that ends after its pre-timeout signal (``--signal=USR1@N``)
simply ends. So, as submitit does, ftrain requeues its own job (``scontrol requeue
$SLURM_JOB_ID``) once the script saved and the run was journaled: the same job id runs the
batch script again, and its ``ftrain resume`` continues from the save.

What ftrain does at the end of a run stopped by a signal (``requeue_if_allowed``):

* SIGUSR1 (the pre-timeout notice) under Slurm, node 0, job submitted with ``--requeue``,
  policy ``slurm: {requeue: true}`` (the default): requeue, and say so.
* SIGTERM: never. Slurm sends it when it requeues the job itself (preemption, node failure,
  ``scontrol requeue``), at the time limit, and on ``scancel``: a person's cancel must stop
  the job, and the other cases are already handled by Slurm.
* A run that ended any other way — above all one the policy gave up on (exit 1,
  ``DO_NOT_REQUEUE``) — is never requeued: it would not get better.

Nothing here imports more than the standard library: the supervisor calls it at its end.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["DO_NOT_REQUEUE", "REQUEUE_EXITS", "SlurmJob", "detect", "requeue_allowed",
           "requeue_if_allowed", "requeue_wanted", "requeueable"]

DO_NOT_REQUEUE = 1          # ExitCode.STOPPED: the policy stopped or gave up; the run is over
REQUEUE_EXITS = frozenset({143})   # ExitCode.TERMINATED: stopped by a signal, saved, resumable
SCONTROL_TIMEOUT = 10.0     # seconds; slurmctld answers in milliseconds when it is up


@dataclass(frozen=True)
class SlurmJob:
    """The Slurm job this process runs in, from the variables Slurm sets."""

    job_id: str
    node_id: int = 0         # SLURM_NODEID: this node's index in the job (0 in the batch step)
    restart_count: int = 0   # SLURM_RESTART_COUNT: how many times the job was requeued

    @property
    def leader(self) -> bool:
        """The node that speaks for the job (one requeue is enough)."""
        return self.node_id == 0


def detect(env: Mapping[str, str] | None = None) -> SlurmJob | None:
    """The Slurm job from the environment, or None outside Slurm (no ``SLURM_JOB_ID``)."""
    env = os.environ if env is None else env
    job_id = env.get("SLURM_JOB_ID", "").strip()
    if not job_id:
        return None

    def number(name: str) -> int:
        value = env.get(name, "").strip()
        return int(value) if value.isdigit() else 0

    return SlurmJob(job_id=job_id, node_id=number("SLURM_NODEID"), restart_count=number("SLURM_RESTART_COUNT"))


def requeue_wanted(exit_code: int) -> bool:
    """Whether a run that exits with ``exit_code`` should run again: only a run stopped by a
    signal after saving (143). Success, a policy that stopped or gave up (``DO_NOT_REQUEUE``),
    bad usage and ftrain's own failure are not made better by a requeue."""
    return exit_code in REQUEUE_EXITS


def requeue_allowed(policy: Any) -> bool:
    """The policy's ``slurm: {requeue: …}`` (on unless the policy turns it off)."""
    return bool(policy.slurm.requeue)


def _scontrol(*args: str) -> subprocess.CompletedProcess[str] | str:
    """Run scontrol; its result, or why it could not run."""
    exe = shutil.which("scontrol")
    if exe is None:
        return "scontrol not found"
    try:
        return subprocess.run([exe, *args], capture_output=True, text=True, timeout=SCONTROL_TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"scontrol {args[0]}: {exc}"


def requeueable(job_id: str) -> bool | str:
    """True when the job was submitted requeueable (``Requeue=1``); False when not; a string
    saying why when Slurm could not be asked."""
    done = _scontrol("show", "job", "-o", job_id)
    if isinstance(done, str):
        return done
    if done.returncode != 0:
        return f"scontrol show job {job_id}: {(done.stderr or done.stdout).strip()[:200]}"
    fields = dict(part.split("=", 1) for part in done.stdout.split() if "=" in part)
    return fields.get("Requeue") == "1"


def requeue_if_allowed(signum: int | None, exit_code: int, *, allowed: bool = True,
                       env: Mapping[str, str] | None = None) -> str | None:
    """At the end of a run stopped by ``signum``: requeue this Slurm job when that is what the
    notice asks for (see the module docstring). Returns a sentence for the person (what was
    done, or why not), or None where Slurm is not involved or nothing was asked."""
    job = detect(env)
    if job is None or signum != signal.SIGUSR1 or not requeue_wanted(exit_code):
        return None
    if not job.leader:
        return None   # node 0 requeues the job for all its nodes
    if not allowed:
        return f"Slurm job {job.job_id} not requeued: the policy says slurm: {{requeue: false}}"
    can = requeueable(job.job_id)
    if isinstance(can, str):
        return f"Slurm job {job.job_id} not requeued: {can}"
    if not can:
        return f"Slurm job {job.job_id} not requeued: it was not submitted with --requeue"
    done = _scontrol("requeue", job.job_id)
    if isinstance(done, str):
        return f"Slurm job {job.job_id} not requeued: {done}"
    if done.returncode != 0:
        return f"Slurm job {job.job_id} not requeued: {(done.stderr or done.stdout).strip()[:200]}"
    return f"requeued Slurm job {job.job_id}: it runs again and resumes from the save"

