"""Frames over stream sockets: the machinery TCP and shared memory (its control channel) share.

Sender side: one listening socket and one control thread. The thread accepts
receivers, reads what they send (HELLO, ACK, transport messages), notices closed
connections at once and wakes whoever waits. The caller's thread writes frames; a
send that makes no progress for ``io_timeout`` seconds fails that peer only.

Receiver side: one blocking socket, frames read into one reusable buffer.
"""

from __future__ import annotations

import contextlib
import logging
import selectors
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence

import numpy as np

from stalwart.sync.errors import (
    PeerDisconnectedError,
    ProtocolError,
    SyncTimeoutError,
    TransportError,
)
from stalwart.sync.transports.base import Peer, ReceiverLink, SendBuffer, SenderLink, next_peer_id
from stalwart.sync.wire import HEADER_SIZE, Frame, FrameHeader, Kind, parse_header, parse_json, verify_payload

log = logging.getLogger("stalwart.sync")

MAX_REPLY_BYTES = 1 << 20  # receivers only send small frames
_SEND_SLICE = 4 << 20


class Pacer:
    """Caps a connection's send rate (bytes/s): after each write, wait until a link of that
    rate would have carried it. Used to share a WAN link politely, and to emulate one."""

    def __init__(self, rate: float) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = float(rate)
        self._free_at = 0.0

    def sent(self, nbytes: int) -> None:
        now = time.monotonic()
        self._free_at = max(self._free_at, now) + nbytes / self.rate
        if self._free_at > now:
            time.sleep(self._free_at - now)


def send_all(
    sock: socket.socket, parts: Sequence, what: str, timeout: float, pacer: Pacer | None = None
) -> int:
    """Write ``parts`` fully; fails if no byte moves for ``timeout`` seconds (the socket's timeout)."""
    total = 0
    step = _SEND_SLICE if pacer is None else max(1 << 16, min(_SEND_SLICE, int(pacer.rate / 100)))
    for part in parts:
        mv = memoryview(part).cast("B")
        off, n = 0, len(mv)
        while off < n:
            try:
                sent = sock.send(mv[off : off + step])
            except TimeoutError:
                raise SyncTimeoutError(
                    f"{what}: no progress sending for {timeout:g} s ({off} of {n} bytes sent)"
                ) from None
            except OSError as e:
                raise PeerDisconnectedError(
                    f"{what}: connection lost while sending ({e.__class__.__name__}: {e})"
                ) from None
            if sent == 0:
                raise PeerDisconnectedError(f"{what}: connection closed while sending")
            off += sent
            if pacer is not None:
                pacer.sent(sent)
        total += n
    return total


def recv_exact(sock: socket.socket, view: memoryview, what: str, timeout: float) -> None:
    """Fill ``view`` from ``sock`` (socket timeout applies to each wait)."""
    off, n = 0, len(view)
    while off < n:
        try:
            got = sock.recv_into(view[off:], n - off)
        except TimeoutError:
            raise SyncTimeoutError(
                f"{what}: no data for {timeout:g} s ({off} of {n} bytes of a frame received)"
            ) from None
        except OSError as e:
            raise PeerDisconnectedError(f"{what}: connection lost ({e.__class__.__name__}: {e})") from None
        if got == 0:
            raise PeerDisconnectedError(
                f"{what}: connection closed by the sender"
                + (f" mid-frame ({off} of {n} bytes)" if off else "")
            )
        off += got


class _Conn:
    __slots__ = ("addr", "alive", "buf", "error", "pacer", "peer", "replies", "sock")

    def __init__(self, sock: socket.socket, addr: str, pacer: Pacer | None = None) -> None:
        self.sock = sock
        self.pacer = pacer
        self.addr = addr
        self.buf = bytearray()
        self.peer: Peer | None = None
        self.replies: deque[Frame] = deque()
        self.alive = True
        self.error = ""


