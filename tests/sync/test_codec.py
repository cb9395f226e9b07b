"""Property tests of the delta codec: decode(encode(delta)) applied to the baseline == new, bit for bit."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stalwart.sync import codec, native
from stalwart.sync.bucket import BucketWriter
from stalwart.sync.codec import (
    ENTRY_OVERHEAD,
    IDX_BITMAP,
    IDX_DENSE,
    IDX_GAPS8,
    IDX_GAPS16,
    VAL_RAW,
    VAL_XOR_ZSTD,
    Decoder,
    Encoder,
    apply_np,
    apply_torch,
    leb128_get,
    leb128_put,
    max_entry_bytes,
    plan_gap_codes,
    read_entry_header,
    read_gap_codes,
    shuffle_into,
    unshuffle,
    word_size,
    words_np,
    write_gap_codes,
)
from stalwart.sync.errors import IntegrityError, ProtocolError
from stalwart.sync.wire import HEADER_SIZE, parse_header, verify_payload

DTYPES = [
    torch.bfloat16, torch.float16, torch.float32, torch.float64, torch.int8, torch.uint8, torch.int16,
    torch.int32, torch.int64, torch.bool, torch.float8_e4m3fn, torch.float8_e5m2, torch.complex64,
    torch.complex128,
]  # fmt: skip
FLOATS = [torch.bfloat16, torch.float16, torch.float32, torch.float64]
# SYNC_HYPOTHESIS_EXAMPLES=2000 for a longer hunt
SETTINGS = settings(
    max_examples=int(os.environ.get("SYNC_HYPOTHESIS_EXAMPLES", "60")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def random_tensor(dtype: torch.dtype, n: int, rng: np.random.Generator) -> torch.Tensor:
    t = torch.empty(n, dtype=dtype)
    raw = words_np(t).view(np.uint8)
    raw[:] = rng.integers(0, 256, size=raw.size, dtype=np.uint8)
    if dtype == torch.bool:  # only 0/1 are valid bools
        raw[:] &= 1
    return t


def mutate(base: torch.Tensor, density: float, rng: np.random.Generator, specials: bool) -> torch.Tensor:
    new = base.clone()
    n = new.numel()
    k = round(density * n)
    if k == 0 or n == 0:
        return new
    idx = rng.choice(n, size=k, replace=False)
    src = random_tensor(base.dtype, n, rng)
    new[idx] = src[idx]
    if specials and base.dtype in FLOATS:
        # signed zeros, NaNs with different payloads, infinities: equal by value, different in bits
        w = words_np(new)
        sub = rng.choice(n, size=min(n, 8), replace=False)
        nan = torch.tensor([float("nan"), -0.0, 0.0, float("inf")], dtype=base.dtype)
        vals = words_np(nan)
        w[sub] = vals[rng.integers(0, 4, size=len(sub))]
        w[sub[:2]] ^= 1  # NaN payload / denormal bits
    return new


def roundtrip(
    base: torch.Tensor,
    new: torch.Tensor,
    chunk: int,
    compression: str = "auto",
    use_torch: bool = False,
    encoder: Encoder | None = None,
):
    """Encode base->new in chunks into one bucket, decode, apply to a copy of base; return (result, plans)."""
    w = word_size(base.dtype)
    bw, nw = words_np(base), words_np(new)
    enc = encoder or Encoder(chunk, compression=compression)
    buf = np.zeros(
        HEADER_SIZE + sum(max_entry_bytes(min(chunk, len(bw) - s), w) for s in range(0, len(bw), chunk)) + 64,
        np.uint8,
    )
    writer = BucketWriter(buf)
    plans = []
    for s in range(0, len(bw), chunk):
        e = min(len(bw), s + chunk)
        if use_torch:
            p = enc.plan_delta_torch(torch.from_numpy(nw[s:e]), torch.from_numpy(bw[s:e]))
        else:
            p = enc.plan_delta(nw[s:e], bw[s:e])
        if p is None:
            assert np.array_equal(nw[s:e], bw[s:e])
            continue
        assert p.nbytes <= max_entry_bytes(e - s, w)  # never more than the dense form
        plans.append(p)
        writer.add(p, 7, s, w)
    nbytes = writer.finish(3, 0)
    hdr = parse_header(buf[:HEADER_SIZE])
    payload = buf[HEADER_SIZE:nbytes]
    verify_payload(hdr, payload, "bucket")
    out = base.clone()
    ow = words_np(out)
    for d in Decoder().entries(payload, hdr.count, "bucket"):
        assert d.header.tensor_id == 7
        if use_torch:
            apply_torch(torch.from_numpy(ow), d, 0, d.header.length, d.header.start)
        else:
            apply_np(ow, d, 0, d.header.length, d.header.start)
    return out, plans


def bits(t: torch.Tensor) -> bytes:
    return words_np(t).tobytes()


@SETTINGS
@given(
    dtype=st.sampled_from(DTYPES),
    n=st.integers(0, 3000),
    density=st.sampled_from([0.0, 0.0005, 0.003, 0.01, 0.05, 0.2, 0.5, 0.9, 1.0]),
    chunk=st.sampled_from([1, 7, 64, 1000, 4096]),
    compression=st.sampled_from(["auto", "always", "off"]),
    seed=st.integers(0, 2**32 - 1),
    specials=st.booleans(),
)
def test_delta_roundtrip_is_bitwise(dtype, n, density, chunk, compression, seed, specials):
    rng = np.random.default_rng(seed)
    base = random_tensor(dtype, n, rng)
    new = mutate(base, density, rng, specials)
    out, _ = roundtrip(base, new, chunk, compression)
    assert bits(out) == bits(new)


@SETTINGS
@given(
    dtype=st.sampled_from([torch.bfloat16, torch.float32, torch.int8, torch.float8_e5m2, torch.complex128]),
    n=st.integers(1, 2000),
    density=st.sampled_from([0.001, 0.02, 0.3, 1.0]),
    seed=st.integers(0, 2**32 - 1),
)
def test_torch_path_matches(dtype, n, density, seed):
    """The device (torch) diff path, run on CPU tensors, decodes to the same bits."""
    rng = np.random.default_rng(seed)
    base = random_tensor(dtype, n, rng)
    new = mutate(base, density, rng, True)
    out, _ = roundtrip(base, new, 512, "auto", use_torch=True)
    assert bits(out) == bits(new)


def test_signed_zero_and_nan_payloads_are_changes():
    base = torch.tensor([0.0, float("nan"), 1.0, -0.0] * 100, dtype=torch.bfloat16)
    new = base.clone()
    new[0] = -0.0  # == 0.0 by value
    words_np(new)[1] ^= 1  # another NaN
    out, plans = roundtrip(base, new, 4096)
    assert sum(p.count for p in plans) == 2
    assert bits(out) == bits(new)
    assert torch.signbit(out[0].float()) and out[0] == 0.0


@pytest.mark.parametrize(
    ("density", "want"),
    [(0.002, IDX_GAPS16), (0.04, IDX_GAPS8), (0.3, IDX_BITMAP), (0.8, IDX_BITMAP), (1.0, IDX_DENSE)],
)
def test_index_encoding_follows_density(density, want):
    rng = np.random.default_rng(0)
    base = (torch.randn(200_000) * 0.02).to(torch.bfloat16)
    new = base.clone()
    nw = words_np(new)
    k = int(density * len(nw))
    idx = rng.choice(len(nw), k, replace=False)
    nw[idx] += 1  # one ulp, like a small optimizer step
    enc = Encoder(1 << 20, compression="off")
    enc.compress_indices = False
    _, plans = roundtrip(base, new, 1 << 20, encoder=enc)
    assert [p.idx_enc for p in plans] == [want]
    p = plans[0]
    if want == IDX_GAPS8:  # one byte per gap below 255, exceptions rare at this density
        assert k <= p.idx_nbytes < 1.05 * k
    if want == IDX_GAPS16:
        assert 2 * k <= p.idx_nbytes < 2.05 * k
    if want == IDX_BITMAP:
        assert p.idx_nbytes == (len(nw) + 7) // 8


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
def test_dense_never_exceeds_1_02x(dtype):
    rng = np.random.default_rng(1)
    for n in (1000, 10_000, 100_000):
        base = random_tensor(dtype, n, rng)
        new = random_tensor(dtype, n, rng)  # incompressible, every word differs
        _, plans = roundtrip(base, new, 1 << 20, "auto")
        total = sum(p.nbytes for p in plans) + HEADER_SIZE
        dense = n * base.element_size()
        assert total <= dense + ENTRY_OVERHEAD + HEADER_SIZE  # fixed overhead only
        assert n < 10_000 or total <= 1.02 * dense
        assert plans[0].idx_enc == IDX_DENSE and plans[0].val_enc == VAL_RAW


def test_xor_zstd_chosen_for_small_changes():
    base = (torch.randn(100_000) * 0.02).to(torch.float32)
    new = base + 1e-7 * torch.randn(100_000)  # every element, only low mantissa bits move
    _, plans = roundtrip(base, new, 1 << 20, "auto")
    assert plans[0].idx_enc == IDX_DENSE and plans[0].val_enc == VAL_XOR_ZSTD
    assert plans[0].nbytes < 0.8 * 100_000 * 4
    _, off = roundtrip(base, new, 1 << 20, "off")
    assert off[0].val_enc == VAL_RAW


@SETTINGS
@given(
    st.one_of(
        st.lists(st.integers(0, 2**62), max_size=300), st.lists(st.integers(0, 2**14 - 1), max_size=300)
    )
)
def test_leb128_roundtrip(values):
    buf = bytearray()
    for v in values:
        leb128_put(buf, v)
    raw = bytes(buf)
    pos, got = 0, []
    for _ in values:
        v, pos = leb128_get(raw, pos, len(raw), "t")
        got.append(v)
    assert got == values and pos == len(raw)
    if values:  # the last number cut short
        last = bytearray()
        leb128_put(last, values[-1])
        with pytest.raises(ProtocolError, match="truncated"):
            leb128_get(bytes(last[:-1]), 0, len(last) - 1, "t")


@SETTINGS
@given(
    gaps=st.lists(
        st.one_of(st.integers(1, 300), st.integers(1, 70_000), st.integers(1, 2**33)), max_size=400
    ),
    first=st.integers(0, 70_000),
)
def test_gap_codes_roundtrip(gaps, first):
    idx = np.cumsum(np.array([first, *gaps], dtype=np.int64))
    g = plan_gap_codes(idx)
    out = np.zeros(g.nbytes + 3, np.uint8)
    assert write_gap_codes(g, out[1:]) == g.nbytes  # odd offset: 16-bit codes unaligned
    assert np.array_equal(read_gap_codes(out[1 : 1 + g.nbytes], g.enc, len(idx), int(idx[-1]) + 1, "t"), idx)
    with pytest.raises(ProtocolError, match=r"(outside a|in a) range"):
        read_gap_codes(out[1 : 1 + g.nbytes], g.enc, len(idx), int(idx[-1]), "t")


def _entry(flags: int, fields, body: bytes) -> np.ndarray:
    hdr = bytearray([flags])
    for x in fields:
        leb128_put(hdr, x)
    return np.frombuffer(bytes(hdr) + body, dtype=np.uint8)


def test_decoder_rejects_garbage_without_crashing():
    base = (torch.randn(5000)).to(torch.bfloat16)
    new = base.clone()
    words_np(new)[::50] += 1
    enc = Encoder(8192, compression="off")
    plan = enc.plan_delta(words_np(new), words_np(base))
    assert plan.idx_enc == IDX_GAPS8 and plan.val_enc == VAL_RAW
    buf = np.zeros(HEADER_SIZE + plan.nbytes, np.uint8)
    w = BucketWriter(buf)
    w.add(plan, 0, 0, 2)
    n = w.finish(1, 0)
    payload = buf[HEADER_SIZE:n].copy()
    h, p = read_entry_header(payload, 0, len(payload), "b")
    assert (h.tensor_id, h.start, h.length, h.count) == (0, 0, 5000, 100)
    body = payload[p:].tobytes()
    fields = [h.tensor_id, h.start, h.length, h.count, h.idx_nbytes, h.val_nbytes]
    flags = int(payload[0])
    assert list(Decoder().entries(_entry(flags, fields, body), 1, "b"))  # the rebuilt entry is valid
    # wrong counts, truncated sections, trailing bytes, unknown flags: protocol errors, not crashes
    for bad_fields in (
        [0, 0, 5000, 101, *fields[4:]],
        [0, 0, 5000, 99, *fields[4:]],
        [0, 0, 4000, *fields[3:]],
    ):
        with pytest.raises(ProtocolError):
            list(Decoder().entries(_entry(flags, bad_fields, body), 1, "b"))
    with pytest.raises(ProtocolError):
        list(Decoder().entries(payload[:-9], 1, "b"))
    with pytest.raises(ProtocolError):
        list(Decoder().entries(np.concatenate([payload, np.zeros(8, np.uint8)]), 1, "b"))
    with pytest.raises(ProtocolError, match="unknown entry encoding"):
        list(Decoder().entries(_entry(flags | 0x80, fields, body), 1, "b"))
    with pytest.raises(ProtocolError, match="truncated"):
        list(Decoder().entries(payload[:3], 1, "b"))
    bad = payload.copy()
    bad[p + 50] = 0xFF  # an escaped gap code without its exception: indices run past the range
    with pytest.raises(ProtocolError):
        list(Decoder().entries(bad, 1, "b"))
    # a flipped value bit is caught by the bucket checksum before anything is decoded
    hdr = parse_header(buf[:HEADER_SIZE])
    corrupt = payload.copy()
    corrupt[-3] ^= 1
    with pytest.raises(IntegrityError, match="checksum mismatch"):
        verify_payload(hdr, corrupt, "bucket 0")


@pytest.mark.parametrize("density", [0.021, 0.03, 0.05, 0.07, 0.099])
def test_mid_density_large_chunks_roundtrip(density):
    """Chunks large enough for the padded-nonzero and two-byte-varint fast paths."""
    rng = np.random.default_rng(int(density * 1000))
    base = random_tensor(torch.bfloat16, 300_000, rng)
    new = mutate(base, density, rng, True)
    out, plans = roundtrip(base, new, 1 << 17, "auto")
    assert bits(out) == bits(new)
    assert sum(p.count for p in plans) == int(np.count_nonzero(words_np(base) != words_np(new)))


# ---------------------------------------------------------------- native kernel vs numpy


def _written(plan, w: int) -> bytes:
    buf = np.zeros(plan.nbytes + 16, np.uint8)
    end = Encoder.write(plan, 0, 0, w, buf, 0)
    return buf[:end].tobytes()


@pytest.mark.skipif(native.kernel() is None, reason="no C compiler: the numpy path is the only one")
@SETTINGS
@given(
    dtype=st.sampled_from([torch.bfloat16, torch.float32, torch.int8, torch.float64, torch.complex128]),
    n=st.integers(1, 70000),
    density=st.sampled_from([0.0005, 0.01, 0.05, 0.2, 0.39, 0.41, 0.9]),
    compression=st.sampled_from(["auto", "off"]),
    seed=st.integers(0, 2**32 - 1),
)
def test_native_diff_writes_the_numpy_entries(dtype, n, density, compression, seed):
    """The native diff finds the same words and the entries are the same bytes as numpy's."""
    rng = np.random.default_rng(seed)
    base = random_tensor(dtype, n, rng)
    new = mutate(base, density, rng, True)
    w = word_size(dtype)
    bw, nw = words_np(base), words_np(new)
    fast = Encoder(1 << 17, compression=compression)
    slow = Encoder(1 << 17, compression=compression)
    slow._kernel = None
    for s in range(0, n, 1 << 17):
        e = min(n, s + (1 << 17))
        pf, ps = fast.plan_delta(nw[s:e], bw[s:e]), slow.plan_delta(nw[s:e], bw[s:e])
        assert (pf is None) == (ps is None)
        if pf is None:
            continue
        assert _written(pf, w) == _written(ps, w)
        if ps.idx is not None:
            assert np.array_equal(pf.idx, ps.idx) and pf.idx.dtype == np.int64
            assert np.array_equal(pf.new, ps.new)


