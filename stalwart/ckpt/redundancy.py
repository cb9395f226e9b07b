"""Redundancy across keepers: erasure-coded memory snapshots that survive lost nodes.

The keepers of a job form *redundancy groups* of ``n = k + m`` consecutive node
ranks (failure domains). Node ``i``'s snapshot bytes of a step, ``D_i`` (its local
ranks' slot files concatenated in rank order), are cut into ``k`` blocks. Stripe
``j`` (``j = 0 .. n-1``) takes data block ``t`` from node ``(j + t) mod n`` and puts
its parity ``u`` on node ``(j + k + u) mod n``: every node holds exactly one shard of
every stripe (never two), ``k`` data blocks of its own and ``m`` parity blocks, so the
parity overhead is ``m / k`` of the data and losing any ``m`` nodes leaves every stripe
decodable. See docs/ERASURE.md ("Redundancy across keepers") for the protocol.

This module holds the parts the keeper (:mod:`stalwart.ckpt.keeper`) hooks in:

* configuration (:class:`ECConfig`) and the placement math (:class:`Geometry`),
  pure and unit-tested;
* the round executors that move and code the bytes over any point-to-point
  transport (:func:`encode_rounds`, :func:`rebuild_rounds`, :func:`plan_rebuild`),
  run over gloo in the keepers and over in-process queues in tests;
* :class:`StoreLink`: the keepers' TCPStore client (a pool of connections, reconnect
  after node 0's keeper restarts, heartbeats, liveness-aware gathers);
* :class:`Redundancy`: the per-keeper background agent (generations, encode tasks,
  recovery of lost nodes' snapshots);
* :class:`PeerService`: byte-range reads of another node's memory snapshot, so a
  multi-node memory restore reads from memory, a peer, or a rebuilt (decoded) slot
  through the ordinary ``Checkpoint`` reader.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import secrets
import shutil
import socket
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch

from stalwart.errors import StalwartError
from stalwart.formats import checksum as ck

if TYPE_CHECKING:  # pragma: no cover
    from stalwart.ckpt.keeper import Keeper, Slot

log = logging.getLogger("stalwart.keeper")

ALIGN = 64  # block and stripe sizes are multiples of this (the codec's word size)
DEFAULT_CHUNK = 8 * 1024 * 1024
PARITY_FILE = "parity.bin"
PARITY_META = "parity.json"
#: A slot's parity file kept, mapped, after its step left the slot: the next step's
#: parity is written into it (a fresh file costs ~0.7 us of page zeroing and faults per KiB).
PARITY_SPARE = "parity.spare"
NODES_FILE = "nodes.json"  # rank -> node of a slot's snapshot (who holds which file)
SLOT_EXTRA_FILES = (PARITY_FILE, PARITY_META, PARITY_FILE + ".tmp", NODES_FILE)
PARITY_BLOCK = ck.DEFAULT_BLOCK_SIZE


def _host_id() -> str:
    """This machine and boot, plus the shared-memory mount's identity: members with the
    same id read each other's snapshot files in place."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = "?"
    try:
        shm = os.stat("/dev/shm")
        dev = f"{shm.st_dev}:{shm.st_ino}"
    except OSError:
        dev = "?"
    return f"{socket.gethostname()}/{boot}/{dev}"


HOST_ID = _host_id()


class RedundancyError(StalwartError):
    """Erasure-coded memory snapshots cannot be formed, kept or rebuilt (the message says why)."""


class GroupError(RedundancyError):
    """Another keeper of the group is gone or did not answer in time."""


# ============================================================================ configuration


@dataclass(frozen=True)
class ECConfig:
    """Redundancy settings: RS(``k``, ``m``) across groups of ``k + m`` nodes.

    ``max_parity_memory``: bytes of parity one keeper may hold (older parity is dropped
    first; a step whose parity alone exceeds the cap is not protected, and says so).
    ``chunk``: bytes per transfer round; ``rate``: bytes/s each keeper sends at most
    (None: unlimited); ``rebuild_wait_s``: how long a restarting trainer waits for its
    keeper's group to form and rebuild lost snapshots before restoring without it;
    ``nice``: how much lower the coding threads' CPU priority is than the keeper's (0:
    the same), so that on a busy node coding yields to training; ``shared``: when all
    members of a group share one machine's memory (intra-node mode), read each other's
    snapshot files in place instead of sending them (False: always the network).
    """

    k: int
    m: int
    max_parity_memory: int | None = None
    chunk: int = DEFAULT_CHUNK
    rate: float | None = None
    rebuild_wait_s: float = 300.0
    nice: int = 10
    shared: bool = True

    def __post_init__(self) -> None:
        if not (isinstance(self.k, int) and isinstance(self.m, int)) or self.k < 1 or self.m < 1 or self.k + self.m > 256:
            raise RedundancyError(f"redundancy needs integers k >= 1, m >= 1, k + m <= 256; got k={self.k!r}, m={self.m!r}")
        if self.chunk < ALIGN or self.chunk % ALIGN:
            raise RedundancyError(f"redundancy chunk must be a positive multiple of {ALIGN} bytes, got {self.chunk}")
        if self.max_parity_memory is not None and self.max_parity_memory < 0:
            raise RedundancyError("max_parity_memory must be >= 0")

    @property
    def n(self) -> int:
        """Nodes per redundancy group (``k + m``)."""
        return self.k + self.m

    @property
    def overhead(self) -> float:
        """Parity bytes per data byte of a balanced group, ``m / k``."""
        return self.m / self.k

    @staticmethod
    def coerce(value, max_parity_memory: int | None = None) -> ECConfig | None:
        """``None``, ``(k, m)``, ``"k,m"`` or an :class:`ECConfig` (the cap overrides when given)."""
        if value is None:
            return None
        if isinstance(value, ECConfig):
            cfg = value
        elif isinstance(value, str):
            k, m = parse_ec(value)
            cfg = ECConfig(k, m)
        else:
            try:
                k, m = value
            except (TypeError, ValueError):
                raise RedundancyError(f"redundancy must be (k, m), got {value!r}") from None
            cfg = ECConfig(int(k), int(m))
        if max_parity_memory is not None:
            cfg = ECConfig(cfg.k, cfg.m, int(max_parity_memory), cfg.chunk, cfg.rate, cfg.rebuild_wait_s)
        return cfg


def parse_ec(text: str) -> tuple[int, int]:
    """``"4,2"`` -> ``(4, 2)``."""
    try:
        k, m = (int(x) for x in text.split(","))
    except ValueError:
        raise RedundancyError(f"--ec wants 'k,m' (e.g. 4,2), got {text!r}") from None
    return k, m


def check_topology(k: int, m: int, nodes: int) -> None:
    """Raise unless ``nodes`` splits into redundancy groups of ``k + m`` failure domains."""
    n = k + m
    if nodes < n or nodes % n:
        raise RedundancyError(
            f"redundancy=({k}, {m}) needs the job's nodes to form groups of k+m={n} failure domains, but it has"
            f" {nodes} node(s) ({nodes} % {n} = {nodes % n}). Use a (k, m) with k+m dividing the node count; on a"
            " single host, run one keeper per rank (intra-node mode): STALWART_LOCAL_WORLD_SIZE=1 and"
            " STALWART_KEEPER_GROUP=host:port"
        )


def group_members(node: int, n: int) -> list[int]:
    """The node ranks of ``node``'s redundancy group (consecutive ranks in chunks of ``n``)."""
    first = node - node % n
    return list(range(first, first + n))


def snapshot_id(records: Sequence[dict]) -> str:
    """Identity of a snapshot's bytes: a digest over every data file's record (the header
    digest covers every block checksum), so two slots of one step agree only if equal."""
    rows = sorted((int(r.get("rank", -1)), str(r["path"]), int(r["size"]), str(r["header_digest"])) for r in records)
    return ck.digest(json.dumps(rows, separators=(",", ":")).encode())