class StreamSenderLink(SenderLink):
    """Sender end over a listening stream socket (subclasses: TCP, shm control channel)."""

    def __init__(
        self,
        listener: socket.socket,
        *,
        name: str,
        io_timeout: float,
        frame_bytes: int,
        buffers: int,
        max_rate: float | None = None,
    ) -> None:
        self.name = name
        self.max_rate = max_rate
        self.io_timeout = float(io_timeout)
        self.frame_bytes = int(frame_bytes)
        self._listener = listener
        self._listener.setblocking(False)
        self._cond = threading.Condition()
        self._conns: dict[socket.socket, _Conn] = {}
        self._by_peer: dict[object, _Conn] = {}  # connected peers
        self._known: dict[object, _Conn] = {}  # also gone ones whose replies may not be read yet
        self._dead: list[socket.socket] = []
        self._closed = False
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._sel.register(self._listener, selectors.EVENT_READ, None)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._init_buffers(buffers)
        self._thread = threading.Thread(target=self._loop, name=f"stalwart-sync-{name}", daemon=True)
        self._thread.start()

    # -- buffers (TCP: private memory; shm overrides) ------------------------------------

    def _init_buffers(self, buffers: int) -> None:
        self._free: deque[SendBuffer] = deque(
            SendBuffer(np.zeros(self.frame_bytes, dtype=np.uint8)) for _ in range(max(1, buffers))
        )

    def acquire(self, timeout: float) -> SendBuffer:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not self._free:
                left = deadline - time.monotonic()
                if left <= 0 or self._closed:
                    raise SyncTimeoutError(f"{self.name}: no free send buffer within {timeout:g} s")
                self._cond.wait(left)
            return self._free.popleft()

    def release(self, buf: SendBuffer) -> None:
        with self._cond:
            self._free.append(buf)
            self._cond.notify_all()

    def send_buffer(self, buf: SendBuffer, nbytes: int, peers: Sequence[Peer]) -> dict[Peer, Exception]:
        try:
            return self._send_to(peers, [buf.data[:nbytes]])
        finally:
            self.release(buf)

    # -- peers ------------------------------------------------------------------------------

    def peers(self) -> list[Peer]:
        with self._cond:
            return [c.peer for c in self._by_peer.values()]

    def wait_peers(self, n: int, timeout: float) -> list[Peer]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self._by_peer) < n and not self._closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(min(left, 1.0))
            return [c.peer for c in self._by_peer.values()]

    def send_frame(self, header: bytes, payload: bytes, peers: Sequence[Peer]) -> dict[Peer, Exception]:
        return self._send_to(peers, [header, payload] if payload else [header])

    def _send_to(self, peers: Sequence[Peer], parts: Sequence) -> dict[Peer, Exception]:
        self._reap()
        failed: dict[Peer, Exception] = {}
        for p in peers:
            with self._cond:
                conn = self._known.get(p.id)
            if conn is None or not conn.alive:
                failed[p] = PeerDisconnectedError(
                    f"{p.name}: disconnected ({conn.error if conn else 'gone'})"
                )
                continue
            try:
                send_all(conn.sock, parts, p.name, self.io_timeout, conn.pacer)
            except TransportError as e:
                failed[p] = e
                self._close_conn(conn, str(e))
        return failed

    def recv_reply(self, peer: Peer, timeout: float) -> Frame:
        deadline = time.monotonic() + timeout
        with self._cond:
            conn = self._known.get(peer.id)
            if conn is None:
                raise PeerDisconnectedError(f"{peer.name}: disconnected")
            while not conn.replies:
                if not conn.alive:
                    raise PeerDisconnectedError(f"{peer.name}: {conn.error or 'disconnected'}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise SyncTimeoutError(f"{peer.name}: no reply within {timeout:g} s")
                self._cond.wait(min(left, 1.0))
            return conn.replies.popleft()

    def drop(self, peer: Peer, reason: str) -> None:
        with self._cond:
            conn = self._known.pop(peer.id, None)
        if conn is not None:
            self._close_conn(conn, reason)
        self._reap()

    def close(self) -> None:
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")
        self._thread.join(timeout=5)
        for conn in list(self._conns.values()):
            self._close_conn(conn, "sender closed")
        self._reap()
        for s in (self._listener, self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                s.close()
        self._sel.close()
        self._close_extra()

    # -- hooks for subclasses ------------------------------------------------------------

    def _accept_ok(self, sock: socket.socket) -> bool:
        return True

    def _describe(self, sock: socket.socket, addr) -> str:
        return (
            f"{addr[0]}:{addr[1]}" if isinstance(addr, tuple) and len(addr) >= 2 else (str(addr) or "local")
        )

    def _on_hello(self, conn: _Conn, peer: Peer) -> None:
        """Called in the control thread before the peer becomes visible."""

    def _on_transport_frame(self, conn: _Conn, hdr: FrameHeader, payload: bytes) -> None:
        raise ProtocolError(f"{conn.addr}: unexpected {hdr.describe()}")

    def _on_lost(self, conn: _Conn) -> None:
        """A peer's connection is gone (called with the condition held)."""

    def _close_extra(self) -> None:
        pass

    def _configure(self, sock: socket.socket) -> None:
        pass

    # -- control thread ---------------------------------------------------------------------

    def _close_conn(self, conn: _Conn, reason: str) -> None:
        with self._cond:
            if not conn.alive:
                return
            conn.alive = False
            conn.error = reason
            with contextlib.suppress(KeyError, ValueError, OSError):
                self._sel.unregister(conn.sock)
            self._conns.pop(conn.sock, None)
            if conn.peer is not None and self._by_peer.get(conn.peer.id) is conn:
                del self._by_peer[conn.peer.id]
            with contextlib.suppress(OSError):
                conn.sock.shutdown(socket.SHUT_RDWR)
            self._dead.append(conn.sock)  # closed later by _reap, never under a concurrent send
            self._on_lost(conn)
            self._cond.notify_all()
        if conn.peer is not None:
            log.info("%s: %s disconnected: %s", self.name, conn.peer.name, reason)

    def _reap(self) -> None:
        with self._cond:
            dead, self._dead = self._dead, []
        for s in dead:
            with contextlib.suppress(OSError):
                s.close()

    def _loop(self) -> None:
        while True:
            with self._cond:
                if self._closed:
                    return
            try:
                events = self._sel.select(timeout=0.5)
            except (OSError, ValueError):
                if self._closed:
                    return
                time.sleep(0.05)
                continue
            for key, _ in events:
                s = key.fileobj
                if s is self._wake_r:
                    return
                if s is self._listener:
                    self._accept()
                    continue
                conn = self._conns.get(s)
                if conn is not None:
                    self._read(conn)

    def _accept(self) -> None:
        try:
            sock, addr = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            log.warning("%s: accept failed: %s", self.name, e)
            return
        if not self._accept_ok(sock):
            with contextlib.suppress(OSError):
                sock.close()
            return
        sock.settimeout(self.io_timeout)
        self._configure(sock)
        a = self._describe(sock, addr)
        conn = _Conn(sock, a, Pacer(self.max_rate) if self.max_rate else None)
        with self._cond:
            self._conns[sock] = conn
            self._sel.register(sock, selectors.EVENT_READ, None)

    def _read(self, conn: _Conn) -> None:
        try:
            data = conn.sock.recv(1 << 16)
        except (BlockingIOError, InterruptedError, TimeoutError):
            return
        except OSError as e:
            self._close_conn(conn, f"connection lost ({e.__class__.__name__}: {e})")
            return
        if not data:
            self._close_conn(conn, "connection closed by the receiver")
            return
        conn.buf += data
        try:
            while len(conn.buf) >= HEADER_SIZE:
                hdr = parse_header(conn.buf[:HEADER_SIZE], f"{self.name} from {conn.addr}")
                if hdr.payload_len > MAX_REPLY_BYTES:
                    raise ProtocolError(f"{conn.addr}: {hdr.describe()} announces {hdr.payload_len} bytes")
                end = HEADER_SIZE + hdr.payload_len
                if len(conn.buf) < end:
                    break
                payload = bytes(conn.buf[HEADER_SIZE:end])
                del conn.buf[:end]
                verify_payload(hdr, payload, f"{self.name}: {hdr.describe()} from {conn.addr}")
                self._on_frame(conn, hdr, payload)
        except Exception as e:  # a receiver that sends garbage is disconnected, never trusted
            self._close_conn(conn, f"bad frame: {e}")

    def _on_frame(self, conn: _Conn, hdr: FrameHeader, payload: bytes) -> None:
        if hdr.kind == Kind.HELLO:
            hello = parse_json(payload, f"{self.name}: HELLO from {conn.addr}")
            if conn.peer is not None:
                raise ProtocolError(f"{conn.addr}: second HELLO on one connection")
            rid = str(hello.get("receiver_id", "?"))
            peer = Peer(next_peer_id(), f"receiver {rid} at {conn.addr}", hello)
            self._on_hello(conn, peer)
            with self._cond:
                conn.peer = peer
                self._by_peer[peer.id] = conn
                self._known[peer.id] = conn
                for pid in [k for k, c in self._known.items() if not c.alive and not c.replies]:
                    del self._known[pid]  # gone and nothing left to read
                self._cond.notify_all()
        elif hdr.kind == Kind.BYE:
            self._close_conn(conn, "receiver said goodbye")
        elif hdr.kind >= Kind.SLOT:
            self._on_transport_frame(conn, hdr, payload)
        else:
            if conn.peer is None:
                raise ProtocolError(f"{conn.addr}: {hdr.describe()} before HELLO")
            with self._cond:
                conn.replies.append(Frame(hdr, memoryview(payload)))
                self._cond.notify_all()


class StreamReceiverLink(ReceiverLink):
    """Receiver end over one stream socket; frames land in one reusable buffer."""

    can_reconnect = True

    def __init__(self, connect_fn: Callable[[float], socket.socket], *, name: str, io_timeout: float) -> None:
        self.name = name
        self.io_timeout = float(io_timeout)
        self._connect_fn = connect_fn
        self._sock: socket.socket | None = None
        self._hdr = bytearray(HEADER_SIZE)
        self._rbuf = bytearray(0)

    def connect(self, hello: bytes, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        delay = 0.05
        last: Exception | None = None
        while True:
            try:
                sock = self._connect_fn(max(0.1, min(self.io_timeout, deadline - time.monotonic())))
                break
            except OSError as e:
                last = e
                if time.monotonic() + delay > deadline:
                    raise TransportError(
                        f"{self.name}: cannot reach the sender within {timeout:g} s ({e})"
                    ) from None
                time.sleep(delay)
                delay = min(delay * 2, 1.0)
        del last
        sock.settimeout(self.io_timeout)
        self._sock = sock
        send_all(sock, [hello], f"{self.name}: HELLO", self.io_timeout)
        self._after_connect()

    def _after_connect(self) -> None:
        pass

    def reconnect(self, hello: bytes, timeout: float) -> None:
        self._drop_sock()
        self.connect(hello, timeout)

    def _drop_sock(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None

    def _read_frame(self, timeout: float | None) -> tuple[FrameHeader, memoryview] | None:
        sock = self._sock
        if sock is None:
            raise PeerDisconnectedError(f"{self.name}: not connected")
        if timeout is None or timeout > 0:
            sel_timeout = timeout
        else:
            sel_timeout = 0.0
        with selectors.DefaultSelector() as sel:
            sel.register(sock, selectors.EVENT_READ)
            if not sel.select(sel_timeout):
                return None
        hv = memoryview(self._hdr)
        recv_exact(sock, hv, self.name, self.io_timeout)
        hdr = parse_header(hv, f"{self.name}: frame from the sender")
        if len(self._rbuf) < hdr.payload_len:
            self._rbuf = bytearray(max(hdr.payload_len, 2 * len(self._rbuf)))
        pv = memoryview(self._rbuf)[: hdr.payload_len]
        recv_exact(sock, pv, self.name, self.io_timeout)
        return hdr, pv

    def recv(self, timeout: float | None) -> Frame | None:
        got = self._read_frame(timeout)
        if got is None:
            return None
        hdr, pv = got
        return Frame(hdr, pv)

    def release(self, frame: Frame) -> None:
        pass

    def send(self, frame: bytes) -> None:
        if self._sock is None:
            raise PeerDisconnectedError(f"{self.name}: not connected")
        send_all(self._sock, [frame], self.name, self.io_timeout)

    def close(self) -> None:
        self._drop_sock()
