"""The scheduler's adapter: how many prompt tokens the server holds, asked without waiting.

It sits on a :class:`~kvrpc.client.SyncClient` (its own event-loop thread), so an engine
calls it from a plain thread and never waits on the network unless it asks to: a lookup is
submitted at once and its answer polled (``check_lookup_result``), or waited for a bounded
time (:class:`PollingSchedulerAdapter`).

An engine spanning several hosts gives one URL per host (see :mod:`.hosts`): each lookup
then goes to every server at once, and the answer is the fewest chunks any of them holds,
since every rank must retrieve the same prefix.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from kvrpc.errors import KVConfigError, KVError, KvrpcError
from kvrpc.futures import MessagingFuture
from kvrpc.kv import protocols
from kvrpc.kv.client.hosts import server_urls
from kvrpc.kv.client.link import ServerLink
from kvrpc.kv.client.ops import check_engine_id, prompt_hashes, scoped_request_id
from kvrpc.kv.keys import KeyBatch

__all__ = ["PollingSchedulerAdapter", "SchedulerAdapter"]

logger = logging.getLogger("kvrpc.kv")


class SchedulerAdapter:
    """The scheduler's side: how many prompt tokens the server holds, asked without waiting.

    ``maybe_submit_lookup_request`` sends the lookup; ``check_lookup_result`` returns None
    until the answer (and any prefetch it started) is in, then the matched token count, a
    multiple of the server's chunk size. The matched chunks stay pinned on the server for
    the request's workers to retrieve until :meth:`end_session`. Use from one thread.

    ``server_url`` is one URL, or one per host of an engine whose workers span hosts (every
    server must be up at start, with one chunk size). With several, a lookup asks them all
    and matches the fewest chunks any holds; the pins beyond that are released on the
    others, and a server that fails, or has not answered ``lookup_timeout`` seconds after
    the submit, counts as 0 (with one server, a pending lookup stays pending: the caller
    decides how long to wait). ``engine_id`` (made once per engine, given to its scheduler
    and all its workers) scopes the request ids this adapter sends, so that engines sharing
    a server never touch each other's sessions; None sends them as they are. Each lookup
    also declares it, and the server binds the sessions it opens to it: only workers
    registered with the same engine id release their pins by retrieving.

    While an answer is pending, ``check_lookup_result`` waits up to ``poll_grace`` seconds
    (default 50 us) for it before returning None, with the GIL released: a scheduler that
    polls in a loop without sleeping then gets its answer as fast as one that sleeps.
    """

    def __init__(
        self,
        server_url: str | Sequence[str],
        model_name: str,
        world_size: int,
        kv_rank: int,
        block_size: int,
        *,
        engine_id: str | None = None,
        lookup_timeout: float = 5.0,
        timeout: float = 30.0,
        connect_timeout: float = 5.0,
        keepalive_interval: float = 2.0,
        auth_token_file: str | None = None,
        poll_grace: float = 50e-6,
    ) -> None:
        if not 0 <= poll_grace < 1:
            raise KVConfigError(f"poll_grace is seconds in [0, 1), not {poll_grace!r}")
        self.poll_grace = poll_grace
        self.model_name = model_name
        self.world_size = world_size
        self.kv_rank = kv_rank
        self.block_size = block_size
        self.engine_id = check_engine_id(engine_id)
        self.lookup_timeout = lookup_timeout
        links: list[ServerLink] = []
        try:
            for url in server_urls(server_url):
                links.append(
                    ServerLink(
                        url,
                        block_size,
                        timeout=timeout,
                        connect_timeout=connect_timeout,
                        keepalive_interval=keepalive_interval,
                        auth_token_file=auth_token_file,
                    )
                )
        except BaseException:
            for link in links:
                link.close()
            raise
        sizes = {link.url: link.chunk_size for link in links}
        if len(set(sizes.values())) > 1:
            for link in links:
                link.close()
            raise KVConfigError(
                "the servers have different chunk sizes ("
                + ", ".join(f"{url}: {size}" for url, size in sizes.items())
                + "); start every `kvrpc serve` of one engine with the same --chunk-size"
            )
        self._links = links
        self._link = links[0]
        self.chunk_size = self._link.chunk_size
        self._blocks_per_chunk = self._link.blocks_per_chunk
        self._lookups: dict[str, _Lookup] = {}

    def num_blocks_per_chunk(self) -> int:
        """KV blocks per chunk: the server's chunk size over the engine's block size."""
        return self._blocks_per_chunk

    @property
    def server_urls(self) -> list[str]:
        """The servers asked, one per host, in the order given."""
        return [link.url for link in self._links]

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
        wire_id = scoped_request_id(self.engine_id, request_id)
        if len(self._links) > 1:
            self._lookups[request_id] = self._submit_everywhere(request_id, wire_id, keys, hashes)
            return
        try:
            future = self._link.submit_direct(protocols.LOOKUP, wire_id, keys, self.engine_id)
        except KvrpcError as exc:
            logger.warning("lookup for request %r not sent, computing it: %s", request_id, exc)
            self._lookups[request_id] = _Lookup([], tokens=0)
            return
        self._lookups[request_id] = _Lookup([_Answer(future)], hashes=hashes)

    def _submit_everywhere(
        self, request_id: str, wire_id: str, keys: KeyBatch, hashes: list[bytes]
    ) -> _Lookup:
        """The lookup sent to every server at once; one that cannot be sent counts as 0."""
        answers: list[_Answer] = []
        for link in self._links:
            try:
                answers.append(
                    _Answer(link.submit_direct(protocols.LOOKUP, wire_id, keys, self.engine_id))
                )
            except KvrpcError as exc:
                logger.warning(
                    "lookup for request %r not sent to %s, counting 0: %s",
                    request_id,
                    link.url,
                    exc,
                )
                answers.append(_Answer(None, chunks=0))
        deadline = time.monotonic() + self.lookup_timeout
        return _Lookup(answers, hashes=hashes, deadline=deadline)

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
        wire_id = scoped_request_id(self.engine_id, request_id)
        for link in self._links:
            self._release(link, request_id, wire_id, hashes)

    def _release(
        self, link: ServerLink, request_id: str, wire_id: str, hashes: Sequence[bytes]
    ) -> None:
        """Ask ``link``'s server to unpin these chunks of the request; never waits."""
        if not hashes:
            return
        keys = KeyBatch(self.model_name, self.world_size, None, b"".join(hashes))
        try:
            future = link.submit_direct(protocols.RELEASE_PINS, wire_id, keys)
        except KvrpcError as exc:  # the session's pins go with it, or with this client
            logger.debug("release_pins for %r not sent to %s: %s", request_id, link.url, exc)
            return
        link.track(future, "release_pins", request_id)

    def check_lookup_result(self, request_id: str) -> int | None:
        """Tokens matched for ``request_id``, or None while the lookup is pending.

        A lookup that failed (server gone, timeout) counts as 0 matched tokens, logged: the
        engine then computes the prompt. Raises :class:`KVError` for an id never submitted.
        """
        return self._check(request_id, self.poll_grace)

    def _check(self, request_id: str, grace: float) -> int | None:
        """:meth:`check_lookup_result`, waiting up to ``grace`` seconds for a pending answer."""
        lookup = self._lookups.get(request_id)
        if lookup is None:
            raise KVError(f"no lookup was submitted for request {request_id!r}")
        if lookup.tokens is not None:
            return lookup.tokens
        if len(lookup.answers) > 1:
            return self._check_everywhere(request_id, lookup, grace)
        chunks = self._poll(self._link, lookup.answers[0], request_id, grace)
        if chunks is None:
            return None
        lookup.tokens = chunks * self.chunk_size
        return lookup.tokens

    def _poll(self, link: ServerLink, answer: _Answer, request_id: str, grace: float) -> int | None:
        """Chunks ``link``'s server matched, None while pending; a failure counts as 0.

        A lookup that answers a prefetch job's id is followed by its status queries on the
        same server until the job has its count.
        """
        if answer.chunks is not None:
            return answer.chunks
        future = answer.future
        assert future is not None
        # A short wait, not a glance: it lets go of the GIL, which the client's loop thread
        # needs to read the answer. A caller polling in a tight loop would otherwise keep it,
        # and the answer would land only at the interpreter's switches, 5 ms apart.
        if not future.done() and not future.wait(grace):
            return None
        try:
            result = future.result()
        except Exception as exc:
            logger.warning(
                "lookup for request %r at %s failed, computing it: %s", request_id, link.url, exc
            )
            answer.chunks = 0
            return 0
        if isinstance(result, str) or result is None:  # a prefetch job: ask for its count
            if isinstance(result, str):
                answer.job = result
            assert answer.job is not None
            try:
                answer.future = link.submit_direct(protocols.QUERY_PREFETCH_STATUS, answer.job)
            except KvrpcError as exc:
                logger.warning("prefetch status for %r not asked: %s", request_id, exc)
                answer.chunks = 0
                return 0
            return None
        answer.chunks = int(result)
        return answer.chunks

    def _check_everywhere(self, request_id: str, lookup: _Lookup, grace: float) -> int | None:
        """The fewest chunks any server matched, once known; None while it may still change.

        Known once every server answered, or one matched 0 (the fewest cannot be fewer), or
        the deadline passed: then the servers still pending count as 0. The pins beyond the
        fewest are released where a server matched more, and a pending server's session is
        ended, so that whatever its late answer pins goes at once.
        """
        counts = [
            self._poll(link, answer, request_id, grace)
            for link, answer in zip(self._links, lookup.answers, strict=True)
        ]
        pending = counts.count(None)
        if pending and 0 not in counts:
            if time.monotonic() < lookup.deadline:
                return None
            logger.warning(
                "lookup for request %r: %d of %d servers did not answer within %g s; "
                "they count as 0 and the prompt is computed",
                request_id,
                pending,
                len(counts),
                self.lookup_timeout,
            )
        fewest = min(0 if count is None else count for count in counts)
        wire_id = scoped_request_id(self.engine_id, request_id)
        hashes = lookup.hashes or []
        for link, count in zip(self._links, counts, strict=True):
            if count is None:
                self._end(link, request_id, wire_id)
            elif count > fewest:
                self._release(link, request_id, wire_id, hashes[fewest:count])
        lookup.tokens = fewest * self.chunk_size
        return lookup.tokens

    def cleanup_lookup_result(self, request_id: str) -> None:
        """Forget ``request_id``'s lookup here (the server keeps its pins until end_session)."""
        self._lookups.pop(request_id, None)

    def end_session(self, request_id: str) -> None:
        """The request is done: every server releases its pins. Does not wait for the reply."""
        self._lookups.pop(request_id, None)
        wire_id = scoped_request_id(self.engine_id, request_id)
        for link in self._links:
            self._end(link, request_id, wire_id)

    def _end(self, link: ServerLink, request_id: str, wire_id: str) -> None:
        try:
            future = link.submit_direct(
                protocols.END_SESSION, self.model_name, self.world_size, wire_id
            )
        except KvrpcError as exc:  # the server releases them when this client goes silent
            logger.debug("end_session for %r not sent to %s: %s", request_id, link.url, exc)
            return
        link.track(future, "end_session", request_id)

    def clear(self, timeout: float = 10.0) -> int:
        """Drop every unpinned chunk from the servers' memory (``kv.clear``); how many went.

        Waits up to ``timeout`` seconds for each server's answer; an engine resetting its own
        prefix cache (new weights, say) calls this so that no stale chunk can hit.
        """
        cleared = 0
        for link in self._links:
            cleared += int(link.client.call(protocols.CLEAR, timeout=timeout))
        return cleared

    def close(self) -> None:
        """Close the connections; the servers drop this scheduler's pins and jobs at once."""
        for link in self._links:
            link.close()

    shutdown = close

    def __enter__(self) -> SchedulerAdapter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _pending_future(self, request_id: str) -> MessagingFuture[Any] | None:
        """A reply the lookup still waits for (any one), or None if it waits for none."""
        for answer in self._lookups[request_id].answers:
            if answer.chunks is None:
                return answer.future
        return None


