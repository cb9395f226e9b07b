"""Model parameters and buffers: plain modules, DDP, and FSDP2 / DTensor sharding."""

from __future__ import annotations

import operator
from collections.abc import Mapping, Set

import torch

from stalwart.ckpt.providers.base import (
    Collected,
    DictEntries,
    Item,
    RestoreContext,
    StateProvider,
    copy_into,
)
from stalwart.errors import LayoutError
from stalwart.formats.layout import Mesh, Replicated, Shard, Sharded, TensorSpec


def is_deepspeed_engine(obj) -> bool:
    """True for a DeepSpeed engine, without importing deepspeed."""
    return any(c.__module__.startswith("deepspeed.") and c.__name__ == "DeepSpeedEngine" for c in type(obj).__mro__)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The user's module inside DDP / DataParallel / DeepSpeed-style wrappers."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model


_DTENSOR: tuple[type, ...] | None = None


def fix_ddp_buckets(model) -> bool:
    """Give a DDP model its final gradient-bucket layout now, before the first backward.

    DDP reduces the first iteration in buckets of reverse parameter order, then rebuilds
    them from the order gradients became ready. A restarted job's first iteration therefore
    reduces in a different layout than the uninterrupted job's same step, and with three or
    more ranks ring all-reduce then sums in a different order: results differ in the last
    bits. Fixing the layout (parameter order, for every iteration of every run) makes
    restarts bitwise reproducible at any world size, at the price of the overlap of
    communication with backward that ready-order buckets give on large GPU models.
    Collective over the DDP group (every rank calls it); returns False, doing nothing, for
    non-DDP models or when the buckets were already rebuilt (training already ran).
    """
    from torch.nn.parallel import DistributedDataParallel

    if not isinstance(model, DistributedDataParallel) or getattr(model, "reducer", None) is None:
        return False
    model.reducer._push_all_rebuilt_params()
    return bool(model.reducer._rebuild_buckets())


def _is_dtensor(t) -> bool:
    global _DTENSOR
    if _DTENSOR is None:  # imported once: this runs for every tensor at every snapshot
        try:
            from torch.distributed.tensor import DTensor

            _DTENSOR = (DTensor,)
        except ImportError:  # pragma: no cover
            _DTENSOR = ()
    return isinstance(t, _DTENSOR)


def dtensor_placement(t, mesh: Mesh) -> tuple[tuple[int, ...], Sharded | Replicated, torch.Tensor]:
    """(global shape, placement, local tensor) of a DTensor on a mesh matching ``mesh``.

    ``Shard(d)`` on mesh dim ``i`` becomes a chunk-mode :class:`Shard` level (DTensor
    uses torch.chunk semantics); ``Replicate`` adds nothing. Partial and strided
    shardings are refused with a clear error.
    """
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor import Shard as DShard

    dmesh = t.device_mesh
    names = dmesh.mesh_dim_names or tuple(f"mesh{i}" for i in range(dmesh.ndim))
    levels = []
    for i, p in enumerate(t.placements):
        if isinstance(p, Replicate):
            continue
        if type(p) is DShard:
            if names[i] not in mesh.dims:
                raise LayoutError(f"DTensor mesh dim {names[i]!r} is not part of the checkpoint mesh {mesh.dims}")
            levels.append(Shard(p.dim, names[i]))
            continue
        raise LayoutError(f"DTensor placement {p!r} is not supported yet (Shard and Replicate are)")
    placement = Sharded(tuple(levels)) if levels else Replicated()
    return tuple(t.shape), placement, t.to_local()


def mesh_from_model(model: torch.nn.Module, world_size: int) -> Mesh:
    """The checkpoint mesh: a DTensor model's device mesh, else one 'dp' dim of the world."""
    for p in model.parameters():
        if _is_dtensor(p):
            dm = p.device_mesh
            names = dm.mesh_dim_names or tuple(f"mesh{i}" for i in range(dm.ndim))
            flat = dm.mesh.flatten().tolist()
            if flat != list(range(world_size)):
                raise LayoutError("the DTensor device mesh must cover ranks 0..world-1 in row-major order")
            return Mesh(tuple(names), tuple(dm.mesh.shape))
    return Mesh(("dp",), (world_size,))


