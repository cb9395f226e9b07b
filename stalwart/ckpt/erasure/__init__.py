"""Erasure coding of snapshot shards: systematic Reed-Solomon RS(k, m) over GF(2^8).

    from stalwart.ckpt.erasure import ReedSolomon
    rs = ReedSolomon(4, 2)                  # backend="auto": ISA-L, else numpy; torch for CUDA
    parity = rs.encode([d0, d1, d2, d3])    # equal-length buffers -> 2 parity shards
    data = rs.decode([d0, None, d2, None, parity[0], parity[1]])   # any 4 of the 6

The generator is ISA-L's Cauchy matrix, so every backend -- and ISA-L itself --
produces the same parity bytes. See docs/ERASURE.md for the full specification.
"""

from stalwart.ckpt.erasure.backends import available_backends
from stalwart.ckpt.erasure.codec import ReedSolomon
from stalwart.ckpt.erasure.errors import ErasureError

__all__ = ["ErasureError", "ReedSolomon", "available_backends"]
