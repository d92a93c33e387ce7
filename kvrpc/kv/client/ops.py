"""What an engine asks to move: a :class:`LoadStoreOp`, and the chunks and keys it names.

:func:`prompt_hashes` turns a prompt, given one of three ways, into its chunk hashes (the
scheduler's lookups and the workers' transfers use the same rule); :func:`plan_chunks` turns
a batch of ops into the keys, block-id rows and owning request of every whole chunk moved;
:func:`scoped_request_id` is the request id the server sees for an engine's request.
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

from kvrpc.kv.keys import (
    KeyBatch,
    check_hashes,
    hashes_from_block_hashes,
    hashes_from_tokens,
)
from kvrpc.kv.layout import SKIP_BLOCK

__all__ = [
    "NO_BLOCKS",
    "ChunkPlan",
    "LoadStoreOp",
    "check_engine_id",
    "plan_chunks",
    "prompt_hashes",
    "scoped_request_id",
]

#: The block-id rows of a message that carries the chunks' bytes instead (inline stores).
NO_BLOCKS = torch.empty(0, dtype=torch.int64)


@dataclass(frozen=True)
class LoadStoreOp:
    """One request's store or retrieve: which tokens, and the blocks that hold them.

    ``block_ids`` are the request's KV blocks from block ``block_offset`` on (block
    ``block_ids[j]`` holds tokens ``(block_offset + j) * block_size`` onwards); an engine
    may give only the blocks covering ``[start, end)``. The chunk hashes come from exactly
    one of ``token_ids`` (hashed under ``cache_salt``), the engine's ``block_hashes`` (the
    same source the scheduler looked up with) or ``chunk_hashes`` already computed (from
    chunk 0 on, as :func:`~kvrpc.kv.keys.hashes_from_tokens` returns them). Only whole
    chunks inside ``[start, end)`` move (``end == 0``: up to the last whole chunk): a chunk
    that begins before ``start`` is skipped. A retrieve leaves alone the blocks holding its
    first ``skip_first_n_tokens`` tokens from ``start`` (ones the engine holds already and
    may be reading), writing the rest of their chunk.
    """

    block_ids: Sequence[int]
    token_ids: Sequence[int] | torch.Tensor | None = None
    block_hashes: Sequence[bytes | int] | None = None
    start: int = 0
    end: int = 0
    chunk_hashes: Sequence[bytes] | None = None
    cache_salt: str | None = None
    block_offset: int = 0
    skip_first_n_tokens: int = 0

    def first_written_block(self, block_size: int) -> int:
        """The first block a retrieve may write: blocks before it hold skipped tokens."""
        return -(-(self.start + self.skip_first_n_tokens) // block_size)


def check_engine_id(engine_id: str | None) -> str | None:
    """``engine_id`` if it can scope request ids; raises ``ValueError`` if it cannot.

    An empty id, or one holding ``/`` (the separator :func:`scoped_request_id` puts
    between the engine id and the request id), could make two engines' ids collide.
    """
    if engine_id is not None and (not engine_id or "/" in engine_id):
        raise ValueError(f"engine id {engine_id!r} must be a non-empty string without '/'")
    return engine_id


def scoped_request_id(engine_id: str | None, request_id: str) -> str:
    """The id the server knows ``request_id`` of engine ``engine_id`` by.

    A server keeps a session (its pins, its prefetch jobs) per request id, and request ids
    are unique only inside the engine that made them (vLLM counts them from the same
    start in every engine). Prefixing the engine id keeps two engines on one server apart:
    with an engine id free of ``/`` (see :func:`check_engine_id`), everything before the
    first ``/`` is the engine. ``None`` (one engine per server, plain library use) leaves
    the id as it is.
    """
    return request_id if engine_id is None else f"{engine_id}/{request_id}"


def prompt_hashes(
    chunk_size: int,
    per_chunk: int,
    token_ids: Sequence[int] | torch.Tensor | None,
    block_hashes: Sequence[bytes | int] | None,
    hashes: Sequence[bytes] | None = None,
    cache_salt: str | None = None,
) -> list[bytes]:
    """A prompt's chunk hashes, from exactly one of its tokens, block hashes or chunk hashes.

    ``per_chunk`` is blocks per chunk (how many block hashes make one chunk's); a
    ``cache_salt`` salts token ids only. Raises ``ValueError`` for none or several sources.
    """
    given = [token_ids is not None, block_hashes is not None, hashes is not None]
    if sum(given) != 1:
        raise ValueError("give exactly one of token_ids, block_hashes and chunk_hashes")
    if hashes is not None:
        checked = list(hashes)
        check_hashes(checked)
        return checked
    if token_ids is not None:
        return hashes_from_tokens(token_ids, chunk_size, cache_salt)
    if cache_salt:
        raise ValueError("a cache_salt salts token ids; block hashes carry the engine's own")
    assert block_hashes is not None
    return hashes_from_block_hashes(block_hashes, per_chunk)


class ChunkPlan(NamedTuple):
    """The chunks a batch of ops moves: one key, one row of block ids and one owner each.

    ``rows`` is ``(chunks, blocks_per_chunk)`` int64 block ids, ``SKIP_BLOCK`` where a
    retrieve leaves a block alone; ``owners`` the request id each chunk belongs to.
    """

    keys: KeyBatch
    rows: torch.Tensor
    owners: list[str]


def plan_chunks(
    request_ids: Sequence[str],
    ops: Sequence[LoadStoreOp],
    *,
    model_name: str,
    world_size: int,
    kv_rank: int,
    chunk_size: int,
    block_size: int,
    per_chunk: int,
    retrieve: bool,
) -> ChunkPlan:
    """The keys, block-id rows and owning request id of every whole chunk the ops move.

    In a retrieve's rows, the blocks an op skips (``skip_first_n_tokens``) are
    ``SKIP_BLOCK``. ``per_chunk`` is blocks per chunk. Raises ``ValueError`` for bad input
    (too few block ids, a ``block_offset`` past the first chunk moved), before anything is
    sent.
    """
    if len(request_ids) != len(ops):
        raise ValueError(f"{len(request_ids)} request ids but {len(ops)} ops; give one each")
    hashes: list[bytes] = []
    block_ids: list[int] = []
    owners: list[str] = []
    for request_id, op in zip(request_ids, ops, strict=True):
        prompt = prompt_hashes(
            chunk_size, per_chunk, op.token_ids, op.block_hashes, op.chunk_hashes, op.cache_salt
        )
        first = -(-op.start // chunk_size)
        last = len(prompt) if op.end == 0 else min(op.end // chunk_size, len(prompt))
        if last <= first:
            continue
        offset = op.block_offset
        if offset < 0 or offset > first * per_chunk:
            raise ValueError(
                f"request {request_id!r}: block_offset {offset} is past the first chunk "
                f"moved, which starts at block {first * per_chunk}"
            )
        if len(op.block_ids) + offset < last * per_chunk:
            raise ValueError(
                f"request {request_id!r}: {last} chunks need block ids up to block "
                f"{last * per_chunk}, the op has {len(op.block_ids)} from block {offset}"
            )
        hashes.extend(prompt[first:last])
        picked = list(op.block_ids[first * per_chunk - offset : last * per_chunk - offset])
        if retrieve and op.skip_first_n_tokens > 0:
            # Blocks that begin before start + skip hold tokens the engine has already.
            held = op.first_written_block(block_size) - first * per_chunk
            picked[: max(0, held)] = [SKIP_BLOCK] * min(max(0, held), len(picked))
        block_ids.extend(picked)
        owners.extend([request_id] * (last - first))
    keys = KeyBatch(model_name, world_size, kv_rank, b"".join(hashes))
    return ChunkPlan(keys, _int64_rows(block_ids, per_chunk), owners)


def _int64_rows(block_ids: list[int], per_chunk: int) -> torch.Tensor:
    """``block_ids`` as an int64 tensor of rows of ``per_chunk``.

    Through an ``array``: five times faster than ``torch.tensor`` on a list of a thousand
    ints (which the engine's every transfer pays), and as strict about non-ints.
    """
    if not block_ids:
        return torch.empty((0, per_chunk), dtype=torch.int64)
    packed = array("q", block_ids)
    return torch.frombuffer(packed, dtype=torch.int64).view(-1, per_chunk)