@pytest.mark.skipif(native.kernel() is None, reason="no C compiler: the numpy path is the only one")
@pytest.mark.parametrize("w", [1, 2, 4, 8])
def test_native_scatter(w):
    k = native.kernel()
    rng = np.random.default_rng(w)
    dt = np.dtype(f"<i{w}")
    dst = rng.integers(-100, 100, 1000).astype(dt)
    idx = np.sort(rng.choice(990, 300, replace=False)).astype(np.int64)
    vals = rng.integers(-100, 100, 300).astype(dt)
    want = dst.copy()
    want[idx + 5] ^= vals
    assert k.scatter(dst, idx, vals, 5, xor=True)
    assert np.array_equal(dst, want)
    want[idx] = vals
    assert k.scatter(dst, idx, vals)
    assert np.array_equal(dst, want)
    for bad, delta in ((np.array([0, 1000], np.int64), 0), (np.array([3], np.int64), -4)):
        with pytest.raises(IndexError):
            k.scatter(dst, bad, vals[: len(bad)], delta)
        assert np.array_equal(dst, want)  # nothing written
    assert not k.scatter(dst, idx.astype(np.int32), vals)  # not the kernel's arrays: the caller's numpy


def test_numpy_fallback_roundtrip(monkeypatch):
    """Without the native kernel (no compiler), the numpy code encodes and applies the same deltas."""
    monkeypatch.setattr(codec, "_kernel", lambda: None)
    rng = np.random.default_rng(5)
    for dtype in (torch.bfloat16, torch.float32, torch.int8, torch.float64):
        for density in (0.001, 0.05, 0.5):
            base = random_tensor(dtype, 50000, rng)
            new = mutate(base, density, rng, True)
            out, _ = roundtrip(base, new, 8192)
            assert bits(out) == bits(new)


