"""The delta codec: which words of a tensor range changed, and their new bits, in few bytes.

Tensors are compared as raw bits: each tensor is viewed as a flat array of *words*
(signed integers as wide as its element, at most 8 bytes; complex128 is two words
per element), so NaN payloads, -0.0, bf16, fp8 and integer tensors are all exact.

An **entry** covers the word range ``[start, start + length)`` of one tensor::

    offset size  field
    0      4     tensor id (index into the update's schema)
    4      1     index encoding: 0 dense (every word of the range follows),
                 1 delta+varint, 2 bitmap
    5      1     value encoding: 0 raw words, 1 XOR with the receiver's current words,
                 byte-plane shuffled, zstd-compressed
    6      1     log2 of the word size (0..3)
    7      1     flags (0; reserved)
    8      8     start (word offset in the tensor)
    16     4     length (words in the range)
    20     4     count (changed words; = length for a full sync)
    24     4     index section bytes
    28     4     value section bytes

followed by the index section and the value section, each zero-padded to a multiple of
8 bytes. Delta+varint stores ``gap_0 = i_0`` and ``gap_j = i_j - i_{j-1} - 1`` of the
sorted local indices as LEB128 (7 bits per byte, high bit = more bytes follow). A
bitmap holds ``length`` bits, most significant bit first (``numpy.packbits``).

The index encoding is chosen per entry by exact size (dense ``length*w``, varint
``sum(len(varint)) + count*w``, bitmap ``ceil(length/8) + count*w``); then values are
sent raw or XOR+zstd, whichever is smaller (with ``compression="auto"`` a 64 KiB
sample decides whether compressing a large value block is worth trying).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np
import torch
import zstandard

from stalwart.sync.errors import ProtocolError

IDX_DENSE, IDX_VARINT, IDX_BITMAP = 0, 1, 2
VAL_RAW, VAL_XOR_ZSTD = 0, 1
IDX_NAMES = {IDX_DENSE: "dense", IDX_VARINT: "varint", IDX_BITMAP: "bitmap"}
VAL_NAMES = {VAL_RAW: "raw", VAL_XOR_ZSTD: "xor_zstd"}

ENTRY = struct.Struct("<IBBBBQIIII")
ENTRY_SIZE = ENTRY.size  # 32
assert ENTRY_SIZE == 32

COMPRESSION_MODES = ("auto", "always", "off")

_WORD_NP = {1: np.dtype(np.int8), 2: np.dtype(np.int16), 4: np.dtype(np.int32), 8: np.dtype(np.int64)}
_WORD_TORCH = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_LOG2 = {1: 0, 2: 1, 4: 2, 8: 3}
_ITEMSIZE: dict[torch.dtype, int] = {}
_VARINT_LIMITS = [1 << (7 * i) for i in range(1, 10)]
_SAMPLE_WORDS = 32 * 1024


def pad8(n: int) -> int:
    return (n + 7) & ~7


def itemsize(dtype: torch.dtype) -> int:
    s = _ITEMSIZE.get(dtype)
    if s is None:
        s = _ITEMSIZE[dtype] = torch.empty((), dtype=dtype).element_size()
    return s


def word_size(dtype: torch.dtype) -> int:
    """Bytes per compared word of ``dtype`` (its item size, capped at 8)."""
    s = itemsize(dtype)
    if s > 8:
        if s % 8:
            raise ValueError(f"dtype {dtype} has item size {s}, not a multiple of 8")
        return 8
    if s not in _WORD_NP:
        raise ValueError(f"dtype {dtype} has unsupported item size {s}")
    return s


def word_log2(w: int) -> int:
    return _LOG2[w]


def np_word_dtype(w: int) -> np.dtype:
    return _WORD_NP[w]


def torch_word_dtype(w: int) -> torch.dtype:
    return _WORD_TORCH[w]


def words_torch(t: torch.Tensor) -> torch.Tensor:
    """Flat integer view (same storage) of a contiguous tensor, on its own device."""
    if not t.is_contiguous():
        raise ValueError("weight sync needs contiguous tensors")
    flat = t.detach().reshape(-1)
    return flat.view(_WORD_TORCH[word_size(t.dtype)])


def words_np(t: torch.Tensor) -> np.ndarray:
    """Flat integer numpy view (same memory) of a contiguous CPU tensor."""
    return words_torch(t).numpy()


# ---------------------------------------------------------------- index encodings


def varint_lengths(gaps: np.ndarray) -> np.ndarray:
    """Bytes each non-negative gap takes as LEB128."""
    nb = np.ones(len(gaps), dtype=np.uint8)
    for lim in _VARINT_LIMITS:
        ge = gaps >= lim
        if not ge.any():
            break
        nb += ge
    return nb


def gaps_of(idx: np.ndarray) -> np.ndarray:
    """``gap_0 = i_0``, ``gap_j = i_j - i_{j-1} - 1`` of sorted unique indices."""
    g = np.empty(len(idx), dtype=np.int64)
    if len(idx):
        g[0] = idx[0]
        np.subtract(idx[1:], idx[:-1], out=g[1:])
        g[1:] -= 1
    return g


def varint_encode_into(gaps: np.ndarray, nb: np.ndarray, out: np.ndarray) -> int:
    """Write LEB128 of ``gaps`` (lengths ``nb``) into uint8 ``out``; returns bytes written.

    Most gaps take one byte at the densities this codec is used for, so the single-byte
    case is written in one vectorized pass and longer varints are patched sparsely.
    """
    k = len(gaps)
    if k == 0:
        return 0
    multi = np.flatnonzero(nb > 1)
    if len(multi) == 0:
        out[:k] = gaps
        return k
    g = gaps[multi]
    if int(g.max()) < 1 << 14:  # at most two bytes: one vectorized insert of the high bytes
        low = gaps.astype(np.uint8)
        low[multi] = (g & 0x7F) | 0x80
        res = np.insert(low, multi + 1, (g >> 7).astype(np.uint8))
        out[: len(res)] = res
        return len(res)
    ends = np.cumsum(nb, dtype=np.int64)
    total = int(ends[-1])
    starts = ends - nb
    out[starts] = gaps  # truncated to the low byte; multi-byte starts are rewritten below
    s = starts[multi]
    g = gaps[multi]
    n = nb[multi]
    for b in range(int(n.max())):
        sel = np.flatnonzero(n > b)
        if b:
            s, g, n = s[sel], g[sel], n[sel]
        out[s + b] = ((g >> (7 * b)) & 0x7F) | ((n > b + 1).astype(np.int64) << 7)
    return total


def varint_decode(buf: np.ndarray, count: int, what: str) -> np.ndarray:
    """Inverse of :func:`varint_encode_into`: ``count`` gaps from uint8 ``buf`` (exactly consumed)."""
    n = len(buf)
    if count == 0:
        if n:
            raise ProtocolError(f"{what}: {n} varint bytes for 0 indices")
        return np.empty(0, dtype=np.int64)
    term = buf < 0x80
    if n == count:
        if not term.all():
            raise ProtocolError(f"{what}: truncated varint index stream")
        return buf.astype(np.int64)
    ends = np.flatnonzero(term)
    if len(ends) != count or ends[-1] != n - 1:
        raise ProtocolError(f"{what}: varint stream holds {len(ends)} indices, entry says {count}")
    vals = buf[ends].astype(np.int64)  # right for one-byte varints; longer ones are fixed below
    lens = np.empty(count, dtype=np.int64)
    lens[0] = ends[0] + 1
    np.subtract(ends[1:], ends[:-1], out=lens[1:])
    multi = np.flatnonzero(lens > 1)
    if int(lens[multi].max()) > 9:
        raise ProtocolError(f"{what}: varint longer than 9 bytes")
    s = ends[multi] - lens[multi] + 1
    L = lens[multi]
    v = buf[s].astype(np.int64) & 0x7F
    for b in range(1, int(L.max())):
        sel = np.flatnonzero(b < L)
        v[sel] |= (buf[s[sel] + b].astype(np.int64) & 0x7F) << (7 * b)
    vals[multi] = v
    return vals


def indices_from_gaps(gaps: np.ndarray) -> np.ndarray:
    idx = np.cumsum(gaps + 1)
    idx -= 1
    return idx


def bitmap_indices(buf: np.ndarray, length: int, count: int, what: str) -> np.ndarray:
    if len(buf) != (length + 7) // 8:
        raise ProtocolError(f"{what}: bitmap of {len(buf)} bytes for {length} words")
    bits = np.unpackbits(buf, count=length).view(np.bool_)  # numpy's fast nonzero path needs bool
    idx = np.flatnonzero(bits)
    if len(idx) != count:
        raise ProtocolError(f"{what}: bitmap marks {len(idx)} words, entry says {count}")
    return idx


_UINT_NP = {1: np.dtype(np.uint8), 2: np.dtype(np.uint16), 4: np.dtype(np.uint32), 8: np.dtype(np.uint64)}


def shuffle_into(x: np.ndarray, w: int, out: np.ndarray) -> np.ndarray:
    """Byte planes of ``x`` (words of ``w`` bytes) into uint8 ``out``; returns the used view.

    Plane ``j`` holds byte ``j`` (bits ``8j..8j+7``, little-endian) of every word. Done
    with shifts rather than a transposing copy, which numpy runs several times slower.
    """
    k = len(x)
    dst = out[: k * w]
    u = x.view(_UINT_NP[w])
    if w == 1:
        dst[:] = u
        return dst
    tmp = np.empty(k, dtype=u.dtype)
    dst[:k] = u  # plane 0: the low byte (truncating copy)
    for j in range(1, w):
        np.right_shift(u, 8 * j, out=tmp)
        dst[j * k : (j + 1) * k] = tmp
    return dst


def unshuffle(planes: np.ndarray, w: int, k: int, out: np.ndarray | None = None) -> np.ndarray:
    """Inverse of :func:`shuffle_into`: ``k`` words of ``w`` bytes (returned as uint8 bytes)."""
    dt = _UINT_NP[w]
    res = np.empty(k, dtype=dt) if out is None else out[: k * w].view(dt)
    if w == 1:
        res[:] = planes[:k]
        return res.view(np.uint8)
    tmp = np.empty(k, dtype=dt)
    res[:] = planes[:k]
    for j in range(1, w):
        tmp[:] = planes[j * k : (j + 1) * k]
        tmp <<= 8 * j
        res |= tmp
    return res.view(np.uint8)


# ---------------------------------------------------------------- entries


@dataclass(slots=True)
class EntryHeader:
    tensor_id: int
    idx_enc: int
    val_enc: int
    word_log2: int
    start: int
    length: int
    count: int
    idx_nbytes: int
    val_nbytes: int

    @property
    def nbytes(self) -> int:
        return ENTRY_SIZE + pad8(self.idx_nbytes) + pad8(self.val_nbytes)


@dataclass(slots=True)
class EntryPlan:
    """An encoded range, not yet written: sizes are exact."""

    idx_enc: int
    val_enc: int
    length: int
    count: int
    idx_nbytes: int
    val_nbytes: int
    gaps: np.ndarray | None = None  # varint
    nb: np.ndarray | None = None  # varint byte lengths
    bits: np.ndarray | None = None  # bitmap (packbits output)
    values: np.ndarray | None = None  # raw words
    packed: bytes | None = None  # compressed XOR planes
    idx: np.ndarray | None = None  # sparse plans: local indices of the changed words
    new: np.ndarray | None = None  # sparse plans: their new words (fresh arrays, safe to keep)

    @property
    def nbytes(self) -> int:
        return ENTRY_SIZE + pad8(self.idx_nbytes) + pad8(self.val_nbytes)


def max_entry_bytes(length: int, w: int) -> int:
    """Upper bound of an entry's size for ``length`` words (the dense raw form always qualifies)."""
    return ENTRY_SIZE + pad8(length * w)


