"""Persistent tiers: where the keeper drains snapshots from host memory.

A tier spec is a string or a dict:

* ``"memory"`` - the keeper's shared-memory snapshots (always first; not a Tier object);
* ``"local:/nvme/ckpt"`` - node-local disk;
* ``"file:///lustre/run7"`` - a shared file system;
* any fsspec URL, e.g. ``"s3://bucket/run7"`` (object stores; needs the fsspec backend);
* ``{"url": "file:///lustre/run7", "every": 10, "keep_last": 3, "keep_every": 1000,
  "compress": "zstd", "fsync": True, "max_rate": 200e6, "options": {...fsspec storage options...}}``.

``max_rate`` caps the bytes per second the keeper writes to the tier (leave a shared file
system's bandwidth to others); snapshots that arrive faster than the tier takes them are
skipped for it, as for any slow tier.

Each tier commits a step exactly like the format does: data files, then the
manifest (the commit), then ``latest``; then it applies retention and rewrites its
durability record (``durability.json``: the complete steps it holds).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import json
import mmap
import os
import shutil
import tempfile
from dataclasses import dataclass, field, replace
from typing import Any

from stalwart.ckpt.pacing import Pacer
from stalwart.errors import StalwartError
from stalwart.formats import checksum as ck
from stalwart.formats.atomic import (
    atomic_write,
    fsync_dir,
    parse_step_dirname,
    read_latest,
    step_dirname,
    write_latest,
)
from stalwart.formats.datafile import FileRecord
from stalwart.formats.manifest import MANIFEST_NAME, Manifest

DURABILITY_NAME = "durability.json"
COPY_CHUNK = 16 * 1024 * 1024


class TierError(StalwartError):
    """A tier could not store or provide a step."""


@dataclass(frozen=True)
class TierSpec:
    url: str
    every: int = 1
    keep_last: int | None = 3
    keep_every: int | None = None
    compress: str | None = None
    fsync: bool = True
    max_rate: float | None = None  # bytes/s written to this tier at most
    options: dict = field(default_factory=dict)

    @property
    def kind(self) -> str:
        if self.url == "memory":
            return "memory"
        if self.url.startswith("local:"):
            return "local"
        if self.url.startswith("file://") or self.url.startswith("/"):
            return "file"
        return "fsspec"

    @property
    def name(self) -> str:
        return self.url

    def to_json(self) -> dict:
        return {"url": self.url, "every": self.every, "keep_last": self.keep_last, "keep_every": self.keep_every,
                "compress": self.compress, "fsync": self.fsync, "max_rate": self.max_rate, "options": self.options}


def parse_tier(spec: str | dict) -> TierSpec:
    if isinstance(spec, TierSpec):
        return spec
    if isinstance(spec, str):
        spec = {"url": spec}
    if not isinstance(spec, dict) or "url" not in spec:
        raise TierError(f"a tier is a URL string or a dict with 'url'; got {spec!r}")
    unknown = set(spec) - {"url", "every", "keep_last", "keep_every", "compress", "fsync", "max_rate", "options"}
    if unknown:
        raise TierError(f"tier {spec['url']!r}: unknown options {sorted(unknown)}")
    t = TierSpec(
        url=str(spec["url"]),
        every=int(spec.get("every", 1)),
        keep_last=spec.get("keep_last", 3),
        keep_every=spec.get("keep_every"),
        compress=spec.get("compress"),
        fsync=bool(spec.get("fsync", True)),
        max_rate=float(spec["max_rate"]) if spec.get("max_rate") is not None else None,
        options=dict(spec.get("options") or {}),
    )
    if t.every < 1:
        raise TierError(f"tier {t.url!r}: every must be >= 1")
    if t.max_rate is not None and not t.max_rate > 0:
        raise TierError(f"tier {t.url!r}: max_rate must be a positive number of bytes per second")
    if t.compress not in (None, "zstd"):
        raise TierError(f"tier {t.url!r}: compress must be None or 'zstd'")
    if t.keep_last is not None and int(t.keep_last) < 1:
        raise TierError(f"tier {t.url!r}: keep_last must be >= 1 (or None to keep everything)")
    if t.kind == "fsspec":
        import fsspec

        protocol = t.url.split("://", 1)[0]
        try:
            fsspec.get_filesystem_class(protocol)
        except (ImportError, ValueError) as e:
            raise TierError(f"tier {t.url!r}: no fsspec backend for {protocol!r} ({e})") from None
    return t


def parse_tiers(specs) -> list[TierSpec]:
    out = [parse_tier(s) for s in specs]
    names = [t.url for t in out]
    if len(set(names)) != len(names):
        raise TierError("a tier is listed twice")
    if "memory" not in names:
        out.insert(0, TierSpec("memory"))
    elif names[0] != "memory":
        raise TierError("'memory' must be the first tier")
    return out


def _keep(steps: list[int], spec: TierSpec, protect: set[int]) -> set[int]:
    keep = set(protect)
    if spec.keep_last is None:
        return set(steps)
    keep.update(sorted(steps)[-int(spec.keep_last):])
    if spec.keep_every:
        keep.update(s for s in steps if s % int(spec.keep_every) == 0)
    return keep


class Tier:
    """A persistent tier (see :func:`open_tier`)."""

    def __init__(self, spec: TierSpec) -> None:
        self.spec = spec

    @property
    def name(self) -> str:
        return self.spec.url

    def qualifies(self, step: int) -> bool:
        return step % self.spec.every == 0

    # implemented by subclasses
    def put_files(self, step: int, src_dir: str, records: list[FileRecord], cancelled=None) -> list[FileRecord]:
        """Store one node's data files of ``step``; return their records as stored.

        ``cancelled`` (a callable) is polled between chunks; when it returns True the copy
        stops with :class:`~stalwart.ckpt.pacing.Cancelled` and nothing of ``step`` is committed."""
        raise NotImplementedError

    def discard(self, step: int) -> None:
        """Remove an uncommitted (stopped or failed) copy of ``step``; committed steps are kept."""

    def commit(self, step: int, manifest: Manifest) -> None:
        """Write the manifest (the commit), then ``latest``, retention, durability record."""
        raise NotImplementedError

    def committed_steps(self) -> list[int]:
        raise NotImplementedError

    def has(self, step: int) -> bool:
        return step in self.committed_steps()

    def fetch(self, step: int) -> str:
        """A local directory holding ``step`` for reading (downloaded if needed)."""
        raise NotImplementedError

    def release(self, path: str) -> None:
        """Drop a directory returned by :meth:`fetch` if it is a temporary copy."""

    def durability(self) -> dict:
        return {"tier": self.name, "steps": self.committed_steps(),
                "updated": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}


def _no_pace(nbytes: int) -> None:
    pass


def _compress_file(src: str, dst, fsync: bool, pace=_no_pace) -> tuple[int, str]:
    import zstandard

    digest = ck.StreamDigest()
    size = 0

    class _Sink:
        def write(self, b):
            nonlocal size
            digest.update(b)
            size += len(b)
            pace(len(b))
            return dst.write(b)

    with open(src, "rb") as f:
        zstandard.ZstdCompressor(level=1, threads=0).copy_stream(f, _Sink(), read_size=COPY_CHUNK, write_size=COPY_CHUNK)
    dst.flush()
    if fsync and hasattr(dst, "fileno"):
        os.fsync(dst.fileno())
    return size, digest.hexdigest()


DIRECT_ALIGN = 4096  # O_DIRECT offsets, lengths and buffers: multiples of the logical block size
DIRECT_MIN = 1 << 20  # smaller files: the page cache is as fast and O_DIRECT not worth a second open


def _copy_file(src: str, dst: str, fsync: bool, pace=_no_pace) -> None:
    """Copy a snapshot file from shared memory to a tier directory.

    Large files are written with O_DIRECT straight from a mapping of the source (no
    page-cache copy, no dirty pages to flush at fsync: about 1.5x the bandwidth of
    buffered writes + fsync on this class of disk); file systems that refuse O_DIRECT
    (tmpfs, some network file systems) get ``sendfile``.
    """
    size = os.path.getsize(src)
    if size >= DIRECT_MIN and hasattr(os, "O_DIRECT"):
        try:
            _copy_direct(src, dst, size, fsync, pace)
            return
        except OSError as e:
            if e.errno not in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
                raise
    _copy_sendfile(src, dst, fsync, pace)


def _copy_direct(src: str, dst: str, size: int, fsync: bool, pace=_no_pace) -> None:
    aligned = size - size % DIRECT_ALIGN
    with open(src, "rb") as fi:
        mm = mmap.mmap(fi.fileno(), size, access=mmap.ACCESS_READ)
    view = memoryview(mm)  # page-aligned: O_DIRECT reads the shared-memory pages directly
    try:
        fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
        try:
            offset = 0
            while offset < aligned:
                n = os.pwrite(fd, view[offset : min(offset + COPY_CHUNK, aligned)], offset)
                if n <= 0 or n % DIRECT_ALIGN:
                    raise OSError(errno.EINVAL, f"short O_DIRECT write ({n} bytes)")
                offset += n
                pace(n)
        finally:
            os.close(fd)
        fd = os.open(dst, os.O_WRONLY)
        try:
            while offset < size:  # the unaligned tail, through the page cache
                offset += os.pwrite(fd, view[offset:size], offset)
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
    finally:
        view.release()
        mm.close()


def _copy_sendfile(src: str, dst: str, fsync: bool, pace=_no_pace) -> None:
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        size = os.fstat(fi.fileno()).st_size
        offset = 0
        while offset < size:
            sent = os.sendfile(fo.fileno(), fi.fileno(), offset, min(COPY_CHUNK * 8, size - offset))
            if sent == 0:
                raise TierError(f"copying {src} to {dst} stopped at byte {offset} of {size}")
            offset += sent
            pace(sent)
        if fsync:
            os.fsync(fo.fileno())


class PosixTier(Tier):
    """``local:<dir>`` and ``file://<dir>``: a directory on a (local or shared) file system."""

    def __init__(self, spec: TierSpec) -> None:
        super().__init__(spec)
        url = spec.url
        self.root = url[len("local:"):] if url.startswith("local:") else url[len("file://"):] if url.startswith("file://") else url
        os.makedirs(self.root, exist_ok=True)

    def put_files(self, step, src_dir, records, cancelled=None):
        step_dir = os.path.join(self.root, step_dirname(step))
        os.makedirs(step_dir, exist_ok=True)
        out = []
        pace = Pacer(self.spec.max_rate, cancelled)
        for rec in records:
            src = os.path.join(src_dir, rec.path)
            if self.spec.compress == "zstd":
                name = rec.path + ".zst"
                with open(os.path.join(step_dir, name), "wb") as f:
                    size, digest = _compress_file(src, f, self.spec.fsync, pace)
                out.append(replace(rec, path=name, compression="zstd", stored_size=size, stored_digest=digest))
            else:
                _copy_file(src, os.path.join(step_dir, rec.path), self.spec.fsync, pace)
                out.append(rec)
        if self.spec.fsync:
            fsync_dir(step_dir)
        return out

    def discard(self, step):
        path = os.path.join(self.root, step_dirname(step))
        if not os.path.exists(os.path.join(path, MANIFEST_NAME)):
            shutil.rmtree(path, ignore_errors=True)

    def commit(self, step, manifest):
        step_dir = os.path.join(self.root, step_dirname(step))
        atomic_write(os.path.join(step_dir, MANIFEST_NAME), manifest.dumps(), fsync=self.spec.fsync)
        newest = max(self.committed_steps(), default=step)
        write_latest(self.root, step_dirname(newest), fsync=self.spec.fsync)
        self.apply_retention()
        atomic_write(os.path.join(self.root, DURABILITY_NAME), json.dumps(self.durability()).encode(), fsync=self.spec.fsync)

    def committed_steps(self):
        steps = []
        for name in os.listdir(self.root):
            s = parse_step_dirname(name)
            if s is not None and os.path.exists(os.path.join(self.root, name, MANIFEST_NAME)):
                steps.append(s)
        return sorted(steps)

    def apply_retention(self) -> None:
        steps = self.committed_steps()
        latest = read_latest(self.root)
        protect = {parse_step_dirname(latest)} if latest else set()
        keep = _keep(steps, self.spec, {s for s in protect if s is not None})
        newest = max(steps, default=-1)
        for name in os.listdir(self.root):
            s = parse_step_dirname(name)
            if s is None:
                continue
            path = os.path.join(self.root, name)
            committed = os.path.exists(os.path.join(path, MANIFEST_NAME))
            if committed and s in keep:
                continue
            if not committed and s > newest:
                continue  # may be a step being written right now
            if committed:
                os.remove(os.path.join(path, MANIFEST_NAME))  # un-commit first: never a half-deleted step
            shutil.rmtree(path, ignore_errors=True)

    def fetch(self, step):
        path = os.path.join(self.root, step_dirname(step))
        if not os.path.exists(os.path.join(path, MANIFEST_NAME)):
            raise TierError(f"tier {self.name} does not hold step {step}")
        return path


