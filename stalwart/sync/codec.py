"""The delta codec: which words of a range changed, and their new bits, in few bytes.

Tensors are compared as raw bits: each tensor is viewed as a flat array of *words*
(signed integers as wide as its element, at most 8 bytes; complex128 is two words
per element), so NaN payloads, -0.0, bf16, fp8 and integer tensors are all exact.

An **entry** (wire format 2) covers ``length`` words starting at word ``start`` of
tensor ``tensor_id`` and, past that tensor's end, continuing into the next tensors of
the schema (all of the entry's word size): small tensors share one entry. Its header
is one flags byte and six LEB128 numbers (7 bits per byte, low group first, high bit
set on all but the last byte)::

    flags     bits 0-1 index encoding (0 dense, 1 8-bit gaps, 2 bitmap, 3 16-bit gaps),
              bits 2-3 value encoding (0 raw words, 1 XOR+zstd),
              bits 4-5 log2 of the word size, bit 6 index section zstd-compressed,
              bit 7 reserved (0)
    tensor_id, start, length, count (changed words), index section bytes, value section bytes

then the index section, zero bytes up to the next multiple of the word size (counted
from the start of the bucket payload), and the value section.

* **dense**: no index section; the values are all ``length`` words of the range.
* **gaps** (8 or 16 bit): ``count`` codes, then *exceptions*. The gaps are
  ``d_0 = i_0`` and ``d_j = i_j - i_{j-1}`` of the sorted local indices ``i_j``, so
  the indices are the running sum of the gaps; a gap below ``E`` (255 or 65535) is
  its code, a larger one is written as the code ``E`` with its value in the
  exceptions, in order: one 16-bit (32-bit for 16-bit codes) number per escaped code,
  then a u64 for each of those that is all ones (gaps that do not fit there either).
* **bitmap**: ``ceil(length / 8)`` bytes, most significant bit first (``numpy.packbits``).
* **raw values**: the new words (``count`` of them, or ``length`` for dense).
* **XOR+zstd**: one zstd frame holding the byte planes of ``new XOR current`` words
  (plane ``j`` is byte ``j`` of every word).
* index section zstd-compressed (flag bit 6): the section is one zstd frame of the
  encoding above.

Each entry's encoding is chosen by exact size; values are sent raw or XOR+zstd,
whichever is smaller (with ``compression="auto"`` a sample decides whether compressing
a large value block is worth trying).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import zstandard

from stalwart.sync import native
from stalwart.sync.errors import ProtocolError

IDX_DENSE, IDX_GAPS8, IDX_BITMAP, IDX_GAPS16 = 0, 1, 2, 3
VAL_RAW, VAL_XOR_ZSTD = 0, 1
IDX_NAMES = {IDX_DENSE: "dense", IDX_GAPS8: "gaps8", IDX_BITMAP: "bitmap", IDX_GAPS16: "gaps16"}
VAL_NAMES = {VAL_RAW: "raw", VAL_XOR_ZSTD: "xor_zstd"}
_FLAG_IDX_ZSTD = 0x40

#: upper bound of an entry header (flags + six LEB128 numbers of at most 64 bits) plus value alignment
ENTRY_OVERHEAD = 1 + 6 * 10 + 7

COMPRESSION_MODES = ("auto", "always", "off")

_WORD_NP = {1: np.dtype(np.int8), 2: np.dtype(np.int16), 4: np.dtype(np.int32), 8: np.dtype(np.int64)}
_UINT_NP = {1: np.dtype(np.uint8), 2: np.dtype(np.uint16), 4: np.dtype(np.uint32), 8: np.dtype(np.uint64)}
_WORD_TORCH = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_LOG2 = {1: 0, 2: 1, 4: 2, 8: 3}
_ITEMSIZE: dict[torch.dtype, int] = {}
_SAMPLE_WORDS = 32 * 1024
_MIN_INDEX_ZSTD = 4096  # index sections below this many bytes are never worth a zstd frame
_BLOCK_BYTES = 1 << 19  # compare-and-gather block: both sides' words stay in a core's L2 cache


def _kernel() -> native.SyncKernel | None:
    """The native kernel (built on first use), or None: the numpy code below runs instead."""
    return native.kernel()


def scatter_words(dst: np.ndarray, idx: np.ndarray, vals: np.ndarray, xor: bool = False) -> None:
    """``dst[idx] = vals`` (``^=`` with ``xor``): the native kernel's one pass where it can, else numpy."""
    k = _kernel()
    if k is not None and k.scatter(dst, idx, vals, 0, xor):
        return
    if xor:
        dst[idx] ^= vals
    else:
        dst[idx] = vals


def _nz(a: np.ndarray) -> np.ndarray:
    """Indices of the nonzero entries of a 1-D array (``numpy.flatnonzero`` without its wrappers)."""
    return a.nonzero()[0]


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


# ---------------------------------------------------------------- LEB128


