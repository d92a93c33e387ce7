"""A one-GPU engine over :class:`~.model.PagedLlama` that caches prompt prefixes in kvrpc.

:class:`CachingEngine` plays both of an inference engine's roles through the adapters the
vLLM connector uses: as the scheduler it asks the server how many prefix tokens are cached
(:class:`~kvrpc.kv.PollingSchedulerAdapter`); as the worker it registers its paged KV cache,
retrieves the hit into fresh blocks, computes only the rest of the prompt, and stores the
prompt's whole chunks afterwards (:class:`~kvrpc.kv.WorkerAdapter`). A prefill hashes its
prompt once and gives the chunk hashes to all three (the lookup, the retrieve and the
store): hashing a 16k-token prompt is most of a millisecond, paid once. A retrieve that
fails (the server went away, a chunk was evicted) is recomputed: the answer never depends
on the cache being there.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from kvrpc.errors import KVConfigError, KVError
from kvrpc.integrations.transformers.decode import Decoder
from kvrpc.integrations.transformers.model import PagedKVCache, PagedLlama
from kvrpc.kv.client import (
    LoadStoreOp,
    PollingSchedulerAdapter,
    RetrieveProgress,
    WorkerAdapter,
)
from kvrpc.kv.keys import hashes_from_tokens
from kvrpc.kv.layout import LayoutKind
from kvrpc.kv.shm import shared_empty

__all__ = ["CachingEngine", "Prefill"]


class _LoadFailed(Exception):
    """A layer's retrieve did not complete: the forward stops and the prompt is recomputed."""


@dataclass
class Prefill:
    """One prompt's prefill: its blocks, its last logits and what the cache gave."""

    request_id: str
    token_ids: list[int]
    block_table: list[int]
    logits: torch.Tensor
    """float32 ``[logits_for, vocab]``: the last prompt tokens' logits."""
    first_token: int
    """The greedy next token, read back to the host."""
    cached_tokens: int
    """Prompt tokens whose KV came from the server (0 on a miss or a failed retrieve)."""
    recomputed: bool
    """True when a retrieve failed and the whole prompt was computed instead."""
    seconds: float
    """From the lookup to the first token on the host: the time to first token."""
    chunk_hashes: list[bytes] = field(default_factory=list)
    """The prompt's whole chunks' hashes as the lookup, the retrieve and the store used them
    (empty after a prefill that used none: ``cached_tokens=0, store=False``)."""


