"""Specification of the sans-IO wire codec: messages to frames and back, and bad input."""

from __future__ import annotations

import array
import re
import struct
import subprocess
import sys
import warnings
from dataclasses import dataclass
from typing import Any

import msgpack
import pydantic
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvrpc import codec
from kvrpc.codec import (
    MAX_EXT_NESTING,
    OOB_THRESHOLD,
    WIRE_VERSION,
    Message,
    MessageKind,
    decode,
    encode,
    encode_error,
    encode_request,
    encode_response,
    message_size,
    peek,
    register_ext,
)
from kvrpc.errors import EncodeError, ProtocolError, VersionMismatch

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Ext codes this module registers. The ext table is process-global and has no unregister, so
# every code used here is unique to this file (100-127) and registered once, at import.
_POINT_CODE = 100
_NEVER_REGISTERED_CODE = 101  # tests check that failed registrations leave it free
_RESERVED_UNUSED_CODE = 50  # in kvrpc's own range, and not used by kvrpc


@dataclass(frozen=True)
class Point:
    x: int
    y: int


_POINT = struct.Struct("<qq")
register_ext(
    _POINT_CODE,
    Point,
    lambda p: _POINT.pack(p.x, p.y),
    lambda data: Point(*_POINT.unpack(data)),
)


class Item(pydantic.BaseModel):
    name: str
    count: int
    tags: tuple[str, ...] = ()


# ------------------------------------------------------------------------------- helpers


def on_the_wire(frames: list[Any]) -> list[bytes]:
    """The frames as a socket delivers them: fresh, read-only ``bytes``."""
    return [bytes(memoryview(f)) for f in frames]


def assert_same(got: Any, expected: Any) -> None:
    """Equal, and of the very same types all the way down (True is not 1, tuple is not list)."""
    assert type(got) is type(expected), (got, expected)
    if isinstance(expected, list | tuple):
        assert len(got) == len(expected)
        for g, e in zip(got, expected, strict=True):
            assert_same(g, e)
    elif isinstance(expected, dict):
        assert list(got) == list(expected)
        for key in expected:
            assert_same(got[key], expected[key])
    elif isinstance(expected, torch.Tensor):
        assert got.dtype == expected.dtype and got.shape == expected.shape
        assert torch.equal(got, expected)
    else:
        assert got == expected


def header_prefix(*items: Any, length: int = 5) -> bytes:
    """A header's bytes up to some element: an array marker of ``length``, then ``items``."""
    packer = msgpack.Packer(use_bin_type=True)
    return packer.pack_array_header(length) + b"".join(packer.pack(i) for i in items)


def big(n: int = OOB_THRESHOLD, fill: int = 0x5A) -> bytes:
    return bytes([fill]) * n


# ----------------------------------------------------------------------------- round trip

PAYLOADS = [
    None,
    True,
    False,
    0,
    -1,
    2**63 - 1,
    -(2**63),
    2**64 - 1,
    1.5,
    float("inf"),
    -0.0,
    "",
    "héllo ✓",
    b"",
    b"small",
    big(),
    [],
    (),
    {},
    [1, "two", 3.0, None],
    (1, (2, (3, ()))),
    [(1, 2), [3, (4,)]],
    {"a": (1, 2), "b": [{"c": (None,)}], "d": {}},
    {"blob": big(5000), "meta": ("x", big(OOB_THRESHOLD + 1))},
    ((big(),), [big(2048, 1), (big(3000, 2),)]),
    [Point(1, -2), (Point(3, 4),), {"p": Point(0, 0)}],
]


@pytest.mark.parametrize("payload", PAYLOADS, ids=repr)
def test_response_round_trips_every_wire_type(payload: Any) -> None:
    frames = encode_response(7, payload)
    for delivered in (frames, on_the_wire(frames)):
        message = decode(delivered)
        assert message.kind is MessageKind.RESPONSE
        assert message.request_id == 7
        assert message.name == ""
        assert_same(message.payload, payload)


@pytest.mark.parametrize("payload", PAYLOADS, ids=repr)
def test_request_arguments_arrive_as_a_tuple_of_the_same_values(payload: Any) -> None:
    frames = encode_request(2**40, "kv.lookup", [payload, "second"])
    message = decode(on_the_wire(frames))
    assert message.kind is MessageKind.REQUEST
    assert message.request_id == 2**40
    assert message.name == "kv.lookup"
    assert_same(message.payload, (payload, "second"))


def test_request_without_arguments_has_an_empty_tuple_payload() -> None:
    message = decode(encode_request(0, "rpc.ping", ()))
    assert message == Message(MessageKind.REQUEST, 0, "rpc.ping", ())


