"""The KV-cache server: its state core, its I/O shell, the handlers, the pool and copy engines.

``state`` decides (no asyncio, no copies), ``transfers`` does the copies, saves and loads it
returns, ``service`` is the ``kv.*`` handlers over both, and ``serving`` runs them behind
``kvrpc serve``. Nothing here is imported by the engine side (:mod:`kvrpc.kv.client`).
"""

from kvrpc.kv.server.service import KVService
from kvrpc.kv.server.serving import KVServerSettings, serve_kv

__all__ = ["KVServerSettings", "KVService", "serve_kv"]
