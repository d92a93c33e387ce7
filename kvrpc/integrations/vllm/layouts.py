"""Which kvrpc layout vLLM's per-layer KV tensors are in, read from their shapes and strides.

vLLM hands a connector one tensor per attention layer. Depending on its version and
attention backend that is:

- a 4-D ``[blocks, heads, tokens, content]`` view (vLLM 0.3x; ``content`` is K and V side
  by side, or an MLA latent), whose memory order follows the engine's KV cache layout
  (``LBNHC``, ``LBHNC``, ``LHBNC``, ...);
- FlashAttention's ``[2, blocks, tokens, heads, head_dim]``, FlashInfer's
  ``[blocks, 2, tokens, heads, head_dim]``, or either with heads before tokens in memory
  (the ``HND`` layout: the same logical shape, permuted strides);
- MLA's ``[blocks, tokens, dim]``.

:func:`vllm_layout` finds, for each, the permutation of the tensor that is contiguous in
memory, and the :class:`~kvrpc.kv.layout.LayoutKind` of that physical tensor, which is what
kvrpc copies blocks of. Anything else (a layout whose blocks interleave with other layers',
say) is refused with the shape, the strides and what to configure instead. Pure: torch only.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kvrpc.errors import KVConfigError
from kvrpc.kv.layout import LayoutKind

__all__ = ["vllm_layout"]

# Per logical rank: (the permutation of the logical dims that is memory order, the kind of
# the tensor so permuted), most usual first. A dim of size 1 fits several rows; the first wins.
_CANDIDATES: dict[int, tuple[tuple[tuple[int, ...], LayoutKind], ...]] = {
    # [B, H, N, C] views of vLLM 0.3x.
    4: (
        ((0, 2, 1, 3), LayoutKind.BNHC),  # LBNHC: tokens before heads
        ((0, 1, 2, 3), LayoutKind.BHNC),  # LBHNC: heads before tokens (the CPU backend)
        ((1, 0, 2, 3), LayoutKind.HBNC),  # LHBNC: heads outermost
    ),
    3: (((0, 1, 2), LayoutKind.MLA),),
}
_FIVE_D_KV_FIRST = (
    ((0, 1, 2, 3, 4), LayoutKind.PAGED),
    ((0, 1, 3, 2, 4), LayoutKind.PAGED_HND),
)
_FIVE_D_BLOCKS_FIRST = (
    ((0, 1, 2, 3, 4), LayoutKind.BLOCKS_FIRST),
    ((0, 1, 3, 2, 4), LayoutKind.BLOCKS_FIRST_HND),
)

_HOW_TO_CONFIGURE = (
    "kvrpc moves KV caches whose layers each occupy memory of their own: with vLLM 0.3x use a "
    "layer-compact KV cache layout (VLLM_KV_CACHE_LAYOUT=LBNHC or LBHNC), and a single KV "
    "cache group (--disable-hybrid-kv-cache-manager)"
)


def _candidates(shape: Sequence[int]) -> tuple[tuple[tuple[int, ...], LayoutKind], ...]:
    if len(shape) == 5:
        return _FIVE_D_KV_FIRST if shape[0] == 2 else _FIVE_D_BLOCKS_FIRST
    return _CANDIDATES.get(len(shape), ())


def vllm_layout(tensors: Sequence[torch.Tensor]) -> tuple[LayoutKind, list[torch.Tensor]]:
    """The kind of vLLM's KV tensors and, per layer, the tensor in memory order.

    Every layer must be in the same kind (a model whose layers differ is a hybrid model,
    which kvrpc does not support). Raises :class:`~kvrpc.errors.KVConfigError` naming the
    first tensor that fits no kind, its shape and strides, and how to configure vLLM.
    """
    if not tensors:
        raise KVConfigError("vLLM registered no KV tensors")
    kind: LayoutKind | None = None
    physical: list[torch.Tensor] = []
    for index, tensor in enumerate(tensors):
        found = None
        for order, candidate in _candidates(tensor.shape):
            permuted = tensor.permute(order)
            if permuted.is_contiguous():
                found = (candidate, permuted)
                break
        if found is None:
            raise KVConfigError(
                f"KV tensor {index} of shape {list(tensor.shape)} and strides "
                f"{list(tensor.stride())} is in no layout kvrpc can move; " + _HOW_TO_CONFIGURE
            )
        if kind is not None and found[0] is not kind:
            raise KVConfigError(
                f"KV tensor {index} is in the {found[0].value} layout but tensor 0 in "
                f"{kind.value}; every layer must be in one layout (" + _HOW_TO_CONFIGURE + ")"
            )
        kind = found[0]
        physical.append(found[1])
    assert kind is not None
    return kind, physical