def test_error_response_carries_status_code_type_name_and_message() -> None:
    message = decode(encode_error(9, 1, "ValueError", "bad value: 3"))
    assert message == Message(MessageKind.ERROR, 9, "", (1, "ValueError", "bad value: 3"))


@pytest.mark.parametrize(
    "message",
    [
        Message(MessageKind.REQUEST, 1, "a.b.c", (1, (2, 3), {"k": big()})),
        Message(MessageKind.RESPONSE, 2, "", [1, (2, 3)]),
        Message(MessageKind.RESPONSE, 3, "", (1, 2)),
        Message(MessageKind.RESPONSE, 4, "", None),
        Message(MessageKind.ERROR, 5, "", (1, "RemoteError", "boom")),
    ],
    ids=lambda m: m.kind.name,
)
def test_encode_is_the_inverse_of_decode(message: Message) -> None:
    decoded = decode(encode(message))
    assert decoded == message
    assert_same(decoded.payload, message.payload)


def test_message_size_counts_every_frame() -> None:
    frames = encode_response(1, [big(4096), memoryview(b"abc")])
    assert message_size(frames) == len(frames[0]) + 4096 + 3


# A nested payload of every plain wire type; bytes sizes straddle OOB_THRESHOLD.
_small_bytes = st.binary(max_size=32)
_large_bytes = st.builds(
    lambda n, fill: bytes([fill]) * n,
    st.integers(OOB_THRESHOLD - 2, 3 * OOB_THRESHOLD),
    st.integers(0, 255),
)
_int64 = st.integers(-(2**63), 2**63 - 1)
_points = st.builds(Point, _int64, _int64)  # an ext type registered by this module
_tensors = st.builds(
    lambda values, dtype, rows: torch.tensor(values, dtype=dtype).reshape(rows, -1),
    st.lists(st.integers(-100, 100), min_size=0, max_size=600).filter(lambda v: len(v) % 2 == 0),
    st.sampled_from([torch.int16, torch.int64, torch.float32, torch.bfloat16]),
    st.sampled_from([1, 2]),
)  # every CPU tensor travels as a frame of its own, empty ones included
_leaves = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | _small_bytes
    | _large_bytes
    | _points
    | _tensors
)
payloads = st.recursive(
    _leaves,
    lambda children: (
        st.lists(children, max_size=4)
        | st.lists(children, max_size=4).map(tuple)
        | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)


@FUZZ
@given(payload=payloads, request_id=st.integers(0, 2**64 - 1))
def test_any_nested_payload_round_trips_with_tuples_kept(payload: Any, request_id: int) -> None:
    frames = encode_response(request_id, payload)
    for delivered in (frames, on_the_wire(frames)):
        message = decode(delivered)
        assert message.request_id == request_id
        assert_same(message.payload, payload)


@FUZZ
@given(args=st.lists(payloads, max_size=4))
def test_any_request_arguments_round_trip(args: list[Any]) -> None:
    message = decode(on_the_wire(encode_request(1, "x.y", args)))
    assert_same(message.payload, tuple(args))


# ------------------------------------------------------------------ out-of-band buffers


def test_large_bytes_travel_out_of_band_without_copy() -> None:
    blob = big(OOB_THRESHOLD)
    frames = encode_response(1, {"blob": blob})
    assert len(frames) == 2
    assert frames[1] is blob
    assert blob not in bytes(frames[0])


def test_large_bytes_decode_as_the_frame_itself_without_copy() -> None:
    frames = on_the_wire(encode_response(1, big(OOB_THRESHOLD * 4)))
    assert decode(frames).payload is frames[1]


def test_small_bytes_stay_in_the_header() -> None:
    blob = big(OOB_THRESHOLD - 1)
    frames = encode_response(1, [blob])
    assert len(frames) == 1
    assert decode(frames).payload == [blob]


def test_large_bytearray_travels_out_of_band_and_arrives_as_bytes() -> None:
    blob = bytearray(big(OOB_THRESHOLD * 2))
    frames = encode_response(1, blob)
    assert len(frames) == 2
    assert frames[1] is blob
    payload = decode(on_the_wire(frames)).payload
    assert type(payload) is bytes
    assert payload == blob


def test_each_large_buffer_gets_its_own_frame_in_payload_order() -> None:
    first, second, third = big(fill=1), big(2000, fill=2), big(3000, fill=3)
    frames = encode_request(1, "x.y", [first, (second, {"k": third})])
    assert len(frames) == 4
    assert frames[1] is first
    assert frames[2] is second
    assert frames[3] is third


@pytest.mark.parametrize("size", [0, 3, OOB_THRESHOLD * 2])
def test_any_memoryview_travels_out_of_band_without_copy(size: int) -> None:
    view = memoryview(big(size))
    frames = encode_response(1, ("v", view))
    assert len(frames) == 2
    assert frames[1] is view


@pytest.mark.parametrize("size", [0, 3, OOB_THRESHOLD * 2])
def test_memoryview_decodes_as_memoryview(size: int) -> None:
    data = bytes(range(256)) * (size // 256) + bytes(range(size % 256))
    frames = encode_response(1, memoryview(data))
    for delivered in (frames, on_the_wire(frames)):
        payload = decode(delivered).payload
        assert type(payload) is memoryview
        assert payload.tobytes() == data


def test_memoryview_of_another_format_travels_as_its_bytes_without_copy() -> None:
    numbers = array.array("i", [1, 2, 3])
    frames = encode_response(1, memoryview(numbers))
    numbers[0] = 99  # the frame is a view of the array's memory, not a snapshot
    assert bytes(frames[1]) == numbers.tobytes()
    assert decode(frames).payload.tobytes() == numbers.tobytes()


def test_multi_dimensional_memoryview_arrives_flat_in_c_order() -> None:
    view = memoryview(bytearray(range(12))).cast("B", (3, 4))
    payload = decode(on_the_wire(encode_response(1, view))).payload
    assert payload.tobytes() == bytes(range(12))


def test_non_contiguous_memoryview_arrives_with_its_elements_in_order() -> None:
    view = memoryview(b"abcdefgh")[::2]
    payload = decode(on_the_wire(encode_response(1, view))).payload
    assert type(payload) is memoryview
    assert payload.tobytes() == b"aceg"


# ------------------------------------------------------------------------------ tensors

TENSORS = {
    "float32": torch.linspace(-3, 3, 12, dtype=torch.float32).reshape(3, 4),
    "bfloat16": torch.linspace(-3, 3, 10).to(torch.bfloat16),
    "float16": torch.tensor([[0.5, -1.25], [65504.0, 1e-3]], dtype=torch.float16),
    "int64": torch.tensor([[-(2**63), 0], [2**63 - 1, 42]], dtype=torch.int64),
    "int8": torch.arange(-128, 128, dtype=torch.int8).reshape(4, 8, 8),
    "uint8": torch.arange(256, dtype=torch.uint8),
    "bool": torch.tensor([[True, False, True], [False, False, True]]),
    "zero_dim": torch.tensor(3.25, dtype=torch.float64),
    "empty": torch.empty(0, 5, dtype=torch.float32),
    "empty_bfloat16": torch.empty(2, 0, dtype=torch.bfloat16),
    "transposed": torch.arange(24, dtype=torch.float32).reshape(4, 6).T,
    "strided_slice": torch.arange(60, dtype=torch.int32).reshape(5, 12)[1:4, ::3],
    "offset_slice": torch.arange(100, dtype=torch.int16)[37:59],
    "expanded": torch.tensor([1.0, 2.0]).expand(3, 2),
}


@pytest.mark.parametrize("tensor", TENSORS.values(), ids=TENSORS.keys())
def test_cpu_tensor_round_trips_with_dtype_and_shape(tensor: torch.Tensor) -> None:
    frames = encode_response(1, tensor)
    assert len(frames) == 2
    for delivered in (frames, on_the_wire(frames)):
        got = decode(delivered).payload
        assert isinstance(got, torch.Tensor)
        assert got.dtype == tensor.dtype
        assert got.shape == tensor.shape
        assert torch.equal(got, tensor)


def test_contiguous_cpu_tensor_travels_out_of_band_without_copy() -> None:
    tensor = torch.zeros(4, dtype=torch.int32)
    frames = encode_response(1, tensor)
    tensor[2] = 7  # the frame is a view of the tensor's memory, not a snapshot
    assert torch.frombuffer(bytearray(frames[1]), dtype=torch.int32).tolist() == [0, 0, 7, 0]


def test_conjugate_view_tensor_round_trips_with_its_values() -> None:
    tensor = torch.tensor([1 + 2j, 3 - 1j], dtype=torch.complex64)
    got = decode(encode_response(1, tensor.conj())).payload
    assert torch.equal(got, tensor.conj().resolve_conj())


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(
            lambda: torch.eye(3).to_sparse(),
            id="sparse",
        ),
        pytest.param(
            lambda: torch.nested.nested_tensor([torch.ones(2), torch.ones(3)]),
            id="nested",
        ),
        pytest.param(
            lambda: torch.quantize_per_tensor(torch.tensor([0.5, -0.3]), 0.1, 10, torch.quint8),
            id="quantized",
        ),
    ],
)
def test_cpu_tensor_without_a_plain_strided_layout_raises_encode_error(make: Any) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nested tensors warn that they are a prototype
        tensor = make()
    with pytest.raises(EncodeError):
        encode_response(1, tensor)