class Encoder:
    """Encodes ranges of a tensor as entries, reusing preallocated scratch buffers.

    Not thread-safe: one per encoding thread.
    """

    def __init__(self, max_words: int, compression: str = "auto", zstd_level: int = 1) -> None:
        if compression not in COMPRESSION_MODES:
            raise ValueError(f"compression must be one of {COMPRESSION_MODES}, got {compression!r}")
        self.max_words = int(max_words)
        self.compression = compression
        # room for padding the mask with True (see _nonzero)
        self._mask = np.empty(self.max_words + self.max_words // 8 + 64, dtype=np.bool_)
        self._xor = np.empty(self.max_words * 8, dtype=np.uint8)
        self._planes = np.empty(self.max_words * 8, dtype=np.uint8)
        self._cctx = zstandard.ZstdCompressor(level=zstd_level)
        self.min_compress_bytes = 256

    # -- choosing -------------------------------------------------------------------

    @staticmethod
    def _dense_beats(n: int, k: int, w: int) -> bool:
        # The cheapest sparse form costs at least count*w + min(count, ceil(n/8)) bytes (padded).
        return pad8(n * w) <= pad8(k * w) + pad8(min(k, (n + 7) // 8))

    @staticmethod
    def _cap(plan: EntryPlan, cur: np.ndarray) -> EntryPlan:
        """Never send more than the dense raw form (exact sizes, padding included)."""
        n = len(cur)
        if plan.nbytes > max_entry_bytes(n, cur.itemsize):
            return EntryPlan(IDX_DENSE, VAL_RAW, n, plan.count, 0, n * cur.itemsize, values=cur)
        return plan

    def _values(self, new: np.ndarray, w: int, xor_fn) -> tuple[int, np.ndarray | None, bytes | None, int]:
        raw = new.size * w
        if self.compression == "off" or xor_fn is None or raw < self.min_compress_bytes:
            return VAL_RAW, new, None, raw
        x = xor_fn()
        k = len(x)
        if self.compression == "auto" and k > 4 * _SAMPLE_WORDS:
            s = shuffle_into(x[:_SAMPLE_WORDS], w, self._planes)
            if len(self._cctx.compress(s)) >= 0.9 * s.size:
                return VAL_RAW, new, None, raw
        planes = shuffle_into(x, w, self._planes)
        packed = self._cctx.compress(planes)
        if len(packed) < raw:
            return VAL_XOR_ZSTD, None, packed, len(packed)
        return VAL_RAW, new, None, raw

    def _xor_view(self, k: int, w: int) -> np.ndarray:
        return self._xor[: k * w].view(_WORD_NP[w])

    # -- CPU (numpy) --------------------------------------------------------------

    def plan_full(self, cur: np.ndarray) -> EntryPlan:
        """Every word, raw (a full sync: the receiver's words are not trusted)."""
        n = len(cur)
        w = cur.itemsize
        return EntryPlan(IDX_DENSE, VAL_RAW, n, n, 0, n * w, values=cur)

    def plan_delta(self, cur: np.ndarray, base: np.ndarray) -> EntryPlan | None:
        """Entry turning ``base`` into ``cur`` (same-length word arrays), or None if equal."""
        n = len(cur)
        w = cur.itemsize
        if n > self.max_words:
            raise ValueError(f"range of {n} words exceeds the encoder's {self.max_words}")
        mask = self._mask[:n]
        np.not_equal(cur, base, out=mask)
        k = int(np.count_nonzero(mask))
        if k == 0:
            return None
        if self._dense_beats(n, k, w):

            def xor_dense():
                x = self._xor_view(n, w)
                np.bitwise_xor(cur, base, out=x)
                return x

            ve, vals, packed, vn = self._values(cur, w, xor_dense)
            return EntryPlan(IDX_DENSE, ve, n, k, 0, vn, values=vals, packed=packed)
        bitmap_bytes = (n + 7) // 8
        idx = self._nonzero(n, k)  # (boolean-mask gathers are several times slower than take)
        new = cur.take(idx)
        if k >= bitmap_bytes:  # varint needs >= 1 byte per index: bitmap cannot lose

            def xor_bm():
                x = self._xor_view(k, w)
                np.bitwise_xor(new, base.take(idx), out=x)
                return x

            ve, vals, packed, vn = self._values(new, w, xor_bm)
            plan = EntryPlan(
                IDX_BITMAP, ve, n, k, bitmap_bytes, vn, bits=np.packbits(mask), values=vals, packed=packed, idx=idx, new=new
            )  # fmt: skip
            return self._cap(plan, cur)
        return self._cap(self._plan_sparse(n, w, idx, new, lambda: base.take(idx), mask), cur)

    def _nonzero(self, n: int, k: int) -> np.ndarray:
        """Indices of the ``k`` True entries of ``self._mask[:n]``.

        numpy's nonzero switches from a branchy loop to a branch-free one at roughly 10 %
        density; in between (about 2-10 %) the branchy loop mispredicts on every hit and
        runs up to 2.5x slower. Padding the mask with True past ``n`` lifts the density
        over that switch; the padding's indices come last and are dropped. Correct for
        any numpy, faster for those with that heuristic.
        """
        if 0.02 * n < k < 0.1 * n and n >= 4096:
            m = int((0.105 * n - k) / 0.895) + 1
            if m <= len(self._mask) - n:
                self._mask[n : n + m] = True
                return np.flatnonzero(self._mask[: n + m])[:k]
        return np.flatnonzero(self._mask[:n])

    def _plan_sparse(self, n, w, idx, new, old_fn, mask=None) -> EntryPlan:
        k = len(idx)
        gaps = gaps_of(idx)
        nb = varint_lengths(gaps)
        varint_bytes = int(nb.sum(dtype=np.int64))
        bitmap_bytes = (n + 7) // 8

        def xor_sparse():
            x = self._xor_view(k, w)
            np.bitwise_xor(new, old_fn(), out=x)
            return x

        ve, vals, packed, vn = self._values(new, w, xor_sparse)
        if pad8(varint_bytes) <= pad8(bitmap_bytes):
            return EntryPlan(
                IDX_VARINT,
                ve,
                n,
                k,
                varint_bytes,
                vn,
                gaps=gaps,
                nb=nb,
                values=vals,
                packed=packed,
                idx=idx,
                new=new,
            )
        if mask is None:
            mask = self._mask[:n]
            mask[:] = False
            mask[idx] = True
        return EntryPlan(
            IDX_BITMAP,
            ve,
            n,
            k,
            bitmap_bytes,
            vn,
            bits=np.packbits(mask),
            values=vals,
            packed=packed,
            idx=idx,
            new=new,
        )

    # -- any device (torch) ----------------------------------------------------------

    def plan_full_torch(self, cur: torch.Tensor) -> EntryPlan:
        return self.plan_full(cur.cpu().numpy())

    def plan_delta_torch(self, cur: torch.Tensor, base: torch.Tensor) -> EntryPlan | None:
        """Same as :meth:`plan_delta` for integer word tensors on any device (e.g. CUDA).

        The comparison, index extraction and gathers run on the tensors' device; only
        the compact result (indices, values) is copied to the host for encoding.
        """
        n = cur.numel()
        w = cur.element_size()
        if n > self.max_words:
            raise ValueError(f"range of {n} words exceeds the encoder's {self.max_words}")
        mask = torch.ne(cur, base)
        k = int(mask.sum())
        if k == 0:
            return None
        want_xor = self.compression != "off"
        if self._dense_beats(n, k, w):
            new_h = cur.cpu().numpy()
            xor_fn = (lambda: torch.bitwise_xor(cur, base).cpu().numpy()) if want_xor else None
            ve, vals, packed, vn = self._values(new_h, w, xor_fn)
            return EntryPlan(IDX_DENSE, ve, n, k, 0, vn, values=vals, packed=packed)
        idx_t = torch.nonzero(mask).view(-1)
        new_h = cur[idx_t].cpu().numpy()
        idx_h = idx_t.cpu().numpy()
        plan = self._plan_sparse(n, w, idx_h, new_h, lambda: base[idx_t].cpu().numpy())
        if plan.nbytes > max_entry_bytes(n, w):
            return EntryPlan(IDX_DENSE, VAL_RAW, n, k, 0, n * w, values=cur.cpu().numpy())
        return plan

    # -- writing ---------------------------------------------------------------------

    @staticmethod
    def write(plan: EntryPlan, tensor_id: int, start: int, w: int, out: np.ndarray, pos: int) -> int:
        """Write ``plan`` as an entry into uint8 array ``out`` at ``pos``; returns the next position."""
        end = pos + plan.nbytes
        if end > len(out):
            raise ValueError(f"entry of {plan.nbytes} bytes does not fit ({len(out) - pos} left)")
        ENTRY.pack_into(
            out, pos, tensor_id, plan.idx_enc, plan.val_enc, _LOG2[w], 0, start, plan.length, plan.count,
            plan.idx_nbytes, plan.val_nbytes,
        )  # fmt: skip
        p = pos + ENTRY_SIZE
        if plan.idx_enc == IDX_VARINT:
            varint_encode_into(plan.gaps, plan.nb, out[p : p + plan.idx_nbytes])
        elif plan.idx_enc == IDX_BITMAP:
            out[p : p + plan.idx_nbytes] = plan.bits
        q = p + pad8(plan.idx_nbytes)
        if q > p + plan.idx_nbytes:
            out[p + plan.idx_nbytes : q] = 0
        if plan.val_enc == VAL_RAW:
            out[q : q + plan.val_nbytes] = plan.values.view(np.uint8)
        else:
            out[q : q + plan.val_nbytes] = np.frombuffer(plan.packed, dtype=np.uint8)
        r = q + plan.val_nbytes
        if end > r:
            out[r:end] = 0
        return end


@dataclass(slots=True)
class DecodedEntry:
    header: EntryHeader
    idx: np.ndarray | None  # local word indices (None: dense, every word of the range)
    values: np.ndarray  # words (raw new bits, or XOR with the current bits)
    xor: bool


def read_entry_header(buf: np.ndarray, pos: int, what: str) -> EntryHeader:
    if pos + ENTRY_SIZE > len(buf):
        raise ProtocolError(f"{what}: truncated entry header at byte {pos}")
    tid, ie, ve, wl, _flags, start, length, count, inb, vnb = ENTRY.unpack_from(buf, pos)
    if ie not in IDX_NAMES or ve not in VAL_NAMES or wl > 3:
        raise ProtocolError(
            f"{what}: unknown entry encoding (index {ie}, values {ve}, word log2 {wl}) at byte {pos}"
        )
    return EntryHeader(tid, ie, ve, wl, start, length, count, inb, vnb)


class Decoder:
    """Decodes entries (receiver side)."""

    def __init__(self) -> None:
        self._dctx = zstandard.ZstdDecompressor()

    def decode(self, h: EntryHeader, idx_buf: np.ndarray, val_buf: np.ndarray, what: str) -> DecodedEntry:
        w = 1 << h.word_log2
        wdt = _WORD_NP[w]
        if h.count > h.length:
            raise ProtocolError(f"{what}: {h.count} changed words in a range of {h.length}")
        if h.idx_enc == IDX_DENSE:
            idx = None
            m = h.length
        elif h.idx_enc == IDX_VARINT:
            idx = indices_from_gaps(varint_decode(idx_buf, h.count, what))
            m = h.count
            if m and (idx[-1] >= h.length or idx[0] < 0):
                raise ProtocolError(
                    f"{what}: varint index {int(idx[-1])} outside a range of {h.length} words"
                )
        else:
            idx = bitmap_indices(idx_buf, h.length, h.count, what)
            m = h.count
        if h.val_enc == VAL_RAW:
            if len(val_buf) != m * w:
                raise ProtocolError(f"{what}: {len(val_buf)} value bytes for {m} words of {w} bytes")
            values = val_buf.view(wdt)
        else:
            try:
                planes = self._dctx.decompress(val_buf, max_output_size=m * w)
            except zstandard.ZstdError as e:
                raise ProtocolError(f"{what}: zstd value block does not decompress ({e})") from None
            if len(planes) != m * w:
                raise ProtocolError(f"{what}: zstd value block holds {len(planes)} bytes, expected {m * w}")
            values = unshuffle(np.frombuffer(planes, dtype=np.uint8), w, m).view(wdt)
        return DecodedEntry(h, idx, values, h.val_enc == VAL_XOR_ZSTD)

    def entries(self, payload: np.ndarray, count: int, what: str):
        """Iterate the ``count`` entries of a bucket payload (uint8 array), decoded."""
        pos = 0
        n = len(payload)
        for i in range(count):
            h = read_entry_header(payload, pos, f"{what} entry {i}")
            end = pos + h.nbytes
            if end > n:
                raise ProtocolError(
                    f"{what} entry {i}: {h.nbytes} bytes at {pos} overrun the bucket ({n} bytes)"
                )
            p = pos + ENTRY_SIZE
            q = p + pad8(h.idx_nbytes)
            yield self.decode(
                h, payload[p : p + h.idx_nbytes], payload[q : q + h.val_nbytes], f"{what} entry {i}"
            )
            pos = end
        if pos != n:
            raise ProtocolError(f"{what}: {n - pos} trailing bytes after {count} entries")


def apply_np(dst: np.ndarray, e: DecodedEntry, lo: int = 0, hi: int | None = None, dst_off: int = 0) -> None:
    """Apply the part ``[lo, hi)`` (entry-local words) of ``e`` to word array ``dst`` at ``dst_off``.

    ``dst[dst_off + (i - lo)]`` receives local word ``i``. Used with ``lo=0, hi=length``
    and ``dst`` the tensor's range for an identity mapping.
    """
    if hi is None:
        hi = e.header.length
    if e.idx is None:
        src = e.values[lo:hi]
        view = dst[dst_off : dst_off + (hi - lo)]
        if e.xor:
            np.bitwise_xor(view, src, out=view)
        else:
            view[...] = src
        return
    a, b = (0, len(e.idx)) if (lo == 0 and hi >= e.header.length) else np.searchsorted(e.idx, [lo, hi])
    if a == b:
        return
    ii = e.idx[a:b]
    if lo != dst_off:
        ii = ii + (dst_off - lo)
    if e.xor:
        dst[ii] ^= e.values[a:b]
    else:
        dst[ii] = e.values[a:b]


def apply_torch(
    dst: torch.Tensor, e: DecodedEntry, lo: int = 0, hi: int | None = None, dst_off: int = 0
) -> None:
    """:func:`apply_np` for an integer word tensor on any device (e.g. CUDA)."""
    if hi is None:
        hi = e.header.length
    dev = dst.device
    if e.idx is None:
        src = torch.from_numpy(np.require(e.values[lo:hi], requirements=["C", "W"])).to(dev)
        view = dst[dst_off : dst_off + (hi - lo)]
        if e.xor:
            view.bitwise_xor_(src)
        else:
            view.copy_(src)
        return
    a, b = (0, len(e.idx)) if (lo == 0 and hi >= e.header.length) else np.searchsorted(e.idx, [lo, hi])
    if a == b:
        return
    ii = torch.from_numpy(e.idx[a:b] + (dst_off - lo)).to(dev)
    vals = torch.from_numpy(np.require(e.values[a:b], requirements=["C", "W"])).to(dev)
    if e.xor:
        dst.index_put_((ii,), dst.index_select(0, ii).bitwise_xor_(vals))
    else:
        dst.index_put_((ii,), vals)
