"""Hypothesis strategies: random tensors of every dtype and random layouts over them."""

from __future__ import annotations

import itertools
import math

import torch
from hypothesis import strategies as st

from stalwart.formats.geometry import Box
from stalwart.formats.layout import (
    Explicit,
    Fragment,
    Layout,
    Mesh,
    Replicated,
    Shard,
    Sharded,
    TensorSpec,
    ZeroFlat,
    ZeroGroup,
    ZeroParam,
)

DTYPES = [
    torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.int32, torch.int16,
    torch.int8, torch.uint8, torch.bool, torch.float8_e4m3fn, torch.float8_e5m2, torch.complex64, torch.uint16,
]


def random_tensor(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Random *bits* (NaNs, -0.0, subnormals included) so comparisons are bitwise."""
    g = torch.Generator().manual_seed(seed)
    n = math.prod(shape)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    item = torch.empty((), dtype=dtype).element_size()
    raw = torch.randint(0, 256, (n * item,), dtype=torch.uint8, generator=g)
    return raw.view(dtype).reshape(shape)


def bits(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and tuple(a.shape) == tuple(b.shape) and bits(a) == bits(b)


@st.composite
def tensor_specs(draw, max_tensors: int = 5) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    n = draw(st.integers(1, max_tensors))
    out = []
    for i in range(n):
        ndim = draw(st.integers(0, 3))
        shape = tuple(draw(st.integers(0 if draw(st.booleans()) and ndim else 1, 7)) for _ in range(ndim))
        dtype = draw(st.sampled_from(DTYPES))
        out.append((f"t{i}.w", shape, dtype))
    return out


def _composition(draw, n: int, parts: int) -> tuple[int, ...]:
    cuts = sorted(draw(st.lists(st.integers(0, n), min_size=parts - 1, max_size=parts - 1)))
    bounds = [0, *cuts, n]
    return tuple(b - a for a, b in itertools.pairwise(bounds))


@st.composite
def shard_level(draw, shape: tuple[int, ...], mesh_dim: str, k: int, allow_sub: bool = True) -> Shard:
    dim = draw(st.integers(0, len(shape) - 1))
    n = shape[dim]
    sizes = None
    if allow_sub and n >= 2 and draw(st.booleans()):
        sizes = _composition(draw, n, draw(st.integers(2, 3)))
    subs = sizes or (n,)
    modes = ["chunk", "padded", "widths"]
    if all(s % k == 0 for s in subs):
        modes.append("even")
    mode = draw(st.sampled_from(modes))
    padded = widths = None
    if mode == "padded":
        padded = tuple(-(-s // k) * k + k * draw(st.integers(0, 1)) for s in subs)
    if mode == "widths":
        widths = tuple(_composition(draw, s, k) for s in subs)
    return Shard(dim, mesh_dim, sizes, mode, padded, widths)


@st.composite
def box_base(draw, shape: tuple[int, ...], mesh: Mesh):
    tp = mesh.size("tp")
    if shape and tp > 1 and draw(st.booleans()):
        return Sharded((draw(shard_level(shape, "tp", tp)),))
    return Replicated()


@st.composite
def explicit_placement(draw, shape: tuple[int, ...], world: int) -> Explicit:
    n = math.prod(shape)
    ranks = draw(st.permutations(list(range(world))))
    if n == 0:
        return Explicit(((ranks[0], Fragment(Box.full(shape))),))
    if draw(st.booleans()) or not shape:
        # flat fragments of the whole tensor
        parts = _composition(draw, n, draw(st.integers(1, min(world, 4))))
        frags, pos = [], 0
        for r, size in zip(ranks, parts):
            frags.append((r, Fragment(Box.full(shape), (pos, size))))
            pos += size
        return Explicit(tuple(frags))
    # boxes along dim 0, each optionally narrowed further to a flat range of itself
    parts = [p for p in _composition(draw, shape[0], draw(st.integers(1, min(world, 4))))]
    frags, pos = [], 0
    for r, size in zip(ranks, parts):
        box = Box((pos, *(0 for _ in shape[1:])), (size, *shape[1:]))
        frags.append((r, Fragment(box)))
        pos += size
    return Explicit(tuple(frags))


@st.composite
def layouts(draw, specs: list[tuple[str, tuple[int, ...], torch.dtype]]) -> Layout:
    pp = draw(st.integers(1, 2))
    dp = draw(st.integers(1, 4))
    tp = draw(st.integers(1, 3))
    mesh = Mesh(("pp", "dp", "tp"), (pp, dp, tp))
    tensors, members = [], {}
    for name, shape, dtype in specs:
        kind = draw(st.sampled_from(["replicated", "sharded", "zero_param", "zero_flat", "explicit"]))
        stage = draw(st.integers(0, pp - 1)) if pp > 1 and kind != "explicit" and draw(st.booleans()) else None
        if kind == "replicated":
            placement = Replicated()
        elif kind == "sharded":
            levels = []
            if shape and tp > 1:
                levels.append(draw(shard_level(shape, "tp", tp)))
            if shape and dp > 1 and draw(st.booleans()):
                # a nested level splits the *local* tensor: DTensor chunk semantics
                levels.append(Shard(draw(st.integers(0, len(shape) - 1)), "dp"))
            placement = Sharded(tuple(levels)) if levels else Replicated()
        elif kind == "zero_param":
            placement = ZeroParam(draw(box_base(shape, mesh)), "dp")
        elif kind == "zero_flat":
            gid = draw(st.sampled_from(["g0", "g1"]))
            members.setdefault(gid, []).append(name)
            placement = ZeroFlat(gid, name, draw(box_base(shape, mesh)), "dp")
        else:
            placement = draw(explicit_placement(shape, mesh.world_size))
        panels = None
        if isinstance(placement, (Replicated, Sharded)) and shape and draw(st.booleans()):
            # any panels a writer may store local shards in (save() picks its own too)
            panels = (draw(st.integers(0, len(shape) - 1)), draw(st.integers(1, 4)))
        tensors.append(TensorSpec(name, shape, dtype, placement, stage, panels=panels))
    groups = {}
    for gid, names in members.items():
        order = draw(st.permutations(names))
        paddings = tuple(draw(st.integers(0, 3)) for _ in order) if draw(st.booleans()) else None
        groups[gid] = ZeroGroup(tuple(order), draw(st.integers(1, 8)), paddings)
    return Layout(mesh, tensors, groups)
