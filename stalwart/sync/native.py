"""Builds and loads the weight-sync kernel (``_sync_kernel.c``); optional.

Compiled on first use like the host optimizer kernel (:mod:`stalwart.offload.native`):
with the system C compiler (``$CC``, else ``cc``/``gcc``/``clang``), into a cache
directory keyed by a hash of the source, the flags, the compiler's version and (with
``-march=native``) the CPU's feature flags; concurrent processes wait on a file lock
and load the one build. ``STALWART_SYNC_CACHE`` chooses the cache directory (default
``~/.cache/stalwart/sync``).

Unlike the optimizer kernel it is never required: :func:`kernel` returns None when it
cannot be built or loaded (no compiler, no source) or when ``STALWART_SYNC_NATIVE=0``,
and the codec then runs its numpy code, which gives the same bits.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
from functools import cache

import numpy as np

from stalwart.offload.native import NativeBuildError, build_library

log = logging.getLogger(__name__)

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_sync_kernel.c")
ABI = 1
BASE_FLAGS = ("-O3", "-fPIC", "-shared", "-std=gnu11")
NATIVE_FLAGS = ("-march=native",)
_P = ctypes.c_void_p
_I64 = ctypes.c_int64


def cache_dir() -> str:
    return os.environ.get("STALWART_SYNC_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
        "stalwart",
        "sync",
    )


def _build() -> str:
    return build_library(SOURCE, "sync_kernel", BASE_FLAGS, NATIVE_FLAGS, cache_dir())


class SyncKernel:
    """The loaded kernel: :meth:`diff` and :meth:`scatter` on numpy word arrays."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        self.lib = lib
        self.slack = lib.sw_sync_slack()
        self.simd = bool(lib.sw_sync_simd())
        self._diff = {}
        self._scatter = {}
        for w in (1, 2, 4, 8):
            f = getattr(lib, f"sw_diff_w{w}")
            f.restype = _I64
            f.argtypes = [_P, _P, _I64, _I64, _P, _P, _P, _I64, _P, _P, _I64, _I64]
            self._diff[w] = f
            g = getattr(lib, f"sw_scatter_w{w}")
            g.restype = ctypes.c_int
            g.argtypes = [_P, _I64, _P, _P, _I64, _I64, ctypes.c_int]
            self._scatter[w] = g
        lib.sw_cast_f32_bf16.restype = ctypes.c_int
        lib.sw_cast_f32_bf16.argtypes = [_P, _P, _I64]
        self._cast = lib.sw_cast_f32_bf16
        lib.sw_gap_sizes.restype = None
        lib.sw_gap_sizes.argtypes = [_P, _I64, _P]
        lib.sw_gap_write.restype = _I64
        lib.sw_gap_write.argtypes = [_P, _I64, ctypes.c_int, _I64, _P]
        lib.sw_gap_read.restype = ctypes.c_int
        lib.sw_gap_read.argtypes = [_P, _I64, ctypes.c_int, _I64, _I64, _P]
        self._sizes = np.zeros(4, np.int64)
        for name in ("sw_shuffle", "sw_unshuffle"):
            f = getattr(lib, name)
            f.restype = None
            f.argtypes = [_P, _I64, ctypes.c_int, _P]

    def diff(
        self,
        w: int,
        cur: int,
        base: int,
        n: int,
        off: int,
        idx: int,
        new: int,
        xor: int,
        room: int,
        pidx: int = 0,
        pnew: int = 0,
        pk: int = 0,
        pdelta: int = 0,
    ) -> int:
        """Changed words of ``n`` words at addresses ``cur``/``base`` (``w`` bytes each): writes
        their indices (``off`` + i, int64), new words and XOR words at ``idx``/``new``/``xor``;
        returns their count, or -1 when they would not fit in ``room`` elements less the slack
        (:attr:`slack` elements past the count may be written). First, interleaved with the
        comparison, writes ``pk`` pending baseline words ``base[pidx[j] + pdelta] = pnew[j]``
        (sorted int64 indices inside the range; always all of them)."""
        return self._diff[w](cur, base, n, off, idx, new, xor, room, pidx, pnew, pk, pdelta)

    def cast_f32_bf16(self, src: int, dst: int, n: int) -> bool:
        """``n`` fp32 words at address ``src`` cast to bf16 at ``dst`` as torch casts them;
        False when a NaN was seen (then the caller casts with torch: NaN bits differ)."""
        return self._cast(src, dst, n) == 0

    def shuffle(self, x: np.ndarray, w: int, out: np.ndarray) -> None:
        """Byte planes of the ``len(x)`` words (``w`` bytes) of contiguous ``x`` into ``out``."""
        self.lib.sw_shuffle(x.ctypes.data, len(x), w, out.ctypes.data)

    def unshuffle(self, planes: np.ndarray, k: int, w: int, out: np.ndarray) -> None:
        """The ``k`` words (``w`` bytes) of byte planes ``planes`` into ``out`` (contiguous)."""
        self.lib.sw_unshuffle(planes.ctypes.data, k, w, out.ctypes.data)

    def gap_sizes(self, idx: np.ndarray) -> tuple[int, int, int, int]:
        """Escaped and u64 gaps of sorted int64 ``idx`` (contiguous) with 8-bit, then 16-bit codes."""
        self.lib.sw_gap_sizes(idx.ctypes.data, len(idx), self._sizes.ctypes.data)
        e8, l8, e16, l16 = self._sizes.tolist()
        return e8, l8, e16, l16

    def gap_write(self, idx: np.ndarray, c: int, esc: int, out: np.ndarray) -> int:
        """Write the gap-code section of ``idx`` with ``c``-byte codes into uint8 ``out`` (room
        checked by the caller); returns its bytes."""
        return self.lib.sw_gap_write(idx.ctypes.data, len(idx), c, esc, out.ctypes.data)

    def gap_read(self, buf: np.ndarray, c: int, count: int, length: int) -> np.ndarray | None:
        """Indices from a gap-code section (uint8, contiguous), or None if it is malformed."""
        idx = np.empty(count, np.int64)
        if self.lib.sw_gap_read(buf.ctypes.data, len(buf), c, count, length, idx.ctypes.data):
            return None
        return idx

    def scatter(
        self, dst: np.ndarray, idx: np.ndarray, vals: np.ndarray, delta: int = 0, xor: bool = False
    ) -> bool:
        """``dst[idx + delta] = vals`` (``^=`` with ``xor``) for ``idx`` int64 and ``vals`` of
        ``dst``'s word size, all 1-D and contiguous; returns False (nothing done) for arrays
        that are not so. Raises IndexError (nothing written) on an index outside ``dst``."""
        k = len(idx)
        if len(vals) != k:
            raise ValueError(f"{k} indices for {len(vals)} values")
        if not (
            idx.dtype == np.int64 and vals.itemsize == dst.itemsize and dst.itemsize in self._scatter
            and idx.flags.c_contiguous and vals.flags.c_contiguous and dst.flags.c_contiguous
            and dst.flags.writeable and dst.ndim == 1
        ):  # fmt: skip
            return False
        if k and self._scatter[dst.itemsize](
            dst.ctypes.data, len(dst), idx.ctypes.data, vals.ctypes.data, k, delta, 1 if xor else 0
        ):
            raise IndexError(f"scatter index outside an array of {len(dst)} words")
        return True


@cache
def kernel() -> SyncKernel | None:
    """The built kernel, or None (not wanted, or it cannot be built or loaded here)."""
    if os.environ.get("STALWART_SYNC_NATIVE", "1") == "0" or sys.byteorder != "little":
        return None
    try:
        path = _build()
        lib = ctypes.CDLL(path)
        lib.sw_sync_abi.restype = ctypes.c_int
        if lib.sw_sync_abi() != ABI:
            raise NativeBuildError(f"{path} has ABI {lib.sw_sync_abi()}, expected {ABI}")
        return SyncKernel(lib)
    except (NativeBuildError, OSError) as e:
        log.info("weight sync runs without its native kernel (numpy fallback): %s", e)
        return None
