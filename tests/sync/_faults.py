"""Fault injection for sync tests: a frame-aware TCP proxy and a corrupting transport wrapper.

Both sit on the real path (real sockets, real shared memory, real process groups) and
change bytes or cut connections the way a flaky link would; nothing is mocked.
"""

from __future__ import annotations

import contextlib
import socket
import threading

from stalwart.sync.transports.base import Transport
from stalwart.sync.wire import HEADER_SIZE, Kind, parse_header


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        got = sock.recv(n - len(buf))
        if not got:
            raise ConnectionError("closed")
        buf += got
    return bytes(buf)


class FrameProxy:
    """A TCP proxy between receivers and the sender that parses frames (wire format, docs/SYNC.md).

    ``arm(action, version)`` makes the next connection's sender->receiver stream, at the
    first BUCKET of ``version``, either flip one payload byte (``"corrupt"``) or forward
    that bucket and then cut both connections (``"cut"``). One shot per ``arm``.
    """

    def __init__(self, upstream_port: int, host: str = "127.0.0.1") -> None:
        self.upstream = (host, upstream_port)
        self.lsock = socket.create_server((host, 0))
        self.port = self.lsock.getsockname()[1]
        self._armed: tuple[str, int] | None = None
        self.fired: list[str] = []
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []
        self._stop = False
        threading.Thread(target=self._accept_loop, daemon=True).start()

    def arm(self, action: str, version: int) -> None:
        with self._lock:
            self._armed = (action, version)

    def close(self) -> None:
        self._stop = True
        with contextlib.suppress(OSError):
            self.lsock.close()
        for s in self._socks:
            with contextlib.suppress(OSError):
                s.close()

    def _accept_loop(self) -> None:
        while not self._stop:
            try:
                c, _ = self.lsock.accept()
            except OSError:
                return
            try:
                u = socket.create_connection(self.upstream, timeout=10)
            except OSError:
                c.close()
                continue
            u.settimeout(None)
            self._socks += [c, u]
            threading.Thread(target=self._pump_up, args=(c, u), daemon=True).start()
            threading.Thread(target=self._pump_down, args=(u, c), daemon=True).start()

    @staticmethod
    def _kill(*socks: socket.socket) -> None:
        for s in socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                s.close()

    def _pump_up(self, c: socket.socket, u: socket.socket) -> None:
        try:
            while True:
                data = c.recv(1 << 16)
                if not data:
                    break
                u.sendall(data)
        except OSError:
            pass
        self._kill(c, u)

    def _pump_down(self, u: socket.socket, c: socket.socket) -> None:
        try:
            while True:
                raw = _recv_exact(u, HEADER_SIZE)
                hdr = parse_header(raw, "proxy")
                payload = bytearray(_recv_exact(u, hdr.payload_len)) if hdr.payload_len else bytearray()
                action = None
                with self._lock:
                    if self._armed and hdr.kind == Kind.BUCKET and hdr.version == self._armed[1]:
                        action = self._armed[0]
                        self._armed = None
                        self.fired.append(f"{action} v{hdr.version} bucket {hdr.seq}")
                if action == "corrupt":
                    payload[len(payload) // 2] ^= 0x10
                c.sendall(raw + bytes(payload))
                if action == "cut":
                    break
        except (OSError, ConnectionError):
            pass
        self._kill(c, u)


class CorruptingTransport(Transport):
    """Wraps a transport; the sender's first BUCKET of ``version`` gets one payload byte flipped
    after its checksum was computed (as a bad NIC, DMA or memory would)."""

    def __init__(self, inner: Transport, version: int) -> None:
        self.inner = inner
        self.version = version

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def open_receiver(self):
        return self.inner.open_receiver()

    def open_sender(self, *, frame_bytes: int, buffers: int = 2):
        link = self.inner.open_sender(frame_bytes=frame_bytes, buffers=buffers)
        target = self.version
        orig = link.send_buffer

        def send_buffer(buf, nbytes, peers):
            nonlocal target
            hdr = parse_header(bytes(buf.data[:HEADER_SIZE]), "corruptor")
            if target is not None and hdr.kind == Kind.BUCKET and hdr.version == target:
                target = None
                buf.data[HEADER_SIZE + (nbytes - HEADER_SIZE) // 2] ^= 0x01
            return orig(buf, nbytes, peers)

        link.send_buffer = send_buffer
        return link
