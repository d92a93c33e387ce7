"""Where a chunk's bytes live: in a worker's per-layer KV tensors, and in a server slot.

A worker holds its KV cache as one tensor per layer, all of one shape and dtype. A *chunk* is
``blocks_per_chunk`` (bpc) blocks, named by their block ids. The server keeps a chunk in a
*slot*: a 1-D ``uint8`` tensor of exactly :meth:`KVLayout.chunk_nbytes` bytes.

Slot byte layout
----------------
With ``L = layout.layer_chunk_nbytes(bpc)``, bytes ``[l * L, (l + 1) * L)`` of the slot hold
layer ``l``. Inside that part the chunk's blocks sit in the layer tensor's own order, with the
block dimension cut down to the chunk's block ids (in the order given), C-contiguous:

- ``PAGED`` (layer ``[2, num_blocks, block_size, heads, head_dim]``): ``[2, bpc, block_size,
  heads, head_dim]``, so all of the chunk's K blocks come first, then all of its V blocks;
- ``MLA`` (layer ``[num_blocks, block_size, dim]``): ``[bpc, block_size, dim]``;
- ``BLOCKS_FIRST`` (layer ``[num_blocks, 2, block_size, heads, head_dim]``): ``[bpc, 2,
  block_size, heads, head_dim]``, each block's K then V.

So element ``(i_0, ..., i_k)`` of that chunk-shaped array, with ``i_b`` the position of the block
among the chunk's ids, is at byte ``l * L + itemsize * flat`` of the slot, where ``flat`` is the
C-order flat index of ``(i_0, ..., i_k)`` in the chunk shape. The layout depends only on the
:class:`KVLayout` and bpc, never on the block ids, so a chunk gathered from some blocks can be
scattered into any others.

Nothing here does IO. The copies are plain torch ops (``index_select`` into the slot,
``index_copy_`` out of it), which release the GIL while they run, so the server runs them in
executor threads without stalling its event loop.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

import msgpack
import torch

from kvrpc.codec import register_ext
from kvrpc.errors import KVConfigError, KVError

__all__ = [
    "SKIP_BLOCK",
    "KVLayout",
    "LayoutKind",
    "dtype_from_name",
    "dtype_name",
    "gather_chunk",
    "gather_chunks",
    "scatter_chunk",
    "scatter_chunks",
]


class LayoutKind(enum.StrEnum):
    """How one layer's KV tensor is shaped; the value is the name used on the wire.

    - ``PAGED``: ``[2, num_blocks, block_size, num_kv_heads, head_dim]``, K and V on dim 0,
      blocks on dim 1.
    - ``MLA``: ``[num_blocks, block_size, dim]``, one latent vector per token, blocks on dim 0.
    - ``BLOCKS_FIRST``: ``[num_blocks, 2, block_size, num_kv_heads, head_dim]``, blocks on
      dim 0, K and V on dim 1.
    - ``PAGED_HND`` and ``BLOCKS_FIRST_HND``: the same with heads before tokens,
      ``[2, num_blocks, num_kv_heads, block_size, head_dim]`` and
      ``[num_blocks, 2, num_kv_heads, block_size, head_dim]``.
    - ``BNHC``, ``BHNC`` and ``HBNC``: one 4-D tensor per layer of blocks (B), heads (H),
      tokens (N) and each token's content (C: K and V side by side, or a latent), in that
      memory order: ``[num_blocks, block_size, heads, content]``, ``[num_blocks, heads,
      block_size, content]`` and ``[heads, num_blocks, block_size, content]``.

    4-D shapes cannot be told apart by their sizes, so their kind is always given.
    """

    PAGED = "paged"
    MLA = "mla"
    BLOCKS_FIRST = "blocks_first"
    PAGED_HND = "paged_hnd"
    BLOCKS_FIRST_HND = "blocks_first_hnd"
    BNHC = "bnhc"
    BHNC = "bhnc"
    HBNC = "hbnc"


#: In a retrieve's block ids: leave this block as it is (the engine holds those tokens).
SKIP_BLOCK = -1

# Per kind: (ndim, block dim, token dim, the dim that must be 2 for K/V or None).
_KIND_SHAPES: dict[LayoutKind, tuple[int, int, int, int | None]] = {
    LayoutKind.PAGED: (5, 1, 2, 0),
    LayoutKind.MLA: (3, 0, 1, None),
    LayoutKind.BLOCKS_FIRST: (5, 0, 2, 1),
    LayoutKind.PAGED_HND: (5, 1, 3, 0),
    LayoutKind.BLOCKS_FIRST_HND: (5, 0, 3, 1),
    LayoutKind.BNHC: (4, 0, 1, None),
    LayoutKind.BHNC: (4, 0, 2, None),
    LayoutKind.HBNC: (4, 1, 2, None),
}

# Bool, complex and quantized dtypes are not KV caches; integers stay allowed because some
# engines keep fp8 caches as uint8 bytes.
_INTEGER_DTYPES = frozenset({torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64})


def dtype_from_name(name: str) -> torch.dtype:
    """The torch dtype called ``name``, for KV tensors; raises ``KVConfigError`` otherwise.

    ``name`` is the canonical name without ``torch.``: ``"float16"``, not ``"torch.float16"``
    or ``"half"``. Floating point dtypes (fp8 included) and integer dtypes are accepted.
    """
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    if not isinstance(dtype, torch.dtype):
        raise KVConfigError(
            f"unknown KV dtype {name!r}; use a torch dtype name such as 'float16', 'bfloat16' "
            "or 'float8_e4m3fn'"
        )
    canonical = dtype_name(dtype)
    if canonical != name:
        raise KVConfigError(f"KV dtype {name!r} is an alias; spell it {canonical!r}")
    if not (dtype.is_floating_point or dtype in _INTEGER_DTYPES):
        raise KVConfigError(
            f"KV dtype {name!r} cannot hold a KV cache; use a floating point type (fp8 "
            "included) or an integer type"
        )
    return dtype


def dtype_name(dtype: torch.dtype) -> str:
    """The name :func:`dtype_from_name` takes: ``"bfloat16"`` for ``torch.bfloat16``."""
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class KVLayout:
    """The shape of one worker's KV cache: ``num_layers`` tensors of ``shape`` and ``dtype``.

    A layout is checked when it is made, so every ``KVLayout`` describes a cache that can be
    copied chunk by chunk; a bad one raises :class:`~kvrpc.errors.KVConfigError`. It is an
    immutable, hashable value; :meth:`to_wire` and :meth:`from_wire` carry it in messages.

    ``shape`` is one layer's shape; ``dtype`` is a torch dtype name without the ``torch.``
    prefix (``"float16"``, ``"bfloat16"``, ``"float8_e4m3fn"``, ``"float32"``).
    """

    kind: LayoutKind
    num_layers: int
    shape: tuple[int, ...]
    dtype: str

    def __post_init__(self) -> None:
        if not isinstance(self.kind, LayoutKind):
            raise KVConfigError(f"layout kind must be a LayoutKind, got {self.kind!r}")
        if type(self.num_layers) is not int or self.num_layers < 1:
            raise KVConfigError(f"num_layers must be a positive int, got {self.num_layers!r}")
        if type(self.shape) is not tuple or not all(type(n) is int and n > 0 for n in self.shape):
            raise KVConfigError(
                f"a layer shape must be a tuple of positive ints, got {self.shape!r}"
            )
        ndim, _, _, kv_dim = _KIND_SHAPES[self.kind]
        if len(self.shape) != ndim:
            raise KVConfigError(
                f"a {self.kind.value} layer has {ndim} dims ({_kind_shape_text(self.kind)}), "
                f"got shape {list(self.shape)}"
            )
        if kv_dim is not None and self.shape[kv_dim] != 2:
            raise KVConfigError(
                f"a {self.kind.value} layer holds K and V on dim {kv_dim}, which must be 2 "
                f"({_kind_shape_text(self.kind)}), got shape {list(self.shape)}"
            )
        dtype_from_name(self.dtype)

    @classmethod
    def from_tensors(
        cls, tensors: Sequence[torch.Tensor], kind: LayoutKind | None = None
    ) -> KVLayout:
        """The layout of a worker's per-layer KV tensors, after checking they fit together.

        Every tensor must have the first one's shape, dtype and device type, and be
        contiguous; otherwise :class:`~kvrpc.errors.KVConfigError` names the first tensor (by
        index) that differs and how. Without ``kind``, a 3-D layer is ``MLA``; a 5-D layer is
        ``PAGED`` when dim 0 is 2, else ``BLOCKS_FIRST`` when dim 1 is 2. Pass ``kind`` where
        that guess is wrong (a ``BLOCKS_FIRST`` cache of exactly 2 blocks).
        """
        if len(tensors) == 0:
            raise KVConfigError("no KV tensors given; pass one tensor per layer")
        first = tensors[0]
        for index, tensor in enumerate(tensors):
            if not isinstance(tensor, torch.Tensor):
                raise KVConfigError(
                    f"KV tensor {index} is a {type(tensor).__name__}, not a torch.Tensor"
                )
            if tensor.shape != first.shape:
                raise KVConfigError(
                    f"KV tensor {index} has shape {list(tensor.shape)} but tensor 0 has "
                    f"{list(first.shape)}; every layer must have the same shape"
                )
            if tensor.dtype != first.dtype:
                raise KVConfigError(
                    f"KV tensor {index} has dtype {dtype_name(tensor.dtype)} but tensor 0 has "
                    f"{dtype_name(first.dtype)}; every layer must have the same dtype"
                )
            if tensor.device.type != first.device.type:
                raise KVConfigError(
                    f"KV tensor {index} is on {tensor.device} but tensor 0 is on "
                    f"{first.device}; every layer must be on the same kind of device"
                )
            if not tensor.is_contiguous():
                raise KVConfigError(
                    f"KV tensor {index} is not contiguous (strides {list(tensor.stride())}); "
                    "register the cache tensors themselves, not transposed or sliced views"
                )
        shape = tuple(int(n) for n in first.shape)
        if kind is None:
            kind = _guess_kind(shape)
        return cls(kind, len(tensors), shape, dtype_name(first.dtype))

    @classmethod
    def from_wire(cls, data: Any) -> KVLayout:
        """The layout that :meth:`to_wire` gave; a malformed one raises ``KVConfigError``."""
        if not isinstance(data, dict) or set(data) != {"kind", "num_layers", "shape", "dtype"}:
            raise KVConfigError(
                "a KV layout on the wire is a dict with exactly the keys kind, num_layers, "
                f"shape and dtype; got {data!r}"
            )
        try:
            kind = LayoutKind(data["kind"])
        except ValueError:
            known = ", ".join(repr(k.value) for k in LayoutKind)
            raise KVConfigError(
                f"unknown KV layout kind {data['kind']!r}; known kinds are {known}"
            ) from None
        shape = data["shape"]
        if not isinstance(shape, list | tuple):
            raise KVConfigError(f"a KV layout's shape must be a list of ints, got {shape!r}")
        return cls(kind, data["num_layers"], tuple(shape), data["dtype"])

    def to_wire(self) -> dict[str, Any]:
        """The layout as a dict of plain msgpack-able values, for :meth:`from_wire`."""
        return {
            "kind": self.kind.value,
            "num_layers": self.num_layers,
            "shape": list(self.shape),
            "dtype": self.dtype,
        }

    def describe(self) -> str:
        """The layout for people to read in messages: ``32 x paged float16[2, 512, 16, 2, 64]``."""
        return f"{self.num_layers} x {self.kind.value} {self.dtype}{list(self.shape)}"

    @property
    def torch_dtype(self) -> torch.dtype:
        """The torch dtype that ``dtype`` names."""
        return dtype_from_name(self.dtype)

    @property
    def block_dim(self) -> int:
        """The dim of a layer tensor that indexes blocks."""
        return _KIND_SHAPES[self.kind][1]

    @property
    def num_blocks(self) -> int:
        """How many blocks each layer tensor holds."""
        return self.shape[self.block_dim]

    @property
    def block_size(self) -> int:
        """Tokens per block."""
        return self.shape[_KIND_SHAPES[self.kind][2]]

    @property
    def block_nbytes(self) -> int:
        """Bytes of one block in one layer (K and V together where the layout has both)."""
        return int(math.prod(self.shape) // self.num_blocks * self.torch_dtype.itemsize)

    def chunk_shape(self, blocks_per_chunk: int) -> tuple[int, ...]:
        """The shape of one layer's part of a slot: the layer shape with bpc blocks."""
        self._check_blocks_per_chunk(blocks_per_chunk)
        shape = list(self.shape)
        shape[self.block_dim] = blocks_per_chunk
        return tuple(shape)

    def layer_chunk_nbytes(self, blocks_per_chunk: int) -> int:
        """Bytes of one layer's part of a chunk: ``blocks_per_chunk * block_nbytes``."""
        self._check_blocks_per_chunk(blocks_per_chunk)
        return blocks_per_chunk * self.block_nbytes

    def chunk_nbytes(self, blocks_per_chunk: int) -> int:
        """Bytes of a whole chunk, every layer: the size of a server slot."""
        return self.num_layers * self.layer_chunk_nbytes(blocks_per_chunk)

    def check_block_ids(self, block_ids: torch.Tensor) -> None:
        """Refuse block ids that are not int64 or not all in ``[0, num_blocks)``.

        Raises :class:`~kvrpc.errors.KVError` naming the first bad id and the valid range. Any
        shape is accepted; the copy functions check the shape they need.
        """
        if not isinstance(block_ids, torch.Tensor) or block_ids.dtype != torch.int64:
            got = block_ids.dtype if isinstance(block_ids, torch.Tensor) else type(block_ids)
            raise KVError(
                f"block ids must be an int64 tensor, got {got}; build them with "
                "torch.tensor(ids, dtype=torch.int64)"
            )
        if block_ids.numel() == 0:
            return
        low, high = torch.aminmax(block_ids)
        if int(low) < 0 or int(high) >= self.num_blocks:
            bad = block_ids[(block_ids < 0) | (block_ids >= self.num_blocks)].flatten()[0]
            raise KVError(
                f"block id {int(bad)} is out of range: this KV cache has blocks "
                f"[0, {self.num_blocks})"
            )

    def _check_blocks_per_chunk(self, blocks_per_chunk: int) -> None:
        if type(blocks_per_chunk) is not int or not 1 <= blocks_per_chunk <= self.num_blocks:
            raise KVConfigError(
                f"blocks per chunk must be an int in [1, {self.num_blocks}] (the cache's block "
                f"count), got {blocks_per_chunk!r}"
            )


