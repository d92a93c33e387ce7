"""kvrpc as the KV-cache backend of a vLLM engine: :class:`KvrpcConnector`.

vLLM loads it from its ``--kv-transfer-config``::

    {"kv_connector": "KvrpcConnector",
     "kv_connector_module_path": "kvrpc.integrations.vllm",
     "kv_role": "kv_both",
     "kv_connector_extra_config": {"kvrpc.url": "unix:///run/kvrpc/kv.sock"}}

Importing this package does not import vLLM: the engine-free parts (the settings, the
scheduler-side plan and the layout detection) load alone, and ``KvrpcConnector`` (which
subclasses vLLM's ``KVConnectorBase_V1``) is imported on first access. See docs/vllm.md.
"""

from __future__ import annotations

from typing import Any

from kvrpc.integrations.vllm.settings import ConnectorSettings

__all__ = ["ConnectorSettings", "KvrpcConnector", "KvrpcConnectorMetadata", "KvrpcConnectorStats"]

_NEEDS_VLLM = frozenset({"KvrpcConnector", "KvrpcConnectorMetadata", "KvrpcConnectorStats"})


def __getattr__(name: str) -> Any:
    # vLLM's connector factory does getattr(module, "KvrpcConnector"): that, and only that,
    # imports vLLM.
    if name in _NEEDS_VLLM:
        from kvrpc.integrations.vllm import connector

        return getattr(connector, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