def test_tensor_decoded_from_read_only_frames_is_writable() -> None:
    got = decode(on_the_wire(encode_response(1, torch.zeros(4)))).payload
    got += 1  # would fail (or warn about undefined behaviour) over read-only memory
    assert torch.equal(got, torch.ones(4))


def test_tensors_nested_in_containers_round_trip() -> None:
    k, v = torch.randn(2, 3), torch.arange(5)
    message = decode(on_the_wire(encode_request(1, "kv.put", [{"k": k, "pair": (v, "x")}])))
    (arg,) = message.payload
    assert torch.equal(arg["k"], k)
    assert type(arg["pair"]) is tuple
    assert torch.equal(arg["pair"][0], v)
    assert arg["pair"][1] == "x"


def test_tensor_that_requires_grad_travels_as_its_data() -> None:
    tensor = torch.randn(3, requires_grad=True)
    got = decode(encode_response(1, tensor)).payload
    assert torch.equal(got, tensor.detach())


# ------------------------------------------------------------------- models and ext types


def test_pydantic_model_arrives_as_its_field_dict() -> None:
    payload = decode(on_the_wire(encode_response(1, Item(name="a", count=2, tags=("x",))))).payload
    assert_same(payload, {"name": "a", "count": 2, "tags": ("x",)})


