"""Sans-IO wire codec: messages to frames and back, without touching a socket.

A message travels as a list of frames. Frame 0 is a msgpack array
``[wire_version, kind, request_id, name, payload]``; every further frame is an out-of-band
buffer that the payload refers to by index through an ext type, so large ``bytes``,
``memoryview`` and CPU tensors are handed to the transport as they are instead of being copied
into the header.

A streamed call is a conversation on one request id (docs/core.md, "Streams"): the client
OPENs it with its first credits, the server answers with ITEMS messages (each a batch) and
ends it with a RESPONSE or an ERROR, the client grants more with CREDIT or stops it with
CANCEL.

Custom types travel as msgpack ext types registered in one table (:func:`register_ext`):
codes 0-63 belong to kvrpc, 64-127 to extensions.
"""

from __future__ import annotations

import ctypes
import enum
import math
import struct
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, TypeAlias

import msgpack

from kvrpc.errors import EncodeError, ProtocolError, VersionMismatch

__all__ = [
    "MAX_EXT_NESTING",
    "OOB_THRESHOLD",
    "WIRE_VERSION",
    "Buffer",
    "ExtType",
    "Message",
    "MessageKind",
    "decode",
    "encode",
    "encode_cancel",
    "encode_credit",
    "encode_error",
    "encode_items",
    "encode_open",
    "encode_request",
    "encode_response",
    "message_size",
    "peek",
    "register_ext",
]

#: Bumped whenever the frame layout changes; peers of another version are refused.
WIRE_VERSION: Final = 3

#: ``bytes``/``bytearray`` of at least this many bytes travel as their own frame.
OOB_THRESHOLD: Final = 1024

#: The most ext values (tuples) one message may nest inside each other. Each level is packed
#: and unpacked by a msgpack call of its own whose working state sits on the C stack (tens of
#: KiB each), so without a bound a small hostile message overflows the C stack and kills the
#: process, server or client, before Python's recursion limit is reached. Within one level
#: msgpack itself bounds nesting (1,024 containers) without recursing.
MAX_EXT_NESTING: Final = 32

#: What a frame may be: anything exposing the buffer protocol.
Buffer: TypeAlias = bytes | bytearray | memoryview

# Ext codes kvrpc uses itself. The rest of 0-63 is reserved for kvrpc's own wire types.
_EXT_BUFFER: Final = 0
_EXT_TENSOR: Final = 1
_EXT_TUPLE: Final = 2
_FIRST_EXTENSION_CODE: Final = 64
_LAST_EXT_CODE: Final = 127

# Enough header bytes for the array marker, version, kind and a 64-bit request id.
_PEEK_BYTES: Final = 32

_BUFFER_REF = struct.Struct("<IB")  # frame index, buffer kind
_KIND_BYTES: Final = 0
_KIND_VIEW: Final = 1

_NATIVE_BASES: Final[tuple[type[Any], ...]] = (bool, int, float, str, bytes, list, dict)

# Exact types msgpack packs natively and the payload walk can skip.
_SCALARS: Final[frozenset[type]] = frozenset({int, float, str, bool, type(None)})


class MessageKind(enum.IntEnum):
    """What a message is: a request, a response, an error, or a step of a stream."""

    REQUEST = 0  #: client to server: payload is the argument list
    RESPONSE = 1  #: server to client: the call's value (a stream's end: None)
    ERROR = 2  #: server to client: ``[code, type_name, message]``
    OPEN = 3  #: client to server: open a stream, ``[credits, [args...]]``
    ITEMS = 4  #: server to client: a batch of a stream's items, ``[item, ...]``
    CREDIT = 5  #: client to server: the stream may send this many more items, ``[n]``
    CANCEL = 6  #: client to server: stop the stream, ``[]``


_KINDS: Final = tuple(MessageKind)
_LAST_KIND: Final = len(_KINDS) - 1


@dataclass(frozen=True, slots=True)
class Message:
    """A decoded message.

    ``payload`` is the tuple of arguments for a request, the return value for a response,
    ``(status_code, error_type_name, error_message)`` for an error, ``(credits, args)`` for
    an OPEN (``args`` a tuple), the list of items for ITEMS, ``(n,)`` for a CREDIT and
    ``()`` for a CANCEL.
    """

    kind: MessageKind
    request_id: int
    name: str
    payload: Any


