"""Checkpoint file names, shared by the shim (which writes them) and ``checkpoints`` (which reads them).

A checkpoint of step 120 is the data file ``step-00000120.pt`` and its manifest
``step-00000120.json``. Both are written under a temporary name that starts with
``.tmp-`` (``.tmp-step-00000120.pt.<pid>``) and renamed into place when complete, so a name
without the prefix is always a finished file. Pure string work: no I/O, no dependencies.
"""

from __future__ import annotations

import re

DATA_SUFFIX = ".pt"
MANIFEST_SUFFIX = ".json"
TEMP_PREFIX = ".tmp-"
QUARANTINE_DIR = "quarantine"

# The shim's own names; the step may outgrow the eight digits of padding.
STEP_RE = re.compile(r"^step-(\d+)\.(pt|json)$")
TEMP_RE = re.compile(r"^\.tmp-step-(\d+)\.(pt|json)\.\d+$")
# Names other tools give checkpoints: model_step1200.pt, checkpoint-500, epoch=3-step=1200.ckpt.
_KEYWORD_STEP_RE = re.compile(r"(?:global_step|step|iteration|iter|it|checkpoint|ckpt)[-_=]?(\d+)",
                              re.IGNORECASE)
_TRAILING_NUMBER_RE = re.compile(r"(?:^|[-_.=])(\d+)$")


def data_name(step: int) -> str:
    """``step-00000120.pt``: the data file the shim writes for ``step``."""
    return f"step-{step:08d}{DATA_SUFFIX}"


def manifest_name(step: int) -> str:
    """``step-00000120.json``: the manifest beside the data file of ``step``."""
    return f"step-{step:08d}{MANIFEST_SUFFIX}"


def temp_name(final_name: str, pid: int) -> str:
    """``.tmp-step-00000120.pt.<pid>``: where ``final_name`` is written before its rename."""
    return f"{TEMP_PREFIX}{final_name}.{pid}"


def parse_step(name: str) -> int | None:
    """The step in one of the shim's names (data, manifest or temp), else None."""
    match = STEP_RE.match(name) or TEMP_RE.match(name)
    return int(match.group(1)) if match else None


def manifest_for(name: str) -> str | None:
    """The manifest name that belongs to data file ``name``; None for a foreign name."""
    match = STEP_RE.match(name)
    if match is None or match.group(2) != "pt":
        return None
    return manifest_name(int(match.group(1)))


def guess_step(name: str) -> int | None:
    """The step of any checkpoint-like name: ours first, then a ``step``-like keyword, then a
    trailing number (``ckpt_1200.pth``); None when the name carries no step."""
    own = parse_step(name)
    if own is not None:
        return own
    keyword = _KEYWORD_STEP_RE.findall(name)
    if keyword:
        return int(keyword[-1])
    stem = name.split(".", 1)[0] if not name.startswith(".") else name
    trailing = _TRAILING_NUMBER_RE.search(stem)
    return int(trailing.group(1)) if trailing else None
