"""Tiers behind the L1 pool: their interfaces, the disk tier, and (with redis-py) Redis."""

from kvrpc.kv.server.tiers.base import LowerTier, RemoteTier
from kvrpc.kv.server.tiers.disk import DiskTier

__all__ = ["DiskTier", "LowerTier", "RemoteTier"]