# ============================================================================ placement


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


# ============================================================================ bytes and transport


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


class Work(Protocol):
    def wait(self) -> Any: ...


class Transport(Protocol):
    """Point-to-point messages between the members of a group (indices ``0 .. n-1``)."""

    def isend(self, buf: torch.Tensor, dst: int, tag: int) -> Work: ...

    def irecv(self, buf: torch.Tensor, src: int, tag: int) -> Work: ...


class GlooTransport:
    """:class:`Transport` over a ``ProcessGroupGloo`` (ranks = member indices)."""

    def __init__(self, pg) -> None:
        self.pg = pg

    def isend(self, buf: torch.Tensor, dst: int, tag: int) -> Work:
        return self.pg.send([buf], dst, tag)

    def irecv(self, buf: torch.Tensor, src: int, tag: int) -> Work:
        return self.pg.recv([buf], src, tag)


class LocalTransport:
    """In-process :class:`Transport` for tests: one per member, all sharing a mailbox."""

    class _Done:
        def wait(self) -> None:
            return None

    class _Recv:
        def __init__(self, box: LocalTransport, key, buf: torch.Tensor) -> None:
            self.box, self.key, self.buf = box, key, buf

        def wait(self) -> None:
            data = self.box.take(self.key)
            if data.numel() != self.buf.numel():
                raise RedundancyError(f"message {self.key}: {data.numel()} bytes sent, {self.buf.numel()} expected")
            self.buf.copy_(data)

    def __init__(self, me: int, mailbox: dict, cond: threading.Condition, timeout_s: float = 30.0) -> None:
        self.me, self.mailbox, self.cond, self.timeout_s = me, mailbox, cond, timeout_s

    @staticmethod
    def group(n: int) -> list[LocalTransport]:
        box: dict = {}
        cond = threading.Condition()
        return [LocalTransport(i, box, cond) for i in range(n)]

    def isend(self, buf: torch.Tensor, dst: int, tag: int) -> Work:
        with self.cond:
            self.mailbox.setdefault((self.me, dst, tag), []).append(buf.clone())
            self.cond.notify_all()
        return LocalTransport._Done()

    def irecv(self, buf: torch.Tensor, src: int, tag: int) -> Work:
        return LocalTransport._Recv(self, (src, self.me, tag), buf)

    def take(self, key) -> torch.Tensor:
        deadline = time.monotonic() + self.timeout_s
        with self.cond:
            while not self.mailbox.get(key):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise GroupError(f"no message {key} within {self.timeout_s}s")
                self.cond.wait(left)
            return self.mailbox[key].pop(0)


class Pacer:
    """Keeps the average send rate at or below ``rate`` bytes/s (None: no limit)."""

    def __init__(self, rate: float | None) -> None:
        self.rate = rate
        self.sent = 0
        self.t0 = time.monotonic()

    def __call__(self, nbytes: int) -> None:
        if not self.rate:
            return
        self.sent += nbytes
        ahead = self.sent / self.rate - (time.monotonic() - self.t0)
        if ahead > 0:
            time.sleep(ahead)


def _wait_all(works: list[Work]) -> None:
    for w in works:
        w.wait()


# ============================================================================ encoding

_DATA, _PARITY, _SRC, _OUT = 0, 1, 0, 1


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
                    data_recv.append(net.irecv(enc_in[t][: have[t]], src, r * 2 + _DATA))
        for u in range(1, m):
            j = (p - k - u) % n
            c = _clamp(geo.stripe(j) - lo, chunk)
            if c:
                off = slots[u] + lo
                other.append(net.irecv(parity[off : off + c], (p - u) % n, r * 2 + _PARITY))
        for t in range(k):
            j = (p - t) % n
            c = _clamp(geo.present(p, t) - lo, chunk)
            if c:
                other.append(net.isend(data.read(t * block + lo, c, stage[t]), geo.holder(j, k), r * 2 + _DATA))
                sent += c
        _wait_all(data_recv)
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
                other.append(net.isend(enc_out[u - 1][:c0], (p + u) % n, r * 2 + _PARITY))
                sent += c0
        _wait_all(other)
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


# ============================================================================ rebuilding


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
                        recv_in.append(net.irecv(bufs[idx][:have], holder, tag + _SRC))
                decode_jobs.append((j, sp, c, haves))
            elif p in {geo.holder(j, s) for s in sp.chosen}:
                s = geo.shard_of(p, j)
                buf = send_bufs.setdefault(j, torch.empty(chunk, dtype=torch.uint8))
                src, have = _own_shard(geo, p, j, s, lo, c, data, parity, slots, buf)
                if have:
                    other.append(net.isend(src[:have], sp.decoder, tag + _SRC))
            if i_am_lost and geo.shard_of(p, j) in sp.lost:
                t = geo.shard_of(p, j)
                have = _clamp(geo.present(p, t) - lo, c)
                if have:
                    buf = mine.setdefault((j, t), torch.empty(chunk, dtype=torch.uint8))
                    other.append(net.irecv(buf[:have], sp.decoder, tag + _OUT))
        _wait_all(recv_in)
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
                    other.append(net.isend(decoded[t][:have], owner, tag + _OUT))
        _wait_all(other)
        if i_am_lost:
            for (j, t), buf in mine.items():
                have = _clamp(geo.present(p, t) - lo, _clamp(geo.stripe(j) - lo, chunk))
                if have:
                    data.write(t * geo.block(p) + lo, buf[:have])


# ============================================================================ the keepers' store


class StoreDown(GroupError):
    """The keepers' TCPStore (hosted by node 0's keeper) cannot be reached."""


def _td(seconds: float) -> datetime.timedelta:
    return datetime.timedelta(seconds=seconds)


def local_address(group_host: str) -> str:
    """The address other keepers reach this one at (``STALWART_KEEPER_ADDR`` overrides)."""
    env = os.environ.get("STALWART_KEEPER_ADDR")
    if env:
        return env
    if group_host in ("localhost", "::1") or group_host.startswith("127."):
        return "127.0.0.1"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((group_host, 1))  # no packet is sent: this picks the interface routing to the store
        return s.getsockname()[0]