def leb128_size(x: int) -> int:
    n = 1
    while x >= 0x80:
        x >>= 7
        n += 1
    return n


def leb128_put(out: bytearray, x: int) -> None:
    while x >= 0x80:
        out.append((x & 0x7F) | 0x80)
        x >>= 7
    out.append(x)


def leb128_get(buf: bytes, pos: int, end: int, what: str) -> tuple[int, int]:
    """One LEB128 number from ``buf[pos:end]``; returns (value, next position)."""
    x = 0
    shift = 0
    while True:
        if pos >= end:
            raise ProtocolError(f"{what}: truncated number at byte {pos}")
        b = buf[pos]
        pos += 1
        x |= (b & 0x7F) << shift
        if b < 0x80:
            return x, pos
        shift += 7
        if shift > 63:
            raise ProtocolError(f"{what}: number longer than 64 bits at byte {pos}")


# ---------------------------------------------------------------- gap codes


def gaps_of(idx: np.ndarray) -> np.ndarray:
    """``d_0 = i_0``, ``d_j = i_j - i_{j-1}`` of sorted unique indices (their running sum is ``idx``)."""
    d = np.empty(len(idx), dtype=np.int64)
    if len(idx):
        d[0] = idx[0]
        np.subtract(idx[1:], idx[:-1], out=d[1:])
    return d


_CODE = {IDX_GAPS8: (np.dtype("<u1"), np.dtype("<u2")), IDX_GAPS16: (np.dtype("<u2"), np.dtype("<u4"))}


@dataclass(slots=True)
class GapCodes:
    """A sized gap encoding of sorted indices (written by :func:`write_gap_codes`).

    ``count`` codes of ``c`` bytes (1 or 2), then one exception of ``2c`` bytes per
    escaped code (a code of all ones), then one u64 per exception of all ones (gaps
    that do not fit even there). All little-endian, no padding.
    """

    enc: int  # IDX_GAPS8 or IDX_GAPS16
    gaps: np.ndarray | None  # the gaps (None: the native kernel writes them from ``idx``)
    esc: np.ndarray | int  # positions of the escaped gaps (native: their number)
    long: np.ndarray | None  # positions (among the escaped ones) of the gaps written as u64
    nbytes: int
    idx: np.ndarray | None = None  # the indices (native)


def _gap_size(d: np.ndarray, enc: int) -> tuple[np.ndarray, np.ndarray, int]:
    code, exc = _CODE[enc]
    esc = _nz(d >= (1 << 8 * code.itemsize) - 1)
    long = _nz(d[esc] >= (1 << 8 * exc.itemsize) - 1) if len(esc) else esc
    return esc, long, len(d) * code.itemsize + len(esc) * exc.itemsize + 8 * len(long)


def plan_gap_codes(idx: np.ndarray) -> GapCodes:
    """Choose 8- or 16-bit gap codes for ``idx`` (whichever is smaller), sizes exact."""
    k = len(idx)
    kern = _kernel()
    if kern is not None and idx.dtype == np.int64 and idx.flags.c_contiguous:
        e8, l8, e16, l16 = kern.gap_sizes(idx)
        size8 = k + 2 * e8 + 8 * l8
        size16 = 2 * k + 4 * e16 + 8 * l16
        if size8 <= 2 * k or size16 >= size8:
            return GapCodes(IDX_GAPS8, None, e8, None, size8, idx)
        return GapCodes(IDX_GAPS16, None, e16, None, size16, idx)
    d = gaps_of(idx)
    esc, long, size8 = _gap_size(d, IDX_GAPS8)
    if size8 <= 2 * k:
        return GapCodes(IDX_GAPS8, d, esc, long, size8)
    esc16, long16, size16 = _gap_size(d, IDX_GAPS16)
    if size16 < size8:
        return GapCodes(IDX_GAPS16, d, esc16, long16, size16)
    return GapCodes(IDX_GAPS8, d, esc, long, size8)


def write_gap_codes(g: GapCodes, out: np.ndarray) -> int:
    """Write ``g`` into uint8 ``out``; returns bytes written."""
    code, exc = _CODE[g.enc]
    if g.gaps is None:
        if len(out) < g.nbytes or not out.flags.c_contiguous:
            raise ValueError(f"{len(out)} bytes for a gap-code section of {g.nbytes}")
        return _kernel().gap_write(g.idx, code.itemsize, g.esc, out)
    k = len(g.gaps)
    p = k * code.itemsize
    if code.itemsize == 1:
        out[:k] = g.gaps  # truncating; escaped codes are rewritten below
        out[g.esc] = 0xFF
    else:
        tmp = g.gaps.astype(code)
        tmp[g.esc] = 0xFFFF
        out[:p] = tmp.view(np.uint8)
    if len(g.esc):
        ex = g.gaps[g.esc]
        top = (1 << 8 * exc.itemsize) - 1
        q = p + len(ex) * exc.itemsize
        out[p:q] = np.minimum(ex, top).astype(exc).view(np.uint8)
        p = q
        if len(g.long):
            q = p + 8 * len(g.long)
            out[p:q] = ex[g.long].astype("<u8").view(np.uint8)
            p = q
    return p


