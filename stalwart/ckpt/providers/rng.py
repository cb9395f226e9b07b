"""RNG streams of every rank: Python, NumPy, torch CPU and CUDA, as one fixed-size blob.

Captured eagerly at ``guard.step()`` (dropout advances the streams during forward),
stored per rank (a tensor with a leading world dim), restored exactly when the
topology is unchanged.
"""

from __future__ import annotations

import random
import struct
import warnings

import numpy as np
import torch

from stalwart.ckpt.providers.base import PerRankBlobProvider

_PY = struct.Struct("<i625Id?")  # version, 624 state words + position, gauss, has_gauss
_NP = struct.Struct("<624Iiid")  # key, pos, has_gauss, cached_gaussian


def _cuda_states() -> list[torch.Tensor]:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return [s.cpu() for s in torch.cuda.get_rng_state_all()]
    return []


def pack_rng() -> np.ndarray:
    version, words, gauss = random.getstate()
    py = _PY.pack(version, *words, gauss if gauss is not None else 0.0, gauss is not None)
    name, key, pos, has_gauss, cached = np.random.get_state()
    assert name == "MT19937"
    npb = _NP.pack(*[int(x) for x in key], int(pos), int(has_gauss), float(cached))
    cpu = torch.get_rng_state().numpy().tobytes()
    cuda = b"".join(s.numpy().tobytes() for s in _cuda_states())
    header = struct.pack("<IIII", len(py), len(npb), len(cpu), len(cuda))
    return np.frombuffer(header + py + npb + cpu + cuda, dtype=np.uint8).copy()


def unpack_rng(blob: bytes) -> None:
    lp, ln, lc, lg = struct.unpack_from("<IIII", blob, 0)
    pos = 16
    fields = _PY.unpack_from(blob, pos)
    pos += lp
    random.setstate((fields[0], tuple(fields[1:626]), fields[626] if fields[627] else None))
    k = _NP.unpack_from(blob, pos)
    pos += ln
    np.random.set_state(("MT19937", np.array(k[:624], dtype=np.uint32), k[624], k[625], k[626]))
    torch.set_rng_state(torch.frombuffer(bytearray(blob[pos : pos + lc]), dtype=torch.uint8))
    pos += lc
    if lg:
        states = _cuda_states()
        if not states:
            warnings.warn("checkpoint holds CUDA RNG state but CUDA is not initialised here; not restored", stacklevel=2)
            return
        per = lg // len(states)
        torch.cuda.set_rng_state_all(
            [torch.frombuffer(bytearray(blob[pos + i * per : pos + (i + 1) * per]), dtype=torch.uint8) for i in range(len(states))]
        )


class RNGProvider(PerRankBlobProvider):
    name = "rng"
    tensor_name = "__stalwart__.rng"
    what = "the RNG state"

    def pack(self) -> np.ndarray:
        return pack_rng()

    def unpack(self, blob: bytes) -> None:
        unpack_rng(blob)