@dataclass(frozen=True, slots=True)
class ExtType:
    """One entry of the ext-type table: how a custom class travels as msgpack ext data."""

    code: int
    cls: type[Any]
    encode: Callable[[Any], bytes]
    decode: Callable[[bytes], Any]


_EXT_BY_CODE: dict[int, ExtType] = {}
_EXT_BY_CLASS: dict[type[Any], ExtType] = {}


def register_ext(
    code: int,
    cls: type[Any],
    encode: Callable[[Any], bytes],
    decode: Callable[[bytes], Any],
) -> None:
    """Register how instances of ``cls`` travel on the wire, as msgpack ext type ``code``.

    Extensions use codes 64-127; codes 0-63 are kept for types defined inside kvrpc. The same
    registration must happen in every process that sends or receives the type. Registering a
    code or a class twice raises ``ValueError``.
    """
    if not 0 <= code <= _LAST_EXT_CODE:
        raise ValueError(f"ext code {code} is outside 0-{_LAST_EXT_CODE}")
    if code < _FIRST_EXTENSION_CODE and not cls.__module__.startswith("kvrpc."):
        raise ValueError(
            f"ext codes 0-{_FIRST_EXTENSION_CODE - 1} are reserved for kvrpc; "
            f"register {cls.__qualname__} with a code from {_FIRST_EXTENSION_CODE} to "
            f"{_LAST_EXT_CODE}"
        )
    if code in (_EXT_BUFFER, _EXT_TENSOR, _EXT_TUPLE) or code in _EXT_BY_CODE:
        raise ValueError(f"ext code {code} is already registered")
    if cls in _EXT_BY_CLASS:
        raise ValueError(f"{cls.__qualname__} already has ext code {_EXT_BY_CLASS[cls].code}")
    entry = ExtType(code, cls, encode, decode)
    _EXT_BY_CODE[code] = entry
    _EXT_BY_CLASS[cls] = entry


# --------------------------------------------------------------------------------- encoding


def encode_request(request_id: int, name: str, args: Sequence[Any]) -> list[Buffer]:
    """Frames of a request calling protocol ``name`` with positional ``args``."""
    return _encode(MessageKind.REQUEST, request_id, name, list(args))


def encode_response(request_id: int, value: Any) -> list[Buffer]:
    """Frames of a successful response carrying ``value``."""
    return _encode(MessageKind.RESPONSE, request_id, "", value)


def encode_error(request_id: int, status: int, type_name: str, message: str) -> list[Buffer]:
    """Frames of an error response: its status code, the exception type's name, its message.

    :func:`kvrpc.errors.error_to_wire` gives the three for an exception.
    """
    return _encode(MessageKind.ERROR, request_id, "", [int(status), type_name, message])


def encode_open(request_id: int, name: str, credits: int, args: Sequence[Any]) -> list[Buffer]:
    """Frames opening stream ``request_id`` of protocol ``name``, granting ``credits`` items."""
    return _encode(MessageKind.OPEN, request_id, name, [credits, list(args)])


def encode_items(request_id: int, items: list[Any]) -> list[Buffer]:
    """Frames of one batch of stream ``request_id``'s items."""
    return _encode(MessageKind.ITEMS, request_id, "", items)


def encode_credit(request_id: int, credits: int) -> list[Buffer]:
    """Frames granting stream ``request_id`` ``credits`` more items."""
    return _encode(MessageKind.CREDIT, request_id, "", [credits])


def encode_cancel(request_id: int) -> list[Buffer]:
    """Frames cancelling stream ``request_id``."""
    return _encode(MessageKind.CANCEL, request_id, "", [])


def encode(message: Message) -> list[Buffer]:
    """Frames of any :class:`Message` (the inverse of :func:`decode`)."""
    payload = message.payload
    if message.kind is MessageKind.OPEN:
        credits, args = payload
        payload = [credits, list(args)]
    elif message.kind is not MessageKind.RESPONSE:
        payload = list(payload)
    return _encode(message.kind, message.request_id, message.name, payload)


