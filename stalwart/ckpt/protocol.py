"""The trainer <-> keeper wire protocol: JSON lines over a Unix socket (never pickle).

Every request is one JSON object with an ``op``; every reply is one JSON object with
``ok`` and either results or ``error``.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
from collections.abc import Callable

from stalwart.errors import StalwartError

MAX_LINE = 64 * 1024 * 1024


class KeeperGone(StalwartError):
    """The keeper process closed the connection (it died or is shutting down)."""


class Channel:
    """One JSON-lines connection; :meth:`call` is thread-safe request/response."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._buf = b""
        self._lock = threading.Lock()

    def send(self, obj: dict) -> None:
        data = json.dumps(obj, separators=(",", ":")).encode() + b"\n"
        try:
            self.sock.sendall(data)
        except OSError as e:
            raise KeeperGone(f"keeper connection lost while sending: {e}") from None

    def recv(self) -> dict | None:
        """The next message, or None at end of stream (:class:`TimeoutError` past the socket's timeout)."""
        while b"\n" not in self._buf:
            try:
                chunk = self.sock.recv(1 << 16)
            except TimeoutError:
                raise
            except OSError:
                chunk = b""
            if not chunk:
                return None
            self._buf += chunk
            if len(self._buf) > MAX_LINE:
                raise StalwartError("keeper protocol: message too long")
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)

    def call(self, op: str, reply_timeout: float | None = None, **kwargs) -> dict:
        """Send ``op`` and return its reply; a keeper that does not answer within
        ``reply_timeout`` seconds (None: wait) is treated as gone and the channel closed."""
        return self.begin(op, reply_timeout, **kwargs)()

    def begin(self, op: str, reply_timeout: float | None = None, **kwargs) -> Callable[[], dict]:
        """:meth:`call` in two halves: send ``op`` now and return the function that reads its
        reply, so the caller works while the keeper answers. The channel stays held until
        that function is called, which the caller must do (also when it fails meanwhile)."""
        self._lock.acquire()
        try:
            self.send({"op": op, **kwargs})
        except BaseException:
            self._lock.release()
            raise

        def reply() -> dict:
            try:
                return self._reply(op, reply_timeout)
            finally:
                self._lock.release()

        return reply

    def _reply(self, op: str, reply_timeout: float | None) -> dict:
        try:
            self.sock.settimeout(reply_timeout)
            reply = self.recv()
        except TimeoutError:
            self.close()  # a late reply would be read as the answer to the next request
            raise KeeperGone(f"the keeper did not answer '{op}' within {reply_timeout:.0f}s (stopped or overloaded?)") from None
        finally:
            with contextlib.suppress(OSError):
                self.sock.settimeout(None)
        if reply is None:
            raise KeeperGone(f"the keeper closed the connection during '{op}'")
        if not reply.get("ok", False):
            raise StalwartError(f"keeper refused '{op}': {reply.get('error')}")
        return reply

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


def connect(path: str, timeout: float = 5.0) -> Channel:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    sock.connect(path)
    sock.settimeout(None)
    return Channel(sock)
