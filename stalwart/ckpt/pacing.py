"""Rate limiting (and cancellation) for background copies: tier writes, coding traffic."""

from __future__ import annotations

import time
from collections.abc import Callable

from stalwart.errors import StalwartError


class Cancelled(StalwartError):
    """A background copy was stopped on request (its data was superseded)."""


class Pacer:
    """Keeps the average rate of ``pacer(nbytes)`` calls at or under ``rate`` bytes/s (None:
    no limit) by sleeping, and raises :class:`Cancelled` once ``cancelled()`` says so."""

    def __init__(self, rate: float | None, cancelled: Callable[[], bool] | None = None) -> None:
        self.rate = rate
        self.cancelled = cancelled
        self.sent = 0
        self.t0 = time.monotonic()

    def __call__(self, nbytes: int) -> None:
        if self.cancelled is not None and self.cancelled():
            raise Cancelled("stopped: superseded by a newer snapshot")
        if not self.rate:
            return
        self.sent += nbytes
        ahead = self.sent / self.rate - (time.monotonic() - self.t0)
        if ahead > 0:
            time.sleep(ahead)
