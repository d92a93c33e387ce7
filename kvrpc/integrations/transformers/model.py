"""A Hugging Face Llama run layer by layer over paged KV blocks.

:class:`PagedLlama` takes a ``transformers`` ``LlamaForCausalLM`` (any weights; the tests and
the benchmark make random ones) and runs its own modules (projections, rotary embedding,
norms, MLPs, head) in a loop that keeps each layer's keys and values in a
:class:`PagedKVCache`: one tensor per layer in vLLM's FlashAttention layout,
``[2, num_blocks, block_size, num_kv_heads, head_dim]``. A request owns a list of block ids
(its block table); token ``p`` lives in block ``table[p // block_size]`` at offset
``p % block_size``, as in vLLM.

:meth:`PagedLlama.forward` computes tokens ``[start, start + n)`` of a request whose first
``start`` tokens' KV already sit in its blocks (computed earlier, or retrieved from a kvrpc
server), calling ``wait_layer(l)`` before layer ``l`` reads the blocks: that is where a
layer-wise retrieve overlaps the transfer of the later layers with the compute of the
earlier ones, as vLLM's ``wait_for_layer_load`` hook does.

Attention is ``torch.nn.functional.scaled_dot_product_attention`` over the keys gathered
from the blocks, with the KV heads repeated for grouped-query attention, as transformers'
own ``sdpa`` path does. No I/O here: the kvrpc side is :mod:`.engine`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from kvrpc.errors import KVConfigError

__all__ = ["PagedKVCache", "PagedLlama", "slot_indices"]


def slot_indices(block_table: Sequence[int], start: int, end: int, block_size: int) -> torch.Tensor:
    """Flat token slots (``block * block_size + offset``) of positions ``[start, end)``."""
    positions = torch.arange(start, end, dtype=torch.int64)
    blocks = torch.tensor(list(block_table), dtype=torch.int64)
    if end > len(blocks) * block_size:
        raise KVConfigError(
            f"positions up to {end} need {math.ceil(end / block_size)} blocks; the table "
            f"has {len(blocks)}"
        )
    return blocks[positions // block_size] * block_size + positions % block_size


@dataclass(eq=False)
class PagedKVCache:
    """Per-layer KV tensors ``[2, num_blocks, block_size, kv_heads, head_dim]`` and a free list.

    ``allocate`` hands out block ids, ``free`` takes them back; nothing is zeroed. Blocks
    freed together come back in the order they were handed out: a fresh cache hands out
    ascending runs, and a reused table keeps them, which a server's DMA store copies a run
    at a time (``kvrpc serve --store-copies dma``); a table in descending order would cost
    it a copy per block.
    """

    layers: list[torch.Tensor]
    block_size: int
    free_blocks: list[int] = field(default_factory=list)

    @classmethod
    def empty(
        cls,
        *,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
        allocate: Callable[[Sequence[int], torch.dtype], torch.Tensor] | None = None,
    ) -> PagedKVCache:
        """A cache of ``num_blocks`` blocks a layer.

        ``allocate(shape, dtype)`` makes each layer's tensor (for CPU tensors a kvrpc server
        reads in place, :func:`kvrpc.kv.shared_empty`); by default ``torch.empty`` on
        ``device``.
        """
        shape = (2, num_blocks, block_size, kv_heads, head_dim)
        layers = [
            allocate(shape, dtype)
            if allocate is not None
            else torch.empty(shape, dtype=dtype, device=device)
            for _ in range(num_layers)
        ]
        return cls(layers, block_size, list(range(num_blocks - 1, -1, -1)))

    @property
    def num_blocks(self) -> int:
        """Blocks per layer."""
        return int(self.layers[0].shape[1])

    def allocate(self, count: int) -> list[int]:
        """``count`` free block ids; ``KVConfigError`` when fewer are free."""
        if count > len(self.free_blocks):
            raise KVConfigError(
                f"{count} KV blocks asked for, {len(self.free_blocks)} of "
                f"{self.num_blocks} free; make the cache larger or free finished requests"
            )
        taken = self.free_blocks[len(self.free_blocks) - count :]
        del self.free_blocks[len(self.free_blocks) - count :]
        return taken[::-1]

    def free(self, block_ids: Sequence[int]) -> None:
        """Give blocks back; the next ``allocate`` of as many returns them in this order."""
        self.free_blocks.extend(reversed(block_ids))

    def blocks_for(self, tokens: int) -> int:
        """Blocks that hold ``tokens`` tokens."""
        return -(-tokens // self.block_size)


class PagedLlama:
    """A ``LlamaForCausalLM``'s modules run over a :class:`PagedKVCache` (see the module doc)."""

    def __init__(self, model: Any, cache: PagedKVCache) -> None:
        config = model.config
        self.model = model
        self.cache = cache
        self.num_layers = int(config.num_hidden_layers)
        self.heads = int(config.num_attention_heads)
        self.kv_heads = int(config.num_key_value_heads)
        self.head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // self.heads)
        if len(cache.layers) != self.num_layers:
            raise KVConfigError(
                f"the model has {self.num_layers} layers, the KV cache {len(cache.layers)}"
            )
        shape = tuple(cache.layers[0].shape[3:])
        if shape != (self.kv_heads, self.head_dim):
            raise KVConfigError(
                f"the KV cache holds {list(shape)} per token, the model "
                f"[{self.kv_heads}, {self.head_dim}]"
            )
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        self._rotary = apply_rotary_pos_emb

    def forward(
        self,
        token_ids: Sequence[int] | torch.Tensor,
        start: int,
        block_table: Sequence[int],
        *,
        wait_layer: Callable[[int], None] | None = None,
        logits_for: int = 1,
    ) -> torch.Tensor:
        """Logits (float32 ``[logits_for, vocab]``) of the last ``logits_for`` tokens given.

        ``token_ids`` are the request's tokens ``[start, start + n)``; the KV of tokens
        before ``start`` must be in ``block_table``'s blocks already, and the new tokens' KV
        is written there. ``wait_layer(l)`` is called before layer ``l`` touches the blocks.
        """
        with torch.inference_mode():
            return self._forward(token_ids, start, block_table, wait_layer, logits_for)

    def _forward(
        self,
        token_ids: Sequence[int] | torch.Tensor,
        start: int,
        block_table: Sequence[int],
        wait_layer: Callable[[int], None] | None,
        logits_for: int,
    ) -> torch.Tensor:
        device = self.cache.layers[0].device
        ids = torch.as_tensor(token_ids, dtype=torch.int64).to(device).view(1, -1)
        count = ids.shape[1]
        end = start + count
        slots = slot_indices(block_table, start, end, self.cache.block_size).to(device)
        context = (
            slot_indices(block_table, 0, end, self.cache.block_size).to(device) if start else None
        )
        mask = None
        if start and count > 1:  # query i sees keys 0..start + i
            keys = torch.arange(end, device=device)
            mask = keys.view(1, -1) <= torch.arange(start, end, device=device).view(-1, 1)
        positions = torch.arange(start, end, device=device).view(1, -1)
        return self.run_layers(
            ids,
            positions,
            slots,
            context=context,
            mask=mask,
            wait_layer=wait_layer,
            logits_for=logits_for,
        )

    def run_layers(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        slots: torch.Tensor,
        *,
        context: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        wait_layer: Callable[[int], None] | None = None,
        logits_for: int = 1,
    ) -> torch.Tensor:
        """The layer loop over tensors already on the cache's device: no host work at all.

        ``ids`` and ``positions`` are int64 ``[1, n]``, ``slots`` the n new tokens' flat
        cache slots (their KV is written there). ``context`` (int64 slots) are the keys
        attention reads from the cache, the new tokens' included; None attends causally to
        the new tokens alone (a prefill from position 0). ``mask`` (bool, broadcast to
        ``[1, heads, n, len(context)]``, True where a query sees a key) hides keys; a
        context padded past the request's length must hide the padding with it, and its
        padded slots must still hold finite numbers (a hidden key's product is still taken).
        Called by :meth:`forward`, and by :mod:`.decode`'s steps, which a CUDA graph can
        capture. Run it under ``torch.inference_mode()``.
        """
        inner = self.model.model
        count = ids.shape[1]
        hidden = inner.embed_tokens(ids)
        cos, sin = inner.rotary_emb(hidden, positions)
        for index, layer in enumerate(inner.layers):
            attention = layer.self_attn
            normed = layer.input_layernorm(hidden)
            q = attention.q_proj(normed).view(1, count, -1, self.head_dim).transpose(1, 2)
            k = attention.k_proj(normed).view(1, count, -1, self.head_dim).transpose(1, 2)
            v = attention.v_proj(normed).view(1, count, -1, self.head_dim).transpose(1, 2)
            q, k = self._rotary(q, k, cos, sin)
            if wait_layer is not None:
                wait_layer(index)
            kv = self.cache.layers[index].view(2, -1, self.kv_heads, self.head_dim)
            kv[0].index_copy_(0, slots, k[0].transpose(0, 1))
            kv[1].index_copy_(0, slots, v[0].transpose(0, 1))
            if context is not None:
                k = kv[0].index_select(0, context).transpose(0, 1).unsqueeze(0)
                v = kv[1].index_select(0, context).transpose(0, 1).unsqueeze(0)
            groups = self.heads // self.kv_heads
            if groups > 1:  # each KV head repeated for its query heads, as repeat_kv does
                k = self._repeat(k, groups)
                v = self._repeat(v, groups)
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=context is None, scale=attention.scaling
            )
            out = attention.o_proj(out.transpose(1, 2).reshape(1, count, -1))
            hidden = hidden + out
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        hidden = inner.norm(hidden[:, -logits_for:])
        logits: torch.Tensor = self.model.lm_head(hidden)[0].float()
        return logits

    @staticmethod
    def _repeat(kv: torch.Tensor, groups: int) -> torch.Tensor:
        """``kv`` ``[1, kv_heads, n, d]`` with each head repeated ``groups`` times in a row.

        transformers' ``repeat_kv``: an expand and a copy, whatever the values (a graph
        captures it as one copy kernel).
        """
        one, heads, count, dim = kv.shape
        wide = kv[:, :, None].expand(one, heads, groups, count, dim)
        return wide.reshape(one, heads * groups, count, dim)
