"""NUMA topology (from sysfs), the placement policy for the optimizer's host buffers,
and ``mbind`` on memory mappings.

Topology is read from ``/sys/devices/system/node`` (or any root with the same layout,
so tests use fake trees): each node's CPUs, memory (total/free) and distances, plus the
access bandwidth the firmware reports (HMAT ``access0/initiators/read_bandwidth``)
where there is one. A node with memory and no CPUs is a memory expander (CXL).

Policy (:func:`plan_placement`): buffers are ranked by how much the update touches
them per byte (the CPU reads and writes the state of CPU-updated subgroups every step;
DMA alone touches the state of device-updated ones). The hottest go to the DRAM of the
node the update threads run on, within its free memory less a reserve; what does not
fit is striped over the CPU-less (CXL) nodes in proportion to their bandwidth. Without
CPU-less nodes everything is bound to the local node with a preferred (not strict)
policy past the budget, so the kernel may still fall back rather than fail. The plan
is data (:class:`NumaPlan`): inspect it, edit it, or pass your own.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import re
from dataclasses import dataclass, field

from stalwart.errors import StalwartError

SYSFS_NODES = "/sys/devices/system/node"
PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

MPOL_DEFAULT, MPOL_PREFERRED, MPOL_BIND, MPOL_INTERLEAVE = 0, 1, 2, 3
_MODES = {"default": MPOL_DEFAULT, "preferred": MPOL_PREFERRED, "bind": MPOL_BIND, "interleave": MPOL_INTERLEAVE}
_MBIND_SYSCALL = {"x86_64": 237, "aarch64": 235, "ppc64le": 259, "s390x": 268}

# Assumed bandwidths (bytes/s) when the firmware reports none: local DRAM vs a CXL
# expander (the ratio is what matters: it splits work between expanders).
DEFAULT_DRAM_BW = 100e9
DEFAULT_CXL_BW = 30e9


class NumaError(StalwartError):
    """Topology could not be read, or memory could not be bound as planned."""


@dataclass(frozen=True)
class Node:
    """One NUMA node as sysfs describes it."""

    id: int
    cpus: tuple[int, ...]
    mem_total: int  # bytes
    mem_free: int
    distances: tuple[int, ...] = ()
    read_bandwidth: float | None = None  # bytes/s from HMAT, if reported

    @property
    def cpuless(self) -> bool:
        """A memory-only node (a CXL expander or similar)."""
        return not self.cpus and self.mem_total > 0

    @property
    def bandwidth(self) -> float:
        return self.read_bandwidth or (DEFAULT_CXL_BW if self.cpuless else DEFAULT_DRAM_BW)


def parse_cpulist(text: str) -> tuple[int, ...]:
    """``"0-3,8,10-11"`` -> (0, 1, 2, 3, 8, 10, 11)."""
    out: list[int] = []
    for part in text.strip().split(","):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return tuple(out)


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def _meminfo(text: str | None) -> dict[str, int]:
    out = {}
    for line in (text or "").splitlines():
        m = re.match(r"Node\s+\d+\s+(\w+):\s+(\d+)(\s+kB)?", line)
        if m:
            out[m.group(1)] = int(m.group(2)) * (1024 if m.group(3) else 1)
    return out


@dataclass
class Topology:
    """The machine's NUMA nodes."""

    nodes: dict[int, Node]

    @classmethod
    def from_sysfs(cls, root: str = SYSFS_NODES) -> Topology:
        """Read nodes from a sysfs node directory (``/sys/devices/system/node`` layout).
        A machine without NUMA support (no such directory) is one node with every CPU."""
        if not os.path.isdir(root):
            cpus = tuple(sorted(os.sched_getaffinity(0)))
            total = os.sysconf("SC_PHYS_PAGES") * PAGE
            return cls({0: Node(0, cpus, total, os.sysconf("SC_AVPHYS_PAGES") * PAGE, (10,))})
        nodes: dict[int, Node] = {}
        for name in sorted(os.listdir(root)):
            m = re.fullmatch(r"node(\d+)", name)
            if not m:
                continue
            nid, d = int(m.group(1)), os.path.join(root, name)
            info = _meminfo(_read(os.path.join(d, "meminfo")))
            bw = _read(os.path.join(d, "access0", "initiators", "read_bandwidth"))
            dist = tuple(int(x) for x in (_read(os.path.join(d, "distance")) or "").split())
            nodes[nid] = Node(nid, parse_cpulist(_read(os.path.join(d, "cpulist")) or ""), info.get("MemTotal", 0),
                              info.get("MemFree", 0), dist, float(bw) * 1e6 if bw and bw.strip() else None)  # MB/s
        if not nodes:
            raise NumaError(f"no NUMA nodes under {root}")
        return cls(nodes)

    @property
    def dram_nodes(self) -> list[Node]:
        return [n for n in self.nodes.values() if n.cpus]

    @property
    def cpuless_nodes(self) -> list[Node]:
        return [n for n in self.nodes.values() if n.cpuless]

    def local_node(self, cpus: set[int] | None = None) -> int:
        """The node holding most of ``cpus`` (default: the CPUs this process may run on)."""
        cpus = set(os.sched_getaffinity(0)) if cpus is None else set(cpus)
        best = max(self.dram_nodes or self.nodes.values(), key=lambda n: (len(cpus & set(n.cpus)), -n.id))
        return best.id

    def cxl_for(self, local: int) -> list[Node]:
        """CPU-less nodes, nearest to ``local`` first."""
        node = self.nodes[local]

        def dist(n: Node) -> int:
            return node.distances[n.id] if n.id < len(node.distances) else 1 << 20

        return sorted(self.cpuless_nodes, key=lambda n: (dist(n), n.id))


