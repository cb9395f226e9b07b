"""The pure-numpy backend: the bit-sliced XOR engine on ``uint64`` arrays, one thread."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from stalwart.ckpt.erasure import schedule
from stalwart.ckpt.erasure.bitslice import BitsliceEngine, WordOps

#: Words per bit plane (a chunk is 64 x this many bytes per shard): 512 KiB chunks.
PLANE_WORDS = 8192
#: Scratch budget; wide codes get smaller planes so the working set stays near L2/L3.
BUDGET_BYTES = 16 << 20


# 0-d arrays, not numpy scalars: ufuncs take them about 0.2 us faster per call
def _const(v: int) -> np.ndarray:
    a = np.array(v, dtype=np.uint64)
    a.flags.writeable = False
    return a


_SHIFT = {s: _const(s) for s in (1, 2, 4)}
_MASK: dict[int, np.ndarray] = {}


def _mask(m: int) -> np.ndarray:
    v = _MASK.get(m)
    if v is None:
        v = _MASK[m] = _const(m)
    return v


class NumpyWordOps(WordOps):
    """:class:`WordOps` on numpy ``uint64`` arrays."""

    def empty(self, shape: tuple[int, ...]) -> np.ndarray:
        arr = np.empty(shape, dtype=np.uint64)
        arr.fill(0)  # fault the pages in now, not inside the first timed chunk
        return arr

    def words(self, byte_view: np.ndarray) -> np.ndarray | None:
        if byte_view.ctypes.data % 8:
            return None
        return byte_view.view(np.uint64)

    def bytes_of(self, words: np.ndarray) -> np.ndarray:
        return words.reshape(-1).view(np.uint8)

    def split(self, x: np.ndarray, s: int) -> tuple[np.ndarray, np.ndarray]:
        *lead, rows, p = x.shape
        if rows != 8:
            raise ValueError(f"expected 8 rows, got {rows}")
        v = x.reshape(*lead, 8 // (2 * s), 2, s, p)  # splitting one axis: always a view
        return v[..., 0, :, :], v[..., 1, :, :]

    def delta_swap(self, lo, hi, dlo, dhi, t, s: int, mask: int) -> None:
        sh = _SHIFT[s]
        np.right_shift(lo, sh, t)
        np.bitwise_xor(t, hi, t)
        np.bitwise_and(t, _mask(mask), t)
        np.bitwise_xor(hi, t, dhi)
        np.left_shift(t, sh, t)
        np.bitwise_xor(lo, t, dlo)

    def copy_bytes(self, dst: np.ndarray, src: np.ndarray) -> None:
        np.copyto(dst, src)

    def zero(self, x: np.ndarray) -> None:
        x.fill(0)

    def bind(self, step: tuple, regs: dict[int, Sequence[Any]]) -> tuple[Callable[..., Any], tuple]:
        op, dst = step[0], regs[step[1][0]][step[1][1]]
        if op == schedule.XOR3:
            return np.bitwise_xor, (regs[step[2][0]][step[2][1]], regs[step[3][0]][step[3][1]], dst)
        if op == schedule.IXOR:
            return np.bitwise_xor, (dst, regs[step[2][0]][step[2][1]], dst)
        if op == schedule.COPY:
            return np.copyto, (dst, regs[step[2][0]][step[2][1]])
        return dst.fill, (0,)


class NumpyBackend:
    """Bulk GF(2^8) products on host memory with numpy only."""

    name = "numpy"

    def __init__(self, plane_words: int = PLANE_WORDS, budget_bytes: int = BUDGET_BYTES) -> None:
        self.engine = BitsliceEngine(NumpyWordOps(), plane_words, budget_bytes)

    @staticmethod
    def available() -> bool:
        return True

    def apply(
        self, matrix: np.ndarray, inputs: Sequence[np.ndarray], outputs: Sequence[np.ndarray], nbytes: int
    ) -> None:
        """``outputs = matrix x inputs`` on 1-D ``uint8`` numpy arrays of ``nbytes`` each."""
        self.engine.apply(matrix, inputs, outputs, nbytes)
