"""The one interface every transport implements.

A :class:`Transport` is configuration; the sender opens its end with
:meth:`Transport.open_sender` and each receiver opens its end with
:meth:`Transport.open_receiver`. Ends exchange whole frames
(:mod:`stalwart.sync.wire`): the transport keeps frame boundaries, enforces timeouts
and turns every failure into a :class:`~stalwart.sync.errors.TransportError` that
names the transport, the peer and the operation.

Sender ends hand out preallocated *send buffers* (``buffers`` of them, each
``frame_bytes`` long) for the encoder to write buckets into, so encoding the next
bucket overlaps sending the previous one and no bucket is copied on the way out
beyond what the transport itself needs (shared memory writes the bucket straight
into the segment the receivers read).
"""

from __future__ import annotations

import abc
import itertools
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import numpy as np

from stalwart.sync.wire import Frame

_peer_ids = itertools.count(1)


def next_peer_id() -> int:
    return next(_peer_ids)


@dataclass(slots=True)
class Peer:
    """A connected receiver, as the sender's link knows it."""

    id: Hashable
    name: str  # for messages: transport, address and the receiver's own id
    hello: dict = field(default_factory=dict)  # the receiver's HELLO (version, session, stale, ...)

    def __hash__(self) -> int:
        return hash(self.id)

    def __eq__(self, other) -> bool:
        return isinstance(other, Peer) and other.id == self.id


@dataclass(slots=True)
class SendBuffer:
    """A writable frame buffer owned by a sender link."""

    data: np.ndarray  # flat uint8, ``frame_bytes`` long
    token: object = None


class SenderLink(abc.ABC):
    """The sender's end: many receivers."""

    name: str = "transport"
    #: whether receivers can join or rejoin after the start (TCP, shm) or not (torch.distributed)
    dynamic_peers: bool = True

    @abc.abstractmethod
    def wait_peers(self, n: int, timeout: float) -> list[Peer]:
        """Connected receivers, waiting up to ``timeout`` s for at least ``n``; returns what is there."""

    @abc.abstractmethod
    def peers(self) -> list[Peer]:
        """Receivers currently connected (each has sent its HELLO)."""

    @abc.abstractmethod
    def acquire(self, timeout: float) -> SendBuffer:
        """A free send buffer (blocks while all are in flight)."""

    @abc.abstractmethod
    def send_buffer(self, buf: SendBuffer, nbytes: int, peers: Sequence[Peer]) -> dict[Peer, Exception]:
        """Send the frame in ``buf.data[:nbytes]`` to ``peers``; returns the peers that failed.

        The buffer goes back to the pool once every peer is done with it.
        """

    @abc.abstractmethod
    def release(self, buf: SendBuffer) -> None:
        """Return a buffer that will not be sent."""

    @abc.abstractmethod
    def send_frame(self, header: bytes, payload: bytes, peers: Sequence[Peer]) -> dict[Peer, Exception]:
        """Send a small frame (header + payload) to ``peers``; returns the peers that failed."""

    @abc.abstractmethod
    def recv_reply(self, peer: Peer, timeout: float) -> Frame:
        """The next frame ``peer`` sent (an ACK); raises TransportError on timeout or loss."""

    @abc.abstractmethod
    def drop(self, peer: Peer, reason: str) -> None:
        """Disconnect ``peer`` (it may reconnect and start over)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release sockets, shared memory and threads. Idempotent."""


class ReceiverLink(abc.ABC):
    """A receiver's end: one sender."""

    name: str = "transport"
    #: whether :meth:`reconnect` can restore a lost connection
    can_reconnect: bool = False
    #: how long :meth:`connect` / :meth:`reconnect` keep trying
    connect_timeout: float = 60.0
    #: how long a frame inside an update may take to arrive
    io_timeout: float = 60.0

    @abc.abstractmethod
    def connect(self, hello: bytes, timeout: float) -> None:
        """Reach the sender and send the HELLO frame ``hello``."""

    @abc.abstractmethod
    def recv(self, timeout: float | None) -> Frame | None:
        """Next frame from the sender; None if none started within ``timeout`` s (None: io timeout)."""

    @abc.abstractmethod
    def release(self, frame: Frame) -> None:
        """Done with ``frame.payload`` (its memory may be reused)."""

    @abc.abstractmethod
    def send(self, frame: bytes) -> None:
        """Send a small frame (header + payload) to the sender."""

    def reconnect(self, hello: bytes, timeout: float) -> None:
        raise NotImplementedError(f"{self.name} cannot reconnect")

    @abc.abstractmethod
    def close(self) -> None:
        """Idempotent."""


class Transport(abc.ABC):
    """How frames move between one sender and its receivers; each side opens its end."""

    @abc.abstractmethod
    def open_sender(self, *, frame_bytes: int, buffers: int = 2) -> SenderLink: ...

    @abc.abstractmethod
    def open_receiver(self) -> ReceiverLink: ...
