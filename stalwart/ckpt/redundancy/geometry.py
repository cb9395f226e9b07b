"""Placement math of a redundancy group (which node holds which shard of which stripe) and a
node's snapshot bytes as one addressable string."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from stalwart.ckpt.redundancy.config import (
    ALIGN,
    RedundancyError,
)

log = logging.getLogger("stalwart.keeper")


def _align(x: int) -> int:
    return -(-x // ALIGN) * ALIGN


def _clamp(x: int, hi: int) -> int:
    return max(0, min(x, hi))


@dataclass(frozen=True)
class Geometry:
    """The stripes of one step's snapshot in one redundancy group.

    ``files[p]`` lists member ``p``'s data files as ``(rank, path, size)`` in rank
    order; ``D_p`` is their concatenation, ``L_p = len(D_p)``. Member ``p``'s block
    size is ``B_p = align(ceil(L_p / k))`` and block ``t`` is ``D_p[t*B_p : (t+1)*B_p]``
    (zero past ``L_p``). Node ``p`` holds shard ``s = (p - j) mod n`` of stripe ``j``:
    data block ``s`` when ``s < k``, else parity ``s - k``. A stripe is as long as its
    longest data block, so unequal nodes (DDP's rank 0 holds the replicated state)
    cost parity only for the bytes that exist.
    """

    k: int
    m: int
    files: tuple[tuple[tuple[int, str, int], ...], ...]

    @property
    def n(self) -> int:
        return self.k + self.m

    def length(self, p: int) -> int:
        """``L_p``: bytes of member ``p``'s snapshot."""
        return sum(size for _, _, size in self.files[p])

    def block(self, p: int) -> int:
        """``B_p``: member ``p``'s block size."""
        return _align(-(-self.length(p) // self.k))

    def present(self, p: int, t: int) -> int:
        """Bytes of member ``p``'s block ``t`` that hold data (the rest is implicit zeros)."""
        b = self.block(p)
        return _clamp(self.length(p) - t * b, b)

    def stripe(self, j: int) -> int:
        """Length of stripe ``j``'s shards (its parity blocks)."""
        return _align(max(self.present((j + t) % self.n, t) for t in range(self.k)))

    def holder(self, j: int, s: int) -> int:
        """The member holding shard ``s`` of stripe ``j``."""
        return (j + s) % self.n

    def shard_of(self, p: int, j: int) -> int:
        """Which shard of stripe ``j`` member ``p`` holds."""
        return (p - j) % self.n

    def shard_present(self, j: int, s: int) -> int:
        """Stored bytes of shard ``s`` of stripe ``j`` (data: what exists; parity: all)."""
        return self.present(self.holder(j, s), s) if s < self.k else self.stripe(j)

    def parity_slots(self, p: int) -> list[tuple[int, int, int]]:
        """``(u, stripe, offset)`` of the parity blocks member ``p`` stores, in its parity file."""
        out, off = [], 0
        for u in range(self.m):
            j = (p - self.k - u) % self.n
            out.append((u, j, off))
            off += self.stripe(j)
        return out

    def parity_bytes(self, p: int) -> int:
        return sum(self.stripe(j) for _, j, _ in self.parity_slots(p))

    def rounds(self, chunk: int) -> int:
        return max(-(-self.stripe(j) // chunk) for j in range(self.n))

    def to_json(self) -> dict:
        return {"k": self.k, "m": self.m, "files": [[list(f) for f in fs] for fs in self.files]}

    @staticmethod
    def from_json(obj: dict) -> Geometry:
        files = tuple(tuple((int(r), str(p), int(s)) for r, p, s in fs) for fs in obj["files"])
        return Geometry(int(obj["k"]), int(obj["m"]), files)





class NodeBytes:
    """``D_p``: a member's data files seen as one byte string (memory maps of the files)."""

    def __init__(self, parts: Sequence[torch.Tensor]) -> None:
        self.parts = [p for p in parts if p.numel()]
        self.starts: list[int] = []
        pos = 0
        for p in self.parts:
            self.starts.append(pos)
            pos += p.numel()
        self.length = pos

    @staticmethod
    def map_files(paths_sizes: Sequence[tuple[str, int]], create: bool = False) -> NodeBytes:
        parts = []
        for path, size in paths_sizes:
            if create:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
                try:
                    os.ftruncate(fd, size)
                finally:
                    os.close(fd)
            elif os.path.getsize(path) != size:
                raise RedundancyError(f"{path} is {os.path.getsize(path)} bytes, the snapshot records {size}")
            if size:
                parts.append(torch.from_file(path, shared=True, size=size, dtype=torch.uint8))
        return NodeBytes(parts)

    def _pieces(self, offset: int, n: int) -> Iterator[tuple[torch.Tensor, int, int, int]]:
        """(part, start in part, length, position in the request) covering ``[offset, offset+n)``."""
        done = 0
        for part, start in zip(self.parts, self.starts, strict=True):
            end = start + part.numel()
            if end <= offset + done or done >= n:
                continue
            if start >= offset + n:
                break
            lo = offset + done - start
            take = min(end - (offset + done), n - done)
            yield part, lo, take, done
            done += take

    def read(self, offset: int, n: int, scratch: torch.Tensor) -> torch.Tensor:
        """``n`` bytes at ``offset`` (all within the data): a view when they lie in one file, else copied."""
        pieces = list(self._pieces(offset, n))
        if len(pieces) == 1:
            part, lo, take, _ = pieces[0]
            return part[lo : lo + take]
        out = scratch[:n]
        for part, lo, take, pos in pieces:
            out[pos : pos + take].copy_(part[lo : lo + take])
        return out

    def write(self, offset: int, src: torch.Tensor) -> None:
        for part, lo, take, pos in self._pieces(offset, src.numel()):
            part[lo : lo + take].copy_(src[pos : pos + take])