def test_pydantic_model_with_large_bytes_sends_them_out_of_band() -> None:
    class Blob(pydantic.BaseModel):
        data: bytes

    blob = big(OOB_THRESHOLD * 2)
    frames = encode_request(1, "x.y", [Blob(data=blob)])
    assert len(frames) == 2
    assert decode(on_the_wire(frames)).payload == ({"data": blob},)


def test_registered_ext_type_round_trips() -> None:
    payload = (Point(2**40, -7), [Point(0, 1)])
    frames = encode_response(1, payload)
    assert len(frames) == 1
    assert_same(decode(on_the_wire(frames)).payload, payload)


def test_registering_a_taken_code_raises_value_error() -> None:
    class Other:
        pass

    with pytest.raises(ValueError, match=str(_POINT_CODE)):
        register_ext(_POINT_CODE, Other, lambda o: b"", lambda b: Other())
    with pytest.raises(EncodeError):  # and Other did not get registered under another name
        encode_response(1, Other())


def test_registering_a_class_twice_raises_value_error_and_keeps_the_new_code_free() -> None:
    with pytest.raises(ValueError, match="Point"):
        register_ext(_NEVER_REGISTERED_CODE, Point, lambda p: b"", lambda b: None)
    header = msgpack.packb([WIRE_VERSION, 1, 3, "", msgpack.ExtType(_NEVER_REGISTERED_CODE, b"")])
    with pytest.raises(ProtocolError, match="unknown ext type code"):
        decode([header])
    assert decode(encode_response(1, Point(5, 6))).payload == Point(5, 6)


@pytest.mark.parametrize("code", [0, 1, 2, 3, 50, 63])
def test_codes_below_64_are_reserved_for_classes_of_kvrpc(code: int) -> None:
    class Outsider:
        pass

    with pytest.raises(ValueError, match="64"):
        register_ext(code, Outsider, lambda o: b"", lambda b: Outsider())


@pytest.mark.parametrize("code", [0, 1, 2])
def test_codes_kvrpc_uses_itself_cannot_be_taken_even_by_kvrpc(code: int) -> None:
    insider = type("Insider", (), {"__module__": "kvrpc.fake"})
    with pytest.raises(ValueError, match="already registered"):
        register_ext(code, insider, lambda o: b"", lambda b: None)


@pytest.mark.parametrize("code", [128, 255, -1])
def test_codes_outside_0_to_127_raise_value_error(code: int) -> None:
    class Anything:
        pass

    with pytest.raises(ValueError, match="outside"):
        register_ext(code, Anything, lambda o: b"", lambda b: Anything())


class Unregistered:
    pass


@pytest.mark.parametrize(
    "payload",
    [object(), Unregistered(), {1, 2}, 1j, [1, (2, object())], {"k": Unregistered()}],
    ids=repr,
)
def test_unencodable_object_raises_encode_error(payload: Any) -> None:
    with pytest.raises(EncodeError) as info:
        encode_response(1, payload)
    assert isinstance(info.value, ProtocolError)
    assert isinstance(info.value, TypeError)
    assert "register_ext" in str(info.value)


