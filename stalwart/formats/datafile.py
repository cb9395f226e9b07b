"""Data files: standard safetensors files whose header also carries block checksums.

Layout of a data file (valid safetensors, readable by any safetensors tool)::

    [u64 N][N bytes of JSON header, space padded to a multiple of 8][tensor bytes]

The header's ``__metadata__`` holds ``"format": "pt"`` and ``"stalwart"``: a JSON
string with the format version, the checksum block size, the writer's rank, the
writer's small JSON objects and, per entry, the XXH3-64 checksum of every
``block_size`` block of that entry's bytes (base64 of little-endian u64).

All offsets are known before any data is written: the header is written first
with placeholder checksums of the final length, the data is streamed (hashing each
chunk while the previous one is being written), and the header is rewritten in
place with the real checksums. The manifest then records the header's length and
XXH3-128 digest, so header -> block checksums -> bytes are all verifiable, and a
file whose final header was never written does not verify.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

from stalwart.errors import ChecksumError, FormatError, LayoutError
from stalwart.formats import checksum as ck
from stalwart.formats.direct_io import RangeWriter
from stalwart.formats.direct_io import pwrite_all as _pwrite_all
from stalwart.formats.dtypes import (
    dtype_from_name,
    dtype_from_safetensors,
    dtype_name,
    itemsize,
    safetensors_code,
    tensor_bytes,
)
from stalwart.formats.geometry import check_panels

DATAFILE_VERSION = 2  # the newest this module reads; 2 adds per-entry panels
MAX_HEADER_BYTES = 100 * 1024 * 1024
WRITE_CHUNK = 8 * 1024 * 1024  # bytes hashed then written per piece, per worker
DIRECT_MIN_BYTES = 16 * 1024 * 1024  # smaller files go through the page cache


@dataclass(frozen=True)
class Entry:
    """One tensor stored in a data file (offsets relative to the start of the data area)."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]  # the local shard's shape
    begin: int
    end: int
    panels: tuple[int, int] | None = None  # (dim, width): stored as panels (LocalShard.paneled); None: row-major

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def stored_shape(self) -> tuple[int, ...]:
        """The shape a plain safetensors reader sees: the local shard's, or for panels of
        equal width ``(panels, *shape with width along dim)``, else flat."""
        if self.panels is None:
            return self.shape
        dim, width = self.panels
        n = self.shape[dim]
        if n % width:
            return (math.prod(self.shape),)
        return (n // width, *(width if k == dim else x for k, x in enumerate(self.shape)))


@dataclass
class FileHeader:
    """A parsed, validated data-file header."""

    path: str
    header_len: int
    entries: dict[str, Entry]
    block_size: int
    checksums: dict[str, np.ndarray]
    rank: int | None = None
    objects: dict = field(default_factory=dict)

    @property
    def data_start(self) -> int:
        return 8 + self.header_len

    @property
    def data_size(self) -> int:
        return max((e.end for e in self.entries.values()), default=0)

    @property
    def file_size(self) -> int:
        return self.data_start + self.data_size


@dataclass(frozen=True)
class FileRecord:
    """What the manifest records of a written data file."""

    path: str  # relative to the checkpoint directory
    size: int  # of the (decompressed) data file
    header_len: int
    header_digest: str
    rank: int | None = None
    compression: str | None = None  # "zstd": the file on disk is a zstd frame of the data file
    stored_size: int | None = None  # size on disk when compressed
    stored_digest: str | None = None  # XXH3-128 of the compressed bytes

    def to_json(self) -> dict:
        out: dict = {"path": self.path, "size": self.size, "header_len": self.header_len, "header_digest": self.header_digest}
        if self.rank is not None:
            out["rank"] = self.rank
        if self.compression is not None:
            out.update(compression=self.compression, stored_size=self.stored_size, stored_digest=self.stored_digest)
        return out

    @staticmethod
    def from_json(obj) -> FileRecord:
        try:
            compression = obj.get("compression")
            if compression not in (None, "zstd"):
                raise FormatError(f"data file {obj.get('path')!r}: unknown compression {compression!r}")
            return FileRecord(
                str(obj["path"]), int(obj["size"]), int(obj["header_len"]), str(obj["header_digest"]),
                int(obj["rank"]) if obj.get("rank") is not None else None,
                compression,
                int(obj["stored_size"]) if compression else None,
                str(obj["stored_digest"]) if compression else None,
            )
        except (KeyError, TypeError, ValueError) as e:
            raise FormatError(f"malformed file record {obj!r}: {e}") from None


# --------------------------------------------------------------------------- writing


def _prepare(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    if t.device.type != "cpu":
        t = t.to("cpu")
    if not t.is_contiguous():
        t = t.contiguous()
    return t


def to_panels(t: torch.Tensor, dim: int, width: int) -> torch.Tensor:
    """The bytes of local shard ``t`` arranged in panels (see ``LocalShard.paneled``): a
    new contiguous 1-D tensor."""
    n = t.shape[dim]
    if n % width == 0:  # one strided copy
        split = (*t.shape[:dim], n // width, width, *t.shape[dim + 1 :])
        return t.reshape(split).movedim(dim, 0).contiguous().reshape(-1)
    out = torch.empty(t.numel(), dtype=t.dtype, device=t.device)
    pos = 0
    for start in range(0, n, width):
        part = t.narrow(dim, start, min(width, n - start))
        out[pos : pos + part.numel()].view(part.shape).copy_(part)
        pos += part.numel()
    return out


def _plan_entries(specs: list[tuple[str, torch.dtype, tuple[int, ...]]], panels: Mapping[str, tuple[int, int]]) -> list[Entry]:
    # Largest element size first, then by name: with the 8-byte header padding every
    # entry is naturally aligned (the order safetensors' own writer uses).
    order = sorted(specs, key=lambda s: (-itemsize(s[1]), s[0]))
    entries = []
    pos = 0
    for name, dtype, shape in order:
        n = math.prod(shape) * itemsize(dtype)
        entries.append(Entry(name, dtype, tuple(shape), pos, pos + n, check_panels(panels.get(name), shape, f"entry {name!r}")))
        pos += n
    return entries


def _header_bytes(entries: list[Entry], block_size: int, sums: dict[str, str], rank: int | None, objects) -> bytes:
    # Version 2 only when a feature of it is used, so other files stay readable by v1 readers.
    version = 2 if any(e.panels is not None for e in entries) else 1
    meta: dict = {"v": version, "block_size": block_size, "sums": sums}
    if rank is not None:
        meta["rank"] = rank
    if objects:
        meta["objects"] = objects
    header: dict = {"__metadata__": {"format": "pt"}}
    for e in entries:
        code = safetensors_code(e.dtype)
        if e.panels is not None:
            meta.setdefault("panels", {})[e.name] = {"dim": e.panels[0], "width": e.panels[1], "shape": list(e.shape)}
        if code is None:  # no safetensors code: raw bytes, real dtype in the stalwart metadata
            header[e.name] = {"dtype": "U8", "shape": [e.nbytes], "data_offsets": [e.begin, e.end]}
            meta.setdefault("raw", {})[e.name] = {"dtype": dtype_name(e.dtype), "shape": list(e.shape)}
        else:
            header[e.name] = {"dtype": code, "shape": list(e.stored_shape), "data_offsets": [e.begin, e.end]}
    header["__metadata__"]["stalwart"] = json.dumps(meta, separators=(",", ":"))
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=True).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw


class FileImage:
    """The byte layout of a data file with given entries, before any data exists.

    Entry offsets, the header length and the file size are fixed by the entries'
    names, dtypes and shapes; checksums only change the header's content, never its
    length. Writers use this to write data at its final place (on disk, or into a
    shared-memory image that is a valid data file once its header is finalised).
    """

    def __init__(
        self,
        specs: list[tuple[str, torch.dtype, tuple[int, ...]]],
        *,
        rank: int | None = None,
        objects: dict | None = None,
        block_size: int = ck.DEFAULT_BLOCK_SIZE,
        panels: Mapping[str, tuple[int, int]] | None = None,
    ) -> None:
        names = [n for n, _, _ in specs]
        if len(set(names)) != len(names):
            raise FormatError("duplicate entry names in a data file")
        self.rank = rank
        self.objects = objects
        self.block_size = block_size
        self.order = _plan_entries(specs, panels or {})
        self.entries = {e.name: e for e in self.order}
        self.block_counts = {e.name: ck.block_count(e.nbytes, block_size) for e in self.order}
        placeholder = {e.name: "A" * ck.packed_length(self.block_counts[e.name]) for e in self.order}
        self.placeholder_header = _header_bytes(self.order, block_size, placeholder, rank, objects)
        self.data_start = len(self.placeholder_header)
        self.size = self.data_start + (self.order[-1].end if self.order else 0)

    def header(self, tables: dict[str, np.ndarray]) -> bytes:
        """The final header for these checksum tables (same length as the placeholder)."""
        sums = {n: ck.pack_checksums(tables[n]) for n in self.entries}
        final = _header_bytes(self.order, self.block_size, sums, self.rank, self.objects)
        if len(final) != len(self.placeholder_header):  # cannot happen: checksum strings have fixed length
            raise FormatError("data file header length changed")
        return final

    def record(self, relpath: str, header: bytes) -> FileRecord:
        return FileRecord(relpath, self.size, len(header) - 8, ck.digest(header), self.rank)


class DataFileWriter:
    """Streams a data file whose entries (names, dtypes, shapes) are declared up front.

    ``panels`` gives entries stored as panels (see :class:`Entry`); :meth:`write`
    takes their local shard and arranges it.

    Entries may be written in any order, whole (:meth:`write`) or in parts at
    block-aligned offsets (:meth:`write_at`), with checksums computed here or passed
    in when the caller computed them while copying the bytes. Pieces of up to
    ``WRITE_CHUNK`` bytes are hashed and written on ``workers`` threads
    (:class:`~stalwart.formats.direct_io.RangeWriter`); files of ``DIRECT_MIN_BYTES``
    or more are written in ``mode`` (``"cache"``, ``"direct"``: bypassing the page
    cache, ``"auto"``: through it while it keeps up), smaller ones through the page
    cache. :meth:`write` may return
    while its last pieces are in flight: the caller keeps the tensor unchanged until
    :meth:`flush` or :meth:`close`. :meth:`close` checks every byte was written,
    writes the final header and fsyncs; :meth:`abort` removes the file.
    """

    def __init__(
        self,
        path: str,
        specs: list[tuple[str, torch.dtype, tuple[int, ...]]],
        *,
        rank: int | None = None,
        objects: dict | None = None,
        block_size: int = ck.DEFAULT_BLOCK_SIZE,
        relpath: str | None = None,
        mode: str = "cache",
        panels: Mapping[str, tuple[int, int]] | None = None,
        workers: int = 2,
    ) -> None:
        if block_size <= 0:
            raise ValueError(f"block size must be positive, got {block_size}")
        self.path = path
        self.relpath = relpath if relpath is not None else os.path.basename(path)
        self.block_size = block_size
        self.image = FileImage(specs, rank=rank, objects=objects, block_size=block_size, panels=panels)
        self.entries = self.image.entries
        self._tables = {n: np.zeros(c, dtype=np.uint64) for n, c in self.image.block_counts.items()}
        self._written = dict.fromkeys(self.entries, 0)
        self.data_start = self.image.data_start
        self.size = self.image.size
        self._io: RangeWriter | None = None
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            # Sized up front: every write lands inside the file (no extending writes,
            # which O_DIRECT would serialise), the placeholder header marks it unfinished.
            os.ftruncate(self._fd, self.size)
            _pwrite_all(self._fd, self.image.placeholder_header, 0)
            self._io = RangeWriter(
                self._fd, path, mode=mode if self.size >= DIRECT_MIN_BYTES else "cache",
                workers=workers if self.size >= WRITE_CHUNK else 0, chunk=WRITE_CHUNK,
            )
        except BaseException:
            self.abort()
            raise

    @property
    def direct(self) -> bool:
        """Whether the file's bulk bypasses the page cache now."""
        return self._io is not None and self._io.direct

    def write(self, name: str, tensor: torch.Tensor, *, arranged: bool = False) -> None:
        """Write a whole entry from a tensor of the declared dtype and shape: the local
        shard, which an entry with panels stores arranged in them - or, with
        ``arranged``, a tensor whose bytes are already so arranged."""
        e = self._entry(name)
        t = tensor.detach()
        if e.panels is not None and not arranged:
            if tuple(t.shape) != e.shape:
                raise FormatError(
                    f"data file {self.path}: entry {name!r} is stored as panels and needs the local shard's shape"
                    f" {list(e.shape)}, got {list(t.shape)}"
                )
            t = to_panels(t, *e.panels)
        t = _prepare(t)
        if t.dtype != e.dtype or t.numel() * t.element_size() != e.nbytes:
            raise FormatError(
                f"data file {self.path}: entry {name!r} was declared {dtype_name(e.dtype)}{list(e.shape)},"
                f" got {dtype_name(t.dtype)}{list(t.shape)}"
            )
        self.write_at(name, 0, tensor_bytes(t))

    def write_at(self, name: str, offset: int, data, checksums: np.ndarray | None = None) -> None:
        """Write bytes of entry ``name`` at byte ``offset`` (a multiple of the block size).

        ``checksums`` (one per block of ``data``) may be given when already computed.
        """
        e = self._entry(name)
        mv = memoryview(data).cast("B")
        bs = self.block_size
        if offset % bs or offset < 0 or offset + len(mv) > e.nbytes:
            raise FormatError(f"data file {self.path}: bad write of {len(mv)} bytes at {offset} into entry {name!r} of {e.nbytes}")
        if len(mv) % bs and offset + len(mv) != e.nbytes:
            raise FormatError(f"data file {self.path}: only the last write into {name!r} may end off a block boundary")
        table = self._tables[name]
        first = offset // bs
        prepare = None
        if checksums is not None:
            if len(checksums) != ck.block_count(len(mv), bs):
                raise FormatError(f"data file {self.path}: {len(checksums)} checksums for {len(mv)} bytes of {name!r}")
            table[first : first + len(checksums)] = checksums
        else:
            def prepare(lo: int, hi: int) -> None:
                # the blocks that start in [lo, hi): each piece hashes its own, on its worker
                b0, b1 = -(-lo // bs), -(-hi // bs)
                if b1 > b0:
                    ck.block_checksums(mv[b0 * bs : b1 * bs], bs, out=table[first + b0 : first + b1])
        if mv:
            self._io.write(self.data_start + e.begin + offset, mv, prepare)
        self._written[name] += len(mv)

    def flush(self) -> None:
        """Wait until every byte handed to :meth:`write` / :meth:`write_at` is written,
        so the caller may reuse its buffers."""
        self._io.wait()

    def _entry(self, name: str) -> Entry:
        try:
            return self.entries[name]
        except KeyError:
            raise FormatError(f"data file {self.path}: entry {name!r} was not declared") from None

    def close(self, *, fsync: bool = True) -> FileRecord:
        """Finish the file (final header, fsync) and return its record."""
        try:
            self._io.close()
            short = [n for n, e in self.entries.items() if self._written[n] != e.nbytes]
            if short:
                raise FormatError(f"data file {self.path}: entries not completely written: {short[:5]}")
            final = self.image.header(self._tables)
            _pwrite_all(self._fd, final, 0)
            if fsync:
                os.fsync(self._fd)
        except BaseException:
            self.abort()
            raise
        os.close(self._fd)
        self._fd = -1
        return self.image.record(self.relpath, final)

    def abort(self) -> None:
        """Stop and remove the partial file."""
        if self._io is not None:
            self._io.abort()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


def write_datafile(
    path: str,
    tensors: list[tuple[str, torch.Tensor]],
    *,
    rank: int | None = None,
    objects: dict | None = None,
    block_size: int = ck.DEFAULT_BLOCK_SIZE,
    fsync: bool = True,
    relpath: str | None = None,
    panels: Mapping[str, tuple[int, int]] | None = None,
    arranged: bool = False,
) -> FileRecord:
    """Write ``tensors`` (name, local shard) to a new data file at ``path``; return its record.

    ``panels`` names entries stored as panels: their shards are arranged so, unless
    ``arranged`` says the tensors given for them (in the shards' shapes) already are.
    """
    prepared = [(n, t.detach()) for n, t in tensors]  # write() makes each contiguous, as stored
    # With fsync the bulk of a large file bypasses the page cache (through it, every
    # byte is copied twice before the disk has it). Without, it goes through the page
    # cache, which returns at memory speed while pages are at hand, until it falls
    # behind (fresh pages faulted in slowly, writeback throttling): then past it.
    writer = DataFileWriter(
        path, [(n, t.dtype, tuple(t.shape)) for n, t in prepared], rank=rank, objects=objects,
        block_size=block_size, relpath=relpath, mode="direct" if fsync else "auto", panels=panels,
    )
    tensors_by_name = dict(prepared)
    try:
        for e in writer.image.order:  # in file order: sequential on disk
            writer.write(e.name, tensors_by_name[e.name], arranged=arranged)
    except BaseException:
        writer.abort()
        raise
    return writer.close(fsync=fsync)


# --------------------------------------------------------------------------- reading


def open_data_file(path: str, record: FileRecord | None) -> int:
    """Open a data file for reading; a zstd-compressed one is checked and decompressed
    into an anonymous in-memory file, so callers read every file the same way."""
    if record is None or record.compression is None:
        return os.open(path, os.O_RDONLY)
    import zstandard

    size = os.path.getsize(path)
    if size != record.stored_size:
        raise FormatError(f"compressed data file {path} is {size} bytes, manifest says {record.stored_size} (truncated?)")
    digest = ck.StreamDigest()
    fd = os.memfd_create(os.path.basename(path), os.MFD_CLOEXEC)
    try:
        dctx = zstandard.ZstdDecompressor()
        with open(path, "rb") as raw:
            reader = dctx.stream_reader(_Tee(raw, digest), read_across_frames=True)
            pos = 0
            while True:
                chunk = reader.read(WRITE_CHUNK)
                if not chunk:
                    break
                _pwrite_all(fd, chunk, pos)
                pos += len(chunk)
        if digest.hexdigest() != record.stored_digest:
            raise ChecksumError(f"compressed data file {path}: digest does not match the manifest")
        if pos != record.size:
            raise FormatError(f"compressed data file {path} decompresses to {pos} bytes, manifest says {record.size}")
    except zstandard.ZstdError as e:
        os.close(fd)
        raise FormatError(f"compressed data file {path} is corrupt: {e}") from None
    except BaseException:
        os.close(fd)
        raise
    return fd


class _Tee:
    """A file wrapper that feeds every byte read to a digest."""

    def __init__(self, f, digest: ck.StreamDigest) -> None:
        self.f = f
        self.digest = digest

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.digest.update(data)
        return data


def read_header(fd: int, path: str, record: FileRecord | None = None) -> FileHeader:
    """Read and validate the header of an open data file; check it against ``record``."""
    size = os.fstat(fd).st_size
    if record is not None and size != record.size:
        what = "truncated" if size < record.size else "longer than recorded"
        raise FormatError(f"data file {path} is {what}: {size} bytes on disk, manifest says {record.size}")
    if size < 8:
        raise FormatError(f"data file {path} is truncated: {size} bytes, not even a header length")
    n = int.from_bytes(os.pread(fd, 8, 0), "little")
    if n > MAX_HEADER_BYTES or 8 + n > size:
        raise FormatError(f"data file {path}: header length {n} is impossible for a {size}-byte file")
    if record is not None and n != record.header_len:
        raise FormatError(f"data file {path}: header is {n} bytes, manifest says {record.header_len}")
    raw = os.pread(fd, n, 8)
    if record is not None:
        got = ck.digest(n.to_bytes(8, "little") + raw)
        if got != record.header_digest:
            raise ChecksumError(
                f"data file {path}: header digest {got} does not match the manifest's {record.header_digest}"
                " (the file was modified or its write did not finish)"
            )
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"data file {path}: header is not valid JSON ({e})") from None
    return _parse_header(obj, path, n, size)


def _parse_header(obj, path: str, header_len: int, size: int) -> FileHeader:
    if not isinstance(obj, dict):
        raise FormatError(f"data file {path}: header is not a JSON object")
    meta_all = obj.pop("__metadata__", {}) or {}
    try:
        meta = json.loads(meta_all["stalwart"])
    except (KeyError, TypeError, json.JSONDecodeError):
        raise FormatError(f"data file {path} has no stalwart metadata: not a stalwart data file") from None
    version = meta.get("v")
    if not isinstance(version, int) or version > DATAFILE_VERSION:
        raise FormatError(f"data file {path}: data-file version {version!r} is newer than this stalwart supports ({DATAFILE_VERSION})")
    block_size = meta.get("block_size")
    if not isinstance(block_size, int) or block_size <= 0:
        raise FormatError(f"data file {path}: bad checksum block size {block_size!r}")
    raw_types = meta.get("raw", {})
    paneled = meta.get("panels", {})
    if not isinstance(paneled, dict) or not isinstance(raw_types, dict):
        raise FormatError(f"data file {path}: malformed stalwart metadata ('panels' / 'raw' are not objects)")
    unknown = sorted(set(paneled) - set(obj))
    if unknown:
        raise FormatError(f"data file {path}: panels given for entries it does not have: {unknown[:5]}")
    entries: dict[str, Entry] = {}
    for name, info in obj.items():
        try:
            begin, end = (int(x) for x in info["data_offsets"])
            st_shape = tuple(int(x) for x in info["shape"])
            if name in raw_types:
                dtype = dtype_from_name(raw_types[name]["dtype"])
                shape = tuple(int(x) for x in raw_types[name]["shape"])
            else:
                dtype = dtype_from_safetensors(info["dtype"])
                shape = st_shape
            panels = None
            if name in paneled:  # the header's shape is the panels'; the shard's is here
                shape = tuple(int(x) for x in paneled[name]["shape"])
                panels = check_panels((paneled[name]["dim"], paneled[name]["width"]), shape, f"entry {name!r}")
        except (KeyError, TypeError, ValueError, LayoutError) as e:
            raise FormatError(f"data file {path}: malformed entry {name!r}: {e}") from None
        declared = math.prod(st_shape) * (1 if name in raw_types else itemsize(dtype))
        if begin < 0 or end - begin != math.prod(shape) * itemsize(dtype) or declared != end - begin:
            raise FormatError(f"data file {path}: entry {name!r} offsets [{begin}, {end}) do not fit {dtype_name(dtype)}{list(shape)}")
        entries[name] = Entry(name, dtype, shape, begin, end, panels)
    pos = 0
    for e in sorted(entries.values(), key=lambda e: e.begin):
        if e.begin != pos:
            raise FormatError(f"data file {path}: entry {e.name!r} starts at {e.begin}, expected {pos} (hole or overlap)")
        pos = e.end
    if 8 + header_len + pos != size:
        raise FormatError(
            f"data file {path} is {'truncated' if 8 + header_len + pos > size else 'too long'}:"
            f" entries need {8 + header_len + pos} bytes, the file has {size}"
        )
    sums_text = meta.get("sums", {})
    checksums = {}
    for name, e in entries.items():
        try:
            table = ck.unpack_checksums(sums_text[name])
        except (KeyError, ValueError, ChecksumError):
            raise FormatError(f"data file {path}: entry {name!r} has no valid checksum table") from None
        if len(table) != ck.block_count(e.nbytes, block_size):
            raise FormatError(f"data file {path}: entry {name!r} has {len(table)} checksums, needs {ck.block_count(e.nbytes, block_size)}")
        checksums[name] = table
    return FileHeader(path, header_len, entries, block_size, checksums, meta.get("rank"), meta.get("objects") or {})


def read_entry_range(
    fd: int, header: FileHeader, name: str, start: int, stop: int, out: memoryview | None = None
) -> tuple[memoryview, int]:
    """Read bytes ``[start, stop)`` of entry ``name``, verified.

    The read is widened to checksum-block boundaries; returns ``(buffer, skip)`` where
    the requested bytes are ``buffer[skip : skip + stop - start]``. ``out`` may supply
    the destination buffer (at least the widened size).
    """
    e = header.entries[name]
    if not 0 <= start <= stop <= e.nbytes:
        raise FormatError(f"{header.path}: byte range [{start}, {stop}) outside entry {name!r} of {e.nbytes} bytes")
    bs = header.block_size
    lo = (start // bs) * bs
    hi = min(-(-stop // bs) * bs, e.nbytes)
    n = hi - lo
    buf = out[:n] if out is not None else memoryview(bytearray(n))
    _pread_into(fd, buf, header.data_start + e.begin + lo, header.path)
    ck.verify_blocks(buf, header.checksums[name], lo // bs, bs, f"{header.path} entry {name!r}", header.data_start + e.begin)
    return buf, start - lo


def _pread_into(fd: int, buf: memoryview, offset: int, path: str) -> None:
    view = buf
    pos = offset
    while view:
        got = os.preadv(fd, [view], pos)
        if got == 0:
            raise FormatError(f"data file {path} is truncated: read past end at byte {pos}")
        view = view[got:]
        pos += got


def verify_file(fd: int, header: FileHeader, chunk: int = WRITE_CHUNK, progress=None) -> None:
    """Check every block checksum of every entry (raises :class:`ChecksumError`)."""
    buf = memoryview(bytearray(chunk))
    bs = header.block_size
    for e in sorted(header.entries.values(), key=lambda e: e.begin):
        for start in range(0, e.nbytes, chunk):
            n = min(chunk, e.nbytes - start)
            view = buf[:n]
            _pread_into(fd, view, header.data_start + e.begin + start, header.path)
            ck.verify_blocks(view, header.checksums[e.name], start // bs, bs, f"{header.path} entry {e.name!r}", header.data_start + e.begin)
            if progress is not None:
                progress(n)
