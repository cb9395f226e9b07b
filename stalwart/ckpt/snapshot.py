"""Snapshot planning and the lazy copy into shared-memory slots.

A :class:`SnapshotPlan` fixes, for one rank, which tensors it stores and where their
bytes go in its slot file (a :class:`~stalwart.formats.datafile.FileImage`). The
:class:`Copier` moves bytes from live tensors into a slot: eager items right away,
lazy items on a background thread while the next forward/backward runs. Checksums
are computed chunk by chunk right after each chunk is copied (the data is still in
cache), not in a second pass. On CUDA, chunks are copied device-to-host on a side
stream into the pinned slot, and the optimizer step only waits on the device for
that stream; hashing then runs on the host in the background.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace

import numpy as np
import torch
import xxhash

from stalwart.ckpt.providers.base import Collected
from stalwart.errors import LayoutError
from stalwart.formats import checksum as ck
from stalwart.formats.datafile import FileImage
from stalwart.formats.dtypes import tensor_bytes
from stalwart.formats.layout import Layout, Mesh

COPY_CHUNK = 4 * 1024 * 1024  # bytes copied then hashed per step (cache-sized, a multiple of the block size)
SMALL_ENTRY = 32 * 1024  # entries up to this size are copied in batches (torch copies them on one thread)


@dataclass
class SnapshotPlan:
    layout: Layout
    image: FileImage
    lazy: list[tuple[str, torch.Tensor]]
    eager: list[tuple[str, torch.Tensor]]
    signature: str  # this rank's plan (layout + its share)
    layout_signature: str  # the layout alone: the same on every rank
    # What the plan was built from, so that the next step validates instead of rebuilding
    # (see build_plan): the mesh and rank, per provider the items list it was bound to and
    # that list's structure key, and per item where its tensor sits in ``lazy``/``eager``.
    mesh: Mesh | None = None
    rank: int = -1
    sources: tuple = ()
    keys: tuple = ()
    places: tuple = ()

    @property
    def file_size(self) -> int:
        return self.image.size


_PLAN_CACHE: dict[tuple, SnapshotPlan] = {}


def _provider_key(c: Collected) -> tuple:
    """One provider's share of the plan's structure: names, shapes, dtypes, placements,
    lazy/eager, local sizes, groups and aliases (everything but the tensors' data)."""
    items = tuple((i.spec, i.lazy, -1 if i.tensor is None else i.tensor.numel()) for i in c.items)
    groups = tuple(sorted(c.groups.items())) if c.groups else ()
    aliases = tuple(sorted(c.aliases.items())) if c.aliases else ()
    return items, groups, aliases


def build_plan(collected: list[Collected], mesh: Mesh, rank: int,
               aliases: dict[str, str] | Callable[[], dict[str, str]],
               previous: SnapshotPlan | None = None) -> SnapshotPlan:
    """The layout of everything collected, and this rank's share of it.

    With ``previous`` (the plan of the last snapshot), the structure is validated
    provider by provider rather than rebuilt: a provider that returns the very items
    list it returned before (providers cache them while their state's structure, tensor
    identities and storages are unchanged) costs nothing; one that returns new items
    (RNG, schedulers: new tensors every step) is compared by its structure key and only
    its tensors are rebound. Any difference rebuilds the plan (cached by the whole
    structure, so switching back to an earlier structure is cheap). ``aliases`` (tied
    weights of providers that do not put them in :attr:`Collected.aliases`) may be a
    callable; it is called only when the plan is rebuilt, so such a provider must
    return new items when its ties change.
    """
    if previous is not None and previous.mesh == mesh and previous.rank == rank and len(previous.sources) == len(collected):
        rebound = _rebind(collected, previous)
        if rebound is not None:
            return rebound
    if callable(aliases):
        aliases = aliases()
    aliases = {**aliases, **{a: o for c in collected for a, o in c.aliases.items()}}
    keys = tuple(_provider_key(c) for c in collected)
    key = (mesh, rank, keys, tuple(sorted(aliases.items())))
    cached = _PLAN_CACHE.get(key)
    if cached is not None:
        return _bind_all(collected, cached)
    plan = _build_plan(collected, mesh, rank, aliases)
    plan = _bind_all(collected, replace(plan, mesh=mesh, rank=rank, keys=keys, places=_places(collected, plan)))
    if len(_PLAN_CACHE) >= 4:
        _PLAN_CACHE.pop(next(iter(_PLAN_CACHE)))
    _PLAN_CACHE[key] = plan
    return plan


def _places(collected: list[Collected], plan: SnapshotPlan) -> tuple:
    """Per provider, per item: (lazy?, index) of its tensor in the plan's lists, or None
    when this rank does not store it."""
    where = {n: (True, i) for i, (n, _) in enumerate(plan.lazy)}
    where.update({n: (False, i) for i, (n, _) in enumerate(plan.eager)})
    return tuple(tuple(where.get(i.spec.name) for i in c.items) for c in collected)


def _bind_all(collected: list[Collected], plan: SnapshotPlan) -> SnapshotPlan:
    """``plan`` (same structure) with every tensor taken from ``collected``."""
    tensors = {i.spec.name: i.tensor for c in collected for i in c.items}
    return replace(plan, lazy=[(n, tensors[n]) for n, _ in plan.lazy], eager=[(n, tensors[n]) for n, _ in plan.eager],
                   sources=tuple(c.items for c in collected))


def _rebind(collected: list[Collected], previous: SnapshotPlan) -> SnapshotPlan | None:
    """``previous`` bound to this step's tensors if the structure is unchanged, else None."""
    changed = [i for i, c in enumerate(collected) if c.items is not previous.sources[i]]
    if not changed:
        return previous
    for i in changed:
        if _provider_key(collected[i]) != previous.keys[i]:
            return None
    # new lists only where a tensor changed: the copier keeps its prepared copies for a list
    lazy, eager = previous.lazy, previous.eager
    for i in changed:
        for item, place in zip(collected[i].items, previous.places[i]):
            if place is None:
                continue
            if place[0]:
                if lazy[place[1]][1] is item.tensor:
                    continue
                if lazy is previous.lazy:
                    lazy = list(lazy)
                lazy[place[1]] = (item.spec.name, item.tensor)
            else:
                eager = list(eager) if eager is previous.eager else eager
                eager[place[1]] = (item.spec.name, item.tensor)
    sources = tuple(c.items for c in collected)
    return replace(previous, lazy=lazy, eager=eager, sources=sources)


def _build_plan(collected: list[Collected], mesh: Mesh, rank: int, aliases: dict[str, str]) -> SnapshotPlan:
    specs, groups, items = [], {}, {}
    owners: dict[str, list[str]] = {}
    for alias, owner in aliases.items():
        owners.setdefault(owner, []).append(alias)
    for c in collected:
        groups.update(c.groups)
        for item in c.items:
            if item.spec.name in items:
                raise LayoutError(f"two state providers both produce {item.spec.name!r}")
            items[item.spec.name] = item
            spec = item.spec
            if spec.name in owners:
                spec = replace(spec, aliases=tuple(owners[spec.name]))
            specs.append(spec)
    layout = Layout(mesh, specs, groups)
    lazy, eager, entries = [], [], []
    for name, shard in layout.writes(rank):
        item = items[name]
        t = item.tensor
        if t is None or t.numel() != shard.numel:
            raise LayoutError(
                f"rank {rank}: {name!r} local tensor has {0 if t is None else t.numel()} elements, its layout says {shard.numel}"
            )
        entries.append((name, t.dtype, shard.shape))
        (lazy if item.lazy else eager).append((name, t))
    image = FileImage(entries, rank=rank)
    layout_json = json.dumps(layout.to_json(), sort_keys=True)
    layout_sig = hashlib.sha1(layout_json.encode()).hexdigest()
    sig = hashlib.sha1(f"{layout_sig}#{rank}".encode()).hexdigest()
    return SnapshotPlan(layout, image, lazy, eager, sig, layout_sig)


class HeaderTemplate:
    """A slot file's header with its checksums patched in, not rebuilt (``image.header``
    serialises every entry's name, shape and offsets again: ~0.3 s for 45,000 entries).

    Built once per file image: each entry's checksum text has a fixed length and a fixed
    place in the header, found by filling the tables with a probe; a second probe checks
    that patching gives exactly ``image.header``. If it does not (another header layout),
    every header is built by ``image.header``.
    """

    def __init__(self, image: FileImage) -> None:
        self.image = image
        self.offsets: list[tuple[str, int]] | None = None
        gen = np.random.default_rng(0x5EED)

        def probe() -> dict[str, np.ndarray]:
            return {n: gen.integers(1, 2**63, size=c, dtype=np.uint64) for n, c in image.block_counts.items()}

        first = probe()
        raw = image.header(first)
        offsets, pos = [], 0
        for name in image.entries:
            text = ck.pack_checksums(first[name]).encode("ascii")
            at = raw.find(text, pos) if text else pos
            if at < 0:
                return
            offsets.append((name, at))
            pos = at + len(text)
        self.template = raw
        self.offsets = offsets
        second = probe()
        if self.fill(second) != image.header(second):
            self.offsets = None

    def fill(self, tables: dict[str, np.ndarray]) -> bytearray:
        """``image.header(tables)``."""
        if self.offsets is None:
            return bytearray(self.image.header(tables))
        out = bytearray(self.template)
        pack = ck.pack_checksums
        for name, at in self.offsets:
            text = pack(tables[name])
            out[at : at + len(text)] = text.encode("ascii")
        return out


_HEADERS: dict[int, HeaderTemplate] = {}


def final_header(image: FileImage, tables: dict[str, np.ndarray]) -> bytearray:
    """The finished header of a slot file: ``image.header(tables)``, patched into a cached template."""
    t = _HEADERS.get(id(image))
    if t is None or t.image is not image:
        if len(_HEADERS) >= 4:
            _HEADERS.pop(next(iter(_HEADERS)))
        t = _HEADERS[id(image)] = HeaderTemplate(image)
    return t.fill(tables)


def _byte_view(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    if not t.is_contiguous():
        t = t.contiguous()
    flat = t.reshape(-1)
    return flat if flat.dtype == torch.uint8 else flat.view(torch.uint8)


class Copier:
    """Copies snapshot entries into a mapped slot and checksums them; one job at a time."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stalwart-copy")
        self._future: Future | None = None
        self._device_event = None  # CUDA: last D2H copy event, for the device-side wait
        self._stream = None
        self._cuda: bool | None = None  # CUDA available (then sources may be on a device)
        self._lock = threading.Lock()
        self._host_copied: threading.Event | None = None  # set once the host sources of the last job are copied
        self._programs: dict[int, tuple] = {}  # id(slot views) -> (views, entries, tables, copy program)

    @staticmethod
    def _copy_entry(name: str, src: torch.Tensor, dst: torch.Tensor, table: np.ndarray, block: int) -> None:
        s = _byte_view(src)
        n = s.numel()
        if n != dst.numel():
            raise LayoutError(f"{name!r}: {n} bytes to copy into a {dst.numel()}-byte slot entry")
        for start in range(0, n, COPY_CHUNK):
            stop = min(start + COPY_CHUNK, n)
            d = dst[start:stop]
            # numpy's memcpy, not Tensor.copy_: torch would fan the copy out over its
            # intra-op threads, which compete with the training step running meanwhile
            np.copyto(d.numpy(), s[start:stop].numpy())
            first = start // block
            ck.block_checksums(tensor_bytes(d), block, out=table[first : first + ck.block_count(stop - start, block)])

    @staticmethod
    def _copy_small(dsts: list[torch.Tensor], srcs: list[torch.Tensor], views: list[memoryview], tables: list[np.ndarray]) -> None:
        """Copy many small entries (one checksum block each, below torch's parallel grain:
        never fanned out over threads) in one call, then hash each."""
        if dsts:
            torch._foreach_copy_(dsts, srcs)
        h = xxhash.xxh3_64_intdigest
        for table, digest in zip(tables, map(h, views)):
            table[0] = digest

    def _program(self, entries: list[tuple[str, torch.Tensor]], dst: dict[str, torch.Tensor],
                 tables: dict[str, np.ndarray], block: int) -> tuple:
        """How to copy ``entries`` into one slot: small contiguous entries batched (their byte
        views prepared once), the rest entry by entry. Cached while the plan binds the same
        list of tensors to the same slot views (a new tensor, size or storage is a new list)."""
        cached = self._programs.get(id(dst))
        if cached is not None and cached[0] is dst and cached[1] is entries and cached[2] is tables:
            return cached[3]
        small: tuple[list, list, list, list] = ([], [], [], [])
        rest = []
        for name, src in entries:
            d = dst[name]
            n = src.numel() * src.element_size()
            if 0 < n <= min(block, SMALL_ENTRY) and src.is_contiguous() and n == d.numel():
                small[0].append(d)
                small[1].append(_byte_view(src))
                small[2].append(tensor_bytes(d))
                small[3].append(tables[name])
            else:
                rest.append((name, src, d))
        # keep only the programs of this plan's tensors: older ones hold views of dropped slots
        self._programs = {k: v for k, v in self._programs.items() if v[1] is entries}
        program = (small, rest)
        self._programs[id(dst)] = (dst, entries, tables, program)
        return program

    def copy_now(self, jobs, tables: dict[str, np.ndarray], block: int) -> None:
        """Copy small (eager) entries synchronously; CUDA sources are copied blocking."""
        small: tuple[list, list, list, list] = ([], [], [], [])
        for name, src, dst in jobs:
            src = src.cpu() if src.is_cuda else src
            n = src.numel() * src.element_size()
            if 0 < n <= min(block, SMALL_ENTRY) and n == dst.numel() and src.is_contiguous():
                small[0].append(dst)
                small[1].append(_byte_view(src))
                small[2].append(tensor_bytes(dst))
                small[3].append(tables[name])
            else:
                self._copy_entry(name, src, dst, tables[name], block)
        self._copy_small(*small)

    def start(self, entries: list[tuple[str, torch.Tensor]], dst: dict[str, torch.Tensor], tables: dict[str, np.ndarray],
              block: int, finish: Callable[[], None]) -> None:
        """Copy lazy ``entries`` (name, source) into their slot views ``dst[name]`` in the
        background, then call ``finish`` (on the copy thread). The caller's thread only
        queues device copies (CUDA sources); host sources are walked on the copy thread."""
        self.wait()
        if self._cuda is None:
            self._cuda = torch.cuda.is_available()
        if self._cuda:
            cuda_jobs = [(n, s, dst[n]) for n, s in entries if s.is_cuda]
            cpu_jobs = [(n, s) for n, s in entries if not s.is_cuda]
        else:  # no CUDA in this process: every source is on the host
            cuda_jobs, cpu_jobs = [], entries
        events: list[tuple[str, int, int, object]] = []
        if cuda_jobs:
            if self._stream is None:
                self._stream = torch.cuda.Stream()
            self._stream.wait_stream(torch.cuda.current_stream())  # the step that produced the values
            with torch.cuda.stream(self._stream):
                for name, src, d in cuda_jobs:
                    s = _byte_view(src)
                    for start in range(0, s.numel(), COPY_CHUNK):
                        stop = min(start + COPY_CHUNK, s.numel())
                        d[start:stop].copy_(s[start:stop], non_blocking=True)
                        ev = torch.cuda.Event()
                        ev.record(self._stream)
                        events.append((name, start, stop, ev))
            self._device_event = events[-1][3] if events else None

        copied = threading.Event() if cpu_jobs else None
        self._host_copied = copied

        def run() -> None:
            try:
                small, rest = self._program(cpu_jobs, dst, tables, block)
                self._copy_small(*small)
                for name, src, d in rest:
                    self._copy_entry(name, src, d, tables[name], block)
            finally:
                if copied is not None:  # the sources may change now; the header and report follow
                    copied.set()
            dsts = {n: d for n, _, d in cuda_jobs}
            for name, start, stop, ev in events:
                ev.synchronize()
                first = start // block
                view = tensor_bytes(dsts[name][start:stop])
                ck.block_checksums(view, block, out=tables[name][first : first + ck.block_count(stop - start, block)])
            finish()

        self._future = self._pool.submit(run)

    def wait_before_mutation(self) -> float:
        """Block until the live tensors may change; returns the seconds waited.

        CPU sources: their copy (and checksums) must be finished; the slot's header and
        the report to the keeper continue in the background. CUDA sources: only the
        device must have finished reading them, which the current stream waits for on
        the device; host-side hashing continues in the background. A failure of the
        background job is raised here once it is over, else by the next :meth:`wait`.
        """
        import time

        t0 = time.perf_counter()
        fut = self._future
        if self._device_event is not None:
            torch.cuda.current_stream().wait_event(self._device_event)
            self._device_event = None
        if self._host_copied is not None:
            self._host_copied.wait()
            self._host_copied = None
        if fut is not None and fut.done():
            fut.result()
        return time.perf_counter() - t0

    def wait(self) -> None:
        """Block until the last job (copy, checksums and ``finish``) is over."""
        fut = self._future
        if fut is not None:
            fut.result()

    def busy(self) -> bool:
        return self._future is not None and not self._future.done()

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self._programs.clear()


def map_slot_file(path: str, size: int, pin: bool) -> torch.Tensor:
    """A writable uint8 view of a shared-memory slot file (pinned for CUDA copies)."""
    t = torch.from_file(path, shared=True, size=size, dtype=torch.uint8)
    if pin and size and torch.cuda.is_available():
        rc = torch.cuda.cudart().cudaHostRegister(t.data_ptr(), size, 0)
        if int(rc) != 0:
            raise RuntimeError(f"cudaHostRegister of {path} failed with {rc}")
    return t


def unpin(t: torch.Tensor) -> None:
    if torch.cuda.is_available() and t.numel():
        torch.cuda.cudart().cudaHostUnregister(t.data_ptr())