@pytest.mark.parametrize("number", [2**64, -(2**63) - 1])
def test_int_outside_64_bits_raises_encode_error(number: int) -> None:
    with pytest.raises(EncodeError):
        encode_request(1, "x.y", [number])


def test_tensor_off_the_cpu_raises_encode_error_naming_its_device() -> None:
    meta = torch.empty(2, device="meta")
    with pytest.raises(EncodeError, match="meta"):
        encode_response(1, meta)


# ----------------------------------------------------------------------------- bad input


def test_empty_frame_list_raises_protocol_error() -> None:
    with pytest.raises(ProtocolError) as info:
        decode([])
    assert info.value.request_id is None


@FUZZ
@given(header=st.binary(max_size=200), extra=st.lists(st.binary(max_size=64), max_size=3))
def test_random_bytes_never_raise_anything_but_protocol_error(
    header: bytes, extra: list[bytes]
) -> None:
    try:
        message = decode([header, *extra])
    except ProtocolError:
        return
    assert isinstance(message, Message)  # random bytes that happen to be a valid message


_VALID = encode_request(
    2**33,
    "kv.store",
    [big(OOB_THRESHOLD), (1, "two", Point(3, 4)), {"t": torch.arange(6, dtype=torch.int16)}],
)


@FUZZ
@given(data=st.data())
def test_corrupted_valid_header_never_raises_anything_but_protocol_error(data: Any) -> None:
    header = bytearray(_VALID[0])
    for _ in range(data.draw(st.integers(1, 3))):
        index = data.draw(st.integers(0, len(header) - 1))
        header[index] = data.draw(st.integers(0, 255))
    try:
        message = decode([bytes(header), *on_the_wire(_VALID[1:])])
    except ProtocolError:
        return
    assert isinstance(message, Message)  # a corruption that still spells a valid message


def test_truncated_header_raises_protocol_error_at_every_cut_point() -> None:
    request_id = 2**40
    header = encode_request(request_id, "kv.lookup", [1, ("a", b"b"), {"c": [None, 2.5]}])[0]
    id_end = len(header_prefix(WIRE_VERSION, 0, request_id))
    for cut in range(len(header)):
        with pytest.raises(ProtocolError) as info:
            decode([header[:cut]])
        expected_id = request_id if cut >= id_end else None
        assert info.value.request_id == expected_id, cut


@pytest.mark.parametrize("version", [0, 1, 2, 99])
def test_wrong_wire_version_raises_version_mismatch_naming_both(version: int) -> None:
    header = msgpack.packb([version, 0, 5, "rpc.ping", []])
    with pytest.raises(VersionMismatch) as info:
        decode([header])
    assert re.search(rf"\b{version}\b", str(info.value))
    assert re.search(rf"\b{WIRE_VERSION}\b", str(info.value).replace(str(version), ""))
    assert isinstance(info.value, ProtocolError)


def test_version_mismatch_keeps_kind_and_request_id_so_the_peer_can_be_answered() -> None:
    header = msgpack.packb([WIRE_VERSION + 1, 0, 5, "rpc.ping", {"new": "layout"}])
    with pytest.raises(VersionMismatch) as info:
        decode([header])
    assert info.value.request_id == 5
    assert info.value.kind is MessageKind.REQUEST


def test_extra_unreferenced_frame_raises_protocol_error_with_request_id() -> None:
    frames = [*encode_response(5, "no buffers"), b"stray"]
    with pytest.raises(ProtocolError, match="buffer frames") as info:
        decode(frames)
    assert info.value.request_id == 5


def test_reference_to_a_missing_frame_raises_protocol_error_with_request_id() -> None:
    frames = encode_response(6, big())
    with pytest.raises(ProtocolError) as info:
        decode(frames[:1])
    assert info.value.request_id == 6


def _buffer_ref(index: int) -> msgpack.ExtType:
    return msgpack.ExtType(0, struct.pack("<IB", index, 0))


@pytest.mark.parametrize(
    "refs",
    [[_buffer_ref(1), _buffer_ref(1)], [_buffer_ref(0)], [_buffer_ref(2**32 - 1)]],
    ids=["same_frame_twice", "the_header_frame", "far_out_of_range"],
)
def test_bad_buffer_reference_raises_protocol_error(refs: list[Any]) -> None:
    header = msgpack.packb([WIRE_VERSION, 1, 8, "", refs])
    with pytest.raises(ProtocolError) as info:
        decode([header, big()])
    assert info.value.request_id == 8