class FsspecTier(Tier):
    """Any fsspec URL (s3://, gs://, ...): files uploaded, manifest uploaded last."""

    def __init__(self, spec: TierSpec) -> None:
        super().__init__(spec)
        import fsspec

        self.fs, self.root = fsspec.core.url_to_fs(spec.url, **spec.options)
        self.root = self.root.rstrip("/")
        self.fs.makedirs(self.root, exist_ok=True)

    def _p(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def put_files(self, step, src_dir, records, cancelled=None):
        out = []
        pace = Pacer(self.spec.max_rate, cancelled)
        for rec in records:
            src = os.path.join(src_dir, rec.path)
            if self.spec.compress == "zstd":
                name = rec.path + ".zst"
                with self.fs.open(self._p(step_dirname(step), name), "wb") as f:
                    size, digest = _compress_file(src, f, False, pace)
                out.append(replace(rec, path=name, compression="zstd", stored_size=size, stored_digest=digest))
            else:
                self.fs.put_file(src, self._p(step_dirname(step), rec.path))
                pace(os.path.getsize(src))
                out.append(rec)
        return out

    def _put_bytes(self, path: str, data: bytes) -> None:
        with self.fs.open(path, "wb") as f:
            f.write(data)

    def commit(self, step, manifest):
        self._put_bytes(self._p(step_dirname(step), MANIFEST_NAME), manifest.dumps())
        newest = max(self.committed_steps(), default=step)
        self._put_bytes(self._p("latest"), (step_dirname(newest) + "\n").encode())
        self.apply_retention()
        self._put_bytes(self._p(DURABILITY_NAME), json.dumps(self.durability()).encode())

    def committed_steps(self):
        self.fs.invalidate_cache()
        steps = []
        for path in self.fs.glob(self._p("step-*", MANIFEST_NAME)):
            s = parse_step_dirname(path.rstrip("/").split("/")[-2])
            if s is not None:
                steps.append(s)
        return sorted(steps)

    def apply_retention(self) -> None:
        steps = self.committed_steps()
        keep = _keep(steps, self.spec, {max(steps)} if steps else set())
        for s in steps:
            if s not in keep:
                with contextlib.suppress(FileNotFoundError):
                    self.fs.rm(self._p(step_dirname(s), MANIFEST_NAME))
                with contextlib.suppress(FileNotFoundError):
                    self.fs.rm(self._p(step_dirname(s)), recursive=True)

    def fetch(self, step):
        src = self._p(step_dirname(step))
        if not self.fs.exists(self._p(step_dirname(step), MANIFEST_NAME)):
            raise TierError(f"tier {self.name} does not hold step {step}")
        local = tempfile.mkdtemp(prefix=f"stalwart-fetch-{step}-")
        try:
            for path in self.fs.ls(src, detail=False):
                name = path.rstrip("/").split("/")[-1]
                self.fs.get_file(path, os.path.join(local, name))
        except BaseException:
            shutil.rmtree(local, ignore_errors=True)
            raise
        return local

    def release(self, path):
        if os.path.basename(path).startswith("stalwart-fetch-"):
            shutil.rmtree(path, ignore_errors=True)


def open_tier(spec: TierSpec) -> Tier:
    if spec.kind in ("local", "file"):
        return PosixTier(spec)
    if spec.kind == "fsspec":
        return FsspecTier(spec)
    raise TierError(f"{spec.url!r} is not a persistent tier")


def read_durability_records(root_or_url: str) -> list[dict[str, Any]]:
    """Durability records reachable from a path (a tier root)."""
    path = os.path.join(root_or_url, DURABILITY_NAME)
    try:
        with open(path) as f:
            return [json.load(f)]
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
        return []
