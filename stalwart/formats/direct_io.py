"""File writing that bypasses the page cache (``O_DIRECT``) for large outputs.

Through the page cache every byte is first copied into freshly allocated cache
pages and later written back, and once enough is dirty the writer is throttled to
the writeback rate. On a VM whose host reclaims freed guest memory, those fresh
pages fault at a fraction of memory speed and the write's time varies several-fold
from run to run. With ``O_DIRECT`` the bytes go from an aligned user buffer to the
device: the buffers here are allocated once per process, pre-faulted, and reused.

Two writers:

* :class:`DirectWriter` - a sequential stream (converters): data is staged in two
  aligned buffers and each full one is written by a helper thread while the next
  fills; the unaligned tail goes through the page cache at :meth:`DirectWriter.close`.
* :class:`RangeWriter` - byte ranges at any offsets, in any order (data files), on a
  few worker threads: the page-aligned interior of each range through ``O_DIRECT``
  (or through the page cache until it falls behind), the partial pages at its ends
  through the page cache, so a page is only ever written one way. Each piece can
  carry work to do first (checksums).

Where ``O_DIRECT`` is refused (tmpfs, some network file systems) everything goes
through an ordinary descriptor; the bytes written are the same either way.
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import mmap
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

ALIGN = 4096
CHUNK = 8 * 1024 * 1024
KEEP_STAGING = 4  # staging buffers of CHUNK bytes kept for reuse by the process (32 MiB)
# RangeWriter "auto": CACHE_STRIKES page-cache pieces in a row slower than CACHE_FLOOR
# switch the rest to O_DIRECT (bimodal here: 3-4 GB/s when pages are at hand, 0.2-0.6
# GB/s while the host faults them in; one slow piece alone may just have been preempted).
CACHE_FLOOR = 1 << 30  # bytes per second
CACHE_STRIKES = 3

_bypass = contextvars.ContextVar("stalwart_bypass_page_cache", default=True)


def dirty_room() -> int:
    """Bytes the kernel lets a writer dirty before throttling it to the disk's pace
    (``vm.dirty_bytes``, else ``vm.dirty_ratio`` % of available memory); 0 if unknown."""
    try:
        with open("/proc/sys/vm/dirty_bytes") as f:
            limit = int(f.read())
        if limit:
            return limit
        with open("/proc/sys/vm/dirty_ratio") as f:
            ratio = int(f.read())
        with open("/proc/meminfo") as f:
            avail = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
        return avail * ratio // 100
    except (OSError, ValueError, StopIteration):
        return 0


@contextlib.contextmanager
def page_cache_policy(total_bytes: int, *, fsync: bool) -> Iterator[bool]:
    """Within the block, :class:`DirectWriter` bypasses the page cache unless the whole
    output fits in half the kernel's dirty room and nobody waits for the disk (no
    fsync): then buffered writes return at memory speed and the kernel writes back
    later, which is what a converter's user waits for. Yields the decision."""
    bypass = fsync or total_bytes > dirty_room() // 2
    token = _bypass.set(bypass)
    try:
        yield bypass
    finally:
        _bypass.reset(token)


def pwrite_all(fd: int, data, offset: int) -> None:
    """Write all of ``data`` at ``offset`` (``pwrite`` may write less than asked)."""
    mv = memoryview(data).cast("B")
    while mv:
        n = os.pwrite(fd, mv, offset)
        mv = mv[n:]
        offset += n


_staging_lock = threading.Lock()
_staging: list[mmap.mmap] = []


def _take_staging(size: int) -> mmap.mmap:
    """A page-aligned buffer of ``size`` bytes whose pages are already faulted in."""
    if size == CHUNK:
        with _staging_lock:
            if _staging:
                return _staging.pop()
    buf = mmap.mmap(-1, size)
    np.frombuffer(buf, dtype=np.uint8)[::ALIGN] = 0  # fault every page in now, not while timing a write
    return buf


def _give_staging(buf: mmap.mmap) -> None:
    if len(buf) == CHUNK:
        with _staging_lock:
            if len(_staging) < KEEP_STAGING:
                _staging.append(buf)
                return
    buf.close()


def _open_direct(path: str) -> int:
    if not hasattr(os, "O_DIRECT"):
        return -1
    try:
        return os.open(path, os.O_WRONLY | os.O_DIRECT)
    except OSError:
        return -1


