"""Transports: one interface (:mod:`.base`), three implementations."""

from stalwart.sync.transports.base import ReceiverLink, SenderLink, Transport
from stalwart.sync.transports.dist import DistTransport
from stalwart.sync.transports.shm import ShmTransport
from stalwart.sync.transports.tcp import TcpTransport

__all__ = ["DistTransport", "ReceiverLink", "SenderLink", "ShmTransport", "TcpTransport", "Transport"]
