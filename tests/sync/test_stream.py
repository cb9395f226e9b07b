"""Update streams without a transport: chunk plans, entries spanning small tensors, the baseline.

The sender's stream (Source, Baseline, Encoder, encode_stream) and a receiver's
(Destination, apply_bucket) run in one process over several versions; after each the
receiver's tensors must equal the trainer's bit for bit, its digests must match the
sender's, and the tensors it reports as changed must be exactly the ones that changed.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from stalwart.sync.adapters import Destination, ModelAdapter
from stalwart.sync.baseline import Baseline
from stalwart.sync.codec import Decoder, Encoder, words_np
from stalwart.sync.names import Fuse, Ignore, NameMapper, Split
from stalwart.sync.schema import Schema, TensorSpec
from stalwart.sync.source import Source
from stalwart.sync.stream import StreamResult, apply_bucket, encode_stream, plan_chunks
from stalwart.sync.transports.base import SendBuffer
from stalwart.sync.wire import HEADER_SIZE, parse_header

CHUNK = 4096  # small tensors: <= 512 words, groups of <= 1024 words


def spec(name, dtype, *shape):
    return TensorSpec(name, dtype, tuple(shape))


def test_plan_chunks_groups_small_tensors_and_cuts_large_ones():
    s = Schema(
        [
            spec("big", torch.bfloat16, 3000, 3),  # 9000 words: 4096 + 4096 + 808
            spec("a", torch.bfloat16, 300),
            spec("empty", torch.float32, 0),  # no words: entries pass over it
            spec("b", torch.bfloat16, 500),
            spec("c", torch.bfloat16, 400),  # would overflow the 1024-word group: starts a new one
            spec("f", torch.float32, 10),  # another word size: another group
            spec("g", torch.float32, 10),
        ]
    )
    chunks = plan_chunks(s, CHUNK)
    got = [[(p.tensor, p.start, p.n, p.off) for p in ch.pieces] for ch in chunks]
    assert got == [
        [(0, 0, 4096, 0)],
        [(0, 4096, 4096, 0)],
        [(0, 8192, 808, 0)],
        [(1, 0, 300, 0), (3, 0, 500, 300)],
        [(4, 0, 400, 0)],
        [(5, 0, 10, 0), (6, 0, 10, 10)],
    ]
    assert [ch.word for ch in chunks] == [2, 2, 2, 2, 2, 4]
    only = plan_chunks(s, CHUNK, only=[False, True, True, False, True, True, True])  # b not sent
    assert [[p.tensor for p in ch.pieces] for ch in only] == [[1], [4], [5, 6]]
    keyed = plan_chunks(s, CHUNK, group_key=lambda i: i == 6)
    assert [[p.tensor for p in ch.pieces] for ch in keyed][-2:] == [[5], [6]]


def test_source_lists_small_tensors_last_by_word_size():
    tensors = {
        "norm": torch.zeros(8, dtype=torch.float32),
        "w1": torch.zeros(64, 64, dtype=torch.bfloat16),
        "bias": torch.zeros(8, dtype=torch.bfloat16),
        "w2": torch.zeros(64, 64, dtype=torch.float32),
        "scale": torch.zeros(4, dtype=torch.float8_e4m3fn),
    }
    src = Source(tensors, dtype=None, include_buffers=True, chunk_words=CHUNK)
    assert [t.name for t in src.refresh()] == ["w1", "w2", "scale", "bias", "norm"]


class Pair:
    """A sender's stream and one receiver's destination, driven in one process."""

    def __init__(self, trainer: dict, receiver: dict, mapper: NameMapper, compression: str = "auto"):
        self.trainer = trainer
        self.source = Source(trainer, dtype=None, include_buffers=True, chunk_words=CHUNK)
        self.schema = self.source.refresh()
        self.encoder = Encoder(CHUNK, compression=compression)
        self.chunks = plan_chunks(self.schema, CHUNK)
        self.baseline = Baseline(self.schema, [torch.device("cpu")] * len(self.schema))
        self.dest = Destination(self.schema, ModelAdapter(receiver), mapper)
        self.version = 0
        self.buf = SendBuffer(np.zeros(1 << 16, np.uint8))

    def frames(self, mode: str, res: StreamResult, cancel=None) -> list[bytes]:
        it = encode_stream(
            self.version, mode, self.schema, self.source, self.baseline, self.encoder, self.chunks,
            lambda: self.buf, lambda b: None, res, cancel, 1 << 20,
        )  # fmt: skip
        return [bytes(b.data[:n]) for b, n in it]

    def sync(self, mode: str = "delta") -> tuple[StreamResult, set[str], set[int]]:
        self.version += 1
        res = StreamResult()
        frames = self.frames(mode, res)
        touched: set[str] = set()
        changed: set[int] = set()
        self.dest.begin_digests()
        dec = Decoder()
        for f in frames:
            a = np.frombuffer(f, dtype=np.uint8)
            apply_bucket(
                parse_header(a[:HEADER_SIZE]), a[HEADER_SIZE:], self.dest, dec, "b", touched, changed
            )
        mine = self.dest.finish_digests()
        if mode == "delta":
            for i, d in enumerate(mine):
                assert d is None or d == res.digests[i], (
                    f"{self.schema[i].name} differs after v{self.version}"
                )
        self.baseline.commit(self.source, self.version, None if mode == "full" else res.dirty, CHUNK, res.log)
        return res, touched, changed


def bits(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


@pytest.mark.parametrize("compression", ["auto", "off"])
def test_entries_spanning_small_tensors_roundtrip_with_name_mapping(compression):
    g = torch.Generator().manual_seed(0)

    def rnd(dtype, *shape):
        t = torch.empty(shape, dtype=dtype)
        t.reshape(-1).view(torch.uint8).copy_(
            torch.randint(0, 256, (t.numel() * t.element_size(),), generator=g)
        )
        return t

    trainer = {
        "layer.q": rnd(torch.bfloat16, 16, 8),  # fused into qkv on the receiver (small: grouped)
        "layer.k": rnd(torch.bfloat16, 8, 8),
        "layer.v": rnd(torch.bfloat16, 8, 8),
        "emb": rnd(torch.bfloat16, 700, 12),  # large: chunks of its own
        "gate_up": rnd(torch.bfloat16, 20, 8),  # split on the receiver
        "norm": rnd(torch.float32, 33),
        "rotary.inv_freq": rnd(torch.float32, 5),  # ignored by the receiver
        "steps": rnd(torch.int64, 3),
        "scale": rnd(torch.float8_e5m2, 7),
        "empty": rnd(torch.bfloat16, 0),
        "cplx": rnd(torch.complex128, 4),
    }
    receiver = {
        "layer.qkv": torch.zeros(32, 8, dtype=torch.bfloat16),
        "emb": torch.zeros(700, 12, dtype=torch.bfloat16),
        "gate": torch.zeros(10, 8, dtype=torch.bfloat16),
        "up": torch.zeros(10, 8, dtype=torch.bfloat16),
        "norm": torch.zeros(33, dtype=torch.float32),
        "steps": torch.zeros(3, dtype=torch.int64),
        "scale": torch.zeros(7, dtype=torch.float8_e5m2),
        "empty": torch.zeros(0, dtype=torch.bfloat16),
        "cplx": torch.zeros(4, dtype=torch.complex128),
    }
    mapper = NameMapper(
        Fuse(r"^(?P<pre>.*)\.(?P<part>q|k|v)$", "{pre}.qkv", ["q", "k", "v"]),
        Split(r"^gate_up$", ["gate", "up"]),
        Ignore(r"inv_freq"),
    )
    pair = Pair(trainer, receiver, mapper, compression)
    assert any(len(ch.pieces) > 1 for ch in pair.chunks)

    def check():
        assert bits(receiver["layer.qkv"]) == bits(
            torch.cat([trainer["layer.q"], trainer["layer.k"], trainer["layer.v"]])
        )
        assert bits(torch.cat([receiver["gate"], receiver["up"]])) == bits(trainer["gate_up"])
        for n in ("emb", "norm", "steps", "scale", "cplx"):
            assert bits(receiver[n]) == bits(trainer[n]), n

    pair.sync("full")
    check()
    assert pair.dest.unmapped == [pair.schema.index["rotary.inv_freq"]]
    rng = np.random.default_rng(1)
    for step in range(6):
        moved = set()
        for n, t in trainer.items():
            if t.numel() and rng.random() < 0.5:
                w = words_np(t)
                k = max(1, int(len(w) * (0.6 if step == 3 else 0.02)))  # one dense-ish step
                idx = rng.choice(len(w), size=min(k, len(w)), replace=False)
                w[idx] ^= np.asarray(rng.integers(1, 100, size=len(idx)), dtype=w.dtype)
                moved.add(n)
        _, touched, changed = pair.sync()
        check()
        assert {pair.schema[i].name for i in changed} - {"rotary.inv_freq"} == moved - {"rotary.inv_freq"}
        want = {"layer.qkv" if n.startswith("layer.") else n for n in moved} - {"rotary.inv_freq", "gate_up"}
        halves = {"gate", "up"} if "gate_up" in moved else set()
        assert want <= touched <= want | halves
        assert bool(touched & halves) == bool(halves)  # at least the half that moved


def test_entry_running_past_the_schema_or_word_size_is_rejected():
    s = Schema([spec("a", torch.bfloat16, 10), spec("b", torch.float32, 10)])
    targets = {"a": torch.zeros(10, dtype=torch.bfloat16), "b": torch.zeros(10, dtype=torch.float32)}
    dest = Destination(s, ModelAdapter(targets), NameMapper())
    enc = Encoder(64)
    from stalwart.sync.codec import DecodedEntry, EntryHeader

    e = enc.plan_full(np.arange(15, dtype=np.int16))
    entry = DecodedEntry(EntryHeader(0, 0, 0, 1, 0, 15, 15, 0, 30), None, e.values, False)
    with pytest.raises(ValueError, match="with 2-byte words"):
        dest.apply(entry, set())
    entry = DecodedEntry(EntryHeader(1, 0, 0, 2, 5, 10, 10, 0, 40), None, np.zeros(10, np.int32), False)
    with pytest.raises(IndexError, match="runs past the last tensor"):
        dest.apply(entry, set())


def test_baseline_keeps_pending_changes_until_read_and_survives_a_cancelled_stream():
    g = torch.Generator().manual_seed(3)
    trainer = {"w": torch.randn(20_000, generator=g).to(torch.bfloat16), "b": torch.randn(100, generator=g)}
    receiver = {k: torch.zeros_like(v) for k, v in trainer.items()}
    pair = Pair(trainer, receiver, NameMapper())
    pair.sync("full")
    words_np(trainer["w"])[::97] += 1
    res, _, _ = pair.sync()
    assert res.log and pair.baseline._pending  # logged, not yet scattered
    words_np(trainer["w"])[5::89] += 1
    cancel = threading.Event()
    partial = StreamResult()
    small = SendBuffer(np.zeros(512, np.uint8))  # about one entry per bucket
    it = encode_stream(
        99, "delta", pair.schema, pair.source, pair.baseline, pair.encoder, pair.chunks, lambda: small,
        lambda b: None, partial, cancel, 1 << 20,
    )  # fmt: skip
    assert next(it, None) is not None  # the first bucket, then the stream is abandoned
    cancel.set()
    list(it)
    assert not partial.complete
    pair.baseline.flush()
    for i, spec_ in enumerate(pair.schema):  # the baseline still holds the version acknowledged last
        assert bits(pair.baseline.words[i]) == bits(receiver[spec_.name]), spec_.name
    pair.sync()
    assert all(bits(receiver[k]) == bits(v) for k, v in trainer.items())
