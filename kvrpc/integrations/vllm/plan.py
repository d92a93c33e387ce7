"""The scheduler side's rules: what each request loads, stores and unpins, step by step.

:class:`SchedulerPlan` is told what vLLM's scheduler decided (a lookup's answer, the blocks
it allocated, the tokens it scheduled) and answers with what the workers must move: a
:class:`Transfer` per store or retrieve, and the chunks whose pins can go early. It does no
I/O and imports nothing of vLLM, so every rule here is tested without an engine or a server.

The rules, in chunk units (``chunk_size`` tokens, ``blocks_per_chunk`` blocks):

- A lookup asks for the prompt's whole chunks short of its last token (vLLM must compute
  at least one token), so a hit never covers the whole prompt.
- A hit of ``H`` tokens over a local prefix-cache hit of ``L`` tokens loads ``H - L`` tokens
  (none if ``L >= H``): the chunks from the one holding token ``L`` up to ``H``. The blocks of
  that first chunk holding tokens below ``L`` are the engine's own (it may be reading them
  for another request), so the retrieve skips them. The pins on chunks wholly below ``L``
  (or on every hit chunk when nothing loads) are released at once.
- The first ``H`` tokens' chunks are on the server already; every later chunk is stored in
  the step whose forward completes it, once per chunk, prompts only unless
  ``save_decode_cache``.
- A load that fails leaves some of its blocks as load errors; vLLM computes the request
  again from the first of them (``kv_load_failure_policy`` ``"recompute"``). The chunks from
  the one holding that block on are then stored again, once each, as the new forwards
  complete them: a failed one may not be on the server (evicted, say), and one that a
  synchronous load's own step computed read the blocks that failed (the workers do not
  store what that step computed for the request; see the connector's ``wait_for_save``).
- A request the engine preempts starts over: its next lookup may hit the chunks it stored.
- A load is asynchronous (vLLM holds the request until the workers report it loaded) unless
  the plan makes synchronous loads (``kvrpc.layerwise``): then vLLM schedules the request in
  the step that allocated its blocks, the retrieve goes out in that step's transfers, and
  the forward waits for it layer by layer. Either way the plan is the same.
"""

from __future__ import annotations

import enum
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

from kvrpc.kv.client import LoadStoreOp
from kvrpc.kv.client.hosts import host_of_rank
from kvrpc.kv.keys import hashes_from_block_hashes, hashes_from_tokens

__all__ = ["KVRanks", "Phase", "ReleasePins", "SchedulerPlan", "Transfer", "kv_ranks"]


@dataclass(frozen=True)
class KVRanks:
    """Where one vLLM rank's KV cache sits in kvrpc's key space, and whether it stores."""

    world_size: int
    rank: int
    writer: bool