class StoreLink:
    """The keepers' TCPStore, made robust for background use.

    * a pool of client connections (a blocking ``wait`` on a TCPStore client blocks
      every other call on it, so concurrent threads never share one);
    * reconnects when the store is gone (node 0's keeper died) and, on reaching a *new*
      store (its ``store/id`` changed), re-publishes this keeper's kept keys;
    * a heartbeat counter ``beat/node<i>`` every ``beat_s`` and ``inc/node<i>``, this
      keeper process's incarnation, so peers can tell dead or replaced keepers;
    * :meth:`gather` waits for every node's key of a step but gives up early, naming
      them, on nodes whose heartbeat stopped or whose keeper was replaced.
    """

    def __init__(
        self,
        host: str,
        port: int,
        node: int,
        nodes: int,
        *,
        timeout_s: float = 600.0,
        op_timeout_s: float = 30.0,
        beat_s: float = 1.0,
        dead_after_s: float | None = None,
    ) -> None:
        import torch.distributed as dist

        self._dist = dist
        self.host, self.port, self.node, self.nodes = host, port, node, nodes
        self.timeout_s = timeout_s
        self.op_timeout_s = op_timeout_s
        self.beat_s = beat_s
        self.dead_after_s = dead_after_s if dead_after_s is not None else float(os.environ.get("STALWART_KEEPER_DEAD_AFTER_S", "10"))
        self.inc = f"{socket.gethostname()}/{os.getpid()}/{secrets.token_hex(4)}"
        self.epoch = 0  # bumped whenever a new store (another node-0 keeper) is reached
        self._store_id: str | None = None
        self._lock = threading.Lock()
        self._idle: list = []
        self._kept: dict[str, str] = {}
        self._beats: dict[int, tuple[int, float]] = {}
        self._stop = threading.Event()
        self._server = self._host_store() if node == 0 else None
        self.keep(f"inc/node{node}", self.inc)
        threading.Thread(target=self._heartbeat, name="store-beat", daemon=True).start()

    # ---------------------------------------------------------------- connections
    def _host_store(self):
        deadline = time.monotonic() + 60
        while True:
            try:
                server = self._dist.TCPStore(self.host, self.port, self.nodes, True, timeout=_td(self.op_timeout_s),
                                             wait_for_workers=False)
                break
            except Exception as e:  # the port may still be held by a dying predecessor
                if time.monotonic() > deadline:
                    raise StoreDown(f"cannot host the keepers' store on port {self.port}: {e}") from None
                time.sleep(0.5)
        server.set("store/id", self.inc)
        self._store_id = self.inc
        return server

    def new_client(self):
        """A fresh client connection (raises when the store cannot be reached)."""
        c = self._dist.TCPStore(self.host, self.port, self.nodes, False, timeout=_td(self.op_timeout_s))
        sid = c.get("store/id").decode()
        republish = False
        with self._lock:
            if self._store_id is None:
                self._store_id = sid
            elif sid != self._store_id:
                self._store_id = sid
                self.epoch += 1
                self._beats.clear()
                republish = True
            kept = dict(self._kept)
        if republish:
            log.warning("the keepers' store was restarted (node 0's keeper is new): re-joining")
            for k, v in kept.items():
                c.set(k, v)
        return c

    def _take(self):
        with self._lock:
            if self._idle:
                return self._idle.pop()
        return self.new_client()

    def _give(self, c) -> None:
        with self._lock:
            self._idle.append(c)

    def call(self, fn: Callable, retry_s: float | None = None):
        """``fn(client)``; on a network error retries on a new connection for ``retry_s``."""
        deadline = time.monotonic() + (self.op_timeout_s if retry_s is None else retry_s)
        while True:
            try:
                c = self._take()
            except Exception as e:  # cannot connect (yet)
                last: Exception = e
            else:
                try:
                    out = fn(c)
                except self._dist.DistNetworkError as e:
                    last = e  # the connection is dead: drop it
                except BaseException:
                    self._give(c)
                    raise
                else:
                    self._give(c)
                    return out
            if self._stop.is_set() or time.monotonic() > deadline:
                first = str(last).splitlines()[0] if str(last) else type(last).__name__
                raise StoreDown(f"the keepers' store at {self.host}:{self.port} is unreachable ({first})")
            time.sleep(0.5)

    def close(self) -> None:
        self._stop.set()

    # ---------------------------------------------------------------- key/value
    def set(self, key: str, value: str) -> None:
        self.call(lambda c: c.set(key, value))

    def keep(self, key: str, value: str) -> None:
        """Set ``key`` and set it again on every new store this keeper reaches."""
        with self._lock:
            self._kept[key] = value
        with contextlib.suppress(StoreDown):
            self.set(key, value)

    def get(self, key: str) -> str | None:
        """The value of ``key``, or None when it does not exist."""

        def fn(c):
            return c.get(key).decode() if c.check([key]) else None

        return self.call(fn)

    def add(self, key: str, amount: int) -> int:
        return int(self.call(lambda c: c.add(key, amount)))

    def check(self, key: str) -> bool:
        return bool(self.call(lambda c: c.check([key])))

    def delete(self, key: str) -> None:
        with contextlib.suppress(Exception):
            self.call(lambda c: c.delete_key(key), retry_s=1.0)

    def wait(self, keys: list[str], timeout_s: float) -> bool:
        """Whether all ``keys`` exist within ``timeout_s`` (False on timeout)."""

        def fn(c):
            try:
                c.wait(keys, _td(max(timeout_s, 0.01)))
                return True
            except self._dist.DistNetworkError:
                raise
            except self._dist.DistStoreError:
                return False

        return self.call(fn, retry_s=max(self.op_timeout_s, timeout_s))

    # ---------------------------------------------------------------- liveness
    def _heartbeat(self) -> None:
        key = f"beat/node{self.node}"
        while not self._stop.wait(self.beat_s):
            try:
                self.call(lambda c: c.add(key, 1), retry_s=self.beat_s * 3)
            except Exception as e:  # the store is down: keep trying
                log.debug("heartbeat: %s", e)

    def dead(self, nodes: Sequence[int], incs: dict[int, str | None] | None = None) -> list[int]:
        """Nodes whose keeper's heartbeat has not moved for ``dead_after_s`` (as seen from
        here), or whose current incarnation differs from ``incs[node]``."""
        out = []
        now = time.monotonic()
        for i in nodes:
            if incs is not None and i in incs and self.get(f"inc/node{i}") != incs[i]:
                out.append(i)
                continue
            v = self.add(f"beat/node{i}", 0)
            with self._lock:
                prev = self._beats.get(i)
                if prev is None or prev[0] != v:
                    self._beats[i] = (v, now)
                elif now - prev[1] > self.dead_after_s:
                    out.append(i)
        return out

    def alive(self, nodes: Sequence[int]) -> list[int]:
        """Nodes whose heartbeat moved within ``dead_after_s`` (call repeatedly: one look
        at a counter cannot tell)."""
        now = time.monotonic()
        out = []
        for i in nodes:
            v = self.add(f"beat/node{i}", 0)
            with self._lock:
                prev = self._beats.get(i)
                if prev is None:
                    self._beats[i] = (v, now - self.dead_after_s - 1)  # unknown: must move to count
                elif prev[0] != v:
                    self._beats[i] = (v, now)
                    out.append(i)
                elif now - prev[1] <= self.dead_after_s:
                    out.append(i)
        return out

    def gather(
        self,
        key: str,
        nodes: Sequence[int],
        *,
        incs: dict[int, str | None] | None = None,
        timeout_s: float | None = None,
        abort: Callable[[list[int]], str | None] | None = None,
    ) -> list:
        """Every node's JSON value of ``key`` (``<key>/node<i>``), in ``nodes`` order.

        Raises :class:`GroupError` naming the nodes that did not publish when their
        keeper is dead or was replaced (by ``incs``, or since this call started), when
        ``abort(missing_nodes)`` returns a reason, or after ``timeout_s``.
        """
        keys = [f"{key}/node{i}" for i in nodes]
        deadline = time.monotonic() + (self.timeout_s if timeout_s is None else timeout_s)
        seen = dict(incs) if incs else {}
        while not self.wait(keys, min(2.0, max(0.05, deadline - time.monotonic()))):
            missing = [i for i, k in zip(nodes, keys, strict=True) if not self.check(k)]
            if not missing:
                break
            for i in missing:
                seen.setdefault(i, self.get(f"inc/node{i}"))
            dead = self.dead(missing, seen)
            if dead:
                raise GroupError(f"{key}: the keeper of node(s) {', '.join(map(str, dead))} is gone or was replaced")
            why = abort(missing) if abort is not None else None
            if why:
                raise GroupError(f"{key}: {why}")
            if time.monotonic() > deadline:
                raise GroupError(f"{key}: node(s) {', '.join(map(str, missing))} did not report within the timeout")
        return [json.loads(self.call(lambda c, k=k: c.get(k)).decode()) for k in keys]


# ============================================================================ the agent

PG_TIMEOUT_S = 120.0  # one gloo transfer (a dead peer fails at once: its sockets close)
JOIN_TIMEOUT_S = 60.0
READY_WAIT_S = 30.0  # for this keeper's own memory commit of the step to encode
DONE_TIMEOUT_S = 600.0


@dataclass
class Session:
    """One generation of a redundancy group: its members' incarnations and gloo group."""

    prefix: str
    gen: int
    incs: dict[int, str]
    joins: list[dict]
    pg: Any
    client: Any
    can_share: bool = False  # this member can read every member's shared memory in place
    seq: int = 0
    checked: float = field(default_factory=time.monotonic)

    def close(self) -> None:
        self.pg = None
        self.client = None


