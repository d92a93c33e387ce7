"""The vLLM connector's engine-free parts: its plan, its settings and its layout detection.

No vLLM, no server, no loop: these are the rules ``KvrpcConnector`` follows, tested as plain
functions (the connector under vLLM's own scheduler is tested in tests/vllm_scheduler).
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from kvrpc.errors import KVConfigError
from kvrpc.integrations.vllm.layouts import vllm_layout
from kvrpc.integrations.vllm.plan import KVRanks, Phase, SchedulerPlan, kv_ranks
from kvrpc.integrations.vllm.settings import ConnectorSettings
from kvrpc.kv.keys import hashes_from_tokens
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


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"kvrpc.timout": 1}, r"unknown key 'kvrpc.timout'.*kvrpc\.timeout"),
        ({"kvrpc.timeout": 0}, r"kvrpc\.timeout = 0: .*accepted: float > 0"),
        ({"kvrpc.transfer_mode": "rdma"}, r"kvrpc\.transfer_mode = 'rdma'.*'inline'"),
        ({"kvrpc.save_decode_cache": "maybe"}, r"kvrpc\.save_decode_cache = 'maybe'"),
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
