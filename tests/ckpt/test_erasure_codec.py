"""Reed-Solomon codec: field, generator, XOR schedules, every backend against a reedsolo oracle."""

from __future__ import annotations

import itertools
import threading

import numpy as np
import pytest
import reedsolo
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stalwart.ckpt.erasure import ErasureError, ReedSolomon, available_backends, gf, schedule
from stalwart.ckpt.erasure.backends import isal
from stalwart.ckpt.erasure.backends.numpy_backend import NumpyBackend
from stalwart.ckpt.erasure.backends.torch_backend import TorchBackend
from stalwart.errors import StalwartError

HAS_ISAL = isal.available()
needs_isal = pytest.mark.skipif(
    not HAS_ISAL, reason="ISA-L unavailable (libisal.so.2, Debian package libisal2)"
)
BACKENDS = available_backends()
PROPERTY = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# -- an oracle that shares no code with the codec: reedsolo's own tables -----------------


def _reedsolo_tables() -> None:
    reedsolo.init_tables(prim=0x11D, generator=2, c_exp=8)


def oracle_parity(k: int, m: int, data: list[bytes]) -> list[bytes]:
    """Parity by the definition: C[i][j] = 1 / ((k + i) ^ j), byte-wise products with reedsolo."""
    _reedsolo_tables()
    n = len(data[0]) if data else 0
    out = []
    for i in range(m):
        coef = [reedsolo.gf_inverse((k + i) ^ j) for j in range(k)]
        row = bytearray(n)
        for j in range(k):
            c, d = coef[j], data[j]
            for t in range(n):
                row[t] ^= reedsolo.gf_mul(c, d[t])
        out.append(bytes(row))
    return out


def as_bytes_list(shards) -> list[bytes]:
    out = []
    for s in shards:
        if isinstance(s, torch.Tensor):
            s = s.cpu().numpy()
        out.append(bytes(np.asarray(s, dtype=np.uint8)))
    return out


def random_shards(rng: np.random.Generator, count: int, n: int) -> list[np.ndarray]:
    return [rng.integers(0, 256, n, dtype=np.uint8) for _ in range(count)]


def run_backend(rs: ReedSolomon, shards: list[np.ndarray]) -> list:
    if rs.backend == "torch":
        return rs.encode([torch.from_numpy(s) for s in shards])
    return rs.encode(shards)


# -- the field and the generator ------------------------------------------------------


def test_field_matches_reedsolo():
    _reedsolo_tables()
    mt = gf.mul_table()
    expect = np.array([[reedsolo.gf_mul(a, b) for b in range(256)] for a in range(256)], dtype=np.uint8)
    assert np.array_equal(mt, expect)
    for a in range(1, 256):
        assert gf.gf_inv(a) == reedsolo.gf_inverse(a)
        assert gf.gf_mul(a, gf.gf_inv(a)) == 1
    with pytest.raises(ZeroDivisionError):
        gf.gf_inv(0)


def test_cauchy_matrix_known_values():
    # machine.md section 7.5: the RS(4, 2) Cauchy rows measured with ISA-L
    assert gf.cauchy_matrix(4, 2).tolist() == [[71, 167, 122, 186], [167, 71, 186, 122]]
    g = gf.generator_matrix(3, 2)
    assert np.array_equal(g[:3], np.eye(3, dtype=np.uint8))


@needs_isal
@pytest.mark.parametrize("k,m", [(1, 1), (4, 2), (8, 2), (10, 4), (16, 4), (12, 20), (200, 56)])
def test_generator_is_isal_cauchy1(k, m):
    assert np.array_equal(gf.generator_matrix(k, m), isal.cauchy1_matrix(k, m))


@pytest.mark.parametrize("k,m", [(4, 2), (6, 3), (10, 4)])
def test_every_k_of_n_rows_invertible(k, m):
    g = gf.generator_matrix(k, m)
    eye = np.eye(k, dtype=np.uint8)
    for rows in itertools.combinations(range(k + m), k):
        sub = g[list(rows)]
        assert np.array_equal(gf.mat_mul(sub, gf.mat_inv(sub)), eye)


def test_mds_random_subsets_wide_code():
    rng = np.random.default_rng(5)
    k, m = 20, 12
    g = gf.generator_matrix(k, m)
    for _ in range(30):
        rows = sorted(rng.choice(k + m, size=k, replace=False).tolist())
        sub = g[rows]
        assert np.array_equal(gf.mat_mul(sub, gf.mat_inv(sub)), np.eye(k, dtype=np.uint8))