class CachingEngine:
    """A ``LlamaForCausalLM`` served over paged blocks, its prefixes cached in a kvrpc server.

    ``layerwise`` makes a hit's retrieve move layer by layer, each layer's attention waiting
    only for its own layer (``cuda_ipc``; on the CPU every layer arrives at once). ``model``
    and the cache live on ``device``; on the CPU the KV tensors are in shared memory, which
    the server reads and writes in place. ``cuda_graphs`` makes :meth:`decode` replay a
    CUDA graph per step (see :mod:`.decode`; CUDA only) unless told otherwise per call.
    """

    def __init__(
        self,
        model: Any,
        url: str,
        *,
        model_name: str,
        num_blocks: int,
        block_size: int = 16,
        layerwise: bool = True,
        timeout: float = 30.0,
        lookup_timeout: float = 5.0,
        cuda_graphs: bool = False,
    ) -> None:
        config = model.config
        parameter = next(model.parameters())
        device, dtype = parameter.device, parameter.dtype
        if cuda_graphs and device.type != "cuda":  # before any connection is made
            raise KVConfigError(f"cuda_graphs needs the model on a CUDA device, not {device}")
        heads = int(config.num_attention_heads)
        head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
        cache = PagedKVCache.empty(
            num_layers=int(config.num_hidden_layers),
            num_blocks=num_blocks,
            block_size=block_size,
            kv_heads=int(config.num_key_value_heads),
            head_dim=head_dim,
            dtype=dtype,
            device=device,
            allocate=shared_empty if device.type == "cpu" else None,
        )
        self.runner = PagedLlama(model, cache)
        self.cache = cache
        self.device = device
        self.layerwise = layerwise
        self.timeout = timeout
        self.cuda_graphs = cuda_graphs
        self._decoders: dict[bool, Decoder] = {}
        self.scheduler = PollingSchedulerAdapter(
            url, model_name, 1, 0, block_size, lookup_timeout=lookup_timeout, timeout=timeout
        )
        self.worker = WorkerAdapter(url, model_name, 1, 0, block_size, timeout=timeout)
        self.chunk_size = self.worker.chunk_size
        layers = {f"model.layers.{i}.self_attn": t for i, t in enumerate(cache.layers)}
        self.worker.register_kv_caches(layers, LayoutKind.PAGED)

    # ------------------------------------------------------------------ requests

    def chunk_hashes(self, token_ids: Sequence[int]) -> list[bytes]:
        """The hashes of the prompt's whole chunks, as the server keys them."""
        return hashes_from_tokens(token_ids, self.chunk_size)

    def lookup(
        self,
        request_id: str,
        token_ids: Sequence[int],
        *,
        chunk_hashes: Sequence[bytes] | None = None,
    ) -> int:
        """Prompt tokens the server can give (whole chunks), leaving at least one to compute.

        ``chunk_hashes`` are the prompt's (:meth:`chunk_hashes`), when the caller has them
        already; without, the tokens are hashed here.
        """
        if chunk_hashes is None:
            chunk_hashes = self.chunk_hashes(token_ids)
        self.scheduler.maybe_submit_lookup_request(request_id, chunk_hashes=chunk_hashes)
        matched = self.scheduler.check_lookup_result(request_id)
        usable = (len(token_ids) - 1) // self.chunk_size * self.chunk_size
        return min(matched, usable)

    def prefill(
        self,
        request_id: str,
        token_ids: Sequence[int],
        *,
        cached_tokens: int | None = None,
        store: bool = True,
        logits_for: int = 1,
        layerwise: bool | None = None,
    ) -> Prefill:
        """Compute a prompt, taking its cached prefix from the server where there is one.

        ``cached_tokens`` is a :meth:`lookup`'s answer (looked up here when None; 0 computes
        everything). With ``store`` the prompt's whole chunks are stored afterwards (in the
        background: the server skips the ones it has). The prompt is hashed once, here, for
        the lookup, the retrieve and the store alike.
        """
        started = time.perf_counter()
        tokens = list(token_ids)
        # Not for a prefill that neither looks up, retrieves nor stores: it would not use them.
        hashes = self.chunk_hashes(tokens) if cached_tokens != 0 or store else []
        if cached_tokens is None:
            hit = self.lookup(request_id, tokens, chunk_hashes=hashes)
        else:
            hit = cached_tokens
        table = self.cache.allocate(self.cache.blocks_for(len(tokens)))
        layerwise = self.layerwise if layerwise is None else layerwise
        recomputed = False
        try:
            logits = None
            if hit:
                progress = self.worker.submit_retrieve_request(
                    request_id,
                    LoadStoreOp(table, chunk_hashes=hashes, end=hit),
                    layerwise=layerwise,
                )
                logits = self._suffix(tokens, hit, table, progress, layerwise, logits_for)
            if logits is None:
                recomputed = hit > 0
                hit = 0
                logits = self.runner.forward(tokens, 0, table, logits_for=logits_for)
        except BaseException:
            self.cache.free(table)
            raise
        finally:
            self.scheduler.end_session(request_id)
        first = int(logits[-1].argmax())  # waits for the GPU: the token exists only now
        seconds = time.perf_counter() - started
        if store:
            self.store(request_id, tokens, table, chunk_hashes=hashes)
        return Prefill(request_id, tokens, table, logits, first, hit, recomputed, seconds, hashes)

    def _suffix(
        self,
        tokens: list[int],
        hit: int,
        table: list[int],
        progress: RetrieveProgress,
        layerwise: bool,
        logits_for: int,
    ) -> torch.Tensor | None:
        """The suffix's logits over the retrieved prefix, or None if the retrieve failed."""
        timeout = self.timeout
        if not layerwise:
            if not progress.wait(timeout):
                return None
            return self.runner.forward(tokens[hit:], hit, table, logits_for=logits_for)

        def wait_layer(layer: int) -> None:
            if not progress.wait_layer(layer, timeout):
                raise _LoadFailed

        try:
            logits = self.runner.forward(
                tokens[hit:], hit, table, wait_layer=wait_layer, logits_for=logits_for
            )
        except _LoadFailed:
            progress.wait(timeout)  # no late copy may write the blocks while they are redone
            return None
        # Every layer arrived; the whole retrieve settling well is the adapter's last word
        # (its last event already completed, so this returns at once).
        return logits if progress.wait(timeout) else None

    def store(
        self,
        request_id: str,
        token_ids: Sequence[int],
        table: Sequence[int],
        *,
        chunk_hashes: Sequence[bytes] | None = None,
    ) -> None:
        """Store the prompt's whole chunks from its blocks, after the work queued so far.

        ``chunk_hashes`` are the prompt's when the caller has them (a :class:`Prefill`'s);
        without, the tokens are hashed here. No event of its own: on a GPU the adapter
        records its interprocess event on this thread's current stream, after the forward
        that wrote the blocks.
        """
        if chunk_hashes is None:
            chunk_hashes = self.chunk_hashes(token_ids)
        op = LoadStoreOp(list(table), chunk_hashes=chunk_hashes)
        self.worker.submit_store_request(request_id, op)

    def wait_for_stores(self, request_ids: Sequence[str], timeout: float = 60.0) -> None:
        """Wait until these requests' stores are done; ``KVError`` on timeout."""
        self.worker.get_finished(set(request_ids))
        if not self.worker.wait_for_stores(request_ids, timeout):
            raise KVError(f"stores of {list(request_ids)} not done within {timeout:g} s")

    def decoder(self, cuda_graphs: bool | None = None) -> Decoder:
        """The engine's decoder: ``eager``, or ``graphed`` with ``cuda_graphs``.

        ``cuda_graphs=None`` is the engine's choice. Each is made once and keeps its buffers
        and graphs for the next request; one request decodes at a time.
        """
        graphed = self.cuda_graphs if cuda_graphs is None else cuda_graphs
        decoder = self._decoders.get(graphed)
        if decoder is None:
            decoder = Decoder(self.runner, mode="graphed" if graphed else "eager")
            self._decoders[graphed] = decoder
        return decoder

    def decode(self, prefill: Prefill, steps: int, *, cuda_graphs: bool | None = None) -> list[int]:
        """Greedy tokens after the prompt: the first, then ``steps - 1`` more, one at a time.

        Extends the request's block table as it grows (its blocks stay the caller's to
        :meth:`release`). Each step appends one slot to the context's slots on the device
        (:class:`~.decode.Decoder`); with ``cuda_graphs`` (the engine's choice when None) it
        replays a CUDA graph.
        """
        tokens = [prefill.first_token]
        if steps <= 1:
            return tokens
        decoder = self.decoder(cuda_graphs)
        table = prefill.block_table
        decoder.start(table, len(prefill.token_ids), reserve=steps)
        for _ in range(steps - 1):
            logits = decoder.step(tokens[-1], table)
            tokens.append(int(logits[-1].argmax()))
        return tokens

    def release(self, prefill: Prefill) -> None:
        """Free a finished request's blocks (after its store: see :meth:`wait_for_stores`)."""
        self.cache.free(prefill.block_table)
        prefill.block_table = []

    def close(self) -> None:
        """Close both adapters (the worker unregisters its cache)."""
        self.worker.shutdown()
        self.scheduler.close()

    def __enter__(self) -> CachingEngine:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
