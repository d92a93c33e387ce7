"""CUDA handles on the wire: events and shared tensors travel anywhere, CUDA work needs a GPU.

A :class:`CudaEventHandle` (msgpack ext 5) and a :class:`CudaIPCWrapper` (ext 6) are plain
values: built, compared and (de)serialized in any process, so CPU-only code can carry them.
Opening one, or making a CUDA future, raises :class:`CudaUnavailable` where there is no GPU.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import msgpack
import pytest
import torch

from kvrpc.codec import decode, encode_request, encode_response
from kvrpc.cuda import (
    CudaEventHandle,
    device_by_uuid,
    device_uuid,
    new_ipc_event,
    require_cuda,
)
from kvrpc.errors import CudaUnavailable, KVConfigError, PayloadValidationError
from kvrpc.futures import CUDAMessagingFuture, MessagingFuture
from kvrpc.kv import protocols as kv
from kvrpc.kv.client import RetrieveProgress
from kvrpc.kv.cuda_ipc import CudaIPCWrapper
from kvrpc.kv.keys import KeyBatch
from kvrpc.kv.layout import KVLayout, LayoutKind
from kvrpc.kv.outcomes import KeyStatus
from kvrpc.kv.protocols import CudaCopyReply, KVCacheRegistration
from kvrpc.kv.shm import SharedTensorRef
from kvrpc.kv.stamps import StampedEvent

UUID = "GPU-5f1c2a9e-0b7d-4e3a-9c61-2d8f0e4b7a13"
HANDLE = bytes(range(64))

no_gpu_only = pytest.mark.skipif(
    torch.cuda.is_available(), reason="checks the behaviour of a process without CUDA"
)


def on_the_wire(frames: list[Any]) -> list[bytes]:
    """The frames as a socket delivers them: fresh, read-only ``bytes``."""
    return [bytes(memoryview(f)) for f in frames]


def wrapper(**changes: Any) -> CudaIPCWrapper:
    """A wrapper as a worker would send it, with made-up handle bytes."""
    made = CudaIPCWrapper(
        device_uuid=UUID,
        shape=(2, 64, 16, 8, 128),
        dtype="bfloat16",
        handle=b"\x11" * 66,
        storage_size=2 * 64 * 16 * 8 * 128 * 2,
        storage_offset=0,
        ref_counter_handle=b"\x22" * 66,
        ref_counter_offset=3,
        event_handle=b"\x33" * 64,
        event_sync_required=True,
    )
    return dataclasses.replace(made, **changes)


def keys(count: int = 2) -> KeyBatch:
    return KeyBatch.from_hashes("model", 2, 1, [bytes([i]) * 32 for i in range(count)])


# ------------------------------------------------------------------ CudaEventHandle


def test_event_handle_survives_serialize_and_deserialize() -> None:
    handle = CudaEventHandle(UUID, HANDLE)
    data = handle.serialize()
    assert isinstance(data, bytes)
    again = CudaEventHandle.deserialize(data)
    assert again == handle
    assert (again.device_uuid, again.handle) == (UUID, HANDLE)


def test_event_handles_are_values_equal_by_uuid_and_handle() -> None:
    handle = CudaEventHandle(UUID, HANDLE)
    assert handle == CudaEventHandle(UUID, bytes(HANDLE))
    assert handle != CudaEventHandle(UUID, bytes(64))
    assert handle != CudaEventHandle("GPU-other", HANDLE)
    assert len({handle, CudaEventHandle(UUID, HANDLE)}) == 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        handle.handle = bytes(64)  # type: ignore[misc]


def test_event_handle_travels_as_itself_in_a_store_cuda_request() -> None:
    handle = CudaEventHandle(UUID, HANDLE)
    block_ids = torch.tensor([[3, 4], [9, 1]], dtype=torch.int64)
    args = (b"client-id-123456", 7, keys(), block_ids, handle)

    message = decode(on_the_wire(encode_request(5, kv.STORE_CUDA.name, args)))
    validated = kv.STORE_CUDA.validate_payload(message.payload)

    assert message.name == "kv.store_cuda"
    assert type(validated[4]) is CudaEventHandle
    assert validated[4] == handle
    assert validated[:3] == args[:3]
    assert torch.equal(validated[3], block_ids)


@pytest.mark.parametrize("deadline", [None, 0.25])
def test_event_handle_travels_in_a_retrieve_cuda_request_with_or_without_deadline(
    deadline: float | None,
) -> None:
    handle = CudaEventHandle(UUID, HANDLE)
    args = (b"client-id-123456", 7, ["r1", "r2"], keys(), torch.zeros(2, 3, dtype=torch.int64))
    message = decode(
        on_the_wire(encode_request(6, kv.RETRIEVE_CUDA.name, (*args, handle, deadline)))
    )
    validated = kv.RETRIEVE_CUDA.validate_payload(message.payload)
    assert validated[5] == handle
    assert validated[6] == deadline


def test_event_handle_is_ext_type_5_on_the_wire() -> None:
    handle = CudaEventHandle(UUID, HANDLE)
    frames = on_the_wire(encode_response(1, handle))
    found: list[int] = []

    def hook(code: int, data: bytes) -> Any:
        found.append(code)
        return msgpack.ExtType(code, data)

    msgpack.unpackb(frames[0], ext_hook=hook, raw=False, strict_map_key=False)
    assert 5 in found
    assert decode(frames).payload == handle


@pytest.mark.parametrize("size", [0, 63, 65, 128])
def test_an_event_handle_is_exactly_64_bytes(size: int) -> None:
    with pytest.raises(ValueError, match="64 bytes"):
        CudaEventHandle(UUID, bytes(size))


def test_an_event_handle_needs_bytes_and_a_device_uuid() -> None:
    with pytest.raises(ValueError, match="64 bytes"):
        CudaEventHandle(UUID, bytearray(64))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="UUID"):
        CudaEventHandle("", HANDLE)


@pytest.mark.parametrize(
    "data",
    [
        b"",  # no header
        b"\x05GPU-1" + bytes(10),  # a handle of 10 bytes
        b"\x02\xff\xfe" + bytes(64),  # a uuid that is not UTF-8
        b"\x00" + bytes(64),  # no uuid
        b"\x40GPU",  # a uuid longer than the data
    ],
)
def test_a_malformed_serialized_event_handle_is_a_value_error(data: bytes) -> None:
    with pytest.raises(ValueError):
        CudaEventHandle.deserialize(data)


# ------------------------------------------------------------------ CudaIPCWrapper


def test_ipc_wrapper_survives_serialize_and_deserialize() -> None:
    made = wrapper()
    again = CudaIPCWrapper.deserialize(made.serialize())
    assert again == made
    assert type(again.shape) is tuple
    assert again.nbytes == 2 * 64 * 16 * 8 * 128 * 2


@pytest.mark.parametrize(
    "changes",
    [
        {"event_handle": b"", "event_sync_required": False},
        {"dtype": "float8_e4m3fn", "shape": (100, 16, 576), "storage_offset": 4096},
    ],
    ids=["no-event", "fp8-mla"],
)
def test_ipc_wrapper_of_any_dtype_and_event_survives_serialize(changes: dict[str, Any]) -> None:
    made = wrapper(**changes)
    assert CudaIPCWrapper.deserialize(made.serialize()) == made


def test_ipc_wrapper_travels_as_itself_in_a_message() -> None:
    made = wrapper()
    frames = on_the_wire(encode_response(3, [made, wrapper(ref_counter_offset=9)]))
    assert decode(frames).payload == [made, wrapper(ref_counter_offset=9)]


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x02" + msgpack.packb([]),  # a version this kvrpc does not read
        b"\x01\xc1",  # not msgpack
        b"\x01" + msgpack.packb([UUID, [1, 2]]),  # too few fields
        b"\x01" + msgpack.packb("hello"),
    ],
    ids=["empty", "version", "not-msgpack", "few-fields", "not-a-list"],
)
def test_garbage_is_not_an_ipc_wrapper(data: bytes) -> None:
    with pytest.raises(ValueError, match="malformed CudaIPCWrapper"):
        CudaIPCWrapper.deserialize(data)


@pytest.mark.parametrize("dtype", ["complex64", "half", "no_such_dtype"])
def test_an_ipc_wrapper_of_a_dtype_that_is_no_kv_dtype_is_malformed(dtype: str) -> None:
    data = wrapper(dtype=dtype).serialize()
    with pytest.raises(ValueError, match="malformed CudaIPCWrapper"):
        CudaIPCWrapper.deserialize(data)


def test_a_truncated_ipc_wrapper_is_malformed() -> None:
    data = wrapper().serialize()
    with pytest.raises(ValueError, match="malformed CudaIPCWrapper"):
        CudaIPCWrapper.deserialize(data[: len(data) // 2])


@pytest.mark.parametrize(
    "tensor",
    [
        torch.zeros(2, 4, 4, 1, 8, dtype=torch.bfloat16),
        torch.zeros(8, 8).t(),  # non-contiguous: still refused for being on the CPU first
        torch.zeros(16)[4:],
    ],
    ids=["contiguous", "transposed", "offset"],
)
def test_ipc_wrapper_from_a_cpu_tensor_is_a_config_error(tensor: torch.Tensor) -> None:
    with pytest.raises(KVConfigError, match="this one is on cpu"):
        CudaIPCWrapper.from_tensor(tensor)


def test_ipc_wrapper_from_something_that_is_no_tensor_is_a_config_error() -> None:
    with pytest.raises(KVConfigError, match="CUDA tensors"):
        CudaIPCWrapper.from_tensor([1, 2, 3])  # type: ignore[arg-type]


# ------------------------------------------------------------------ KV messages carrying them


def test_a_cuda_copy_reply_without_an_event_survives_the_wire() -> None:
    reply = CudaCopyReply(
        statuses=[KeyStatus.OK, KeyStatus.NOT_IN_CACHE], detail="not in the cache"
    )
    payload = decode(on_the_wire(encode_response(1, reply))).payload
    assert kv.RETRIEVE_CUDA.validate_response(payload) == reply


def test_key_statuses_travel_as_ints_and_an_unknown_one_is_refused() -> None:
    reply = CudaCopyReply(statuses=[KeyStatus.OK, KeyStatus.NO_FREE_SLOT], detail="full")
    payload = decode(on_the_wire(encode_response(1, reply))).payload
    assert payload["statuses"] == [0, 3] and type(payload["statuses"][1]) is int
    validated = kv.STORE_CUDA.validate_response(payload)
    assert validated.statuses == [KeyStatus.OK, KeyStatus.NO_FREE_SLOT]
    assert type(validated.statuses[1]) is KeyStatus and validated.failed() == [1]
    with pytest.raises(PayloadValidationError):
        kv.STORE_CUDA.validate_response({**payload, "statuses": [0, 99]})
    with pytest.raises(PayloadValidationError):
        kv.STORE_CUDA.validate_response({**payload, "statuses": ["OK"]})


def test_a_cuda_copy_reply_with_its_event_survives_the_wire() -> None:
    reply = CudaCopyReply(statuses=[KeyStatus.OK], cuda_event=CudaEventHandle(UUID, HANDLE))
    payload = decode(on_the_wire(encode_response(1, reply))).payload
    validated = kv.STORE_CUDA.validate_response(payload)
    assert validated == reply
    assert type(validated.cuda_event) is CudaEventHandle


def test_a_cuda_ipc_registration_survives_the_wire_with_its_ready_events() -> None:
    spec = KVCacheRegistration(
        model_name="model",
        world_size=1,
        worker_id=0,
        block_size=16,
        mode="cuda_ipc",
        layout=KVLayout(LayoutKind.PAGED, 2, (2, 64, 16, 8, 128), "bfloat16"),
        cuda_tensors=[wrapper(), wrapper(handle=b"\x44" * 66)],
        ready_events=[CudaEventHandle(UUID, HANDLE), CudaEventHandle(UUID, bytes(64))],
    )
    args = (b"client-id-123456", spec)
    message = decode(on_the_wire(encode_request(2, kv.REGISTER_KV_CACHE.name, args)))
    validated = kv.REGISTER_KV_CACHE.validate_payload(message.payload)
    assert validated[1] == spec
    assert all(type(w) is CudaIPCWrapper for w in validated[1].cuda_tensors)
    assert validated[1].ready_events == spec.ready_events


# ------------------------------------------------------------------ without a GPU


@no_gpu_only
def test_cuda_futures_need_cuda() -> None:
    future: MessagingFuture[int] = MessagingFuture()
    with pytest.raises(CudaUnavailable, match="CUDA"):
        CUDAMessagingFuture(future)
    with pytest.raises(CudaUnavailable, match="CUDA"):
        future.to_cuda_future()
    with pytest.raises(CudaUnavailable, match="CUDA"):
        future.to_cuda_future(device=0)


@no_gpu_only
def test_opening_or_making_cuda_handles_needs_cuda() -> None:
    with pytest.raises(CudaUnavailable, match="a widget needs a CUDA build of torch"):
        require_cuda("a widget")
    with pytest.raises(CudaUnavailable, match="CUDA"):
        CudaEventHandle(UUID, HANDLE).open()
    with pytest.raises(CudaUnavailable, match="CUDA"):
        new_ipc_event()
    with pytest.raises(CudaUnavailable, match="CUDA"):
        device_uuid()
    with pytest.raises(CudaUnavailable, match="CUDA"):
        device_by_uuid(UUID)
    with pytest.raises(CudaUnavailable, match="CUDA"):
        wrapper().to_tensor()


def test_a_layer_copy_reply_with_its_events_survives_the_wire() -> None:
    handles = [CudaEventHandle("GPU-0000", bytes([i]) * 64) for i in range(3)]
    reply = kv.LayerCopyReply(
        statuses=[KeyStatus.OK, KeyStatus.NOT_IN_CACHE],
        detail="not in the cache",
        layer_events=handles,
        stamps=SharedTensorRef("kvrpc-1-00ff", 0, (512,), "int64"),
        first_turn=1 << 40,
    )
    frames = encode_response(5, reply.model_dump())
    decoded = decode(frames)
    assert kv.LayerCopyReply.model_validate(decoded.payload) == reply


# ---------------------------------------------------------------------- retrieve progress
# RetrieveProgress's rules without a server: the adapter answers it as the server's reply
# and the completion arrive (a layer-wise reply carries events that a GPU would complete).


def test_a_layerwise_retrieve_with_a_refused_key_has_no_complete_layer() -> None:
    # The refused chunk's blocks stay unwritten, so no layer is whole, whatever its event.
    progress = RetrieveProgress(2)
    gate = StampedEvent(CudaEventHandle("GPU-0000", bytes(64)).open)
    progress._answer([gate, gate], whole=False)
    assert not progress.wait_layer(0, timeout=0.05)
    assert not progress.wait_layer(1, timeout=0.05)
    progress._finish(False)
    assert progress.done() and not progress.wait(0)


def test_a_retrieve_without_layer_events_completes_every_layer_at_once() -> None:
    progress = RetrieveProgress(3)
    assert not progress.wait_layer(2, timeout=0.01)  # nothing answered yet
    progress._finish(True)
    assert all(progress.wait_layer(layer, timeout=0) for layer in range(3))
    with pytest.raises(ValueError, match=r"layer 3 is not in 0\.\.2"):
        progress.wait_layer(3)
