"""TCP: for links between nodes and clusters.

The sender listens on ``(host, port)``; receivers connect, send HELLO and then read
frames. Receivers reconnect by themselves after a dropped connection and get a full
sync if the drop left their weights partially updated.
"""

from __future__ import annotations

import contextlib
import socket

from stalwart.sync.errors import TransportError
from stalwart.sync.transports._stream import StreamReceiverLink, StreamSenderLink
from stalwart.sync.transports.base import ReceiverLink, SenderLink, Transport


class TcpTransport(Transport):
    """Frames over TCP.

    Args:
        host: sender: address to listen on (``"0.0.0.0"`` for all); receiver: the sender's host.
        port: sender: port to listen on (0 picks a free one, see :attr:`port` after opening);
            receiver: the sender's port.
        connect_timeout: how long a receiver keeps trying to reach the sender.
        io_timeout: a send or receive that makes no progress for this long fails.
        sock_buf_bytes: socket send/receive buffer size to ask the kernel for.
        max_rate: sender: cap each connection's send rate at this many bytes/s (share a
            WAN link; also emulates a slow link). None: no cap.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        connect_timeout: float = 60.0,
        io_timeout: float = 60.0,
        sock_buf_bytes: int = 4 << 20,
        max_rate: float | None = None,
    ) -> None:
        self.max_rate = max_rate
        self.host = host
        self.port = int(port)
        self.connect_timeout = float(connect_timeout)
        self.io_timeout = float(io_timeout)
        self.sock_buf_bytes = int(sock_buf_bytes)

    def __repr__(self) -> str:
        return f"TcpTransport({self.host!r}, {self.port})"

    def _tune(self, sock: socket.socket) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, opt, self.sock_buf_bytes)

    def open_sender(self, *, frame_bytes: int, buffers: int = 2) -> SenderLink:
        try:
            info = socket.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[
                0
            ]
            lsock = socket.socket(info[0], socket.SOCK_STREAM)
            lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            lsock.bind(info[4])
            lsock.listen(128)
        except OSError as e:
            raise TransportError(f"tcp: cannot listen on {self.host}:{self.port} ({e})") from None
        self.port = lsock.getsockname()[1]
        transport = self

        class _Link(StreamSenderLink):
            def _configure(self, sock: socket.socket) -> None:
                transport._tune(sock)

        return _Link(
            lsock, name=f"tcp {self.host}:{self.port}", io_timeout=self.io_timeout, frame_bytes=frame_bytes, buffers=buffers,
            max_rate=self.max_rate,
        )  # fmt: skip

    def open_receiver(self) -> ReceiverLink:
        def connect(timeout: float) -> socket.socket:
            sock = socket.create_connection((self.host, self.port), timeout=timeout)
            self._tune(sock)
            return sock

        link = StreamReceiverLink(connect, name=f"tcp {self.host}:{self.port}", io_timeout=self.io_timeout)
        link.connect_timeout = self.connect_timeout
        return link
