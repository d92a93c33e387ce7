"""A circuit breaker for a remote tier: when to skip it, and when to try it again.

Pure: no I/O, no clock of its own; every method takes ``now`` (seconds, monotonic). The
tier reports each operation's outcome; the breaker answers whether real traffic may go
out. A failure opens it: the tier is skipped for ``backoff`` seconds, then probed with one
cheap operation. A probe that works closes it; one that fails opens it again for twice
as long, up to ``max_backoff``. So a tier that is down costs one failed probe per backoff,
and one that comes back is used again within ``max_backoff`` seconds, by itself.
"""

from __future__ import annotations

import enum

from kvrpc.errors import KVConfigError

__all__ = ["Breaker", "BreakerState"]


class BreakerState(enum.IntEnum):
    """Where a breaker is; the value is what ``kv.stats`` reports as the tier's ``state``."""

    UP = 0  #: traffic goes out
    SKIPPED = 1  #: the tier failed; skipped until its backoff has passed
    PROBING = 2  #: the backoff passed; one probe decides (traffic still skipped)


class Breaker:
    """Closed while operations work; open for a doubling backoff after one fails."""

    def __init__(self, *, backoff: float = 0.25, max_backoff: float = 8.0) -> None:
        if not 0 < backoff <= max_backoff:
            raise KVConfigError(
                f"a breaker needs 0 < backoff <= max_backoff, not {backoff} and {max_backoff}"
            )
        self.first_backoff = backoff
        self.max_backoff = max_backoff
        self.state = BreakerState.UP
        self.backoff = backoff  #: how long the current (or next) opening lasts
        self.reopens_at = 0.0  #: when a SKIPPED breaker may be probed
        self.trips = 0  #: times it opened from UP
        self.probes = 0  #: probes started

    def allows(self) -> bool:
        """True while real traffic may go out (the breaker is UP)."""
        return self.state is BreakerState.UP

    def failed(self, now: float) -> None:
        """An operation (or the probe) failed: open, with a doubled backoff after a probe."""
        if self.state is BreakerState.UP:
            self.trips += 1
            self.backoff = self.first_backoff
        elif self.state is BreakerState.PROBING:
            self.backoff = min(self.backoff * 2, self.max_backoff)
        # A late failure of an operation started before the breaker opened changes nothing.
        self.state = BreakerState.SKIPPED
        self.reopens_at = max(self.reopens_at, now + self.backoff)

    def succeeded(self) -> None:
        """An operation or the probe worked: traffic goes out again."""
        if self.state is BreakerState.PROBING:
            self.state = BreakerState.UP
            self.backoff = self.first_backoff

    def probe_due(self, now: float) -> bool:
        """True (and now PROBING) once a SKIPPED breaker's backoff has passed: probe it."""
        if self.state is BreakerState.SKIPPED and now >= self.reopens_at:
            self.state = BreakerState.PROBING
            self.probes += 1
            return True
        return False

    def wait(self, now: float) -> float:
        """Seconds until :meth:`probe_due` may next be True (0 if it may be now)."""
        if self.state is BreakerState.SKIPPED:
            return max(0.0, self.reopens_at - now)
        return self.first_backoff  # UP or PROBING: look again later
