"""State providers: turn live training objects into named tensors + JSON, and back.

A provider contributes :class:`Item` s (a global :class:`TensorSpec` with this rank's
local tensor) and JSON objects to each snapshot, and on restore receives the
tensors it asked for (:meth:`StateProvider.targets`) plus the checkpoint's objects.

*Lazy* items (params, optimizer state) are copied in the background after
``guard.step()``: they cannot change until the next optimizer step. *Eager* items
(buffers such as BatchNorm statistics, RNG, data position) change during the
forward pass and are copied before ``guard.step()`` returns; they are small.
"""

from __future__ import annotations

import operator
import warnings
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

from stalwart.formats.layout import Mesh, Shard, Sharded, TensorSpec, ZeroGroup


@dataclass
class Item:
    spec: TensorSpec
    tensor: torch.Tensor  # this rank's local shard (any device); None for ranks that hold nothing
    lazy: bool = True


@dataclass
class Collected:
    items: list[Item] = field(default_factory=list)
    objects: dict = field(default_factory=dict)  # JSON-able; rank 0's are stored
    groups: dict[str, ZeroGroup] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)  # tied weights: alias name -> stored owner name


@dataclass(frozen=True)
class RestoreContext:
    """What a provider sees at restore time."""

    mesh: Mesh
    rank: int
    step: int | None
    saved: Mapping[str, TensorSpec]  # the checkpoint's tensors
    objects: Mapping  # the checkpoint's global objects
    same_topology: bool  # saved world/mesh equals the current one


class StateProvider(ABC):
    """One source of training state. Names it produces must be unique across providers."""

    name: str = "state"

    @abstractmethod
    def collect(self, mesh: Mesh, rank: int) -> Collected:
        """This rank's items and the global objects, as of now."""

    def targets(self, ctx: RestoreContext) -> Collected:
        """What to load on restore: by default what :meth:`collect` describes, restricted
        to tensors the checkpoint holds (providers whose state is created lazily, such
        as optimizers, override this)."""
        got = self.collect(ctx.mesh, ctx.rank)  # may be cached by the provider: never mutate it
        return Collected(items=[i for i in got.items if i.spec.name in ctx.saved], objects=got.objects, groups=got.groups)

    @abstractmethod
    def restore(self, tensors: Mapping[str, torch.Tensor], ctx: RestoreContext) -> None:
        """Put loaded local tensors (by name) and ``ctx.objects`` back into the live objects."""


def per_rank_spec(name: str, mesh: Mesh, shape: tuple[int, ...], dtype: torch.dtype) -> TensorSpec:
    """A tensor with a leading world dimension; rank ``r`` holds row ``r`` (RNG, data position)."""
    levels = tuple(Shard(0, d, None, "even") for d in mesh.dims if mesh.size(d) > 1)
    full = (mesh.world_size, *shape)
    from stalwart.formats.layout import Replicated

    placement = Sharded(levels) if levels else Replicated()
    return TensorSpec(name, full, dtype, placement, role="other")


def blob_targets(ctx: RestoreContext, name: str) -> Collected:
    """Load this rank's row of a per-rank blob, if saved under the same topology."""
    saved = ctx.saved.get(name)
    if saved is None or not ctx.same_topology:
        return Collected()
    spec = per_rank_spec(name, ctx.mesh, saved.shape[1:], torch.uint8)
    return Collected(items=[Item(spec, torch.empty((1, *saved.shape[1:]), dtype=torch.uint8), lazy=False)])


class PerRankBlobProvider(StateProvider):
    """State that is one byte blob per rank (RNG streams, data position).

    Stored as a uint8 tensor with a leading world dimension (rank ``r`` holds row ``r``),
    copied eagerly, and restored only when the topology is unchanged (the rows belong
    to ranks that may no longer exist).
    """

    tensor_name: str = ""
    what: str = ""  # for the warning when it cannot be restored

    def pack(self) -> np.ndarray:
        raise NotImplementedError

    def unpack(self, blob: bytes) -> None:
        raise NotImplementedError

    def collect(self, mesh: Mesh, rank: int) -> Collected:
        blob = torch.from_numpy(self.pack())
        key = (mesh, blob.shape[0])
        cached = self.__dict__.get("_spec")
        if cached is None or cached[0] != key:  # the same spec object every step: cheap to validate
            cached = self._spec = (key, per_rank_spec(self.tensor_name, mesh, tuple(blob.shape), torch.uint8))
        return Collected(items=[Item(cached[1], blob.view(1, -1), lazy=False)])

    def targets(self, ctx: RestoreContext) -> Collected:
        return blob_targets(ctx, self.tensor_name)

    def restore(self, tensors: Mapping[str, torch.Tensor], ctx: RestoreContext) -> None:
        blob = tensors.get(self.tensor_name)
        if blob is None:
            if self.tensor_name in ctx.saved:
                warnings.warn(f"topology changed: {self.what} is per rank and is not restored", stacklevel=2)
            return
        self.unpack(blob.reshape(-1).numpy().tobytes())


class DictEntries:
    """The entries of some dicts as a snapshot's cached items were made from them, checked
    cheaply at every snapshot (C-level maps): every dict holds as many entries as then, and
    under each key the very same object (``is``: tensors compare elementwise with ``==``)."""

    def __init__(self, dicts: Iterable[dict]) -> None:
        self.dicts = list(dicts)
        self.lens = list(map(len, self.dicts))
        self._of = [d for d in self.dicts for _ in d]
        self._keys = [k for d in self.dicts for k in d]
        self.values = [v for d in self.dicts for v in d.values()]

    def unchanged(self) -> bool:
        try:
            return (list(map(len, self.dicts)) == self.lens
                    and all(map(operator.is_, map(dict.get, self._of, self._keys), self.values)))
        except TypeError:  # a mapping that is not a dict: reported changed, so the items are rebuilt
            return False


def copy_into(dst: torch.Tensor, src: torch.Tensor) -> None:
    """In-place restore that keeps the live tensor object (and its optimizer identity)."""
    with torch.no_grad():
        dst.copy_(src.reshape(dst.shape) if src.shape != dst.shape else src)
