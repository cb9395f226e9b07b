"""Boxes, pieces and strided copies: the geometry every layout and reshard uses.

A logical tensor is addressed in *global* coordinates. Whatever a rank holds of it
(a TP slice, a ZeRO flat range, a fused sub-parameter, a padded vocabulary slice) is
described by **pieces**: a piece says that the global box ``box`` lives in some
storage (a local tensor or a file entry) starting at element ``offset`` with element
``strides`` per box dimension. Any source piece and target piece are related by
box intersection, and moving data between them is one strided copy. Flat ranges
(ZeRO) are decomposed into at most ``2 * ndim - 1`` boxes that are contiguous in
their storage, so they need no special case further down.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from stalwart.errors import LayoutError

Shape = tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Box:
    """An axis-aligned region of a tensor: ``offsets[d] <= i_d < offsets[d] + lengths[d]``."""

    offsets: Shape
    lengths: Shape

    @staticmethod
    def full(shape: Shape) -> Box:
        return Box(tuple(0 for _ in shape), tuple(shape))

    @property
    def ndim(self) -> int:
        return len(self.offsets)

    @property
    def numel(self) -> int:
        return math.prod(self.lengths)

    @property
    def ends(self) -> Shape:
        return tuple(o + n for o, n in zip(self.offsets, self.lengths))

    def is_empty(self) -> bool:
        return any(n <= 0 for n in self.lengths)

    def intersect(self, other: Box) -> Box | None:
        offs = []
        lens = []
        for o1, n1, o2, n2 in zip(self.offsets, self.lengths, other.offsets, other.lengths):
            lo = max(o1, o2)
            hi = min(o1 + n1, o2 + n2)
            if hi <= lo:
                return None
            offs.append(lo)
            lens.append(hi - lo)
        return Box(tuple(offs), tuple(lens))

    def contains(self, other: Box) -> bool:
        return all(
            o1 <= o2 and o2 + n2 <= o1 + n1
            for o1, n1, o2, n2 in zip(self.offsets, self.lengths, other.offsets, other.lengths)
        )

    def to_json(self) -> list[list[int]]:
        return [list(self.offsets), list(self.lengths)]

    @staticmethod
    def from_json(obj) -> Box:
        return Box(tuple(int(x) for x in obj[0]), tuple(int(x) for x in obj[1]))


def check_panels(panels, shape: Shape, what: str) -> tuple[int, int] | None:
    """Validate a panel arrangement ``(dim, width)`` for tensors of ``len(shape)`` dims."""
    if panels is None:
        return None
    dim, width = (int(x) for x in panels)
    if not 0 <= dim < len(shape) or width < 1:
        raise LayoutError(f"{what}: panels of width {width} along dim {dim} do not fit shape {list(shape)}")
    return dim, width


def row_major_strides(shape: Shape) -> Shape:
    strides = []
    acc = 1
    for n in reversed(shape):
        strides.append(acc)
        acc *= max(n, 1)
    return tuple(reversed(strides))


@dataclass(frozen=True, slots=True)
class Piece:
    """Global ``box`` of a tensor, stored at element ``offset`` with element ``strides``."""

    box: Box
    offset: int
    strides: Shape

    def sub(self, region: Box) -> Piece:
        """The part of this piece covering ``region`` (which must lie inside ``box``)."""
        delta = sum((r - b) * s for r, b, s in zip(region.offsets, self.box.offsets, self.strides))
        return Piece(region, self.offset + delta, self.strides)

    def span(self) -> tuple[int, int]:
        """First element and one past the last element touched in storage."""
        if self.box.is_empty():
            return self.offset, self.offset
        last = self.offset + sum((n - 1) * s for n, s in zip(self.box.lengths, self.strides))
        return self.offset, last + 1

    def is_dense(self) -> bool:
        """True when the piece's elements are one contiguous run in storage, in row-major order."""
        return self.span()[1] - self.span()[0] == self.box.numel


def decompose_flat(shape: Shape, start: int, stop: int) -> list[tuple[Box, int]]:
    """Split the row-major flat range ``[start, stop)`` of ``shape`` into boxes.

    Returns ``(box, position)`` pairs in flat order, where ``position`` is the flat
    index (relative to ``start``) of the box's first element. Each box is contiguous
    in the row-major order of ``shape``; there are at most ``2 * len(shape) - 1``.
    """
    shape = tuple(shape)
    if not shape:
        return [(Box((), ()), 0)] if start < stop and start == 0 else []
    strides = row_major_strides(shape)
    out: list[tuple[Box, int]] = []
    pos = start
    while pos < stop:
        # Outermost dimension at which ``pos`` is aligned and at least one full step fits.
        for d in range(len(shape)):
            step = strides[d]
            if pos % step == 0 and stop - pos >= step:
                break
        idx = []
        rem = pos
        for s in strides:
            q, rem = divmod(rem, s)
            idx.append(q)
        count = min(shape[d] - idx[d], (stop - pos) // strides[d])
        offsets = (*idx[:d], idx[d], *(0 for _ in shape[d + 1 :]))
        lengths = (*(1 for _ in range(d)), count, *shape[d + 1 :])
        out.append((Box(tuple(offsets), tuple(lengths)), pos - start))
        pos += count * strides[d]
    return out