def _kind_shape_text(kind: LayoutKind) -> str:
    return {
        LayoutKind.PAGED: "[2, num_blocks, block_size, num_kv_heads, head_dim]",
        LayoutKind.MLA: "[num_blocks, block_size, dim]",
        LayoutKind.BLOCKS_FIRST: "[num_blocks, 2, block_size, num_kv_heads, head_dim]",
        LayoutKind.PAGED_HND: "[2, num_blocks, num_kv_heads, block_size, head_dim]",
        LayoutKind.BLOCKS_FIRST_HND: "[num_blocks, 2, num_kv_heads, block_size, head_dim]",
        LayoutKind.BNHC: "[num_blocks, block_size, heads, content]",
        LayoutKind.BHNC: "[num_blocks, heads, block_size, content]",
        LayoutKind.HBNC: "[heads, num_blocks, block_size, content]",
    }[kind]


def _guess_kind(shape: tuple[int, ...]) -> LayoutKind:
    if len(shape) == 3:
        return LayoutKind.MLA
    if len(shape) == 5 and shape[0] == 2:
        return LayoutKind.PAGED
    if len(shape) == 5 and shape[1] == 2:
        return LayoutKind.BLOCKS_FIRST
    if len(shape) == 4:
        raise KVConfigError(
            f"a 4-D KV layer shaped {list(shape)} may be any of "
            + ", ".join(f"{_kind_shape_text(k)} ({k.value})" for k in _FOUR_D)
            + "; pass its kind"
        )
    raise KVConfigError(
        f"cannot tell the KV layout of a layer shaped {list(shape)}; a layer is "
        + ", or ".join(f"{_kind_shape_text(k)} ({k.value})" for k in LayoutKind)
    )


