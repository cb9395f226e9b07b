"""Buckets: bounded frames packed with entries, and their per-bucket checksum.

A BUCKET frame's payload is a sequence of entries (:mod:`stalwart.sync.codec`); the
frame header's ``count`` is the number of entries and its payload digest (XXH3-128)
covers every payload byte. A bucket never exceeds the frame buffer it is written
into, so memory per bucket is fixed by the sender's ``bucket_bytes``.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from stalwart.sync.codec import IDX_NAMES, VAL_NAMES, Encoder, EntryPlan
from stalwart.sync.wire import HEADER_SIZE, Kind, bin_digest, pack_header


class BucketWriter:
    """Packs entries into one preallocated frame buffer (header space first)."""

    def __init__(self, buf: np.ndarray) -> None:
        if buf.dtype != np.uint8 or buf.ndim != 1:
            raise ValueError("bucket buffer must be a flat uint8 array")
        self.buf = buf
        self.pos = HEADER_SIZE  # a multiple of 8, so value sections align as they do in the payload
        self.count = 0
        self.changed = 0
        self.idx_kinds: Counter[str] = Counter()
        self.val_kinds: Counter[str] = Counter()

    @property
    def capacity(self) -> int:
        return len(self.buf)

    @property
    def empty(self) -> bool:
        return self.count == 0

    def fits(self, plan: EntryPlan) -> bool:
        return self.pos + plan.nbytes <= len(self.buf)

    def add(self, plan: EntryPlan, tensor_id: int, start: int, word: int) -> None:
        self.pos = Encoder.write(plan, tensor_id, start, word, self.buf, self.pos)
        self.count += 1
        self.changed += plan.count
        self.idx_kinds[IDX_NAMES[plan.idx_enc] + ("+zstd" if plan.idx_packed else "")] += 1
        self.val_kinds[VAL_NAMES[plan.val_enc]] += 1

    def finish(self, version: int, seq: int) -> int:
        """Write the frame header (with the payload checksum); returns the frame's length."""
        payload = memoryview(self.buf[HEADER_SIZE : self.pos])
        pack_header(
            Kind.BUCKET, version, seq, self.count, payload_len=len(payload), payload_digest=bin_digest(payload),
            out=self.buf,
        )  # fmt: skip
        return self.pos
