"""One update stream, transport-free: encoding buckets on the sender, applying them on a receiver.

:func:`plan_chunks` cuts the wire tensors into *chunks*, the unit that is compared and
encoded as one entry: a slice of a large tensor, or several small tensors that follow
each other in the schema (an entry continues into the next tensors, so small tensors
do not pay a header and a section each). :func:`encode_stream` diffs each chunk
against the baseline (or takes it whole for a full sync), packs entries into bucket
buffers handed out by ``acquire`` and yields each finished frame; in a delta it also
hashes every tensor for the END frame. :func:`apply_bucket` checks one received bucket
and applies its entries in place. The sender and receiver drive these with a
transport; the benchmark drives them directly to measure per-core throughput.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from stalwart.formats.checksum import StreamDigest
from stalwart.sync.adapters import Destination
from stalwart.sync.baseline import Baseline
from stalwart.sync.bucket import BucketWriter
from stalwart.sync.codec import Decoder, Encoder
from stalwart.sync.schema import Schema, small_words
from stalwart.sync.source import Source
from stalwart.sync.transports.base import SendBuffer
from stalwart.sync.wire import FrameHeader, bin_digest, verify_payload

EMPTY_DIGEST = bin_digest(b"")


@dataclass(frozen=True, slots=True)
class Piece:
    """Words ``[start, start + n)`` of wire tensor ``tensor``, at word ``off`` of its chunk."""

    tensor: int
    start: int
    n: int
    off: int


@dataclass(frozen=True, slots=True)
class Chunk:
    """Consecutive words of the schema encoded as one entry: one piece, or several whole small tensors."""

    pieces: tuple[Piece, ...]
    n: int
    word: int

    @property
    def tensor(self) -> int:
        return self.pieces[0].tensor

    @property
    def start(self) -> int:
        return self.pieces[0].start


def group_words(chunk_words: int) -> int:
    """Most words one chunk of small tensors holds (their copies are the encoder's group scratch)."""
    return max(1, chunk_words // 4)


def plan_chunks(
    schema: Schema,
    chunk_words: int,
    group_key: Callable[[int], object] | None = None,
    only: Sequence[bool] | np.ndarray | None = None,
) -> list[Chunk]:
    """Chunks covering the wire tensors (those with ``only[i]`` set, if given) in schema order.

    Small tensors (:func:`~stalwart.sync.schema.small_words`) that follow each other in
    the schema with the same word size (and the same ``group_key``) share chunks of at
    most :func:`group_words`; larger tensors are cut into chunks of ``chunk_words``.
    (:class:`~stalwart.sync.source.Source` lists small tensors last, by word size.)
    Tensors without words are skipped (entries pass over them).
    """
    small = small_words(chunk_words)
    gmax = group_words(chunk_words)
    out: list[Chunk] = []
    group: list[Piece] = []
    gn = 0
    gkey = None

    def close() -> None:
        nonlocal group, gn
        if group:
            out.append(Chunk(tuple(group), gn, schema[group[0].tensor].word))
            group, gn = [], 0

    for i, spec in enumerate(schema):
        if only is not None and not only[i]:
            close()  # an entry cannot pass over a tensor it does not carry
            continue
        nw = spec.words
        if nw == 0:
            continue
        if nw <= small:
            key = (spec.word, group_key(i) if group_key is not None else None)
            if group and (key != gkey or gn + nw > gmax):
                close()
            if not group:
                gkey = key
            group.append(Piece(i, 0, nw, gn))
            gn += nw
            continue
        close()
        for s in range(0, nw, chunk_words):
            n = min(chunk_words, nw - s)
            out.append(Chunk((Piece(i, s, n, 0),), n, spec.word))
    close()
    return out


@dataclass
class StreamResult:
    """Filled in by :func:`encode_stream` as it runs."""

    digests: list[bytes] = field(default_factory=list)  # XXH3-128 of every wire tensor (delta streams)
    covered: np.ndarray | None = None  # tensors some entry covers
    dirty: list[Chunk] = field(default_factory=list)  # changed chunks to re-read at commit
    log: list[tuple[Chunk, np.ndarray, np.ndarray]] = field(
        default_factory=list
    )  # sparse chunks' (chunk, idx, new)
    log_bytes: int = 0
    complete: bool = False  # every chunk was visited (not cancelled)
    buckets: int = 0
    changed: int = 0  # changed words (delta) / words sent (full)
    idx_kinds: Counter = field(default_factory=Counter)
    val_kinds: Counter = field(default_factory=Counter)
    encode_s: float = 0.0  # busy time, excluding waits for a free buffer and for the consumer


def digest_all(schema: Schema, source: Source, chunk_words: int) -> list[bytes]:
    """XXH3-128 of every wire tensor as sent (what a full sync's BEGIN carries)."""
    out = []
    for i, spec in enumerate(schema):
        d = StreamDigest()
        for s in range(0, spec.words, chunk_words):
            _, host = source.read(i, s, min(chunk_words, spec.words - s))
            d.update(memoryview(host).cast("B"))
        out.append(bytes.fromhex(d.hexdigest()))
    return out


def encode_stream(
    version: int,
    mode: str,
    schema: Schema,
    source: Source,
    baseline: Baseline | None,
    encoder: Encoder,
    chunks: Sequence[Chunk],
    acquire: Callable[[], SendBuffer],
    release: Callable[[SendBuffer], None],
    result: StreamResult,
    cancel: threading.Event | None = None,
    log_budget: int = 0,
) -> Iterator[tuple[SendBuffer, int]]:
    """Yield ``(buffer, frame length)`` for each bucket of a ``"delta"`` or ``"full"`` update.

    Buffers come from ``acquire``; one not yielded is given back with ``release``. The
    consumer owns a yielded buffer (it sends and recycles it). A delta covers every
    tensor (``chunks`` from :func:`plan_chunks` without ``only``) and hashes each one;
    changed chunks are recorded for the baseline commit: sparse ones as (indices, new
    words) while their total stays within ``log_budget`` bytes, the rest as chunks to
    re-read.
    """
    delta = mode == "delta"
    if delta:
        result.digests = [EMPTY_DIGEST if spec.words == 0 else b"" for spec in schema]
    result.covered = np.zeros(len(schema), dtype=np.bool_)
    hashing: dict[int, StreamDigest] = {}
    seq = 0
    t = time.perf_counter()
    buf: SendBuffer | None = acquire()
    writer = BucketWriter(buf.data)
    try:
        for ch in chunks:
            if cancel is not None and cancel.is_set():
                return
            w = ch.word
            if len(ch.pieces) == 1:
                pc = ch.pieces[0]
                if not delta:
                    plan = encoder.plan_full(source.read(pc.tensor, pc.start, pc.n)[1])
                elif baseline.on_host(pc.tensor):
                    plan = _plan_blocks(encoder, source, baseline, pc, _digest(hashing, pc))
                    _hashed(hashing, result, schema, pc)
                else:
                    dev, host = source.read(pc.tensor, pc.start, pc.n)
                    _hash(hashing, result, schema, pc, host)
                    plan = encoder.plan_delta_torch(dev, baseline.chunk(pc.tensor, pc.start, pc.n))
            else:  # small tensors, copied side by side into the encoder's group scratch (host)
                cur, base = encoder.group_scratch(w, ch.n)
                for pc in ch.pieces:
                    _, host = source.read(pc.tensor, pc.start, pc.n)
                    cur[pc.off : pc.off + pc.n] = host
                    if delta:
                        _hash(hashing, result, schema, pc, host)
                        base[pc.off : pc.off + pc.n] = baseline.chunk_host(pc.tensor, pc.start, pc.n)
                plan = encoder.plan_delta(cur, base) if delta else encoder.plan_full(cur)
            if plan is None:
                continue
            if delta:
                # a scattered change costs about as much as re-reading 20 words (re-casting 8):
                # denser chunks are re-read at the commit
                sparse = plan.count * (8 if source.casts(ch.tensor) else 20) <= ch.n
                if sparse and plan.idx is not None and result.log_bytes + plan.count * (8 + w) <= log_budget:
                    result.log.append((ch, plan.idx, plan.new))  # int64 indices: scattered fastest
                    result.log_bytes += plan.count * (8 + w)
                else:
                    result.dirty.append(ch)
            result.changed += plan.count
            for pc in ch.pieces:
                result.covered[pc.tensor] = True
            if not writer.fits(plan):
                nbytes = writer.finish(version, seq)
                _account(writer, result)
                result.encode_s += time.perf_counter() - t
                b, buf = buf, None
                yield b, nbytes
                seq += 1
                buf = acquire()
                t = time.perf_counter()
                writer = BucketWriter(buf.data)
            writer.add(plan, ch.tensor, ch.start, w)
        result.complete = True
        if not writer.empty:
            nbytes = writer.finish(version, seq)
            _account(writer, result)
            result.encode_s += time.perf_counter() - t
            b, buf = buf, None
            yield b, nbytes
        else:
            result.encode_s += time.perf_counter() - t
    finally:
        if buf is not None:
            release(buf)


def _plan_blocks(encoder: Encoder, source: Source, baseline: Baseline, pc: Piece, digest: StreamDigest):
    """Delta plan of one piece on the host, each block made ready just before it is compared: the
    trainer's words cast into the stage, the baseline's pending changes scattered in, so each block
    passes through the cache once."""
    cur, fill = source.read_blocks(pc.tensor, pc.start, pc.n)
    pend = baseline.take_pending(pc.tensor, pc.start)
    base = baseline.chunk_np(pc.tensor, pc.start, pc.n)
    return encoder.plan_delta(cur, base, digest, fill, pend)  # writes every pending change, whatever happens


def _digest(hashing: dict[int, StreamDigest], pc: Piece) -> StreamDigest:
    d = hashing.get(pc.tensor)
    if d is None:
        d = hashing[pc.tensor] = StreamDigest()
    return d


def _hashed(hashing: dict[int, StreamDigest], result: StreamResult, schema: Schema, pc: Piece) -> None:
    """``pc`` went into its tensor's digest: finish the digest if it was the tensor's last piece."""
    if pc.start + pc.n == schema[pc.tensor].words:
        result.digests[pc.tensor] = bytes.fromhex(hashing.pop(pc.tensor).hexdigest())


def _hash(hashing: dict[int, StreamDigest], result: StreamResult, schema: Schema, pc: Piece, host) -> None:
    _digest(hashing, pc).update(memoryview(host).cast("B"))
    _hashed(hashing, result, schema, pc)


def _account(writer: BucketWriter, result: StreamResult) -> None:
    result.buckets += 1
    result.idx_kinds.update(writer.idx_kinds)
    result.val_kinds.update(writer.val_kinds)


def apply_bucket(
    hdr: FrameHeader,
    payload,
    dest: Destination,
    decoder: Decoder,
    what: str,
    touched: set[str],
    covered: set[int] | None = None,
) -> int:
    """Verify a BUCKET's checksum, then apply its entries in place; returns the changed words.

    ``touched`` collects the receiver tensors that changed, ``covered`` the wire tensors
    the entries covered. Raises :class:`~stalwart.sync.errors.IntegrityError` (nothing
    applied) or :class:`~stalwart.sync.errors.ProtocolError` / ``ValueError`` (possibly
    partly applied).
    """
    verify_payload(hdr, payload, what)
    changed = 0
    for e in decoder.entries(np.frombuffer(payload, dtype=np.uint8), hdr.count, what):
        dest.apply(e, touched, covered)
        changed += e.header.count
    return changed
