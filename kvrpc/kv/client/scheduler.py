"""The scheduler's adapter: how many prompt tokens the server holds, asked without waiting.

It sits on a :class:`~kvrpc.client.SyncClient` (its own event-loop thread), so an engine
calls it from a plain thread and never waits on the network unless it asks to: a lookup is
submitted at once and its answer polled (``check_lookup_result``), or waited for a bounded
time (:class:`PollingSchedulerAdapter`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from kvrpc.errors import KVError, KvrpcError
from kvrpc.futures import MessagingFuture
from kvrpc.kv import protocols
from kvrpc.kv.client.link import ServerLink
from kvrpc.kv.client.ops import prompt_hashes
from kvrpc.kv.keys import KeyBatch

__all__ = ["PollingSchedulerAdapter", "SchedulerAdapter"]

logger = logging.getLogger("kvrpc.kv")


class SchedulerAdapter:
    """The scheduler's side: how many prompt tokens the server holds, asked without waiting.

    ``maybe_submit_lookup_request`` sends the lookup; ``check_lookup_result`` returns None
    until the answer (and any prefetch it started) is in, then the matched token count, a
    multiple of the server's chunk size. The matched chunks stay pinned on the server for
    the request's workers to retrieve until :meth:`end_session`. Use from one thread.
    """

    def __init__(
        self,
        server_url: str,
        model_name: str,
        world_size: int,
        kv_rank: int,
        block_size: int,
        *,
        timeout: float = 30.0,
        connect_timeout: float = 5.0,
        keepalive_interval: float = 2.0,
    ) -> None:
        self.model_name = model_name
        self.world_size = world_size
        self.kv_rank = kv_rank
        self.block_size = block_size
        self._link = ServerLink(
            server_url,
            block_size,
            timeout=timeout,
            connect_timeout=connect_timeout,
            keepalive_interval=keepalive_interval,
        )
        self.chunk_size = self._link.chunk_size
        self._blocks_per_chunk = self._link.blocks_per_chunk
        self._lookups: dict[str, _Lookup] = {}

    def num_blocks_per_chunk(self) -> int:
        """KV blocks per chunk: the server's chunk size over the engine's block size."""
        return self._blocks_per_chunk

    def maybe_submit_lookup_request(
        self,
        request_id: str,
        block_hashes: Sequence[bytes | int] | None = None,
        token_ids: Sequence[int] | torch.Tensor | None = None,
        *,
        cache_salt: str | None = None,
        chunk_hashes: Sequence[bytes] | None = None,
    ) -> None:
        """Start a lookup for ``request_id`` unless one is pending or answered already.

        The prompt is given as exactly one of ``token_ids`` (hashed under ``cache_salt``:
        another salt never hits), the engine's ``block_hashes`` or ``chunk_hashes``. A
        lookup that cannot be sent (the server is gone) counts as 0 matched tokens.
        """
        if request_id in self._lookups:
            return
        hashes = prompt_hashes(
            self.chunk_size,
            self._blocks_per_chunk,
            token_ids,
            block_hashes,
            chunk_hashes,
            cache_salt,
        )
        keys = KeyBatch(self.model_name, self.world_size, None, b"".join(hashes))
        try:
            future = self._link.submit(protocols.LOOKUP, request_id, keys)
        except KvrpcError as exc:
            logger.warning("lookup for request %r not sent, computing it: %s", request_id, exc)
            self._lookups[request_id] = _Lookup(None, tokens=0)
            return
        self._lookups[request_id] = _Lookup(future, hashes=hashes)

    def free_lookup_locks(
        self,
        request_id: str,
        start: int,
        end: int,
        *,
        token_ids: Sequence[int] | torch.Tensor | None = None,
        cache_salt: str | None = None,
        chunk_hashes: Sequence[bytes] | None = None,
    ) -> None:
        """Release the request's pins on the whole chunks inside tokens ``[start, end)`` now.

        For chunks the engine holds itself (its own prefix cache hit them), so the server may
        evict them before the request ends. A chunk only partly inside is kept. Without a
        prompt given, the lookup's own chunk hashes are used. Does not wait for the reply.
        """
        first = -(-start // self.chunk_size)
        last = end // self.chunk_size
        if last <= first:
            return
        if token_ids is None and chunk_hashes is None:
            lookup = self._lookups.get(request_id)
            if lookup is None or lookup.hashes is None:
                raise KVError(f"no lookup hashes are known for request {request_id!r}")
            chunk_hashes = lookup.hashes
        hashes = prompt_hashes(
            self.chunk_size, self._blocks_per_chunk, token_ids, None, chunk_hashes, cache_salt
        )[first:last]
        if not hashes:
            return
        keys = KeyBatch(self.model_name, self.world_size, None, b"".join(hashes))
        try:
            future = self._link.submit(protocols.RELEASE_PINS, request_id, keys)
        except KvrpcError as exc:  # the session's pins go with it, or with this client
            logger.debug("release_pins for %r not sent: %s", request_id, exc)
            return
        self._link.track(future, "release_pins", request_id)

    def check_lookup_result(self, request_id: str) -> int | None:
        """Tokens matched for ``request_id``, or None while the lookup is pending.

        A lookup that failed (server gone, timeout) counts as 0 matched tokens, logged: the
        engine then computes the prompt. Raises :class:`KVError` for an id never submitted.
        """
        lookup = self._lookups.get(request_id)
        if lookup is None:
            raise KVError(f"no lookup was submitted for request {request_id!r}")
        if lookup.tokens is not None:
            return lookup.tokens
        future = lookup.future
        assert future is not None
        if not future.done():
            return None
        try:
            answer = future.result()
        except Exception as exc:
            logger.warning("lookup for request %r failed, computing it: %s", request_id, exc)
            lookup.tokens = 0
            return 0
        if isinstance(answer, str) or answer is None:  # a prefetch job: ask for its count
            if isinstance(answer, str):
                lookup.job = answer
            assert lookup.job is not None
            try:
                lookup.future = self._link.submit(protocols.QUERY_PREFETCH_STATUS, lookup.job)
            except KvrpcError as exc:
                logger.warning("prefetch status for %r not asked: %s", request_id, exc)
                lookup.tokens = 0
                return 0
            return None
        lookup.tokens = int(answer) * self.chunk_size
        return lookup.tokens

    def cleanup_lookup_result(self, request_id: str) -> None:
        """Forget ``request_id``'s lookup here (the server keeps its pins until end_session)."""
        self._lookups.pop(request_id, None)

    def end_session(self, request_id: str) -> None:
        """The request is done: the server releases its pins. Does not wait for the reply."""
        self._lookups.pop(request_id, None)
        try:
            future = self._link.submit(
                protocols.END_SESSION, self.model_name, self.world_size, request_id
            )
        except KvrpcError as exc:  # the server releases them when this client goes silent
            logger.debug("end_session for %r not sent: %s", request_id, exc)
            return
        self._link.track(future, "end_session", request_id)

    def clear(self, timeout: float = 10.0) -> int:
        """Drop every unpinned chunk from the server's memory (``kv.clear``); how many went.

        Waits up to ``timeout`` seconds for the answer; an engine resetting its own prefix
        cache (new weights, say) calls this so that no stale chunk can hit.
        """
        cleared: int = self._link.client.call(protocols.CLEAR, timeout=timeout)
        return cleared

    def close(self) -> None:
        """Close the connection; the server drops this scheduler's pins and jobs at once."""
        self._link.close()

    shutdown = close

    def __enter__(self) -> SchedulerAdapter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


