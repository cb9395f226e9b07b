"""Sequential file writing that bypasses the page cache (``O_DIRECT``) for large outputs.

Converters write gigabytes that are not read back soon. Through the page cache
every byte is first copied into freshly allocated cache pages and later written
back, and once enough is dirty the writer is throttled to the writeback rate; with
``O_DIRECT`` the bytes go from an aligned user buffer to the device. Data is
staged in two aligned buffers and each full one is written by a helper thread
while the next fills. The unaligned tail is written through the page cache at
:meth:`DirectWriter.close`. Where ``O_DIRECT`` is refused (tmpfs, some network
file systems) everything goes through an ordinary descriptor; the bytes written
are the same either way.
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import mmap
import os
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

ALIGN = 4096
CHUNK = 8 * 1024 * 1024

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


class DirectWriter:
    """A write-only, sequential file object (``write``, ``tell``, ``flush``, ``close``)."""

    def __init__(self, path: str, chunk: int = CHUNK) -> None:
        self.path = path
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self.direct = -1
        if hasattr(os, "O_DIRECT") and _bypass.get():
            try:
                self.direct = os.open(path, os.O_WRONLY | os.O_DIRECT)
            except OSError:
                self.direct = -1
        self.direct_fd = self.direct  # kept to close it even after a fallback
        self.chunk = chunk
        self.bufs = [mmap.mmap(-1, chunk), mmap.mmap(-1, chunk)]  # page aligned
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
            b.close()

    def __enter__(self) -> DirectWriter:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


__all__ = ["DirectWriter"]
