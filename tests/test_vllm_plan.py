"""The vLLM connector's engine-free parts: its plan, its settings and its layout detection.

No vLLM, no server, no loop: these are the rules ``KvrpcConnector`` follows, tested as plain
functions (the connector under vLLM's own scheduler is tested in tests/vllm_scheduler).
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import threading

import pytest
import torch

from kvrpc.errors import KVConfigError
from kvrpc.integrations.vllm.layer_loads import LayerLoads
from kvrpc.integrations.vllm.layouts import vllm_layout
from kvrpc.integrations.vllm.plan import KVRanks, Phase, SchedulerPlan, Transfer, kv_ranks
from kvrpc.integrations.vllm.settings import ConnectorSettings
from kvrpc.kv.client.completions import Completions
from kvrpc.kv.client.ledger import RequestLedger
from kvrpc.kv.client.progress import RetrieveProgress
from kvrpc.kv.keys import hashes_from_block_hashes, hashes_from_tokens
from kvrpc.kv.layout import LayoutKind

CHUNK, BLOCK = 64, 16
PER_CHUNK = CHUNK // BLOCK


def plan() -> SchedulerPlan:
    return SchedulerPlan(CHUNK, BLOCK)


def tokens(n: int, first: int = 1) -> list[int]:
    return list(range(first, first + n))


# ---------------------------------------------------------------------- lookups


def test_a_lookup_asks_for_whole_chunks_short_of_the_last_token() -> None:
    p = plan()
    assert len(p.begin("r", tokens(200), 200)) == 3  # 199 lookable tokens: 3 chunks
    assert len(p.begin("r", tokens(193), 193)) == 3
    assert len(p.begin("r", tokens(192), 192)) == 2  # the last token must be computed
    assert p.begin("r", tokens(64), 64) == []


def test_the_hashes_looked_up_are_the_token_chain_under_the_salt() -> None:
    p = plan()
    assert p.begin("r", tokens(200), 200) == hashes_from_tokens(tokens(192), CHUNK)
    salted = p.begin("s", tokens(200), 200, cache_salt="tenant")
    assert salted == hashes_from_tokens(tokens(192), CHUNK, "tenant")
    assert set(salted).isdisjoint(hashes_from_tokens(tokens(192), CHUNK))


@pytest.mark.parametrize(
    ("matched", "local", "load"), [(192, 0, 192), (192, 80, 112), (128, 192, 0), (0, 48, 0)]
)
def test_what_loads_is_the_server_hit_beyond_vllms_own(matched: int, local: int, load: int) -> None:
    p = plan()
    p.begin("r", tokens(300), 300)
    assert p.on_lookup("r", matched, local) == load


def test_a_hit_that_is_not_whole_looked_up_chunks_is_refused() -> None:
    p = plan()
    p.begin("r", tokens(200), 200)
    with pytest.raises(ValueError, match="whole"):
        p.on_lookup("r", 100, 0)
    with pytest.raises(ValueError, match="whole"):
        p.on_lookup("r", 256, 0)


# ---------------------------------------------------------------------- retrieves


def test_a_retrieve_starts_at_the_chunk_holding_vllms_last_token_and_skips_its_blocks() -> None:
    p = plan()
    p.begin("r", tokens(300), 300)
    p.on_lookup("r", 192, 80)
    release = p.on_alloc("r", list(range(100, 120)), 112)
    (transfer,) = p.take_transfers()
    op = transfer.op
    assert transfer.retrieve and transfer.request_id == "r"
    assert (op.start, op.end, op.block_offset, op.skip_first_n_tokens) == (64, 192, 4, 16)
    assert list(op.block_ids) == list(range(104, 112))  # only the blocks of chunks 1 and 2
    assert len(op.chunk_hashes or ()) == 3
    # Block 4 holds tokens 64..79, vLLM's own: the first the retrieve may write is block 5.
    assert op.first_written_block(BLOCK) == 5
    assert release is not None and release.end == 64  # chunk 0 is vLLM's: unpin it now
    assert list(release.chunk_hashes) == p.begin("x", tokens(300), 300)[:1]


def test_nothing_to_load_unpins_every_hit_chunk_at_once() -> None:
    p = plan()
    p.begin("r", tokens(300), 300)
    p.on_lookup("r", 128, 192)
    release = p.on_alloc("r", list(range(19)), 0)
    assert p.take_transfers() == []
    assert release is not None and release.end == 128


def test_a_retrieve_is_planned_once_however_often_blocks_are_allocated() -> None:
    p = plan()
    p.begin("r", tokens(300), 300)
    p.on_lookup("r", 192, 0)
    p.on_alloc("r", list(range(12)), 192)
    assert p.on_alloc("r", list(range(19)), 192) is None  # after the load: more blocks
    assert [t.retrieve for t in p.take_transfers()] == [True]
    assert p.phase("r") is Phase.PLANNED


def test_the_blocks_a_retrieve_writes_leave_out_vllms_own() -> None:
    p = plan()
    p.begin("r", tokens(300), 300)
    p.on_lookup("r", 192, 80)
    p.on_alloc("r", list(range(100, 120)), 112)
    (retrieve,) = p.take_transfers()
    # Block 104 holds tokens 64..79, which vLLM computed: a failed load never names it.
    assert retrieve.written_block_ids(BLOCK) == tuple(range(105, 112))
    p.on_scheduled("r", [], 300)
    (store,) = p.take_transfers()
    assert not store.retrieve and store.written_block_ids(BLOCK) == ()


# ---------------------------------------------------------------------- synchronous loads


@pytest.mark.parametrize(
    ("sync_loads", "matched", "local", "answer"),
    [
        (False, 192, 0, (192, True)),
        (True, 192, 0, (192, False)),
        (True, 192, 80, (112, False)),
        (False, 128, 192, (0, False)),  # nothing to load is never asynchronous
        (True, 0, 0, (0, False)),
    ],
)
def test_vllm_is_told_to_load_asynchronously_unless_loads_are_synchronous(
    sync_loads: bool, matched: int, local: int, answer: tuple[int, bool]
) -> None:
    p = SchedulerPlan(CHUNK, BLOCK, sync_loads=sync_loads)
    p.begin("r", tokens(300), 300)
    assert p.answer("r", matched, local) == answer


def test_a_synchronous_load_goes_out_in_the_step_that_schedules_it_before_its_stores() -> None:
    p = SchedulerPlan(CHUNK, BLOCK, sync_loads=True)
    p.begin("r", tokens(300), 300)
    assert p.answer("r", 192, 0) == (192, False)
    blocks = list(range(100, 119))
    p.on_alloc("r", blocks, 192)  # vLLM: update_state_after_alloc, then the same step's
    p.on_scheduled("r", blocks, 300, replace_blocks=True)  # build_connector_meta
    retrieve, store = p.take_transfers()
    assert retrieve.retrieve and (retrieve.op.start, retrieve.op.end) == (0, 192)
    assert not store.retrieve and (store.op.start, store.op.end) == (192, 256)


class FakeProgress:
    """A retrieve whose layers arrive when the test says; a wait for a missing one times out."""

    def __init__(self, layers_in: int = 0, *, finished: bool = False, ok: bool = True) -> None:
        self.layers_in, self.finished, self.ok = layers_in, finished, ok
        self.waits: list[tuple[str, int | None, float | None]] = []

    def wait_layer(self, layer: int, timeout: float | None = None) -> bool:
        self.waits.append(("layer", layer, timeout))
        return self.ok and layer < self.layers_in

    def wait(self, timeout: float | None = None) -> bool:
        self.waits.append(("whole", None, timeout))
        return self.finished and self.ok

    def give_up(self) -> bool:
        return not self.finished


LAYERS = ["model.layers.0.self_attn.attn", "model.layers.1.self_attn.attn"]


def test_each_layer_waits_for_its_own_layer_and_a_whole_load_is_then_forgotten() -> None:
    loads = LayerLoads(LAYERS, timeout=2.0)
    progress = FakeProgress(layers_in=1)
    loads.add(progress, [5, 6])
    assert loads.wait_for_layer(LAYERS[0]) == set()
    assert progress.waits[0][:2] == ("layer", 0)
    assert 0 < (progress.waits[0][2] or 0) <= 2.0
    assert len(loads) == 1  # layer 1 still to come
    progress.layers_in, progress.finished = 2, True
    assert loads.wait_for_layer(LAYERS[1]) == set()
    assert len(loads) == 0
    assert loads.settle() == set()
    assert loads.wait_for_layer(LAYERS[0]) == set()  # nothing pending: no wait at all
    assert len(progress.waits) == 4


def test_a_failed_load_is_dropped_and_its_blocks_left_to_the_adapter() -> None:
    loads = LayerLoads(LAYERS, timeout=2.0)
    loads.add(FakeProgress(finished=True, ok=False), [5, 6])
    # Settled: the adapter reports exactly the blocks it could not fill.
    assert loads.wait_for_layer(LAYERS[0]) == set()
    assert len(loads) == 0


def test_a_load_still_running_when_the_wait_times_out_is_a_load_error_whole() -> None:
    loads = LayerLoads(LAYERS, timeout=0.5)
    loads.add(FakeProgress(layers_in=0), [5, 6])
    assert loads.wait_for_layer(LAYERS[0]) == {5, 6}
    assert len(loads) == 0
    assert loads.settle() == set()  # reported once


def test_a_layer_kvrpc_did_not_register_waits_for_the_whole_loads() -> None:
    loads = LayerLoads(LAYERS, timeout=2.0)
    whole, running = FakeProgress(finished=True), FakeProgress(layers_in=2)
    loads.add(whole, [1])
    loads.add(running, [2, 3])
    assert loads.wait_for_layer("model.layers.0.mlp") == {2, 3}  # whole: timed out
    assert [kind for kind, _, _ in whole.waits + running.waits] == ["whole", "whole"]
    assert len(loads) == 0


def test_a_load_the_forward_did_not_wait_for_on_every_layer_is_a_load_error_at_the_end() -> None:
    skipped, waited = LayerLoads(LAYERS), LayerLoads(LAYERS)
    progress = [FakeProgress(layers_in=2), FakeProgress(layers_in=2)]
    skipped.add(progress[0], [7, 8])
    waited.add(progress[1], [7, 8])
    skipped.wait_for_layer(LAYERS[0])
    for name in LAYERS:
        waited.wait_for_layer(name)
    for each in progress:  # the whole retrieves complete after the forward
        each.finished = True
    assert skipped.settle() == {7, 8}  # layer 1 may have read its blocks too early
    assert waited.settle() == set()
    assert len(skipped) == len(waited) == 0


# The adapter's own settling (its Completions and RequestLedger, no server): a failed
# block is a load error once per load, whichever of the wait and the settle comes first.


def settling_adapter() -> tuple[Completions, RequestLedger]:
    ledger = RequestLedger()
    return Completions(ledger, timeout=1.0, forgotten=lambda: None), ledger


def settle_failed(done: Completions, progress: RetrieveProgress, rows: list[list[int]]) -> None:
    """The adapter settles a retrieve that filled none of its chunks (no usable reply)."""
    done.retrieve_settled(["r"], ["r"] * len(rows), torch.tensor(rows), None, progress)


def test_a_load_a_wait_gave_up_on_is_not_reported_again_when_the_adapter_settles_it() -> None:
    done, ledger = settling_adapter()
    progress = RetrieveProgress(len(LAYERS))
    ledger.retrieves_sent(["r"])
    loads = LayerLoads(LAYERS, timeout=0.0)  # the wait times out: no reply has come
    loads.add(progress, [4, 5, 6, 7])
    assert loads.wait_for_layer(LAYERS[0]) == {4, 5, 6, 7}  # the forward goes on without it
    settle_failed(done, progress, [[4, 5], [6, 7]])  # then the adapter settles it, failed
    assert ledger.take_load_errors() == set()  # already reported by the wait
    assert loads.settle() == set()
    assert ledger.finished(set())[1] == {"r"}  # settled all the same


def test_a_load_the_adapter_settled_before_the_wait_is_reported_by_the_adapter_alone() -> None:
    done, ledger = settling_adapter()
    progress = RetrieveProgress(len(LAYERS))
    ledger.retrieves_sent(["r"])
    loads = LayerLoads(LAYERS, timeout=0.0)
    loads.add(progress, [4, 5, 6, 7])
    settle_failed(done, progress, [[6, 7]])  # one chunk failed; [4, 5] is vLLM's, say
    assert loads.wait_for_layer(LAYERS[0]) == set()
    assert loads.settle() == set()
    assert ledger.take_load_errors() == {6, 7}


def test_a_wait_timing_out_as_the_adapter_settles_reports_each_block_once() -> None:
    # Both orders, and the one in between (the adapter recording its errors as the wait
    # gives up): over many rounds each failed block is reported by exactly one side.
    done, ledger = settling_adapter()
    for round_ in range(300):
        progress = RetrieveProgress(len(LAYERS))
        ledger.retrieves_sent(["r"])
        loads = LayerLoads(LAYERS, timeout=0.0)
        loads.add(progress, [4, 5, 6, 7])
        start = threading.Barrier(2)

        def settle(progress: RetrieveProgress = progress, start: threading.Barrier = start) -> None:
            start.wait()
            settle_failed(done, progress, [[4, 5], [6, 7]])

        settler = threading.Thread(target=settle)
        settler.start()
        start.wait()
        by_wait = loads.wait_for_layer(LAYERS[0])
        settler.join()
        by_wait |= loads.settle()
        by_adapter = ledger.take_load_errors()
        assert by_wait.isdisjoint(by_adapter), f"round {round_}: {by_wait} and {by_adapter}"
        assert by_wait | by_adapter == {4, 5, 6, 7}


def test_a_load_that_failed_after_the_forward_skipped_a_layer_is_a_load_error_whole() -> None:
    loads = LayerLoads(LAYERS)
    progress = FakeProgress(layers_in=2)
    loads.add(progress, [7, 8, 9])
    loads.wait_for_layer(LAYERS[0])  # layer 1 reads without waiting
    progress.finished, progress.ok = True, False  # the adapter reports its failed chunk's
    assert loads.settle() == {7, 8, 9}  # the filled blocks may have been read too early


def test_settling_waits_for_a_load_still_running_and_abandoning_never_waits() -> None:
    loads = LayerLoads(LAYERS, timeout=0.2)
    loads.add(FakeProgress(layers_in=2), [1, 2])
    assert loads.settle() == {1, 2}  # never finished within the timeout
    loads.add(FakeProgress(layers_in=2), [3])
    assert loads.abandon() == {3}
    assert len(loads) == 0


# ---------------------------------------------------------------------- stores


def test_each_chunk_is_stored_once_in_the_step_that_completes_it() -> None:
    p = plan()
    p.begin("r", tokens(300), 300)
    p.on_lookup("r", 0, 0)
    p.on_alloc("r", list(range(100, 119)), 0)
    p.on_scheduled("r", list(range(100, 119)), 100, replace_blocks=True)
    (first,) = p.take_transfers()
    assert not first.retrieve
    assert (first.op.start, first.op.end, list(first.op.block_ids)) == (0, 64, [100, 101, 102, 103])
    p.on_scheduled("r", [], 120)  # no chunk completed
    assert p.take_transfers() == []
    p.on_scheduled("r", [], 300)
    (second,) = p.take_transfers()
    assert (second.op.start, second.op.end, second.op.block_offset) == (64, 256, 4)
    assert list(second.op.block_ids) == list(range(104, 116))


def test_the_hit_chunks_are_not_stored_again() -> None:
    p = plan()
    p.begin("r", tokens(300), 300)
    p.on_lookup("r", 128, 0)
    p.on_alloc("r", list(range(19)), 128)
    p.take_transfers()
    p.on_scheduled("r", list(range(19)), 300, replace_blocks=True)
    (store,) = p.take_transfers()
    assert (store.op.start, store.op.end) == (128, 256)


def test_decode_chunks_are_stored_only_when_asked() -> None:
    for save_decode, stored_to in ((False, 128), (True, 192)):
        p = SchedulerPlan(CHUNK, BLOCK, save_decode_cache=save_decode)
        grown = tokens(130)
        p.begin("r", grown, 130)
        p.on_lookup("r", 0, 0)
        p.on_alloc("r", list(range(9)), 0)
        p.on_scheduled("r", list(range(9)), 130, replace_blocks=True)
        grown.extend(range(70))  # decoding adds tokens to the request's own list
        p.on_scheduled("r", list(range(9, 13)), 199)
        transfers = p.take_transfers()
        assert transfers[-1].op.end == stored_to
        # A decode chunk hashes like a prompt chunk: a later prompt with these tokens hits it.
        assert list(transfers[-1].op.chunk_hashes or ()) == hashes_from_tokens(
            grown[:stored_to], CHUNK
        )


def block_hashes(n: int, seed: str = "a") -> list[bytes]:
    """``n`` made-up engine block hashes (vLLM's are prefix-chained; the plan only reads them)."""
    return [hashlib.sha256(f"{seed}:{i}".encode()).digest() for i in range(n)]


def test_chunks_keyed_by_the_engines_block_hashes_use_each_chunks_last_one() -> None:
    p = SchedulerPlan(CHUNK, BLOCK, block_hashes_per_chunk=PER_CHUNK)
    engine = block_hashes(12)  # 200 tokens: 12 whole blocks of 16
    looked_up = p.begin("r", tokens(200), 200, block_hashes=engine)
    assert looked_up == hashes_from_block_hashes(engine[:12], PER_CHUNK)  # 3 chunks
    assert set(looked_up).isdisjoint(hashes_from_tokens(tokens(192), CHUNK))
    # The tokens do not enter: other tokens under the same block hashes give the same keys.
    assert p.begin("s", tokens(200, first=7), 200, block_hashes=engine) == looked_up
    # Tokens still key the requests given no block hashes, in the same plan.
    assert p.begin("t", tokens(200), 200) == hashes_from_tokens(tokens(192), CHUNK)


def test_decode_chunks_keyed_by_block_hashes_wait_for_the_engine_to_hash_their_blocks() -> None:
    p = SchedulerPlan(CHUNK, BLOCK, save_decode_cache=True, block_hashes_per_chunk=PER_CHUNK)
    grown, engine = tokens(130), block_hashes(8)
    p.begin("r", grown, 130, block_hashes=engine)
    p.on_lookup("r", 0, 0)
    p.on_alloc("r", list(range(13)), 0)
    p.on_scheduled("r", list(range(13)), 130, replace_blocks=True)
    assert stored_ranges(p.take_transfers()) == [(0, 128)]
    grown.extend(range(70))
    p.on_scheduled("r", [], 199)  # chunk 2 is computed, but vLLM has not hashed its blocks
    assert p.take_transfers() == []
    engine.extend(block_hashes(4, "b"))  # now it has
    p.on_scheduled("r", [], 200)
    (store,) = p.take_transfers()
    assert (store.op.start, store.op.end) == (128, 192)
    assert list(store.op.chunk_hashes or ()) == hashes_from_block_hashes(engine, PER_CHUNK)


def test_a_request_not_cached_is_never_looked_up_nor_stored() -> None:
    p = SchedulerPlan(CHUNK, BLOCK, save_decode_cache=True)
    grown = tokens(300)
    assert p.begin("r", grown, 300, cached=False) == []
    p.on_lookup("r", 0, 0)
    p.on_alloc("r", list(range(19)), 0)
    p.on_scheduled("r", list(range(19)), 300, replace_blocks=True)
    grown.extend(range(100))
    p.on_scheduled("r", list(range(19, 25)), 400)
    assert p.take_transfers() == []


def test_block_hashes_need_a_plan_that_knows_how_many_make_a_chunk() -> None:
    with pytest.raises(ValueError, match="block_hashes_per_chunk"):
        plan().begin("r", tokens(200), 200, block_hashes=block_hashes(12))


def stored_ranges(transfers: list[Transfer]) -> list[tuple[int, int]]:
    return [(t.op.start, t.op.end) for t in transfers if not t.retrieve]


@pytest.mark.parametrize("budgets", [[300], [100, 300], [150, 200, 300]])
def test_chunks_recomputed_after_a_failed_load_are_stored_again_once(budgets: list[int]) -> None:
    p = SchedulerPlan(CHUNK, BLOCK, sync_loads=True)
    p.begin("r", tokens(300), 300)
    p.answer("r", 192, 0)
    blocks = list(range(100, 119))
    p.on_alloc("r", blocks, 192)
    p.on_scheduled("r", blocks, 300, replace_blocks=True)  # the load's step
    assert stored_ranges(p.take_transfers()) == [(192, 256)]
    # Block 105 (tokens 80..95, in chunk 1) failed to load: vLLM computes the request again
    # from token 80, in steps of up to ``budgets``; chunk 0 stays as loaded.
    p.on_load_errors({105, 110})
    stored: list[tuple[int, int]] = []
    for computed_after in [*budgets, 300, 301, 302]:  # then it decodes
        p.on_scheduled("r", [], computed_after)
        stored += stored_ranges(p.take_transfers())
    chunks = [c for start, end in stored for c in range(start // CHUNK, end // CHUNK)]
    assert chunks == [1, 2, 3]  # from the failed block's chunk on, each once, in order
    assert stored[0][0] == 64


def test_an_asynchronous_load_that_partly_failed_stores_what_vllm_computes_instead() -> None:
    p = plan()
    p.begin("r", tokens(300), 300)
    assert p.answer("r", 192, 0) == (192, True)
    p.on_alloc("r", list(range(100, 119)), 192)
    p.take_transfers()
    p.on_load_errors({108})  # chunk 2's first block: vLLM keeps the first 128 tokens
    # The load is reported finished; vLLM schedules it as new from token 128.
    p.on_scheduled("r", list(range(100, 119)), 300, replace_blocks=True)
    assert stored_ranges(p.take_transfers()) == [(128, 256)]


def test_load_errors_in_no_stored_chunk_of_a_request_change_nothing() -> None:
    p = plan()
    p.begin("r", tokens(300), 300)
    p.on_lookup("r", 128, 0)
    p.on_alloc("r", list(range(100, 119)), 128)
    p.take_transfers()
    p.begin("looking", tokens(300), 300)  # no blocks yet
    p.on_load_errors({112, 999})  # chunk 2 (not on the server yet) and someone else's
    p.on_scheduled("r", list(range(100, 119)), 300, replace_blocks=True)
    assert stored_ranges(p.take_transfers()) == [(128, 256)]
    p.on_load_errors(set())
    p.on_scheduled("r", [], 301)
    assert p.take_transfers() == []


def test_a_finished_request_is_forgotten_with_its_unsent_transfers() -> None:
    p = plan()
    p.begin("r", tokens(300), 300)
    p.on_lookup("r", 192, 0)
    p.on_alloc("r", list(range(19)), 192)
    assert p.finish("r") is True
    assert p.take_transfers() == [] and "r" not in p
    assert p.finish("never") is False


def test_a_preempted_request_starts_over_with_new_blocks() -> None:
    p = plan()
    p.begin("r", tokens(300), 300)
    p.on_lookup("r", 0, 0)
    p.on_alloc("r", list(range(19)), 0)
    p.on_scheduled("r", list(range(19)), 256, replace_blocks=True)
    p.take_transfers()
    p.begin("r", tokens(300), 300)  # back through a lookup: it may hit its own chunks
    assert p.phase("r") is Phase.LOOKING
    assert p.on_lookup("r", 256, 0) == 256
    p.on_alloc("r", list(range(50, 69)), 256)
    (retrieve,) = p.take_transfers()
    assert list(retrieve.op.block_ids) == list(range(50, 66))


# ---------------------------------------------------------------------- ranks


def test_every_rank_is_its_own_kv_rank_and_stores() -> None:
    assert [kv_ranks(4, r, 2, use_mla=False) for r in range(4)] == [
        KVRanks(4, r, True) for r in range(4)
    ]


def test_with_mla_a_pipeline_stage_is_one_kv_rank_stored_by_its_first_rank() -> None:
    # TP=2, PP=2: vLLM ranks 0, 1 are stage 0 and ranks 2, 3 stage 1.
    assert [kv_ranks(4, r, 2, use_mla=True) for r in range(4)] == [
        KVRanks(2, 0, True),
        KVRanks(2, 0, False),
        KVRanks(2, 1, True),
        KVRanks(2, 1, False),
    ]


# ---------------------------------------------------------------------- settings


def test_settings_take_kvrpc_keys_and_leave_others_alone() -> None:
    settings = ConnectorSettings.from_extra_config(
        {"kvrpc.url": "unix:///tmp/x.sock", "kvrpc.timeout": 3, "lmcache.mp.port": 1}
    )
    assert settings.url == "unix:///tmp/x.sock" and settings.timeout == 3.0
    assert ConnectorSettings.from_extra_config(None) == ConnectorSettings()
    assert ConnectorSettings().layerwise is False  # loads stay asynchronous unless asked
    assert ConnectorSettings.from_extra_config({"kvrpc.layerwise": True}).layerwise


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"kvrpc.timout": 1}, r"unknown key 'kvrpc.timout'.*kvrpc\.timeout"),
        ({"kvrpc.timeout": 0}, r"kvrpc\.timeout = 0: .*accepted: float > 0"),
        ({"kvrpc.transfer_mode": "rdma"}, r"kvrpc\.transfer_mode = 'rdma'.*'inline'"),
        ({"kvrpc.save_decode_cache": "maybe"}, r"kvrpc\.save_decode_cache = 'maybe'"),
        ({"kvrpc.layerwise": "sometimes"}, r"kvrpc\.layerwise = 'sometimes'.*bool"),
    ],
)
def test_a_bad_setting_names_the_key_and_what_it_accepts(
    extra: dict[str, object], message: str
) -> None:
    with pytest.raises(KVConfigError, match=message):
        ConnectorSettings.from_extra_config(extra)


