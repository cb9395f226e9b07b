"""One update stream, transport-free: encoding buckets on the sender, applying them on a receiver.

:func:`encode_stream` walks the wire tensors chunk by chunk, diffs each chunk against
the baseline (or takes it whole for a full sync), packs entries into bucket buffers
handed out by ``acquire`` and yields each finished frame; it also hashes every
tensor for the END frame. :func:`apply_bucket` checks one received bucket and applies
its entries in place. The sender and receiver drive these with a transport; the
benchmark drives them directly to measure per-core throughput.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

from stalwart.formats.checksum import StreamDigest
from stalwart.sync.adapters import Destination
from stalwart.sync.baseline import Baseline
from stalwart.sync.bucket import BucketWriter
from stalwart.sync.codec import Decoder, Encoder
from stalwart.sync.schema import Schema
from stalwart.sync.source import Source
from stalwart.sync.transports.base import SendBuffer
from stalwart.sync.wire import FrameHeader, verify_payload


@dataclass
class StreamResult:
    """Filled in by :func:`encode_stream` as it runs."""

    digests: list[bytes] = field(default_factory=list)  # XXH3-128 of every wire tensor (END frame)
    dirty: list[tuple[int, int, int]] = field(default_factory=list)  # changed chunks to re-read at commit
    log: list[tuple[int, int, np.ndarray, np.ndarray]] = field(
        default_factory=list
    )  # sparse chunks' (i, start, idx, new)
    log_bytes: int = 0
    complete: bool = False  # every chunk was visited (not cancelled)
    buckets: int = 0
    changed: int = 0  # changed words (delta) / words sent (full)
    idx_kinds: Counter = field(default_factory=Counter)
    val_kinds: Counter = field(default_factory=Counter)
    encode_s: float = 0.0  # busy time, excluding waits for a free buffer and for the consumer


def chunks(schema: Schema, chunk_words: int) -> Iterator[tuple[int, int, int]]:
    """(tensor index, start word, words) covering every wire tensor."""
    for i, spec in enumerate(schema):
        for s in range(0, spec.words, chunk_words):
            yield i, s, min(chunk_words, spec.words - s)


def encode_stream(
    version: int,
    mode: str,
    schema: Schema,
    source: Source,
    baseline: Baseline | None,
    encoder: Encoder,
    chunk_words: int,
    acquire: Callable[[], SendBuffer],
    release: Callable[[SendBuffer], None],
    result: StreamResult,
    cancel: threading.Event | None = None,
    log_budget: int = 0,
) -> Iterator[tuple[SendBuffer, int]]:
    """Yield ``(buffer, frame length)`` for each bucket of a ``"delta"`` or ``"full"`` update.

    Buffers come from ``acquire``; one not yielded is given back with ``release``. The
    consumer owns a yielded buffer (it sends and recycles it). Changed chunks are
    recorded for the baseline commit: sparse ones as (indices, new words) while their
    total stays within ``log_budget`` bytes, the rest as ranges to re-read.
    """
    result.digests = [b""] * len(schema)
    seq = 0
    t = time.perf_counter()
    buf: SendBuffer | None = acquire()
    writer = BucketWriter(buf.data)
    try:
        for i, spec in enumerate(schema):
            d = StreamDigest()
            w = spec.word
            for start in range(0, spec.words, chunk_words):
                if cancel is not None and cancel.is_set():
                    return
                n = min(chunk_words, spec.words - start)
                dev, host = source.read(i, start, n)
                d.update(memoryview(host).cast("B"))
                if mode == "full":
                    plan = encoder.plan_full(host)
                elif baseline.on_host(i):
                    plan = encoder.plan_delta(host, baseline.chunk_np(i, start, n))
                else:
                    plan = encoder.plan_delta_torch(dev, baseline.chunk(i, start, n))
                if plan is None:
                    continue
                if mode == "delta":
                    if plan.idx is not None and result.log_bytes + plan.count * (4 + w) <= log_budget:
                        result.log.append((i, start, plan.idx.astype(np.int32), plan.new))
                        result.log_bytes += plan.count * (4 + w)
                    else:
                        result.dirty.append((i, start, n))
                result.changed += plan.count
                if not writer.fits(plan.nbytes):
                    nbytes = writer.finish(version, seq)
                    _account(writer, result)
                    result.encode_s += time.perf_counter() - t
                    b, buf = buf, None
                    yield b, nbytes
                    seq += 1
                    buf = acquire()
                    t = time.perf_counter()
                    writer = BucketWriter(buf.data)
                writer.add(plan, i, start, w)
            result.digests[i] = bytes.fromhex(d.hexdigest())
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


def _account(writer: BucketWriter, result: StreamResult) -> None:
    result.buckets += 1
    result.idx_kinds.update(writer.idx_kinds)
    result.val_kinds.update(writer.val_kinds)


def apply_bucket(
    hdr: FrameHeader, payload, dest: Destination, decoder: Decoder, what: str, touched: set[str]
) -> int:
    """Verify a BUCKET's checksum, then apply its entries in place; returns the changed words.

    Raises :class:`~stalwart.sync.errors.IntegrityError` (nothing applied) or
    :class:`~stalwart.sync.errors.ProtocolError` / ``ValueError`` (possibly partly applied).
    """
    verify_payload(hdr, payload, what)
    changed = 0
    for e in decoder.entries(np.frombuffer(payload, dtype=np.uint8), hdr.count, what):
        touched.update(dest.apply(e))
        changed += e.header.count
    return changed