def test_native_can_be_switched_off(monkeypatch):
    monkeypatch.setenv("STALWART_SYNC_NATIVE", "0")
    native.kernel.cache_clear()
    try:
        assert native.kernel() is None
    finally:
        monkeypatch.delenv("STALWART_SYNC_NATIVE")
        native.kernel.cache_clear()


@pytest.mark.skipif(native.kernel() is None, reason="no C compiler: the numpy path is the only one")
def test_native_cast_matches_torch():
    """fp32 -> bf16 in the kernel: torch's bits for every non-NaN input (denormals, infinities,
    ties, overflow to infinity); a NaN is reported so the caller casts with torch."""
    from stalwart.sync.source import Source

    rng = np.random.default_rng(11)
    u = rng.integers(0, 2**32, 200_003, dtype=np.uint64).astype(np.uint32)
    u[:1000] &= 0x807FFFFF  # denormals
    u[1000:2000] = (u[1000:2000] & 0xFFFF0000) | 0x8000  # ties
    u[2000:2004] = [0x7F800000, 0xFF800000, 0x7F7FFFFF, 0x80000000]
    f = torch.from_numpy(u.view(np.float32).copy())
    f[np.isnan(f.numpy())] = 1.5
    want = f.to(torch.bfloat16)
    out = torch.empty_like(want)
    assert native.kernel().cast_f32_bf16(f.data_ptr(), out.data_ptr(), f.numel())
    assert torch.equal(out.view(torch.int16), want.view(torch.int16))
    for at in (-1, 7):  # in the scalar tail, in the vector loop
        g = f.clone()
        g[at] = float("nan")
        assert not native.kernel().cast_f32_bf16(g.data_ptr(), out.data_ptr(), g.numel())
    f[7] = float("nan")
    # the Source falls back to torch's cast for such a block: its words are torch's
    src = Source({"w": f}, dtype=torch.bfloat16, include_buffers=True, chunk_words=1 << 16)
    src.refresh()
    for s in range(0, f.numel(), 1 << 16):
        n = min(1 << 16, f.numel() - s)
        words, fill = src.read_blocks(0, s, n)
        fill(0, n)
        assert np.array_equal(words, words_np(f[s : s + n].to(torch.bfloat16)))
        assert np.array_equal(src.read(0, s, n)[1], words_np(f[s : s + n].to(torch.bfloat16)))


