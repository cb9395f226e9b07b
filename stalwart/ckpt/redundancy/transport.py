"""Point-to-point transports the coding rounds run over: gloo between keepers, in-process queues in tests."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Protocol

import torch

from stalwart.ckpt.redundancy.config import (
    RedundancyError,
)
from stalwart.ckpt.storelink import GroupError

log = logging.getLogger("stalwart.keeper")


class Work(Protocol):
    def wait(self) -> Any: ...


class Transport(Protocol):
    """Point-to-point messages between the members of a group (indices ``0 .. n-1``)."""

    def isend(self, buf: torch.Tensor, dst: int, tag: int) -> Work: ...

    def irecv(self, buf: torch.Tensor, src: int, tag: int) -> Work: ...


class GlooTransport:
    """:class:`Transport` over a ``ProcessGroupGloo`` (ranks = member indices)."""

    def __init__(self, pg) -> None:
        self.pg = pg

    def isend(self, buf: torch.Tensor, dst: int, tag: int) -> Work:
        return self.pg.send([buf], dst, tag)

    def irecv(self, buf: torch.Tensor, src: int, tag: int) -> Work:
        return self.pg.recv([buf], src, tag)


class LocalTransport:
    """In-process :class:`Transport` for tests: one per member, all sharing a mailbox."""

    class _Done:
        def wait(self) -> None:
            return None

    class _Recv:
        def __init__(self, box: LocalTransport, key, buf: torch.Tensor) -> None:
            self.box, self.key, self.buf = box, key, buf

        def wait(self) -> None:
            data = self.box.take(self.key)
            if data.numel() != self.buf.numel():
                raise RedundancyError(f"message {self.key}: {data.numel()} bytes sent, {self.buf.numel()} expected")
            self.buf.copy_(data)

    def __init__(self, me: int, mailbox: dict, cond: threading.Condition, timeout_s: float = 30.0) -> None:
        self.me, self.mailbox, self.cond, self.timeout_s = me, mailbox, cond, timeout_s

    @staticmethod
    def group(n: int) -> list[LocalTransport]:
        box: dict = {}
        cond = threading.Condition()
        return [LocalTransport(i, box, cond) for i in range(n)]

    def isend(self, buf: torch.Tensor, dst: int, tag: int) -> Work:
        with self.cond:
            self.mailbox.setdefault((self.me, dst, tag), []).append(buf.clone())
            self.cond.notify_all()
        return LocalTransport._Done()

    def irecv(self, buf: torch.Tensor, src: int, tag: int) -> Work:
        return LocalTransport._Recv(self, (src, self.me, tag), buf)

    def take(self, key) -> torch.Tensor:
        deadline = time.monotonic() + self.timeout_s
        with self.cond:
            while not self.mailbox.get(key):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise GroupError(f"no message {key} within {self.timeout_s}s")
                self.cond.wait(left)
            return self.mailbox[key].pop(0)


# message tags of the coding rounds (data/parity blocks; rebuild sources/outputs)
TAG_DATA, TAG_PARITY, TAG_SRC, TAG_OUT = 0, 1, 0, 1


def wait_all(works: list[Work]) -> None:
    for w in works:
        w.wait()
