"""Liveness and readiness: what ``/livez`` and ``/readyz`` answer.

Live means the event loop answers: the endpoint runs on it, so any answer is proof. Ready
means every listener is bound and serving, and every configured tier is reachable, unless
the operator chose to ignore that tier's state (``kvrpc serve --readyz-ignore redis``): a
Redis shared by a whole fleet going down would otherwise take every server out of service at
once, while each still serves from its own L1.

:func:`readiness` decides from plain values and is tested as a function;
:func:`tier_health` reads them from a live service.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kvrpc.kv.server.service import KVService

__all__ = ["TIER_NAMES", "TierHealth", "readiness", "tier_health"]

#: The tiers that readiness may be told to ignore.
TIER_NAMES = ("disk", "redis")


@dataclass(frozen=True)
class TierHealth:
    """One configured tier: ``name`` (``disk``, ``redis``), whether it is usable, and why not."""

    name: str
    up: bool
    detail: str = ""


def readiness(
    listeners: Sequence[tuple[str, bool]],
    tiers: Sequence[TierHealth],
    ignored: Collection[str] = (),
) -> tuple[bool, str]:
    """``(ready, body)``: ready when every listener serves and every tier not ignored is up.

    ``listeners`` are ``(url, serving)`` pairs. The body has one line per listener and tier,
    so that an operator reading a failed probe sees what is not ready and why.
    """
    lines: list[str] = []
    ready = bool(listeners)
    if not listeners:
        lines.append("not ready: no listener")
    for url, serving in listeners:
        lines.append(f"listener {url}: {'serving' if serving else 'not serving'}")
        ready = ready and serving
    for tier in tiers:
        state = "up" if tier.up else f"down ({tier.detail})" if tier.detail else "down"
        if tier.name in ignored:
            lines.append(f"tier {tier.name}: {state}, ignored for readiness")
            continue
        lines.append(f"tier {tier.name}: {state}")
        ready = ready and tier.up
    return ready, ("ready\n" if ready else "not ready\n") + "".join(f"{ln}\n" for ln in lines)


def tier_health(service: KVService) -> list[TierHealth]:
    """The configured tiers of ``service`` as they are now (call it on the service's loop)."""
    tiers: list[TierHealth] = []
    from kvrpc.kv.server.tiers.disk import DiskTier

    disk = service.lower_tier
    if disk is not None:
        directory = disk.directory if isinstance(disk, DiskTier) else None
        # A disk tier is usable while its directory exists; an unmounted or deleted one is not.
        if directory is None or os.path.isdir(directory):
            tiers.append(TierHealth("disk", True))
        else:
            tiers.append(TierHealth("disk", False, f"{directory} is not a directory"))
    remote = service.remote_tier
    if remote is not None:
        if remote.available():
            tiers.append(TierHealth("redis", True))
        else:
            tiers.append(TierHealth("redis", False, _breaker_detail(remote.stats())))
    return tiers


def _breaker_detail(stats: dict[str, int]) -> str:
    from kvrpc.kv.server.tiers.breaker import BreakerState

    state = stats.get("state")
    name = BreakerState(state).name.lower() if state in set(BreakerState) else "closed"
    return f"{name} after {stats.get('errors', 0)} errors and {stats.get('timeouts', 0)} timeouts"
