"""The resharding planner: saved layout x target layout -> one rank's byte-range reads.

Each target rank plans its own reads from the manifest alone; there is no global
planning step. For each tensor the target rank holds, each of its pieces asks the
*source* layout which stored pieces intersect it; placement rules answer that
arithmetically (which DP partitions a flat range touches, which TP slices a row
range touches) and explicit fragments through a sorted index, so planning is
linear in what the rank needs, not in ranks x tensors (DCP scans all saved chunks
for every local chunk).

A copy is ``src view -> dst view``: both are strided boxes. Reads are byte ranges
of one entry of one source file; since every read is verified, it is widened to
checksum-block boundaries, and sparse views (a column slice of row-major data) are
split so that widening never reads much more than needed. Adjacent reads of the
same entry are merged when their blocks touch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from stalwart.errors import LayoutError
from stalwart.formats.dtypes import itemsize as _itemsize
from stalwart.formats.geometry import Box, Piece
from stalwart.formats.layout import Layout

MAX_READ_BYTES = 64 * 1024 * 1024  # a single read (and scratch buffer) stays below this unless one row is larger


@dataclass
class Copy:
    """Copy ``lengths`` elements: source entry view -> target local tensor view."""

    dst: str
    src_offset: int  # element offset in the source entry
    src_strides: tuple[int, ...]
    dst_offset: int
    dst_strides: tuple[int, ...]
    lengths: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for x in self.lengths:
            n *= x
        return n


@dataclass
class Read:
    """One verified byte range ``[start, stop)`` of entry ``entry`` in the file of ``rank``."""

    rank: int
    entry: str
    start: int
    stop: int
    entry_nbytes: int
    itemsize: int
    copies: list[Copy] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return self.stop - self.start


@dataclass
class Output:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    covered: bool  # every element is written by some copy (no padding to zero)


@dataclass
class ReadPlan:
    reads: list[Read]
    outputs: dict[str, Output]
    needed_bytes: int

    @property
    def planned_bytes(self) -> int:
        """Bytes the reads fetch once widened to checksum blocks."""
        return sum(r.nbytes for r in self.reads)


def _widen(start: int, stop: int, block: int, limit: int) -> tuple[int, int]:
    return (start // block) * block, min(-(-stop // block) * block, limit)


def _split_for_reading(view: Piece, item: int, block: int, entry_nbytes: int) -> list[Piece]:
    """Split a strided source view until reading each part (block-widened) wastes little."""
    out: list[Piece] = []
    stack = [view]
    while stack:
        v = stack.pop()
        a, b = v.span()
        need = v.box.numel * item
        lo, hi = _widen(a * item, b * item, block, entry_nbytes)
        d = next((i for i, n in enumerate(v.box.lengths) if n > 1), None)
        small_waste = hi - lo <= need + 2 * block or hi - lo <= 1.05 * need
        if (small_waste and hi - lo <= MAX_READ_BYTES) or d is None:
            out.append(v)
            continue
        n = v.box.lengths[d]
        stride = v.strides[d]
        one = Box(v.box.offsets, tuple(1 if i == d else x for i, x in enumerate(v.box.lengths)))
        a0, b0 = Piece(one, v.offset, v.strides).span()
        starts = (a0 + np.arange(n, dtype=np.int64) * stride) * item
        ends = starts + (b0 - a0) * item
        blo = starts // block
        bhi = -(-ends // block)
        # Group consecutive slices whose widened block ranges touch, capped in size.
        group_start = 0
        cur_hi = bhi[0]
        cur_lo = blo[0]
        for i in range(1, n + 1):
            if i < n and blo[i] <= cur_hi and (max(cur_hi, bhi[i]) - cur_lo) * block <= MAX_READ_BYTES:
                cur_hi = max(cur_hi, bhi[i])
                continue
            offs = tuple(o + group_start if j == d else o for j, o in enumerate(v.box.offsets))
            lens = tuple(i - group_start if j == d else x for j, x in enumerate(v.box.lengths))
            sub = v.sub(Box(offs, lens))
            if i - group_start == 1:
                stack.append(sub)  # a single slice: split further along later dims if needed
            else:
                out.append(sub)
            if i < n:
                group_start, cur_lo, cur_hi = i, blo[i], bhi[i]
    return out


def plan_reads(
    source: Layout,
    target: Layout,
    rank: int,
    names: list[str] | None = None,
    *,
    block_size: int = 65536,
) -> ReadPlan:
    """Plan the reads that give ``rank`` of ``target`` its local tensors from a checkpoint saved as ``source``."""
    wanted = list(target.tensors) if names is None else list(names)
    outputs: dict[str, Output] = {}
    by_entry: dict[tuple[int, str], list[tuple[Piece, Copy]]] = {}
    needed = 0
    for name in wanted:
        tspec = target.spec(name)
        if name not in source.tensors:
            raise LayoutError(f"tensor {name!r} is not in the checkpoint")
        sspec = source.tensors[name]
        if tspec.shape != sspec.shape:
            raise LayoutError(
                f"tensor {name!r}: checkpoint holds shape {list(sspec.shape)}, target layout wants {list(tspec.shape)}"
            )
        shard = target.local(name, rank)
        if shard is None:
            continue
        item = _itemsize(sspec.dtype)
        covered = sum(p.box.numel for p in shard.pieces) == shard.numel
        outputs[name] = Output(name, shard.shape, sspec.dtype, covered)
        for tp in shard.pieces:
            got = 0
            for src_rank, sp in source.sources(name, tp.box):
                region = sp.box.intersect(tp.box)
                if region is None:
                    continue
                sview = sp.sub(region)
                dview = tp.sub(region)
                got += region.numel
                by_entry.setdefault((src_rank, name), []).append(
                    (sview, Copy(name, sview.offset, sview.strides, dview.offset, dview.strides, region.lengths))
                )
            if got != tp.box.numel:
                raise LayoutError(
                    f"tensor {name!r}: the checkpoint's layout covers {got} of the {tp.box.numel} elements of"
                    f" box {tp.box.to_json()} (incomplete or overlapping source layout)"
                )
            needed += tp.box.numel * item
    reads: list[Read] = []
    block = block_size
    for (src_rank, name), items in by_entry.items():
        sspec = source.tensors[name]
        item = _itemsize(sspec.dtype)
        src_shard = source.local(name, src_rank)
        entry_nbytes = src_shard.numel * item
        parts: list[tuple[int, int, Copy]] = []
        for sview, copy in items:
            for sub in _split_for_reading(sview, item, block, entry_nbytes):
                a, b = sub.span()
                lo, hi = _widen(a * item, b * item, block, entry_nbytes)
                delta = sub.box
                dst_off = copy.dst_offset + sum(
                    (o - so) * st for o, so, st in zip(delta.offsets, sview.box.offsets, copy.dst_strides)
                )
                parts.append(
                    (lo, hi, Copy(name, sub.offset, sub.strides, dst_off, copy.dst_strides, delta.lengths))
                )
        parts.sort(key=lambda p: (p[0], p[1]))
        cur: Read | None = None
        for lo, hi, copy in parts:
            if cur is not None and lo <= cur.stop and max(hi, cur.stop) - cur.start <= MAX_READ_BYTES:
                cur.stop = max(cur.stop, hi)
                cur.copies.append(copy)
                continue
            cur = Read(src_rank, name, lo, hi, entry_nbytes, item, [copy])
            reads.append(cur)
    reads.sort(key=lambda r: (r.rank, r.entry, r.start))
    return ReadPlan(reads, outputs, needed)