def _encode(kind: MessageKind, request_id: int, name: str, payload: Any) -> list[Buffer]:
    frames: list[Buffer] = [b""]
    default = _Default(frames)
    try:
        lifted = _lift(payload, frames, default)
        frames[0] = msgpack.packb(
            [WIRE_VERSION, int(kind), request_id, name, lifted],
            default=default,
            strict_types=True,  # so tuples reach `default` and come back as tuples
            use_bin_type=True,
        )
    except EncodeError:
        raise
    except (TypeError, ValueError, OverflowError, RuntimeError) as exc:
        # RuntimeError: what torch raises for a tensor it cannot flatten or view as bytes.
        raise EncodeError(f"cannot encode payload of {name or kind.name.lower()}: {exc}") from exc
    return frames


class _Default:
    """msgpack's ``default`` hook for one message: lifts buffers into ``frames``.

    A class rather than a closure for the reason given at :class:`_ExtHook`: a closure that
    refers to itself (nested tuples) is a cycle holding the message's frames until the
    garbage collector runs.
    """

    __slots__ = ("depth", "frames")

    def __init__(self, frames: list[Buffer]) -> None:
        self.frames = frames
        self.depth = 0

    def __call__(self, obj: Any) -> Any:
        frames = self.frames
        if type(obj) is tuple:
            if self.depth >= MAX_EXT_NESTING:
                raise EncodeError(
                    f"tuples nest more than {MAX_EXT_NESTING} deep; no receiver would decode "
                    "this message: send lists, or a flatter structure"
                )
            self.depth += 1
            try:
                packed = msgpack.packb(
                    list(obj), default=self, strict_types=True, use_bin_type=True
                )
            finally:
                self.depth -= 1
            return msgpack.ExtType(_EXT_TUPLE, packed)
        entry = _EXT_BY_CLASS.get(type(obj))
        if entry is not None:
            return msgpack.ExtType(entry.code, entry.encode(obj))
        pydantic = sys.modules.get("pydantic")  # no model can exist before pydantic is loaded
        if pydantic is not None and isinstance(obj, pydantic.BaseModel):
            # A model travels as its field dict; the receiver's strict validation rebuilds it.
            # Shallow, not model_dump(): a field of a registered ext type must stay an object
            # to travel as that ext type (model_dump would turn a dataclass into a dict).
            fields = {name: getattr(obj, name) for name in type(obj).model_fields}
            return _lift(fields, frames, self)
        if isinstance(obj, enum.Enum):
            return obj.value
        for base in _NATIVE_BASES:
            # strict_types hands us subclasses (OrderedDict, a str subclass...): send the base.
            if isinstance(obj, base):
                return _lift(base(obj), frames, self)
        if isinstance(obj, tuple):  # a namedtuple
            return self(tuple(obj))
        raise EncodeError(
            f"kvrpc cannot encode {type(obj).__qualname__}; send a wire type (None, bool, int, "
            "float, str, bytes, list, tuple, dict, a pydantic model, a CPU tensor) or register "
            "the type with kvrpc.codec.register_ext"
        )


def _lift(obj: Any, frames: list[Buffer], default: Callable[[Any], Any]) -> Any:
    """Replace large buffers and tensors inside ``obj`` by references to frames of their own.

    msgpack packs ``bytes`` natively without asking ``default``, so they have to be found by
    walking the payload first; containers are rebuilt only where something was replaced.
    """
    kind = type(obj)
    if kind in _SCALARS:
        return obj
    if kind is bytes or kind is bytearray:
        if len(obj) < OOB_THRESHOLD:
            return obj
        return _buffer_ref(obj, _KIND_BYTES, frames)
    if kind is memoryview:
        view = obj if obj.c_contiguous else memoryview(obj.tobytes())
        return _buffer_ref(
            view.cast("B") if view.ndim != 1 or view.format != "B" else view, _KIND_VIEW, frames
        )
    if kind is list:
        if _SCALARS.issuperset(map(type, obj)):
            return obj
        return [_lift(item, frames, default) for item in obj]
    if kind is tuple:
        if _SCALARS.issuperset(map(type, obj)):
            return obj
        return tuple(_lift(item, frames, default) for item in obj)
    if kind is dict:
        if _SCALARS.issuperset(map(type, obj.values())):
            return obj
        return {key: _lift(value, frames, default) for key, value in obj.items()}
    torch = sys.modules.get("torch")  # only a process that made a tensor has torch loaded
    if torch is not None and isinstance(obj, torch.Tensor):
        return _tensor_ref(obj, frames)
    return obj


