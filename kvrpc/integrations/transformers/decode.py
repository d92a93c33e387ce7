"""Decode steps over a :class:`~.model.PagedLlama`: context slots kept on the device, CUDA graphs.

A decode step computes one token, at position ``p``, of a request whose tokens ``[0, p)``
have their KV in its blocks. :meth:`PagedLlama.forward <.model.PagedLlama.forward>` builds
the slot of every context token on the host at every step (``p`` block lookups and a copy
to the device). Here a request's context slots live on the device in a
:class:`ContextSlots` buffer of fixed capacity, and each step appends one slot: the host
does one block lookup a step, whatever the context's length.

A :class:`Decoder` steps in one of :data:`MODES`:

* ``eager``: attention over the buffer's first ``p + 1`` slots. The same kernels on the same
  shapes as ``forward``: the same logits, bit for bit.
* ``padded``: attention over the whole buffer, the keys past ``p`` masked out, so that every
  step of a capacity has the same shapes. The same logits as ``eager`` up to float
  rounding (a masked attention may take another kernel).
* ``graphed``: the padded step captured once per capacity in a ``torch.cuda.CUDAGraph`` and
  replayed: one launch a step instead of a dozen a layer (CUDA only). The graph reads its
  inputs from static tensors: the token id, its position and its slot (copied in before
  each replay) and the context buffer (appended to in place).

Capacities are whole multiples of ``bucket`` tokens; a request that outgrows its buffer
moves to the next capacity's (a new graph captured there once). Padding slots point at the
request's position 0: a hidden key still enters attention's products (with weight 0), and
an unwritten cache block may hold NaNs, which ``0 * NaN`` would spread.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, cast

import torch

from kvrpc.errors import KVConfigError, KVError
from kvrpc.integrations.transformers.model import PagedLlama, slot_indices

__all__ = ["MODES", "ContextSlots", "DecodeMode", "Decoder"]

DecodeMode = Literal["eager", "padded", "graphed"]
#: A :class:`Decoder`'s ways to step (see the module docstring).
MODES: tuple[DecodeMode, ...] = ("eager", "padded", "graphed")

# Warm-up runs before a capture, on a side stream, as torch's CUDA graph notes do them: the
# first runs pick kernels and allocate their workspaces, which a capture must not.
_WARMUP_RUNS = 3

# torch.cuda's graph classes are untyped.
_cuda = cast(Any, torch.cuda)


class ContextSlots:
    """One request's context slots on a device, in a buffer of ``capacity`` slots.

    ``slots[:length]`` are the flat cache slots of positions ``[0, length)``, as
    :func:`~.model.slot_indices` gives them; every slot after them is position 0's (finite
    KV to pad a static-shape step with, masked out there). :meth:`reset` builds a request's
    slots once; :meth:`append` adds the next position's, a single element written in place.
    """

    def __init__(self, capacity: int, block_size: int, device: torch.device | str) -> None:
        if capacity < 1:
            raise KVConfigError(f"a context buffer holds at least one slot, not {capacity}")
        self.capacity = capacity
        self.block_size = block_size
        self.slots = torch.zeros(capacity, dtype=torch.int64, device=device)
        self.length = 0

    def reset(self, block_table: list[int], length: int) -> None:
        """Take a request whose tokens ``[0, length)`` have their KV in ``block_table``."""
        if not 1 <= length <= self.capacity:
            raise KVConfigError(
                f"a context buffer of {self.capacity} slots cannot take a {length}-token "
                "request (it needs at least one token, and room for it)"
            )
        built = slot_indices(block_table, 0, length, self.block_size)
        self.slots[:length].copy_(built)
        self.slots[length:].fill_(int(built[0]))
        self.length = length

    def take(self, other: ContextSlots) -> None:
        """Continue ``other``'s request here (a larger buffer): its slots and its padding."""
        length = other.length
        if length > self.capacity:
            raise KVConfigError(
                f"a context buffer of {self.capacity} slots cannot take {length} slots"
            )
        self.slots[:length].copy_(other.slots[:length])
        self.slots[length:].copy_(other.slots[:1].expand(self.capacity - length))
        self.length = length

    def append(self, block_table: list[int]) -> tuple[int, int]:
        """Add the next position's slot; its ``(position, slot)``.

        One block lookup on the host and one element written on the device (no read back).
        ``KVConfigError`` when the buffer is full or the table has no block for it.
        """
        position = self.length
        if position >= self.capacity:
            raise KVConfigError(
                f"the context buffer's {self.capacity} slots are full; move the request to "
                "a larger one"
            )
        block = position // self.block_size
        if block >= len(block_table):
            raise KVConfigError(
                f"position {position} needs {block + 1} blocks; the table has {len(block_table)}"
            )
        slot = block_table[block] * self.block_size + position % self.block_size
        self.slots[position : position + 1].fill_(slot)
        self.length = position + 1
        return position, slot

    def view(self) -> torch.Tensor:
        """The request's slots, ``[length]`` (a view of the buffer)."""
        return self.slots[: self.length]


@dataclass(eq=False)
class _Static:
    """One capacity's buffers: what a step reads, and its graph once captured."""

    context: ContextSlots
    step: torch.Tensor
    """int64 ``[3]`` on the device: the token id, its position and its slot."""
    keys: torch.Tensor
    """int64 ``[capacity]``: each key's position, for the padded step's mask."""
    graph: Any = None
    logits: torch.Tensor | None = None
    """The graph's output, overwritten by every replay."""


