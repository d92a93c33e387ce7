"""Per-key outcomes of stores and retrieves: integer statuses with names, and a sentence.

A batch of keys can succeed for some keys and fail for others, so a store's or a retrieve's
reply carries one :class:`KeyStatus` per key rather than an exception. The client branches
on the status, never on text: ``detail`` is a sentence for logs (the first failure's).
Pure: no I/O. The server's state core builds :class:`KeyFailure` values; the replies carry
them as ``statuses`` and ``detail`` (:class:`KeyOutcomes`).
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict

__all__ = [
    "ALREADY_STORED",
    "BEING_STORED",
    "CHECKSUM_MISMATCH",
    "DEADLINE_PASSED",
    "NOT_IN_CACHE",
    "NO_FREE_SLOT",
    "WORKER_GONE",
    "KeyFailure",
    "KeyOutcomes",
    "KeyStatus",
    "StoreReply",
    "copy_failed",
    "outcome_fields",
]


class KeyStatus(enum.IntEnum):
    """What happened to one key of a store or a retrieve. A number never changes meaning."""

    OK = 0  #: copied
    ALREADY_STORED = 1  #: store: the server holds the chunk already (not a loss)
    BEING_STORED = 2  #: store: another store of the chunk is in flight
    NO_FREE_SLOT = 3  #: store: every slot of the pool is pinned or being written
    NOT_IN_CACHE = 4  #: retrieve: never stored, or evicted
    COPY_FAILED = 5  #: the copy raised; the server's log has the error
    DEADLINE_PASSED = 6  #: retrieve: the deadline passed before the copy started
    WORKER_GONE = 7  #: the worker unregistered while the call waited; nothing was copied
    WRONG_NAMESPACE = 8  #: keys of another model or world size than the instance's
    WRONG_WORKER = 9  #: keys of another worker (rank) than the instance's
    BAD_BLOCK_ID = 10  #: a block id outside the KV cache
    CHECKSUM_MISMATCH = 11  #: retrieve: the copied bytes failed the chunk's checksum

    @property
    def held(self) -> bool:
        """True if the server holds the chunk after this store (OK or ALREADY_STORED)."""
        return self is KeyStatus.OK or self is KeyStatus.ALREADY_STORED


@dataclass(frozen=True, slots=True)
class KeyFailure:
    """Why one key was not copied: its status, and a sentence for logs."""

    status: KeyStatus
    detail: str


# The failures whose sentence never changes, built once.
ALREADY_STORED = KeyFailure(KeyStatus.ALREADY_STORED, "already stored")
BEING_STORED = KeyFailure(KeyStatus.BEING_STORED, "being stored")
NO_FREE_SLOT = KeyFailure(
    KeyStatus.NO_FREE_SLOT, "no free slot: every chunk in the pool is pinned or being written"
)
NOT_IN_CACHE = KeyFailure(KeyStatus.NOT_IN_CACHE, "not in the cache (never stored, or evicted)")
DEADLINE_PASSED = KeyFailure(
    KeyStatus.DEADLINE_PASSED, "the deadline passed before the copy started; no block was written"
)
WORKER_GONE = KeyFailure(KeyStatus.WORKER_GONE, "the worker unregistered; nothing was copied")
CHECKSUM_MISMATCH = KeyFailure(
    KeyStatus.CHECKSUM_MISMATCH,
    "the chunk's bytes in the blocks do not match its checksum (--verify-retrieves): "
    "recompute these tokens; the server's log says whether its own copy was bad",
)


def copy_failed(error: BaseException | str) -> KeyFailure:
    """A COPY_FAILED failure naming ``error`` (an exception, or what went wrong)."""
    what = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    return KeyFailure(KeyStatus.COPY_FAILED, f"copy failed: {what}")


def _status(value: Any) -> Any:
    # The wire carries plain ints; strict validation would take only KeyStatus members.
    # An int that names no status fails here, so a reply is never half understood.
    return KeyStatus(value) if type(value) is int else value


#: A KeyStatus as it travels: an int on the wire, checked against the known statuses.
WireStatus = Annotated[KeyStatus, BeforeValidator(_status)]


class KeyOutcomes(BaseModel):
    """Per-key outcome of a store or a retrieve: ``statuses[i]`` is key ``i``'s.

    ``detail`` is the first failed key's sentence ("" when every key is OK), for logs.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", arbitrary_types_allowed=True)

    statuses: list[WireStatus]
    detail: str = ""

    def ok(self) -> list[int]:
        """The indices of the keys that were copied."""
        return [i for i, status in enumerate(self.statuses) if status is KeyStatus.OK]

    def failed(self) -> list[int]:
        """The indices of the keys that were not copied (ALREADY_STORED included)."""
        return [i for i, status in enumerate(self.statuses) if status is not KeyStatus.OK]


class StoreReply(KeyOutcomes):
    """Per-key outcome of a ``shm`` or ``inline`` store (``kv.store``)."""


def outcome_fields(results: Sequence[KeyFailure | None]) -> dict[str, Any]:
    """``statuses`` and ``detail`` for a reply, from the state core's per-key results."""
    statuses = [KeyStatus.OK if result is None else result.status for result in results]
    detail = next((result.detail for result in results if result is not None), "")
    return {"statuses": statuses, "detail": detail}
