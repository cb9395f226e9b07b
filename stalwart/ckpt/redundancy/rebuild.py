"""Rebuilding lost members' data: which shards each stripe decodes from, and the decode rounds."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from stalwart.ckpt.redundancy.config import (
    RedundancyError,
)
from stalwart.ckpt.redundancy.geometry import Geometry, NodeBytes, _clamp
from stalwart.ckpt.redundancy.transport import TAG_OUT, TAG_SRC, Transport, Work, wait_all

log = logging.getLogger("stalwart.keeper")


@dataclass(frozen=True)
class StripePlan:
    chosen: tuple[int, ...]  # the k shard indices the decoder uses
    decoder: int  # member that decodes
    lost: tuple[int, ...]  # lost data shard indices (block t of member (j+t) mod n)


@dataclass(frozen=True)
class RebuildPlan:
    lost: tuple[int, ...]  # members whose data is rebuilt
    stripes: dict[int, StripePlan]


def plan_rebuild(geo: Geometry, lost: Sequence[int], parity_ok: Sequence[int], names: Sequence[str] | None = None) -> RebuildPlan:
    """Which shards rebuild the data of the ``lost`` members, and who decodes each stripe.

    ``parity_ok``: members whose parity for this step is intact. Raises
    :class:`RedundancyError` naming the stripe and the missing holders when some stripe
    keeps fewer than ``k`` shards. ``names`` label the members in messages (node ranks).
    """
    n, k = geo.n, geo.k
    lost_set, ok = set(lost), set(parity_ok) - set(lost)
    label = (lambda p: str(names[p])) if names is not None else str
    stripes: dict[int, StripePlan] = {}
    for j in range(n):
        lost_data = tuple(t for t in range(k) if geo.holder(j, t) in lost_set)
        if not lost_data:
            continue
        avail = [s for s in range(n) if (geo.holder(j, s) not in lost_set if s < k else geo.holder(j, s) in ok)]
        if len(avail) < k:
            gone = sorted(geo.holder(j, s) for s in range(n) if s not in avail)
            raise RedundancyError(
                f"stripe {j} keeps {len(avail)} of the {k} shards it needs (no shard on node(s) {', '.join(label(g) for g in gone)})"
            )
        chosen = tuple(avail[:k])
        stripes[j] = StripePlan(chosen, geo.holder(j, chosen[j % k]), lost_data)
    return RebuildPlan(tuple(sorted(lost_set)), stripes)


def _own_shard(geo: Geometry, p: int, j: int, s: int, lo: int, c: int, data: NodeBytes, parity: torch.Tensor | None,
               slots: dict[int, int], into: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Member ``p``'s shard ``s`` of stripe ``j``, bytes ``[lo, lo + c)``: (bytes, how many exist)."""
    if s < geo.k:
        have = _clamp(geo.present(p, s) - lo, c)
        return (data.read(s * geo.block(p) + lo, have, into) if have else into[:0]), have
    if parity is None:
        raise RedundancyError(f"member {p} was chosen to send parity of stripe {j} but holds none")
    off = slots[j] + lo
    return parity[off : off + c], c


def rebuild_rounds(
    geo: Geometry,
    plan: RebuildPlan,
    p: int,
    data: NodeBytes,
    parity: torch.Tensor | None,
    net: Transport,
    rs,
    chunk: int,
    stop: Callable[[], bool] | None = None,
) -> None:
    """Member ``p``'s part of rebuilding the lost members' data.

    Survivors send their chosen shards' chunks to each stripe's decoder; the decoder
    zero-fills short data blocks, decodes the lost blocks and sends each to its owner,
    who writes it into its (new) data files ``data``.
    """
    n, k = geo.n, geo.k
    i_am_lost = p in plan.lost
    slots = {j: off for _, j, off in geo.parity_slots(p)}
    stage = torch.empty(chunk, dtype=torch.uint8)
    dec: dict[int, list[torch.Tensor]] = {}
    outs: dict[int, list[torch.Tensor]] = {}
    mine: dict[tuple[int, int], torch.Tensor] = {}
    send_bufs: dict[int, torch.Tensor] = {}
    for r in range(geo.rounds(chunk)):
        if stop is not None and stop():
            raise RedundancyError("rebuild interrupted (the keeper is stopping)")
        lo = r * chunk
        recv_in: list[Work] = []
        other: list[Work] = []
        decode_jobs = []
        for j, sp in sorted(plan.stripes.items()):
            c = _clamp(geo.stripe(j) - lo, chunk)
            if not c:
                continue
            tag = (r * n + j) * 2
            if p == sp.decoder:
                bufs = dec.setdefault(j, [torch.empty(min(chunk, geo.stripe(j)), dtype=torch.uint8) for _ in range(k)])
                haves = []
                for idx, s in enumerate(sp.chosen):
                    holder = geo.holder(j, s)
                    have = c if s >= k else _clamp(geo.present(holder, s) - lo, c)
                    haves.append(have)
                    if holder == p:
                        src, _ = _own_shard(geo, p, j, s, lo, c, data, parity, slots, stage)
                        bufs[idx][:have].copy_(src[:have])
                    elif have:
                        recv_in.append(net.irecv(bufs[idx][:have], holder, tag + TAG_SRC))
                decode_jobs.append((j, sp, c, haves))
            elif p in {geo.holder(j, s) for s in sp.chosen}:
                s = geo.shard_of(p, j)
                buf = send_bufs.setdefault(j, torch.empty(chunk, dtype=torch.uint8))
                src, have = _own_shard(geo, p, j, s, lo, c, data, parity, slots, buf)
                if have:
                    other.append(net.isend(src[:have], sp.decoder, tag + TAG_SRC))
            if i_am_lost and geo.shard_of(p, j) in sp.lost:
                t = geo.shard_of(p, j)
                have = _clamp(geo.present(p, t) - lo, c)
                if have:
                    buf = mine.setdefault((j, t), torch.empty(chunk, dtype=torch.uint8))
                    other.append(net.irecv(buf[:have], sp.decoder, tag + TAG_OUT))
        wait_all(recv_in)
        for j, sp, c, haves in decode_jobs:
            bufs = dec[j]
            for idx, have in enumerate(haves):
                if have < c:
                    bufs[idx][have:c].zero_()
            shards: list[torch.Tensor | None] = [None] * n
            for idx, s in enumerate(sp.chosen):
                shards[s] = bufs[idx][:c]
            res = outs.setdefault(j, [torch.empty(min(chunk, geo.stripe(j)), dtype=torch.uint8) for _ in range(k)])
            out: list[torch.Tensor | None] = [None] * k
            for t in sp.lost:
                if shards[t] is None:
                    out[t] = res[t][:c]
            decoded = rs.decode(shards, out=out)
            tag = (r * n + j) * 2
            for t in sp.lost:
                owner = geo.holder(j, t)
                have = _clamp(geo.present(owner, t) - lo, c)
                if have:
                    other.append(net.isend(decoded[t][:have], owner, tag + TAG_OUT))
        wait_all(other)
        if i_am_lost:
            for (j, t), buf in mine.items():
                have = _clamp(geo.present(p, t) - lo, _clamp(geo.stripe(j) - lo, chunk))
                if have:
                    data.write(t * geo.block(p) + lo, buf[:have])