_FOUR_D = (LayoutKind.BNHC, LayoutKind.BHNC, LayoutKind.HBNC)


def gather_chunk(
    layers: Sequence[torch.Tensor], layout: KVLayout, block_ids: torch.Tensor, out: torch.Tensor
) -> None:
    """Copy blocks ``block_ids`` of every layer into the slot ``out``, in the slot byte layout.

    ``block_ids`` is a 1-D int64 tensor of bpc ids; ``out`` a contiguous 1-D uint8 tensor of
    ``layout.chunk_nbytes(bpc)`` bytes on the layers' device. Each byte is copied once,
    straight into ``out``, with no temporary. Raises ``KVError`` for bad ids and
    ``KVConfigError`` for layers or a slot that do not match ``layout``, before copying
    anything.

    The copies are torch ops, which release the GIL: call this from an executor thread.
    """
    gather_chunks(layers, layout, _one_row(block_ids), (out,))


def scatter_chunk(
    layers: Sequence[torch.Tensor], layout: KVLayout, block_ids: torch.Tensor, src: torch.Tensor
) -> None:
    """Copy the slot ``src`` into blocks ``block_ids`` of every layer: :func:`gather_chunk` undone.

    The blocks get exactly the bytes the slot holds, whatever the dtype (NaN payloads and
    fp8 included). If ``block_ids`` repeats an id, which of the repeated blocks' bytes land
    there is unspecified. The same checks as :func:`gather_chunk`, all before any write. Call
    it from an executor thread, as that one.
    """
    scatter_chunks(layers, layout, _one_row(block_ids), (src,))


