"""Same-node shared memory: buckets are written once into a shared segment all receivers read.

Control messages travel over a Unix-domain socket in Linux's abstract namespace
(``"\\0stalwart-sync-<name>"``; nothing on the file system). The bucket memory is an
anonymous ``memfd`` segment of ``slots`` frame-sized slots whose descriptor is passed
to each receiver over that socket (``SCM_RIGHTS``), so no named segment exists that
could outlive a crashed process. The encoder writes a bucket straight into a free
slot; the sender then tells each receiver "frame in slot *i*, *n* bytes" (a SLOT
frame) and the slot is reused only after every receiver has sent RELEASE for it or
disconnected. Receivers map the segment read-only. Only processes of the same user
may connect (checked with ``SO_PEERCRED``).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import mmap
import os
import socket
import struct
import sys
import time
from collections.abc import Sequence

import numpy as np

from stalwart.sync.errors import ProtocolError, SyncTimeoutError, TransportError
from stalwart.sync.transports._stream import StreamReceiverLink, StreamSenderLink, recv_exact
from stalwart.sync.transports.base import Peer, ReceiverLink, SendBuffer, SenderLink, Transport
from stalwart.sync.wire import HEADER_SIZE, Frame, Kind, pack_header, parse_header, verify_payload

log = logging.getLogger("stalwart.sync")

_WELCOME = struct.Struct("<QQQ")  # slots, slot_bytes, segment bytes
_SLOT = struct.Struct("<Q")  # frame length in the slot
_PAGE = 4096


def _require_linux() -> None:
    if not sys.platform.startswith("linux") or not hasattr(os, "memfd_create"):
        raise TransportError(
            "shm transport needs Linux (memfd_create, abstract Unix sockets); use TcpTransport"
        )


class ShmTransport(Transport):
    """Frames through shared memory between processes on one node.

    Args:
        name: rendezvous name; the sender and its receivers use the same one. One
            sender per name per node.
        slots: shared frame slots (at least 2, so encoding overlaps reading).
        connect_timeout: how long a receiver keeps trying to reach the sender.
        io_timeout: how long a send, a receive or a slot held by a receiver may stall.
    """

    def __init__(
        self,
        name: str = "default",
        *,
        slots: int = 2,
        connect_timeout: float = 60.0,
        io_timeout: float = 60.0,
    ) -> None:
        if not name or "\0" in name or len(name) > 90:
            raise ValueError(f"bad shm transport name {name!r}")
        self.name = name
        self.slots = max(2, int(slots))
        self.connect_timeout = float(connect_timeout)
        self.io_timeout = float(io_timeout)

    def __repr__(self) -> str:
        return f"ShmTransport({self.name!r})"

    @property
    def address(self) -> str:
        return "\0stalwart-sync-" + self.name

    def open_sender(self, *, frame_bytes: int, buffers: int = 2) -> SenderLink:
        _require_linux()
        lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            lsock.bind(self.address)
        except OSError as e:
            lsock.close()
            if e.errno == errno.EADDRINUSE:
                raise TransportError(
                    f"shm {self.name!r}: another sender already uses this name on this node"
                ) from None
            raise TransportError(f"shm {self.name!r}: cannot listen ({e})") from None
        lsock.listen(128)
        slot_bytes = (int(frame_bytes) + _PAGE - 1) // _PAGE * _PAGE
        nslots = max(self.slots, buffers)
        fd = os.memfd_create(f"stalwart-sync-{self.name}", getattr(os, "MFD_CLOEXEC", 0))
        try:
            os.ftruncate(fd, nslots * slot_bytes)
            mm = mmap.mmap(fd, nslots * slot_bytes)
        except OSError as e:
            os.close(fd)
            lsock.close()
            raise TransportError(
                f"shm {self.name!r}: cannot create a {nslots * slot_bytes} byte segment ({e})"
            ) from None
        return _ShmSenderLink(
            lsock,
            fd,
            mm,
            nslots,
            slot_bytes,
            name=f"shm {self.name!r}",
            io_timeout=self.io_timeout,
            frame_bytes=frame_bytes,
        )

    def open_receiver(self) -> ReceiverLink:
        _require_linux()

        def connect(timeout: float) -> socket.socket:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(timeout)
            try:
                s.connect(self.address)
            except OSError:
                s.close()
                raise
            return s

        link = _ShmReceiverLink(connect, name=f"shm {self.name!r}", io_timeout=self.io_timeout)
        link.connect_timeout = self.connect_timeout
        return link


class _ShmSenderLink(StreamSenderLink):
    def __init__(
        self, lsock, fd: int, mm: mmap.mmap, nslots: int, slot_bytes: int, *, name, io_timeout, frame_bytes
    ) -> None:
        self._fd = fd
        self._mm = mm
        self._nslots = nslots
        self._slot_bytes = slot_bytes
        super().__init__(lsock, name=name, io_timeout=io_timeout, frame_bytes=frame_bytes, buffers=nslots)

    def _init_buffers(self, buffers: int) -> None:
        self._slots = [
            SendBuffer(
                np.frombuffer(self._mm, dtype=np.uint8, count=self.frame_bytes, offset=i * self._slot_bytes),
                i,
            )
            for i in range(self._nslots)
        ]
        self._holders: list[set] = [set() for _ in range(self._nslots)]
        self._filling = [False] * self._nslots

    @staticmethod
    def _cred(sock: socket.socket) -> tuple[int, int] | None:
        try:
            pid, uid, _gid = struct.unpack(
                "3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            )
        except OSError:
            return None
        return pid, uid

    def _describe(self, sock: socket.socket, addr) -> str:
        cred = self._cred(sock)
        return f"pid {cred[0]}" if cred else "local"

    def _accept_ok(self, sock: socket.socket) -> bool:
        cred = self._cred(sock)
        if cred is None:
            return True
        uid = cred[1]
        if uid != os.getuid():
            log.warning("%s: refused a connection from uid %d", self.name, uid)
            return False
        return True

    def acquire(self, timeout: float) -> SendBuffer:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for i in range(self._nslots):
                    if not self._filling[i] and not self._holders[i]:
                        self._filling[i] = True
                        return self._slots[i]
                if self._closed:
                    raise TransportError(f"{self.name}: closed")
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(min(left, 1.0))
            stuck = {pid for h in self._holders for pid in h}
            conns = [c for c in self._by_peer.values() if c.peer.id in stuck]
        if not conns:
            raise SyncTimeoutError(f"{self.name}: no free slot within {timeout:g} s")
        for c in conns:  # a receiver that sits on a slot for io_timeout is dropped; it will resync
            self._close_conn(c, f"held a shared-memory slot for more than {timeout:g} s")
        return self.acquire(timeout)

    def release(self, buf: SendBuffer) -> None:
        with self._cond:
            self._filling[buf.token] = False
            self._cond.notify_all()

    def send_buffer(self, buf: SendBuffer, nbytes: int, peers: Sequence[Peer]) -> dict[Peer, Exception]:
        i = buf.token
        if nbytes > self.frame_bytes:
            raise ValueError(f"frame of {nbytes} bytes exceeds the {self.frame_bytes} byte slot")
        with self._cond:
            self._holders[i] = {p.id for p in peers}
            self._filling[i] = False
        payload = _SLOT.pack(nbytes)
        failed = self._send_to(peers, [pack_header(Kind.SLOT, 0, i, 0, payload), payload])
        if failed:
            with self._cond:
                for p in failed:
                    self._holders[i].discard(p.id)
                self._cond.notify_all()
        return failed

    def _on_hello(self, conn, peer: Peer) -> None:
        payload = _WELCOME.pack(self._nslots, self._slot_bytes, len(self._mm))
        frame = pack_header(Kind.WELCOME, 0, 0, 0, payload) + payload
        socket.send_fds(conn.sock, [frame], [self._fd])

    def _on_transport_frame(self, conn, hdr, payload: bytes) -> None:
        if hdr.kind != Kind.RELEASE or conn.peer is None:
            raise ProtocolError(f"{conn.addr}: unexpected {hdr.describe()}")
        if hdr.seq >= self._nslots:
            raise ProtocolError(f"{conn.addr}: RELEASE of slot {hdr.seq} (there are {self._nslots})")
        with self._cond:
            self._holders[hdr.seq].discard(conn.peer.id)
            self._cond.notify_all()

    def _on_lost(self, conn) -> None:
        if conn.peer is not None:
            for h in self._holders:
                h.discard(conn.peer.id)

    def _close_extra(self) -> None:
        self._slots = []
        with contextlib.suppress(BufferError, ValueError):
            self._mm.close()  # BufferError while a caller still holds a slot view; GC unmaps it later
        with contextlib.suppress(OSError):
            os.close(self._fd)


class _ShmReceiverLink(StreamReceiverLink):
    def __init__(self, connect_fn, *, name: str, io_timeout: float) -> None:
        super().__init__(connect_fn, name=name, io_timeout=io_timeout)
        self._mm: mmap.mmap | None = None
        self._view: memoryview | None = None
        self._nslots = 0
        self._slot_bytes = 0

    def _after_connect(self) -> None:
        sock = self._sock
        want = HEADER_SIZE + _WELCOME.size
        try:
            msg, fds, _flags, _addr = socket.recv_fds(sock, want, 1)
        except TimeoutError:
            raise SyncTimeoutError(
                f"{self.name}: no WELCOME from the sender within {self.io_timeout:g} s"
            ) from None
        except OSError as e:
            raise TransportError(f"{self.name}: WELCOME failed ({e})") from None
        buf = bytearray(want)
        buf[: len(msg)] = msg
        if not msg:
            raise TransportError(f"{self.name}: sender closed the connection before WELCOME")
        if len(msg) < want:
            recv_exact(sock, memoryview(buf)[len(msg) :], self.name, self.io_timeout)
        if len(fds) != 1:
            for f in fds:
                os.close(f)
            raise ProtocolError(f"{self.name}: WELCOME carried {len(fds)} descriptors, expected 1")
        hdr = parse_header(buf[:HEADER_SIZE], f"{self.name}: WELCOME")
        if hdr.kind != Kind.WELCOME:
            os.close(fds[0])
            raise ProtocolError(f"{self.name}: expected WELCOME, got {hdr.describe()}")
        verify_payload(hdr, buf[HEADER_SIZE:], f"{self.name}: WELCOME")
        nslots, slot_bytes, total = _WELCOME.unpack_from(buf, HEADER_SIZE)
        self._unmap()
        try:
            self._mm = mmap.mmap(fds[0], total, prot=mmap.PROT_READ)
        finally:
            os.close(fds[0])
        self._view = memoryview(self._mm)
        self._nslots, self._slot_bytes = nslots, slot_bytes

    def _unmap(self) -> None:
        if self._view is not None:
            self._view.release()
            self._view = None
        if self._mm is not None:
            with contextlib.suppress(BufferError):
                self._mm.close()
            self._mm = None

    def recv(self, timeout: float | None) -> Frame | None:
        got = self._read_frame(timeout)
        if got is None:
            return None
        hdr, pv = got
        if hdr.kind != Kind.SLOT:
            return Frame(hdr, pv)
        verify_payload(hdr, pv, f"{self.name}: SLOT notice")
        (nbytes,) = _SLOT.unpack(pv)
        i = hdr.seq
        if i >= self._nslots or nbytes > self._slot_bytes or nbytes < HEADER_SIZE:
            raise ProtocolError(f"{self.name}: SLOT notice for slot {i}, {nbytes} bytes is out of range")
        base = i * self._slot_bytes
        view = self._view[base : base + nbytes]
        inner = parse_header(view[:HEADER_SIZE], f"{self.name}: frame in slot {i}")
        if HEADER_SIZE + inner.payload_len != nbytes:
            raise ProtocolError(
                f"{self.name}: slot {i} holds {nbytes} bytes, its frame says {HEADER_SIZE + inner.payload_len}"
            )
        return Frame(inner, view[HEADER_SIZE:], token=i)

    def release(self, frame: Frame) -> None:
        if frame.token is None:
            return
        self.send(pack_header(Kind.RELEASE, 0, int(frame.token), 0, b""))

    def close(self) -> None:
        super().close()
        self._unmap()
