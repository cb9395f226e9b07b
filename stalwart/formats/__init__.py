"""The universal checkpoint format: manifest + safetensors, reshardable on load.

Unsharded use is as simple as torch.save / torch.load::

    stalwart.formats.save({"model": model.state_dict(), "step": 7}, "ckpt/")
    state = stalwart.formats.load("ckpt/")

Sharded use passes a :class:`Layout` (how global tensors map onto ranks); ``load``
with a different layout reshards, reading only the bytes a rank needs. See
docs/FORMAT.md for the on-disk specification.

Names are imported on first use (PEP 562), so light tools (``stalwart --help``) do
not pay for importing torch.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable

_EXPORTS = {
    "Box": "geometry",
    "Piece": "geometry",
    "Explicit": "layout",
    "Fragment": "layout",
    "Layout": "layout",
    "LocalShard": "layout",
    "Mesh": "layout",
    "ParallelConfig": "layout",
    "Replicated": "layout",
    "Shard": "layout",
    "Sharded": "layout",
    "TPRule": "layout",
    "TensorSpec": "layout",
    "ZeroFlat": "layout",
    "ZeroGroup": "layout",
    "ZeroParam": "layout",
    "layout_from_model": "layout",
    "FORMAT_VERSION": "manifest",
    "Manifest": "manifest",
    "Checkpoint": "reader",
    "VerifyReport": "reader",
    "commit": "writer",
    "save": "writer",
    "write_rank": "writer",
}


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'stalwart.formats' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"stalwart.formats.{module}"), name)
    globals()[name] = value
    return value


def open(path: str):
    """Open a checkpoint (or a root with a ``latest`` pointer) for its manifest and partial reads."""
    from stalwart.formats.reader import Checkpoint

    return Checkpoint(path)


def load(
    path: str,
    *,
    layout=None,
    rank: int = 0,
    names: Iterable[str] | None = None,
    progress=None,
    mmap: bool = True,
) -> dict:
    """Load a checkpoint.

    Without ``layout``: whole tensors, in the saved (possibly nested) structure.
    With ``layout``: the local tensors ``rank`` holds under it, by tensor name,
    resharded from however the checkpoint was saved. ``names`` restricts to some
    tensors. Every byte read is verified against its checksum. With ``mmap`` (the
    default), tensors stored whole are copy-on-write views of the file's pages
    instead of copies, like safetensors' ``load_file``.
    """
    from stalwart.formats.reader import Checkpoint

    with Checkpoint(path) as ckpt:
        return ckpt.load(layout, rank, names, progress=progress, mmap=mmap)


def verify(path: str, *, progress=None):
    """Check every checksum and every tensor's coverage; returns a :class:`VerifyReport`."""
    from stalwart.formats.reader import Checkpoint

    with Checkpoint(path) as ckpt:
        return ckpt.verify(progress=progress)


__all__ = [*sorted(_EXPORTS), "load", "open", "verify"]