def gather_chunks(
    layers: Sequence[torch.Tensor],
    layout: KVLayout,
    block_ids: torch.Tensor,
    outs: Sequence[torch.Tensor],
) -> None:
    """Gather ``n`` chunks: row ``i`` of ``block_ids`` (int64, ``[n, bpc]``) into ``outs[i]``.

    The same as :func:`gather_chunk` on each row, with the checks and the per-layer set-up
    done once for the batch; every check runs before any byte is copied. Call it from an
    executor thread.
    """
    plan = _plan(layers, layout, block_ids, outs)
    dim = layout.block_dim
    # Layer by layer: a layer's blocks that several chunks share stay in the CPU cache.
    for layer, slot_parts in zip(plan.layers, plan.slot_parts, strict=True):
        for ids, dst in zip(plan.ids, slot_parts, strict=True):
            # Into a contiguous result, index_select memcpys whole blocks (PAGED: each
            # block's K, then its V).
            torch.index_select(layer, dim, ids, out=dst)


def scatter_chunks(
    layers: Sequence[torch.Tensor],
    layout: KVLayout,
    block_ids: torch.Tensor,
    srcs: Sequence[torch.Tensor],
) -> None:
    """Scatter ``n`` chunks: ``srcs[i]`` into the blocks named by row ``i`` of ``block_ids``.

    The same as :func:`scatter_chunk` on each row, rows in order (a block named by two rows
    ends with the later row's bytes); every check runs before any byte is copied. Call it from
    an executor thread.

    A block id of :data:`SKIP_BLOCK` (-1) leaves that block as it is: the engine holds those
    tokens itself and may be reading them, so the chunk's bytes for them are not written.
    """
    plan = _plan(layers, layout, block_ids, srcs, allow_skip=True)
    dim = layout.block_dim
    for layer, slot_parts in zip(plan.layers, plan.slot_parts, strict=True):
        for ids, keep, src in zip(plan.ids, plan.keep, slot_parts, strict=True):
            if keep is None:
                layer.index_copy_(dim, ids, src)
            elif keep.numel():
                layer.index_copy_(dim, ids.index_select(0, keep), src.index_select(dim, keep))


