"""Layouts: how the global tensors of a model map onto ranks.

A :class:`Layout` is a device :class:`Mesh` (named dimensions such as ``pp``, ``dp``,
``tp``) plus, for every logical tensor, a :class:`Placement` rule:

* :class:`Replicated` - every rank holds the whole tensor (DP replication);
* :class:`Sharded` - TP / DTensor ``Shard`` slicing along dimensions, with fused
  sub-parameters (QKV with GQA head counts, SwiGLU gate/up), vocabulary padding
  and uneven widths, nested over several mesh dimensions;
* :class:`ZeroFlat` - ZeRO-1/2: the params of a group are flattened (with
  DeepSpeed's alignment padding) into one buffer cut into equal DP partitions;
* :class:`ZeroParam` - ZeRO-3: each param is flattened and cut into
  ``ceil(numel / dp)`` pieces;
* :class:`Explicit` - enumerated irregular fragments, one per rank.

A tensor may also be owned by one pipeline stage (``stage``). Regular rules are
stored as rules, so a layout's JSON grows with tensors + mesh size, never with
their product; every rank's share, and which ranks hold a region, are computed.

What a rank holds of a tensor is a :class:`LocalShard`: the local tensor's shape
and the :class:`~stalwart.formats.geometry.Piece` list mapping global boxes into it.
Where a tensor has replicas (mesh dimensions its placement does not use), one
replica per tensor is the designated *writer*, chosen round-robin over tensors so
that saving work spreads across replicas.
"""

from __future__ import annotations

import bisect
import json
import math
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import lru_cache
from itertools import product

import torch

from stalwart.errors import LayoutError
from stalwart.formats.dtypes import dtype_from_name, dtype_name
from stalwart.formats.dtypes import itemsize as _itemsize
from stalwart.formats.geometry import Box, Piece, Shape, check_panels, decompose_flat, row_major_strides

# --------------------------------------------------------------------------- mesh


@dataclass(frozen=True)
class Mesh:
    """Named mesh dimensions; ranks are numbered row-major (the last dimension varies fastest)."""

    dims: tuple[str, ...]
    sizes: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.dims) != len(self.sizes):
            raise LayoutError(f"mesh dims {self.dims} and sizes {self.sizes} differ in length")
        if len(set(self.dims)) != len(self.dims):
            raise LayoutError(f"mesh dims repeat a name: {self.dims}")
        for d, s in zip(self.dims, self.sizes):
            if s < 1:
                raise LayoutError(f"mesh dim {d!r} has size {s}; sizes must be >= 1")

    @staticmethod
    def single() -> Mesh:
        return Mesh(("dp",), (1,))

    @property
    def world_size(self) -> int:
        return math.prod(self.sizes)

    def size(self, dim: str) -> int:
        try:
            return self.sizes[self.dims.index(dim)]
        except ValueError:
            raise LayoutError(f"mesh has no dimension {dim!r} (dims: {', '.join(self.dims)})") from None

    def has(self, dim: str) -> bool:
        return dim in self.dims

    def coords(self, rank: int) -> dict[str, int]:
        if not 0 <= rank < self.world_size:
            raise LayoutError(f"rank {rank} is outside a mesh of {self.world_size} ranks")
        out = {}
        for d, s in zip(reversed(self.dims), reversed(self.sizes)):
            rank, out[d] = divmod(rank, s)
        return {d: out[d] for d in self.dims}

    def rank(self, coords: Mapping[str, int]) -> int:
        r = 0
        for d, s in zip(self.dims, self.sizes):
            c = coords.get(d, 0)
            if not 0 <= c < s:
                raise LayoutError(f"coordinate {d}={c} is outside mesh size {s}")
            r = r * s + c
        return r

    def to_json(self) -> dict:
        return {"dims": list(self.dims), "sizes": list(self.sizes)}

    @staticmethod
    def from_json(obj: Mapping) -> Mesh:
        return Mesh(tuple(obj["dims"]), tuple(int(s) for s in obj["sizes"]))


# --------------------------------------------------------------------------- local shards


