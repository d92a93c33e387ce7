"""``KvrpcConnector``: vLLM's ``KVConnectorBase_V1`` on kvrpc's scheduler and worker adapters.

This module imports vLLM. The rules it follows live in :mod:`.plan` (what each step moves),
:mod:`.layouts` (what vLLM's tensors are) and :mod:`.settings` (what it was told); here they
are only wired to vLLM's calls.

Both roles scope their request ids by vLLM's engine id (``kv_transfer_config.engine_id``,
which vLLM makes once per engine and hands to the scheduler and every worker in the same
config), so engines sharing a server never touch each other's sessions. ``kvrpc.url`` may
list one server per host: the scheduler asks them all, each worker its own host's.

Scheduler role: one :class:`~kvrpc.kv.client.scheduler.SchedulerAdapter`. Lookups never block vLLM's
scheduler loop: ``get_num_new_matched_tokens`` answers ``None`` (ask again next step) while
the server has not answered, and a miss once ``kvrpc.lookup_timeout`` has passed. Loads are
asynchronous by default: vLLM allocates the blocks, the workers retrieve into them between
steps and report the request through ``get_finished``. With ``kvrpc.layerwise`` they are
synchronous instead: vLLM schedules the request at once, the workers submit its retrieve
before the forward and each attention layer waits for its own layer
(``wait_for_layer_load``, see :mod:`.layer_loads`). Every finished request's blocks are held
until the workers report its stores done. With ``kvrpc.kv_events`` (on by default when vLLM
publishes KV events) it also subscribes to the servers' ``kv.events`` (:mod:`.event_feed`,
threads of its own) and ``take_events`` hands vLLM its own ``BlockStored`` and
``BlockRemoved`` for what they hold (:mod:`.block_events` has the rules).

Worker role: one :class:`~kvrpc.kv.client.worker.WorkerAdapter` per worker process. Submits
never wait for the GPU: with CUDA KV caches the adapter records an interprocess event on the
current stream, after the engine's work, and the server waits for it. When the server is
gone, stores are dropped and counted, retrieves fail at once as load errors (vLLM then
recomputes those blocks), and the adapters register again by themselves when it is back.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import torch
from vllm.distributed.kv_events import BlockRemoved, BlockStored, KVCacheEvent
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats
from vllm.v1.core.kv_cache_utils import maybe_convert_block_hash

from kvrpc.errors import KVConfigError
from kvrpc.integrations.vllm.block_events import (
    BlockEvents,
    RemovedBlocks,
    StoredBlocks,
    chunk_names,
    expected_ranks,
)
from kvrpc.integrations.vllm.event_feed import EventFeed
from kvrpc.integrations.vllm.layer_loads import LayerLoads
from kvrpc.integrations.vllm.layouts import vllm_layout
from kvrpc.integrations.vllm.plan import Phase, SchedulerPlan, Transfer, kv_ranks
from kvrpc.integrations.vllm.prom import KvrpcPromMetrics
from kvrpc.integrations.vllm.settings import ConnectorSettings
from kvrpc.kv.client import SchedulerAdapter, WorkerAdapter, server_for_rank
from kvrpc.transport import default_url

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

__all__ = ["KvrpcConnector", "KvrpcConnectorMetadata", "KvrpcConnectorStats"]

logger = logging.getLogger("kvrpc.vllm")

#: The most chunk hashes of ``kv.events`` one ``take_events`` turns into vLLM's events: the
#: bound on the time it takes from vLLM's scheduler step (the rest waits for the next).
EVENT_HASHES_PER_STEP: Final = 4096

#: The counters both roles report, summed over workers and intervals.
STAT_KEYS = (
    "lookups",
    "lookup_tokens",
    "hit_tokens",
    "lookup_failures",
    "stored_chunks",
    "stored_bytes",
    "dropped_stores",
    "retrieved_chunks",
    "retrieved_bytes",
    "failed_retrieves",
)


class KvrpcConnectorMetadata(KVConnectorMetadata):  # type: ignore[misc]
    """What the scheduler tells every worker for one step: the transfers, and the preempted."""

    def __init__(self, transfers: list[Transfer], preempted: frozenset[str]) -> None:
        self.transfers = transfers
        self.preempted = preempted

    def __repr__(self) -> str:
        loads = sum(t.retrieve for t in self.transfers)
        return (
            f"KvrpcConnectorMetadata({loads} retrieves, {len(self.transfers) - loads} stores, "
            f"{len(self.preempted)} preempted)"
        )


@dataclass
class KvrpcConnectorStats(KVConnectorStats):  # type: ignore[misc]
    """Counters since the last report; ``data`` maps each of :data:`STAT_KEYS` to an int."""

    def reset(self) -> None:
        """Zero every counter."""
        self.data: dict[str, Any] = {}

    def aggregate(self, other: KVConnectorStats) -> KvrpcConnectorStats:
        """Add ``other``'s counters (another worker's, or a later interval's) to these."""
        for key, value in other.data.items():
            self.data[key] = self.data.get(key, 0) + value
        return self

    def reduce(self) -> dict[str, int | float]:
        """The counters, and the hit rate in tokens, for vLLM's stats logger."""
        out: dict[str, int | float] = {key: int(self.data.get(key, 0)) for key in STAT_KEYS}
        asked = out["lookup_tokens"]
        out["hit_rate"] = round(out["hit_tokens"] / asked, 4) if asked else 0.0
        return out

    def is_empty(self) -> bool:
        """True when nothing was counted."""
        return not any(self.data.values())