# ---------------------------------------------------------------------- layouts


def _views_of_one_buffer(order: tuple[int, ...], layers: int = 2) -> list[torch.Tensor]:
    """[B, H, N, C] views of one buffer in the memory order ``order``, as vLLM 0.3x makes."""
    logical = (8, 2, 16, 32)
    physical = tuple(logical[i] for i in order)
    buffer = torch.zeros(layers, *physical)
    inverse = tuple(order.index(i) for i in range(4))
    return [buffer[layer].permute(inverse) for layer in range(layers)]


@pytest.mark.parametrize(
    ("order", "kind"),
    [
        ((0, 2, 1, 3), LayoutKind.BNHC),
        ((0, 1, 2, 3), LayoutKind.BHNC),
        ((1, 0, 2, 3), LayoutKind.HBNC),
    ],
)
def test_vllm_4d_views_map_to_the_kind_of_their_memory_order(
    order: tuple[int, ...], kind: LayoutKind
) -> None:
    views = _views_of_one_buffer(order)
    found, physical = vllm_layout(views)
    assert found is kind
    assert all(t.is_contiguous() for t in physical)
    assert physical[1].data_ptr() == views[1].data_ptr()  # the same memory, not a copy


def test_flash_attention_and_flashinfer_shapes_and_their_hnd_variants() -> None:
    nhd = torch.zeros(2, 8, 16, 2, 32)
    hnd = torch.zeros(2, 8, 2, 16, 32).permute(0, 1, 3, 2, 4)
    blocks_first = torch.zeros(8, 2, 16, 2, 32)
    blocks_first_hnd = torch.zeros(8, 2, 2, 16, 32).permute(0, 1, 3, 2, 4)
    mla = torch.zeros(8, 16, 64)
    assert vllm_layout([nhd])[0] is LayoutKind.PAGED
    assert vllm_layout([hnd])[0] is LayoutKind.PAGED_HND
    assert vllm_layout([blocks_first])[0] is LayoutKind.BLOCKS_FIRST
    assert vllm_layout([blocks_first_hnd])[0] is LayoutKind.BLOCKS_FIRST_HND
    assert vllm_layout([mla])[0] is LayoutKind.MLA


def test_a_layout_whose_blocks_interleave_layers_is_refused_with_what_to_configure() -> None:
    # Block-outermost (BLNHC): each block holds every layer's page, so a layer is strided.
    buffer = torch.zeros(8, 2, 16, 2, 32)  # [B, L, N, H, C]
    layers = [buffer[:, layer].permute(0, 2, 1, 3) for layer in range(2)]
    with pytest.raises(KVConfigError, match=r"shape \[8, 2, 16, 32\].*VLLM_KV_CACHE_LAYOUT"):
        vllm_layout(layers)


def test_layers_in_different_layouts_are_refused() -> None:
    with pytest.raises(KVConfigError, match="every layer must be in one layout"):
        vllm_layout([torch.zeros(2, 8, 16, 2, 32), torch.zeros(8, 2, 16, 2, 32)])


def test_importing_the_integration_does_not_import_vllm() -> None:
    code = (
        "import sys, kvrpc, kvrpc.integrations.vllm as v; "
        "assert 'vllm' not in sys.modules; print(v.ConnectorSettings().timeout)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "10.0"