@pytest.mark.skipif(native.kernel() is None, reason="no C compiler: the numpy path is the only one")
@SETTINGS
@given(
    gaps=st.lists(
        st.one_of(st.integers(1, 300), st.integers(1, 70_000), st.integers(1, 2**33)), max_size=400
    ),
    first=st.integers(0, 70_000),
    flips=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=3),
    cut=st.integers(-3, 3),
)
def test_native_gap_codes_are_numpys(gaps, first, flips, cut):
    """Same section bytes as numpy's, same indices decoded, and the same verdict on damaged sections."""
    idx = np.cumsum(np.array([first, *gaps], dtype=np.int64))
    g = plan_gap_codes(idx)
    out = np.zeros(g.nbytes, np.uint8)
    assert write_gap_codes(g, out) == g.nbytes
    real = codec._kernel
    codec._kernel = lambda: None
    try:
        gn = plan_gap_codes(idx)
        ref = np.zeros(gn.nbytes, np.uint8)
        write_gap_codes(gn, ref)
    finally:
        codec._kernel = real
    assert (g.enc, g.nbytes) == (gn.enc, gn.nbytes) and out.tobytes() == ref.tobytes()
    bad = np.concatenate([out, np.full(max(cut, 0), 0xFF, np.uint8)])[: len(out) + min(cut, 0)]
    for pos, val in flips:
        if len(bad):
            bad[pos % len(bad)] = val
    length = int(idx[-1]) + 1

    def verdict():
        try:
            return read_gap_codes(bad, g.enc, len(idx), length, "t").tolist()
        except ProtocolError:
            return "error"

    fast = verdict()
    codec._kernel = lambda: None
    try:
        assert verdict() == fast
    finally:
        codec._kernel = real


