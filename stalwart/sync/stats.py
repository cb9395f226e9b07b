"""What one sync cost, on each side."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass
class SyncStats:
    """Returned by :meth:`WeightSyncSender.sync`.

    Byte counts include frame and entry headers. ``wire_bytes`` sums every byte sent
    to every receiver (deltas, full syncs, resyncs); a full-weight broadcast of the
    same model costs ``broadcast_bytes`` (``model_bytes * receivers``).
    """

    version: int
    receivers: int = 0  # receivers holding ``version`` when sync() returned
    tensors: int = 0
    total_elements: int = 0
    changed_elements: int = 0  # words that differ from the baseline (elements, for items of <= 8 bytes)
    model_bytes: int = 0  # the weights as sent (wire dtype)
    update_bytes: int = 0  # the most bytes one receiver was sent in one stream (delta or full)
    wire_bytes: int = 0  # all bytes sent, all receivers
    buckets: int = 0
    full_syncs: int = 0  # receivers that got a full sync (new, stale, or resynced)
    full_tensors: int = 0  # tensors a full sync sent (the others every such receiver already held)
    resyncs: int = 0  # full syncs caused by a failure during this sync
    causes: list[str] = field(default_factory=list)  # why each full sync / resync happened
    index_encodings: Counter = field(default_factory=Counter)
    value_encodings: Counter = field(default_factory=Counter)
    encode_s: float = 0.0  # encoder busy time (overlaps send_s)
    send_s: float = 0.0  # time spent in transport sends
    ack_s: float = 0.0  # waiting for receivers to apply, verify and acknowledge
    apply_s: float = 0.0  # slowest receiver's decode + apply time (reported in its ACK)
    verify_s: float = 0.0  # slowest receiver's digest check time
    commit_s: float = 0.0  # advancing the baseline
    total_s: float = 0.0

    @property
    def density(self) -> float:
        return self.changed_elements / self.total_elements if self.total_elements else 0.0

    @property
    def broadcast_bytes(self) -> int:
        """What sending every weight to every receiver would have cost (``model_bytes * receivers``)."""
        return self.model_bytes * self.receivers

    def summary(self) -> str:
        vs = self.wire_bytes / self.broadcast_bytes if self.broadcast_bytes else 0.0
        return (
            f"v{self.version}: {self.changed_elements}/{self.total_elements} changed ({100 * self.density:.3f}%),"
            f" {self.wire_bytes} wire bytes to {self.receivers} receivers ({vs:.4f}x a full broadcast;"
            f" {self.full_syncs} full syncs sent {self.full_tensors} of {self.tensors} tensors),"
            f" {self.buckets} buckets, encode {self.encode_s:.3f}s send {self.send_s:.3f}s"
            f" apply {self.apply_s:.3f}s total {self.total_s:.3f}s"
        )


@dataclass
class ReceiveStats:
    """Returned by :meth:`WeightSyncReceiver.receive` once a version is applied and verified."""

    version: int
    mode: str  # "delta" or "full"
    changed_elements: int = 0
    bytes_received: int = 0
    buckets: int = 0
    apply_s: float = 0.0  # decode + apply
    verify_s: float = 0.0  # digest check
    total_s: float = 0.0
    attempts: int = 1  # updates received until one verified (> 1 after a resync)
    causes: list[str] = field(default_factory=list)  # why earlier attempts failed
