"""A small engine driver for Hugging Face ``transformers`` Llama models (an optional extra).

:class:`PagedLlama` runs a ``LlamaForCausalLM`` over paged KV blocks in vLLM's
FlashAttention layout; :class:`CachingEngine` adds kvrpc: prefix lookups, retrieves (whole
or layer by layer) and stores through the same adapters as the vLLM connector. It is what
``kvrpc bench e2e`` measures time to first token with. :class:`Decoder` steps a request's
decode with its context slots kept on the device, optionally replayed from CUDA graphs.
Importing this package needs ``transformers`` only when a model is wrapped.
"""

from kvrpc.integrations.transformers.decode import ContextSlots, Decoder
from kvrpc.integrations.transformers.engine import CachingEngine, Prefill
from kvrpc.integrations.transformers.model import PagedKVCache, PagedLlama, slot_indices

__all__ = [
    "CachingEngine",
    "ContextSlots",
    "Decoder",
    "PagedKVCache",
    "PagedLlama",
    "Prefill",
    "slot_indices",
]
