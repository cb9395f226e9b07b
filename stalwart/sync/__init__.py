"""Sparse, lossless trainer -> rollout weight sync.

Only the bits that changed since the last version every receiver acknowledged go on
the wire (bitwise comparison, so bf16/fp8/NaN/-0.0 are exact), in bounded,
checksummed buckets, with a whole-model digest checked by every receiver::

    # trainer
    sender = WeightSyncSender(model, TcpTransport("0.0.0.0", 29600), num_receivers=2,
                              dtype=torch.bfloat16)
    stats = sender.sync()            # after each optimizer step (or every k steps)

    # each rollout process
    receiver = WeightSyncReceiver(rollout_model, TcpTransport("trainer-host", 29600))
    receiver.receive()               # applies the next version in place, verified

See docs/SYNC.md for transports, engine integration (vLLM, SGLang), the wire format
and failure handling.
"""

from stalwart.sync.adapters import CallbackAdapter, ModelAdapter
from stalwart.sync.errors import (
    IntegrityError,
    PeerDisconnectedError,
    ProtocolError,
    SchemaError,
    SyncError,
    SyncTimeoutError,
    TransportError,
)
from stalwart.sync.names import Fuse, Ignore, NameMapper, Prefix, Rename, Segment, Split
from stalwart.sync.receiver import WeightSyncReceiver
from stalwart.sync.sender import WeightSyncSender
from stalwart.sync.stats import ReceiveStats, SyncStats
from stalwart.sync.transports import DistTransport, ShmTransport, TcpTransport, Transport

__all__ = [
    "CallbackAdapter",
    "DistTransport",
    "Fuse",
    "Ignore",
    "IntegrityError",
    "ModelAdapter",
    "NameMapper",
    "PeerDisconnectedError",
    "Prefix",
    "ProtocolError",
    "ReceiveStats",
    "Rename",
    "SchemaError",
    "Segment",
    "ShmTransport",
    "Split",
    "SyncError",
    "SyncStats",
    "SyncTimeoutError",
    "TcpTransport",
    "Transport",
    "TransportError",
    "WeightSyncReceiver",
    "WeightSyncSender",
]