def test_mat_inv_rejects_singular():
    with pytest.raises(ValueError, match="singular"):
        gf.mat_inv(np.array([[1, 2], [1, 2]], dtype=np.uint8))
    with pytest.raises(ValueError):
        gf.cauchy_matrix(200, 57)


@given(c=st.integers(0, 255), x=st.integers(0, 255))
@settings(max_examples=200, deadline=None)
def test_bit_matrix_is_multiplication(c, x):
    bits = np.array([(x >> b) & 1 for b in range(8)])
    prod = (gf.bit_matrix(c).astype(int) @ bits) % 2
    assert sum(int(v) << r for r, v in enumerate(prod)) == gf.gf_mul(c, x)


# -- XOR schedules --------------------------------------------------------------------


@given(data=st.data())
@settings(max_examples=40, deadline=None)
def test_xor_program_computes_the_matrix(data):
    rows = data.draw(st.integers(1, 24))
    cols = data.draw(st.integers(1, 40))
    seed = data.draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    bits = (rng.random((rows, cols)) < data.draw(st.floats(0.05, 0.95))).astype(np.uint8)
    prog = schedule.compile_xor_program(bits)
    x = rng.integers(0, 2**62, size=(cols, 3), dtype=np.int64)
    expect = np.stack(
        [np.bitwise_xor.reduce(x[r.astype(bool)], axis=0) if r.any() else np.zeros(3, np.int64) for r in bits]
    )
    assert np.array_equal(prog.run_bits(x), expect)
    assert prog.xor_count <= max(0, int(bits.sum()) - rows) + rows  # never worse than naive (+ zero rows)


def test_xor_schedule_saves_work():
    bits = gf.expand_bit_matrix(gf.cauchy_matrix(4, 2))
    prog = schedule.compile_xor_program(bits)
    naive = int(bits.sum()) - bits.shape[0]
    assert prog.xor_count < 0.55 * naive


# -- every backend against the oracle ------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@given(
    k=st.integers(1, 16),
    m=st.integers(1, 4),
    n=st.one_of(st.integers(0, 300), st.sampled_from([1, 63, 64, 65, 127, 129, 191])),
    seed=st.integers(0, 2**32 - 1),
    data=st.data(),
)
@PROPERTY
def test_backend_matches_oracle_and_decodes(backend, k, m, n, seed, data):
    rng = np.random.default_rng(seed)
    shards = random_shards(rng, k, n)
    rs = ReedSolomon(k, m, backend=backend)
    parity = run_backend(rs, shards)
    assert as_bytes_list(parity) == oracle_parity(k, m, as_bytes_list(shards))

    lost = data.draw(st.sets(st.integers(0, k + m - 1), max_size=m))
    everything = list(shards) + [np.asarray(p.cpu() if isinstance(p, torch.Tensor) else p) for p in parity]
    given_shards = [None if i in lost else everything[i] for i in range(k + m)]
    if backend == "torch":
        given_shards = [None if s is None else torch.from_numpy(np.array(s)) for s in given_shards]
    rebuilt = rs.decode(given_shards)
    assert as_bytes_list(rebuilt) == as_bytes_list(shards)


@pytest.mark.parametrize("backend", BACKENDS)
@given(
    k=st.integers(1, 16),
    m=st.integers(1, 4),
    n=st.sampled_from([1, 64, 129, 300]),
    seed=st.integers(0, 2**32 - 1),
    data=st.data(),
)
@PROPERTY
def test_encode_some_parity_from_some_data(backend, k, m, n, seed, data):
    """``which`` picks parity rows; a ``None`` data shard is zeros and is skipped: the bytes
    equal the oracle's for the zero-filled input."""
    rng = np.random.default_rng(seed)
    shards = random_shards(rng, k, n)
    absent = data.draw(st.sets(st.integers(0, k - 1), max_size=k - 1))
    which = data.draw(st.lists(st.integers(0, m - 1), min_size=1, max_size=m, unique=True))
    filled = [np.zeros(n, np.uint8) if j in absent else s for j, s in enumerate(shards)]
    given_shards = [None if j in absent else s for j, s in enumerate(shards)]
    if backend == "torch":
        given_shards = [None if s is None else torch.from_numpy(s) for s in given_shards]
    rs = ReedSolomon(k, m, backend=backend)
    out = [np.full(n, 0xA5, np.uint8) for _ in which]
    got = rs.encode(given_shards, out=[torch.from_numpy(o) for o in out] if backend == "torch" else out, which=which)
    want = oracle_parity(k, m, as_bytes_list(filled))
    assert as_bytes_list(got) == [want[u] for u in which]
    assert as_bytes_list(out) == [want[u] for u in which]