def _beyond_tokens(request: Request) -> bool:
    """Whether the request's KV depends on more than its tokens and cache salt.

    A LoRA changes the keys and values a prompt makes, and a multimodal input or prompt
    embeddings stand behind placeholder token ids: hashing the tokens would give another
    request's chunks. vLLM's block hashes cover all three.
    """
    return bool(
        getattr(request, "lora_request", None)
        or getattr(request, "mm_features", None)
        or getattr(request, "prompt_embeds", None) is not None
    )


def _block_hashes_per_chunk(
    settings: ConnectorSettings,
    vllm_config: VllmConfig,
    kv_cache_config: KVCacheConfig | None,
    chunk_size: int,
) -> int:
    """How many of vLLM's block hashes make a kvrpc chunk; 0 when they cannot key chunks.

    Requests beyond their tokens (:func:`_beyond_tokens`) are keyed by them whatever
    ``kvrpc.chunk_keys`` says; with 0 such requests are neither looked up nor stored.
    """
    cache_config = vllm_config.cache_config
    hash_block_size = int(
        getattr(kv_cache_config, "hash_block_size", None) or cache_config.block_size
    )
    if chunk_size % hash_block_size:
        message = (
            f"the server's chunk size ({chunk_size}) is not a multiple of vLLM's hash block "
            f"size ({hash_block_size})"
        )
        if settings.chunk_keys == "block_hashes":
            raise KVConfigError(f"kvrpc.chunk_keys = 'block_hashes' cannot work: {message}")
        logger.warning("%s: requests with a LoRA or multimodal inputs are not cached", message)
        return 0
    algo = str(getattr(cache_config, "prefix_caching_hash_algo", "sha256"))
    if (
        settings.chunk_keys == "block_hashes"
        and algo.startswith("xxhash")
        and os.environ.get("PYTHONHASHSEED") is None
    ):
        # vLLM then seeds its block hashes at random in each process: nothing this engine
        # stores is found by another engine, or by this one after a restart.
        logger.warning(
            "kvrpc.chunk_keys = 'block_hashes' with --prefix-caching-hash-algo %s and no "
            "PYTHONHASHSEED: vLLM's block hashes differ in every engine process, so kvrpc's "
            "stored chunks hit only within this run; set PYTHONHASHSEED to share them",
            algo,
        )
    return chunk_size // hash_block_size


