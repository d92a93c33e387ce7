"""Lower tiers behind the L1 pool: the one interface, and the disk tier that implements it."""

from kvrpc.kv.server.tiers.base import LowerTier
from kvrpc.kv.server.tiers.disk import DiskTier

__all__ = ["DiskTier", "LowerTier"]
