"""The sender's baseline: the weights every receiver acknowledged, kept as flat words.

Deltas are computed against it; it advances (only the chunks that changed are
copied) after every receiver has acknowledged a version. It lives in host memory
(default; optionally pinned) or on the model's device.

Sparse changes are not scattered in at the commit: they are kept per chunk and
scattered in when that chunk is next read, just before it is compared, so the
scatter and the comparison share one trip of the chunk through the cache instead of
two through memory.
"""

from __future__ import annotations

import numpy as np
import torch

from stalwart.sync.codec import scatter_words, torch_word_dtype
from stalwart.sync.schema import Schema


class Baseline:
    """Flat word copies of the wire tensors at :attr:`version` (None: nothing acknowledged yet)."""

    def __init__(self, schema: Schema, devices: list[torch.device], *, pin: bool = False) -> None:
        self.schema = schema
        self.version: int | None = None
        self.words: list[torch.Tensor] = []
        self._np: list[np.ndarray | None] = []
        # (tensor, start) -> (local indices, new words) committed but not yet scattered in
        self._pending: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}
        for spec, dev in zip(schema, devices):
            pinned = pin and dev.type == "cpu" and torch.cuda.is_available()
            t = torch.empty(spec.words, dtype=torch_word_dtype(spec.word), device=dev, pin_memory=pinned)
            self.words.append(t)
            self._np.append(t.numpy() if dev.type == "cpu" else None)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.words)

    def on_host(self, i: int) -> bool:
        return self._np[i] is not None

    def chunk_np(self, i: int, start: int, n: int) -> np.ndarray:
        """Words ``[start, start + n)`` of tensor ``i`` (a range the commit's chunks start at)."""
        if self._pending:
            self._flush(i, start)
        return self._np[i][start : start + n]

    def chunk_host(self, i: int, start: int, n: int) -> np.ndarray:
        """Words ``[start, start + n)`` of tensor ``i`` as a host array (copied from a device)."""
        if self._np[i] is not None:
            return self.chunk_np(i, start, n)
        return self.chunk(i, start, n).cpu().numpy()

    def chunk(self, i: int, start: int, n: int) -> torch.Tensor:
        if self._pending:
            self._flush(i, start)
        return self.words[i][start : start + n]

    def take_pending(self, i: int, start: int) -> tuple[np.ndarray, np.ndarray] | None:
        """Remove and return the changes waiting to be scattered into the chunk of tensor ``i``
        at ``start`` (sorted local indices, new words); the caller must scatter all of them."""
        return self._pending.pop((i, start), None) if self._pending else None

    def flush(self) -> None:
        """Scatter in every pending change (the words then hold :attr:`version` everywhere)."""
        for i, start in list(self._pending):
            self._flush(i, start)

    def _flush(self, i: int, start: int) -> None:
        got = self._pending.pop((i, start), None)
        if got is not None:
            self._scatter(i, start, *got)

    def store(self, i: int, start: int, words: torch.Tensor) -> None:
        """Copy ``words`` (any device) into the baseline at ``start``."""
        self.words[i][start : start + words.numel()].copy_(words)

    def commit(self, source, version: int, dirty, chunk_words: int, log=()) -> None:
        """Advance to ``version``.

        ``log``: (chunk, local indices, new words) of sparse changes, kept and scattered
        in when their chunk is next read; ``dirty``: chunks
        (:class:`stalwart.sync.stream.Chunk`) to copy again from ``source`` now (None:
        everything, ``log`` ignored).
        """
        self.flush()  # normally empty: a delta reads (and so flushes) every chunk
        if dirty is None or self.version is None:
            for i, spec in enumerate(self.schema):
                for s in range(0, spec.words, chunk_words):
                    dev, _ = source.read(i, s, min(chunk_words, spec.words - s), need_host=False)
                    self.store(i, s, dev)
            self.version = version
            return
        for ch in dirty:
            for pc in ch.pieces:
                dev, _ = source.read(pc.tensor, pc.start, pc.n, need_host=False)
                self.store(pc.tensor, pc.start, dev)
        for ch, idx, new in log:
            if len(ch.pieces) == 1:
                self._pending[(ch.tensor, ch.start)] = (idx, new)
                continue
            bounds = np.searchsorted(idx, [pc.off for pc in ch.pieces[1:]])
            lo = 0
            for pc, hi in zip(ch.pieces, [*bounds.tolist(), len(idx)]):
                if hi > lo:
                    self._pending[(pc.tensor, pc.start)] = (idx[lo:hi] - pc.off, new[lo:hi])
                lo = hi
        self.version = version

    def _scatter(self, i: int, start: int, idx: np.ndarray, new: np.ndarray) -> None:
        if self._np[i] is not None:
            dst = self._np[i][start:] if start else self._np[i]
            scatter_words(dst, idx, new)
        else:
            w = self.words[i]
            w[start:].index_put_(
                (torch.from_numpy(idx).to(w.device, torch.int64),), torch.from_numpy(new).to(w.device)
            )