@dataclass(frozen=True)
class LocalShard:
    """What one rank holds of a tensor: the local tensor's shape and where global boxes sit in it.

    Elements of the local tensor not covered by any piece are padding (e.g. padded
    vocabulary rows); they are zero when a shard is built from a checkpoint.
    """

    shape: Shape
    pieces: tuple[Piece, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def paneled(self, dim: int, width: int) -> LocalShard:
        """The same shard stored as *panels*: cut along ``dim`` into runs of ``width``
        (the last may be narrower), each stored row-major, one after the other.

        Pieces keep their global boxes, split where they cross a panel boundary;
        their offsets and strides address the paneled storage. Only shards whose
        pieces use the local row-major strides (box placements) can be paneled.
        """
        shape = self.shape
        local_strides = row_major_strides(shape)
        n = shape[dim]
        per_col = math.prod(shape) // n if n else 0  # elements of one index along ``dim``
        pieces = []
        for p in self.pieces:
            if p.strides != local_strides:
                raise LayoutError("only box-shaped local shards can be stored as panels")
            idx, rem = [], p.offset
            for st in local_strides:
                i, rem = divmod(rem, st)
                idx.append(i)
            lo, hi = idx[dim], idx[dim] + p.box.lengths[dim]
            for j in range(lo // width, -(-hi // width)):
                c0, c1 = max(lo, j * width), min(hi, (j + 1) * width)
                pshape = tuple(min(width, n - j * width) if k == dim else x for k, x in enumerate(shape))
                pstrides = row_major_strides(pshape)
                offset = j * width * per_col + sum(
                    (c0 - j * width if k == dim else i) * st for k, (i, st) in enumerate(zip(idx, pstrides))
                )
                box = Box(
                    tuple(o + (c0 - lo) if k == dim else o for k, o in enumerate(p.box.offsets)),
                    tuple(c1 - c0 if k == dim else x for k, x in enumerate(p.box.lengths)),
                )
                pieces.append(Piece(box, offset, pstrides))
        return LocalShard(shape, tuple(pieces))


def _translate_box_pieces(pairs: Iterable[tuple[Box, Shape]], local_shape: Shape) -> tuple[Piece, ...]:
    strides = row_major_strides(local_shape)
    out = []
    for gbox, loff in pairs:
        if gbox.is_empty():
            continue
        out.append(Piece(gbox, sum(o * s for o, s in zip(loff, strides)), strides))
    return tuple(out)


def _compose_box_maps(
    outer: Sequence[tuple[Box, Shape]], inner: Sequence[tuple[Box, Shape]]
) -> list[tuple[Box, Shape]]:
    """``outer`` maps global boxes to positions in L1; ``inner`` maps L1 boxes to positions in L2.

    Returns global boxes with their positions in L2.
    """
    out = []
    for g, o in outer:
        region = Box(o, g.lengths)
        for b, p in inner:
            c = region.intersect(b)
            if c is None:
                continue
            goff = tuple(gi + (ci - oi) for gi, ci, oi in zip(g.offsets, c.offsets, o))
            loff = tuple(pi + (ci - bi) for pi, ci, bi in zip(p, c.offsets, b.offsets))
            out.append((Box(goff, c.lengths), loff))
    return out


def _flat_pieces(
    box_map: Sequence[tuple[Box, Shape]], base_shape: Shape, start: int, stop: int
) -> tuple[Piece, ...]:
    """Pieces of the flat range ``[start, stop)`` of a box-local tensor of ``base_shape``.

    ``box_map`` maps global boxes to positions in that box-local tensor. The result's
    storage is the 1-D flat shard holding exactly those elements.
    """
    strides = row_major_strides(base_shape)
    out = []
    for sub, pos in decompose_flat(base_shape, start, stop):
        for g, o in box_map:
            c = sub.intersect(Box(o, g.lengths))
            if c is None:
                continue
            goff = tuple(gi + (ci - oi) for gi, ci, oi in zip(g.offsets, c.offsets, o))
            off = pos + sum((ci - si) * st for ci, si, st in zip(c.offsets, sub.offsets, strides))
            out.append(Piece(Box(goff, c.lengths), off, strides))
    return tuple(out)


# --------------------------------------------------------------------------- placements


class Placement:
    """A rule mapping one tensor onto mesh coordinates. Subclasses are immutable."""

    kind: str = ""

    def dims(self) -> tuple[str, ...]:
        """Mesh dimensions this placement splits the tensor over (the rest are replicas)."""
        return ()

    def local(self, spec: TensorSpec, coords: Mapping[str, int], layout: Layout) -> LocalShard | None:
        raise NotImplementedError

    def candidates(
        self, spec: TensorSpec, box: Box, layout: Layout, fixed: Mapping[str, int]
    ) -> Iterator[dict[str, int]]:
        """Coordinates (over :meth:`dims`) whose local shard may intersect ``box``.

        ``fixed`` holds the coordinates of the other mesh dims (the writer replica),
        which some rules need (a ZeRO group's offsets depend on the TP coordinate).
        """
        raise NotImplementedError

    def validate(self, spec: TensorSpec, layout: Layout) -> None:
        for d in self.dims():
            layout.mesh.size(d)

    def to_json(self) -> dict:
        raise NotImplementedError

    @staticmethod
    def from_json(obj: Mapping) -> Placement:
        kind = obj.get("kind")
        cls = _PLACEMENTS.get(kind)
        if cls is None:
            raise LayoutError(f"unknown placement kind {kind!r}")
        return cls._from_json(obj)


class BoxPlacement(Placement):
    """A placement whose local shard is an N-D tensor made of global boxes (no flattening)."""

    def box_map(self, spec: TensorSpec, coords: Mapping[str, int], layout: Layout) -> tuple[Shape, list]:
        """(local shape, [(global box, position in local tensor)])."""
        raise NotImplementedError

    def local(self, spec, coords, layout):
        shape, pairs = self.box_map(spec, coords, layout)
        if math.prod(shape) == 0 and spec.shape and math.prod(spec.shape) != 0:
            return None
        return LocalShard(shape, _translate_box_pieces(pairs, shape))


@dataclass(frozen=True)
class Replicated(BoxPlacement):
    """Every rank (of the tensor's stage) holds the whole tensor."""

    kind = "replicated"

    def box_map(self, spec, coords, layout):
        return spec.shape, [(Box.full(spec.shape), tuple(0 for _ in spec.shape))]

    def candidates(self, spec, box, layout, fixed):
        yield {}

    def to_json(self) -> dict:
        return {"kind": self.kind}

    @classmethod
    def _from_json(cls, obj):
        return cls()


@dataclass(frozen=True)
class Shard:
    """One level of slicing of tensor dimension ``dim`` over mesh dimension ``mesh_dim``.

    The dimension may hold several fused sub-parameters (``sizes``, e.g. the q, k and
    v rows of a fused QKV weight with GQA head counts); each is split across the mesh
    dimension separately and a rank's local tensor concatenates its part of each.

    ``mode`` decides each part:

    * ``"chunk"`` - torch.chunk / DTensor ``Shard`` semantics: ``ceil(n / k)`` per
      rank, trailing ranks get less or nothing;
    * ``"even"`` - ``n / k`` per rank, an error unless divisible;
    * ``"padded"`` - sub-parameter ``j`` is padded to ``padded[j]`` (a multiple of
      ``k``, e.g. Megatron's padded vocabulary) and each rank holds ``padded[j] / k``
      rows; rows past the real size are padding, not stored;
    * ``"widths"`` - ``widths[j][i]`` rows of sub-parameter ``j`` on rank ``i``.
    """

    dim: int
    mesh_dim: str
    sizes: tuple[int, ...] | None = None
    mode: str = "chunk"
    padded: tuple[int, ...] | None = None
    widths: tuple[tuple[int, ...], ...] | None = None

    def to_json(self) -> dict:
        out: dict = {"dim": self.dim, "mesh_dim": self.mesh_dim, "mode": self.mode}
        if self.sizes is not None:
            out["sizes"] = list(self.sizes)
        if self.padded is not None:
            out["padded"] = list(self.padded)
        if self.widths is not None:
            out["widths"] = [list(w) for w in self.widths]
        return out

    @staticmethod
    def from_json(obj: Mapping) -> Shard:
        return Shard(
            dim=int(obj["dim"]),
            mesh_dim=str(obj["mesh_dim"]),
            sizes=tuple(int(x) for x in obj["sizes"]) if obj.get("sizes") is not None else None,
            mode=str(obj.get("mode", "chunk")),
            padded=tuple(int(x) for x in obj["padded"]) if obj.get("padded") is not None else None,
            widths=tuple(tuple(int(x) for x in w) for w in obj["widths"]) if obj.get("widths") is not None else None,
        )

    # geometry -------------------------------------------------------------
    def _sub_sizes(self, extent: int) -> tuple[int, ...]:
        sizes = self.sizes if self.sizes is not None else (extent,)
        if sum(sizes) != extent:
            raise LayoutError(f"sub-parameter sizes {list(sizes)} along dim {self.dim} do not sum to {extent}")
        return sizes

    def parts(self, extent: int, k: int, i: int) -> list[tuple[int, int, int]]:
        """For rank ``i`` of ``k``: per sub-parameter (global start, backed length, local width)."""
        sizes = self._sub_sizes(extent)
        out = []
        g = 0
        for j, n in enumerate(sizes):
            if self.mode == "chunk":
                c = -(-n // k) if n else 0
                start = min(i * c, n)
                width = max(0, min(c, n - i * c))
                backed = width
            elif self.mode == "even":
                if n % k:
                    raise LayoutError(f"size {n} along dim {self.dim} is not divisible by {self.mesh_dim}={k}")
                width = backed = n // k
                start = i * width
            elif self.mode == "padded":
                if self.padded is None or len(self.padded) != len(sizes):
                    raise LayoutError("mode 'padded' needs one padded size per sub-parameter")
                p = self.padded[j]
                if p < n or p % k:
                    raise LayoutError(f"padded size {p} must be >= {n} and divisible by {self.mesh_dim}={k}")
                width = p // k
                start = min(i * width, n)
                backed = max(0, min(width, n - i * width))
            elif self.mode == "widths":
                if self.widths is None or len(self.widths) != len(sizes) or len(self.widths[j]) != k:
                    raise LayoutError(f"mode 'widths' needs {len(sizes)} lists of {k} widths")
                ws = self.widths[j]
                if sum(ws) != n:
                    raise LayoutError(f"widths {list(ws)} do not sum to sub-parameter size {n}")
                start = sum(ws[:i])
                width = backed = ws[i]
            else:
                raise LayoutError(f"unknown shard mode {self.mode!r}")
            out.append((g + start, backed, width))
            g += n
        return out

    def ranks_touching(self, extent: int, k: int, lo: int, hi: int) -> list[int]:
        """Ranks whose backed rows intersect global rows ``[lo, hi)`` along ``dim``."""
        sizes = self._sub_sizes(extent)
        if self.mode == "widths" or len(sizes) > 1 or k <= 16:
            return [i for i in range(k) if any(s < hi and lo < s + b for s, b, _ in self.parts(extent, k, i) if b)]
        n = sizes[0]
        if self.mode == "chunk":
            c = -(-n // k) if n else 1
        elif self.mode == "even":
            c = n // k
        else:
            c = self.padded[0] // k
        c = max(c, 1)
        return [i for i in range(max(0, lo // c), min(k, -(-hi // c)))]


@dataclass(frozen=True)
class Sharded(BoxPlacement):
    """TP / DTensor slicing: one or more :class:`Shard` levels applied in order."""

    shards: tuple[Shard, ...]
    kind = "sharded"

    def dims(self):
        return tuple(s.mesh_dim for s in self.shards)

    def validate(self, spec, layout):
        super().validate(spec, layout)
        if len(set(self.dims())) != len(self.shards):
            raise LayoutError(f"tensor {spec.name!r}: a mesh dimension is used twice in {self.dims()}")
        for s in self.shards:
            if not 0 <= s.dim < len(spec.shape):
                raise LayoutError(f"tensor {spec.name!r}: cannot shard dim {s.dim} of shape {list(spec.shape)}")

    def box_map(self, spec, coords, layout):
        return _sharded_box_map(self, spec.shape, tuple(coords[s.mesh_dim] for s in self.shards), layout.mesh)

    def candidates(self, spec, box, layout, fixed):
        # Level 0 works in global coordinates and is narrowed arithmetically; deeper
        # levels (nested mesh dims, rare and small) are enumerated.
        first = self.shards[0]
        k0 = layout.mesh.size(first.mesh_dim)
        lo = box.offsets[first.dim]
        firsts = first.ranks_touching(spec.shape[first.dim], k0, lo, lo + box.lengths[first.dim])
        rest = [range(layout.mesh.size(s.mesh_dim)) for s in self.shards[1:]]
        for combo in product(firsts, *rest):
            yield dict(zip(self.dims(), combo))

    def to_json(self):
        return {"kind": self.kind, "shards": [s.to_json() for s in self.shards]}

    @classmethod
    def _from_json(cls, obj):
        return cls(tuple(Shard.from_json(s) for s in obj["shards"]))


@lru_cache(maxsize=65536)
def _sharded_box_map(placement: Sharded, shape: Shape, idx: tuple[int, ...], mesh: Mesh):
    pairs: list[tuple[Box, Shape]] = [(Box.full(shape), tuple(0 for _ in shape))]
    cur = shape
    for shard, i in zip(placement.shards, idx):
        k = mesh.size(shard.mesh_dim)
        parts = shard.parts(cur[shard.dim], k, i)
        inner = []
        local_pos = 0
        for gstart, backed, width in parts:
            if backed:
                offs = tuple(gstart if d == shard.dim else 0 for d in range(len(cur)))
                lens = tuple(backed if d == shard.dim else n for d, n in enumerate(cur))
                pos = tuple(local_pos if d == shard.dim else 0 for d in range(len(cur)))
                inner.append((Box(offs, lens), pos))
            local_pos += width
        cur = tuple(local_pos if d == shard.dim else n for d, n in enumerate(cur))
        pairs = _compose_box_maps(pairs, inner)
    return cur, pairs


@dataclass(frozen=True)
class ZeroGroup:
    """A ZeRO-1/2 parameter group: members flattened in this order into one buffer.

    The buffer holds each member's (box-local) elements followed by ``paddings[i]``
    alignment elements, and is padded at the end to a multiple of ``alignment``
    elements (DeepSpeed: ``2 * dp``), then cut into equal partitions over the ZeRO
    mesh dimension of its members' :class:`ZeroFlat` placements.
    """

    members: tuple[str, ...]
    alignment: int = 1
    paddings: tuple[int, ...] | None = None

    def to_json(self) -> dict:
        out: dict = {"members": list(self.members), "alignment": self.alignment}
        if self.paddings is not None and any(self.paddings):
            out["paddings"] = list(self.paddings)
        return out

    @staticmethod
    def from_json(obj: Mapping) -> ZeroGroup:
        pads = obj.get("paddings")
        return ZeroGroup(
            tuple(obj["members"]),
            int(obj.get("alignment", 1)),
            tuple(int(p) for p in pads) if pads is not None else None,
        )


class _FlatPlacement(Placement):
    """Shared machinery of ZeRO placements: a flat range of a box-local tensor per DP rank."""

    base: BoxPlacement
    mesh_dim: str

    def dims(self):
        return (*self.base.dims(), self.mesh_dim)

    def validate(self, spec, layout):
        super().validate(spec, layout)
        if self.mesh_dim in self.base.dims():
            raise LayoutError(f"tensor {spec.name!r}: ZeRO dim {self.mesh_dim!r} is also used by its base placement")
        self.base.validate(spec, layout)

    def flat_range(self, spec, coords, layout) -> tuple[int, int] | None:
        raise NotImplementedError

    def local(self, spec, coords, layout):
        base_shape, pairs = self.base.box_map(spec, coords, layout)
        rng = self.flat_range(spec, coords, layout)
        if rng is None or rng[1] <= rng[0]:
            return None
        start, stop = rng
        return LocalShard((stop - start,), _flat_pieces(pairs, base_shape, start, stop))

    def _dp_ranks_for(self, spec, coords, layout, flat_lo: int, flat_hi: int) -> Iterable[int]:
        raise NotImplementedError

    def candidates(self, spec, box, layout, fixed):
        for bc in self.base.candidates(spec, box, layout, fixed):
            bc = {**fixed, **bc}
            base_shape, pairs = self.base.box_map(spec, bc, layout)
            strides = row_major_strides(base_shape)
            lo = hi = None
            for g, o in pairs:
                c = box.intersect(g)
                if c is None:
                    continue
                first = sum((ci - gi + oi) * s for ci, gi, oi, s in zip(c.offsets, g.offsets, o, strides))
                last = sum((ci + n - 1 - gi + oi) * s for ci, n, gi, oi, s in zip(c.offsets, c.lengths, g.offsets, o, strides))
                lo = first if lo is None else min(lo, first)
                hi = last + 1 if hi is None else max(hi, last + 1)
            if lo is None:
                continue
            for d in self._dp_ranks_for(spec, bc, layout, lo, hi):
                yield {k: v for k, v in bc.items() if k in self.dims() and k != self.mesh_dim} | {self.mesh_dim: d}


@dataclass(frozen=True)
class ZeroParam(_FlatPlacement):
    """ZeRO-3: the (box-local) tensor is flattened; DP rank ``d`` holds ``[d*c, (d+1)*c)``, ``c = ceil(n/dp)``."""

    base: BoxPlacement = field(default_factory=Replicated)
    mesh_dim: str = "dp"
    kind = "zero_param"

    def _chunk(self, spec, coords, layout) -> tuple[int, int]:
        base_shape, _ = self.base.box_map(spec, coords, layout)
        n = math.prod(base_shape)
        dp = layout.mesh.size(self.mesh_dim)
        return n, -(-n // dp)

    def flat_range(self, spec, coords, layout):
        n, c = self._chunk(spec, coords, layout)
        d = coords[self.mesh_dim]
        return min(d * c, n), min((d + 1) * c, n)

    def _dp_ranks_for(self, spec, coords, layout, lo, hi):
        _n, c = self._chunk(spec, coords, layout)
        if c == 0:
            return range(0)
        return range(lo // c, min(layout.mesh.size(self.mesh_dim), -(-hi // c)))

    def to_json(self):
        return {"kind": self.kind, "mesh_dim": self.mesh_dim, "base": self.base.to_json()}

    @classmethod
    def _from_json(cls, obj):
        return cls(Placement.from_json(obj.get("base", {"kind": "replicated"})), str(obj.get("mesh_dim", "dp")))


@dataclass(frozen=True)
class ZeroFlat(_FlatPlacement):
    """ZeRO-1/2: member ``member`` of :class:`ZeroGroup` ``group`` (see there).

    Optimizer slots of a param use the param's ``member`` name, so they follow the
    param's partitioning exactly.
    """

    group: str = ""
    member: str = ""
    base: BoxPlacement = field(default_factory=Replicated)
    mesh_dim: str = "dp"
    kind = "zero_flat"

    def _geometry(self, spec, coords, layout) -> tuple[int, int, int]:
        """(member offset in the group buffer, member numel, partition size)."""
        base_key = tuple((d, coords.get(d, 0)) for d in layout.group_dims(self.group))
        offsets, partition = layout._group_offsets(self.group, base_key, self.mesh_dim)
        try:
            off, n = offsets[self.member]
        except KeyError:
            raise LayoutError(f"tensor {spec.name!r}: {self.member!r} is not a member of group {self.group!r}") from None
        return off, n, partition

    def flat_range(self, spec, coords, layout):
        off, n, part = self._geometry(spec, coords, layout)
        d = coords[self.mesh_dim]
        lo = max(off, d * part)
        hi = min(off + n, (d + 1) * part)
        if hi <= lo:
            return None
        return lo - off, hi - off

    def _dp_ranks_for(self, spec, coords, layout, lo, hi):
        off, _, part = self._geometry(spec, coords, layout)
        if part == 0:
            return range(0)
        return range((off + lo) // part, min(layout.mesh.size(self.mesh_dim), -(-(off + hi) // part)))

    def validate(self, spec, layout):
        super().validate(spec, layout)
        if self.member not in layout.group(self.group).members:
            raise LayoutError(f"tensor {spec.name!r}: {self.member!r} is not a member of group {self.group!r}")

    def to_json(self):
        out = {"kind": self.kind, "group": self.group, "member": self.member, "base": self.base.to_json()}
        if self.mesh_dim != "dp":
            out["mesh_dim"] = self.mesh_dim
        return out

    @classmethod
    def _from_json(cls, obj):
        return cls(
            str(obj["group"]),
            str(obj["member"]),
            Placement.from_json(obj.get("base", {"kind": "replicated"})),
            str(obj.get("mesh_dim", "dp")),
        )


@dataclass(frozen=True)
class Fragment:
    """An explicit fragment: a global box, optionally narrowed to a flat range of it."""

    box: Box
    flat: tuple[int, int] | None = None  # (start, length) within the box's row-major order

    def to_json(self) -> dict:
        out: dict = {"box": self.box.to_json()}
        if self.flat is not None:
            out["flat"] = list(self.flat)
        return out

    @staticmethod
    def from_json(obj: Mapping) -> Fragment:
        flat = obj.get("flat")
        return Fragment(Box.from_json(obj["box"]), (int(flat[0]), int(flat[1])) if flat is not None else None)


@dataclass(frozen=True)
class Explicit(Placement):
    """Irregular pieces, enumerated: ``fragments[rank]`` is what that (global) rank holds."""

    fragments: tuple[tuple[int, Fragment], ...]
    kind = "explicit"

    def dims(self):
        return ("__rank__",)

    def validate(self, spec, layout):
        seen = set()
        for rank, frag in self.fragments:
            if rank in seen:
                raise LayoutError(f"tensor {spec.name!r}: rank {rank} has two explicit fragments")
            seen.add(rank)
            if not 0 <= rank < layout.mesh.world_size:
                raise LayoutError(f"tensor {spec.name!r}: explicit fragment on rank {rank} outside the mesh")
            if not Box.full(spec.shape).contains(frag.box):
                raise LayoutError(f"tensor {spec.name!r}: fragment box {frag.box.to_json()} outside shape {list(spec.shape)}")
            if frag.flat is not None and (frag.flat[0] < 0 or frag.flat[1] < 0 or sum(frag.flat) > frag.box.numel):
                raise LayoutError(f"tensor {spec.name!r}: flat range {list(frag.flat)} outside its box")

    def local_for_rank(self, rank: int) -> LocalShard | None:
        frag = _explicit_by_rank(self).get(rank)
        if frag is None:
            return None
        pairs = [(frag.box, tuple(0 for _ in frag.box.lengths))]
        if frag.flat is None:
            if frag.box.is_empty() and frag.box.ndim:
                return None
            return LocalShard(frag.box.lengths, _translate_box_pieces(pairs, frag.box.lengths))
        start, n = frag.flat
        if n == 0:
            return None
        return LocalShard((n,), _flat_pieces(pairs, frag.box.lengths, start, start + n))

    def local(self, spec, coords, layout):
        return self.local_for_rank(layout.mesh.rank(coords))

    def candidate_ranks(self, spec: TensorSpec, box: Box) -> list[int]:
        starts, ends, ranks, prefix_max_end = _explicit_index(self, spec.shape)
        strides = row_major_strides(spec.shape)
        lo = sum(o * s for o, s in zip(box.offsets, strides))
        hi = sum((o + n - 1) * s for o, n, s in zip(box.offsets, box.lengths, strides)) + 1
        stop = bisect.bisect_left(starts, hi)
        first = bisect.bisect_right(prefix_max_end, lo)
        return [ranks[i] for i in range(first, stop) if ends[i] > lo]

    def candidates(self, spec, box, layout, fixed):
        raise LayoutError("explicit placements are resolved by rank, not coordinates")

    def to_json(self):
        return {"kind": self.kind, "fragments": [{"rank": r, **f.to_json()} for r, f in self.fragments]}

    @classmethod
    def _from_json(cls, obj):
        return cls(tuple((int(f["rank"]), Fragment.from_json(f)) for f in obj["fragments"]))


@lru_cache(maxsize=4096)
def _explicit_index(p: Explicit, shape: Shape):
    """Fragments sorted by their first element in global flat order, with the running
    maximum of their ends, so the fragments touching a range are found by bisection."""
    strides = row_major_strides(shape)
    items = []
    for rank, frag in p.fragments:
        if frag.box.is_empty():
            continue
        first = sum(o * s for o, s in zip(frag.box.offsets, strides))
        last = sum((o + n - 1) * s for o, n, s in zip(frag.box.offsets, frag.box.lengths, strides))
        items.append((first, last + 1, rank))
    items.sort()
    prefix, running = [], -1
    for _, end, _ in items:
        running = max(running, end)
        prefix.append(running)
    return [i[0] for i in items], [i[1] for i in items], [i[2] for i in items], prefix


@lru_cache(maxsize=4096)
def _explicit_by_rank(p: Explicit) -> dict[int, Fragment]:
    return dict(p.fragments)


_PLACEMENTS: dict[str, type] = {
    "replicated": Replicated,
    "sharded": Sharded,
    "zero_param": ZeroParam,
    "zero_flat": ZeroFlat,
    "explicit": Explicit,
}


# --------------------------------------------------------------------------- tensors and layouts


ROLES = ("param", "buffer", "optimizer_slot", "other")


@dataclass(frozen=True)
class TensorSpec:
    """A logical tensor: global shape, dtype, placement and what it is."""

    name: str
    shape: Shape
    dtype: torch.dtype
    placement: Placement = field(default_factory=Replicated)
    stage: int | None = None
    role: str = "other"
    param: str | None = None  # for optimizer slots: the param they belong to
    slot: str | None = None  # for optimizer slots: exp_avg, momentum_buffer, ...
    aliases: tuple[str, ...] = ()
    # (dim, width): local shards are stored as panels of ``width`` along ``dim`` (see
    # LocalShard.paneled); None: row-major. Set by the writer for tensors sharded along
    # a dim other than 0, so that a later reshard along it reads contiguous bytes.
    panels: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if self.panels is not None:
            object.__setattr__(self, "panels", check_panels(self.panels, self.shape, f"tensor {self.name!r}"))

    def __hash__(self) -> int:
        # Immutable, hashed for every tensor at every snapshot (plan cache key): compute once.
        cached = self.__dict__.get("_hash")
        if cached is None:
            cached = hash((self.name, self.shape, self.dtype, self.placement, self.stage, self.role,
                           self.param, self.slot, self.aliases, self.panels))
            object.__setattr__(self, "_hash", cached)
        return cached

    def to_json(self) -> dict:
        out: dict = {"shape": list(self.shape), "dtype": dtype_name(self.dtype), "role": self.role}
        if self.param is not None:
            out["param"] = self.param
        if self.slot is not None:
            out["slot"] = self.slot
        if self.aliases:
            out["aliases"] = list(self.aliases)
        if self.stage is not None:
            out["stage"] = self.stage
        out["placement"] = self.placement.to_json()
        if self.panels is not None:
            out["panels"] = {"dim": self.panels[0], "width": self.panels[1]}
        return out

    @staticmethod
    def from_json(name: str, obj: Mapping) -> TensorSpec:
        role = obj.get("role", "other")
        if role not in ROLES:
            raise LayoutError(f"tensor {name!r}: unknown role {role!r}")
        return TensorSpec(
            name=name,
            shape=tuple(int(x) for x in obj["shape"]),
            dtype=dtype_from_name(obj["dtype"]),
            placement=Placement.from_json(obj.get("placement", {"kind": "replicated"})),
            stage=int(obj["stage"]) if obj.get("stage") is not None else None,
            role=role,
            param=obj.get("param"),
            slot=obj.get("slot"),
            aliases=tuple(obj.get("aliases", ())),
            panels=(int(obj["panels"]["dim"]), int(obj["panels"]["width"])) if obj.get("panels") is not None else None,
        )


class Layout:
    """The mapping of every logical tensor onto the ranks of a mesh. See the module docstring."""

    def __init__(
        self,
        mesh: Mesh,
        tensors: Iterable[TensorSpec],
        groups: Mapping[str, ZeroGroup] | None = None,
        *,
        validate: bool = True,
    ) -> None:
        self.mesh = mesh
        self.tensors: dict[str, TensorSpec] = {}
        for t in tensors:
            if t.name in self.tensors:
                raise LayoutError(f"tensor {t.name!r} appears twice in the layout")
            self.tensors[t.name] = t
        self.groups: dict[str, ZeroGroup] = dict(groups or {})
        self._index = {name: i for i, name in enumerate(self.tensors)}
        self._group_tensors: dict[str, list[TensorSpec]] = {}
        for t in self.tensors.values():
            if isinstance(t.placement, ZeroFlat):
                self._group_tensors.setdefault(t.placement.group, []).append(t)
        self._group_dims = {
            gid: tuple(d for d in mesh.dims if any(d in t.placement.base.dims() for t in ts))
            for gid, ts in self._group_tensors.items()
        }
        self._offsets_cache: dict = {}
        self._local_cache: dict = {}
        if validate:
            self.validate()

    # construction -----------------------------------------------------------
    @staticmethod
    def single(tensors: Mapping[str, torch.Tensor | TensorSpec]) -> Layout:
        """Everything whole on one rank: the layout of an unsharded ``save``."""
        return Layout.replicated(tensors, Mesh.single())

    @staticmethod
    def replicated(tensors: Mapping[str, torch.Tensor | TensorSpec], mesh: Mesh) -> Layout:
        return Layout(mesh, [replace(_spec_of(n, t), placement=Replicated(), stage=None) for n, t in tensors.items()])

    @staticmethod
    def zero(
        tensors: Mapping[str, torch.Tensor | TensorSpec],
        dp: int,
        stage: int,
        *,
        param_groups: Sequence[Sequence[str]] | None = None,
        alignment: int | None = None,
        slots_of: Mapping[str, str] | None = None,
        replicated: Iterable[str] = (),
    ) -> Layout:
        """A pure-DP ZeRO layout.

        ``stage`` 0 replicates everything; 1/2 flatten each of ``param_groups`` (default:
        one group of all tensors) DeepSpeed-style with ``alignment`` (default ``2 * dp``);
        3 partitions each tensor on its own. ``slots_of`` maps optimizer-slot tensor names
        to the param they shadow (they follow its partitioning); names in ``replicated``
        stay whole on every rank (buffers, step counters).
        """
        mesh = Mesh(("dp",), (dp,))
        slots_of = dict(slots_of or {})
        keep = set(replicated)
        specs = {n: _spec_of(n, t) for n, t in tensors.items()}
        groups: dict[str, ZeroGroup] = {}
        out = []
        if stage in (1, 2):
            members = param_groups if param_groups is not None else [
                [n for n in specs if n not in keep and n not in slots_of]
            ]
            member_group = {}
            for gi, names in enumerate(members):
                gid = f"g{gi}"
                groups[gid] = ZeroGroup(tuple(names), alignment if alignment is not None else 2 * dp)
                for n in names:
                    member_group[n] = gid
        for n, s in specs.items():
            if stage == 0 or n in keep:
                out.append(replace(s, placement=Replicated()))
            elif stage == 3:
                out.append(replace(s, placement=ZeroParam()))
            elif stage in (1, 2):
                member = slots_of.get(n, n)
                if member not in member_group:
                    out.append(replace(s, placement=Replicated()))
                else:
                    out.append(replace(s, placement=ZeroFlat(member_group[member], member)))
            else:
                raise LayoutError(f"ZeRO stage must be 0-3, got {stage}")
        return Layout(mesh, out, groups)

    def with_tensors(self, tensors: Iterable[TensorSpec]) -> Layout:
        return Layout(self.mesh, tensors, self.groups)

    # validation -------------------------------------------------------------
    def validate(self) -> None:
        for spec in self.tensors.values():
            if spec.stage is not None:
                if not self.mesh.has("pp"):
                    raise LayoutError(f"tensor {spec.name!r} has stage {spec.stage} but the mesh has no 'pp' dim")
                if not 0 <= spec.stage < self.mesh.size("pp"):
                    raise LayoutError(f"tensor {spec.name!r}: stage {spec.stage} outside pp={self.mesh.size('pp')}")
                if "pp" in spec.placement.dims():
                    raise LayoutError(f"tensor {spec.name!r}: staged tensors cannot also be split over 'pp'")
            spec.placement.validate(spec, self)
            if spec.panels is not None and not isinstance(spec.placement, BoxPlacement):
                raise LayoutError(f"tensor {spec.name!r}: panels need a replicated or sharded placement")
        group_dims: dict[str, str] = {}
        for spec in self.tensors.values():
            p = spec.placement
            if isinstance(p, ZeroFlat) and group_dims.setdefault(p.group, p.mesh_dim) != p.mesh_dim:
                raise LayoutError(f"group {p.group!r} is partitioned over two mesh dims")
        for gid, g in self.groups.items():
            if len(set(g.members)) != len(g.members):
                raise LayoutError(f"group {gid!r} lists a member twice")
            named = {t.placement.member for t in self._group_tensors.get(gid, ())}
            absent = [m for m in g.members if m not in named]
            if absent:
                raise LayoutError(f"group {gid!r}: members {absent[:5]} have no tensor in the layout")
            dims = self.group_dims(gid)
            if any(t.placement.mesh_dim in dims for t in self._group_tensors.get(gid, ())):
                raise LayoutError(f"group {gid!r}: its ZeRO dim is also a base dim of a member")
            if g.alignment < 1:
                raise LayoutError(f"group {gid!r}: alignment must be >= 1")
            if g.paddings is not None and len(g.paddings) != len(g.members):
                raise LayoutError(f"group {gid!r}: {len(g.paddings)} paddings for {len(g.members)} members")

    def group(self, gid: str) -> ZeroGroup:
        try:
            return self.groups[gid]
        except KeyError:
            raise LayoutError(f"layout has no ZeRO group {gid!r}") from None

    def group_dims(self, gid: str) -> tuple[str, ...]:
        """Mesh dims a ZeRO group's flat buffer depends on (its members' base placements)."""
        return self._group_dims.get(gid, ())

    def _group_offsets(self, gid: str, base_key: tuple, mesh_dim: str) -> tuple[dict[str, tuple[int, int]], int]:
        key = (gid, base_key, mesh_dim)
        hit = self._offsets_cache.get(key)
        if hit is not None:
            return hit
        group = self.group(gid)
        coords = dict(base_key)
        # A member's numel is that of its box-local tensor at these coordinates, taken
        # from the first tensor naming it (the param, or a slot of the same shape).
        numels: dict[str, int] = {}
        for spec in self._group_tensors.get(gid, ()):
            p = spec.placement
            if p.member not in numels:
                shape, _ = p.base.box_map(spec, coords, self)
                numels[p.member] = math.prod(shape)
        offsets = {}
        pos = 0
        for i, m in enumerate(group.members):
            n = numels.get(m, 0)
            offsets[m] = (pos, n)
            pos += n + (group.paddings[i] if group.paddings else 0)
        align = group.alignment
        padded = -(-pos // align) * align
        dp = self.mesh.size(mesh_dim)
        partition = -(-padded // dp)
        self._offsets_cache[key] = (offsets, partition)
        return offsets, partition

    # queries ------------------------------------------------------------------
    @property
    def world_size(self) -> int:
        return self.mesh.world_size

    def spec(self, name: str) -> TensorSpec:
        try:
            return self.tensors[name]
        except KeyError:
            raise LayoutError(f"layout has no tensor {name!r}") from None

    def _held_by_stage(self, spec: TensorSpec, coords: Mapping[str, int]) -> bool:
        return spec.stage is None or coords.get("pp", 0) == spec.stage

    def local(self, name: str, rank: int) -> LocalShard | None:
        """What ``rank`` holds of tensor ``name`` (None if nothing)."""
        key = (name, rank)
        if key in self._local_cache:
            return self._local_cache[key]
        spec = self.spec(name)
        coords = self.mesh.coords(rank)
        if not self._held_by_stage(spec, coords):
            out = None
        elif isinstance(spec.placement, Explicit):
            out = spec.placement.local_for_rank(rank)
        else:
            out = spec.placement.local(spec, coords, self)
        if len(self._local_cache) > 200_000:
            self._local_cache.clear()
        self._local_cache[key] = out
        return out

    def stored(self, name: str, rank: int) -> LocalShard | None:
        """What ``rank`` stores of ``name`` as laid out in its data-file entry: :meth:`local`,
        arranged in the tensor's panels if it has them."""
        shard = self.local(name, rank)
        panels = self.spec(name).panels
        if shard is None or panels is None:
            return shard
        key = (name, rank, "stored")
        hit = self._local_cache.get(key)
        if hit is None:
            hit = self._local_cache[key] = shard.paneled(*panels)
        return hit

    def with_storage_panels(self) -> Layout:
        """This layout with panels chosen for every tensor that needs them.

        A tensor sharded along dim ``d > 0`` (a row-parallel weight split along its
        columns) stores each local shard as panels along ``d``
        (:func:`storage_panels_for`), so that the part of a shard that any other split
        along ``d`` needs is one contiguous byte range, give or take a panel at each end:
        reading it is not rounded out to checksum blocks row by row. Other tensors keep
        their arrangement.
        """
        return self.with_tensors(replace(s, panels=storage_panels_for(s)) for s in self.tensors.values())

    def replica_dims(self, spec: TensorSpec) -> tuple[str, ...]:
        if isinstance(spec.placement, Explicit):
            return ()
        used = set(spec.placement.dims())
        if spec.stage is not None:
            used.add("pp")
        return tuple(d for d in self.mesh.dims if d not in used)

    def _writer_coords(self, spec: TensorSpec) -> dict[str, int]:
        dims = self.replica_dims(spec)
        if not dims:
            return {}
        n = self._index[spec.name]
        out = {}
        for d in reversed(dims):
            n, out[d] = divmod(n, self.mesh.size(d))
        return out

    def is_writer(self, name: str, rank: int) -> bool:
        """Whether ``rank`` is the replica that stores its share of ``name``."""
        spec = self.spec(name)
        coords = self.mesh.coords(rank)
        if not self._held_by_stage(spec, coords):
            return False
        return all(coords[d] == c for d, c in self._writer_coords(spec).items())

    def writes(self, rank: int) -> Iterator[tuple[str, LocalShard]]:
        """Tensors (and their local shards) that ``rank`` stores, in layout order."""
        for name in self.tensors:
            if self.is_writer(name, rank):
                shard = self.local(name, rank)
                if shard is not None and shard.numel:
                    yield name, shard

    def sources(self, name: str, box: Box) -> Iterator[tuple[int, Piece]]:
        """Stored pieces (writer replicas only) intersecting global ``box`` of ``name``: (rank, piece)."""
        spec = self.spec(name)
        p = spec.placement
        if isinstance(p, Explicit):
            ranks: Iterable[int] = p.candidate_ranks(spec, box)
        else:
            base = self._writer_coords(spec)
            if spec.stage is not None:
                base["pp"] = spec.stage
            ranks = (self.mesh.rank({**base, **c}) for c in p.candidates(spec, box, self, base))
        seen = set()
        for rank in ranks:
            if rank in seen:
                continue
            seen.add(rank)
            shard = self.stored(name, rank)
            if shard is None:
                continue
            for piece in shard.pieces:
                region = piece.box.intersect(box)
                if region is not None:
                    yield rank, piece

    # data movement ------------------------------------------------------------
    def split(self, name: str, tensor: torch.Tensor, rank: int) -> torch.Tensor | None:
        """The local tensor ``rank`` holds of the global ``tensor`` (padding zeroed)."""
        shard = self.local(name, rank)
        if shard is None:
            return None
        spec = self.spec(name)
        if tuple(tensor.shape) != spec.shape:
            raise LayoutError(f"tensor {name!r} has shape {list(tensor.shape)}, layout says {list(spec.shape)}")
        out = torch.zeros(shard.shape, dtype=tensor.dtype)
        flat = out.reshape(-1)
        for piece in shard.pieces:
            src = tensor[tuple(slice(o, o + n) for o, n in zip(piece.box.offsets, piece.box.lengths))]
            flat.as_strided(piece.box.lengths, piece.strides, piece.offset).copy_(src)
        return out

    def assemble(self, name: str, locals_by_rank: Mapping[int, torch.Tensor]) -> torch.Tensor:
        """Rebuild the global tensor from local shards (inverse of :meth:`split`)."""
        spec = self.spec(name)
        out = torch.empty(spec.shape, dtype=spec.dtype)
        covered = torch.zeros(spec.shape, dtype=torch.bool)
        for rank, local in locals_by_rank.items():
            shard = self.local(name, rank)
            if shard is None:
                continue
            flat = local.reshape(-1)
            for piece in shard.pieces:
                idx = tuple(slice(o, o + n) for o, n in zip(piece.box.offsets, piece.box.lengths))
                out[idx] = flat.as_strided(piece.box.lengths, piece.strides, piece.offset)
                covered[idx] = True
        if not bool(covered.all()):
            raise LayoutError(f"tensor {name!r}: the given shards do not cover it")
        return out

    # serialisation ----------------------------------------------------------------
    def to_json(self) -> dict:
        return {
            "mesh": self.mesh.to_json(),
            "groups": {g: v.to_json() for g, v in self.groups.items()},
            "tensors": {n: t.to_json() for n, t in self.tensors.items()},
        }

    def json_parts(self) -> tuple[str, str, str]:
        """:meth:`to_json`'s mesh, groups and tensors as compact JSON text, encoded once: a
        layout does not change after construction, and a keeper writes a manifest of the
        same layout every step (45,000 tensor specs took ~70 ms to encode each time)."""
        parts = self.__dict__.get("_json_parts")
        if parts is None:
            obj = self.to_json()
            parts = self._json_parts = tuple(
                json.dumps(obj[k], separators=(",", ":"), ensure_ascii=True) for k in ("mesh", "groups", "tensors"))
        return parts

    def has_panels(self) -> bool:
        """Whether any tensor is stored as panels (a version-2 feature); computed once."""
        found = self.__dict__.get("_has_panels")
        if found is None:
            found = self._has_panels = any(t.panels is not None for t in self.tensors.values())
        return found

    @staticmethod
    def from_json(obj: Mapping) -> Layout:
        try:
            mesh = Mesh.from_json(obj["mesh"])
            groups = {g: ZeroGroup.from_json(v) for g, v in obj.get("groups", {}).items()}
            tensors = [TensorSpec.from_json(n, t) for n, t in obj["tensors"].items()]
        except (KeyError, TypeError, ValueError) as e:
            raise LayoutError(f"malformed layout: {e!r}") from None
        return Layout(mesh, tensors, groups)

    def topology(self) -> dict:
        return {"world_size": self.world_size, **{d: s for d, s in zip(self.mesh.dims, self.mesh.sizes)}}


PANEL_BYTES = 32  # narrowest panel row (copies of 32-byte runs: ~1/3 of memcpy speed, 128-byte: full)
MAX_PANELS = 256  # per tensor (across all its shards): bounds the copies a read is cut into


def storage_panels_for(spec: TensorSpec) -> tuple[int, int] | None:
    """The panels :meth:`Layout.with_storage_panels` picks for ``spec``.

    Sharded along dims that do not include 0: panels along the smallest of them, ``d``,
    ``max(PANEL_BYTES / itemsize, shape[d] / MAX_PANELS)`` wide - unless every dim
    before ``d`` has length 1, where row-major already keeps ``d`` contiguous. Anything
    else, including a spec that already has panels, keeps its own.
    """
    p = spec.placement
    if spec.panels is not None or not isinstance(p, Sharded) or not p.shards:
        return spec.panels
    d = min(s.dim for s in p.shards)
    if d == 0 or math.prod(spec.shape[:d]) <= 1:
        return None
    return d, max(-(-PANEL_BYTES // _itemsize(spec.dtype)), -(-spec.shape[d] // MAX_PANELS))


def _spec_of(name: str, t: torch.Tensor | TensorSpec) -> TensorSpec:
    if isinstance(t, TensorSpec):
        return replace(t, name=name)
    return TensorSpec(name, tuple(t.shape), t.dtype)


# --------------------------------------------------------------------------- derivation from a live model


@dataclass
class TPRule:
    """How tensors whose names match ``pattern`` are split over the ``tp`` mesh dim.

    ``style``: ``"column"`` (dim 0), ``"row"`` (dim 1; a bias of a row-parallel layer
    stays replicated), ``"replicated"``, or ``"vocab"`` (dim 0 padded to a multiple of
    ``pad_multiple * tp``). ``sub_sizes`` lists fused sub-parameter sizes along the
    split dim (QKV: ``[q_heads*hd, kv_heads*hd, kv_heads*hd]``; SwiGLU: ``[f, f]``).
    """

    pattern: str
    style: str = "column"
    sub_sizes: Sequence[int] | None = None
    pad_multiple: int = 1


@dataclass
class ParallelConfig:
    """The parallel setup a layout is derived from."""

    dp: int = 1
    tp: int = 1
    pp: int = 1
    zero_stage: int = 0
    tp_rules: Sequence[TPRule] = ()
    stage_of: Mapping[str, int] | None = None  # tensor name -> pipeline stage (pp > 1)
    alignment: int | None = None  # ZeRO-1/2 flat-buffer alignment; default 2 * dp

    def mesh(self) -> Mesh:
        return Mesh(("pp", "dp", "tp"), (self.pp, self.dp, self.tp))


def _tp_placement(rule: TPRule | None, shape: Shape, tp: int) -> BoxPlacement:
    if rule is None or rule.style == "replicated" or tp == 1 or not shape:
        return Replicated()
    if rule.style == "column":
        dim = 0
    elif rule.style == "row":
        if len(shape) < 2:
            return Replicated()
        dim = 1
    elif rule.style == "vocab":
        mult = rule.pad_multiple * tp
        padded = -(-shape[0] // mult) * mult
        return Sharded((Shard(0, "tp", None, "padded", (padded,)),))
    else:
        raise LayoutError(f"unknown TP style {rule.style!r}")
    sizes = tuple(rule.sub_sizes) if rule.sub_sizes is not None and dim == 0 else None
    if len(shape) == 1 and rule.style == "column" and rule.sub_sizes is not None:
        sizes = tuple(rule.sub_sizes)
    return Sharded((Shard(dim, "tp", sizes, "chunk"),))


def layout_from_model(
    model: torch.nn.Module,
    config: ParallelConfig,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    prefix: str = "",
) -> Layout:
    """Derive the layout of ``model`` (global shapes) under ``config``.

    Params and persistent buffers become tensors ``prefix + name``. With an optimizer,
    ZeRO-1/2 groups follow its param groups (in order), and its per-param state
    slots are added as ``{prefix}optim.{name}.{slot}`` following their param's
    placement. ``tp_rules`` are matched with :func:`re.search` in order.
    """
    mesh = config.mesh()
    named_params = dict(model.named_parameters())
    specs: list[TensorSpec] = []
    placements: dict[str, BoxPlacement] = {}
    for name, t in list(named_params.items()) + [(n, b) for n, b in model.named_buffers() if b is not None]:
        rule = next((r for r in config.tp_rules if re.search(r.pattern, name)), None)
        base = _tp_placement(rule, tuple(t.shape), config.tp)
        placements[name] = base
        role = "param" if name in named_params else "buffer"
        stage = (config.stage_of or {}).get(name) if config.pp > 1 else None
        specs.append(TensorSpec(prefix + name, tuple(t.shape), t.dtype, base, stage, role))
    groups: dict[str, ZeroGroup] = {}
    member_group: dict[str, str] = {}
    if config.zero_stage in (1, 2):
        ordered: list[list[str]]
        if optimizer is not None:
            ids = {id(p): n for n, p in named_params.items()}
            ordered = [[ids[id(p)] for p in g["params"] if id(p) in ids] for g in optimizer.param_groups]
        else:
            ordered = [[n for n, p in named_params.items() if p.requires_grad]]
        align = config.alignment if config.alignment is not None else 2 * config.dp
        for gi, names in enumerate(ordered):
            gid = f"g{gi}"
            groups[gid] = ZeroGroup(tuple(prefix + n for n in names), align)
            for n in names:
                member_group[n] = gid

    def zero_of(pname: str, base: BoxPlacement) -> Placement:
        if config.zero_stage == 3:
            return ZeroParam(base)
        if config.zero_stage in (1, 2) and pname in member_group:
            return ZeroFlat(member_group[pname], prefix + pname, base, "dp")
        return base

    out = []
    for s in specs:
        raw = s.name[len(prefix) :]
        if s.role == "param" and named_params[raw].requires_grad:
            out.append(replace(s, placement=zero_of(raw, placements[raw])))
        else:
            out.append(s)
    if optimizer is not None:
        ids = {id(p): n for n, p in named_params.items()}
        for p, state in optimizer.state.items():
            pname = ids.get(id(p))
            if pname is None:
                continue
            for slot, value in state.items():
                if not isinstance(value, torch.Tensor):
                    continue
                stage = (config.stage_of or {}).get(pname) if config.pp > 1 else None
                if tuple(value.shape) == tuple(p.shape):
                    placement = zero_of(pname, placements[pname])
                else:
                    placement = Replicated()
                out.append(
                    TensorSpec(
                        f"{prefix}optim.{pname}.{slot}", tuple(value.shape), value.dtype, placement, stage,
                        "optimizer_slot", prefix + pname, slot,
                    )
                )
    return Layout(mesh, out, groups)