class KvrpcConnector(KVConnectorBase_V1):  # type: ignore[misc]
    """kvrpc as vLLM's KV connector; configured by ``kvrpc.*`` keys (see :mod:`.settings`)."""

    def __init__(
        self,
        vllm_config: VllmConfig,
        role: KVConnectorRole,
        kv_cache_config: KVCacheConfig | None = None,
    ) -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        transfer_config = vllm_config.kv_transfer_config
        self.settings = ConnectorSettings.from_extra_config(
            transfer_config.kv_connector_extra_config
        )
        if kv_cache_config is not None and len(kv_cache_config.kv_cache_groups) > 1:
            raise KVConfigError(
                f"this model has {len(kv_cache_config.kv_cache_groups)} KV cache groups (a "
                "hybrid model); kvrpc moves one: start vLLM with "
                "--disable-hybrid-kv-cache-manager, or use a model with full attention only"
            )
        settings = self.settings
        urls = settings.urls or [default_url()]
        self.engine_id = _engine_id(transfer_config)
        self.block_size = int(vllm_config.cache_config.block_size)
        self.model_name = settings.model_name or str(vllm_config.model_config.model)
        parallel = vllm_config.parallel_config
        world_size, rank = int(parallel.world_size), int(parallel.rank)
        tp = int(parallel.tensor_parallel_size)
        self.use_mla = bool(getattr(vllm_config.model_config, "use_mla", False))
        if len(urls) > world_size:
            raise KVConfigError(
                f"kvrpc.url lists {len(urls)} servers for {world_size} vLLM ranks; give one "
                "per host, in host order (see docs/vllm.md, 'Several hosts')"
            )
        ranks = kv_ranks(world_size, rank, tp, self.use_mla, len(urls))
        self.kv_world_size, self.kv_rank, self.is_kv_writer = (
            ranks.world_size,
            ranks.rank,
            ranks.writer,
        )
        self._stats: dict[str, int] = {}
        options: dict[str, Any] = {
            "timeout": settings.timeout,
            "connect_timeout": settings.connect_timeout,
            "keepalive_interval": settings.keepalive_interval,
            "auth_token_file": settings.auth_token_file,
        }
        self.scheduler: SchedulerAdapter | None = None
        self.worker: WorkerAdapter | None = None
        self.events: BlockEvents | None = None
        self.event_feed: EventFeed | None = None
        # The requests the plan knows, for their vLLM block hashes (only with KV events).
        self._requests: dict[str, Request] = {}
        self._hashes_per_block = 0  # vLLM's block hashes per block; 0: it names none
        if role == KVConnectorRole.SCHEDULER:
            if getattr(transfer_config, "kv_load_failure_policy", "recompute") == "fail":
                # vLLM reads the policy right after making this connector. kvrpc is a
                # cache: a chunk it cannot load is computed, never a failed request.
                logger.info("kv_load_failure_policy 'fail' -> 'recompute': kvrpc is a cache")
                transfer_config.kv_load_failure_policy = "recompute"
            self.url = ", ".join(urls)
            self.scheduler = SchedulerAdapter(
                urls,
                self.model_name,
                self.kv_world_size,
                0,
                self.block_size,
                engine_id=self.engine_id,
                lookup_timeout=settings.lookup_timeout,
                **options,
            )
            self._by_block_hashes = settings.chunk_keys == "block_hashes"
            self.plan = SchedulerPlan(
                self.scheduler.chunk_size,
                self.block_size,
                save_decode_cache=settings.save_decode_cache,
                sync_loads=settings.layerwise,
                block_hashes_per_chunk=_block_hashes_per_chunk(
                    settings, vllm_config, kv_cache_config, self.scheduler.chunk_size
                ),
            )
            self._asked: dict[str, float] = {}
            self._matched: dict[str, int] = {}
            self._start_events(vllm_config, kv_cache_config, urls, tp)
        else:
            # Picked by vLLM's own rank, which says where the process runs; the kv rank
            # does not (with MLA a whole stage shares one).
            self.url = settings.worker_url or server_for_rank(urls, rank, world_size)
            self.worker = WorkerAdapter(
                self.url,
                self.model_name,
                self.kv_world_size,
                self.kv_rank,
                self.block_size,
                retrieve_deadline=settings.retrieve_deadline,
                engine_id=self.engine_id,
                **options,
            )
            self._seen_worker_stats = _worker_counters(self.worker)
            self._failed_blocks: set[int] = set()
            self._failed_requests: set[str] = set()
            # With kvrpc.layerwise: the load errors of this step's loads, reported or not,
            # which spoil the stores of what their forward computed (see wait_for_save).
            self._step_errors: set[int] = set()
            # Synchronous (layer-wise) retrieves of the current step; names come with
            # register_kv_caches.
            self._loads = LayerLoads((), settings.timeout)
        logger.info(
            "kvrpc connector (%s) for %r at %s: kv world size %d, kv rank %d%s",
            role.name.lower(),
            self.model_name,
            self.url,
            self.kv_world_size,
            self.kv_rank,
            ", MLA" + ("" if self.is_kv_writer else " (reads only)") if self.use_mla else "",
        )

    @classmethod
    def supports_sleep_mode(cls, kv_transfer_config: Any) -> bool:
        """No: waking remaps the KV cache, and the server's mappings would be stale."""
        return False

    @classmethod
    def requires_piecewise_for_cudagraph(cls, extra_config: dict[str, Any]) -> bool:
        """True with ``kvrpc.layerwise``: a full CUDA graph would skip the per-layer waits.

        vLLM then runs attention outside the captured graphs, where ``wait_for_layer_load``
        runs before each layer reads its KV.
        """
        return ConnectorSettings.from_extra_config(extra_config).layerwise

    # ================================================================ scheduler role

    def _scheduler(self) -> SchedulerAdapter:
        assert self.scheduler is not None, "a scheduler-role method on a worker connector"
        return self.scheduler

    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        """Tokens to load beyond ``num_computed_tokens``; None while the lookup is pending.

        The flag is vLLM's ``load_kv_async``: True for a load unless ``kvrpc.layerwise``.
        """
        adapter = self._scheduler()
        request_id = request.request_id
        if self.plan.phase(request_id) is not Phase.LOOKING:
            # New, or preempted and back (its own stored chunks may hit now): look up.
            self._matched.pop(request_id, None)
            adapter.cleanup_lookup_result(request_id)
            by_blocks = self._by_block_hashes or _beyond_tokens(request)
            cached = not by_blocks or bool(self.plan.block_hashes_per_chunk)
            hashes = self.plan.begin(
                request_id,
                request.all_token_ids,
                request.num_prompt_tokens,
                getattr(request, "cache_salt", None),
                request.block_hashes if by_blocks and cached else None,
                cached=cached,
            )
            if self.events is not None:
                self._requests[request_id] = request
                self._name_chunks(request, hashes, 0)
            if not hashes:  # shorter than a chunk and a token: nothing to ask
                self._matched[request_id] = 0
            else:
                adapter.maybe_submit_lookup_request(request_id, chunk_hashes=hashes)
                self._asked[request_id] = time.monotonic()
        matched = self._matched.get(request_id)
        if matched is None:
            matched = adapter.check_lookup_result(request_id)
            if matched is None:
                if time.monotonic() - self._asked[request_id] < self.settings.lookup_timeout:
                    return None, False
                logger.warning(
                    "lookup for request %r took over %g s; computing it instead",
                    request_id,
                    self.settings.lookup_timeout,
                )
                adapter.end_session(request_id)
                self._count(lookup_failures=1)
                matched = 0
            else:
                self._count(lookups=1, lookup_tokens=request.num_prompt_tokens, hit_tokens=matched)
            self._matched[request_id] = matched
            self._asked.pop(request_id, None)
        return self.plan.answer(request_id, matched, num_computed_tokens)

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        """Learn the request's blocks; the first time, plan its retrieve and unpin early."""
        block_ids = _one_group(blocks.get_block_ids())
        request_id = request.request_id
        if request_id not in self.plan:
            return
        release = self.plan.on_alloc(request_id, block_ids, num_external_tokens)
        if release is not None:
            self._scheduler().free_lookup_locks(
                request_id, 0, release.end, chunk_hashes=release.chunk_hashes
            )

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        """The step's transfers: planned retrieves, and stores of newly completed chunks."""
        scheduled = scheduler_output.num_scheduled_tokens
        for new in scheduler_output.scheduled_new_reqs:
            self.plan.on_scheduled(
                new.req_id,
                _one_group(new.block_ids),
                new.num_computed_tokens + scheduled.get(new.req_id, 0),
                replace_blocks=True,
            )
        cached = scheduler_output.scheduled_cached_reqs
        for index, request_id in enumerate(cached.req_ids):
            self.plan.on_scheduled(
                request_id,
                _one_group(cached.new_block_ids[index]),
                cached.num_computed_tokens[index] + scheduled.get(request_id, 0),
                replace_blocks=request_id in cached.resumed_req_ids,
            )
        preempted = frozenset(getattr(scheduler_output, "preempted_req_ids", None) or ())
        transfers = self.plan.take_transfers()
        if self.events is not None:
            for transfer in transfers:
                request = self._requests.get(transfer.request_id)
                op = transfer.op
                if not transfer.retrieve and request is not None and op.chunk_hashes:
                    self._name_chunks(request, op.chunk_hashes, op.start // self.plan.chunk_size)
        return KvrpcConnectorMetadata(transfers, preempted)

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        """Learn the workers' load errors: the chunks vLLM computes again are stored again.

        vLLM has already set the requests holding those blocks back to the first of them
        (a request's end is ``request_finished``, nothing to learn here).
        """
        invalid = getattr(connector_output, "invalid_block_ids", None)
        if invalid:
            self.plan.on_load_errors(invalid)

    def request_finished(
        self, request: Request, block_ids: list[int]
    ) -> tuple[bool, dict[str, Any] | None]:
        """End the request's server session; hold its blocks until the workers report."""
        request_id = request.request_id
        self.plan.finish(request_id)
        self._requests.pop(request_id, None)
        self._asked.pop(request_id, None)
        self._matched.pop(request_id, None)
        self._scheduler().end_session(request_id)
        # Always held: every worker reports every finished request (at once when it stored
        # nothing), and vLLM frees only held requests when they are reported.
        return True, None

    def take_events(self) -> Iterable[KVCacheEvent]:
        """The vLLM events for what the kvrpc servers stored and let go of since the last call.

        ``BlockStored`` and ``BlockRemoved`` with ``medium`` ``CPU`` (kvrpc's L1) or
        ``STORAGE`` (its lower tiers) and ``ownership`` ``kvrpc:<tier>``, in vLLM's block
        hashes where the connector saw the chunk's request, else by kvrpc's chunk hash (see
        :mod:`.block_events`). Never waits and never raises: the events were read by the
        feed's threads, and each call turns at most :data:`EVENT_HASHES_PER_STEP` of them.
        Empty unless ``kvrpc.kv_events`` is on (by default, when vLLM publishes KV events).
        """
        events, feed = self.events, self.event_feed
        if events is None or feed is None:
            return ()
        try:
            for server, item in feed.take(EVENT_HASHES_PER_STEP):
                if item is None:
                    events.resubscribed(server)
                else:
                    events.feed(server, item)
            return [_vllm_event(event) for event in events.take()]
        except Exception:  # an event lost is a router's miss; vLLM's step must go on
            logger.exception("turning kvrpc's events into vLLM's failed")
            return ()

    def reset_cache(self) -> bool | None:
        """Drop the server's unpinned chunks along with vLLM's own prefix cache."""
        try:
            cleared = self._scheduler().clear()
        except Exception as exc:
            logger.warning("resetting the kvrpc cache failed: %s", exc)
            return False
        logger.info("reset the kvrpc cache: %d chunks dropped", cleared)
        return True

    def _start_events(
        self,
        vllm_config: VllmConfig,
        kv_cache_config: KVCacheConfig | None,
        urls: list[str],
        tensor_parallel: int,
    ) -> None:
        """Subscribe to the servers' ``kv.events`` if ``kvrpc.kv_events`` says so."""
        settings = self.settings
        enabled = settings.kv_events
        if enabled is None:  # vLLM publishes connector events only when it publishes its own
            config = getattr(vllm_config, "kv_events_config", None)
            enabled = bool(config is not None and config.enable_kv_cache_events)
        if not enabled:
            return
        hash_block_size = getattr(kv_cache_config, "hash_block_size", None) or self.block_size
        if self.block_size % hash_block_size:
            logger.warning(
                "vLLM hashes blocks of %d tokens in blocks of %d: kvrpc's KV events name "
                "chunks by their kvrpc hashes only",
                hash_block_size,
                self.block_size,
            )
            self._hashes_per_block = 0
        else:
            self._hashes_per_block = self.block_size // hash_block_size
        parallel = vllm_config.parallel_config
        self.events = BlockEvents(
            self.model_name,
            self.kv_world_size,
            expected_ranks(int(parallel.world_size), tensor_parallel, self.use_mla, len(urls)),
            max_chunks=settings.kv_events_chunks,
            unnamed=settings.kv_events_unnamed,
        )
        self.event_feed = EventFeed(
            urls,
            connect_timeout=settings.connect_timeout,
            auth_token_file=settings.auth_token_file,
        )
        self.event_feed.start()
        logger.info("telling vLLM's KV-events publisher what %s holds", ", ".join(urls))

    def _name_chunks(self, request: Request, hashes: Sequence[bytes], first: int) -> None:
        """Tell the events table vLLM's names for the request's chunks ``first`` onwards."""
        events = self.events
        if events is None or not self._hashes_per_block or first >= len(hashes):
            return
        lora = getattr(request, "lora_request", None)
        names = chunk_names(
            request.block_hashes,
            request.all_token_ids,
            first,
            len(hashes),
            chunk_size=self.plan.chunk_size,
            block_size=self.block_size,
            hashes_per_block=self._hashes_per_block,
            lora_id=None if lora is None else lora.adapter_id,
            lora_name=None if lora is None else lora.name,
        )
        for chunk_hash, named in zip(hashes[first:], names, strict=False):
            events.name(chunk_hash, named)

    # ================================================================ worker role

    def _worker(self) -> WorkerAdapter:
        assert self.worker is not None, "a worker-role method on a scheduler connector"
        return self.worker

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        """Register vLLM's per-layer KV tensors with the server, in the layout they are in."""
        worker = self._worker()
        names = list(kv_caches)
        kind, physical = vllm_layout([kv_caches[name] for name in names])
        mode = self.settings.transfer_mode
        if mode == "auto":
            mode = "cuda_ipc" if physical[0].device.type == "cuda" else "inline"
        worker.transfer_mode = mode
        worker.register_kv_caches(dict(zip(names, physical, strict=True)), kind)
        # The server numbers layers in the order registered; vLLM waits for them by name.
        self._loads.set_layers(names)
        logger.info("registered %d KV layers (%s, %s) with kvrpc", len(names), kind.value, mode)

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        """Submit this step's retrieves.

        Asynchronous loads complete between steps and are reported by :meth:`get_finished`.
        With ``kvrpc.layerwise`` vLLM calls this before the forward and the retrieves go
        out layer-wise; :meth:`wait_for_layer_load` waits for them.
        """
        layerwise = self.settings.layerwise
        if layerwise:
            # Left over only if vLLM skipped the end of a step; never carried into this one.
            self._settle_loads()
            self._step_errors = set()
        transfers = [t for t in self._metadata().transfers if t.retrieve]
        if not transfers:
            return
        request_ids = [t.request_id for t in transfers]
        written = [b for t in transfers for b in t.written_block_ids(self.block_size)]
        try:
            progress = self._worker().batched_submit_retrieve_requests(
                request_ids, [t.op for t in transfers], layerwise=layerwise
            )
        except Exception as exc:  # nothing was submitted: recompute all of it, never wait
            logger.error("retrieve of %d requests refused: %s", len(transfers), exc)
            if not layerwise:  # a synchronous load is never reported finished (see get_finished)
                self._failed_requests.update(request_ids)
            # Not the blocks it skips: those are vLLM's own, valid, and maybe shared.
            self._failed_blocks.update(written)
            if layerwise:
                self._step_errors.update(written)
            return
        if layerwise:
            self._loads.add(progress, written)

    def wait_for_layer_load(self, layer_name: str) -> None:
        """Block until layer ``layer_name`` of this step's synchronous loads is in.

        Only with ``kvrpc.layerwise``; otherwise loads are asynchronous and finished before
        the request computes, and this returns at once. Waits at most ``kvrpc.timeout``; a
        load that failed or timed out is a load error (vLLM recomputes its blocks). A name
        kvrpc did not register waits for the whole loads. Never raises.
        """
        if not len(self._loads):
            return
        try:
            failed = self._loads.wait_for_layer(layer_name)
        except Exception as exc:
            # An exception here would stop vLLM's forward; a load nobody can vouch for is a
            # load error instead.
            logger.error("waiting for layer %r of a KV load failed: %s", layer_name, exc)
            failed = self._loads.abandon()
        self._failed_blocks |= failed
        self._step_errors |= failed

    def save_kv_layer(
        self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any
    ) -> None:
        """Nothing: a step's stores are submitted together in :meth:`wait_for_save`."""
        return

    def wait_for_save(self) -> None:
        """Submit this step's stores (after the forward wrote their blocks); never waits.

        With ``kvrpc.layerwise`` it first settles the step's loads: what the forward did not
        wait for is waited for now, so that its errors are reported in this step. A request
        whose load failed in this step is not stored: its forward read the failed blocks,
        and vLLM computes it again from the first of them, whose chunks the scheduler then
        stores (see :meth:`update_connector_output`).
        """
        self._settle_loads()
        if not self.is_kv_writer:
            return
        metadata = self._metadata()
        transfers = [t for t in metadata.transfers if not t.retrieve]
        if transfers and self._step_errors:
            spoiled = {
                t.request_id
                for t in metadata.transfers
                if t.retrieve
                and not self._step_errors.isdisjoint(t.written_block_ids(self.block_size))
            }
            if spoiled:
                logger.debug("not storing %d requests whose load failed", len(spoiled))
                transfers = [t for t in transfers if t.request_id not in spoiled]
        if not transfers:
            return
        try:
            self._worker().batched_submit_store_requests(
                [t.request_id for t in transfers], [t.op for t in transfers]
            )
        except Exception as exc:  # a store is a cache fill: losing it costs a later miss
            logger.error("store of %d requests refused: %s", len(transfers), exc)

    def handle_preemptions(self, kv_connector_metadata: KVConnectorMetadata) -> None:
        """Let stores reading a preempted request's blocks finish before vLLM reuses them."""
        preempted: frozenset[str] = getattr(kv_connector_metadata, "preempted", frozenset())
        if preempted and not self._worker().wait_for_stores(
            sorted(preempted), self.settings.timeout
        ):
            logger.warning("stores of preempted requests still running after the timeout")

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        """(requests whose stores are all done, requests whose retrieves are all done).

        With ``kvrpc.layerwise`` no request is ever a finished retrieve: vLLM takes one only
        from a request waiting for remote KV, which a synchronously loaded one never is (for
        a running request its scheduler fails an assertion; for a finished one it would free
        the blocks its stores may still read).
        """
        self._settle_loads()
        stores, retrieves = self._worker().get_finished(finished_req_ids)
        if self.settings.layerwise:
            return stores or None, None
        if self._failed_requests:
            retrieves |= self._failed_requests
            self._failed_requests = set()
        return stores or None, retrieves or None

    def get_block_ids_with_load_errors(self) -> set[int]:
        """Blocks a retrieve could not fill since the last call: vLLM recomputes them.

        A synchronous load's errors come in the step whose forward read its blocks.
        """
        self._settle_loads()
        failed = self._worker().get_block_ids_with_load_errors()
        if self._failed_blocks:
            failed |= self._failed_blocks
            self._failed_blocks = set()
        return failed

    def _settle_loads(self) -> None:
        """End of the forward: the step's synchronous loads are settled and forgotten.

        vLLM calls wait_for_save, get_finished and get_block_ids_with_load_errors after the
        forward, wait_for_save last when a draft model runs after the target model; the
        first of them settles, so the errors are in before vLLM asks for them. The
        adapter's own errors are taken here too (each load has settled or was given up on,
        so they are all in): ``wait_for_save`` needs the step's errors, whenever it runs.
        """
        if not self.settings.layerwise:
            return
        failed = self._loads.settle() if len(self._loads) else set()
        failed |= self._worker().get_block_ids_with_load_errors()
        self._failed_blocks |= failed
        self._step_errors |= failed

    def _metadata(self) -> KvrpcConnectorMetadata:
        metadata = self._get_connector_metadata()
        assert isinstance(metadata, KvrpcConnectorMetadata)
        return metadata

    # ================================================================ both roles

    def get_kv_connector_stats(self) -> KVConnectorStats | None:
        """The counters since the last call (lookups and hits, or bytes moved), or None."""
        if self.worker is not None:
            now = _worker_counters(self.worker)
            self._count(**{k: now[k] - self._seen_worker_stats[k] for k in now})
            self._seen_worker_stats = now
        if not any(self._stats.values()):
            return None
        data, self._stats = self._stats, {}
        return KvrpcConnectorStats(data=data)

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> KVConnectorStats:
        """The stats object for a dict of counters (how vLLM rebuilds the workers' stats)."""
        return KvrpcConnectorStats(data=dict(data or {}))

    @classmethod
    def build_prom_metrics(
        cls,
        vllm_config: VllmConfig,
        metric_types: dict[type, type],
        labelnames: list[str],
        per_engine_labelvalues: dict[int, list[object]],
    ) -> KvrpcPromMetrics:
        """The stats as ``vllm:kvrpc_*`` counters on vLLM's ``/metrics`` (see :mod:`.prom`).

        vLLM's Prometheus stat logger calls this once and feeds every stats payload it logs
        to the result; the labels are vLLM's own (``model_name``, ``engine``).
        """
        return KvrpcPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    def shutdown(self) -> None:
        """Close the adapter (unregistering a worker's KV cache) and the event feed."""
        if self.event_feed is not None:
            self.event_feed.close()
        if self.worker is not None:
            self.worker.shutdown()
        if self.scheduler is not None:
            self.scheduler.close()

    def _count(self, **counts: int) -> None:
        for key, value in counts.items():
            self._stats[key] = self._stats.get(key, 0) + value


def _engine_id(transfer_config: Any) -> str:
    """The engine id vLLM made (a uuid, in KVTransferConfig), or a fresh one where it has none.

    vLLM's ids are uuids, free of the ``/`` that kvrpc puts between an engine id and a
    request id; any other ``/`` is replaced, so that the scoping stays unambiguous. A fresh
    id is this process's own: the workers' then differ from the scheduler's, so their
    retrieves leave the request's pins to its end_session instead of releasing them.
    """
    engine_id = getattr(transfer_config, "engine_id", None)
    if not engine_id:
        engine_id = uuid.uuid4().hex
        logger.info("vLLM gave no engine id; kvrpc scopes this engine's requests by %s", engine_id)
    return str(engine_id).replace("/", "_")


def _vllm_event(event: StoredBlocks | RemovedBlocks) -> KVCacheEvent:
    """``event`` as vLLM's own type, its hashes as vLLM's publisher sends its own.

    ``maybe_convert_block_hash`` makes them 64-bit ints where vLLM is told to
    (``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES``), as it does for its GPU blocks.
    """
    hashes = [maybe_convert_block_hash(h) for h in event.block_hashes]
    if isinstance(event, RemovedBlocks):
        return BlockRemoved(
            block_hashes=hashes, medium=event.medium, group_idx=0, ownership=event.ownership
        )
    parent = event.parent_block_hash
    return BlockStored(
        block_hashes=hashes,
        parent_block_hash=None if parent is None else maybe_convert_block_hash(parent),
        token_ids=list(event.token_ids),
        block_size=event.block_size,
        lora_id=event.lora_id,
        medium=event.medium,
        lora_name=event.lora_name,
        group_idx=0,
        ownership=event.ownership,
    )


def _one_group(block_ids: tuple[list[int], ...] | None) -> list[int]:
    if not block_ids:
        return []
    if len(block_ids) > 1:
        raise KVConfigError(
            "vLLM gave blocks of several KV cache groups; start it with "
            "--disable-hybrid-kv-cache-manager"
        )
    return list(block_ids[0])


def _worker_counters(worker: WorkerAdapter) -> dict[str, int]:
    return dataclasses.asdict(worker.stats)