def test_unknown_ext_code_raises_protocol_error() -> None:
    header = msgpack.packb(
        [WIRE_VERSION, 0, 11, "x.y", [msgpack.ExtType(_RESERVED_UNUSED_CODE, b"?")]]
    )
    with pytest.raises(ProtocolError, match=str(_RESERVED_UNUSED_CODE)) as info:
        decode([header])
    assert info.value.request_id == 11


def _nested_tuples(levels: int) -> msgpack.ExtType:
    """``levels`` tuple ext values, each holding the next, as a hostile peer would pack them."""
    inner = msgpack.ExtType(2, msgpack.packb([1]))
    for _ in range(levels - 1):
        inner = msgpack.ExtType(2, msgpack.packb([inner]))
    return inner


def test_tuples_nested_to_the_limit_round_trip() -> None:
    value: Any = (1,)
    for _ in range(MAX_EXT_NESTING - 1):
        value = (value,)
    assert decode(encode_response(3, value)).payload == value


def test_tuples_nested_past_the_limit_raise_encode_error() -> None:
    value: Any = (1,)
    for _ in range(MAX_EXT_NESTING):
        value = (value,)
    with pytest.raises(EncodeError, match=f"more than {MAX_EXT_NESTING} deep"):
        encode_response(3, value)


@pytest.mark.parametrize("levels", [MAX_EXT_NESTING + 1, 200, 20_000])
def test_ext_values_nested_past_the_limit_raise_protocol_error_keeping_request_id(
    levels: int,
) -> None:
    header = msgpack.packb([WIRE_VERSION, 0, 7, "rpc.echo", [_nested_tuples(levels)]])
    with pytest.raises(ProtocolError, match=f"more than {MAX_EXT_NESTING} deep") as info:
        decode([header])
    assert info.value.request_id == 7
    assert info.value.kind is MessageKind.REQUEST


