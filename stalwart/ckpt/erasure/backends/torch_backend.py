"""The torch backend: the bit-sliced XOR engine on ``int64`` tensors, on CPU or CUDA.

The same word operations as the numpy backend, issued through torch, so shards that
live on a GPU are coded there without leaving it. ``int64`` right shifts are
arithmetic, which is harmless: every shifted value is masked with a mask whose top
``s`` bits are clear before use.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from stalwart.ckpt.erasure import schedule
from stalwart.ckpt.erasure.bitslice import BitsliceEngine, WordOps

#: CPU: 1 MiB chunks per shard (torch's per-op overhead is higher than numpy's).
CPU_PLANE_WORDS = 16384
CPU_BUDGET_BYTES = 24 << 20
#: CUDA: 8 MiB chunks per shard, at most 128 MiB of scratch per thread and shape.
CUDA_PLANE_WORDS = 1 << 17
CUDA_BUDGET_BYTES = 128 << 20


def _xor3(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> None:
    torch.bitwise_xor(a, b, out=out)


class TorchWordOps(WordOps):
    """:class:`WordOps` on torch ``int64`` tensors of one device."""

    per_shard_transposes = False  # a torch call costs several us: fewer, larger ones win

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def empty(self, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.zeros(shape, dtype=torch.int64, device=self.device)

    def words(self, byte_view: torch.Tensor) -> torch.Tensor | None:
        if byte_view.data_ptr() % 8 or byte_view.storage_offset() % 8:
            return None
        return byte_view.view(torch.int64)

    def bytes_of(self, words: torch.Tensor) -> torch.Tensor:
        return words.reshape(-1).view(torch.uint8)

    def split(self, x: torch.Tensor, s: int) -> tuple[torch.Tensor, torch.Tensor]:
        if x.shape[-2] != 8:
            raise ValueError(f"expected 8 rows, got {x.shape[-2]}")
        v = x.unflatten(-2, (8 // (2 * s), 2, s))  # splitting one dimension: a view
        return v.select(-3, 0), v.select(-3, 1)

    def delta_swap(self, lo, hi, dlo, dhi, t, s: int, mask: int) -> None:
        torch.bitwise_right_shift(lo, s, out=t)
        t.bitwise_xor_(hi)
        t.bitwise_and_(mask)
        if dhi is hi:
            hi.bitwise_xor_(t)
        else:
            torch.bitwise_xor(hi, t, out=dhi)
        t.bitwise_left_shift_(s)
        if dlo is lo:
            lo.bitwise_xor_(t)
        else:
            torch.bitwise_xor(lo, t, out=dlo)

    def copy_bytes(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        dst.copy_(src)

    def zero(self, x: torch.Tensor) -> None:
        x.zero_()

    def bind(self, step: tuple, regs: dict[int, Sequence[Any]]) -> tuple[Callable[..., Any], tuple]:
        op, dst = step[0], regs[step[1][0]][step[1][1]]
        if op == schedule.XOR3:
            return _xor3, (regs[step[2][0]][step[2][1]], regs[step[3][0]][step[3][1]], dst)
        if op == schedule.IXOR:
            return torch.Tensor.bitwise_xor_, (dst, regs[step[2][0]][step[2][1]])
        if op == schedule.COPY:
            return torch.Tensor.copy_, (dst, regs[step[2][0]][step[2][1]])
        return torch.Tensor.zero_, (dst,)


class TorchBackend:
    """Bulk GF(2^8) products with torch tensor operations, on the tensors' own device."""

    name = "torch"

    def __init__(self) -> None:
        self._engines: dict[torch.device, BitsliceEngine] = {}

    @staticmethod
    def available() -> bool:
        return True

    def engine(self, device: torch.device) -> BitsliceEngine:
        """The engine (and its per-thread scratch) for one device."""
        eng = self._engines.get(device)
        if eng is None:
            if device.type == "cuda":
                eng = BitsliceEngine(TorchWordOps(device), CUDA_PLANE_WORDS, CUDA_BUDGET_BYTES)
            else:
                eng = BitsliceEngine(TorchWordOps(device), CPU_PLANE_WORDS, CPU_BUDGET_BYTES)
            self._engines[device] = eng
        return eng

    def apply(
        self, matrix: np.ndarray, inputs: Sequence[torch.Tensor], outputs: Sequence[torch.Tensor], nbytes: int
    ) -> None:
        """``outputs = matrix x inputs`` on 1-D ``uint8`` tensors of ``nbytes`` each, all on one device."""
        device = inputs[0].device if inputs else outputs[0].device
        with torch.no_grad():
            self.engine(device).apply(matrix, inputs, outputs, nbytes)
