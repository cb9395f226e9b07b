"""Reading checkpoints: open, plan, verified byte-range reads, full verification."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from stalwart.errors import ChecksumError, FormatError, LayoutError, StalwartError
from stalwart.formats.atomic import parse_step_dirname, read_latest
from stalwart.formats.checksum import verify_blocks
from stalwart.formats.datafile import FileHeader, open_data_file, read_entry_range, read_header, verify_file
from stalwart.formats.dtypes import dtype_name, itemsize, tensor_bytes
from stalwart.formats.geometry import Box
from stalwart.formats.layout import Explicit, Fragment, Layout, Mesh, TensorSpec
from stalwart.formats.manifest import MANIFEST_NAME, Manifest, read_manifest
from stalwart.formats.planner import Read, ReadPlan, plan_reads
from stalwart.formats.tree import is_flat_tensor_dict, unflatten

Progress = Callable[[int], None]


def resolve_checkpoint_dir(path: str) -> str:
    """A checkpoint directory, or a root whose ``latest`` pointer names one."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FormatError(f"{path}: no such file or directory")
    if not os.path.isdir(path):
        raise FormatError(f"{path} is a file; a stalwart checkpoint is a directory")
    if os.path.exists(os.path.join(path, MANIFEST_NAME)):
        return path
    latest = read_latest(path)
    if latest is not None:
        target = os.path.join(path, latest)
        if not os.path.exists(os.path.join(target, MANIFEST_NAME)):
            raise FormatError(f"{path}/latest names {latest!r}, which has no {MANIFEST_NAME} (not committed)")
        return target
    steps = sorted(n for n in os.listdir(path) if parse_step_dirname(n) is not None)
    hint = f" (it holds {len(steps)} step directories but no 'latest' pointer)" if steps else ""
    raise FormatError(f"{path} has no {MANIFEST_NAME} and no 'latest' pointer: not a stalwart checkpoint{hint}")


@dataclass
class VerifyReport:
    path: str
    problems: list[str] = field(default_factory=list)
    files_checked: int = 0
    bytes_checked: int = 0
    tensors_checked: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