@dataclass(frozen=True)
class BufferUse:
    """A host buffer to place: ``heat`` is how often the update touches each byte per
    step (CPU reads+writes count 1 each, DMA transfers 0.5)."""

    name: str
    nbytes: int
    heat: float


@dataclass(frozen=True)
class Extent:
    """``length`` bytes at ``offset`` in buffer ``name`` placed on ``nodes``.

    ``mode``: "bind" (one node), "preferred" (one node, the kernel may fall back),
    "interleave" (page by page over the nodes), "weighted" (stripes of
    :data:`STRIPE` bytes dealt to the nodes in proportion to ``weights``).
    """

    name: str
    offset: int
    length: int
    nodes: tuple[int, ...]
    mode: str = "bind"
    weights: tuple[int, ...] = ()

    def node_bytes(self) -> dict[int, int]:
        w = self.weights or (1,) * len(self.nodes)
        total = sum(w)
        return {n: self.length * wi // total for n, wi in zip(self.nodes, w)}


STRIPE = 2 << 20


@dataclass
class NumaPlan:
    """Where each buffer's bytes live. ``local`` is the node of the update threads."""

    local: int
    extents: list[Extent] = field(default_factory=list)
    budget: int = 0  # DRAM bytes the plan allowed itself on the local node

    def for_buffer(self, name: str) -> list[Extent]:
        return [e for e in self.extents if e.name == name]

    def bytes_by_node(self) -> dict[int, int]:
        out: dict[int, int] = {}
        for e in self.extents:
            for n, b in e.node_bytes().items():
                out[n] = out.get(n, 0) + b
        return out

    def describe(self, max_extents: int = 24) -> str:
        lines = [f"NUMA plan: update threads on node {self.local}, DRAM budget {self.budget / 2**30:.2f} GiB"]
        for node, nbytes in sorted(self.bytes_by_node().items()):
            lines.append(f"  node {node}: {nbytes / 2**30:.3f} GiB")
        for e in self.extents[:max_extents]:
            w = f" weights {list(e.weights)}" if e.weights else ""
            lines.append(f"  {e.name}[{e.offset}:{e.offset + e.length}] -> {e.mode} {list(e.nodes)}{w}")
        if len(self.extents) > max_extents:
            lines.append(f"  ... {len(self.extents) - max_extents} more extents (NumaPlan.extents)")
        return "\n".join(lines)


def _page_floor(x: int) -> int:
    return x - x % PAGE


def _weights(bandwidths: list[float]) -> tuple[int, ...]:
    """Small integer weights in proportion to ``bandwidths`` (quarter steps of the slowest)."""
    lo = min(bandwidths)
    return tuple(max(1, round(4 * b / lo)) for b in bandwidths)


def plan_placement(buffers: list[BufferUse], topo: Topology, local: int | None = None,
                   dram_budget: int | None = None, reserve: float = 0.1) -> NumaPlan:
    """Place ``buffers`` (hottest per byte first) in the local node's DRAM up to
    ``dram_budget`` bytes (default: its free memory less ``reserve`` of its total), the
    rest spread over CPU-less nodes in proportion to their bandwidth (within their free
    memory; page-interleaved when their bandwidths are equal, weighted stripes when
    not), and whatever still remains preferred on the local node. Extent boundaries
    inside a buffer fall on page boundaries."""
    local = topo.local_node() if local is None else local
    node = topo.nodes[local]
    if dram_budget is None:
        dram_budget = max(0, node.mem_free - int(reserve * node.mem_total))
    plan = NumaPlan(local, budget=dram_budget)
    left = dram_budget
    cxl = topo.cxl_for(local)
    cxl_left = {n.id: max(0, n.mem_free - int(reserve * n.mem_total)) for n in cxl}
    for buf in sorted(buffers, key=lambda b: -b.heat):  # stable: equal heat keeps the given order
        off = 0
        if left > 0:
            take = buf.nbytes if buf.nbytes <= left else _page_floor(left)
            if take:
                plan.extents.append(Extent(buf.name, 0, take, (local,)))
                left -= take
                off = take
        rest = buf.nbytes - off
        live = [n for n in cxl if cxl_left[n.id] > 0]
        while rest and live:
            w = _weights([n.bandwidth for n in live])
            # Each node's share of what is left of this buffer must fit in its free memory.
            short = [n for n, wi in zip(live, w) if rest * wi // sum(w) > cxl_left[n.id]]
            if short and len(live) > 1:
                live = [n for n in live if n not in short]
                continue
            share = rest if not short else _page_floor(cxl_left[live[0].id])
            if share <= 0:
                break
            if len(live) == 1:
                ext = Extent(buf.name, off, share, (live[0].id,))
            elif len(set(w)) == 1:
                ext = Extent(buf.name, off, share, tuple(n.id for n in live), "interleave")
            else:
                ext = Extent(buf.name, off, share, tuple(n.id for n in live), "weighted", w)
            plan.extents.append(ext)
            for n, b in ext.node_bytes().items():
                cxl_left[n] -= b
            off += share
            rest -= share
            live = [n for n in live if cxl_left[n.id] > 0]
        if rest > 0:
            plan.extents.append(Extent(buf.name, off, rest, (local,), "preferred"))
    plan.extents.sort(key=lambda e: (e.name, e.offset))
    return plan


def apply_extent(addr: int, ext: Extent) -> None:
    """Bind the bytes of ``ext`` in a mapping that starts at ``addr`` (before first touch)."""
    start, end = addr + ext.offset, addr + ext.offset + ext.length
    start_aligned = start - start % PAGE
    if ext.mode != "weighted":
        mbind(start_aligned, end - start_aligned, ext.nodes, ext.mode)
        return
    deal = [n for n, wi in zip(ext.nodes, ext.weights) for _ in range(wi)]
    pos, i = start_aligned, 0
    while pos < end:
        stop = min(end, pos + STRIPE)
        mbind(pos, stop - pos, (deal[i % len(deal)],), "bind")
        pos, i = stop, i + 1


# ---------------------------------------------------------------- mbind

_libc = None


def _syscall():
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        _libc.syscall.restype = ctypes.c_long
    return _libc.syscall


def mbind(addr: int, length: int, nodes: tuple[int, ...], mode: str = "bind") -> None:
    """Set the NUMA policy of ``[addr, addr + length)`` (page-aligned, not yet touched)
    with the raw ``mbind`` system call. Raises :class:`NumaError` naming the range."""
    number = _MBIND_SYSCALL.get(platform.machine())
    if number is None:
        raise NumaError(f"mbind: no system call number known for {platform.machine()}")
    if addr % PAGE:
        raise NumaError(f"mbind: address {addr:#x} is not page-aligned")
    bits = max(nodes) + 1
    words = (bits + 63) // 64
    mask = (ctypes.c_ulong * words)()
    for n in nodes:
        mask[n // 64] |= 1 << (n % 64)
    rc = _syscall()(ctypes.c_long(number), ctypes.c_void_p(addr), ctypes.c_ulong(length), ctypes.c_int(_MODES[mode]),
                    mask, ctypes.c_ulong(words * 64 + 1), ctypes.c_uint(0))
    if rc != 0:
        err = ctypes.get_errno()
        raise NumaError(f"mbind({addr:#x}, {length} bytes, {mode} {list(nodes)}) failed: {os.strerror(err)}")


def numa_maps(addr: int, pid: str = "self") -> str | None:
    """The ``/proc/<pid>/numa_maps`` line of the mapping that contains ``addr`` (the kernel
    may have merged adjacent mappings with the same policy into one)."""
    start = None
    for line in (_read(f"/proc/{pid}/maps") or "").splitlines():
        lo, _, hi = line.split(" ", 1)[0].partition("-")
        if int(lo, 16) <= addr < int(hi, 16):
            start = lo
            break
    if start is None:
        return None
    for line in (_read(f"/proc/{pid}/numa_maps") or "").splitlines():
        if line.split(" ", 1)[0] == start.lstrip("0") or line.split(" ", 1)[0] == start:
            return line
    return None
