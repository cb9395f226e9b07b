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

import json
import math
import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from stalwart.errors import ChecksumError, FormatError
from stalwart.formats import checksum as ck
from stalwart.formats.dtypes import (
    dtype_from_name,
    dtype_from_safetensors,
    dtype_name,
    itemsize,
    safetensors_code,
    tensor_bytes,
)

DATAFILE_VERSION = 1
MAX_HEADER_BYTES = 100 * 1024 * 1024
WRITE_CHUNK = 8 * 1024 * 1024  # bytes hashed then written per step; a multiple of the block size


@dataclass(frozen=True)
class Entry:
    """One tensor stored in a data file (offsets relative to the start of the data area)."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


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
    size: int
    header_len: int
    header_digest: str
    rank: int | None = None

    def to_json(self) -> dict:
        out = {"path": self.path, "size": self.size, "header_len": self.header_len, "header_digest": self.header_digest}
        if self.rank is not None:
            out["rank"] = self.rank
        return out

    @staticmethod
    def from_json(obj) -> FileRecord:
        try:
            return FileRecord(
                str(obj["path"]), int(obj["size"]), int(obj["header_len"]), str(obj["header_digest"]),
                int(obj["rank"]) if obj.get("rank") is not None else None,
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


def _plan_entries(tensors: list[tuple[str, torch.Tensor]]) -> list[Entry]:
    # Largest element size first, then by name: with the 8-byte header padding every
    # entry is naturally aligned (the order safetensors' own writer uses).
    order = sorted(tensors, key=lambda nt: (-nt[1].element_size(), nt[0]))
    entries = []
    pos = 0
    for name, t in order:
        n = t.numel() * t.element_size()
        entries.append(Entry(name, t.dtype, tuple(t.shape), pos, pos + n))
        pos += n
    return entries


def _header_bytes(entries: list[Entry], block_size: int, sums: dict[str, str], rank: int | None, objects) -> bytes:
    meta = {"v": DATAFILE_VERSION, "block_size": block_size, "sums": sums}
    if rank is not None:
        meta["rank"] = rank
    if objects:
        meta["objects"] = objects
    header: dict = {"__metadata__": {"format": "pt", "stalwart": json.dumps(meta, separators=(",", ":"))}}
    for e in entries:
        code = safetensors_code(e.dtype)
        if code is None:  # no safetensors code: raw bytes, real dtype in the stalwart metadata
            header[e.name] = {"dtype": "U8", "shape": [e.nbytes], "data_offsets": [e.begin, e.end]}
            meta.setdefault("raw", {})[e.name] = {"dtype": dtype_name(e.dtype), "shape": list(e.shape)}
        else:
            header[e.name] = {"dtype": code, "shape": list(e.shape), "data_offsets": [e.begin, e.end]}
    if "raw" in meta:
        header["__metadata__"]["stalwart"] = json.dumps(meta, separators=(",", ":"))
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=True).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw


def write_datafile(
    path: str,
    tensors: list[tuple[str, torch.Tensor]],
    *,
    rank: int | None = None,
    objects: dict | None = None,
    block_size: int = ck.DEFAULT_BLOCK_SIZE,
    fsync: bool = True,
    relpath: str | None = None,
) -> FileRecord:
    """Write ``tensors`` (name, tensor) to a new data file at ``path``; return its record.

    Checksums are computed chunk by chunk while the previous chunk is being written
    (the write syscall releases the GIL), so hashing costs little wall time.
    """
    if WRITE_CHUNK % block_size:
        raise ValueError(f"block size {block_size} must divide the write chunk {WRITE_CHUNK}")
    prepared = [(n, _prepare(t)) for n, t in tensors]
    names = [n for n, _ in prepared]
    if len(set(names)) != len(names):
        raise FormatError(f"data file {path}: duplicate entry names")
    entries = _plan_entries(prepared)
    by_name = dict(prepared)
    placeholder = {e.name: "A" * ck.packed_length(ck.block_count(e.nbytes, block_size)) for e in entries}
    header = _header_bytes(entries, block_size, placeholder, rank, objects)
    data_start = len(header)
    total = data_start + (entries[-1].end if entries else 0)

    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, total)
        _pwrite_all(fd, header, 0)
        sums: dict[str, str] = {}
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="stalwart-write") as pool:
            pending: Future | None = None
            for e in entries:
                mv = tensor_bytes(by_name[e.name])
                table = np.empty(ck.block_count(e.nbytes, block_size), dtype=np.uint64)
                for start in range(0, e.nbytes, WRITE_CHUNK):
                    chunk = mv[start : start + WRITE_CHUNK]
                    first = start // block_size
                    ck.block_checksums(chunk, block_size, out=table[first : first + ck.block_count(len(chunk), block_size)])
                    if pending is not None:
                        pending.result()
                    pending = pool.submit(_pwrite_all, fd, chunk, data_start + e.begin + start)
                sums[e.name] = ck.pack_checksums(table)
            if pending is not None:
                pending.result()
        final = _header_bytes(entries, block_size, sums, rank, objects)
        if len(final) != len(header):  # cannot happen: checksum strings have fixed length
            raise FormatError(f"data file {path}: header length changed while writing")
        _pwrite_all(fd, final, 0)
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)
    return FileRecord(relpath if relpath is not None else os.path.basename(path), total, len(final) - 8, ck.digest(final), rank)


def _pwrite_all(fd: int, data, offset: int) -> None:
    mv = memoryview(data).cast("B")
    while mv:
        n = os.pwrite(fd, mv, offset)
        mv = mv[n:]
        offset += n


# --------------------------------------------------------------------------- reading


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
        except (KeyError, TypeError, ValueError) as e:
            raise FormatError(f"data file {path}: malformed entry {name!r}: {e!r}") from None
        if end - begin != math.prod(shape) * itemsize(dtype) or begin < 0:
            raise FormatError(f"data file {path}: entry {name!r} offsets [{begin}, {end}) do not fit {dtype_name(dtype)}{list(shape)}")
        entries[name] = Entry(name, dtype, shape, begin, end)
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
