"""Encoding: the rounds that move data blocks to the members computing parity, over a transport or
from the peers' shared memory in place."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch

from stalwart.ckpt.redundancy.config import (
    RedundancyError,
)
from stalwart.ckpt.redundancy.geometry import Geometry, NodeBytes, _clamp
from stalwart.ckpt.redundancy.transport import TAG_DATA, TAG_PARITY, Transport, Work, wait_all

log = logging.getLogger("stalwart.keeper")







def encode_rounds(
    geo: Geometry,
    p: int,
    data: NodeBytes,
    parity: torch.Tensor,
    net: Transport,
    rs,
    chunk: int,
    pace: Callable[[int], None] | None = None,
    stop: Callable[[], bool] | None = None,
) -> int:
    """Member ``p``'s part of encoding every stripe of ``geo``; returns bytes sent.

    Per round (``chunk`` bytes of every stripe): ``p`` sends the present bytes of its
    ``k`` blocks to the stripes' *encoders* (the holders of parity 0); as the encoder of
    stripe ``(p - k) mod n`` it receives that stripe's data, zero-fills what a block
    lacks, computes all ``m`` parities, keeps parity 0 and sends parity ``u`` to member
    ``(p + u) mod n``; and it receives the other parities it holds. Every receive is
    posted before any wait, so the rounds cannot deadlock.
    """
    n, k, m = geo.n, geo.k, geo.m
    if data.length != geo.length(p):
        raise RedundancyError(f"member {p}: {data.length} bytes of data, the geometry says {geo.length(p)}")
    if parity.numel() != geo.parity_bytes(p):
        raise RedundancyError(f"member {p}: parity buffer of {parity.numel()} bytes, needs {geo.parity_bytes(p)}")
    j0 = (p - k) % n  # the stripe this member encodes
    slots = {u: off for u, _, off in geo.parity_slots(p)}
    s0 = geo.stripe(j0)
    width = min(chunk, s0)
    enc_in = [torch.empty(width, dtype=torch.uint8) for _ in range(k)] if width else []
    enc_out = [torch.empty(width, dtype=torch.uint8) for _ in range(m - 1)] if width else []
    stage = [torch.empty(chunk, dtype=torch.uint8) for _ in range(k)]
    block = geo.block(p)
    total = 0
    for r in range(geo.rounds(chunk)):
        sent = 0
        if stop is not None and stop():
            raise RedundancyError("encoding interrupted (the keeper is stopping)")
        lo = r * chunk
        data_recv: list[Work] = []
        other: list[Work] = []
        c0 = _clamp(s0 - lo, chunk)
        have = [0] * k
        if c0:
            for t in range(k):
                src = geo.holder(j0, t)
                have[t] = _clamp(geo.present(src, t) - lo, c0)
                if have[t]:
                    data_recv.append(net.irecv(enc_in[t][: have[t]], src, r * 2 + TAG_DATA))
        for u in range(1, m):
            j = (p - k - u) % n
            c = _clamp(geo.stripe(j) - lo, chunk)
            if c:
                off = slots[u] + lo
                other.append(net.irecv(parity[off : off + c], (p - u) % n, r * 2 + TAG_PARITY))
        for t in range(k):
            j = (p - t) % n
            c = _clamp(geo.present(p, t) - lo, chunk)
            if c:
                other.append(net.isend(data.read(t * block + lo, c, stage[t]), geo.holder(j, k), r * 2 + TAG_DATA))
                sent += c
        wait_all(data_recv)
        if c0:
            for t in range(k):
                if 0 < have[t] < c0:
                    enc_in[t][have[t] : c0].zero_()
            out = [parity[slots[0] + lo : slots[0] + lo + c0]] + [b[:c0] for b in enc_out]
            if any(have):
                rs.encode([b[:c0] if have[t] else None for t, b in enumerate(enc_in)], out=out)  # None: all zeros
            else:
                for b in out:
                    b.zero_()
            for u in range(1, m):
                other.append(net.isend(enc_out[u - 1][:c0], (p + u) % n, r * 2 + TAG_PARITY))
                sent += c0
        wait_all(other)
        total += sent
        if pace is not None:
            pace(sent)
    return total


def encode_shared(
    geo: Geometry,
    p: int,
    datas: Sequence[NodeBytes],
    parity: torch.Tensor,
    rs,
    chunk: int,
    stop: Callable[[], bool] | None = None,
) -> int:
    """Member ``p``'s parity blocks computed from every member's data read in place:
    the intra-host path, when all members' snapshots are in one machine's shared memory
    (intra-node mode). Nothing is sent; each member reads the ``k`` data blocks of the
    stripes whose parity it holds and computes them itself. Same bytes as
    :func:`encode_rounds`. Returns the data bytes read.
    """
    k = geo.k
    for q, d in enumerate(datas):
        if d.length != geo.length(q):
            raise RedundancyError(f"member {q}: {d.length} bytes of data, the geometry says {geo.length(q)}")
    if parity.numel() != geo.parity_bytes(p):
        raise RedundancyError(f"member {p}: parity buffer of {parity.numel()} bytes, needs {geo.parity_bytes(p)}")
    width = min(chunk, max((geo.stripe(j) for _, j, _ in geo.parity_slots(p)), default=0))
    stage = [torch.empty(width, dtype=torch.uint8) for _ in range(k)]
    read = 0
    for u, j, off in geo.parity_slots(p):
        size = geo.stripe(j)
        for lo in range(0, size, chunk):
            if stop is not None and stop():
                raise RedundancyError("encoding interrupted (the keeper is stopping)")
            c = min(chunk, size - lo)
            ins = []
            for t in range(k):
                q = geo.holder(j, t)
                view, have = _stripe_input(datas[q], geo, q, t, lo, c, stage[t])
                ins.append(view)
                read += have
            if all(x is None for x in ins):
                parity[off + lo : off + lo + c].zero_()
            else:  # only the parity this member holds
                rs.encode(ins, out=[parity[off + lo : off + lo + c]], which=[u])
    return read


def _stripe_input(
    data: NodeBytes, geo: Geometry, q: int, t: int, lo: int, c: int, stage: torch.Tensor
) -> tuple[torch.Tensor | None, int]:
    """``c`` bytes from ``lo`` of member ``q``'s block ``t`` as a codec input, and how many
    of them exist: a view of its memory, zero-padded in ``stage`` where the block ends
    early, or None (all zeros, which the codec skips) when none of it exists."""
    have = _clamp(geo.present(q, t) - lo, c)
    if have == c:
        return data.read(t * geo.block(q) + lo, c, stage), have
    if not have:
        return None, 0
    stage[:have].copy_(data.read(t * geo.block(q) + lo, have, stage))
    stage[have:c].zero_()
    return stage[:c], have
