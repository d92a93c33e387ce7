"""How the service settles a DMA store, whose checksums the CPU folds after its copy.

A DMA store's chunks may be committed before their checksums are folded (a handler saw the
copy's completion event first, and a lookup sent then must find them); they get their
checksums as the folds end, unless their slot was filled again meanwhile. Driven here
through :meth:`KVService._settle_cuda_store` with a state of the tests' own and a fold
future resolved by hand, from a thread as the engine's fold threads do: the GPU copy that
comes before is checked on the GPU (``cuda`` tests in tests/test_kv_cuda.py).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading

import pytest
import torch

from kvrpc.errors import KVConfigError
from kvrpc.kv import integrity
from kvrpc.kv.server.copy_plan import Transfer
from kvrpc.kv.server.records import StorePlan
from kvrpc.kv.server.service import KVService

from .test_state import LAYOUT, SLOT, hashes, keys_for, make_state, pool_of, register, rows

LANES = torch.tensor([[1, 2], [3, 4]], dtype=torch.int64)


def dma_store(
    service: KVService, folded: concurrent.futures.Future[None]
) -> tuple[StorePlan, Transfer]:
    """Two chunks reserved, and the DMA transfer the engine would have made for them."""
    state = service.state
    instance = register(state)
    plan = state.begin_store(instance, keys_for(instance, hashes(2, 1)), rows(2))
    slots = [slot for _, slot in plan.reserved]
    transfer = Transfer([], LAYOUT, rows(2), pool_of(state).buffer, slots, SLOT, checksum=True)
    transfer.checksums = LANES.clone()
    transfer.folded = folded
    return plan, transfer


def checksums_of(service: KVService, plan: StorePlan) -> list[int | None]:
    pool = pool_of(service.state)
    return [pool.checksum(slot) for _, slot in plan.reserved]


def resolve_from_a_thread(folded: concurrent.futures.Future[None], error: bool = False) -> None:
    if error:
        thread = threading.Thread(target=folded.set_exception, args=(RuntimeError("fold"),))
    else:
        thread = threading.Thread(target=folded.set_result, args=(None,))
    thread.start()
    thread.join()


def service_of_its_own() -> KVService:
    service = KVService(chunk_size=8)
    service.state = make_state(slots=4)
    return service


async def test_a_dma_store_whose_folds_ended_commits_with_its_checksums() -> None:
    service = service_of_its_own()
    folded: concurrent.futures.Future[None] = concurrent.futures.Future()
    folded.set_result(None)
    plan, transfer = dma_store(service, folded)

    service._settle_cuda_store(plan, transfer, None)

    assert checksums_of(service, plan) == integrity.combine(LANES)
    assert service.state.stats(0)["checksums_late"] == 0


async def test_a_dma_store_settled_before_its_folds_is_found_at_once_and_summed_after() -> None:
    service = service_of_its_own()
    folded: concurrent.futures.Future[None] = concurrent.futures.Future()
    plan, transfer = dma_store(service, folded)

    service._settle_cuda_store(plan, transfer, None)

    assert service.state.stats(0)["chunks"] == 2  # visible now
    assert checksums_of(service, plan) == [None, None]
    resolve_from_a_thread(folded)
    await asyncio.sleep(0)  # one loop turn: the thread handed the addition to the loop first
    assert checksums_of(service, plan) == integrity.combine(LANES)
    assert service.state.stats(0)["checksums_late"] == 2


async def test_a_dma_store_whose_fold_failed_keeps_its_chunks_without_checksums() -> None:
    service = service_of_its_own()
    folded: concurrent.futures.Future[None] = concurrent.futures.Future()
    plan, transfer = dma_store(service, folded)

    service._settle_cuda_store(plan, transfer, None)
    resolve_from_a_thread(folded, error=True)
    await asyncio.sleep(0)

    assert checksums_of(service, plan) == [None, None]
    stats = service.state.stats(0)
    assert (stats["chunks"], stats["checksums_late"], stats["checksums_missed"]) == (2, 0, 2)


def test_the_store_path_is_kernels_unless_dma_is_asked_for_and_nothing_else_is_taken() -> None:
    assert KVService().gpu.store_copies == "kernels"
    assert KVService(store_copies="dma").gpu.store_copies == "dma"
    with pytest.raises(KVConfigError, match="'kernels', 'dma'"):
        KVService(store_copies="gpu")