@dataclass
class _Held:
    """A slot pinned for EC work and its memory maps (released in ``finally``)."""

    slot: Slot
    data: NodeBytes | None = None
    parity: torch.Tensor | None = None
    tmp: str | None = None


class Redundancy:
    """A keeper's part of its redundancy group (a background thread).

    Member 0 of the group leads: it starts a *generation* once every member's keeper is
    alive (``ec/g<g>/cur`` = generation number + the members' incarnations); members
    publish their inventory and build a fresh gloo group under the generation's store
    prefix, so a re-formed group never meets stale addresses. The leader's first task
    of a generation is recovery (rebuild the newest EC-protected step that some members
    lost, or report why it cannot be); then it issues one encode task at a time for the
    newest memory-committed step (steps are skipped when encoding is slower than
    snapshots). Any member's failure (a dead peer, a replaced keeper, a gloo error) ends
    the generation; the leader starts the next one.
    """

    def __init__(self, keeper: Keeper, link: StoreLink, cfg: ECConfig, node: int, nodes: int, bind_host: str) -> None:
        from stalwart.ckpt.erasure import ReedSolomon

        check_topology(cfg.k, cfg.m, nodes)
        self.keeper, self.link, self.cfg = keeper, link, cfg
        self.node, self.nodes = node, nodes
        self.members = group_members(node, cfg.n)
        self.me = self.members.index(node)
        self.group = node // cfg.n
        self.bind_host = bind_host
        self.rs = ReedSolomon(cfg.k, cfg.m)
        self.meta: dict[int, dict] = {}  # slot index -> parity metadata (parity.json)
        self._parity_maps: dict[int, torch.Tensor] = {}  # slot index -> mapping of its parity.bin
        self._spares: dict[int, torch.Tensor] = {}  # slot index -> mapping of its parity.spare
        self.state = "forming"
        self.settled = False
        self.generation: int | None = None
        self.recovery_error: str | None = None
        self.errors: list[str] = []
        self.rebuilt: list[int] = []
        self.encoded = 0
        self.parity_reused = 0  # steps whose parity went into a set-aside buffer
        self.skipped = 0
        self.last_skip: str | None = None
        self._last_skip_why: str | None = None
        self.last_encode_s: float | None = None
        self.mode: str | None = None  # how the last step was coded: "gloo" or "shared-memory"
        self.last_encode_cpu_s: float | None = None  # CPU time of this keeper's coding thread for it
        self._last_gen: tuple[int, int] = (-1, 0)
        self._attempted: tuple[int, str] | None = None
        self._verified: set[tuple[int, int, str]] = set()
        with keeper.cond:
            self._load_parity()

    # ---------------------------------------------------------------- keeper hooks
    def start(self) -> None:
        threading.Thread(target=self.run, name="ec", daemon=True).start()

    def forget(self, slot: Slot) -> None:
        """The slot's snapshot is about to go (called by the keeper, lock held, before it
        removes the slot's files): its parity file is set aside, still mapped, for the
        slot's next step."""
        self.meta.pop(slot.index, None)
        buf = self._parity_maps.pop(slot.index, None)
        self._drop_spare(slot)
        cap = self.cfg.max_parity_memory
        if buf is not None and cap is not None:  # kept only while parity + set-aside fit the cap
            held = sum(int(m["size"]) for m in self.meta.values()) + sum(t.numel() for t in self._spares.values())
            if held + buf.numel() > cap:
                buf = None
        if buf is not None:
            try:
                os.replace(os.path.join(slot.dir, PARITY_FILE), os.path.join(slot.dir, PARITY_SPARE))
                self._spares[slot.index] = buf
            except OSError:
                pass

    def _drop_spare(self, slot: Slot) -> None:
        """Free the slot's set-aside parity file (its mapping first: a mapped file keeps its memory)."""
        self._spares.pop(slot.index, None)
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(slot.dir, PARITY_SPARE))

    def status(self) -> dict:
        """Called with the keeper's lock held."""
        slots = self.keeper.slots
        parity = sum(int(m["size"]) for m in self.meta.values())
        data = sum(int(m["data_bytes"]) for m in self.meta.values())
        return {
            "k": self.cfg.k, "m": self.cfg.m, "group": self.members, "member": self.me, "generation": self.generation,
            "state": self.state, "settled": self.settled,
            "protected": sorted(s.step for s in slots if s.protected and s.step is not None),
            "parity_bytes": parity, "spare_parity_bytes": sum(t.numel() for t in self._spares.values()),
            "parity_reused": self.parity_reused,
            "overhead": self.cfg.overhead, "parity_per_data_byte": parity / data if data else None,
            "max_parity_memory": self.cfg.max_parity_memory, "encoded": self.encoded, "skipped": self.skipped,
            "last_skip": self.last_skip, "mode": self.mode, "last_encode_cpu_s": self.last_encode_cpu_s,
            "last_encode_s": self.last_encode_s, "codec": self.rs.resolve_backend([]), "rebuilt": list(self.rebuilt),
            "recovery_error": self.recovery_error,
            "errors": self.errors[-10:],
        }

    def _load_parity(self) -> None:
        """Parity of adopted slots (a restarted keeper on a node that kept its memory)."""
        for s in self.keeper.slots:
            with contextlib.suppress(FileNotFoundError):  # a previous keeper's set-aside buffer
                os.remove(os.path.join(s.dir, PARITY_SPARE))
            path = os.path.join(s.dir, PARITY_META)
            if not (s.complete and os.path.exists(path)):
                continue
            try:
                with open(path) as f:
                    meta = json.load(f)
                ok = (meta["step"], meta["sid"], meta["member"], meta["group"]) == (s.step, s.sid, self.me, self.group)
            except (OSError, ValueError, KeyError):
                ok = False
            if ok and os.path.getsize(os.path.join(s.dir, PARITY_FILE)) == int(meta["size"]):
                self.meta[s.index] = meta
            else:
                for name in (PARITY_FILE, PARITY_META):
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(os.path.join(s.dir, name))

    def _stopping(self) -> bool:
        return self.keeper.stopping

    def _error(self, msg: str) -> None:
        log.error("%s", msg)
        self.errors.append(msg)
        del self.errors[:-20]

    # ---------------------------------------------------------------- main loop
    def run(self) -> None:
        _lower_priority(self.cfg.nice)
        backoff = 0.5
        while not self._stopping():
            session = None
            try:
                session = self._open()
                if session is None:
                    continue
                backoff = 0.5
                if self.me == 0:
                    self._lead(session)
                else:
                    self._follow(session)
            except Exception as e:
                if self._stopping():
                    break
                why = str(e).splitlines()[0] if str(e) else type(e).__name__
                log.warning("redundancy group %s: generation %s ended: %s", self.group, self.generation, why)
                log.debug("%s", traceback.format_exc())
                self.state = "forming"
                if session is not None:
                    with contextlib.suppress(Exception):
                        self.link.set(f"{session.prefix}/failed", f"node {self.node}: {why}")
                time.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
            finally:
                if session is not None:
                    session.close()

    def _open(self) -> Session | None:
        self.state = "forming"
        if self.me == 0:
            self._new_generation()
        cur = self._await_generation()
        if cur is None:
            return None
        gen, incs = cur["gen"], dict(zip(self.members, cur["incs"], strict=True))
        # no store epoch in the key: a new store starts empty, and a keeper that restarted
        # the store counts epochs from 0 while the survivors count theirs from 1
        prefix = f"ec/g{self.group}/gen{gen}"
        self.link.set(f"{prefix}/join/node{self.node}", json.dumps(self._inventory()))
        joins = self.link.gather(f"{prefix}/join", self.members, incs=incs, timeout_s=JOIN_TIMEOUT_S,
                                 abort=lambda _: self._over(prefix, gen))
        pg, client = self._form_pg(prefix)
        self.generation = gen
        log.info("redundancy group %s (nodes %s): generation %s formed", self.group, self.members, gen)
        return Session(prefix, gen, incs, joins, pg, client, can_share=self._can_share(joins))

    def _new_generation(self) -> None:
        """Leader: wait until every member's keeper is alive, then announce a generation."""
        shown = 0.0
        while not self._stopping():
            incs = [self.link.get(f"inc/node{i}") for i in self.members]
            alive = set(self.link.alive(self.members))
            if all(incs) and alive == set(self.members):
                break
            if time.monotonic() - shown > 30:
                missing = [i for i, v in zip(self.members, incs, strict=True) if not v or i not in alive]
                log.info("redundancy group %s: waiting for the keepers of node(s) %s", self.group, missing)
                shown = time.monotonic()
            time.sleep(0.5)
        else:
            return
        gen = self.link.add(f"ec/g{self.group}/gen", 1)
        self.link.set(f"ec/g{self.group}/cur", json.dumps({"gen": gen, "incs": incs}))

    def _await_generation(self) -> dict | None:
        while not self._stopping():
            raw = self.link.get(f"ec/g{self.group}/cur")
            if raw:
                cur = json.loads(raw)
                key = (self.link.epoch, int(cur["gen"]))
                if key > self._last_gen and cur["incs"][self.me] == self.link.inc:
                    self._last_gen = key
                    return cur
            time.sleep(0.25)
        return None

    def _form_pg(self, prefix: str):
        import torch.distributed as dist

        client = self.link.new_client()
        store = dist.PrefixStore(f"{prefix}/pg", client)
        cls = dist.ProcessGroupGloo
        if hasattr(cls, "_Options"):
            opts = cls._Options()
            opts._timeout = _td(PG_TIMEOUT_S)
            opts._devices = [cls.create_device(hostname=self.bind_host)]
            return cls(store, self.me, self.cfg.n, opts), client
        return cls(store, self.me, self.cfg.n, _td(PG_TIMEOUT_S)), client  # pragma: no cover

    def _over(self, prefix: str, gen: int) -> str | None:
        """Why generation ``gen`` is over (a member failed, a newer one began), or None."""
        failed = self.link.get(f"{prefix}/failed")
        if failed:
            return f"a member failed ({failed})"
        raw = self.link.get(f"ec/g{self.group}/cur")
        if raw and int(json.loads(raw)["gen"]) != gen:
            return "the leader started a new generation"
        return None

    def _check(self, session: Session) -> None:
        """Raise when the generation is over: a member died or was replaced, someone failed,
        or the leader announced a newer generation."""
        if time.monotonic() - session.checked < 1.0:
            return
        session.checked = time.monotonic()
        others = [i for i in self.members if i != self.node]
        dead = self.link.dead(others, session.incs)
        if dead:
            raise GroupError(f"the keeper of node(s) {', '.join(map(str, dead))} is gone or was replaced")
        why = self._over(session.prefix, session.gen)
        if why:
            raise GroupError(why)

    def _lead(self, session: Session) -> None:
        self._run_task(session, self._recovery_task(session))
        while not self._stopping():
            self._check(session)
            task = self._encode_task()
            if task is None:
                with self.keeper.cond:
                    self.keeper.cond.wait(0.5)
                continue
            self._run_task(session, task)

    def _follow(self, session: Session) -> None:
        while not self._stopping():
            key = f"{session.prefix}/task/{session.seq}"
            if not self.link.wait([key], 1.0):
                self._check(session)
                continue
            self._execute(session, json.loads(self.link.get(key) or "{}"))

    def _run_task(self, session: Session, task: dict) -> None:
        self.link.set(f"{session.prefix}/task/{session.seq}", json.dumps(task))
        self._execute(session, task)

    def _execute(self, session: Session, task: dict) -> None:
        try:
            if task.get("op") == "recover":
                self._recover(session, task)
            elif task.get("op") == "encode":
                self._encode(session, task)
            else:
                raise RedundancyError(f"unknown task {task!r}")
        finally:
            old = session.seq - 2
            if old >= 0:
                for name in ("ready", "done"):
                    self.link.delete(f"{session.prefix}/t{old}/{name}/node{self.node}")
                if self.me == 0:
                    self.link.delete(f"{session.prefix}/task/{old}")
            session.seq += 1

    def _barrier(self, session: Session, name: str, payload: dict, timeout_s: float) -> list[dict]:
        key = f"{session.prefix}/t{session.seq}/{name}"
        self.link.set(f"{key}/node{self.node}", json.dumps(payload))
        return self.link.gather(key, self.members, incs=session.incs, timeout_s=timeout_s,
                                abort=lambda _: self._over(session.prefix, session.gen))

    # ---------------------------------------------------------------- slots
    def _find(self, step: int, sid: str) -> Slot | None:
        for s in self.keeper.slots:
            if s.complete and s.step == step and s.sid == sid:
                return s
        return None

    def _release(self, held: _Held | None, keep_tmp: bool = False) -> None:
        if held is None:
            return
        held.data = None
        held.parity = None
        if held.tmp and not keep_tmp:
            with contextlib.suppress(FileNotFoundError):
                os.remove(held.tmp)
        with self.keeper.cond:
            held.slot.pins -= 1
            self.keeper.cond.notify_all()

    def _geometry(self, slot: Slot) -> Geometry:
        files = []
        for node in self.members:
            mine = [r for r in slot.records if slot.owners.get(int(r["rank"])) == node]
            files.append(tuple(sorted((int(r["rank"]), str(r["path"]), int(r["size"])) for r in mine)))
        return Geometry(self.cfg.k, self.cfg.m, tuple(files))

    def _check_files(self, slot: Slot, geo: Geometry) -> None:
        recs = {int(r["rank"]): r for r in slot.records}
        for rank, path, size in geo.files[self.me]:
            r = recs.get(rank)
            if r is None or r["path"] != path or int(r["size"]) != size or not os.path.exists(os.path.join(slot.dir, path)):
                raise RedundancyError(f"rank {rank}'s file {path} ({size} bytes) is not in this keeper's snapshot")

    # ---------------------------------------------------------------- encoding
    def _encode_task(self) -> dict | None:
        """Leader: the newest memory-committed step not yet tried, if any."""
        with self.keeper.cond:
            ready = [s for s in self.keeper.slots if s.complete and s.sid and s.owners and s.step is not None]
            if not ready:
                return None
            slot = max(ready, key=lambda s: s.step)
            key = (slot.step, slot.sid)
            if self._attempted is not None and (slot.step < self._attempted[0] or key == self._attempted):
                return None
            self._attempted = key
            if slot.protected:
                return None
            geo = self._geometry(slot)
        return {"op": "encode", "step": key[0], "sid": key[1], "geometry": geo.to_json()}

    def _make_room(self, need: int, keep: Slot) -> str | None:
        """Drop older parity so ``need`` more bytes fit under the cap (lock held)."""
        cap = self.cfg.max_parity_memory
        if cap is None:
            return None
        if need > cap:
            return f"its parity ({need} bytes) exceeds max_parity_memory ({cap} bytes)"
        for s in self.keeper.slots:  # set-aside buffers protect nothing: freed before any parity
            if s is not keep and s.index in self._spares:
                self._drop_spare(s)
        held = {i: int(m["size"]) for i, m in self.meta.items()}
        by_age = sorted((s for s in self.keeper.slots if s.index in held and s is not keep and not s.pins),
                        key=lambda s: (s.protected, s.step))
        for s in by_age:
            if sum(held.values()) + need <= cap:
                break
            log.info("max_parity_memory: dropping the parity of step %s to protect a newer one", s.step)
            self._parity_maps.pop(s.index, None)
            for name in (PARITY_FILE, PARITY_META):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(os.path.join(s.dir, name))
            self.meta.pop(s.index, None)
            s.protected = False
            held.pop(s.index)
        if sum(held.values()) + need > cap:
            return f"max_parity_memory ({cap} bytes) is held by parity that is in use"
        return None

    def _prepare_encode(self, step: int, sid: str, geo: Geometry) -> tuple[_Held | None, str | None]:
        deadline = time.monotonic() + READY_WAIT_S
        with self.keeper.cond:
            slot = self._find(step, sid)
            while slot is None and time.monotonic() < deadline and not self._stopping():
                self.keeper.cond.wait(0.2)
                slot = self._find(step, sid)
            if slot is None:
                return None, f"step {step} is not (or no longer) complete in its memory"
            need = geo.parity_bytes(self.me)
            why = self._make_room(need, slot)
            if why:
                return None, why
            slot.pins += 1
        held = _Held(slot)
        try:
            self._check_files(slot, geo)
            held.data = NodeBytes.map_files([(os.path.join(slot.dir, p), s) for _, p, s in geo.files[self.me]])
            held.tmp = os.path.join(slot.dir, PARITY_FILE + ".tmp")
            held.parity = self._parity_buffer(slot, held.tmp, need)
        except Exception as e:
            self._release(held)
            return None, f"{type(e).__name__}: {e}"
        return held, None

    def _parity_buffer(self, slot: Slot, path: str, need: int) -> torch.Tensor:
        """A mapped file of ``need`` bytes at ``path`` for a step's parity: the slot's
        set-aside buffer when it has the size (every byte is overwritten), else a new file."""
        with self.keeper.cond:
            spare = self._spares.get(slot.index)
            if spare is not None and spare.numel() == need and need:
                os.replace(os.path.join(slot.dir, PARITY_SPARE), path)
                self._spares.pop(slot.index)
                self.parity_reused += 1
                return spare
            self._drop_spare(slot)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.ftruncate(fd, need)
        finally:
            os.close(fd)
        return torch.from_file(path, shared=True, size=need, dtype=torch.uint8) if need else torch.empty(0, dtype=torch.uint8)

    def _encode(self, session: Session, task: dict) -> None:
        step, sid, geo = int(task["step"]), str(task["sid"]), Geometry.from_json(task["geometry"])
        held, why = self._prepare_encode(step, sid, geo)
        meta = None
        try:
            ready = self._barrier(session, "ready", {"ok": held is not None, "why": why, "share": session.can_share,
                                                     "dir": held.slot.dir if held else None},
                                  READY_WAIT_S + JOIN_TIMEOUT_S)
            bad = [f"node {self.members[i]}: {r['why']}" for i, r in enumerate(ready) if not r["ok"]]
            if bad:
                self._note_skip(step, "; ".join(bad))
                return
            self.state = "encoding"
            t0, c0 = time.perf_counter(), time.thread_time()
            peers = self._shared_peers(ready, geo)
            if peers is not None:  # one machine's shared memory: read the peers' files in place
                peers[self.me] = held.data
                self.mode = "shared-memory"
                encode_shared(geo, self.me, peers, held.parity, self.rs, self.cfg.chunk, self._stopping)
                del peers
            else:
                self.mode = "gloo"
                encode_rounds(geo, self.me, held.data, held.parity, GlooTransport(session.pg), self.rs, self.cfg.chunk,
                              Pacer(self.cfg.rate), self._stopping)
            meta = self._finish_parity(held, step, sid, geo)
            dt = time.perf_counter() - t0
            self.last_encode_cpu_s = time.thread_time() - c0
            with self.keeper.cond:
                self.meta[held.slot.index] = meta  # installed while pinned: the slot still holds this step
                self._parity_maps[held.slot.index] = held.parity
            self.state = "idle"
            # pinned until every member is done: peers may be reading this slot's files in place
            done = self._barrier(session, "done", {"ok": True}, DONE_TIMEOUT_S)
        finally:
            self._release(held)
            self.state = "idle"
        with self.keeper.cond:
            slot = held.slot
            if self.meta.get(slot.index) is meta and slot.complete and slot.step == step:
                slot.protected = all(r["ok"] for r in done)
            self.encoded += 1
            self.last_encode_s = dt
            self.keeper.cond.notify_all()
        log.debug("step %s EC-protected (%.3fs)", step, dt)

    def _can_share(self, joins: list[dict]) -> bool:
        """Whether every member's keeper keeps its memory on this machine, readable here."""
        return self.cfg.shared and all(
            j.get("host") == HOST_ID and j.get("shm") and os.access(j["shm"], os.R_OK | os.X_OK) for j in joins)

    def _shared_peers(self, ready: list[dict], geo: Geometry) -> list[NodeBytes | None] | None:
        """Every other member's data mapped from its slot directory when every member can
        read every member's memory in place (the same decision on all members, from the
        barrier's payloads); None: code over the network."""
        if not all(r.get("share") and r.get("dir") for r in ready):
            return None
        try:
            return [None if q == self.me else NodeBytes.map_files(
                [(os.path.join(ready[q]["dir"], path), size) for _, path, size in geo.files[q]])
                for q in range(geo.n)]
        except (OSError, RuntimeError) as e:  # the others read in place too: end the generation
            raise RedundancyError(f"reading the peers' snapshots in place failed: {e}") from e

    def _note_skip(self, step: int, why: str) -> None:
        """A step left unprotected: counted, reported in the status, logged once per reason."""
        self.skipped += 1
        self.last_skip = f"step {step} is not EC-protected: {why}"
        if self.me == 0 and why != self._last_skip_why:
            log.warning("%s", self.last_skip)
        self._last_skip_why = why

    def _finish_parity(self, held: _Held, step: int, sid: str, geo: Geometry) -> dict:
        sums = ck.block_checksums(held.parity.numpy(), PARITY_BLOCK) if held.parity.numel() else ck.block_checksums(b"")
        meta = {
            "v": 1, "step": step, "sid": sid, "group": self.group, "member": self.me, "members": self.members,
            "geometry": geo.to_json(), "size": held.parity.numel(), "data_bytes": geo.length(self.me),
            "block_size": PARITY_BLOCK, "checksums": ck.pack_checksums(sums),
        }
        from stalwart.formats.atomic import atomic_write

        os.replace(held.tmp, os.path.join(held.slot.dir, PARITY_FILE))
        held.tmp = None
        atomic_write(os.path.join(held.slot.dir, PARITY_META), json.dumps(meta).encode(), fsync=False)
        return meta

    # ---------------------------------------------------------------- recovery
    def _parity_intact(self, slot: Slot, meta: dict) -> bool:
        key = (slot.index, int(meta["step"]), str(meta["sid"]))
        if key in self._verified:
            return True
        try:
            size = int(meta["size"])
            path = os.path.join(slot.dir, PARITY_FILE)
            if os.path.getsize(path) != size:
                return False
            if size:
                buf = torch.from_file(path, shared=False, size=size, dtype=torch.uint8)
                ck.verify_blocks(buf.numpy(), ck.unpack_checksums(meta["checksums"]), 0, int(meta["block_size"]), path)
        except (OSError, ValueError, KeyError, StalwartError) as e:
            log.warning("parity of step %s in %s is damaged: %s", meta.get("step"), slot.dir, e)
            return False
        self._verified.add(key)
        return True

    def _inventory(self) -> dict:
        """What this keeper holds: complete snapshots and whether their parity is intact."""
        with self.keeper.cond:
            entries = [(s, self.meta.get(s.index)) for s in self.keeper.slots if s.complete and s.sid and s.step is not None]
            for s, _ in entries:
                s.pins += 1
        try:
            out = []
            for s, meta in entries:
                ok = meta is not None and self._parity_intact(s, meta)
                out.append({"step": s.step, "sid": s.sid, "parity": ok, "geometry": meta["geometry"] if ok else None})
        finally:
            with self.keeper.cond:
                for s, _ in entries:
                    s.pins -= 1
                self.keeper.cond.notify_all()
        return {"inc": self.link.inc, "slots": out, "host": HOST_ID, "shm": self.keeper.shm_dir}

    def _loss_message(self, step: int, lost: Sequence[int], geo: Geometry | None, detail: str | None) -> str:
        nodes = ", ".join(str(self.members[p]) for p in lost)
        ranks = sorted(r for p in lost for r, _, _ in geo.files[p]) if geo is not None else []
        who = f"node{'s' if len(lost) > 1 else ''} {nodes}" + (f" (rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))})" if ranks else "")
        if len(lost) > self.cfg.m:
            return f"step {step}: {who} lost (more than m={self.cfg.m}); cannot rebuild from memory"
        return f"step {step}: {who} lost and {detail}; cannot rebuild from memory"

    def _recovery_task(self, session: Session) -> dict:
        """Leader: from every member's inventory, what to rebuild (or why not)."""
        n = self.cfg.n
        data_at: dict[tuple[int, str], set[int]] = {}
        parity_at: dict[tuple[int, str], set[int]] = {}
        geos: dict[tuple[int, str], dict] = {}
        for p, join in enumerate(session.joins):
            for e in join["slots"]:
                key = (int(e["step"]), str(e["sid"]))
                data_at.setdefault(key, set()).add(p)
                if e["parity"]:
                    parity_at.setdefault(key, set()).add(p)
                    geos.setdefault(key, e["geometry"])
        newest_full = max((key[0] for key, ps in data_at.items() if len(ps) == n), default=None)
        newer = sorted((key for key in data_at if newest_full is None or key[0] > newest_full), key=lambda kk: -kk[0])
        for key in newer:
            if key not in parity_at:
                continue
            lost = sorted(set(range(n)) - data_at[key])
            geo = Geometry.from_json(geos[key])
            try:
                plan_rebuild(geo, lost, sorted(parity_at[key]), self.members)
            except RedundancyError as e:
                return {"op": "recover", "plan": "report", "error": self._loss_message(key[0], lost, geo, str(e))}
            donors = sorted(data_at[key] & parity_at[key]) or sorted(data_at[key])
            return {"op": "recover", "plan": "rebuild", "step": key[0], "sid": key[1], "lost": lost,
                    "parity": sorted(parity_at[key]), "geometry": geos[key], "donor": donors[0]}
        if newer:
            key = newer[0]
            lost = sorted(set(range(n)) - data_at[key])
            return {"op": "recover", "plan": "report",
                    "error": self._loss_message(key[0], lost, None, "no member holds parity of it")}
        return {"op": "recover", "plan": "none"}

    def _recover(self, session: Session, task: dict) -> None:
        plan = task["plan"]
        if plan == "none":
            self.recovery_error = None
        elif plan == "report":
            self.recovery_error = task["error"]
            log.error("%s", task["error"])
        else:
            self.state = "rebuilding"
            self._rebuild(session, task)
        self.settled = True
        self.state = "idle"

    def _pin_source(self, step: int, sid: str, geo: Geometry, need_parity: bool) -> _Held:
        with self.keeper.cond:
            slot = self._find(step, sid)
            if slot is None:
                raise RedundancyError(f"step {step} is no longer in its memory")
            meta = self.meta.get(slot.index)
            slot.pins += 1
        held = _Held(slot)
        try:
            self._check_files(slot, geo)
            held.data = NodeBytes.map_files([(os.path.join(slot.dir, p), s) for _, p, s in geo.files[self.me]])
            if need_parity:
                if meta is None or (meta["step"], meta["sid"]) != (step, sid):
                    raise RedundancyError(f"its parity of step {step} is gone")
                size = int(meta["size"])
                held.parity = torch.from_file(os.path.join(slot.dir, PARITY_FILE), shared=True, size=size, dtype=torch.uint8)
        except BaseException:
            self._release(held)
            raise
        return held

    def _pin_target(self, step: int, geo: Geometry) -> _Held:
        with self.keeper.cond:
            complete = [s for s in self.keeper.slots if s.complete]
            newest = max(complete, key=lambda s: s.step) if complete else None
            free = [s for s in self.keeper.slots if not s.pinned and s is not newest and (s.step is None or s.complete)]
            if not free:  # never a slot a trainer is filling, nor the newest snapshot
                raise RedundancyError("no snapshot slot is free to rebuild into")
            slot = min(free, key=lambda s: (s.step is not None, s.protected, s.step or 0))
            self.keeper._uncommit(slot)
            slot.step = step
            slot.pins += 1
        held = _Held(slot)
        try:
            held.data = NodeBytes.map_files([(os.path.join(slot.dir, p), s) for _, p, s in geo.files[self.me]], create=True)
        except BaseException:
            self._release(held)
            raise
        return held

    def _rebuild(self, session: Session, task: dict) -> None:
        step, sid, geo = int(task["step"]), str(task["sid"]), Geometry.from_json(task["geometry"])
        lost, parity_ok, donor = list(task["lost"]), list(task["parity"]), int(task["donor"])
        plan = plan_rebuild(geo, lost, parity_ok, self.members)
        senders = {geo.holder(j, s) for j, sp in plan.stripes.items() for s in sp.chosen}
        held = None
        payload: dict = {"ok": True}
        try:
            if self.me in lost:
                held = self._pin_target(step, geo)
            else:
                held = self._pin_source(step, sid, geo, need_parity=self.me in senders and self.me in parity_ok)
            if self.me == donor:
                payload["manifest"] = _read_text(os.path.join(held.slot.dir, "manifest.json"))
                payload["nodes"] = _read_text(os.path.join(held.slot.dir, NODES_FILE))
        except Exception as e:
            payload = {"ok": False, "why": f"{type(e).__name__}: {e}"}
        ok, why = True, None
        try:
            ready = self._barrier(session, "ready", payload, JOIN_TIMEOUT_S)
            bad = [f"node {self.members[i]}: {r['why']}" for i, r in enumerate(ready) if not r["ok"]]
            if bad:
                self.recovery_error = f"step {step}: rebuilding from memory failed ({'; '.join(bad)})"
                self._error(self.recovery_error)
                return
            t0 = time.perf_counter()
            rebuild_rounds(geo, plan, self.me, held.data, held.parity, GlooTransport(session.pg), self.rs,
                           self.cfg.chunk, self._stopping)
            if self.me in lost:
                try:
                    self._install(held, step, sid, geo, ready[donor].get("manifest"), ready[donor].get("nodes"))
                except Exception as e:
                    ok, why = False, f"{type(e).__name__}: {e}"
            dt = time.perf_counter() - t0
        finally:
            if held is not None and self.me in lost:
                with self.keeper.cond:
                    if not held.slot.complete:  # a half-rebuilt slot is garbage
                        self.keeper._uncommit(held.slot)
            self._release(held)
        done = self._barrier(session, "done", {"ok": ok, "why": why}, DONE_TIMEOUT_S)
        bad = [f"node {self.members[i]}: {r['why']}" for i, r in enumerate(done) if not r["ok"]]
        if bad:
            self.recovery_error = f"step {step}: the rebuilt snapshot does not verify ({'; '.join(bad)})"
            self._error(self.recovery_error)
            return
        self.recovery_error = None
        if self.me in lost:
            self.rebuilt.append(step)
            log.warning("rebuilt the memory snapshot of step %s (nodes %s lost it) from the group's survivors in %.2fs",
                        step, [self.members[p] for p in lost], dt)

    def _install(self, held: _Held, step: int, sid: str, geo: Geometry, manifest_text: str | None, nodes_text: str | None) -> None:
        """Verify the rebuilt files against the donor's manifest, then commit the slot."""
        from stalwart.formats.atomic import atomic_write
        from stalwart.formats.datafile import read_header, verify_file
        from stalwart.formats.manifest import MANIFEST_NAME, Manifest

        if not manifest_text:
            raise RedundancyError("the donor sent no manifest")
        obj = json.loads(manifest_text)
        manifest = Manifest.from_json(obj, "rebuilt manifest")
        if snapshot_id([f.to_json() for f in manifest.files]) != sid:
            raise RedundancyError(f"the donor's manifest is not the one of step {step}'s snapshot")
        slot = held.slot
        held.data = None  # unmap before reading back through the file system
        for rank, path, _ in geo.files[self.me]:
            record = manifest.file_of_rank(rank)
            full = os.path.join(slot.dir, path)
            fd = os.open(full, os.O_RDONLY)
            try:
                verify_file(fd, read_header(fd, full, record))
            finally:
                os.close(fd)
        if nodes_text:
            atomic_write(os.path.join(slot.dir, NODES_FILE), nodes_text.encode(), fsync=False)
        atomic_write(os.path.join(slot.dir, MANIFEST_NAME), manifest_text.encode(), fsync=False)
        with self.keeper.cond:
            self.keeper._adopt_slot(slot)
            self.keeper.cond.notify_all()


