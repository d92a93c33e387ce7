"""The connector's settings: the ``kvrpc.*`` keys of vLLM's ``kv_connector_extra_config``.

Checked once, when the connector starts, so that a typo or a bad value stops the engine with
a message naming the key and what it accepts, instead of running with a default nobody chose.
Pure: no vLLM, no I/O.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from kvrpc.errors import InvalidURL, KVConfigError
from kvrpc.kv.client.hosts import server_urls
from kvrpc.transport import parse_url

__all__ = ["PREFIX", "ConnectorSettings"]

logger = logging.getLogger("kvrpc.vllm")

#: Every key of the connector's own starts with this.
PREFIX = "kvrpc."


class ConnectorSettings(BaseModel):
    """What the connector is told, with the defaults it uses when it is told nothing.

    Build it with :meth:`from_extra_config`; the field names are the keys without ``kvrpc.``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str | list[str] | None = Field(
        default=None,
        description=(
            "The kvrpc server's URL, or a list of one per host (in host order) for an engine "
            "whose workers span hosts; unset: the default of `kvrpc serve` on this host."
        ),
    )
    worker_url: str | None = Field(
        default=None,
        description=(
            "The URL this host's workers use instead of their entry in `kvrpc.url`: a local "
            "socket of the same server (`kvrpc serve --also-url`), which GPU and shared-memory "
            "caches need, where `kvrpc.url` lists TCP URLs for the scheduler."
        ),
    )
    model_name: str | None = Field(
        default=None,
        min_length=1,
        description="The name chunks are kept under; unset: vLLM's model (path or id).",
    )
    timeout: float = Field(
        default=10.0, gt=0, description="Seconds a store or retrieve may take before it fails."
    )
    lookup_timeout: float = Field(
        default=2.0,
        gt=0,
        description="Seconds a lookup may take; past it the prompt counts as a miss.",
    )
    connect_timeout: float = Field(
        default=5.0, gt=0, description="Seconds to reach the server at start-up."
    )
    keepalive_interval: float = Field(
        default=2.0, gt=0, description="Seconds between keepalives to the server."
    )
    auth_token_file: str | None = Field(
        default=None,
        description=(
            "The server's token file (`kvrpc serve --auth-token-file`; mode 0600, this user's): "
            "the scheduler and the workers prove they hold it before any request."
        ),
    )
    retrieve_deadline: float | None = Field(
        default=None,
        gt=0,
        description="CUDA only: seconds a retrieve may wait to start before it is a load error.",
    )
    save_decode_cache: bool = Field(
        default=False, description="Also store the chunks that decoding fills, not only prompts."
    )
    chunk_keys: Literal["tokens", "block_hashes"] = Field(
        default="tokens",
        description=(
            "What names a chunk on the server: 'tokens' hashes its token ids (any engine or "
            "router that hashes the same tokens finds it); 'block_hashes' reuses vLLM's own "
            "block hashes, so a lookup hashes nothing (about 1/256 of the work), and hits "
            "only engines with the same --prefix-caching-hash-algo and hash seed."
        ),
    )
    layerwise: bool = Field(
        default=False,
        description=(
            "Load synchronously, layer by layer: vLLM schedules a hit at once and each "
            "attention layer waits only for its own layer (cuda_ipc overlaps the copies with "
            "the forward); false: load before the request computes (vLLM's async loading)."
        ),
    )
    transfer_mode: Literal["auto", "cuda_ipc", "shm", "inline"] = Field(
        default="auto",
        description=(
            "How KV bytes reach the server: auto is cuda_ipc for GPU caches and inline (bytes "
            "in the messages) for vLLM's own CPU caches."
        ),
    )

    kv_events: bool | None = Field(
        default=None,
        description=(
            "Tell vLLM's KV-events publisher what the kvrpc servers hold (BlockStored and "
            "BlockRemoved, medium CPU or STORAGE, ownership kvrpc:<tier>); unset: on when vLLM "
            "publishes KV events (--kv-events-config enable_kv_cache_events)."
        ),
    )
    kv_events_chunks: int = Field(
        default=16384,
        ge=1,
        description=(
            "Chunks the scheduler remembers for KV events (their vLLM block hashes, tokens "
            "and where they are held), least recently told of forgotten first."
        ),
    )
    kv_events_unnamed: bool = Field(
        default=True,
        description=(
            "Also tell of chunks this engine never saw (stored by another engine, or before "
            "it started), by their kvrpc chunk hash with block_size 0; false: skip them."
        ),
    )

    @field_validator("url", "worker_url")
    @classmethod
    def _urls_are_urls(cls, url: str | list[str] | None) -> str | list[str] | None:
        # Refused at start, naming the bad entry, rather than at the first connect.
        if url is None:
            return None
        try:
            for each in server_urls(url):
                parse_url(each)
        except (ValueError, InvalidURL) as exc:
            raise ValueError(str(exc)) from None
        return url

    @property
    def urls(self) -> list[str] | None:
        """``url`` as a list, one URL per host; None when unset."""
        return None if self.url is None else server_urls(self.url)

    @classmethod
    def from_extra_config(cls, extra: Mapping[str, Any] | None) -> ConnectorSettings:
        """The settings in ``extra`` (vLLM's ``kv_connector_extra_config``).

        Keys outside ``kvrpc.*`` belong to someone else and are left alone (logged). An
        unknown ``kvrpc.*`` key or a bad value raises :class:`~kvrpc.errors.KVConfigError`
        naming the key and what it accepts.
        """
        ours: dict[str, Any] = {}
        for key, value in (extra or {}).items():
            if not isinstance(key, str) or not key.startswith(PREFIX):
                logger.info("kv_connector_extra_config key %r is not kvrpc's; ignored", key)
                continue
            name = key.removeprefix(PREFIX)
            if name not in cls.model_fields:
                raise KVConfigError(
                    f"unknown key {key!r} in kv_connector_extra_config; kvrpc's keys are "
                    + ", ".join(f"{PREFIX}{n}" for n in cls.model_fields)
                )
            ours[name] = value
        try:
            return cls.model_validate(ours)
        except ValidationError as exc:
            error = exc.errors()[0]
            name = str(error["loc"][0]) if error["loc"] else "?"
            raise KVConfigError(
                f"kv_connector_extra_config key {PREFIX}{name} = {ours.get(name)!r}: "
                f"{error['msg']}; accepted: {cls.accepted(name)}"
            ) from None

    @classmethod
    def accepted(cls, name: str) -> str:
        """What field ``name`` accepts, for error messages."""
        field = cls.model_fields.get(name)
        if field is None:
            return "?"
        annotation = getattr(field.annotation, "__name__", None) or str(field.annotation)
        annotation = annotation.replace("typing.", "")
        bounds = [
            f"{label} {getattr(m, attr)}"
            for m in field.metadata
            for attr, label in (("gt", ">"), ("ge", ">="), ("min_length", "length >="))
            if getattr(m, attr, None) is not None
        ]
        return f"{annotation}{' ' + ', '.join(bounds) if bounds else ''} ({field.description})"
