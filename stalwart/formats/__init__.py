"""The universal checkpoint format: manifest + safetensors, reshardable on load.

Unsharded use is as simple as torch.save / torch.load::

    stalwart.formats.save({"model": model.state_dict(), "step": 7}, "ckpt/")
    state = stalwart.formats.load("ckpt/")

Sharded use passes a :class:`Layout` (how global tensors map onto ranks); ``load``
with a different layout reshards, reading only the bytes a rank needs. See
docs/FORMAT.md for the on-disk specification.
"""

from __future__ import annotations

from collections.abc import Iterable

from stalwart.formats.geometry import Box, Piece
from stalwart.formats.layout import (
    Explicit,
    Fragment,
    Layout,
    LocalShard,
    Mesh,
    ParallelConfig,
    Replicated,
    Shard,
    Sharded,
    TensorSpec,
    TPRule,
    ZeroFlat,
    ZeroGroup,
    ZeroParam,
    layout_from_model,
)
from stalwart.formats.manifest import FORMAT_VERSION, Manifest
from stalwart.formats.reader import Checkpoint, VerifyReport
from stalwart.formats.writer import commit, save, write_rank


def open(path: str) -> Checkpoint:
    """Open a checkpoint (or a root with a ``latest`` pointer) for its manifest and partial reads."""
    return Checkpoint(path)


def load(
    path: str,
    *,
    layout: Layout | None = None,
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
    with Checkpoint(path) as ckpt:
        return ckpt.load(layout, rank, names, progress=progress, mmap=mmap)


def verify(path: str, *, progress=None) -> VerifyReport:
    """Check every checksum and every tensor's coverage; see :class:`VerifyReport`."""
    with Checkpoint(path) as ckpt:
        return ckpt.verify(progress=progress)


__all__ = [
    "FORMAT_VERSION",
    "Box",
    "Checkpoint",
    "Explicit",
    "Fragment",
    "Layout",
    "LocalShard",
    "Manifest",
    "Mesh",
    "ParallelConfig",
    "Piece",
    "Replicated",
    "Shard",
    "Sharded",
    "TPRule",
    "TensorSpec",
    "VerifyReport",
    "ZeroFlat",
    "ZeroGroup",
    "ZeroParam",
    "commit",
    "layout_from_model",
    "load",
    "open",
    "save",
    "verify",
    "write_rank",
]
