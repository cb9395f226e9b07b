"""Exact byte-wise GF(2^8) matrix products using only XOR, shifts and masks on 64-bit words.

Multiplying a byte by a constant ``c`` in GF(2^8) is a linear map on its 8 bits (an
8 x 8 GF(2) matrix, :func:`gf.bit_matrix`). So if the bytes of a block are *bit-sliced*
-- bit ``b`` of every byte gathered into its own packed array, a bit plane -- then
``parity = C x data`` becomes ``parity_plane[8i + r] = XOR of data_plane[8j + b]`` over
the ones of the expanded ``(8m) x (8k)`` bit matrix: pure XORs of large arrays, which
:mod:`schedule` shrinks with common-subexpression elimination.

Bit slicing a chunk of ``64 P`` bytes: view it as 8 rows of ``P`` 64-bit words, and
transpose the 8 x 8 bit matrix formed by "row ``a``, bit ``b`` of each byte" with three
delta swaps (row distance 4, 2, 1 against bit shift 4, 2, 1). Afterwards row ``b``
holds bit ``b`` of every byte and bit ``a`` of each byte tells which row it came from.
The transpose is its own inverse, so parity planes go back to bytes the same way.
The result is byte-for-byte the GF(2^8) product (ISA-L's and reedsolo's bytes); only
the intermediate layout is unusual.

Cost per chunk: 9 word operations per word of every input and output shard for the
transposes, plus one plane-sized XOR per step of the XOR program. Chunks are sized so
the working set stays in cache, and each shard's three swaps run back to back while
its chunk is still in L2 (3-8 % faster than one swap across all shards at a time);
a tail shorter than 64 bytes is padded in scratch.

The engine is written once against :class:`WordOps`; the numpy and torch backends
supply the array operations (torch runs it on CUDA tensors unchanged).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from stalwart.ckpt.erasure import gf, schedule

#: Bytes per bit-sliced group: 8 rows x one 64-bit word.
GROUP = 64
#: (bit shift, mask of the low groups) of the three delta swaps.
SWAPS = ((4, 0x0F0F0F0F0F0F0F0F), (2, 0x3333333333333333), (1, 0x5555555555555555))


class WordOps:
    """Array operations the engine needs, on arrays of 64-bit words. One subclass per library."""

    #: Transpose each shard's chunk on its own (more calls, hotter caches) rather than
    #: each swap across all shards at once (fewer, larger calls).
    per_shard_transposes = True

    def empty(self, shape: tuple[int, ...]) -> Any:
        """A new word array (contents unspecified)."""
        raise NotImplementedError

    def words(self, byte_view: Any) -> Any | None:
        """A word view of a 1-D byte array whose length is a multiple of 8, or None if unaligned."""
        raise NotImplementedError

    def bytes_of(self, words: Any) -> Any:
        """The flat byte view of a contiguous word array."""
        raise NotImplementedError

    def split(self, x: Any, s: int) -> tuple[Any, Any]:
        """Views of the rows of ``x`` (``(..., 8, P)``) whose index has bit ``s`` clear / set.

        Both are shaped ``(..., 8 // (2 s), s, P)``; they must be views, never copies.
        """
        raise NotImplementedError

    def delta_swap(self, lo: Any, hi: Any, dlo: Any, dhi: Any, t: Any, s: int, mask: int) -> None:
        """Exchange the high ``s``-bit half of every ``2s``-bit group of ``lo`` with the low half in ``hi``.

        ``t`` is scratch shaped like ``lo``; ``dlo``/``dhi`` receive the results and may alias
        ``lo``/``hi``: ``t = ((lo >> s) ^ hi) & mask; dhi = hi ^ t; dlo = lo ^ (t << s)``.
        """
        raise NotImplementedError

    def copy_bytes(self, dst: Any, src: Any) -> None:
        """Copy between equally long byte arrays."""
        raise NotImplementedError

    def zero(self, x: Any) -> None:
        """Fill with zeros."""
        raise NotImplementedError

    def bind(self, step: tuple, regs: dict[int, Sequence[Any]]) -> tuple[Callable[..., Any], tuple]:
        """Turn one :mod:`schedule` step into ``(function, args)`` over concrete planes."""
        raise NotImplementedError


def _swap_rows(ops: WordOps, q: int, r: int) -> int:
    """Shards' worth of delta-swap scratch a ``q``-input, ``r``-output product needs."""
    return 1 if ops.per_shard_transposes else max(q, r)


class _Plan:
    """Every view one chunk size needs, built once: workspace splits and the bound XOR program."""

    def __init__(self, ops: WordOps, ws: _Workspace, prog: schedule.Program, p: int) -> None:
        q, r = prog.cols // 8, prog.rows // 8
        self.prog = prog  # keeps id(prog) unique while this plan is cached
        s0 = SWAPS[0][0]
        inp, out = ws.inp[:q, :, :p], ws.out[:r, :, :p]
        self.t_first = ws.swap.reshape(-1)[: 4 * p].reshape(8 // (2 * s0), s0, p)
        self.in_first = [ops.split(inp[j], s0) for j in range(q)]
        self.out_last = [ops.split(out[i], s0) for i in range(r)]
        # the in-place swaps: per shard (while its chunk is still in L2) or, for libraries
        # with a high per-call cost, each swap across all shards at once
        def stages(x: Any, n: int, swaps: tuple) -> list[tuple]:
            return [(*ops.split(x, s), ws.swap[:n, :, :p].reshape(n, 8 // (2 * s), s, p), s, mask) for s, mask in swaps]

        if ops.per_shard_transposes:
            self.in_each = [stages(inp[j : j + 1], 1, SWAPS[1:]) for j in range(q)]
            self.out_each = [stages(out[i : i + 1], 1, SWAPS[:0:-1]) for i in range(r)]
            self.in_all: list[tuple] = []
            self.out_all: list[tuple] = []
        else:
            self.in_each, self.out_each = [[]] * q, [[]] * r
            self.in_all, self.out_all = stages(inp, q, SWAPS[1:]), stages(out, r, SWAPS[:0:-1])
        self.stage_in = ws.stage_in.reshape(-1)[: 8 * p].reshape(8, p)
        self.stage_out = ws.stage_out.reshape(-1)[: 8 * p].reshape(8, p)
        self.stage_in_bytes = ops.bytes_of(self.stage_in)
        self.stage_out_bytes = ops.bytes_of(self.stage_out)
        self.stage_in_split = ops.split(self.stage_in, s0)
        self.stage_out_split = ops.split(self.stage_out, s0)
        regs = {
            schedule.IN: [ws.inp[j, b, :p] for j in range(q) for b in range(8)],
            schedule.OUT: [ws.out[i, b, :p] for i in range(r) for b in range(8)],
            schedule.TMP: [ws.tmp[t, :p] for t in range(prog.n_tmp)],
        }
        self.steps = [ops.bind(step, regs) for step in prog.steps]


class _Workspace:
    """Scratch planes for one (inputs, outputs, plane size) shape, reused across calls."""

    def __init__(self, ops: WordOps, q: int, r: int, plane: int) -> None:
        self.ops = ops
        self.plane = plane
        self.inp = ops.empty((q, 8, plane))
        self.out = ops.empty((r, 8, plane))
        self.tmp = ops.empty((1, plane))
        self.swap = ops.empty((_swap_rows(ops, q, r), 4, plane))
        self.stage_in = ops.empty((8, plane))
        self.stage_out = ops.empty((8, plane))
        self.plans: dict[tuple[int, int], _Plan] = {}

    def ensure_tmp(self, n_tmp: int) -> None:
        """Grow the temp planes to ``n_tmp`` (plans bound to the old ones are dropped)."""
        if n_tmp > self.tmp.shape[0]:
            self.tmp = self.ops.empty((n_tmp, self.plane))
            self.plans.clear()

    @property
    def nbytes(self) -> int:
        return (
            8
            * self.plane
            * (8 * (self.inp.shape[0] + self.out.shape[0]) + self.tmp.shape[0] + 4 * self.swap.shape[0] + 16)
        )


class BitsliceEngine:
    """Runs ``outputs = matrix x inputs`` over GF(2^8) for one array library.

    Each shard is processed ``64 * plane`` bytes at a time with ``plane <= plane_words``.
    Scratch is ``8 * plane * (8 (q + r) + temps + 4 s + 16)`` bytes (``s``: 1 with
    per-shard transposes, else ``max(q, r)``), and ``plane``
    is lowered so that this stays within ``budget_bytes``; each thread keeps at most
    :attr:`max_workspaces` such scratch sets for reuse (:meth:`release` drops them).
    """

    #: Workspaces (shapes) kept per thread, e.g. one for encode and one for decode.
    max_workspaces = 2

    def __init__(self, ops: WordOps, plane_words: int, budget_bytes: int) -> None:
        self.ops = ops
        self.plane_words = plane_words
        self.budget_bytes = budget_bytes
        self._local = threading.local()

    def plane_for(self, q: int, r: int, n_tmp: int) -> int:
        """Words per bit plane used for a ``q``-input, ``r``-output product."""
        per_plane_word = 8 * (8 * (q + r) + n_tmp + 4 * _swap_rows(self.ops, q, r) + 16)
        return max(64, min(self.plane_words, self.budget_bytes // per_plane_word))

    def _plan(self, prog: schedule.Program, p_max: int, p: int) -> _Plan:
        q, r = prog.cols // 8, prog.rows // 8
        cache = getattr(self._local, "ws", None)
        if cache is None:
            cache = self._local.ws = {}
        key = (q, r, p_max)
        ws = cache.pop(key, None)
        if ws is None:
            ws = _Workspace(self.ops, q, r, p_max)
        cache[key] = ws  # most recently used last
        while len(cache) > self.max_workspaces:
            cache.pop(next(iter(cache)))
        ws.ensure_tmp(prog.n_tmp)
        plan = ws.plans.get((id(prog), p))
        if plan is None or plan.prog is not prog:
            if len(ws.plans) >= 64:
                ws.plans.clear()
            plan = ws.plans[(id(prog), p)] = _Plan(self.ops, ws, prog, p)
        return plan

    def scratch_bytes(self) -> int:
        """Scratch memory this thread holds now."""
        return sum(ws.nbytes for ws in getattr(self._local, "ws", {}).values())

    def release(self) -> None:
        """Drop this thread's cached scratch memory."""
        self._local.ws = {}

    def apply(self, matrix: np.ndarray, inputs: Sequence[Any], outputs: Sequence[Any], nbytes: int) -> None:
        """Write ``matrix x inputs`` into ``outputs``: 1-D byte arrays of ``nbytes`` each."""
        matrix = np.asarray(matrix, dtype=np.uint8)
        r, q = matrix.shape
        if len(inputs) != q or len(outputs) != r:
            raise ValueError(
                f"matrix {matrix.shape} does not match {len(inputs)} inputs / {len(outputs)} outputs"
            )
        if nbytes == 0 or r == 0:
            return
        prog = schedule.compile_xor_program(gf.expand_bit_matrix(matrix))
        plane = self.plane_for(q, r, prog.n_tmp)
        ops = self.ops
        s0 = SWAPS[0][0]
        main = nbytes - nbytes % GROUP
        if main:
            in_words = [ops.words(x[:main]) for x in inputs]
            out_words = [ops.words(y[:main]) for y in outputs]
            step = GROUP * plane
            for off in range(0, main, step):
                p = min(plane, (main - off) // GROUP)
                plan = self._plan(prog, plane, p)
                w0, w1 = off // 8, off // 8 + 8 * p
                srcs = [
                    ops.split(w[w0:w1].reshape(8, p), s0) if w is not None else x[off : off + GROUP * p]
                    for w, x in zip(in_words, inputs)
                ]
                dsts = [
                    ops.split(w[w0:w1].reshape(8, p), s0) if w is not None else y[off : off + GROUP * p]
                    for w, y in zip(out_words, outputs)
                ]
                self._chunk(plan, srcs, dsts, GROUP * p)
        if nbytes > main:
            # the last < 64 bytes: zero-padded to one group in scratch
            plan = self._plan(prog, plane, 1)
            self._chunk(plan, [x[main:nbytes] for x in inputs], [y[main:nbytes] for y in outputs], GROUP)

    def _chunk(self, plan: _Plan, srcs: list, dsts: list, nb: int) -> None:
        """One chunk of ``nb`` bytes per shard. Each src/dst is a ``(lo, hi)`` split of the caller's
        words or, for unaligned or short buffers, a byte slice that goes through scratch."""
        ops = self.ops
        s0, m0 = SWAPS[0]
        t1 = plan.t_first
        # forward transpose: the first swap reads the caller's bytes, the other two run in place
        for (dlo, dhi), src, stages in zip(plan.in_first, srcs, plan.in_each):
            if not isinstance(src, tuple):
                if len(src) < nb:
                    ops.zero(plan.stage_in)
                ops.copy_bytes(plan.stage_in_bytes[: len(src)], src)
                src = plan.stage_in_split
            ops.delta_swap(src[0], src[1], dlo, dhi, t1, s0, m0)
            for lo, hi, t, s, mask in stages:
                ops.delta_swap(lo, hi, lo, hi, t, s, mask)
        for lo, hi, t, s, mask in plan.in_all:
            ops.delta_swap(lo, hi, lo, hi, t, s, mask)
        for f, args in plan.steps:
            f(*args)
        # inverse transpose: two swaps in place, the last writes the caller's outputs
        for lo, hi, t, s, mask in plan.out_all:
            ops.delta_swap(lo, hi, lo, hi, t, s, mask)
        for (lo, hi), dst, stages in zip(plan.out_last, dsts, plan.out_each):
            for slo, shi, t, s, mask in stages:
                ops.delta_swap(slo, shi, slo, shi, t, s, mask)
            if isinstance(dst, tuple):
                ops.delta_swap(lo, hi, dst[0], dst[1], t1, s0, m0)
            else:
                dlo, dhi = plan.stage_out_split
                ops.delta_swap(lo, hi, dlo, dhi, t1, s0, m0)
                ops.copy_bytes(dst, plan.stage_out_bytes[: len(dst)])
