"""How much one client may hold on a KV server: the per-client caps and their refusals.

Every table the server keeps for a client grows with what the client asks for: a registered
KV cache per ``kv.register_kv_cache``, a session per looked-up request, its pins, a prefetch
job per lookup that loads from a lower tier, and the bytes of the copies its stores and
retrieves run. Without a bound, one client (a bug, or a client that never ends its
requests) could grow them until the server runs out of memory or pins the whole pool, and
every other client would pay. :class:`ClientCaps` bounds each per client, and
:func:`refuse` is the one error a call gets when it would pass one: nothing of that call is
done, nothing the client already has is lost, and other clients never notice.

The defaults are far above what an engine needs (a scheduler holds a session per request
in flight, a worker registers once) and small enough that a runaway client is stopped long
before the server's memory is at risk. Plain values, no I/O: the state core checks them
(:mod:`kvrpc.kv.server.state`, :mod:`kvrpc.kv.server.sessions`).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from kvrpc.errors import ClientLimitReached, KVConfigError

__all__ = ["ClientCaps", "refuse"]

GiB = 1 << 30


@dataclass(frozen=True)
class ClientCaps:
    """What one client (one client id) may hold at once; each must be at least 1.

    ``registrations``: KV caches registered and not unregistered. ``sessions``: requests
    looked up and not ended. ``pins``: a session's hold on one chunk slot, summed over the
    client's sessions (two sessions holding one slot count two). ``prefetch_jobs``: jobs
    whose count the client has not taken. ``inflight_bytes``: bytes of the chunks its
    stores and retrieves are copying (a GPU copy counts until it has completed); a call
    that alone is larger is still admitted while the client has nothing else in flight,
    so no cap can stop a client for good.
    """

    registrations: int = 16
    sessions: int = 65536
    pins: int = 1 << 20
    prefetch_jobs: int = 4096
    inflight_bytes: int = 4 * GiB

    def __post_init__(self) -> None:
        for each in fields(self):
            value = getattr(self, each.name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise KVConfigError(
                    f"the per-client cap {each.name} must be a whole number of at least 1, "
                    f"not {value!r}"
                )


#: Per cap: what it counts, the ``kvrpc serve`` flag that sets it, and what frees some.
_WHAT = {
    "registrations": (
        "registered KV caches",
        "--max-registrations-per-client",
        "unregister one first",
    ),
    "sessions": (
        "open sessions (requests looked up and not ended)",
        "--max-sessions-per-client",
        "end finished requests (end_session) first",
    ),
    "pins": (
        "pinned chunks over its sessions",
        "--max-pins-per-client",
        "end sessions or release pins first",
    ),
    "prefetch_jobs": (
        "prefetch jobs whose count it has not taken",
        "--max-prefetch-jobs-per-client",
        "take their counts (query_prefetch_status) or end their requests first",
    ),
    "inflight_bytes": (
        "bytes of copies in flight",
        "--max-inflight-per-client",
        "wait for its stores and retrieves to finish, then retry",
    ),
}


def refuse(cap: str, held: int, wanted: int, limit: int) -> ClientLimitReached:
    """The error of a call that would take the client's ``cap`` from ``held`` past ``limit``.

    ``wanted`` is what the call would add. The message names the cap, its flag and what to
    do, so that an operator reading a client's log knows which flag to look at.
    """
    what, flag, remedy = _WHAT[cap]
    return ClientLimitReached(
        f"this client holds {held} {what} and the call needs {wanted} more, past this "
        f"server's cap of {limit} ({flag}); nothing was done: {remedy}, or raise the cap"
    )
