"""The Intel ISA-L backend: ``ec_encode_data`` through ctypes (Debian package ``libisal2``).

ISA-L multiplies with the same GF(2^8) (polynomial 0x11d) and, through
``ec_init_tables``, with whatever matrix it is given -- so handing it our matrices
(the Cauchy rows of ``gf_gen_cauchy1_matrix``, or the decode rows we invert) gives the
same bytes as every other backend. The library is optional: :func:`load` returns
``None`` when it is missing (or when ``STALWART_DISABLE_ISAL=1``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import threading
from collections.abc import Sequence

import numpy as np

#: Names tried, in order, before asking ``ctypes.util.find_library``.
LIB_NAMES = ("libisal.so.2", "libisal.so")
#: ``ec_encode_data`` takes an ``int`` length; longer shards are coded in pieces.
MAX_CALL_BYTES = 1 << 30

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False


def _bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    u8p = ctypes.c_void_p
    lib.gf_gen_cauchy1_matrix.argtypes = [u8p, ctypes.c_int, ctypes.c_int]
    lib.gf_gen_cauchy1_matrix.restype = None
    lib.ec_init_tables.argtypes = [ctypes.c_int, ctypes.c_int, u8p, u8p]
    lib.ec_init_tables.restype = None
    lib.ec_encode_data.argtypes = [
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_int,
        u8p,
        ctypes.POINTER(ctypes.c_void_p),
        ctypes.POINTER(ctypes.c_void_p),
    ]
    lib.ec_encode_data.restype = None
    return lib


def load() -> ctypes.CDLL | None:
    """The ISA-L library with its prototypes set, or ``None`` if it cannot be loaded."""
    global _lib, _tried
    with _lock:
        if _tried:
            return _lib
        _tried = True
        if os.environ.get("STALWART_DISABLE_ISAL", "") not in ("", "0"):
            return None
        names = list(LIB_NAMES)
        found = ctypes.util.find_library("isal")
        if found:
            names.append(found)
        for name in names:
            try:
                _lib = _bind(ctypes.CDLL(name))
                break
            except (OSError, AttributeError):
                continue
        return _lib


def available() -> bool:
    """Whether ``libisal`` can be used."""
    return load() is not None


def cauchy1_matrix(k: int, m: int) -> np.ndarray:
    """ISA-L's own ``gf_gen_cauchy1_matrix(k + m, k)`` (for checking our generator against it)."""
    lib = load()
    if lib is None:
        raise OSError("libisal is not available")
    a = np.zeros((k + m, k), dtype=np.uint8)
    lib.gf_gen_cauchy1_matrix(a.ctypes.data, k + m, k)
    return a


@functools.lru_cache(maxsize=256)
def _tables(matrix_bytes: bytes, rows: int, cols: int) -> np.ndarray:
    lib = load()
    assert lib is not None
    mat = np.frombuffer(matrix_bytes, dtype=np.uint8)
    tbl = np.zeros(32 * rows * cols, dtype=np.uint8)
    lib.ec_init_tables(cols, rows, mat.ctypes.data, tbl.ctypes.data)
    tbl.flags.writeable = False
    return tbl


class IsalBackend:
    """Bulk GF(2^8) products with ISA-L's SIMD kernels (host memory only)."""

    name = "isal"

    @staticmethod
    def available() -> bool:
        return available()

    def __init__(self) -> None:
        lib = load()
        if lib is None:
            raise OSError("libisal is not available")
        self._lib = lib

    def apply(
        self, matrix: np.ndarray, inputs: Sequence[np.ndarray], outputs: Sequence[np.ndarray], nbytes: int
    ) -> None:
        """``outputs = matrix x inputs`` on 1-D ``uint8`` numpy arrays of ``nbytes`` each."""
        matrix = np.ascontiguousarray(matrix, dtype=np.uint8)
        rows, cols = matrix.shape
        if len(inputs) != cols or len(outputs) != rows:
            raise ValueError(
                f"matrix {matrix.shape} does not match {len(inputs)} inputs / {len(outputs)} outputs"
            )
        if nbytes == 0 or rows == 0:
            return
        tbl = _tables(matrix.tobytes(), rows, cols)
        in_addr = [x.ctypes.data for x in inputs]
        out_addr = [y.ctypes.data for y in outputs]
        for off in range(0, nbytes, MAX_CALL_BYTES):
            n = min(MAX_CALL_BYTES, nbytes - off)
            src = (ctypes.c_void_p * cols)(*(a + off for a in in_addr))
            dst = (ctypes.c_void_p * rows)(*(a + off for a in out_addr))
            self._lib.ec_encode_data(n, cols, rows, tbl.ctypes.data, src, dst)