class DirectWriter:
    """A write-only, sequential file object (``write``, ``tell``, ``flush``, ``close``)."""

    def __init__(self, path: str, chunk: int = CHUNK) -> None:
        self.path = path
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self.direct = _open_direct(path) if _bypass.get() else -1
        self.direct_fd = self.direct  # kept to close it even after a fallback
        self.chunk = chunk
        self.bufs = [_take_staging(chunk), _take_staging(chunk)]  # page aligned, reused
        self.cur = 0
        self.fill = 0
        self.base = 0  # file offset of the current buffer's first byte
        self.pending: list[Future | None] = [None, None]
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stalwart-direct")
        self.closed = False

    # file-object protocol ---------------------------------------------------------
    def writable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.base + self.fill

    def flush(self) -> None:
        """Data stays staged until :meth:`close` (only whole aligned chunks are written early)."""

    def write(self, data) -> int:
        mv = memoryview(data).cast("B")
        total = len(mv)
        while mv:
            buf = self.bufs[self.cur]
            n = min(len(mv), self.chunk - self.fill)
            buf[self.fill : self.fill + n] = mv[:n]
            self.fill += n
            mv = mv[n:]
            if self.fill == self.chunk:
                self._submit(self.chunk)
        return total

    def write_from_fd(self, fd: int, offset: int, n: int, where: str = "") -> None:
        """Append ``n`` bytes read from ``fd`` at ``offset``, straight into the staging buffer."""
        while n > 0:
            buf = self.bufs[self.cur]
            k = min(n, self.chunk - self.fill)
            view = memoryview(buf)[self.fill : self.fill + k]
            got_total = 0
            while got_total < k:
                got = os.preadv(fd, [view[got_total:]], offset + got_total)
                if got == 0:
                    raise EOFError(f"{where or 'source'}: file ends at byte {offset + got_total} (truncated)")
                got_total += got
            self.fill += k
            offset += k
            n -= k
            if self.fill == self.chunk:
                self._submit(self.chunk)

    def _write_chunk(self, view: memoryview, offset: int) -> None:
        if self.direct >= 0:
            try:
                pwrite_all(self.direct, view, offset)
                return
            except OSError as e:  # stricter alignment than ours: fall back to the page cache
                if e.errno != errno.EINVAL:
                    raise
                self.direct = -1
        pwrite_all(self.fd, view, offset)

    def _submit(self, n: int) -> None:
        i = self.cur
        self.pending[i] = self.pool.submit(self._write_chunk, memoryview(self.bufs[i])[:n], self.base)
        self.base += n
        self.fill = 0
        self.cur ^= 1
        prev = self.pending[self.cur]
        if prev is not None:  # the buffer about to be refilled must be on disk
            prev.result()
            self.pending[self.cur] = None

    def close(self, fsync: bool = False) -> None:
        if self.closed:
            return
        try:
            aligned = self.fill - self.fill % ALIGN
            tail_at = self.base + aligned
            tail = bytes(memoryview(self.bufs[self.cur])[aligned : self.fill])
            if aligned:
                self._submit(aligned)
            for fut in self.pending:
                if fut is not None:
                    fut.result()
            if tail:
                pwrite_all(self.fd, tail, tail_at)
            if fsync:
                os.fsync(self.fd)
        finally:
            self._release()

    def abort(self) -> None:
        for fut in self.pending:
            if fut is not None:
                with contextlib.suppress(OSError):
                    fut.result()
        self._release()

    def _release(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.pool.shutdown(wait=True)
        for fd in {self.direct_fd, self.fd}:
            if fd >= 0:
                os.close(fd)
        for b in self.bufs:
            _give_staging(b)

    def __enter__(self) -> DirectWriter:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class RangeWriter:
    """Writes byte ranges of one open file at given offsets, in any order, from caller memory.

    ``mode``:

    * ``"cache"`` - every piece from the caller's memory through ``fd`` (the page cache);
    * ``"direct"`` - the page-aligned interior of each range is copied into a reused,
      aligned staging buffer and written with ``O_DIRECT``; the partial pages at its
      two ends go through ``fd``, so no page is ever written both ways;
    * ``"auto"`` - like ``"cache"`` while the page cache keeps up, then like
      ``"direct"``: once ``CACHE_STRIKES`` pieces of 1 MiB or more in a row were
      written slower than ``CACHE_FLOOR`` (their pages were slow to come by, or the
      kernel throttled the writer to the disk's pace), the rest bypass the cache.

    Ranges are cut into pieces of at most ``chunk`` bytes, run on ``workers`` threads
    (inline with 0); at most ``2 * workers`` pieces are queued, so :meth:`write`
    returns while its last pieces may still be in flight: the caller keeps the memory
    unchanged until :meth:`wait`. ``prepare(lo, hi)``, given with a range, runs on the
    worker before the piece covering the range's bytes ``[lo, hi)`` is written (the
    data file hashes the checksum blocks starting there). The first error stops all
    further writing and is raised by every later call but :meth:`abort`.
    """

    def __init__(self, fd: int, path: str, *, mode: str = "cache", workers: int = 2, chunk: int = CHUNK) -> None:
        if chunk % ALIGN:
            raise ValueError(f"chunk {chunk} must be a multiple of {ALIGN}")
        if mode not in ("cache", "direct", "auto"):
            raise ValueError(f"unknown write mode {mode!r}")
        self.fd = fd
        self.chunk = chunk
        self._owned = _open_direct(path) if mode != "cache" else -1
        self.direct_fd = self._owned if mode == "direct" else -1  # in use for aligned pieces
        self._probing = mode == "auto" and self._owned >= 0  # on the page cache until it falls behind
        self._strikes = 0
        self._cond = threading.Condition()
        self._queue: deque = deque()
        self._pending = 0
        self._error: BaseException | None = None
        self._closed = False
        self._limit = 2 * workers
        self._threads = [threading.Thread(target=self._work, name="stalwart-write", daemon=True) for _ in range(workers)]
        for t in self._threads:
            t.start()

    @property
    def direct(self) -> bool:
        """Whether aligned pieces bypass the page cache now (``"auto"``: once it fell behind)."""
        return self.direct_fd >= 0

    def write(self, offset: int, data, prepare: Callable[[int, int], None] | None = None) -> None:
        mv = memoryview(data).cast("B")
        n = len(mv)
        lo = hi = offset
        if self._owned >= 0:
            lo = min(-(-offset // ALIGN) * ALIGN, offset + n)
            hi = max((offset + n) // ALIGN * ALIGN, lo)
        # [offset, lo) and [hi, end): partial pages, page cache; [lo, hi): O_DIRECT when on
        for a, b, aligned in ((offset, lo, False), (lo, hi, True), (hi, offset + n, False)):
            for start in range(a, b, self.chunk):
                stop = min(start + self.chunk, b)
                self._submit((aligned, start, mv[start - offset : stop - offset], prepare, start - offset, stop - offset))

    def _submit(self, item) -> None:
        if not self._threads:
            self._run(item)
            return
        with self._cond:
            while self._pending >= self._limit and self._error is None:
                self._cond.wait()
            self._raise()
            self._queue.append(item)
            self._pending += 1
            self._cond.notify_all()

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if not self._queue:
                    return
                item = self._queue.popleft()
            try:
                if self._error is None:
                    self._run(item)
            except BaseException as e:  # reported to the caller by the next call
                with self._cond:
                    if self._error is None:
                        self._error = e
            with self._cond:
                self._pending -= 1
                self._cond.notify_all()

    def _run(self, item) -> None:
        aligned, offset, view, prepare, lo, hi = item
        if prepare is not None:
            prepare(lo, hi)
        direct_fd = self.direct_fd
        if not aligned or direct_fd < 0:
            t0 = time.perf_counter()
            pwrite_all(self.fd, view, offset)
            if self._probing and len(view) >= 1 << 20:
                slow = len(view) < CACHE_FLOOR * (time.perf_counter() - t0)
                self._strikes = self._strikes + 1 if slow else 0
                if self._strikes >= CACHE_STRIKES:
                    self._probing = False
                    self.direct_fd = self._owned
            return
        buf = _take_staging(self.chunk)
        try:
            staged = memoryview(buf)[: len(view)]
            np.copyto(np.frombuffer(staged, dtype=np.uint8), np.frombuffer(view, dtype=np.uint8))  # drops the GIL
            try:
                pwrite_all(direct_fd, staged, offset)
            except OSError as e:  # stricter alignment than ours: the page cache from now on
                if e.errno != errno.EINVAL:
                    raise
                self.direct_fd = -1
                self._probing = False
                pwrite_all(self.fd, view, offset)
        finally:
            _give_staging(buf)

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def wait(self) -> None:
        """Block until every piece handed to :meth:`write` is written; raise the first error."""
        with self._cond:
            while self._pending:
                self._cond.wait()
            self._raise()

    def close(self) -> None:
        """Wait for the pieces in flight, stop the workers, close the ``O_DIRECT`` descriptor.
        Raises the first error, after everything is stopped (nothing keeps writing)."""
        self._stop(drop=False)
        self._raise()

    def abort(self) -> None:
        """Drop the queued pieces, wait for those being written, stop; errors are not raised."""
        self._stop(drop=True)

    def _stop(self, drop: bool) -> None:
        if self._closed:
            return
        with self._cond:
            if drop:
                self._pending -= len(self._queue)
                self._queue.clear()
            while self._pending:
                self._cond.wait()
            self._closed = True
            self._cond.notify_all()
        for t in self._threads:
            t.join()
        if self._owned >= 0:
            os.close(self._owned)
        self.direct_fd = self._owned = -1


__all__ = ["DirectWriter", "RangeWriter"]
