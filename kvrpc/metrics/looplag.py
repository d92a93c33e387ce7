"""Event-loop lag for the metrics: how late a timer on the server's loop fires.

A timer due every :data:`INTERVAL` seconds notes how far past its due time it ran; that
delay is what a request arriving at that moment waited before the loop looked at it. Two
callbacks a second cost nothing measurable, unlike ``--loop-probe``'s thread (one callback
per millisecond, for benchmarks), whose figures ``kv.stats`` resets on every read.
"""

from __future__ import annotations

import asyncio
from bisect import bisect_left

__all__ = ["INTERVAL", "LAG_BOUNDS", "LoopLagTimer"]

#: Seconds between two samples.
INTERVAL = 0.5
#: Upper bounds (seconds) of the lag histogram's buckets; a last bucket holds the rest.
LAG_BOUNDS: tuple[float, ...] = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
)  # fmt: skip


class LoopLagTimer:
    """Samples the running loop's lag every ``interval`` seconds from :meth:`start` on.

    ``buckets`` counts samples per :data:`LAG_BOUNDS` bucket (not cumulative), ``seconds``
    is their sum, ``last`` the latest sample and ``worst`` the largest so far. Everything
    runs on the loop: no thread, no lock.
    """

    def __init__(self, interval: float = INTERVAL) -> None:
        self.interval = interval
        self.buckets = [0] * (len(LAG_BOUNDS) + 1)
        self.seconds = 0.0
        self.last = 0.0
        self.worst = 0.0
        self._handle: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def samples(self) -> int:
        """Samples taken so far."""
        return sum(self.buckets)

    def start(self) -> LoopLagTimer:
        """Start sampling on the running loop; returns self."""
        self._loop = asyncio.get_running_loop()
        self._schedule()
        return self

    def stop(self) -> None:
        """Stop sampling; idempotent."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def record(self, lag: float) -> None:
        """Count one sample of ``lag`` seconds."""
        lag = max(0.0, lag)
        self.buckets[bisect_left(LAG_BOUNDS, lag)] += 1
        self.seconds += lag
        self.last = lag
        self.worst = max(self.worst, lag)

    def _schedule(self) -> None:
        assert self._loop is not None
        due = self._loop.time() + self.interval
        self._handle = self._loop.call_at(due, self._tick, due)

    def _tick(self, due: float) -> None:
        assert self._loop is not None
        self.record(self._loop.time() - due)
        self._schedule()