@pytest.mark.parametrize("native_on", [True, False])
@pytest.mark.parametrize("density", [0.001, 0.05, 0.6])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.int8, torch.float64])
def test_pending_changes_are_written_before_the_compare(monkeypatch, native_on, density, dtype):
    """plan_delta(pending=...) plans against the baseline with its pending changes in, and leaves
    every one of them written (also when the native diff gives up on dense changes midway)."""
    if not native_on:
        monkeypatch.setattr(codec, "_kernel", lambda: None)
    elif native.kernel() is None:
        pytest.skip("no C compiler")
    rng = np.random.default_rng(3)
    n = 700_001
    old = random_tensor(dtype, n, rng)
    mid = mutate(old, 0.02, rng, False)  # the baseline owes old -> mid
    new = mutate(mid, density, rng, False)
    ow, mw, nw = words_np(old), words_np(mid), words_np(new)
    pidx = np.flatnonzero(ow != mw).astype(np.int64)
    pend = (pidx, mw[pidx].copy())
    base = ow.copy()
    enc = Encoder(1 << 20)
    got = enc.plan_delta(nw, base, pending=pend)
    assert np.array_equal(base, mw)
    want = Encoder(1 << 20).plan_delta(nw, mw.copy())
    w = word_size(dtype)
    assert _written(got, w) == _written(want, w)


@pytest.mark.parametrize("w", [2, 4, 8])
def test_byte_planes_native_and_numpy(monkeypatch, w):
    rng = np.random.default_rng(w)
    x = rng.integers(0, 256, 1001 * w, dtype=np.uint8).view(f"<u{w}")
    fast = shuffle_into(x, w, np.empty(1001 * w + 5, np.uint8)).copy()
    back = unshuffle(fast, w, 1001).copy()
    monkeypatch.setattr(codec, "_kernel", lambda: None)
    assert np.array_equal(fast, shuffle_into(x, w, np.empty(1001 * w, np.uint8)))
    assert np.array_equal(back, unshuffle(fast, w, 1001)) and np.array_equal(back.view(x.dtype), x)