def _buffer_ref(data: Buffer, buffer_kind: int, frames: list[Buffer]) -> msgpack.ExtType:
    frames.append(data)
    return msgpack.ExtType(_EXT_BUFFER, _BUFFER_REF.pack(len(frames) - 1, buffer_kind))


def _tensor_ref(tensor: Any, frames: list[Buffer]) -> msgpack.ExtType:
    if tensor.device.type != "cpu":
        raise EncodeError(
            f"a tensor on {tensor.device} cannot travel in a message; move it to the CPU, or "
            "share it through the KV service's CUDA IPC transfer mode"
        )
    if tensor.layout is not _torch().strided or tensor.is_quantized or tensor.is_nested:
        raise EncodeError(
            f"only plain strided tensors can travel in a message, not a {tensor.layout} "
            f"{'quantized ' if tensor.is_quantized else ''}tensor; convert it first "
            "(for example .to_dense() or .dequantize())"
        )
    # Conjugate and negative views are lazy bits on the tensor, not bytes in its storage:
    # resolve them so the receiver gets the values the sender sees.
    flat = tensor.detach().resolve_conj().resolve_neg().contiguous().reshape(-1)
    frames.append(_tensor_memory(flat))
    dtype = str(tensor.dtype).removeprefix("torch.")
    meta = msgpack.packb([len(frames) - 1, dtype, list(tensor.shape)])
    return msgpack.ExtType(_EXT_TENSOR, meta)


def _tensor_memory(flat: Any) -> memoryview:
    """A byte view of a contiguous CPU tensor's memory, without a copy and without numpy.

    torch tensors do not export the buffer protocol, and numpy is not a dependency; a ctypes
    array over the data pointer is. The array holds the tensor, so the memory stays valid for
    as long as the view (and so the frame) lives.
    """
    nbytes = flat.numel() * flat.element_size()
    if nbytes == 0:
        return memoryview(b"")
    array = (ctypes.c_char * nbytes).from_address(flat.data_ptr())
    array.owner = flat
    return memoryview(array).cast("B")


def _torch() -> Any:
    import torch

    return torch


# --------------------------------------------------------------------------------- decoding


def decode(frames: Sequence[Buffer]) -> Message:
    """Decode the frames of one message.

    Raises :class:`ProtocolError` (or :class:`VersionMismatch`) for anything malformed; its
    ``request_id`` attribute holds the request id whenever the header got that far, so a
    server can still answer the request with an error.
    """
    if not frames:
        raise ProtocolError("empty message: no frames")
    # Fast path: one C call, then a few type checks. Anything unusual is decoded again by the
    # careful path below, which reads field by field to say exactly what is wrong.
    used: set[int] = set()
    try:
        header = msgpack.unpackb(
            frames[0], ext_hook=_ExtHook(frames, used), raw=False, strict_map_key=False
        )
    except Exception:
        header = None
    if (
        type(header) is list
        and len(header) == 5
        and type(header[0]) is int
        and header[0] == WIRE_VERSION
        and type(header[1]) is int
        and 0 <= header[1] <= _LAST_KIND
        and type(header[2]) is int
        and header[2] >= 0
        and type(header[3]) is str
        and len(used) == len(frames) - 1
    ):
        _, raw_kind, request_id, name, payload = header
        kind = _KINDS[raw_kind]
        if kind is MessageKind.RESPONSE:
            return Message(kind, request_id, name, payload)
        if type(payload) is list and kind is MessageKind.REQUEST:
            return Message(kind, request_id, name, tuple(payload))
        shaped = _shaped(kind, payload)
        if shaped is not None:
            return Message(kind, request_id, name, shaped)
    return _decode_carefully(frames)