def read_gap_codes(buf: np.ndarray, enc: int, count: int, length: int, what: str) -> np.ndarray:
    """Indices (int64, sorted) from a gap-code index section."""
    code, exc = _CODE[enc]
    c = code.itemsize
    kern = _kernel()
    if kern is not None and count > 0 and buf.flags.c_contiguous:
        idx = kern.gap_read(buf, c, count, length)
        if idx is not None:
            return idx
        # malformed: the numpy code below says how
    if len(buf) < c * count:
        raise ProtocolError(f"{what}: index section of {len(buf)} bytes for {count} gap codes")
    if count == 0:
        if len(buf):
            raise ProtocolError(f"{what}: {len(buf)} index bytes for 0 indices")
        return np.empty(0, dtype=np.int64)
    codes = buf[: c * count].view(code)
    d = codes.astype(np.int64)
    rest = buf[c * count :]
    if len(rest):
        esc = _nz(codes == (1 << 8 * c) - 1)
        m = len(esc) * exc.itemsize
        if len(rest) < m:
            raise ProtocolError(f"{what}: {len(rest)} exception bytes for {len(esc)} escaped gaps")
        vals = rest[:m].view(exc).astype(np.int64)
        long = _nz(vals == (1 << 8 * exc.itemsize) - 1)
        if len(rest) != m + 8 * len(long):
            raise ProtocolError(f"{what}: {len(rest)} exception bytes for {len(esc)} escaped gaps")
        if len(long):
            big = rest[m:].view("<u8")
            if int(big.max()) >= max(length, 1):
                raise ProtocolError(f"{what}: gap of {int(big.max())} in a range of {length} words")
            vals[long] = big.astype(np.int64)
        d[esc] = vals
    idx = torch.cumsum(torch.from_numpy(d), 0, out=torch.from_numpy(d)).numpy()  # torch's is ~6x numpy's
    if int(idx[-1]) >= length:
        raise ProtocolError(f"{what}: index {int(idx[-1])} outside a range of {length} words")
    return idx


def bitmap_indices(buf: np.ndarray, length: int, count: int, what: str) -> np.ndarray:
    if len(buf) != (length + 7) // 8:
        raise ProtocolError(f"{what}: bitmap of {len(buf)} bytes for {length} words")
    bits = np.unpackbits(buf, count=length).view(np.bool_)  # numpy's fast nonzero path needs bool
    idx = _nz(bits)
    if len(idx) != count:
        raise ProtocolError(f"{what}: bitmap marks {len(idx)} words, entry says {count}")
    return idx


# ---------------------------------------------------------------- byte planes


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
    kern = _kernel()
    if kern is not None and x.flags.c_contiguous and dst.flags.c_contiguous:
        kern.shuffle(x, w, dst)
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
    kern = _kernel()
    if kern is not None and len(planes) >= k * w and planes.flags.c_contiguous and res.flags.c_contiguous:
        kern.unshuffle(planes, k, w, res)
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
    idx_zstd: bool = False


@dataclass(slots=True)
class EntryPlan:
    """An encoded range, not yet written: section sizes are exact."""

    idx_enc: int
    val_enc: int
    length: int
    count: int
    idx_nbytes: int
    val_nbytes: int
    gaps: GapCodes | None = None  # gap codes
    bits: np.ndarray | None = None  # bitmap (packbits output)
    idx_packed: bytes | None = None  # zstd-compressed index section
    values: np.ndarray | None = None  # raw words
    packed: bytes | None = None  # compressed XOR planes
    idx: np.ndarray | None = None  # sparse plans: local indices of the changed words (fresh array)
    new: np.ndarray | None = None  # sparse plans: their new words (fresh array, safe to keep)

    @property
    def body_nbytes(self) -> int:
        return self.idx_nbytes + self.val_nbytes

    @property
    def nbytes(self) -> int:
        """Upper bound of the written entry (header and alignment included)."""
        return self.body_nbytes + ENTRY_OVERHEAD


def max_entry_bytes(length: int, w: int) -> int:
    """Upper bound of an entry's size for ``length`` words (the dense raw form always qualifies)."""
    return ENTRY_OVERHEAD + length * w


