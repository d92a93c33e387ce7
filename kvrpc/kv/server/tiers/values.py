"""How a chunk is kept in a key-value store: key names, the header, the parts. Pure.

A chunk of pool key ``hash + namespace id + worker`` is kept under ``<base>:h``, a fixed
header, and ``<base>:0 .. <base>:<parts-1>``, its bytes in parts of at most ``part_bytes``,
where ``<base>`` is ``prefix``, the model's name, ``w<world size>/r<rank>``, the namespace
id (which names the layout), ``c<chunk tokens>`` and the chunk hash, in hex:

    kvrpc:llama-8b/w2/r1/3f2a...e1/c256/9b0c...77:h

The header says what the parts must add up to: a format version, the namespace id, the
length, the number of parts, the size of each part but the last (so a reader knows where
every part goes before it asks for any), and the chunk's end-to-end checksum
(:mod:`kvrpc.kv.integrity`: computed when the chunk was stored, on the GPU for a ``cuda_ipc``
store). A reader checks all of it, recomputing the checksum of the bytes it received, and
treats any mismatch as a miss, so bytes written under another layout, cut short, or
corrupted are never loaded. Parts are written first and the header last, so a header
names parts that were all written.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

from kvrpc.kv.keys import HASH_SIZE
from kvrpc.kv.server.poolkeys import NAMESPACE_ID_SIZE, worker_of

__all__ = [
    "FORMAT_VERSION",
    "HEADER_SIZE",
    "Header",
    "header_key",
    "key_base",
    "pack_header",
    "part_keys",
    "part_spans",
    "unpack_header",
]

#: 2 added the part size, 3 the 64-bit end-to-end checksum in place of a CRC-32 of the value;
#: a header of another version is a miss (and deleted).
FORMAT_VERSION: Final = 3
_MAGIC: Final = b"KVRC"
# magic, version, parts, namespace id, length, checksum, part size
_HEADER: Final = struct.Struct("<4sHH8sQQI")
HEADER_SIZE: Final = _HEADER.size


@dataclass(frozen=True)
class Header:
    """What a chunk's header says about its parts."""

    namespace_id: bytes
    nbytes: int
    parts: int
    checksum: int  #: the chunk's end-to-end checksum (kvrpc.kv.integrity)
    part_bytes: int

    def spans(self) -> list[tuple[int, int]]:
        """``(start, end)`` of each part in the chunk's bytes."""
        return part_spans(self.nbytes, self.part_bytes)


def key_base(
    prefix: bytes, model: str, world_size: int, chunk_tokens: int, pool_key: bytes
) -> bytes:
    """The name every key of this chunk starts with (see the module doc)."""
    ns_id = pool_key[HASH_SIZE : HASH_SIZE + NAMESPACE_ID_SIZE]
    # Braces would make a Redis Cluster hash tag of the model's name, putting every chunk
    # of a model on one node; the name is for people reading keys, so they are replaced.
    name = model.replace("{", "(").replace("}", ")")
    middle = f"{name}/w{world_size}/r{worker_of(pool_key)}/{ns_id.hex()}/c{chunk_tokens}/"
    return prefix + middle.encode() + pool_key[:HASH_SIZE].hex().encode()


def header_key(base: bytes) -> bytes:
    """The key of a chunk's header."""
    return base + b":h"


def part_keys(base: bytes, parts: int) -> list[bytes]:
    """The keys of a chunk's parts, in order."""
    return [base + b":%d" % i for i in range(parts)]


def part_spans(nbytes: int, part_bytes: int) -> list[tuple[int, int]]:
    """``(start, end)`` byte offsets of each part of an ``nbytes`` chunk (at least one)."""
    if part_bytes < 1:
        raise ValueError(f"parts hold at least 1 byte, not {part_bytes}")
    starts = range(0, max(nbytes, 1), part_bytes)
    return [(start, min(start + part_bytes, nbytes)) for start in starts]


def pack_header(namespace_id: bytes, nbytes: int, part_bytes: int, checksum: int) -> bytes:
    """The header of a chunk of ``nbytes`` bytes in parts of ``part_bytes``, with ``checksum``."""
    parts = len(part_spans(nbytes, part_bytes))
    return _HEADER.pack(_MAGIC, FORMAT_VERSION, parts, namespace_id, nbytes, checksum, part_bytes)


def unpack_header(raw: bytes | None) -> Header | None:
    """The header in ``raw``, or None if it is missing, cut short, or not this format."""
    if raw is None or len(raw) != HEADER_SIZE:
        return None
    magic, version, parts, ns_id, nbytes, checksum, part_bytes = _HEADER.unpack(raw)
    if magic != _MAGIC or version != FORMAT_VERSION or part_bytes < 1:
        return None
    if parts != len(part_spans(nbytes, part_bytes)):
        return None
    return Header(ns_id, nbytes, parts, checksum, part_bytes)
