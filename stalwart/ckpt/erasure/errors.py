"""The error the erasure codec raises."""

from __future__ import annotations

from stalwart.errors import StalwartError


class ErasureError(StalwartError):
    """Shards cannot be encoded or rebuilt as asked (too many lost, mismatched lengths, bad buffers, missing backend)."""
