"""GF(2^8) arithmetic, the Cauchy generator matrix and small-matrix algebra.

The field is GF(2)[x] / (x^8 + x^4 + x^3 + x^2 + 1), polynomial ``0x11d``, with
generator 2 -- the field of reedsolo's defaults and of Intel ISA-L. The log/exp
tables are built with reedsolo's table-free multiply (``gf_mult_noLUT``), so
reedsolo's module-global tables are neither needed nor touched.

Everything here works on tiny matrices (at most 256 x 256 bytes); bulk data
goes through the backends.
"""

from __future__ import annotations

import functools

import numpy as np
import reedsolo

#: Primitive polynomial of the field (x^8 + x^4 + x^3 + x^2 + 1).
PRIM = 0x11D
#: Generator of the multiplicative group used for the log/exp tables.
GENERATOR = 2
#: Largest number of shards (k + m) a Cauchy code over GF(2^8) supports here.
MAX_SHARDS = 256


def gf_mul_slow(a: int, b: int) -> int:
    """Product of two field elements without tables (reedsolo's Russian-peasant multiply)."""
    return int(reedsolo.gf_mult_noLUT(a, b, PRIM, 256))


@functools.lru_cache(maxsize=1)
def tables() -> tuple[np.ndarray, np.ndarray]:
    """``(exp, log)``: ``exp`` has 510 entries (no modulo needed), ``log[0]`` is unused."""
    exp = np.zeros(510, dtype=np.int64)
    log = np.zeros(256, dtype=np.int64)
    x = 1
    for i in range(255):
        exp[i] = x
        log[x] = i
        x = gf_mul_slow(x, GENERATOR)
    if x != 1 or len(set(exp[:255].tolist())) != 255:  # pragma: no cover - guards the constants above
        raise AssertionError("0x11d with generator 2 is not a primitive field description")
    exp[255:] = exp[:255]
    exp.flags.writeable = False
    log.flags.writeable = False
    return exp, log


@functools.lru_cache(maxsize=1)
def mul_table() -> np.ndarray:
    """The full 256 x 256 multiplication table, ``uint8``; ``mul_table()[a, b] == a * b``."""
    exp, log = tables()
    a = np.arange(256)
    t = exp[log[a][:, None] + log[a][None, :]].astype(np.uint8)
    t[0, :] = 0
    t[:, 0] = 0
    t.flags.writeable = False
    return t


def gf_mul(a: int, b: int) -> int:
    """Product of two field elements."""
    return int(mul_table()[a, b])


def gf_inv(a: int) -> int:
    """Multiplicative inverse of a non-zero field element."""
    if not 0 < a < 256:
        raise ZeroDivisionError(f"{a} has no inverse in GF(2^8)")
    exp, log = tables()
    return int(exp[255 - log[a]])


def cauchy_matrix(k: int, m: int) -> np.ndarray:
    """The ``m x k`` parity rows of ISA-L's ``gf_gen_cauchy1_matrix``: ``1 / (i XOR j)``.

    Row ``i`` (``k <= i < k + m``) column ``j`` (``0 <= j < k``) is ``inv(i ^ j)``. The
    points ``{k..k+m-1}`` and ``{0..k-1}`` are disjoint, so every square submatrix is
    non-singular and ``[I_k; C]`` is MDS: any ``k`` of the ``k + m`` rows are invertible.
    """
    if k < 1 or m < 0 or k + m > MAX_SHARDS:
        raise ValueError(f"need 1 <= k and 0 <= m and k + m <= {MAX_SHARDS}, got k={k}, m={m}")
    c = np.empty((m, k), dtype=np.uint8)
    for i in range(m):
        for j in range(k):
            c[i, j] = gf_inv((k + i) ^ j)
    return c


def generator_matrix(k: int, m: int) -> np.ndarray:
    """The systematic ``(k + m) x k`` generator ``[I_k; C]`` (row ``r`` produces shard ``r``)."""
    return np.concatenate([np.eye(k, dtype=np.uint8), cauchy_matrix(k, m)], axis=0)


def mat_mul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Matrix product over GF(2^8) of two small ``uint8`` matrices."""
    mt = mul_table()
    a = np.asarray(a, dtype=np.uint8)
    b = np.asarray(b, dtype=np.uint8)
    if a.shape[1] != b.shape[0]:
        raise ValueError(f"shapes {a.shape} and {b.shape} do not chain")
    out = np.zeros((a.shape[0], b.shape[1]), dtype=np.uint8)
    for t in range(a.shape[1]):
        out ^= mt[a[:, t][:, None], b[t][None, :]]
    return out


def mat_inv(a: np.ndarray) -> np.ndarray:
    """Inverse of a square matrix over GF(2^8) by Gauss-Jordan elimination.

    Raises ``ValueError`` if the matrix is singular.
    """
    mt = mul_table()
    a = np.array(a, dtype=np.uint8)
    n = a.shape[0]
    if a.shape != (n, n):
        raise ValueError(f"matrix is not square: {a.shape}")
    aug = np.concatenate([a, np.eye(n, dtype=np.uint8)], axis=1)
    for col in range(n):
        nz = np.nonzero(aug[col:, col])[0]
        if len(nz) == 0:
            raise ValueError("matrix is singular over GF(2^8)")
        piv = col + int(nz[0])
        if piv != col:
            aug[[col, piv]] = aug[[piv, col]]
        aug[col] = mt[gf_inv(int(aug[col, col])), aug[col]]
        factors = aug[:, col].copy()
        factors[col] = 0
        rows = np.nonzero(factors)[0]
        if len(rows):
            aug[rows] ^= mt[factors[rows][:, None], aug[col][None, :]]
    return aug[:, n:].copy()


@functools.lru_cache(maxsize=256)
def _bit_block(c: int) -> bytes:
    block = np.zeros((8, 8), dtype=np.uint8)
    for b in range(8):
        v = gf_mul(c, 1 << b)
        for r in range(8):
            block[r, b] = (v >> r) & 1
    return block.tobytes()


def bit_matrix(c: int) -> np.ndarray:
    """The 8 x 8 GF(2) matrix of "multiply by ``c``": output bit ``r`` = XOR of input bits ``b`` where ``[r, b] == 1``."""
    return np.frombuffer(_bit_block(int(c)), dtype=np.uint8).reshape(8, 8)


def expand_bit_matrix(mat: np.ndarray) -> np.ndarray:
    """Replace each entry of an ``r x q`` GF(2^8) matrix by its 8 x 8 bit matrix: ``(8r) x (8q)`` 0/1."""
    mat = np.asarray(mat, dtype=np.uint8)
    r, q = mat.shape
    out = np.empty((8 * r, 8 * q), dtype=np.uint8)
    for i in range(r):
        for j in range(q):
            out[8 * i : 8 * i + 8, 8 * j : 8 * j + 8] = bit_matrix(int(mat[i, j]))
    return out