def _one_row(block_ids: torch.Tensor) -> torch.Tensor:
    if not isinstance(block_ids, torch.Tensor) or block_ids.dim() != 1:
        got = list(block_ids.shape) if isinstance(block_ids, torch.Tensor) else block_ids
        raise KVError(f"a chunk's block ids are a 1-D tensor of blocks_per_chunk ids, got {got}")
    return block_ids.unsqueeze(0)


# The copies see layers and slots as arrays of one wide "carrier" element type, reinterpreting
# the last dim (head_dim, or the MLA latent) in place. index_copy_ moves one element per loop
# step, so 16-byte elements make scatter several times faster than 2-byte ones; and a carrier
# is needed anyway, since index_copy_ has no fp8 kernel. Moving whole elements of one type
# never changes a bit. Widest first: the first that divides the last dim's bytes and every
# tensor's byte offset in its storage (view(dtype) requires both) is used.
_CARRIERS = (torch.complex128, torch.int64, torch.int32, torch.int16, torch.uint8)


@dataclass(frozen=True)
class _Plan:
    """A checked batch, as carrier views ready to copy."""

    layers: list[torch.Tensor]
    """Each layer in the carrier type."""
    ids: list[torch.Tensor]
    """Per chunk: its block ids, on the layers' device."""
    slot_parts: list[tuple[torch.Tensor, ...]]
    """Per layer: that layer's part of each chunk's slot, in the carrier type and chunk shape."""
    keep: list[torch.Tensor | None]
    """Per chunk: the positions of the blocks to write when some are skipped, else None."""