@pytest.mark.parametrize(
    "k,m,n",
    [(4, 2, (1 << 20) + 13), (8, 2, 3 * (1 << 20) // 2 + 64), (10, 4, (1 << 20) + 1), (16, 4, 700_001)],
)
def test_backends_agree_on_large_inputs(k, m, n):
    rng = np.random.default_rng(k * 1000 + m)
    shards = random_shards(rng, k, n)
    results = {}
    for be in BACKENDS:
        results[be] = as_bytes_list(run_backend(ReedSolomon(k, m, backend=be), shards))
    first = results[BACKENDS[0]]
    for be, res in results.items():
        assert res == first, f"{be} differs from {BACKENDS[0]}"
    # the oracle on a slice: byte-wise code, so any window of the shards is itself a codeword
    window = slice(n - 97, n)
    assert [p[window] for p in first] == oracle_parity(k, m, [bytes(s[window]) for s in shards])
    # lose m shards (data first: the most work) and rebuild with every backend
    lost = set(range(m))
    everything = [*shards, *(np.frombuffer(p, dtype=np.uint8) for p in first)]
    for be in BACKENDS:
        rs = ReedSolomon(k, m, backend=be)
        given_shards = [None if i in lost else everything[i] for i in range(k + m)]
        if be == "torch":
            given_shards = [None if s is None else torch.from_numpy(np.array(s)) for s in given_shards]
        assert as_bytes_list(rs.decode(given_shards)) == as_bytes_list(shards), be


@pytest.mark.parametrize("engine", ["numpy", "torch"])
@pytest.mark.parametrize("n", [64 * 64 * 3, 64 * 64 * 3 + 64 * 5, 64 * 64 * 3 + 64 * 5 + 33])
def test_chunk_boundaries_with_small_planes(engine, n):
    # many chunks, a short last chunk and a < 64-byte tail, with 64-word planes
    rng = np.random.default_rng(n)
    k, m = 5, 3
    shards = random_shards(rng, k, n)
    matrix = gf.cauchy_matrix(k, m)
    outs = [np.zeros(n, dtype=np.uint8) for _ in range(m)]
    if engine == "numpy":
        NumpyBackend(plane_words=64, budget_bytes=1 << 20).apply(matrix, shards, outs, n)
    else:
        be = TorchBackend()
        be.engine(torch.device("cpu")).plane_words = 64
        be.apply(matrix, [torch.from_numpy(s) for s in shards], [torch.from_numpy(o) for o in outs], n)
    ref = as_bytes_list(ReedSolomon(k, m, backend="numpy").encode(shards))
    assert as_bytes_list(outs) == ref
    assert [o[-40:].tobytes() for o in outs] == oracle_parity(k, m, [s[-40:].tobytes() for s in shards])


@pytest.mark.parametrize("backend", BACKENDS)
def test_unaligned_buffers(backend):
    rng = np.random.default_rng(7)
    k, m, n = 3, 2, 5000
    base = random_shards(rng, k, n)
    expect = as_bytes_list(ReedSolomon(k, m, backend="numpy").encode(base))
    rs = ReedSolomon(k, m, backend=backend)
    for shift in range(1, 8):
        holders = [bytearray(n + 8) for _ in range(k)]
        views = []
        for h, b in zip(holders, base):
            h[shift : shift + n] = b.tobytes()
            views.append(memoryview(h)[shift : shift + n])
        out_holders = [bytearray(n + 8) for _ in range(m)]
        outs = [memoryview(h)[8 - shift : 8 - shift + n] for h in out_holders]
        if backend == "torch":
            views = [torch.frombuffer(v, dtype=torch.uint8) for v in views]
            outs = [torch.frombuffer(o, dtype=torch.uint8) for o in outs]
        rs.encode(views, out=outs)
        assert [bytes(h[8 - shift : 8 - shift + n]) for h in out_holders] == expect


# -- buffers, outputs, zero-copy ------------------------------------------------------


def test_accepts_every_buffer_kind():
    rng = np.random.default_rng(3)
    k, m, n = 4, 2, 1024
    raw = random_shards(rng, k, n)
    expect = oracle_parity(k, m, [r.tobytes() for r in raw])
    kinds = [
        [r.tobytes() for r in raw],
        [bytearray(r.tobytes()) for r in raw],
        [memoryview(r.tobytes()) for r in raw],
        [r.view(np.float32) for r in raw],
        [r.reshape(32, 32) for r in raw],
        [torch.from_numpy(r.copy()).view(torch.float32) for r in raw],
        [torch.from_numpy(r.copy()).view(torch.bfloat16).requires_grad_(False) for r in raw],
        [memoryview(r.view(np.float64)) for r in raw],
    ]
    for shards in kinds:
        for be in BACKENDS:
            parity = ReedSolomon(k, m, backend=be).encode(shards)
            assert as_bytes_list(parity) == expect
            if isinstance(shards[0], torch.Tensor):
                assert all(isinstance(p, torch.Tensor) and p.dtype == torch.uint8 for p in parity)
            else:
                assert all(isinstance(p, np.ndarray) and p.dtype == np.uint8 for p in parity)


def test_tensor_requiring_grad_is_read_not_copied():
    x = [torch.randn(64, requires_grad=True) for _ in range(2)]
    parity = ReedSolomon(2, 1).encode(x)
    assert as_bytes_list(parity) == oracle_parity(
        2, 1, as_bytes_list([t.detach().view(torch.uint8) for t in x])
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_and_zero_copy(backend):
    rng = np.random.default_rng(11)
    k, m, n = 4, 2, 4096 + 7
    data = random_shards(rng, k, n)
    rs = ReedSolomon(k, m, backend=backend)
    out = [np.zeros(n, dtype=np.uint8) for _ in range(m)]
    parity = rs.encode(data, out=out)
    assert all(np.shares_memory(p, o) for p, o in zip(parity, out))
    assert as_bytes_list(out) == oracle_parity(k, m, as_bytes_list(data))

    dest = np.zeros(n, dtype=np.uint8)
    rebuilt = rs.decode([data[0], None, data[2], data[3], None, out[1]], out=[None, dest, None, None])
    assert np.shares_memory(rebuilt[1], dest) and np.array_equal(dest, data[1])
    for j in (0, 2, 3):
        assert np.shares_memory(rebuilt[j], data[j])


def test_decode_without_lost_data_computes_nothing():
    rng = np.random.default_rng(2)
    data = random_shards(rng, 3, 100)
    rs = ReedSolomon(3, 2)
    rebuilt = rs.decode([*data, None, None])
    assert all(np.shares_memory(a, b) for a, b in zip(rebuilt, data))


def test_empty_shards():
    rs = ReedSolomon(3, 2)
    parity = rs.encode([b"", b"", b""])
    assert [len(p) for p in parity] == [0, 0]
    assert [len(d) for d in rs.decode([None, b"", b"", b"", None])] == [0, 0, 0]


def test_concurrent_use_from_threads():
    rs = ReedSolomon(6, 3, backend="numpy")
    rng = np.random.default_rng(9)
    jobs = [random_shards(rng, 6, 70_000 + 111 * i) for i in range(6)]
    expect = [as_bytes_list(rs.encode(j)) for j in jobs]
    got: dict[int, list[bytes]] = {}

    def work(i: int) -> None:
        for _ in range(3):
            got[i] = as_bytes_list(rs.encode(jobs[i]))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [got[i] for i in range(len(jobs))] == expect


# -- errors ------------------------------------------------------------------------------


def test_too_many_lost_is_a_clear_error():
    rs = ReedSolomon(4, 2)
    d = [b"abcd"] * 4
    p = rs.encode(d)
    with pytest.raises(
        ErasureError, match=r"3 shards are missing \(data shard 0, data shard 2, parity shard 1 \(shard 5\)\)"
    ):
        rs.decode([None, d[1], None, d[3], p[0], None])
    assert issubclass(ErasureError, StalwartError)


def _readonly(a: np.ndarray) -> np.ndarray:
    a.flags.writeable = False
    return a


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda rs: rs.encode([b"ab", b"abc", b"ab", b"ab"]), r"equal lengths.*data shard 1=3"),
        (lambda rs: rs.encode([b"ab"] * 3), "needs 4 data shards"),
        (lambda rs: rs.decode([b"ab"] * 5), "needs 6 shards"),
        (lambda rs: rs.decode([b"ab", b"ab", b"ab", None, b"abc", None]), "equal lengths"),
        (lambda rs: rs.encode([np.zeros((4, 4), np.uint8)[:, :2]] * 4), "non-contiguous numpy"),
        (lambda rs: rs.encode([torch.zeros(4, 4).t()] * 4), "non-contiguous tensor"),
        (lambda rs: rs.encode([object()] * 4), "not a buffer"),
        (lambda rs: rs.encode([b"ab"] * 4, out=[b"xx", b"yy"]), "read-only"),
        (lambda rs: rs.encode([b"ab"] * 4, out=[bytearray(3), bytearray(3)]), "holds 3 bytes"),
        (lambda rs: rs.encode([b"ab"] * 4, out=[bytearray(2)]), "needs 2 parity buffers"),
        (
            lambda rs: rs.encode([b"ab"] * 4, out=[np.zeros(2, np.uint8), _readonly(np.zeros(2, np.uint8))]),
            "read-only numpy",
        ),
        (lambda rs: rs.decode([None, b"ab", b"ab", b"ab", b"ab", b"ab"], out=[None]), "needs 4 entries"),
        (lambda rs: rs.encode([b"ab"] * 4, which=[2]), r"distinct parity indices in 0\.\.1"),
        (lambda rs: rs.encode([b"ab"] * 4, which=[0, 0]), "distinct parity indices"),
        (lambda rs: rs.encode([b"ab"] * 4, out=[bytearray(2)] * 2, which=[1]), "needs 1 parity buffers"),
        (lambda rs: rs.encode([None] * 4), "at least one data shard"),
    ],
)
def test_bad_calls(call, match):
    with pytest.raises(ErasureError, match=match):
        call(ReedSolomon(4, 2))


