"""A byte view of a tensor's memory, for tiers that hand chunk bytes to files and sockets."""

from __future__ import annotations

import ctypes

import torch

__all__ = ["memory_of"]


def memory_of(tensor: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous 1-D uint8 CPU tensor's memory, without a copy.

    torch tensors do not export the buffer protocol (and numpy is not a dependency), so the
    view goes through ctypes: an array type of the right length placed at ``data_ptr()``.
    The view does not keep the tensor alive. It is safe because each user holds
    a reference to the tensor until it has dropped the view, and the tier's callers keep the
    tensor's storage in place (no resize) and unused by others until the awaited call returns.
    """
    n = tensor.numel()
    if n == 0:
        return memoryview(bytearray())
    return memoryview((ctypes.c_ubyte * n).from_address(tensor.data_ptr())).cast("B")