def _lower_priority(nice: int) -> None:
    """Run this thread (and the gloo threads it starts, which inherit it) at a lower CPU
    priority: coding uses the cycles training leaves idle and never competes with it
    (Linux: ``nice`` is per thread)."""
    if nice <= 0 or not hasattr(os, "setpriority"):
        return
    with contextlib.suppress(OSError):
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + nice))


def _read_text(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except FileNotFoundError:
        return None


# ============================================================================ peer reads

_MAX_REQUEST = 64 * 1024 * 1024


def missing_reads(ckpt, plan) -> dict[int, list[list]]:
    """The reads of ``plan`` whose data files are not in ``ckpt``'s directory, by rank, as
    ``[entry, start, stop]`` (a node's memory slot holds only its own ranks' files)."""
    out: dict[int, list[list]] = {}
    present: dict[int, bool] = {}
    for read in plan.reads:
        if read.rank not in present:
            record = ckpt.manifest.file_of_rank(read.rank)
            present[read.rank] = record is None or os.path.exists(os.path.join(ckpt.path, record.path))
        if not present[read.rank]:
            out.setdefault(read.rank, []).append([read.entry, read.start, read.stop])
    return out


class PeerService:
    """Serves byte ranges of this keeper's memory snapshots to other nodes' keepers, and
    assembles *views*: a checkpoint directory holding this node's files (hard links to the
    slot) plus the byte ranges a restoring rank needs from other nodes' files (sparse
    files; every range is verified by the reader's checksums, as from any tier)."""

    def __init__(self, keeper: Keeper, link: StoreLink, node: int, bind_host: str) -> None:
        self.keeper, self.link, self.node = keeper, link, node
        self.sock = socket.create_server((bind_host, 0), backlog=64)
        self.addr = f"{bind_host}:{self.sock.getsockname()[1]}"
        self.views = os.path.join(keeper.shm_dir, "views")
        link.keep(f"peer/node{node}", self.addr)
        threading.Thread(target=self._accept, name="peer", daemon=True).start()

    # ---------------------------------------------------------------- serving
    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            try:
                line = conn.makefile("rb").readline(_MAX_REQUEST)
                self._send(conn, json.loads(line))
            except Exception as e:  # the requester reports it; never take the keeper down
                with contextlib.suppress(OSError):
                    conn.sendall(json.dumps({"ok": False, "error": f"{type(e).__name__}: {e}"}).encode() + b"\n")

    def _send(self, conn: socket.socket, req: dict) -> None:
        from stalwart.formats.datafile import FileRecord, read_header

        step, sid, path = int(req["step"]), req.get("sid"), str(req["path"])
        with self.keeper.cond:
            slot = next((s for s in self.keeper.slots if s.complete and s.step == step and (sid is None or s.sid == sid)
                         and any(r["path"] == path for r in s.done.values())), None)
            if slot is None:
                raise RedundancyError(f"node {self.node} holds no memory snapshot of step {step} with {path}")
            record = FileRecord.from_json(next(r for r in slot.done.values() if r["path"] == path))
            slot.pins += 1
        try:
            full = os.path.join(slot.dir, path)
            fd = os.open(full, os.O_RDONLY)
            try:
                header = read_header(fd, full, record)
                segments = []
                for entry, start, stop in req["ranges"]:
                    e = header.entries.get(entry)
                    if e is None or not 0 <= start <= stop <= e.nbytes:
                        raise RedundancyError(f"{path}: no bytes {start}..{stop} of entry {entry!r}")
                    segments.append([header.data_start + e.begin + start, stop - start])
                head = {"ok": True, "size": record.size, "head": header.data_start, "segments": segments}
                conn.sendall(json.dumps(head).encode() + b"\n")
                for off, n in [[0, header.data_start], *segments]:
                    while n:
                        sent = os.sendfile(conn.fileno(), fd, off, n)
                        if sent <= 0:
                            raise RedundancyError("peer connection closed")
                        off, n = off + sent, n - sent
            finally:
                os.close(fd)
        finally:
            with self.keeper.cond:
                slot.pins -= 1
                self.keeper.cond.notify_all()

    # ---------------------------------------------------------------- fetching
    def _fetch(self, addr: str, req: dict, dst: str) -> None:
        host, port = addr.rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=120) as s:
            s.sendall(json.dumps(req).encode() + b"\n")
            f = s.makefile("rb")
            reply = json.loads(f.readline(_MAX_REQUEST) or b"{}")
            if not reply.get("ok"):
                raise RedundancyError(f"peer {addr}: {reply.get('error', 'no answer')}")
            fd = os.open(dst, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.ftruncate(fd, int(reply["size"]))
                buf = bytearray(4 << 20)
                for off, n in [[0, int(reply["head"])], *reply["segments"]]:
                    while n:
                        view = memoryview(buf)[: min(n, len(buf))]
                        got = f.readinto(view)
                        if not got:
                            raise RedundancyError(f"peer {addr} closed the connection mid-transfer")
                        os.pwrite(fd, view[:got], off)
                        off, n = off + got, n - got
            finally:
                os.close(fd)

    def view(self, step: int, reads: dict, requester: int) -> str:
        """A checkpoint directory of memory step ``step`` with the ranges ``reads``
        (``{rank: [[entry, start, stop], ...]}``) of other nodes' files fetched."""
        from stalwart.formats.manifest import MANIFEST_NAME, read_manifest

        with self.keeper.cond:
            held = [s for s in self.keeper.slots if s.complete and s.step == step]
            if not held:
                raise RedundancyError(f"step {step} is not in node {self.node}'s memory")
            slot = held[0]
            slot.pins += 1
            sid, owners = slot.sid, dict(slot.owners)
        try:
            out = os.path.join(self.views, f"step-{step}-rank-{requester}")
            shutil.rmtree(out, ignore_errors=True)
            os.makedirs(out)
            manifest = read_manifest(slot.dir)
            shutil.copyfile(os.path.join(slot.dir, MANIFEST_NAME), os.path.join(out, MANIFEST_NAME))
            for f in manifest.files:
                src = os.path.join(slot.dir, f.path)
                if os.path.exists(src):
                    os.link(src, os.path.join(out, f.path))
            for rank, ranges in reads.items():
                record = manifest.file_of_rank(int(rank))
                if record is None or os.path.exists(os.path.join(out, record.path)):
                    continue
                owner = owners.get(int(rank))
                addr = self.link.get(f"peer/node{owner}") if owner is not None else None
                if addr is None:
                    raise RedundancyError(f"step {step}: rank {rank}'s file is on node {owner}, whose keeper is not reachable")
                self._fetch(addr, {"step": step, "sid": sid, "path": record.path, "ranges": ranges},
                            os.path.join(out, record.path))
            return out
        finally:
            with self.keeper.cond:
                slot.pins -= 1
                self.keeper.cond.notify_all()

    def release(self, path: str) -> None:
        if os.path.dirname(os.path.abspath(path)) == os.path.abspath(self.views):
            shutil.rmtree(path, ignore_errors=True)

    def purge(self) -> None:
        """Drop every view (a new plan means restores are over)."""
        shutil.rmtree(self.views, ignore_errors=True)