@pytest.mark.parametrize("k,m", [(0, 2), (4, 0), (250, 7), (2.0, 1), (True, 1)])
def test_bad_parameters(k, m):
    with pytest.raises(ErasureError, match="RS"):
        ReedSolomon(k, m)


def test_unknown_backend():
    with pytest.raises(ErasureError, match="unknown erasure backend"):
        ReedSolomon(4, 2, backend="jerasure")


def test_isal_absent(monkeypatch):
    monkeypatch.setattr(isal, "_lib", None)
    monkeypatch.setattr(isal, "_tried", True)
    assert "isal" not in available_backends()
    with pytest.raises(ErasureError, match="libisal"):
        ReedSolomon(4, 2, backend="isal")
    rs = ReedSolomon(4, 2)
    assert rs.resolve_backend([b"ab"] * 4) == "numpy"
    assert as_bytes_list(rs.encode([b"ab"] * 4)) == oracle_parity(4, 2, [b"ab"] * 4)


def test_isal_disabled_by_environment(monkeypatch):
    monkeypatch.setattr(isal, "_lib", None)
    monkeypatch.setattr(isal, "_tried", False)
    monkeypatch.setenv("STALWART_DISABLE_ISAL", "1")
    assert not isal.available()


@needs_isal
def test_auto_prefers_isal_on_host():
    assert ReedSolomon(4, 2).resolve_backend([np.zeros(8, np.uint8)] * 4) == "isal"
    with pytest.raises(ErasureError, match="host memory"):
        ReedSolomon(4, 2, backend="isal")._resolve(torch.device("cuda", 0))


# -- CUDA --------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensors_match_host_bytes():
    rng = np.random.default_rng(13)
    for k, m, n in [(4, 2, (8 << 20) + 5), (10, 4, 1000), (16, 4, 3 << 20)]:
        host = random_shards(rng, k, n)
        expect = as_bytes_list(ReedSolomon(k, m, backend="numpy").encode(host))
        dev = [torch.from_numpy(h).cuda() for h in host]
        rs = ReedSolomon(k, m)
        assert rs.resolve_backend(dev) == "torch"
        parity = rs.encode(dev)
        assert all(p.is_cuda for p in parity)
        assert as_bytes_list(parity) == expect
        shards = [None if i < m else s for i, s in enumerate(dev + parity)]
        assert as_bytes_list(rs.decode(shards)) == as_bytes_list(host)
        with pytest.raises(ErasureError, match="one device"):
            rs.encode([dev[0].cpu(), *dev[1:]])
        with pytest.raises(ErasureError, match="host memory"):
            ReedSolomon(k, m, backend="numpy").encode(dev)
