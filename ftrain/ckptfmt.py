"""Checkpoint file names, shared by the shim (which writes them) and ``checkpoints`` (which reads them).

A checkpoint of step 120 is the data file ``step-00000120.pt`` and its manifest
``step-00000120.json``. Both are written under a temporary name that starts with
``.tmp-`` (``.tmp-step-00000120.pt.<pid>``) and renamed into place when complete, so a name
without the prefix is always a finished file. The manifest's checksum is ``"digest":
"xxh3_128:<hex>"`` (``"sha256": "<hex>"`` in manifests written before, or where the xxhash
package is missing); ``digest_of`` reads either, ``hasher`` makes the hash it names. Pure
string work but for those hashes, imported when first asked for.
"""

from __future__ import annotations

import re

TYPE_CHECKING = False   # typing costs milliseconds at import, and the shim imports this
if TYPE_CHECKING:
    from collections.abc import Mapping
    from typing import Any

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


# The checksum algorithms a manifest may name, and the length of their hex digests. New
# manifests use xxh3_128: SHA-256 of 100 MB costs as long as torch.save writing it (~65 ms
# here), XXH3 5 ms, so a save's checksum no longer doubles its time. Both detect damage;
# neither is a signature (a checkpoint is not authenticated either way).
DIGEST_HEX = {"xxh3_128": 32, "sha256": 64}


def hasher(algorithm: str) -> Any:
    """A new hash object of ``algorithm`` (``update``, ``hexdigest``); None when it is
    unknown or its package is not installed."""
    if algorithm == "sha256":
        import hashlib

        return hashlib.sha256()
    if algorithm == "xxh3_128":
        try:
            import xxhash
        except ImportError:
            return None
        return xxhash.xxh3_128()
    return None


def new_hasher() -> tuple[str, Any]:
    """The algorithm a new manifest uses and a hash object of it: xxh3_128 where xxhash is
    installed, else sha256."""
    fast = hasher("xxh3_128")
    return ("xxh3_128", fast) if fast is not None else ("sha256", hasher("sha256"))


def digest_field(algorithm: str, hexdigest: str) -> dict[str, str]:
    """The manifest's checksum entry: ``{"digest": "xxh3_128:…"}``, or ``{"sha256": …}`` for
    sha256 (the field older readers know)."""
    return {"sha256": hexdigest} if algorithm == "sha256" else {"digest": f"{algorithm}:{hexdigest}"}


def digest_of(meta: Mapping[str, Any]) -> tuple[str, str] | None:
    """(algorithm, hex) of a manifest's checksum: its ``digest``, else its ``sha256``; None
    when it has neither (or they are not strings)."""
    digest = meta.get("digest")
    if isinstance(digest, str):
        algorithm, _, hexdigest = digest.partition(":")
        return algorithm, hexdigest
    sha = meta.get("sha256")
    return ("sha256", sha) if isinstance(sha, str) else None