class Decoder:
    """Greedy-decode steps of one request at a time over ``runner`` (see the module doc).

    :meth:`start` takes a request, :meth:`step` computes its next token's logits. Buffers
    and graphs are kept per capacity, for the requests after. Not thread-safe: one thread
    steps one request.
    """

    def __init__(self, runner: PagedLlama, *, mode: DecodeMode = "eager", bucket: int = 256):
        if mode not in MODES:
            raise KVConfigError(f"a decode mode is one of {', '.join(MODES)}, not {mode!r}")
        device = runner.cache.layers[0].device
        if mode == "graphed" and device.type != "cuda":
            raise KVConfigError(
                f"CUDA graphs need the model and its KV cache on a CUDA device, not {device}"
            )
        if bucket < 1:
            raise KVConfigError(f"the capacity bucket is at least one token, not {bucket}")
        self.runner = runner
        self.mode = mode
        self.bucket = bucket
        self.device = device
        self._statics: dict[int, _Static] = {}
        self._current: _Static | None = None

    @property
    def length(self) -> int:
        """Tokens of the current request with KV in its blocks: the next step's position."""
        return self._current.context.length if self._current is not None else 0

    @property
    def capacity(self) -> int:
        """The current request's buffer size in tokens (0 before :meth:`start`)."""
        return self._current.context.capacity if self._current is not None else 0

    @property
    def graphs(self) -> int:
        """CUDA graphs captured so far (one per capacity stepped in ``graphed`` mode)."""
        return sum(1 for static in self._statics.values() if static.graph is not None)

    def start(self, block_table: list[int], length: int, *, reserve: int = 1) -> None:
        """Take the request whose tokens ``[0, length)`` have their KV in ``block_table``.

        ``reserve`` is the steps to make room for: a buffer (and graph) of
        ``length + reserve`` tokens rounded up to the bucket, so that the request does not
        outgrow it. Ends the previous request's steps.
        """
        # The buffers are made, and always written, under inference mode, as the steps are.
        with torch.inference_mode():
            static = self._static(self._round(length + max(1, reserve)))
            static.context.reset(block_table, length)
        self._current = static

    def step(self, token: int, block_table: list[int]) -> torch.Tensor:
        """The logits (float32 ``[1, vocab]``) after ``token``, at the next position.

        The token's KV is written into its slot; ``block_table`` gets a block from the
        runner's cache when the position passes its last (the blocks are the caller's to
        free, as the rest of the table).
        """
        static = self._current
        if static is None:
            raise KVError("start() a request before stepping it")
        position = static.context.length
        cache = self.runner.cache
        if position >= len(block_table) * cache.block_size:
            block_table.extend(cache.allocate(1))
        with torch.inference_mode():
            if position >= static.context.capacity:
                larger = self._static(self._round(position + 1))
                larger.context.take(static.context)
                static = self._current = larger
            position, slot = static.context.append(block_table)
            # One small host-to-device copy a step, into the static inputs. From pageable
            # memory, an asynchronous copy has read its source when it returns: the
            # temporary may go at once, and the host does not wait for the GPU.
            inputs = torch.tensor([token, position, slot], dtype=torch.int64)
            static.step.copy_(inputs, non_blocking=True)
            if self.mode != "graphed":
                return self._layers(static)
            if static.graph is None:
                self._capture(static)
            static.graph.replay()
            assert static.logits is not None
            return static.logits.clone()  # the next replay overwrites the graph's own

    def clear(self) -> None:
        """Forget every buffer and graph (their memory goes back to torch's allocator)."""
        self._statics.clear()
        self._current = None

    def _round(self, tokens: int) -> int:
        return -(-tokens // self.bucket) * self.bucket

    def _static(self, capacity: int) -> _Static:
        static = self._statics.get(capacity)
        if static is None:
            device = self.device
            static = _Static(
                context=ContextSlots(capacity, self.runner.cache.block_size, device),
                step=torch.zeros(3, dtype=torch.int64, device=device),
                keys=torch.arange(capacity, device=device),
            )
            self._statics[capacity] = static
        return static

    def _layers(self, static: _Static) -> torch.Tensor:
        """One step over ``static``'s inputs: eager (the live slots) or padded (all of them)."""
        step = static.step
        ids, positions, slots = step[0:1].view(1, 1), step[1:2].view(1, 1), step[2:3]
        if self.mode == "eager":
            context, mask = static.context.view(), None
        else:  # keys past the position are padding: hidden
            context = static.context.slots
            mask = (static.keys <= step[1]).view(1, 1, 1, -1)
        return self.runner.run_layers(ids, positions, slots, context=context, mask=mask)

    def _capture(self, static: _Static) -> None:
        """Capture ``static``'s padded step, after warm-up runs on a side stream.

        The warm-up runs are real steps of the current inputs: each writes the same KV into
        the same slot, so running it again (the replay after the capture) changes nothing.
        Thread-local capture: another thread's CUDA calls (a store's event) stay legal.
        """
        side = _cuda.Stream()
        side.wait_stream(_cuda.current_stream())
        with _cuda.stream(side):
            for _ in range(_WARMUP_RUNS):
                self._layers(static)
        _cuda.current_stream().wait_stream(side)
        graph = _cuda.CUDAGraph()
        with _cuda.graph(graph, capture_error_mode="thread_local"):
            static.logits = self._layers(static)
        static.graph = graph
