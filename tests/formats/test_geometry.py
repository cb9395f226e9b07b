import itertools
import math

from hypothesis import given
from hypothesis import strategies as st

from stalwart.formats.geometry import Box, Piece, decompose_flat, row_major_strides


def elements(shape, box):
    strides = row_major_strides(shape)
    return [
        sum(i * s for i, s in zip(idx, strides))
        for idx in itertools.product(*[range(o, o + n) for o, n in zip(box.offsets, box.lengths)])
    ]


@given(st.lists(st.integers(1, 5), min_size=0, max_size=4), st.data())
def test_decompose_flat_covers_range_in_order(shape, data):
    shape = tuple(shape)
    n = math.prod(shape)
    a = data.draw(st.integers(0, n))
    b = data.draw(st.integers(a, n))
    parts = decompose_flat(shape, a, b)
    assert len(parts) <= max(1, 2 * len(shape) - 1)
    seen = []
    for box, pos in parts:
        els = elements(shape, box)
        # each box is one contiguous run at its stated position
        assert els == list(range(a + pos, a + pos + len(els)))
        seen += els
    assert seen == list(range(a, b))


def test_box_intersection_and_piece_views():
    a = Box((0, 2), (4, 3))
    b = Box((3, 0), (5, 4))
    assert a.intersect(b) == Box((3, 2), (1, 2))
    assert a.intersect(Box((4, 0), (1, 1))) is None
    p = Piece(Box((2, 0), (3, 4)), 10, (4, 1))
    sub = p.sub(Box((3, 1), (2, 2)))
    assert sub.offset == 10 + 4 + 1
    assert sub.span() == (15, 15 + 4 + 1 + 1)
    assert Piece(Box((0, 0), (3, 4)), 0, (4, 1)).is_dense()
    assert not Piece(Box((0, 0), (3, 2)), 0, (4, 1)).is_dense()