def _shaped(kind: MessageKind, payload: Any) -> Any:
    """The decoded payload of ``kind``, or None when its shape is wrong."""
    if type(payload) is not list:
        return None
    if kind is MessageKind.REQUEST:
        return tuple(payload)
    if kind is MessageKind.ERROR:
        return tuple(payload) if _is_error_payload(payload) else None
    if kind is MessageKind.ITEMS:
        return payload
    if kind is MessageKind.OPEN:
        if len(payload) == 2 and _is_count(payload[0]) and type(payload[1]) is list:
            return payload[0], tuple(payload[1])
        return None
    if kind is MessageKind.CREDIT:
        return (payload[0],) if len(payload) == 1 and _is_count(payload[0]) else None
    return () if not payload else None  # CANCEL


def _is_count(value: Any) -> bool:
    return type(value) is int and 0 <= value < 2**32


def _decode_carefully(frames: Sequence[Buffer]) -> Message:
    used: set[int] = set()
    unpacker = msgpack.Unpacker(
        ext_hook=_ExtHook(frames, used),
        raw=False,
        strict_map_key=False,
        max_buffer_size=max(len(frames[0]), 1),
    )
    request_id: int | None = None
    kind: MessageKind | None = None
    try:
        unpacker.feed(frames[0])
        length = unpacker.read_array_header()
        # Version, kind and request id come first in every wire version, so a peer of another
        # version can still be told, in a reply to its own request, what went wrong; only the
        # number of fields after them may differ between versions.
        version = unpacker.unpack() if length >= 1 else None
        raw_kind = unpacker.unpack() if length >= 2 else None
        kind = _KINDS[raw_kind] if type(raw_kind) is int and 0 <= raw_kind <= _LAST_KIND else None
        raw_id = unpacker.unpack() if length >= 3 else None
        if type(raw_id) is int and raw_id >= 0:
            request_id = raw_id
        if type(version) is not int:
            raise ProtocolError(f"header does not start with a wire version: {version!r}")
        if version != WIRE_VERSION:
            raise VersionMismatch(
                f"peer speaks wire version {version!r}, this kvrpc speaks {WIRE_VERSION}; "
                "run the same kvrpc release on both sides"
            )
        if length != 5:
            raise ProtocolError(f"header has {length} fields, wire version {WIRE_VERSION} has 5")
        if kind is None:
            raise ProtocolError(f"unknown message kind {raw_kind!r}")
        if request_id is None:
            raise ProtocolError(f"request id must be a non-negative int, got {raw_id!r}")
        name = unpacker.unpack()
        if type(name) is not str:
            raise ProtocolError(f"protocol name must be a str, got {type(name).__name__}")
        payload = unpacker.unpack()
        if unpacker.tell() != len(frames[0]):
            raise ProtocolError("trailing bytes after the header")
    except ProtocolError as exc:
        exc.request_id, exc.kind = request_id, kind
        raise
    except Exception as exc:  # msgpack raises many types for corrupt input
        raise ProtocolError(
            f"malformed header: {type(exc).__name__}: {exc}", request_id=request_id, kind=kind
        ) from exc
    if len(used) != len(frames) - 1:
        raise ProtocolError(
            f"message has {len(frames) - 1} buffer frames but its header refers to {len(used)}",
            request_id=request_id,
            kind=kind,
        )
    if kind is MessageKind.RESPONSE:
        return Message(kind, request_id, name, payload)
    shaped = _shaped(kind, payload)
    if shaped is None:
        raise ProtocolError(
            f"{kind.name.lower()} payload has the wrong shape", request_id=request_id, kind=kind
        )
    return Message(kind, request_id, name, shaped)


def _is_error_payload(payload: list[Any]) -> bool:
    """True for ``[code, type_name, message]``: an int and two strings."""
    return (
        len(payload) == 3
        and type(payload[0]) is int
        and type(payload[1]) is str
        and type(payload[2]) is str
    )


