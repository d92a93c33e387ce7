"""The pool-key encoding, in one place: how a chunk of one rank of one model is named in L1.

A pool key is ``chunk hash (32 bytes) + namespace id (8 bytes) + worker id (uint16, little
endian)``: one small bytes object per chunk, the only per-chunk metadata the pool and the
lower tiers keep. A namespace is one ``(model name, world size)`` with one chunk form (block
size, layout kind, layers, dtype and the per-block shape); its id is the first 8 bytes of a
SHA-256 of that description, so it is the same on every run and a disk tier's files outlive
the process.

The number of blocks in a worker's KV cache is not part of it: a chunk's bytes do not depend
on how many blocks the cache around it has, so an engine restarted with a bigger or smaller
cache finds the chunks it stored before. Pure functions, no state.
"""

from __future__ import annotations

import functools
import hashlib
import struct
from typing import Final

from kvrpc.kv.keys import HASH_SIZE
from kvrpc.kv.layout import KVLayout

__all__ = [
    "NAMESPACE_ID_SIZE",
    "POOL_KEY_SIZE",
    "chunk_hashes",
    "chunk_form",
    "namespace_id",
    "parse_suffix",
    "pool_keys",
    "worker_of",
    "worker_suffix",
]

NAMESPACE_ID_SIZE: Final = 8
_WORKER: Final = struct.Struct("<H")
POOL_KEY_SIZE: Final = HASH_SIZE + NAMESPACE_ID_SIZE + _WORKER.size


def chunk_form(layout: KVLayout) -> tuple[str, int, tuple[int, ...], str]:
    """What every chunk of ``layout`` looks like: kind, layers, shape with 0 blocks, dtype.

    Two layouts with the same chunk form make byte-identical chunks of the same tokens, so
    they may share a namespace.
    """
    shape = list(layout.shape)
    shape[layout.block_dim] = 0
    return (layout.kind.value, layout.num_layers, tuple(shape), layout.dtype)


def namespace_id(model_name: str, world_size: int, block_size: int, layout: KVLayout) -> bytes:
    """The 8-byte id of a model's namespace; the same for every block count of ``layout``.

    The layout's form is part of it, so that a disk tier's files of this model written with
    another form (a dtype change, say) are never found after a restart.
    """
    kind, num_layers, shape, dtype = chunk_form(layout)
    described = f"{world_size}:{block_size}:{kind}:{num_layers}:{list(shape)}:{dtype}:{model_name}"
    return hashlib.sha256(described.encode()).digest()[:NAMESPACE_ID_SIZE]


def worker_suffix(ns_id: bytes, worker_id: int) -> bytes:
    """What follows a chunk hash in the pool keys of rank ``worker_id`` of namespace ``ns_id``."""
    return ns_id + _WORKER.pack(worker_id)


def chunk_hashes(hashes: bytes) -> list[bytes]:
    """A key batch's concatenated hashes, one 32-byte hash each."""
    count = len(hashes) // HASH_SIZE
    if count > _SPLIT_CACHED:
        return [hashes[i : i + HASH_SIZE] for i in range(0, len(hashes), HASH_SIZE)]
    # One unpack cuts them all in C: a sixth of the time of a slice per hash.
    return list(_splitter(count).unpack(hashes))


# Batches up to this many keys get a cached Struct of their own (a few KiB each); a lookup
# of a 32k-token prompt has 128, a store batch usually fewer.
_SPLIT_CACHED: Final = 1024


@functools.lru_cache(maxsize=64)
def _splitter(count: int) -> struct.Struct:
    return struct.Struct(f"{HASH_SIZE}s" * count)


def pool_keys(hashes: bytes, suffix: bytes) -> list[bytes]:
    """The pool keys of a batch's hashes for one rank (``suffix``: :func:`worker_suffix`)."""
    return [chunk_hash + suffix for chunk_hash in chunk_hashes(hashes)]


def worker_of(key: bytes) -> int:
    """The worker id a pool key names."""
    worker: int = _WORKER.unpack_from(key, HASH_SIZE + NAMESPACE_ID_SIZE)[0]
    return worker


def parse_suffix(suffix: bytes) -> tuple[bytes, int]:
    """The namespace id and the worker id a :func:`worker_suffix` names."""
    worker: int = _WORKER.unpack_from(suffix, NAMESPACE_ID_SIZE)[0]
    return suffix[:NAMESPACE_ID_SIZE], worker