def _walk(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """("<prefix>.", module) in ``named_modules(remove_duplicate=False)`` order (pre-order,
    children in registration order, shared modules under every name), without its
    recursive generators (this walk runs at every snapshot)."""
    out = []
    stack = [("", model)]
    while stack:
        dot, m = stack.pop()
        out.append((dot, m))
        children = m._modules
        if children:
            stack.extend((f"{dot}{name}.", c) for name, c in reversed(children.items()) if c is not None)
    return out


_CHILDREN, _PARAMS, _BUFFERS = (operator.attrgetter(a) for a in ("_modules", "_parameters", "_buffers"))
_DTYPE = operator.attrgetter("dtype")


class _Collected:
    """A model's collected items with what they were collected from, checked cheaply at
    every snapshot (C-level maps, identity comparisons, no names rebuilt): every module
    keeps its children, parameters and buffers (the same objects under the same names),
    and every tensor its storage (``p.data = new`` keeps the Parameter but not the storage
    the items alias), size and dtype."""

    def __init__(self, mesh: Mesh, modules: list[torch.nn.Module], tensors: list[torch.Tensor], out: Collected) -> None:
        self.mesh, self.modules, self.tensors, self.out = mesh, modules, tensors, out
        self.children = [dict(d) for d in map(_CHILDREN, modules)]  # modules compare by identity
        self.params, self.buffers = list(map(_PARAMS, modules)), list(map(_BUFFERS, modules))
        self.entries = DictEntries(self.params + self.buffers)
        self.dtensors = any(map(_is_dtensor, tensors))
        self.storage = self._storage()

    def _storage(self) -> tuple[list, list, list]:
        ts = self.tensors
        if self.dtensors:  # DTensors have no storage of their own: their local shards'
            ts = [t._local_tensor if _is_dtensor(t) else t for t in ts]
        return list(map(torch.Tensor.data_ptr, ts)), list(map(torch.Tensor.size, ts)), list(map(_DTYPE, ts))

    def unchanged(self) -> bool:
        mods, is_ = self.modules, operator.is_
        return (list(map(_CHILDREN, mods)) == self.children
                and all(map(is_, map(_PARAMS, mods), self.params)) and all(map(is_, map(_BUFFERS, mods), self.buffers))
                and self.entries.unchanged() and self._storage() == self.storage)


class ModuleProvider(StateProvider):
    """Params (lazy) and persistent buffers (eager, they change in forward) of a model.

    DDP replicas hold the same values: the tensors are replicated over the mesh and
    each is stored by one rank (round-robin), so saving work is spread. FSDP2 /
    DTensor params are stored as each rank's local shard under their placement.
    """

    name = "model"

    def __init__(self, model: torch.nn.Module, prefix: str = "") -> None:
        self.model = unwrap(model)
        self.prefix = prefix
        self._persistent: set[str] | None = None
        self._cache: _Collected | None = None

    def _named(self) -> list[tuple[str, torch.Tensor, str]]:
        """What ``named_parameters(remove_duplicate=False)`` then ``named_buffers()`` (persistent
        ones) yield, in one walk of the modules (this runs at every snapshot)."""
        if self._persistent is None:  # state_dict() is costly; buffer persistence is fixed at registration
            self._persistent = set(self.model.state_dict(keep_vars=True).keys())
        params, buffers = [], []
        seen_modules, seen_buffers = set(), set()
        # remove_duplicate=False: tied parameters appear under every name (aliases need them);
        # buffers as named_buffers() gives them: each module and each buffer once
        for dot, m in _walk(self.model):
            params += [(dot + k, p, "param") for k, p in m._parameters.items() if p is not None]
            if m._buffers and id(m) not in seen_modules:
                seen_modules.add(id(m))
                for k, b in m._buffers.items():
                    if b is not None and id(b) not in seen_buffers:
                        seen_buffers.add(id(b))
                        if dot + k in self._persistent:
                            buffers.append((dot + k, b, "buffer"))
        return params + buffers

    def collect(self, mesh: Mesh, rank: int) -> Collected:
        cache = self._cache
        if cache is not None and cache.mesh == mesh and cache.unchanged():
            return cache.out  # same tensors, same structure: the very same items (see build_plan)
        named = self._named()
        out = self._collect(mesh, named)
        self._cache = _Collected(mesh, [m for _, m in _walk(self.model)], [t for _, t, _ in named], out)
        return out

    def _collect(self, mesh: Mesh, named) -> Collected:
        out = Collected()
        seen: dict[int, str] = {}
        for name, t, role in named:
            key = id(t)
            if key in seen:  # tied weights: stored once, under the first name
                out.aliases[self.prefix + name] = self.prefix + seen[key]
                continue
            seen[key] = name
            if _is_dtensor(t):
                shape, placement, local = dtensor_placement(t.data if role == "param" else t, mesh)
            else:
                shape, placement, local = tuple(t.shape), Replicated(), t.data
            spec = TensorSpec(self.prefix + name, shape, t.dtype, placement, role=role)
            out.items.append(Item(spec, local, lazy=role == "param"))
        return out

    def aliases(self) -> dict[str, str]:
        """alias name -> owner name for tied parameters."""
        seen: dict[int, str] = {}
        out = {}
        for name, t, _ in self._named():
            if id(t) in seen:
                out[self.prefix + name] = self.prefix + seen[id(t)]
            else:
                seen[id(t)] = name
        return out

    def restore(self, tensors: Mapping[str, torch.Tensor], ctx: RestoreContext, keep: Set[str] = frozenset()) -> None:
        """Copy the loaded tensors into the live ones; names in ``keep`` stay as they are
        (in-process recovery: the live tensor already holds the restored step)."""
        missing = []
        for name, t, _ in self._named():
            full = self.prefix + name
            if full in keep:
                continue
            src = tensors.get(full)
            if src is None:
                owner = self.aliases().get(full)
                if owner is not None and owner in tensors:
                    continue  # tied: restored through its owner
                missing.append(full)
                continue
            dst = t.to_local() if _is_dtensor(t) else t
            copy_into(dst, src)
        if missing:
            raise LayoutError(f"the checkpoint lacks model tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")