class _ExtHook:
    """msgpack's ext_hook for one message: resolves buffer references against its frames.

    A class rather than a closure: a closure that passes itself to nested ``unpackb`` calls
    (tuples) is a reference cycle, which kept every decoded message's frames alive until
    the garbage collector happened to run (tens of MiB per large message).
    """

    __slots__ = ("depth", "frames", "used")

    def __init__(self, frames: Sequence[Buffer], used: set[int]) -> None:
        self.frames = frames
        self.used = used
        self.depth = 0

    def __call__(self, code: int, data: bytes) -> Any:
        if code == _EXT_BUFFER:
            index, buffer_kind = _BUFFER_REF.unpack(data)
            frame = _claim_frame(self.frames, self.used, index)
            if buffer_kind == _KIND_VIEW:
                return memoryview(frame)
            return frame if type(frame) is bytes else bytes(frame)
        if code == _EXT_TENSOR:
            index, dtype, shape = msgpack.unpackb(data)
            return _tensor_from_frame(_claim_frame(self.frames, self.used, index), dtype, shape)
        if code == _EXT_TUPLE:
            if self.depth >= MAX_EXT_NESTING:
                # Refused before the nested unpack: see MAX_EXT_NESTING for why.
                raise ProtocolError(f"tuples nest more than {MAX_EXT_NESTING} deep")
            self.depth += 1
            try:
                return tuple(msgpack.unpackb(data, ext_hook=self, raw=False, strict_map_key=False))
            finally:
                self.depth -= 1
        entry = _EXT_BY_CODE.get(code)
        if entry is None:
            raise ProtocolError(f"unknown ext type code {code}: is the extension registered?")
        return entry.decode(data)


def _claim_frame(frames: Sequence[Buffer], used: set[int], index: int) -> Buffer:
    if not 1 <= index < len(frames) or index in used:
        raise ProtocolError(f"bad buffer reference to frame {index} of {len(frames)}")
    used.add(index)
    return frames[index]


def _tensor_from_frame(frame: Buffer, dtype_name: str, shape: list[int]) -> Any:
    """Rebuild a tensor over the frame's memory; a read-only frame is copied once first."""
    import torch

    dtype = getattr(torch, dtype_name, None)
    if not isinstance(dtype, torch.dtype):
        raise ProtocolError(f"unknown tensor dtype {dtype_name!r}")
    if type(shape) is not list or not all(type(n) is int and n >= 0 for n in shape):
        raise ProtocolError(f"tensor shape must be a list of non-negative ints, got {shape!r}")
    view = memoryview(frame)
    expected = math.prod(shape) * dtype.itemsize
    if view.nbytes != expected:
        raise ProtocolError(
            f"tensor frame holds {view.nbytes} bytes but {dtype_name}{shape} needs {expected}"
        )
    if view.nbytes == 0:
        return torch.empty(shape, dtype=dtype)
    if view.readonly:
        view = memoryview(bytearray(view))
    try:
        return torch.frombuffer(view, dtype=torch.uint8).view(dtype).reshape(shape)
    except RuntimeError as exc:
        raise ProtocolError(f"tensor frame does not match {dtype_name}{shape}: {exc}") from exc


def peek(frames: Sequence[Buffer]) -> tuple[MessageKind | None, int | None]:
    """Read only the kind and request id of a message, or None for what cannot be read.

    For answering messages that will not be decoded in full (oversized ones): it looks at the
    first bytes of the header and never at the payload or the buffers.
    """
    if not frames:
        return None, None
    unpacker = msgpack.Unpacker(raw=False)
    unpacker.feed(bytes(memoryview(frames[0])[:_PEEK_BYTES]))
    try:
        if unpacker.read_array_header() != 5 or type(unpacker.unpack()) is not int:
            return None, None
        raw_kind, raw_id = unpacker.unpack(), unpacker.unpack()
    except Exception:  # truncated or corrupt: nothing to answer
        return None, None
    kind = _KINDS[raw_kind] if type(raw_kind) is int and 0 <= raw_kind <= _LAST_KIND else None
    request_id = raw_id if type(raw_id) is int and raw_id >= 0 else None
    return kind, request_id


def message_size(frames: Sequence[Buffer]) -> int:
    """Total size in bytes of a message's frames."""
    return sum(memoryview(f).nbytes for f in frames)
