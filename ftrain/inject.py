"""Fault specs for ``ftrain run --inject`` (DESIGN §1): ``oom@30,segv@60,nan@90,hang@120``.

The CLI validates a spec with ``parse_inject``; the supervisor hands the faults still to
fire to the child as ``FTRAIN_INJECT`` (``format_inject``); the shim parses it again and
fires each fault once, the first time a logged step reaches the fault's step.
Pure: no I/O, no dependencies.
"""

from __future__ import annotations

from dataclasses import dataclass

TYPE_CHECKING = False   # typing costs milliseconds at import, and the shim imports this module
if TYPE_CHECKING:
    from collections.abc import Iterable

KINDS: tuple[str, ...] = (
    "oom",     # torch.OutOfMemoryError with PyTorch's CUDA message
    "cuda",    # torch.AcceleratorError: CUDA error: an illegal memory access was encountered
    "nccl",    # torch.distributed.DistBackendError: NCCL error in: ... ncclUnhandledCudaError
    "segv",    # a real SIGSEGV
    "abort",   # os.abort(): SIGABRT
    "kill",    # SIGKILL to itself
    "nan",     # this step's loss (or every float metric) is logged as NaN
    "spike",   # this step's loss is logged x1000
    "hang",    # block forever, as a stuck collective would
    "exc",     # RuntimeError
    "term",    # SIGTERM to itself: a rehearsal of preemption
)


@dataclass(frozen=True)
class Fault:
    """One fault to inject: ``kind`` (one of ``KINDS``) at the first logged step >= ``step``."""

    kind: str
    step: int

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r} (known: {', '.join(KINDS)})")
        if isinstance(self.step, bool) or not isinstance(self.step, int) or self.step < 0:
            raise ValueError(f"fault step must be an integer >= 0, not {self.step!r}")

    def __str__(self) -> str:
        return f"{self.kind}@{self.step}"


def parse_inject(spec: str | None) -> tuple[Fault, ...]:
    """Parse ``kind@step[,kind@step...]``; an empty spec is no fault.

    Raises ``ValueError`` with a one-line message naming the bad item.
    """
    if spec is None or not spec.strip():
        return ()
    faults: list[Fault] = []
    for raw in spec.split(","):
        item = raw.strip()
        kind, sep, step_text = item.partition("@")
        kind, step_text = kind.strip().lower(), step_text.strip()
        if not item:
            raise ValueError(f"--inject {spec!r}: empty item (expected kind@step, e.g. oom@30)")
        if not sep or not kind or not step_text:
            raise ValueError(f"--inject {spec!r}: {item!r} is not kind@step (e.g. oom@30)")
        if kind not in KINDS:
            raise ValueError(f"--inject {spec!r}: unknown fault kind {kind!r} (known: {', '.join(KINDS)})")
        if not (step_text.isascii() and step_text.isdigit()):
            raise ValueError(f"--inject {spec!r}: step {step_text!r} of {item!r} is not an integer >= 0")
        faults.append(Fault(kind, int(step_text)))
    return tuple(faults)


def format_inject(faults: Iterable[Fault]) -> str:
    """The spec text of ``faults`` (``""`` for none); ``parse_inject`` reads it back."""
    return ",".join(str(f) for f in faults)