def _plan(
    layers: Sequence[torch.Tensor],
    layout: KVLayout,
    block_ids: torch.Tensor,
    slots: Sequence[torch.Tensor],
    *,
    allow_skip: bool = False,
) -> _Plan:
    """Check a batch and turn it into carrier views, before any byte is copied."""
    if len(layers) != layout.num_layers:
        raise KVConfigError(
            f"got {len(layers)} layer tensors but the layout has {layout.num_layers} layers"
        )
    dtype, shape = layout.torch_dtype, torch.Size(layout.shape)
    for index, layer in enumerate(layers):
        if layer.shape != shape or layer.dtype != dtype:
            raise KVConfigError(
                f"layer tensor {index} is {dtype_name(layer.dtype)}{list(layer.shape)} but the "
                f"layout says {layout.dtype}{list(layout.shape)}"
            )
        if not layer.is_contiguous():
            raise KVConfigError(f"layer tensor {index} is not contiguous")
    if (
        not isinstance(block_ids, torch.Tensor)
        or block_ids.dim() != 2
        or block_ids.shape[0] != len(slots)
    ):
        got = list(block_ids.shape) if isinstance(block_ids, torch.Tensor) else block_ids
        raise KVError(
            f"block ids must be a tensor of one row of blocks_per_chunk ids per slot; got "
            f"{got} for {len(slots)} slots"
        )
    skipped = block_ids == SKIP_BLOCK if allow_skip else None
    layout.check_block_ids(block_ids if skipped is None else block_ids.masked_fill(skipped, 0))
    blocks_per_chunk = block_ids.shape[1]
    nbytes = layout.chunk_nbytes(blocks_per_chunk)
    device = layers[0].device
    for index, slot in enumerate(slots):
        if (
            slot.dtype != torch.uint8
            or slot.dim() != 1
            or slot.numel() != nbytes
            or not slot.is_contiguous()
            or slot.device != device
        ):
            raise KVConfigError(
                f"slot {index} must be a contiguous 1-D uint8 tensor of {nbytes} bytes on "
                f"{device}; got a {'' if slot.is_contiguous() else 'non-contiguous '}"
                f"{dtype_name(slot.dtype)}{list(slot.shape)} tensor on {slot.device}"
            )

    if not slots:
        return _Plan([], [], [], [])
    sizes = [layout.shape[-1] * dtype.itemsize]
    sizes += [int(t.storage_offset()) * dtype.itemsize for t in layers]
    sizes += [int(t.storage_offset()) for t in slots]
    carrier = next(c for c in _CARRIERS if all(n % c.itemsize == 0 for n in sizes))
    part_shape = layout.chunk_shape(blocks_per_chunk)
    part_shape = (*part_shape[:-1], sizes[0] // carrier.itemsize)
    slot_parts = [slot.view(carrier).view(layout.num_layers, *part_shape) for slot in slots]
    keep: list[torch.Tensor | None] = [None] * len(slots)
    if skipped is not None and bool(skipped.any()):
        keep = [
            (~row).nonzero().squeeze(1).to(device) if bool(row.any()) else None for row in skipped
        ]
    return _Plan(
        [layer.view(carrier) for layer in layers],
        list(block_ids.to(device).contiguous().unbind(0)),
        list(zip(*(part.unbind(0) for part in slot_parts), strict=True)),
        keep,
    )


# A layout travels as its own ext type, so a registration's layout is checked while the
# payload decodes (a malformed one fails that request at the server's door, like any bad
# payload) and the handler receives a KVLayout, never a dict to parse.
_LAYOUT_EXT: Final = 7


def _pack_layout(layout: KVLayout) -> bytes:
    packed: bytes = msgpack.packb(layout.to_wire(), use_bin_type=True)
    return packed


def _unpack_layout(data: bytes) -> KVLayout:
    try:
        wire = msgpack.unpackb(data, raw=False)
    except (ValueError, msgpack.UnpackException) as exc:
        raise ValueError(f"malformed KVLayout: {exc}") from exc
    return KVLayout.from_wire(wire)


register_ext(_LAYOUT_EXT, KVLayout, _pack_layout, _unpack_layout)
