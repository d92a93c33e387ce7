"""Pitched copies between the GPU and pinned memory, one CUDA driver call per run of rows.

A layer-wise retrieve moves, for each layer, one slice of every chunk's pool slot: rows of
a layer's width, ``slot_nbytes`` apart in pinned memory. Through ``Tensor.copy_`` that is a
call (dispatch, a copy, an event for torch's pinned-memory bookkeeping) per chunk and
layer, thousands a batch, and the copy engine thread's Python then sets the pace instead of
PCIe. ``cuMemcpy2DAsync`` moves rows at a fixed pitch in one call: with the pool's slots
mostly consecutive, a layer is a call or a few.

The other direction serves the DMA store (``kvrpc serve --store-copies dma``): a worker's
blocks go straight from its layer tensors into the pool slots, no kernel in between, one
call per :class:`~kvrpc.kv.server.dma_plan.PitchedCopy` and layer
(:func:`copy_runs_to_host`).

The driver is reached through ``ctypes`` (``libcuda.so.1``, present wherever a GPU is);
where it cannot be loaded the host-to-device copies fall back to ``Tensor.copy_``, row by
row, and the copy engine stores through its kernels instead (:func:`available`).
"""

from __future__ import annotations

import ctypes
import functools
import logging
from collections.abc import Sequence
from typing import Any

import torch

from kvrpc.kv.server.dma_plan import PitchedCopy

__all__ = [
    "available",
    "copy_rows_to_device",
    "copy_runs_to_device",
    "copy_runs_to_host",
    "pitched_runs",
]

logger = logging.getLogger("kvrpc.kv")

_HOST, _DEVICE = 1, 2  # CUmemorytype


class _Memcpy2D(ctypes.Structure):
    """``CUDA_MEMCPY2D``: field by field as ``cuda.h`` declares it."""

    _fields_ = (
        ("srcXInBytes", ctypes.c_size_t),
        ("srcY", ctypes.c_size_t),
        ("srcMemoryType", ctypes.c_int),
        ("srcHost", ctypes.c_void_p),
        ("srcDevice", ctypes.c_uint64),
        ("srcArray", ctypes.c_void_p),
        ("srcPitch", ctypes.c_size_t),
        ("dstXInBytes", ctypes.c_size_t),
        ("dstY", ctypes.c_size_t),
        ("dstMemoryType", ctypes.c_int),
        ("dstHost", ctypes.c_void_p),
        ("dstDevice", ctypes.c_uint64),
        ("dstArray", ctypes.c_void_p),
        ("dstPitch", ctypes.c_size_t),
        ("WidthInBytes", ctypes.c_size_t),
        ("Height", ctypes.c_size_t),
    )


@functools.cache
def _memcpy_2d() -> Any:
    """``cuMemcpy2DAsync_v2``, or None where the driver library cannot be loaded."""
    try:
        driver = ctypes.CDLL("libcuda.so.1")
        function = driver.cuMemcpy2DAsync_v2
    except (OSError, AttributeError) as exc:
        logger.info("CUDA driver not reachable through ctypes (%s); copying row by row", exc)
        return None
    function.argtypes = (ctypes.POINTER(_Memcpy2D), ctypes.c_void_p)
    function.restype = ctypes.c_int
    return function


def available() -> bool:
    """Whether ``cuMemcpy2DAsync`` can be called (the driver library loaded)."""
    return _memcpy_2d() is not None


def pitched_runs(offsets: Sequence[int], pitch: int) -> list[tuple[int, int]]:
    """``(first row, rows)`` of each run whose source offsets step by exactly ``pitch``."""
    runs: list[tuple[int, int]] = []
    start = 0
    for index in range(1, len(offsets) + 1):
        if index == len(offsets) or offsets[index] != offsets[index - 1] + pitch:
            runs.append((start, index - start))
            start = index
    return runs


