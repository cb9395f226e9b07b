"""The sender's baseline: the weights every receiver acknowledged, kept as flat words.

Deltas are computed against it; it advances (only the chunks that changed are
copied) after every receiver has acknowledged a version. It lives in host memory
(default; optionally pinned) or on the model's device.
"""

from __future__ import annotations

import numpy as np
import torch

from stalwart.sync.codec import torch_word_dtype
from stalwart.sync.schema import Schema


class Baseline:
    """Flat word copies of the wire tensors at :attr:`version` (None: nothing acknowledged yet)."""

    def __init__(self, schema: Schema, devices: list[torch.device], *, pin: bool = False) -> None:
        self.schema = schema
        self.version: int | None = None
        self.words: list[torch.Tensor] = []
        self._np: list[np.ndarray | None] = []
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
        return self._np[i][start : start + n]

    def chunk(self, i: int, start: int, n: int) -> torch.Tensor:
        return self.words[i][start : start + n]

    def store(self, i: int, start: int, words: torch.Tensor) -> None:
        """Copy ``words`` (any device) into the baseline at ``start``."""
        self.words[i][start : start + words.numel()].copy_(words)

    def commit(
        self, source, version: int, dirty: list[tuple[int, int, int]] | None, chunk_words: int, log=()
    ) -> None:
        """Advance to ``version``.

        ``log``: (tensor, start, local indices, new words) of sparse changes, scattered in;
        ``dirty``: chunks to copy again from ``source`` (None: everything, ``log`` ignored).
        """
        if dirty is None or self.version is None:
            from stalwart.sync.stream import chunks

            todo = chunks(self.schema, chunk_words)
            log = ()
        else:
            todo = iter(dirty)
        for i, s, n in todo:
            dev, _ = source.read(i, s, n, need_host=False)
            self.store(i, s, dev)
        for i, s, idx, new in log:
            if self._np[i] is not None:
                self._np[i][s:][idx] = new
            else:
                w = self.words[i]
                w[s:].index_put_(
                    (torch.from_numpy(idx).to(w.device, torch.int64),), torch.from_numpy(new).to(w.device)
                )
        self.version = version