def kv_ranks(
    world_size: int, rank: int, tensor_parallel: int, use_mla: bool, hosts: int = 1
) -> KVRanks:
    """The world size and rank in kvrpc's keys of vLLM rank ``rank`` of ``world_size``.

    Each rank holds its own shard of the KV cache, so it is a rank of its own, except with
    MLA: one latent cache serves every tensor-parallel rank of a pipeline stage, so the
    stage is one kvrpc rank (vLLM numbers ranks stage by stage, ``rank // tensor_parallel``
    is the stage), stored by the stage's first rank and loaded by all of them. With the
    engine's ranks on ``hosts`` hosts (one server each, see
    :func:`~kvrpc.kv.client.hosts.host_of_rank`), a stage that spans hosts is stored by its
    first rank on each host, since the others load from their own host's server.
    """
    if not use_mla:
        return KVRanks(world_size, rank, True)
    first_of_stage = rank % tensor_parallel == 0
    first_on_host = first_of_stage or (
        host_of_rank(rank, world_size, hosts) != host_of_rank(rank - 1, world_size, hosts)
    )
    return KVRanks(world_size // tensor_parallel, rank // tensor_parallel, first_on_host)


class Phase(enum.Enum):
    """Where a request is: looking up, or past it (loading or running)."""

    LOOKING = "looking"
    PLANNED = "planned"


@dataclass(frozen=True)
class Transfer:
    """One request's store or retrieve for the workers, in the adapters' own terms."""

    request_id: str
    retrieve: bool
    op: LoadStoreOp

    def written_block_ids(self, block_size: int) -> tuple[int, ...]:
        """The blocks a retrieve writes: its blocks less those holding skipped tokens.

        Those are vLLM's own (valid, and maybe read by another request), so they are never
        reported as load errors when the retrieve fails. A store writes none.
        """
        if not self.retrieve:
            return ()
        op = self.op
        first = max(0, op.first_written_block(block_size) - op.block_offset)
        return tuple(op.block_ids[first:])


@dataclass(frozen=True)
class ReleasePins:
    """Release the request's pins on its whole chunks below token ``end``."""

    request_id: str
    end: int
    chunk_hashes: tuple[bytes, ...]


@dataclass(eq=False)
class _Request:
    request_id: str
    tokens: Sequence[int]
    prompt_len: int
    cache_salt: str | None
    hashes: list[bytes]
    # vLLM's own block hashes of the request (a list it extends as tokens come), when the
    # plan keys chunks by them; None: by the tokens.
    block_hashes: Sequence[bytes] | None = None
    cached: bool = True  # False: never looked up nor stored
    phase: Phase = Phase.LOOKING
    local: int = 0
    hit: int = 0
    blocks: list[int] = field(default_factory=list)
    stored_chunks: int = 0
    transfers: int = 0


class SchedulerPlan:
    """Per request: its chunk hashes, blocks and progress; the transfers each step needs."""

    def __init__(
        self,
        chunk_size: int,
        block_size: int,
        *,
        save_decode_cache: bool = False,
        sync_loads: bool = False,
        block_hashes_per_chunk: int = 0,
    ):
        if chunk_size % block_size:
            raise ValueError(f"chunk size {chunk_size} is not a multiple of block {block_size}")
        if block_hashes_per_chunk < 0:
            raise ValueError(f"block hashes per chunk must be >= 0, not {block_hashes_per_chunk}")
        #: The engine's block hashes per chunk, for requests keyed by them (the hash of a
        #: chunk's last one names it, see :func:`~kvrpc.kv.keys.hashes_from_block_hashes`);
        #: 0: the engine's blocks do not tile chunks, and every request is keyed by its
        #: tokens (:func:`~kvrpc.kv.keys.hashes_from_tokens`).
        self.block_hashes_per_chunk = block_hashes_per_chunk
        self.chunk_size = chunk_size
        self.block_size = block_size
        self.blocks_per_chunk = chunk_size // block_size
        self.save_decode_cache = save_decode_cache
        #: Loads happen inside the forward of the step that schedules the request.
        self.sync_loads = sync_loads
        self._requests: dict[str, _Request] = {}
        self._pending: list[Transfer] = []

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._requests

    def __len__(self) -> int:
        return len(self._requests)

    def phase(self, request_id: str) -> Phase | None:
        """The request's phase, or None when the plan does not know it."""
        request = self._requests.get(request_id)
        return None if request is None else request.phase

    # ------------------------------------------------------------------ lookup

    def begin(
        self,
        request_id: str,
        tokens: Sequence[int],
        prompt_len: int,
        cache_salt: str | None = None,
        block_hashes: Sequence[bytes] | None = None,
        *,
        cached: bool = True,
    ) -> list[bytes]:
        """Start (or start over) planning a request; returns the chunk hashes to look up.

        ``tokens`` is the request's token list, which may grow as it decodes (the plan reads
        it, never changes it). With ``block_hashes`` (vLLM's list of the request's block
        hashes, which grows too) the request's chunks are keyed by those, which cover what
        the tokens do not (the cache salt, a LoRA, multimodal inputs); it needs a plan made
        with ``block_hashes_per_chunk``. A request not ``cached`` is never looked up nor
        stored: one whose KV its tokens do not determine, when no block hashes can key it.
        """
        if block_hashes is not None and not self.block_hashes_per_chunk:
            raise ValueError("block hashes given to a plan made without block_hashes_per_chunk")
        request = _Request(request_id, tokens, prompt_len, cache_salt, [], block_hashes, cached)
        if cached:
            request.hashes = self._chunk_hashes(request, max(0, prompt_len - 1) // self.chunk_size)
        self._requests[request_id] = request
        return list(request.hashes)

    def _chunk_hashes(self, request: _Request, chunks: int) -> list[bytes]:
        """The hashes of the request's first ``chunks`` chunks (fewer if not all are known)."""
        per_chunk = self.block_hashes_per_chunk
        if request.block_hashes is not None:
            # The engine has hashed every whole block of the tokens it holds: a chunk's key
            # costs one SHA-256 over its last block's hash, not one over its 256 token ids.
            return hashes_from_block_hashes(request.block_hashes[: chunks * per_chunk], per_chunk)
        window = request.tokens[: chunks * self.chunk_size]
        # vLLM's token list slices to a list already: copying it again costs ~2 ns an id.
        if not isinstance(window, list):
            window = list(window)
        return hashes_from_tokens(window, self.chunk_size, request.cache_salt)

    def on_lookup(self, request_id: str, matched: int, local: int) -> int:
        """How many tokens to load (0 or more) given the two hits.

        The server holds the first ``matched`` tokens (whole looked-up chunks), vLLM's own
        prefix cache the first ``local``.
        """
        request = self._requests[request_id]
        if matched % self.chunk_size or matched > len(request.hashes) * self.chunk_size:
            raise ValueError(f"matched tokens {matched} are not whole looked-up chunks")
        request.hit, request.local = matched, local
        request.stored_chunks = matched // self.chunk_size
        return max(0, matched - local)

    def answer(self, request_id: str, matched: int, local: int) -> tuple[int, bool]:
        """The pair vLLM wants for a lookup's answer: ``(tokens to load, load asynchronously)``.

        Like :meth:`on_lookup`. Nothing to load is never asynchronous (vLLM asserts that an
        asynchronous load has tokens); with ``sync_loads`` no load is.
        """
        load = self.on_lookup(request_id, matched, local)
        return load, load > 0 and not self.sync_loads

    def on_alloc(
        self, request_id: str, block_ids: Sequence[int], num_external_tokens: int
    ) -> ReleasePins | None:
        """Learn that vLLM allocated ``block_ids`` (all of the request's blocks) for it.

        The first time after the lookup this plans the retrieve (when ``num_external_tokens``
        is not 0) and answers the pins that can go; later calls only learn new blocks.
        """
        request = self._requests[request_id]
        known = len(request.blocks)
        request.blocks.extend(block_ids[known:])
        if request.phase is not Phase.LOOKING:
            return None
        request.phase = Phase.PLANNED
        if num_external_tokens <= 0 or request.hit <= request.local:
            end = request.hit  # nothing loads: every pin can go
        else:
            self._plan_retrieve(request)
            end = request.local
        end = end // self.chunk_size * self.chunk_size
        if end <= 0:
            return None
        return ReleasePins(request_id, end, tuple(request.hashes[: end // self.chunk_size]))

    def _plan_retrieve(self, request: _Request) -> None:
        first = request.local // self.chunk_size
        skip = request.local - first * self.chunk_size
        self._add_transfer(request, True, first, request.hit // self.chunk_size, skip)

    def _add_transfer(
        self, request: _Request, retrieve: bool, first: int, last: int, skip: int = 0
    ) -> None:
        """Plan moving chunks ``[first, last)``: only their blocks, and every hash up to them."""
        size, per_chunk = self.chunk_size, self.blocks_per_chunk
        op = LoadStoreOp(
            block_ids=tuple(request.blocks[first * per_chunk : last * per_chunk]),
            chunk_hashes=tuple(request.hashes[:last]),
            start=first * size,
            end=last * size,
            block_offset=first * per_chunk,
            skip_first_n_tokens=skip,
        )
        request.transfers += 1
        self._pending.append(Transfer(request.request_id, retrieve, op))

    # ------------------------------------------------------------------ steps

    def on_scheduled(
        self,
        request_id: str,
        new_block_ids: Sequence[int],
        computed_after: int,
        *,
        replace_blocks: bool = False,
    ) -> None:
        """Learn that this step's forward leaves the first ``computed_after`` tokens' KV.

        ``new_block_ids`` are the blocks allocated this step (all of them, when
        ``replace_blocks``: a request resumed after preemption). Stores every chunk that is
        complete now and not stored yet.
        """
        request = self._requests.get(request_id)
        if request is None:
            return
        if not request.cached:
            return  # nor its blocks kept: no transfer of it ever names them
        if replace_blocks:
            request.blocks = list(new_block_ids)
        else:
            request.blocks.extend(new_block_ids)
        limit = len(request.tokens) if self.save_decode_cache else request.prompt_len
        ready = min(computed_after, limit) // self.chunk_size
        ready = min(ready, len(request.blocks) // self.blocks_per_chunk)
        first = request.stored_chunks
        if ready <= first:
            return
        if len(request.hashes) < ready:
            request.hashes = self._chunk_hashes(request, ready)
            ready = len(request.hashes)  # a chunk whose block hashes vLLM has not made yet
            if ready <= first:
                return
        request.stored_chunks = ready
        self._add_transfer(request, False, first, ready)

    def on_load_errors(self, block_ids: Collection[int]) -> None:
        """Learn that loads left ``block_ids`` unfilled (vLLM's ``invalid_block_ids``).

        vLLM computes each request holding one again from its first such block, so the
        request's chunks from the one holding it on are stored again as they complete. A
        block past the chunks stored so far changes nothing: those are stored as they
        complete anyway.
        """
        if not block_ids:
            return
        per_chunk = self.blocks_per_chunk
        for request in self._requests.values():
            if request.phase is not Phase.PLANNED:
                continue
            held = request.blocks[: request.stored_chunks * per_chunk]
            first = next((i for i, block in enumerate(held) if block in block_ids), None)
            if first is not None:
                request.stored_chunks = first // per_chunk

    def take_transfers(self) -> list[Transfer]:
        """The transfers planned since the last call, retrieves and stores in plan order."""
        pending, self._pending = self._pending, []
        return pending

    def finish(self, request_id: str) -> bool:
        """Forget the request; True if it ever had a transfer planned."""
        request = self._requests.pop(request_id, None)
        self._pending = [t for t in self._pending if t.request_id != request_id]
        return request is not None and request.transfers > 0