def copy_rows_to_device(
    rows: torch.Tensor, host: torch.Tensor, offsets: Sequence[int], pitch: int, stream: Any
) -> None:
    """Copy ``host[offsets[i] : offsets[i] + width]`` into ``rows[i]``, enqueued on ``stream``.

    ``rows`` is a contiguous uint8 ``[n, width]`` CUDA tensor, ``host`` a pinned 1-D uint8
    tensor; rows whose offsets step by ``pitch`` go in one 2-D copy. Asynchronous: ``host``
    must stay alive and unchanged until ``stream`` has run the copies.
    """
    runs = pitched_runs(offsets, pitch)
    copy_runs_to_device(rows, host, runs, [offsets[first] for first, _ in runs], 0, pitch, stream)


def copy_runs_to_device(
    rows: torch.Tensor,
    host: torch.Tensor,
    runs: Sequence[tuple[int, int]],
    starts: Sequence[int],
    offset: int,
    pitch: int,
    stream: Any,
) -> None:
    """Like :func:`copy_rows_to_device`, for runs found already: one 2-D copy each.

    ``runs`` are :func:`pitched_runs` of the rows' offsets, ``starts[i]`` the host offset of
    run ``i``'s first row; every offset is moved by ``offset``. A layer-wise retrieve finds
    its runs once and copies each layer at its own ``offset``, so a layer costs a driver
    call per run and no Python per row.
    """
    width = rows.shape[1]
    memcpy = _memcpy_2d()
    if memcpy is None:
        with torch.cuda.stream(stream):
            for (first, count), start in zip(runs, starts, strict=True):
                for row in range(count):
                    begin = start + offset + row * pitch
                    rows[first + row].copy_(host[begin : begin + width], non_blocking=True)
        return
    base, target = host.data_ptr() + offset, rows.data_ptr()
    handle = ctypes.c_void_p(stream.cuda_stream)
    spec = _Memcpy2D(srcMemoryType=_HOST, dstMemoryType=_DEVICE, dstPitch=width, WidthInBytes=width)
    pointer = ctypes.byref(spec)
    for (first, count), start in zip(runs, starts, strict=True):
        spec.srcHost = base + start
        spec.srcPitch = pitch if count > 1 else width
        spec.dstDevice = target + first * width
        spec.Height = count
        status = memcpy(pointer, handle)
        if status != 0:
            raise RuntimeError(f"cuMemcpy2DAsync failed with CUDA error {status}")


def copy_runs_to_host(
    layers: Sequence[torch.Tensor],
    host: torch.Tensor,
    copies: Sequence[PitchedCopy],
    layer_stride: int,
    stream: Any,
) -> int:
    """Enqueue ``copies`` for every layer on ``stream``: device to pinned host; the calls made.

    Layer ``l``'s copy reads ``layers[l]`` at ``copy.src`` and writes ``host`` at ``copy.dst +
    l * layer_stride`` (the layer's part of a slot). ``layers`` are contiguous CUDA tensors
    on ``stream``'s device, ``host`` a pinned 1-D uint8 tensor. Asynchronous: both must stay
    alive and the layers unchanged until ``stream`` has run the copies. Raises
    ``RuntimeError`` where the driver cannot be reached (see :func:`available`) or refuses a
    copy; the copies enqueued before a refusal still run.
    """
    memcpy = _memcpy_2d()
    if memcpy is None:
        raise RuntimeError("the CUDA driver is not reachable through ctypes; cannot copy")
    handle = ctypes.c_void_p(stream.cuda_stream)
    spec = _Memcpy2D(srcMemoryType=_DEVICE, dstMemoryType=_HOST)
    pointer = ctypes.byref(spec)
    base = host.data_ptr()
    calls = 0
    for layer_index, layer in enumerate(layers):
        source = layer.data_ptr()
        target = base + layer_index * layer_stride
        for copy in copies:
            spec.srcDevice = source + copy.src
            spec.srcPitch = copy.src_pitch
            spec.dstHost = target + copy.dst
            spec.dstPitch = copy.dst_pitch
            spec.WidthInBytes = copy.width
            spec.Height = copy.height
            status = memcpy(pointer, handle)
            if status != 0:
                raise RuntimeError(
                    f"cuMemcpy2DAsync (device to host) failed with CUDA error {status}"
                )
            calls += 1
    return calls
