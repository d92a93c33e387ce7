"""The KV-cache server: its state core, its I/O shell, the handlers, the pool and copy engines.

``state`` (with ``sessions``) decides, with no asyncio and no copies; the I/O shell runs
what it returns: ``cpu_copies`` the shared-memory and inline copies, ``gpu_copies`` the copy
engines' GPU copies, ``tiering`` the saves and loads of the lower tiers, over the mapped
memory that ``mappings`` records. ``service`` is the ``kv.*`` handlers over both, and
``serving`` runs them behind ``kvrpc serve``. Nothing here is imported by the engine side
(:mod:`kvrpc.kv.client`).
"""

from kvrpc.kv.server.service import KVService
from kvrpc.kv.server.serving import KVServerSettings, serve_kv

__all__ = ["KVServerSettings", "KVService", "serve_kv"]