@dataclass(eq=False)
class _Answer:
    """One server's answer to a lookup: its reply (or its job's status), then its count."""

    future: MessagingFuture[Any] | None
    job: str | None = None
    chunks: int | None = None


@dataclass(eq=False)
class _Lookup:
    """A lookup's answers, one per server; ``tokens`` once the result is known."""

    answers: list[_Answer]
    tokens: int | None = None
    hashes: list[bytes] | None = None
    #: With several servers: when those that have not answered count as 0 (monotonic s).
    deadline: float = 0.0


class PollingSchedulerAdapter(SchedulerAdapter):
    """A :class:`SchedulerAdapter` whose ``check_lookup_result`` waits for the answer.

    It polls every ``poll_interval`` seconds for at most ``lookup_timeout`` seconds; on
    timeout it logs a warning, forgets the request (ending its server session) and returns
    0, so the engine computes the prompt instead of waiting. With several servers, those
    that have not answered by then count as 0 (see :class:`SchedulerAdapter`).
    """

    def __init__(
        self,
        server_url: str | Sequence[str],
        model_name: str,
        world_size: int,
        kv_rank: int,
        block_size: int,
        *,
        poll_interval: float = 0.005,
        lookup_timeout: float = 5.0,
        **options: Any,
    ) -> None:
        super().__init__(
            server_url,
            model_name,
            world_size,
            kv_rank,
            block_size,
            lookup_timeout=lookup_timeout,
            **options,
        )
        self.poll_interval = poll_interval

    def check_lookup_result(self, request_id: str) -> int:
        """Tokens matched for ``request_id``, waiting up to ``lookup_timeout`` seconds."""
        deadline = time.monotonic() + self.lookup_timeout
        while True:
            # No grace: this loop waits on the answer itself, within its own deadline.
            tokens = self._check(request_id, 0.0)
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
            future = self._pending_future(request_id)
            assert future is not None
            future.wait(min(self.poll_interval, left))