@dataclass(eq=False)
class _Lookup:
    future: MessagingFuture[Any] | None
    job: str | None = None
    tokens: int | None = None
    hashes: list[bytes] | None = None


class PollingSchedulerAdapter(SchedulerAdapter):
    """A :class:`SchedulerAdapter` whose ``check_lookup_result`` waits for the answer.

    It polls every ``poll_interval`` seconds for at most ``lookup_timeout`` seconds; on
    timeout it logs a warning, forgets the request (ending its server session) and returns
    0, so the engine computes the prompt instead of waiting.
    """

    def __init__(
        self,
        server_url: str,
        model_name: str,
        world_size: int,
        kv_rank: int,
        block_size: int,
        *,
        poll_interval: float = 0.005,
        lookup_timeout: float = 5.0,
        **options: Any,
    ) -> None:
        super().__init__(server_url, model_name, world_size, kv_rank, block_size, **options)
        self.poll_interval = poll_interval
        self.lookup_timeout = lookup_timeout

    def check_lookup_result(self, request_id: str) -> int:
        """Tokens matched for ``request_id``, waiting up to ``lookup_timeout`` seconds."""
        deadline = time.monotonic() + self.lookup_timeout
        while True:
            tokens = super().check_lookup_result(request_id)
            if tokens is not None:
                return tokens
            left = deadline - time.monotonic()
            if left <= 0:
                logger.warning(
                    "lookup for request %r took over %g s; computing it instead",
                    request_id,
                    self.lookup_timeout,
                )
                self.end_session(request_id)
                return 0
            # Waiting on the reply itself rather than sleeping: an answer that arrives
            # within the interval is seen at once, not at the next tick.
            future = self._lookups[request_id].future
            assert future is not None
            future.wait(min(self.poll_interval, left))