def test_a_deeply_nested_message_cannot_crash_the_decoding_process() -> None:
    # Run in a child: before nesting was bounded, this overflowed the C stack (SIGSEGV) and
    # would have taken the test runner with it.
    program = (
        "import msgpack\n"
        "from kvrpc.codec import decode\n"
        "from kvrpc.errors import ProtocolError\n"
        "inner = msgpack.packb([1])\n"
        "for _ in range(2000):\n"
        "    inner = msgpack.packb([msgpack.ExtType(2, inner)])\n"
        "try:\n"
        "    decode([msgpack.packb([1, 0, 7, 'rpc.echo', [msgpack.ExtType(2, inner)]])])\n"
        "except ProtocolError as exc:\n"
        "    print('refused', exc.request_id)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, f"exit {done.returncode}: {done.stderr[-2000:]}"
    assert done.stdout.strip() == "refused 7"


@pytest.mark.parametrize("levels", [1023, 1100, 100_000])
def test_native_containers_nested_deeply_decode_or_raise_protocol_error(levels: int) -> None:
    header = msgpack.packb([WIRE_VERSION, 0, 9, "rpc.echo", []])[:-1] + b"\x91" * levels + b"\x90"
    try:
        message = decode([header])
    except ProtocolError:
        assert levels > 1023
    else:
        assert levels <= 1023 and message.request_id == 9


def _tensor_header(dtype: str, shape: list[int]) -> bytes:
    meta = msgpack.packb([1, dtype, shape])
    return msgpack.packb([WIRE_VERSION, 1, 12, "", msgpack.ExtType(1, meta)])


@pytest.mark.parametrize(
    ("dtype", "shape", "frame"),
    [
        ("float32", [4], b"\0" * 15),
        ("float32", [2, 2], b"\0" * 32),
        ("int64", [3], b"\0" * 4),
        ("nonsense", [1], b"\0" * 4),
        ("Tensor", [1], b"\0" * 4),
        ("float32", [4, 4], b""),
    ],
)
def test_tensor_frame_that_does_not_match_its_dtype_and_shape_raises_protocol_error(
    dtype: str, shape: list[int], frame: bytes
) -> None:
    with pytest.raises(ProtocolError) as info:
        decode([_tensor_header(dtype, shape), frame])
    assert info.value.request_id == 12


@pytest.mark.parametrize(
    "header",
    [
        msgpack.packb({"not": "an array"}),
        msgpack.packb([WIRE_VERSION, 0, 1, "x.y"]),
        msgpack.packb([WIRE_VERSION, 0, 1, "x.y", [], "extra"]),
        b"\xc1",
        b"",
    ],
    ids=["map", "four_elements", "six_elements", "never_used_byte", "empty"],
)
def test_header_that_is_not_a_5_element_array_raises_protocol_error(header: bytes) -> None:
    with pytest.raises(ProtocolError) as info:
        decode([header])
    assert not isinstance(info.value, VersionMismatch)


@pytest.mark.parametrize("fields", [3, 4, 6])
def test_header_of_another_length_keeps_its_request_id_so_it_can_be_answered(fields: int) -> None:
    header = [WIRE_VERSION, 0, 9, "x.y", [], "extra"][:fields]
    with pytest.raises(ProtocolError, match=f"{fields} fields") as info:
        decode([msgpack.packb(header)])
    assert info.value.request_id == 9


@pytest.mark.parametrize("fields", [3, 4, 6, 7])
def test_header_of_another_version_and_length_raises_version_mismatch(fields: int) -> None:
    header = [WIRE_VERSION + 1, 0, 9, "x.y", [], "a", "b"][:fields]
    with pytest.raises(VersionMismatch) as info:
        decode([msgpack.packb(header)])
    assert info.value.request_id == 9


@pytest.mark.parametrize("version", [True, 1.0, "1", None])
def test_wire_version_must_be_an_int(version: Any) -> None:
    with pytest.raises(ProtocolError, match="wire version") as info:
        decode([msgpack.packb([version, 0, 9, "x.y", []])])
    assert not isinstance(info.value, VersionMismatch)


@pytest.mark.parametrize("kind", [7, -1, "request", None, 1.0])
def test_unknown_message_kind_raises_protocol_error_keeping_request_id(kind: Any) -> None:
    with pytest.raises(ProtocolError, match="kind") as info:
        decode([msgpack.packb([WIRE_VERSION, kind, 5, "x.y", []])])
    assert info.value.request_id == 5
    assert info.value.kind is None


@pytest.mark.parametrize("request_id", [-1, "5", None, 1.0, [1]])
def test_bad_request_id_raises_protocol_error_without_request_id(request_id: Any) -> None:
    with pytest.raises(ProtocolError, match="request id") as info:
        decode([msgpack.packb([WIRE_VERSION, 0, request_id, "x.y", []])])
    assert info.value.request_id is None


def test_protocol_error_keeps_request_id_when_payload_is_corrupt() -> None:
    header = header_prefix(WIRE_VERSION, int(MessageKind.REQUEST), 42, "x.y") + b"\xc1"
    with pytest.raises(ProtocolError) as info:
        decode([header])
    assert info.value.request_id == 42
    assert info.value.kind is MessageKind.REQUEST


def test_protocol_error_keeps_request_id_when_name_is_not_a_string() -> None:
    with pytest.raises(ProtocolError, match="name") as info:
        decode([msgpack.packb([WIRE_VERSION, 0, 43, 7, []])])
    assert info.value.request_id == 43


def test_trailing_bytes_after_the_header_raise_protocol_error() -> None:
    header = encode_request(44, "x.y", [1])[0]
    with pytest.raises(ProtocolError, match="trailing") as info:
        decode([header + b"\x00"])
    assert info.value.request_id == 44


@pytest.mark.parametrize(
    ("kind", "payload"),
    [
        (MessageKind.REQUEST, "not a list"),
        (MessageKind.REQUEST, {"a": 1}),
        (MessageKind.ERROR, ["only the type"]),
        (MessageKind.ERROR, ["Type", "message"]),  # wire version 1's shape, without a code
        (MessageKind.ERROR, [1, "Type", "message", "extra"]),
        (MessageKind.ERROR, ["1", "Type", "message"]),
        (MessageKind.ERROR, [True, "Type", "message"]),
        (MessageKind.ERROR, [1, b"Type", "message"]),
        (MessageKind.ERROR, None),
    ],
)
def test_payload_of_the_wrong_shape_raises_protocol_error(kind: MessageKind, payload: Any) -> None:
    with pytest.raises(ProtocolError, match="shape") as info:
        decode([msgpack.packb([WIRE_VERSION, int(kind), 45, "", payload])])
    assert info.value.request_id == 45
    assert info.value.kind is kind


# ---------------------------------------------------------------------------------- peek


@pytest.mark.parametrize(
    ("frames", "expected"),
    [
        (encode_request(2**40, "kv.lookup", [big()]), (MessageKind.REQUEST, 2**40)),
        (encode_response(0, None), (MessageKind.RESPONSE, 0)),
        (encode_error(2**64 - 1, 1, "E", "m"), (MessageKind.ERROR, 2**64 - 1)),
    ],
)
def test_peek_reads_kind_and_request_id(frames: list[Any], expected: tuple[Any, Any]) -> None:
    assert peek(frames) == expected


def test_peek_needs_only_the_start_of_the_header() -> None:
    header = encode_request(77, "x.y", ["a" * 10_000])[0]
    assert peek([header[:12]]) == (MessageKind.REQUEST, 77)
    assert peek([header, b"not", b"looked", b"at"]) == (MessageKind.REQUEST, 77)


@pytest.mark.parametrize(
    "frames",
    [
        [],
        [b""],
        [b"\xc1\xc1\xc1"],
        [b"garbage that is not msgpack at all"],
        [msgpack.packb(["1", 0, 5, "x.y", []])],
        [msgpack.packb([WIRE_VERSION, 0])],
        [msgpack.packb({"a": 1})],
    ],
)
def test_peek_of_garbage_is_none_none(frames: list[bytes]) -> None:
    assert peek(frames) == (None, None)


def test_peek_reads_kind_and_request_id_of_another_wire_version() -> None:
    header = msgpack.packb([WIRE_VERSION + 1, 0, 5, "x.y", {"new": "layout"}])
    assert peek([header]) == (MessageKind.REQUEST, 5)


def test_peek_reports_what_it_can_read() -> None:
    assert peek([msgpack.packb([WIRE_VERSION, 9, 5, "x.y", []])]) == (None, 5)
    assert peek([msgpack.packb([WIRE_VERSION, 1, -5, "", None])]) == (MessageKind.RESPONSE, None)


@FUZZ
@given(header=st.binary(max_size=64))
def test_peek_never_raises(header: bytes) -> None:
    kind, request_id = peek([header])
    assert kind is None or isinstance(kind, MessageKind)
    assert request_id is None or (type(request_id) is int and request_id >= 0)


def test_decoding_leaves_no_reference_cycle_that_keeps_the_frames_alive() -> None:
    import gc
    import weakref

    class Frame(bytearray):  # bytearray itself cannot be weakly referenced
        pass

    frames = [Frame(f) for f in encode_request(1, "x.y", ((b"a" * 4096, (1, 2)),))]
    alive = weakref.ref(frames[1])
    gc.disable()  # only reference counting may free them, as it must for large payloads
    try:
        message = decode(frames)
        assert message.payload == ((b"a" * 4096, (1, 2)),)
        del message, frames
        assert alive() is None
    finally:
        gc.enable()


def test_encoding_leaves_no_reference_cycle_that_keeps_the_payload_alive() -> None:
    import gc
    import sys

    payload = bytes(8192)  # out of band, and inside a tuple, which goes through `default`
    before = sys.getrefcount(payload)
    gc.disable()  # only reference counting may free the frames, as it must for large payloads
    try:
        frames = encode_response(1, (payload, [payload]))
        assert sys.getrefcount(payload) > before
        del frames
        assert sys.getrefcount(payload) == before
    finally:
        gc.enable()


# ------------------------------------------------------------------ the stream kinds


@pytest.mark.parametrize(
    ("frames", "kind", "payload"),
    [
        (codec.encode_open(4, "t.count", 256, [3, "x"]), MessageKind.OPEN, (256, (3, "x"))),
        (
            codec.encode_items(4, [1, (2, 3), b"z" * 2000]),
            MessageKind.ITEMS,
            [1, (2, 3), b"z" * 2000],
        ),
        (codec.encode_credit(4, 128), MessageKind.CREDIT, (128,)),
        (codec.encode_cancel(4), MessageKind.CANCEL, ()),
    ],
)
def test_each_stream_kind_round_trips(frames: list[Any], kind: MessageKind, payload: Any) -> None:
    message = decode(frames)
    assert (message.kind, message.request_id, message.payload) == (kind, 4, payload)
    assert decode(codec.encode(message)) == message


@pytest.mark.parametrize(
    ("kind", "payload"),
    [
        (MessageKind.OPEN, [256]),  # no argument list
        (MessageKind.OPEN, [-1, []]),  # a negative credit
        (MessageKind.OPEN, ["256", []]),
        (MessageKind.CREDIT, []),
        (MessageKind.CREDIT, [2**32]),  # beyond a count
        (MessageKind.CREDIT, [1, 2]),
        (MessageKind.CANCEL, [0]),
        (MessageKind.ITEMS, {"not": "a list"}),
    ],
)
def test_a_stream_message_of_the_wrong_shape_is_a_protocol_error_keeping_its_id(
    kind: MessageKind, payload: Any
) -> None:
    with pytest.raises(ProtocolError, match="wrong shape") as info:
        decode([msgpack.packb([WIRE_VERSION, int(kind), 9, "", payload])])
    assert (info.value.request_id, info.value.kind) == (9, kind)