class Encoder:
    """Encodes ranges of a tensor as entries, reusing preallocated scratch buffers.

    Not thread-safe: one per encoding thread.
    """

    def __init__(self, max_words: int, compression: str = "auto", zstd_level: int = 1) -> None:
        if compression not in COMPRESSION_MODES:
            raise ValueError(f"compression must be one of {COMPRESSION_MODES}, got {compression!r}")
        self.max_words = int(max_words)
        self.compression = compression
        # room for padding a mask with True (see _nonzero)
        self._mask = np.empty(self.max_words + self.max_words // 8 + 64, dtype=np.bool_)
        gm = min(self.max_words // 2, _BLOCK_BYTES // 8)
        self._gmask = np.empty(gm + gm // 8 + 64, dtype=np.bool_)
        self._xor = np.empty(self.max_words * 8, dtype=np.uint8)
        self._planes = np.empty(self.max_words * 8, dtype=np.uint8)
        self._idx_scratch = np.empty(self.max_words * 2 + 64, dtype=np.uint8)
        self._group: tuple[np.ndarray, np.ndarray] | None = None
        self._digest = None  # plan_delta's digest, fed block by block
        self._prepare = None  # plan_delta's per-block preparation
        self._hashed = 0
        self._prepared = 0
        self._pending: tuple[np.ndarray, np.ndarray] | None = None  # plan_delta's pending baseline changes
        self._pdone = 0
        self._base: np.ndarray | None = None
        if zstd_level <= 1:  # a small match table: XOR planes and gap codes gain from entropy coding,
            # hardly from matches; the default table's cache misses halve the speed (and the ratio is no better)
            params = zstandard.ZstdCompressionParameters.from_level(zstd_level, hash_log=9)
            self._cctx = zstandard.ZstdCompressor(compression_params=params)
        else:
            self._cctx = zstandard.ZstdCompressor(level=zstd_level)
        self.min_compress_bytes = 256
        self._kernel = _kernel()
        self._native: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None  # idx, new, xor scratch
        self._native_ptr: tuple[int, int, int] = (0, 0, 0)  # their addresses
        self._native_xor: np.ndarray | None = None  # XOR words of the last native diff

    def group_scratch(self, w: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Two reused word arrays of ``n`` words (current and baseline words of several small
        tensors side by side); they grow to the largest group asked for."""
        if self._group is None or len(self._group[0]) < n * w:
            size = max(n * w, 1 << 12)
            self._group = (np.empty(size, dtype=np.uint8), np.empty(size, dtype=np.uint8))
        dt = _WORD_NP[w]
        return self._group[0][: n * w].view(dt), self._group[1][: n * w].view(dt)

    # -- choosing -------------------------------------------------------------------

    @staticmethod
    def _dense_beats(n: int, k: int, w: int) -> bool:
        # The cheapest sparse form costs at least count*w + min(count, ceil(n/8)) bytes.
        return n * w <= k * w + min(k, (n + 7) // 8)

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
        return EntryPlan(IDX_DENSE, VAL_RAW, n, n, 0, n * cur.itemsize, values=cur)

    def plan_delta(
        self, cur: np.ndarray, base: np.ndarray, digest=None, prepare=None, pending=None
    ) -> EntryPlan | None:
        """Entry turning ``base`` into ``cur`` (same-length word arrays), or None if equal.

        The range is compared block by block. ``pending`` (sorted int64 local indices, new
        words), if given, are changes ``base`` still owes: they are written into it before
        each block is compared (all of them, whatever happens). ``prepare(lo, hi)``, if
        given, is called for each block in order before its words are read (e.g. to cast
        the trainer's words into ``cur``), and ``digest`` (an object with ``update(buffer)``)
        is fed every byte of ``cur`` in order, each block while it is still in cache.
        """
        self._digest = digest
        self._prepare = prepare
        self._hashed = 0
        self._prepared = 0
        self._pending = None
        self._pdone = 0
        if pending is not None and len(pending[0]):
            pidx, pnew = pending
            if len(pnew) != len(pidx) or pidx[0] < 0 or pidx[-1] >= len(base):
                raise ValueError(f"pending changes outside a range of {len(base)} words")
            self._pending = (pidx, pnew)
        try:
            return self._plan_delta(cur, base)
        finally:
            try:
                self._scatter_pending(base, len(cur))
            finally:
                self._prepare_to(len(cur))
                if digest is not None and self._hashed < len(cur):
                    digest.update(memoryview(cur[self._hashed :]).cast("B"))
                self._digest = self._prepare = self._pending = self._base = None

    def _scatter_pending(self, base: np.ndarray, upto: int) -> None:
        """Write the pending changes below word ``upto`` into ``base``."""
        if self._pending is None:
            return
        pidx, pnew = self._pending
        a = self._pdone
        b = len(pidx) if upto >= len(base) else int(np.searchsorted(pidx, upto))
        if b > a:
            scatter_words(base, pidx[a:b], pnew[a:b])
            self._pdone = b

    def _prepare_to(self, upto: int) -> None:
        if self._pending is not None and self._base is not None:
            self._scatter_pending(self._base, upto)
        if self._prepare is not None and upto > self._prepared:
            self._prepare(self._prepared, upto)
            self._prepared = upto

    def _plan_delta(self, cur: np.ndarray, base: np.ndarray) -> EntryPlan | None:
        n = len(cur)
        w = cur.itemsize
        self._base = base
        if n > self.max_words:
            raise ValueError(f"range of {n} words exceeds the encoder's {self.max_words}")
        self._native_xor = None
        if self._kernel is not None and cur.flags.c_contiguous and base.flags.c_contiguous:
            found = self._changed_native(cur, base)
        else:
            found = self._changed_grouped(cur, base) if w < 8 and n >= 64 else None
        if found is None:  # word by word (dense-ish changes, 8-byte words, tiny ranges)
            self._prepare_to(n)
            mask = self._mask[:n]
            np.not_equal(cur, base, out=mask)
            k = int(np.count_nonzero(mask))
            if k == 0:
                return None
            if self._dense_beats(n, k, w):
                return self._plan_dense(cur, base, k, w)
            idx = self._nonzero(self._mask, n, k)  # (boolean-mask gathers are several times slower than take)
            new, old = cur.take(idx), None
        else:
            idx, new, old = found
            k = len(idx)
            if k == 0:
                return None
            if self._dense_beats(n, k, w):
                return self._plan_dense(cur, base, k, w)
            mask = None
        if k >= (n + 7) // 8:  # gap codes need >= 1 byte per index: the bitmap cannot lose
            if mask is None:
                mask = self._mask[:n]
                mask[:] = False
                mask[idx] = True
            ve, vals, packed, vn = self._values(new, w, self._xor_fn(new, old, base, idx, w))
            plan = EntryPlan(
                IDX_BITMAP, ve, n, k, (n + 7) // 8, vn, bits=np.packbits(mask), values=vals, packed=packed,
                idx=idx, new=new,
            )  # fmt: skip
            return self._cap(plan, cur)
        return self._cap(self._plan_sparse(n, w, idx, new, self._xor_fn(new, old, base, idx, w)), cur)

    def _xor_fn(self, new, old, base, idx, w):
        if self._native_xor is not None:
            x = self._native_xor
            return lambda: x

        def xor_sparse():
            x = self._xor_view(len(new), w)
            np.bitwise_xor(new, old if old is not None else base.take(idx), out=x)
            return x

        return xor_sparse

    #: the native diff gives up (the word-by-word path takes over) past this share of changed words
    native_limit = 0.4

    def _changed_native(self, cur: np.ndarray, base: np.ndarray):
        """(indices, new words, None) of the changed words in one native pass per block (the
        XOR words in ``_native_xor``); None when more than :attr:`native_limit` of them changed.

        Same blocks, preparation and hashing order as :meth:`_changed_grouped`.
        """
        kern = self._kernel
        n = len(cur)
        w = cur.itemsize
        room = int(self.native_limit * n) + kern.slack + 64
        if self._native is None or len(self._native[0]) < room or len(self._native[1]) < room * 8:
            size = max(room, int(self.native_limit * self.max_words) + kern.slack + 64)
            self._native = (
                np.empty(size, np.int64),
                np.empty(size * 8, np.uint8),
                np.empty(size * 8, np.uint8),
            )
            self._native_ptr = tuple(a.ctypes.data for a in self._native)
        sidx, snew, sxor = self._native
        pi, pn, px = self._native_ptr
        pc, pb = cur.ctypes.data, base.ctypes.data
        blk = max(64, _BLOCK_BYTES // w)
        pend = self._pending
        if pend is not None and not (
            pend[0].dtype == np.int64 and pend[1].itemsize == w
            and pend[0].flags.c_contiguous and pend[1].flags.c_contiguous
        ):  # fmt: skip
            self._scatter_pending(base, n)  # not the kernel's arrays: scattered first
            pend = None
        ppi = ppn = 0
        if pend is not None:
            ppi, ppn = pend[0].ctypes.data, pend[1].ctypes.data
        k = 0
        for b0 in range(0, n, blk):
            b1 = min(n, b0 + blk)
            if self._prepare is not None and b1 > self._prepared:
                self._prepare(self._prepared, b1)
                self._prepared = b1
            a = b = 0
            if pend is not None:  # the kernel writes the block's pending changes as it compares
                a = self._pdone
                b = len(pend[0]) if b1 >= n else int(np.searchsorted(pend[0], b1))
                self._pdone = b
            got = kern.diff(
                w, pc + b0 * w, pb + b0 * w, b1 - b0, b0, pi + 8 * k, pn + w * k, px + w * k, room - k,
                ppi + 8 * a, ppn + w * a, b - a, -b0,
            )  # fmt: skip
            if got < 0:
                return None
            k += got
            if self._digest is not None:
                self._digest.update(memoryview(cur[b0:b1]).cast("B"))
                self._hashed = b1
        dt = cur.dtype
        self._native_xor = sxor[: k * w].view(dt)
        return sidx[:k].copy(), snew[: k * w].view(dt).copy(), None

    def _plan_dense(self, cur: np.ndarray, base: np.ndarray, k: int, w: int) -> EntryPlan:
        n = len(cur)

        def xor_dense():
            x = self._xor_view(n, w)
            np.bitwise_xor(cur, base, out=x)
            return x

        ve, vals, packed, vn = self._values(cur, w, xor_dense)
        return EntryPlan(IDX_DENSE, ve, n, k, 0, vn, values=vals, packed=packed)

    @staticmethod
    def _cap(plan: EntryPlan, cur: np.ndarray) -> EntryPlan:
        """Never send more than the dense raw form."""
        n = len(cur)
        if plan.body_nbytes > n * cur.itemsize:
            return EntryPlan(IDX_DENSE, VAL_RAW, n, plan.count, 0, n * cur.itemsize, values=cur)
        return plan

    def _changed_grouped(self, cur: np.ndarray, base: np.ndarray):
        """(indices, new words, old words) of the changed words, found 8 bytes at a time.

        Comparing 64-bit groups first shrinks the array numpy's index extraction walks by
        the words per group; only the groups that differ are compared word by word. The
        range is walked in blocks that stay in the core's cache between the comparison and
        the gathers. Returns None when too many groups differ for this to pay (dense-ish
        changes).
        """
        n = len(cur)
        w = cur.itemsize
        per = 8 // w
        shift = per.bit_length() - 1
        ng = n // per
        c64 = cur[: ng * per].view(np.int64)
        b64 = base[: ng * per].view(np.int64)
        parts = []
        for g0 in range(0, ng, _BLOCK_BYTES // 8):
            g1 = min(ng, g0 + _BLOCK_BYTES // 8)
            self._prepare_to(g1 * per)
            cb, bb = c64[g0:g1], b64[g0:g1]
            m = g1 - g0
            gm = self._gmask[:m]
            np.not_equal(cb, bb, out=gm)
            kg = int(np.count_nonzero(gm))
            if kg > 0.4 * m:
                return None
            if kg == 0:
                if self._digest is not None:
                    self._digest.update(memoryview(cur[g0 * per : g1 * per]).cast("B"))
                    self._hashed = g1 * per
                continue
            gi = self._nonzero(self._gmask, m, kg)
            cw = cb.take(gi).view(cur.dtype)
            bw = bb.take(gi).view(cur.dtype)
            p = _nz(cw != bw)
            idx = gi.take(p >> shift)
            idx += g0
            idx <<= shift
            idx |= p & (per - 1)
            parts.append((idx, cw.take(p), bw.take(p)))
            if self._digest is not None:
                self._digest.update(memoryview(cur[g0 * per : g1 * per]).cast("B"))
                self._hashed = g1 * per
        tail = ng * per
        self._prepare_to(n)
        if tail < n:  # the last few words that do not fill a group
            t = _nz(cur[tail:] != base[tail:])
            if len(t):
                t += tail
                parts.append((t, cur.take(t), base.take(t)))
        if not parts:
            return np.empty(0, dtype=np.int64), cur[:0], cur[:0]
        if len(parts) == 1:
            return parts[0]
        return tuple(np.concatenate(x) for x in zip(*parts))

    @staticmethod
    def _nonzero(mask: np.ndarray, n: int, k: int) -> np.ndarray:
        """Indices of the ``k`` True entries of ``mask[:n]`` (``mask`` has room past ``n``).

        numpy's nonzero switches from a branchy loop to a branch-free one at roughly 10 %
        density; in between (about 2-10 %) the branchy loop mispredicts on every hit and
        runs up to 2.5x slower. Padding the mask with True past ``n`` lifts the density
        over that switch; the padding's indices come last and are dropped. Correct for
        any numpy, faster for those with that heuristic.
        """
        if 0.02 * n < k < 0.1 * n and n >= 4096:
            m = int((0.105 * n - k) / 0.895) + 1
            if m <= len(mask) - n:
                mask[n : n + m] = True
                return _nz(mask[: n + m])[:k]
        return _nz(mask[:n])

    def _plan_sparse(self, n, w, idx, new, xor_fn) -> EntryPlan:
        k = len(idx)
        gc = plan_gap_codes(idx)
        ve, vals, packed, vn = self._values(new, w, xor_fn)
        bitmap_bytes = (n + 7) // 8
        if gc.nbytes <= bitmap_bytes:
            plan = EntryPlan(
                gc.enc, ve, n, k, gc.nbytes, vn, gaps=gc, values=vals, packed=packed, idx=idx, new=new
            )
            # gap codes carry about log2(e * n / k) bits of information in 8 or more: compressing
            # them pays only when the changes are dense enough (mean gap below ~40 words)
            if (
                self.compression != "off"
                and self.compress_indices
                and gc.nbytes >= _MIN_INDEX_ZSTD
                and 40 * k > n
            ):
                self._pack_indices(plan)
            return plan
        mask = self._mask[:n]
        mask[:] = False
        mask[idx] = True
        return EntryPlan(
            IDX_BITMAP, ve, n, k, bitmap_bytes, vn, bits=np.packbits(mask), values=vals, packed=packed, idx=idx,
            new=new,
        )  # fmt: skip

    #: compress gap-code index sections with zstd when that makes them smaller
    compress_indices: bool = True

    def _pack_indices(self, plan: EntryPlan) -> None:
        raw = self._idx_scratch
        m = write_gap_codes(plan.gaps, raw)
        packed = self._cctx.compress(raw[:m])
        if len(packed) < 0.9 * m:
            plan.idx_packed = packed
            plan.idx_nbytes = len(packed)

    # -- any device (torch) ----------------------------------------------------------

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
        plan = self._plan_sparse(n, w, idx_h, new_h, lambda: np.bitwise_xor(new_h, base[idx_t].cpu().numpy()))
        if plan.body_nbytes > n * w:
            return EntryPlan(IDX_DENSE, VAL_RAW, n, k, 0, n * w, values=cur.cpu().numpy())
        return plan

    # -- writing ---------------------------------------------------------------------

    @staticmethod
    def write(plan: EntryPlan, tensor_id: int, start: int, w: int, out: np.ndarray, pos: int) -> int:
        """Write ``plan`` as an entry into uint8 array ``out`` at ``pos`` (an offset from the
        start of the bucket payload); returns the next position."""
        flags = (
            plan.idx_enc | (plan.val_enc << 2) | (_LOG2[w] << 4) | (_FLAG_IDX_ZSTD if plan.idx_packed else 0)
        )
        hdr = bytearray((flags,))
        for x in (tensor_id, start, plan.length, plan.count, plan.idx_nbytes, plan.val_nbytes):
            leb128_put(hdr, x)
        p = pos + len(hdr)
        q = p + plan.idx_nbytes
        q += -q % w
        end = q + plan.val_nbytes
        if end > len(out):
            raise ValueError(f"entry of {end - pos} bytes does not fit ({len(out) - pos} left)")
        out[pos:p] = np.frombuffer(hdr, dtype=np.uint8)
        if plan.idx_packed is not None:
            out[p : p + plan.idx_nbytes] = np.frombuffer(plan.idx_packed, dtype=np.uint8)
        elif plan.gaps is not None:
            write_gap_codes(plan.gaps, out[p : p + plan.idx_nbytes])
        elif plan.idx_enc == IDX_BITMAP:
            out[p : p + plan.idx_nbytes] = plan.bits
        if q > p + plan.idx_nbytes:
            out[p + plan.idx_nbytes : q] = 0
        if plan.val_enc == VAL_RAW:
            out[q:end] = plan.values.view(np.uint8)
        else:
            out[q:end] = np.frombuffer(plan.packed, dtype=np.uint8)
        return end


@dataclass(slots=True)
class DecodedEntry:
    header: EntryHeader
    idx: np.ndarray | None  # local word indices (None: dense, every word of the range)
    values: np.ndarray  # words (raw new bits, or XOR with the current bits)
    xor: bool


def read_entry_header(buf: np.ndarray, pos: int, end: int, what: str) -> tuple[EntryHeader, int]:
    """Parse the entry header at ``pos``; returns it and the position of its index section."""
    if pos >= end:
        raise ProtocolError(f"{what}: truncated entry header at byte {pos}")
    raw = buf[pos : min(end, pos + ENTRY_OVERHEAD)].tobytes()  # bytes index faster than numpy scalars
    flags = raw[0]
    ie, ve, wl = flags & 3, (flags >> 2) & 3, (flags >> 4) & 3
    if ve not in VAL_NAMES or flags & 0x80:
        raise ProtocolError(f"{what}: unknown entry encoding (flags 0x{flags:02x}) at byte {pos}")
    p = 1
    fields = []
    for _ in range(6):
        x, p = leb128_get(raw, p, len(raw), what)
        fields.append(x)
    tid, start, length, count, inb, vnb = fields
    return EntryHeader(tid, ie, ve, wl, start, length, count, inb, vnb, bool(flags & _FLAG_IDX_ZSTD)), pos + p


class Decoder:
    """Decodes entries (receiver side)."""

    def __init__(self) -> None:
        self._dctx = zstandard.ZstdDecompressor()

    def _unzstd(self, buf: np.ndarray, limit: int, what: str) -> np.ndarray:
        try:
            raw = self._dctx.decompress(buf, max_output_size=max(limit, 1))
        except zstandard.ZstdError as e:
            raise ProtocolError(f"{what}: zstd block does not decompress ({e})") from None
        return np.frombuffer(raw, dtype=np.uint8)

    def decode(self, h: EntryHeader, idx_buf: np.ndarray, val_buf: np.ndarray, what: str) -> DecodedEntry:
        w = 1 << h.word_log2
        wdt = _WORD_NP[w]
        if h.count > h.length:
            raise ProtocolError(f"{what}: {h.count} changed words in a range of {h.length}")
        if h.idx_zstd:
            if h.idx_enc not in (IDX_GAPS8, IDX_GAPS16):
                raise ProtocolError(f"{what}: compressed {IDX_NAMES[h.idx_enc]} index section")
            idx_buf = self._unzstd(idx_buf, h.count * 12, f"{what} index section")
        if h.idx_enc == IDX_DENSE:
            if len(idx_buf):
                raise ProtocolError(f"{what}: dense entry with {len(idx_buf)} index bytes")
            idx = None
            m = h.length
        elif h.idx_enc == IDX_BITMAP:
            idx = bitmap_indices(idx_buf, h.length, h.count, what)
            m = h.count
        else:
            idx = read_gap_codes(idx_buf, h.idx_enc, h.count, h.length, what)
            m = h.count
        if h.val_enc == VAL_RAW:
            if len(val_buf) != m * w:
                raise ProtocolError(f"{what}: {len(val_buf)} value bytes for {m} words of {w} bytes")
            values = val_buf.view(wdt)
        else:
            planes = self._unzstd(val_buf, m * w, f"{what} value section")
            if len(planes) != m * w:
                raise ProtocolError(f"{what}: zstd value block holds {len(planes)} bytes, expected {m * w}")
            values = unshuffle(planes, w, m).view(wdt)
        return DecodedEntry(h, idx, values, h.val_enc == VAL_XOR_ZSTD)

    def entries(self, payload: np.ndarray, count: int, what: str):
        """Iterate the ``count`` entries of a bucket payload (uint8 array), decoded."""
        pos = 0
        n = len(payload)
        for i in range(count):
            wh = f"{what} entry {i}"
            h, p = read_entry_header(payload, pos, n, wh)
            w = 1 << h.word_log2
            q = p + h.idx_nbytes
            q += -q % w
            end = q + h.val_nbytes
            if end > n:
                raise ProtocolError(f"{wh}: {end - pos} bytes at {pos} overrun the bucket ({n} bytes)")
            yield self.decode(h, payload[p : p + h.idx_nbytes], payload[q:end], wh)
            pos = end
        if pos != n:
            raise ProtocolError(f"{what}: {n - pos} trailing bytes after {count} entries")


def apply_np(
    dst: np.ndarray,
    e: DecodedEntry,
    lo: int = 0,
    hi: int | None = None,
    dst_off: int = 0,
    exact: bool = False,
) -> bool:
    """Apply the part ``[lo, hi)`` (entry-local words) of ``e`` to word array ``dst`` at ``dst_off``.

    ``dst[dst_off + (i - lo)]`` receives local word ``i``. Returns whether that part
    may hold a change (with ``exact``, a dense part is compared first, so the answer
    is exact; otherwise a dense part always says yes).
    """
    if hi is None:
        hi = e.header.length
    if e.idx is None:
        src = e.values[lo:hi]
        view = dst[dst_off : dst_off + (hi - lo)]
        changed = hi > lo
        if e.xor:
            if exact:
                changed = bool(src.any())
            np.bitwise_xor(view, src, out=view)
        else:
            if exact:
                changed = not np.array_equal(view, src)
            view[...] = src
        return changed
    a, b = (0, len(e.idx)) if (lo == 0 and hi >= e.header.length) else np.searchsorted(e.idx, [lo, hi])
    if a == b:
        return False
    ii = e.idx[a:b]
    kern = _kernel()
    if kern is not None and kern.scatter(dst, ii, e.values[a:b], dst_off - lo, e.xor):
        return True
    if lo != dst_off:
        ii = ii + (dst_off - lo)
    if e.xor:
        dst[ii] ^= e.values[a:b]
    else:
        dst[ii] = e.values[a:b]
    return True


def apply_torch(
    dst: torch.Tensor,
    e: DecodedEntry,
    lo: int = 0,
    hi: int | None = None,
    dst_off: int = 0,
    exact: bool = False,
) -> bool:
    """:func:`apply_np` for an integer word tensor on any device (e.g. CUDA)."""
    if hi is None:
        hi = e.header.length
    dev = dst.device
    if e.idx is None:
        src = torch.from_numpy(np.require(e.values[lo:hi], requirements=["C", "W", "A"])).to(dev)
        view = dst[dst_off : dst_off + (hi - lo)]
        changed = hi > lo
        if e.xor:
            if exact:
                changed = bool(src.any())
            view.bitwise_xor_(src)
        else:
            if exact:
                changed = not torch.equal(view, src)
            view.copy_(src)
        return changed
    a, b = (0, len(e.idx)) if (lo == 0 and hi >= e.header.length) else np.searchsorted(e.idx, [lo, hi])
    if a == b:
        return False
    ii = torch.from_numpy(e.idx[a:b] + (dst_off - lo)).to(dev)
    vals = torch.from_numpy(np.require(e.values[a:b], requirements=["C", "W", "A"])).to(dev)
    if e.xor:
        dst.index_put_((ii,), dst.index_select(0, ii).bitwise_xor_(vals))
    else:
        dst.index_put_((ii,), vals)
    return True