class Checkpoint:
    """An open checkpoint: its manifest and verified partial reads. Use as a context manager."""

    def __init__(self, path: str) -> None:
        self.path = resolve_checkpoint_dir(path)
        self.manifest: Manifest = read_manifest(self.path)
        self.layout: Layout = self.manifest.layout
        self._files: dict[int, tuple[int, FileHeader]] = {}
        self._maps: dict[int, torch.UntypedStorage] = {}
        self._lock = threading.Lock()

    # metadata -----------------------------------------------------------------
    @property
    def step(self) -> int | None:
        return self.manifest.step

    @property
    def objects(self) -> dict:
        return self.manifest.objects

    @property
    def tensors(self) -> dict[str, TensorSpec]:
        return self.layout.tensors

    def aliases(self) -> dict[str, str]:
        """alias name -> the stored tensor it refers to."""
        return {a: n for n, t in self.tensors.items() for a in t.aliases}

    def rank_objects(self, rank: int) -> dict:
        """The JSON objects the writer of ``rank`` stored in its data file."""
        if self.manifest.file_of_rank(rank) is None:
            return {}
        return self._open_rank(rank)[1].objects

    # files --------------------------------------------------------------------
    def _open_rank(self, rank: int) -> tuple[int, FileHeader]:
        with self._lock:
            hit = self._files.get(rank)
            if hit is not None:
                return hit
            record = self.manifest.file_of_rank(rank)
            if record is None:
                raise FormatError(f"{self.path}: the manifest lists no data file for rank {rank}, which its layout reads from")
            full = os.path.join(self.path, record.path)
            try:
                fd = open_data_file(full, record)
            except FileNotFoundError:
                raise FormatError(f"{self.path}: data file {record.path} (rank {rank}) is missing") from None
            try:
                header = read_header(fd, full, record)
            except BaseException:
                os.close(fd)
                raise
            self._files[rank] = (fd, header)
            return fd, header

    def _mapped(self, rank: int) -> torch.UntypedStorage:
        """A private (copy-on-write) memory map of the rank's data file."""
        with self._lock:
            hit = self._maps.get(rank)
            if hit is None:
                record = self.manifest.file_of_rank(rank)
                path = os.path.join(self.path, record.path)
                if record.compression is not None:
                    path = f"/proc/self/fd/{self._files[rank][0]}"  # the decompressed in-memory copy
                hit = torch.UntypedStorage.from_file(path, False, record.size)
                self._maps[rank] = hit
            return hit

    def close(self) -> None:
        with self._lock:
            for fd, _ in self._files.values():
                os.close(fd)
            self._files.clear()
            self._maps.clear()  # tensors handed out keep their mapping alive

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:  # pragma: no cover - best effort
        with contextlib.suppress(Exception):
            self.close()

    # reading ------------------------------------------------------------------
    def _names(self, names: Iterable[str] | None, target: Layout) -> list[str]:
        if names is None:
            return list(target.tensors)
        aliases = self.aliases()
        out = []
        for n in names:
            n = aliases.get(n, n)
            if n not in self.tensors:
                raise FormatError(f"{self.path}: no tensor named {n!r} in this checkpoint")
            out.append(n)
        return list(dict.fromkeys(out))

    def plan(self, layout: Layout | None = None, rank: int = 0, names: Iterable[str] | None = None) -> ReadPlan:
        """The reads that give ``rank`` of ``layout`` (default: whole tensors) its tensors."""
        target = layout if layout is not None else Layout.single(self.tensors)
        missing = [n for n in target.tensors if n not in self.tensors]
        if names is None and missing:
            raise LayoutError(f"target layout names tensors the checkpoint {self.path} lacks: {missing[:5]}")
        return plan_reads(self.layout, target, rank, self._names(names, target), block_size=self.manifest.block_size)

    def execute(
        self, plan: ReadPlan, *, progress: Progress | None = None, workers: int = 2, mmap: bool = False
    ) -> dict[str, torch.Tensor]:
        """Run ``plan``: allocate the local tensors and fill them with verified bytes.

        With ``mmap``, an output that is exactly one whole stored entry becomes a
        copy-on-write view of the file's pages (verified by hashing them) instead of
        a fresh copy, as safetensors' ``load_file`` does.
        """
        outputs: dict[str, torch.Tensor] = {}
        reads = plan.reads
        if mmap:
            reads = []
            for read in plan.reads:
                mapped = self._map_whole_entry(read, plan)
                if mapped is None:
                    reads.append(read)
                else:
                    outputs[read.copies[0].dst] = mapped
                    if progress is not None:
                        progress(read.nbytes)
        for o in plan.outputs.values():
            if o.name not in outputs:
                outputs[o.name] = (torch.empty if o.covered else torch.zeros)(o.shape, dtype=o.dtype)
        flats = {n: t.reshape(-1) for n, t in outputs.items()}
        local = threading.local()

        def run(read: Read) -> None:
            self._execute_read(read, flats, local)
            if progress is not None:
                progress(read.nbytes)

        if workers > 1 and len(reads) > 1:
            with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="stalwart-read") as pool:
                for _ in pool.map(run, reads):
                    pass
        else:
            for r in reads:
                run(r)
        return outputs

    def _map_whole_entry(self, read: Read, plan: ReadPlan) -> torch.Tensor | None:
        if len(read.copies) != 1 or read.start != 0 or read.stop != read.entry_nbytes:
            return None
        c = read.copies[0]
        out = plan.outputs[c.dst]
        item = read.itemsize
        numel = read.entry_nbytes // item
        if c.src_offset or c.dst_offset or numel != c.numel or not out.covered or not _dense(c.lengths, c.src_strides):
            return None
        if not _dense(c.lengths, c.dst_strides) or numel != _numel(out.shape):
            return None
        _, header = self._open_rank(read.rank)
        entry = header.entries.get(read.entry)
        if entry is None or entry.nbytes != read.entry_nbytes or entry.dtype != out.dtype or entry.panels is not None:
            return None  # the copying path copies entries stored as panels and raises the precise errors
        offset = header.data_start + entry.begin
        if offset % item:
            return None
        storage = self._mapped(read.rank)
        t = torch.empty(0, dtype=out.dtype).set_(storage, offset // item, out.shape, _row_major(out.shape))
        verify_blocks(tensor_bytes(t) if numel else b"", header.checksums[read.entry], 0, header.block_size,
                      f"{header.path} entry {read.entry!r}", offset)
        return t

    def _check_arrangement(self, header: FileHeader, entry) -> None:
        # Checksums cannot catch a file whose entry is arranged otherwise than the
        # manifest says: the bytes are intact, only their places differ.
        want = self.tensors[entry.name].panels
        if entry.panels != want:
            raise FormatError(
                f"{header.path}: entry {entry.name!r} is stored {_arrangement(entry.panels)},"
                f" the manifest says {_arrangement(want)}"
            )

    def _execute_read(self, read: Read, flats: dict[str, torch.Tensor], local: threading.local) -> None:
        fd, header = self._open_rank(read.rank)
        entry = header.entries.get(read.entry)
        if entry is None:
            raise FormatError(f"{header.path}: no entry {read.entry!r}, though the manifest's layout stores it there")
        if entry.nbytes != read.entry_nbytes or itemsize(entry.dtype) != read.itemsize:
            raise FormatError(
                f"{header.path}: entry {read.entry!r} is {dtype_name(entry.dtype)}{list(entry.shape)}"
                f" ({entry.nbytes} bytes); the manifest's layout expects {read.entry_nbytes} bytes"
            )
        self._check_arrangement(header, entry)
        item = read.itemsize
        if len(read.copies) == 1:
            c = read.copies[0]
            dst = flats[c.dst]
            if (
                c.src_offset * item == read.start
                and c.numel * item == read.nbytes
                and _dense(c.lengths, c.src_strides)
                and _dense(c.lengths, c.dst_strides)
            ):
                region = dst[c.dst_offset : c.dst_offset + c.numel]
                read_entry_range(fd, header, read.entry, read.start, read.stop, out=tensor_bytes(region))
                return
        scratch = getattr(local, "buf", None)
        if scratch is None or len(scratch) < read.nbytes:
            scratch = local.buf = memoryview(bytearray(max(read.nbytes, 1 << 20)))
        buf, skip = read_entry_range(fd, header, read.entry, read.start, read.stop, out=scratch)
        src = torch.frombuffer(buf, dtype=torch.uint8)[skip:].view(entry.dtype) if read.nbytes else None
        base = read.start // item
        for c in read.copies:
            view = src.as_strided(c.lengths, c.src_strides, c.src_offset - base)
            flats[c.dst].as_strided(c.lengths, c.dst_strides, c.dst_offset).copy_(view)

    def load(
        self,
        layout: Layout | None = None,
        rank: int = 0,
        names: Iterable[str] | None = None,
        *,
        progress: Progress | None = None,
        workers: int = 2,
        mmap: bool = True,
    ) -> dict:
        """Tensors as ``rank`` of ``layout`` holds them (whole tensors without a layout).

        ``mmap`` (default on): tensors stored whole are copy-on-write views of the
        file's pages rather than copies (see :meth:`execute`).

        Without a layout and without ``names``, the saved structure is rebuilt: nested
        dicts/lists and non-tensor values come back as they were saved, and tied
        aliases are the same tensor object.
        """
        plan = self.plan(layout, rank, names)
        tensors = self.execute(plan, progress=progress, workers=workers, mmap=mmap)
        if layout is not None:
            for name, t in list(tensors.items()):
                want = layout.spec(name).dtype
                if t.dtype != want:
                    tensors[name] = t.to(want)
            return tensors
        for alias, owner in self.aliases().items():
            if owner in tensors and (names is None or alias in set(names)):
                tensors[alias] = tensors[owner]
        tree = self.manifest.tree
        if names is None and tree is not None and not is_flat_tensor_dict(tree):
            return unflatten(tree, tensors)
        if names is not None:
            return {n: tensors[self.aliases().get(n, n)] for n in names}
        return tensors

    def read(self, name: str, box: Box | tuple[slice, ...] | None = None) -> torch.Tensor:
        """One tensor, or just the region ``box`` of it (reads only the bytes needed)."""
        name = self.aliases().get(name, name)
        spec = self.tensors.get(name)
        if spec is None:
            raise FormatError(f"{self.path}: no tensor named {name!r}")
        if box is None:
            region = Box.full(spec.shape)
        elif isinstance(box, Box):
            region = box
        else:
            region = _box_from_slices(box, spec.shape)
        if not Box.full(spec.shape).contains(region):
            raise LayoutError(f"tensor {name!r}: region {region.to_json()} is outside shape {list(spec.shape)}")
        target = Layout(Mesh.single(), [TensorSpec(name, spec.shape, spec.dtype, Explicit(((0, Fragment(region)),)))])
        return self.execute(self.plan(target, 0, [name]))[name] if region.numel else torch.empty(region.lengths, dtype=spec.dtype)

    # verification --------------------------------------------------------------
    def verify(self, *, progress: Progress | None = None) -> VerifyReport:
        """Check every checksum and that every tensor is exactly covered by its stored pieces."""
        report = VerifyReport(self.path)
        headers: dict[int, FileHeader | None] = {}  # None: the file itself is bad (already reported)
        for record in self.manifest.files:
            full = os.path.join(self.path, record.path)
            try:
                fd = open_data_file(full, record)
            except (FileNotFoundError, StalwartError) as e:
                report.problems.append(f"data file {record.path}: missing" if isinstance(e, FileNotFoundError) else str(e))
                if record.rank is not None:
                    headers[record.rank] = None
                continue
            try:
                header = read_header(fd, full, record)
                if record.rank is not None:
                    headers[record.rank] = header
                verify_file(fd, header, progress=progress)
                report.files_checked += 1
                report.bytes_checked += record.size
            except StalwartError as e:
                report.problems.append(str(e))
                if record.rank is not None:
                    headers.setdefault(record.rank, None)
            finally:
                os.close(fd)
        self._verify_coverage(report, headers)
        return report

    def _verify_coverage(self, report: VerifyReport, headers: dict[int, FileHeader | None]) -> None:
        layout = self.layout
        stored: dict[str, list] = {n: [] for n in layout.tensors}
        for rank in range(layout.world_size):
            for name, shard in layout.writes(rank):
                if rank not in headers:
                    report.problems.append(f"tensor {name!r}: rank {rank} should store a share but has no data file")
                    continue
                header = headers[rank]
                # pieces as stored (split at panel boundaries): global boxes, offsets into the entry
                pieces = layout.stored(name, rank).pieces
                if header is None:  # the file's own problem is already reported; do not report holes twice
                    stored[name].extend((rank, p) for p in pieces)
                    continue
                entry = header.entries.get(name)
                want = shard.numel * itemsize(layout.tensors[name].dtype)
                if entry is None:
                    report.problems.append(f"tensor {name!r}: data file {header.path} lacks its entry (rank {rank})")
                    continue
                if entry.nbytes != want or entry.dtype != layout.tensors[name].dtype:
                    report.problems.append(
                        f"tensor {name!r}: entry in {header.path} is {dtype_name(entry.dtype)}{list(entry.shape)},"
                        f" layout expects {dtype_name(layout.tensors[name].dtype)} with {shard.numel} elements"
                    )
                    continue
                try:
                    self._check_arrangement(header, entry)
                except FormatError as e:
                    report.problems.append(str(e))
                    continue
                stored[name].extend((rank, p) for p in pieces)
        for name, pieces in stored.items():
            spec = layout.tensors[name]
            report.tensors_checked += 1
            count = torch.zeros(spec.shape, dtype=torch.int32)
            for _, p in pieces:
                count[tuple(slice(o, o + n) for o, n in zip(p.box.offsets, p.box.lengths))] += 1
            holes = int((count == 0).sum())
            if holes:
                first = [int(i) for i in (count == 0).nonzero()[0]] if spec.shape else []
                report.problems.append(f"tensor {name!r}: {holes} elements are not covered by any fragment (first at {first})")
            if int((count > 1).sum()):
                conflict = self._overlap_conflict(name, [(r, p) for r, p in pieces if headers.get(r) is not None])
                if conflict:
                    report.problems.append(conflict)

    def _overlap_conflict(self, name: str, pieces: list) -> str | None:
        """Overlapping fragments are fine only if they hold identical bytes."""
        spec = self.tensors[name]
        for i, (ra, pa) in enumerate(pieces):
            for rb, pb in pieces[i + 1 :]:
                region = pa.box.intersect(pb.box)
                if region is None:
                    continue
                try:
                    a = self._read_piece(ra, name, pa.sub(region), spec)
                    b = self._read_piece(rb, name, pb.sub(region), spec)
                except StalwartError as e:
                    return f"tensor {name!r}: cannot compare overlapping fragments: {e}"
                if not _bitwise_equal(a, b):
                    return f"tensor {name!r}: fragments of ranks {ra} and {rb} overlap at {region.to_json()} with different bytes"
        return None

    def _read_piece(self, rank: int, name: str, piece, spec: TensorSpec) -> torch.Tensor:
        fd, header = self._open_rank(rank)
        item = itemsize(spec.dtype)
        a, b = piece.span()
        buf, skip = read_entry_range(fd, header, name, a * item, b * item)
        src = torch.frombuffer(buf, dtype=torch.uint8)[skip : skip + (b - a) * item].view(spec.dtype)
        return src.as_strided(piece.box.lengths, piece.strides, 0).clone()


def _arrangement(panels) -> str:
    return "row-major" if panels is None else f"as panels of width {panels[1]} along dim {panels[0]}"


def _bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bytes(tensor_bytes(a.contiguous())) == bytes(tensor_bytes(b.contiguous()))


def _numel(shape) -> int:
    n = 1
    for x in shape:
        n *= x
    return n


def _row_major(shape) -> tuple[int, ...]:
    out, acc = [], 1
    for n in reversed(shape):
        out.append(acc)
        acc *= max(n, 1)
    return tuple(reversed(out))


def _dense(lengths: tuple[int, ...], strides: tuple[int, ...]) -> bool:
    expect = 1
    for n, s in zip(reversed(lengths), reversed(strides)):
        if n != 1 and s != expect:
            return False
        expect *= n
    return True


def _box_from_slices(slices: tuple[slice, ...], shape: tuple[int, ...]) -> Box:
    if not isinstance(slices, tuple):
        slices = (slices,)
    if len(slices) > len(shape):
        raise LayoutError(f"{len(slices)} slices for a tensor of {len(shape)} dims")
    offs, lens = [], []
    for d, n in enumerate(shape):
        s = slices[d] if d < len(slices) else slice(None)
        if isinstance(s, int):
            s = slice(s, s + 1)
        start, stop, step = s.indices(n)
        if step != 1:
            raise LayoutError("partial reads take contiguous slices (step 1)")
        offs.append(start)
        lens.append(max(0, stop - start))
    return Box(tuple(offs), tuple(lens))


__all__ = ["Checkpoint", "ChecksumError", "VerifyReport", "resolve_checkpoint_dir"]
