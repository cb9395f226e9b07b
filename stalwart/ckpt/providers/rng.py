"""RNG streams of every rank: Python, NumPy, torch CPU and CUDA, as one fixed-size blob.

Captured eagerly at ``guard.step()`` (dropout advances the streams during forward),
stored per rank (a tensor with a leading world dim), restored exactly when the
topology is unchanged. When it changed (an elastic job on fewer or more ranks), the
streams are restored only if every saved rank held the same state - the usual case
when every rank is seeded alike and sample-tied randomness comes from per-sample
streams (:mod:`stalwart.elastic.data`) - and otherwise left as they are, with a warning:
there is no right row for a rank that did not exist.
"""

from __future__ import annotations

import ctypes
import random
import struct
import warnings
from collections.abc import Mapping

import numpy as np
import torch

from stalwart.ckpt.providers.base import Collected, Item, PerRankBlobProvider, RestoreContext
from stalwart.formats.layout import Replicated, TensorSpec

_PY = struct.Struct("<i625Id?")  # version, 624 state words + position, gauss, has_gauss
_NP = struct.Struct("<624Iiid")  # key, pos, has_gauss, cached_gaussian
_NP_TAIL = struct.Struct("<iid")  # _NP after the key


def _cuda_states() -> list[torch.Tensor]:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return [s.cpu() for s in torch.cuda.get_rng_state_all()]
    return []


_MT_RAW = 624 * 4 + 4  # numpy's mt19937_state: uint32 key[624], int pos
_np_packed: tuple[bytes, bytes] | None = None  # (raw key + pos, its _NP packing) while the cached gaussian is unset
_np_raw_ok: bool | None = None  # whether the raw read matched get_state() (checked on first use)


def _np_raw() -> bytes | None:
    """The global NumPy generator's key and position read from its C state (~1 us; get_state()
    copies the key element by element, ~90 us), or None when not readable that way."""
    if _np_raw_ok is False:
        return None
    try:
        return ctypes.string_at(np.random.mtrand._rand._bit_generator.ctypes.state_address, _MT_RAW)
    except Exception:
        return None


def _pack_numpy() -> bytes:
    """``_NP.pack(*np.random.get_state()[1:])``, reused while the generator did not move.

    Unchanged key and position mean unchanged state only while no gaussian is cached
    (consuming a cached one changes ``has_gauss`` without moving the generator), so the
    packing is reused only in that case and get_state() is called otherwise."""
    global _np_packed, _np_raw_ok
    raw = _np_raw()
    if raw is not None and _np_packed is not None and _np_packed[0] == raw:
        return _np_packed[1]
    name, key, pos, has_gauss, cached = np.random.get_state()
    assert name == "MT19937"
    # == _NP.pack(*key, pos, has_gauss, cached), without 624 Python ints (RNG is packed every snapshot)
    key_bytes = np.asarray(key, dtype="<u4").tobytes()
    npb = key_bytes + _NP_TAIL.pack(int(pos), int(has_gauss), float(cached))
    if raw is not None and _np_raw_ok is None:
        _np_raw_ok = raw == key_bytes + struct.pack("<i", int(pos))
    _np_packed = (raw, npb) if raw is not None and _np_raw_ok and not has_gauss else None
    return npb


_PY_RAW = 4 + 624 * 4  # CPython's RandomObject after its object header: int index, uint32 state[624]
_py_raw_ok: bool | None = None  # whether the raw read matched random.getstate() (checked on first use)


def _pack_python() -> bytes:
    """``_PY.pack(*random.getstate())`` for the global ``random`` generator.

    ``getstate()`` makes 625 Python ints that ``_PY.pack`` parses again, which costs
    0.1-0.4 ms right after a training step (cold caches); the generator's words are read
    from the object instead, after checking once that doing so gives exactly what
    ``getstate()`` gives (else ``getstate()`` is used)."""
    global _py_raw_ok
    inst = random._inst
    gauss = inst.gauss_next
    if _py_raw_ok is not False and type(inst) is random.Random:
        raw = ctypes.string_at(id(inst) + object.__basicsize__, _PY_RAW)
        packed = (struct.pack("<i", random.Random.VERSION) + raw[4:] + raw[:4]
                  + struct.pack("<d?", gauss if gauss is not None else 0.0, gauss is not None))
        if _py_raw_ok:
            return packed
        version, words, gauss = random.getstate()
        _py_raw_ok = packed == _PY.pack(version, *words, gauss if gauss is not None else 0.0, gauss is not None)
        if _py_raw_ok:
            return packed
    version, words, gauss = random.getstate()
    return _PY.pack(version, *words, gauss if gauss is not None else 0.0, gauss is not None)


def pack_rng() -> np.ndarray:
    py = _pack_python()
    npb = _pack_numpy()
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

    last_blob: np.ndarray | None = None  # the streams as the newest snapshot captured them

    def pack(self) -> np.ndarray:
        self.last_blob = pack_rng()
        return self.last_blob

    def unpack(self, blob: bytes) -> None:
        unpack_rng(blob)

    def targets(self, ctx: RestoreContext) -> Collected:
        saved = ctx.saved.get(self.tensor_name)
        if saved is None or ctx.same_topology:
            return super().targets(ctx)
        whole = TensorSpec(self.tensor_name, saved.shape, torch.uint8, Replicated(), role="other")
        return Collected(items=[Item(whole, torch.empty(saved.shape, dtype=torch.uint8), lazy=False)])

    def restore(self, tensors: Mapping[str, torch.Tensor], ctx: RestoreContext) -> None:
        rows = tensors.get(self.tensor_name)
        if rows is None or ctx.same_topology or rows.dim() != 2:
            return super().restore(tensors, ctx)
        if bool((rows == rows[0]).all()):
            self.unpack(rows[0].numpy().tobytes())
            return
        warnings.warn(f"the world changed ({rows.shape[0]} ranks saved) and the ranks' RNG states differed: the RNG"
                      " state is not restored (use per-sample streams, stalwart.elastic.sample_generator, for"
                      " randomness that must not depend on the world size)", stacklevel=2)
