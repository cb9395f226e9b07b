"""Errors of the weight-sync package.

Every error names what failed and where: the transport and peer, the sync version,
the bucket and the tensor. All derive from :class:`stalwart.errors.StalwartError`.
"""

from __future__ import annotations

from stalwart.errors import StalwartError


class SyncError(StalwartError):
    """A weight sync could not be completed (the trainer's baseline did not advance)."""


class TransportError(SyncError):
    """A transport failed: connection refused or dropped, timeout, peer gone."""


class SyncTimeoutError(TransportError):
    """A transport operation did not complete within its timeout."""


class PeerDisconnectedError(TransportError):
    """The other end closed the connection or died."""


class ProtocolError(SyncError):
    """A frame is malformed, out of order, or from an incompatible wire version."""


class IntegrityError(SyncError):
    """Bytes or weights do not match their checksum or digest."""


class SchemaError(SyncError):
    """Trainer tensors cannot be mapped onto the receiver's model (names, shapes, dtypes)."""
