"""Per-client caps and ownership, as plain calls on the state core.

Each cap (registrations, sessions, pins, prefetch jobs, bytes in flight) refuses the call
that would pass it with :class:`ClientLimitReached`, changes nothing, and leaves other
clients alone; a client id bound to one process cannot be used by another
(:class:`NotOwner`). The same rules over a real Unix socket are in ``test_caps_unix.py``.
"""

from __future__ import annotations

import pytest

from kvrpc import cli
from kvrpc.errors import ClientLimitReached, KVConfigError, NotOwner, Status
from kvrpc.kv.server.caps import ClientCaps
from kvrpc.kv.server.pool import ChunkPool
from kvrpc.kv.server.records import Job
from kvrpc.kv.server.serving import GB, KVServerSettings
from kvrpc.kv.server.state import KVState

from .test_state import (
    CHUNK,
    ME,
    OTHER,
    SLOT,
    TIMEOUT,
    FakeTier,
    count,
    end,
    evicted_to_tier,
    hashes,
    keys_for,
    lookup,
    lookup_keys,
    pinned,
    register,
    rows,
    spec,
    store,
)


def capped(slots: int = 8, *, tier: FakeTier | None = None, **caps: int) -> KVState:
    """A state whose clients have ``caps`` (the rest at their defaults)."""
    state = KVState(chunk_size=CHUNK, client_timeout=TIMEOUT, tier=tier, caps=ClientCaps(**caps))
    state.set_pool(ChunkPool(slots * SLOT, SLOT, pin_memory=False))
    return state


def pins_held(state: KVState, client_id: bytes) -> int:
    """The client's pins as its sessions hold them, checked against its running count."""
    client = state.clients[client_id]
    held = sum(len(state.sessions.sessions[key].pins) for key in client.sessions)
    assert client.pins == held, "the client's pin count drifted from its sessions' pins"
    return held


# ------------------------------------------------------------------ the caps themselves


def test_the_default_caps_are_the_serve_flags_defaults() -> None:
    # The flags' defaults, as `kvrpc serve --help` shows them, are ClientCaps' own.
    defaults = vars(cli._parser().parse_args(["serve"]))
    caps = ClientCaps()
    assert defaults["max_registrations_per_client"] == caps.registrations
    assert defaults["max_sessions_per_client"] == caps.sessions
    assert defaults["max_pins_per_client"] == caps.pins
    assert defaults["max_prefetch_jobs_per_client"] == caps.prefetch_jobs
    assert defaults["max_inflight_per_client"] * GB == caps.inflight_bytes
    assert KVServerSettings().client_caps == caps


def test_the_settings_carry_each_cap_and_a_cap_below_1_is_refused() -> None:
    settings = KVServerSettings(
        max_registrations_per_client=2,
        max_sessions_per_client=3,
        max_pins_per_client=4,
        max_prefetch_jobs_per_client=5,
        max_inflight_per_client=0.5,
    )
    assert settings.client_caps == ClientCaps(2, 3, 4, 5, GB // 2)
    for field in ("registrations", "sessions", "pins", "prefetch_jobs", "inflight_bytes"):
        with pytest.raises(KVConfigError, match=field):
            ClientCaps(**{field: 0})
    with pytest.raises(KVConfigError, match="sessions"):
        ClientCaps(sessions=True)  # a bool is not a count


def test_a_refusal_names_the_cap_its_flag_and_travels_as_client_limit() -> None:
    state = capped(sessions=1)
    register(state)
    assert count(state, "r1", []) == 0
    with pytest.raises(ClientLimitReached) as refused:
        lookup(state, "r2", [])
    message = str(refused.value)
    assert "--max-sessions-per-client" in message and "1" in message
    assert refused.value.status == Status.CLIENT_LIMIT == 106
    assert state.stats(0)["client_limits"] == 1


# ------------------------------------------------------------------ registrations


def test_registrations_past_the_cap_are_refused_until_one_is_unregistered() -> None:
    state = capped(registrations=2)
    first = register(state, worker_id=0, world_size=4)
    register(state, worker_id=1, world_size=4)
    with pytest.raises(ClientLimitReached, match="--max-registrations-per-client"):
        register(state, worker_id=2, world_size=4)
    assert len(state.instances) == 2 and len(state.clients[ME].instances) == 2

    register(state, OTHER, worker_id=2, world_size=4)  # another client's own allowance

    assert state.unregister(ME, first.id, 0.0) is first
    register(state, worker_id=3, world_size=4)  # one freed, one more fits


def test_registrations_checked_together_are_counted_again_when_added() -> None:
    # Two registrations pass their checks while their tensors are mapped; only one may land.
    state = capped(registrations=1)
    a, b = spec(0, world_size=2), spec(1, world_size=2)
    checked_a = state.check_registration(ME, a, 0.0)
    checked_b = state.check_registration(ME, b, 0.0)
    state.add_instance(ME, a, *checked_a)
    with pytest.raises(ClientLimitReached):
        state.add_instance(ME, b, *checked_b)
    assert len(state.instances) == 1


# ------------------------------------------------------------------ sessions


def test_sessions_past_the_cap_are_refused_but_a_requests_own_session_is_replaced() -> None:
    state = capped(sessions=2)
    instance = register(state)
    stored = hashes(2, 1)
    assert store(state, instance, stored) == [None, None]
    assert count(state, "r1", stored) == 2
    assert count(state, "r2", stored[:1]) == 1
    assert pins_held(state, ME) == 3

    with pytest.raises(ClientLimitReached, match="--max-sessions-per-client"):
        lookup(state, "r3", stored)
    assert (pins_held(state, ME), len(state.sessions.sessions)) == (3, 2)  # nothing changed
    assert count(state, "r1", stored[:1]) == 1  # its own request again: replaced, not added
    assert (pins_held(state, ME), len(state.sessions.sessions)) == (2, 2)


def test_one_client_at_its_session_cap_never_stops_another() -> None:
    state = capped(sessions=1)
    instance = register(state)
    stored = hashes(1, 1)
    assert store(state, instance, stored) == [None]
    assert count(state, "a", stored) == 1
    with pytest.raises(ClientLimitReached):
        lookup(state, "b", stored)
    assert count(state, "b", stored, client=OTHER) == 1  # OTHER's first session
    assert end(state, "a") == 1
    assert count(state, "c", stored) == 1  # ending one made room
    assert pinned(state) == 1 and pins_held(state, ME) == 1 and pins_held(state, OTHER) == 1


# ------------------------------------------------------------------ pins


def test_pins_past_the_cap_are_refused_and_the_earlier_session_is_kept() -> None:
    state = capped(pins=3)
    instance = register(state)
    stored = hashes(4, 1)
    assert store(state, instance, stored) == [None] * 4
    assert count(state, "r1", stored[:2]) == 2
    with pytest.raises(ClientLimitReached, match="--max-pins-per-client"):
        lookup(state, "r2", stored[:2])  # 2 + 2 > 3
    with pytest.raises(ClientLimitReached):
        lookup(state, "r1", stored)  # replacing r1's 2 by 4: still past 3
    assert pins_held(state, ME) == 2 and pinned(state) == 2  # r1 kept its pins
    assert count(state, "r1", stored[:3]) == 3  # replacing 2 by 3 fits
    assert pins_held(state, ME) == 3
    assert count(state, "r2", stored[:3], client=OTHER) == 3  # OTHER has its own allowance


def test_retrieves_release_pins_and_make_room_under_the_cap() -> None:
    state = capped(pins=2)
    instance = register(state)
    stored = hashes(2, 1)
    assert store(state, instance, stored) == [None, None]
    assert count(state, "r1", stored) == 2
    with pytest.raises(ClientLimitReached):
        lookup(state, "r2", stored[:1])
    plan = state.begin_retrieve(instance, ["r1"], keys_for(instance, stored[:1]), rows(1, 32))
    state.settle_retrieve(plan, None)
    assert pins_held(state, ME) == 1
    assert count(state, "r2", stored[:1]) == 1
    assert pins_held(state, ME) == 2


def test_a_prefetch_counts_only_the_chunks_the_pin_cap_can_hold() -> None:
    # The lookup's plan fits (2 pins to load), but a later lookup takes one of them: the job
    # then pins and counts only what fits, so it never answers a chunk it could not pin.
    state = capped(slots=4, tier=FakeTier(), pins=2)
    instance = register(state)
    wanted = hashes(2, 1)
    evicted_to_tier(state, instance, wanted)
    job = lookup(state, "r", wanted)
    assert isinstance(job, Job)
    in_l1 = hashes(state.pool.num_slots if state.pool else 0, seed=999)[-1:]
    assert count(state, "other-request", in_l1) == 1  # takes one pin meanwhile
    for key in (h + instance.suffix for h in wanted):
        slot = state.sessions.prefetch_slot(job, key)
        assert slot is not None
        state.sessions.prefetched(job, key, slot, True)
    assert state.sessions.finish_prefetch(job) == 1  # the second chunk found no pin
    assert pins_held(state, ME) == 2
    assert state.query_prefetch_status(ME, job.id, 0.0) == 1


# ------------------------------------------------------------------ prefetch jobs


def test_prefetch_jobs_past_the_cap_are_refused_until_a_count_is_taken() -> None:
    state = capped(slots=4, tier=FakeTier(), prefetch_jobs=1)
    instance = register(state)
    wanted = hashes(2, 1)
    evicted_to_tier(state, instance, wanted)
    job = lookup(state, "r1", wanted)
    assert isinstance(job, Job)
    with pytest.raises(ClientLimitReached, match="--max-prefetch-jobs-per-client"):
        lookup(state, "r2", wanted)
    assert job.id in state.sessions.jobs and not job.dropped  # the first job runs on
    again = lookup(state, "r1", wanted)  # r1's own job is replaced, so it fits
    assert isinstance(again, Job) and job.dropped
    state.sessions.finish_prefetch(again)
    assert state.query_prefetch_status(ME, again.id, 0.0) == 0  # nothing was loaded
    assert isinstance(lookup(state, "r2", wanted), Job)  # the count taken made room


# ------------------------------------------------------------------ bytes in flight


def test_bytes_in_flight_past_the_cap_are_refused_until_copies_settle() -> None:
    state = capped(inflight_bytes=2 * SLOT)
    instance = register(state)
    first = hashes(2, 1)
    plan = state.begin_store(instance, keys_for(instance, first), rows(2))
    assert state.clients[ME].inflight_bytes == 2 * SLOT
    with pytest.raises(ClientLimitReached, match="--max-inflight-per-client"):
        state.begin_store(instance, keys_for(instance, hashes(1, 7)), rows(1))
    with pytest.raises(ClientLimitReached):
        state.begin_retrieve(instance, ["r"], keys_for(instance, first[:1]), rows(1, 32))
    other = register(state, OTHER, worker_id=0)
    assert store(state, other, hashes(1, 8)) == [None]  # another client is not held up

    state.settle_store(plan, None)
    assert state.clients[ME].inflight_bytes == 0
    assert store(state, instance, hashes(1, 7)) == [None]


def test_a_call_alone_is_admitted_whatever_its_size_and_abandoning_frees_its_bytes() -> None:
    state = capped(inflight_bytes=SLOT)
    instance = register(state)
    stored = hashes(3, 1)
    plan = state.begin_store(instance, keys_for(instance, stored), rows(3))  # 3 slots > cap
    assert len(plan.reserved) == 3 and state.clients[ME].inflight_bytes == 3 * SLOT
    state.abandon_store(plan)
    state.abandon_store(plan)  # twice frees nothing twice
    assert state.clients[ME].inflight_bytes == 0 and state.pool is not None
    assert state.pool.bytes_used == 0

    assert store(state, instance, stored) == [None] * 3
    retrieve = state.begin_retrieve(instance, ["r"] * 3, keys_for(instance, stored), rows(3, 32))
    assert state.clients[ME].inflight_bytes == 3 * SLOT
    state.abandon_retrieve(retrieve)
    assert state.clients[ME].inflight_bytes == 0 and pinned(state) == 0
    # A store of keys already stored reserves nothing, so it holds no bytes.
    duplicate = state.begin_store(instance, keys_for(instance, stored), rows(3))
    assert duplicate.reserved == [] and state.clients[ME].inflight_bytes == 0


# ------------------------------------------------------------------ who the caller is


def test_a_client_id_bound_to_a_process_refuses_every_other_caller() -> None:
    state = capped()
    me, intruder = (1000, 41), (1000, 42)
    state.client(ME, 1.0, me)
    state.check_caller(ME, me)
    for caller in (intruder, (0, 41), None):  # another pid, another uid, an unknown peer
        with pytest.raises(NotOwner, match="another process") as refused:
            state.check_caller(ME, caller)
        assert refused.value.status == Status.NOT_OWNER == 107
    with pytest.raises(NotOwner):
        state.client(ME, 5.0, intruder)  # a keepalive from it renews nothing
    assert state.clients[ME].last_seen == 1.0
    state.check_caller(OTHER, intruder)  # an unknown id passes: its first call binds it
    assert OTHER not in state.clients
    assert state.stats(0)["not_owner"] == 4


def test_a_client_first_seen_unidentified_is_bound_by_its_first_identified_call() -> None:
    state = capped()
    state.client(ME, 0.0, None)  # a keepalive over a transport that names no process
    state.check_caller(ME, None)
    state.check_caller(ME, (1000, 7))
    assert state.clients[ME].principal == (1000, 7)
    with pytest.raises(NotOwner):
        state.check_caller(ME, (1000, 8))


def test_a_registration_and_a_lookup_bind_the_client_they_make() -> None:
    state = capped()
    state.check_registration(ME, spec(0), 0.0, (1000, 7))
    assert state.clients[ME].principal == (1000, 7)
    with pytest.raises(NotOwner):
        state.check_registration(ME, spec(0), 0.0, (1000, 8))
    register(state, b"client-3" * 2)  # a worker, so that the lookup finds a namespace
    assert state.lookup(OTHER, "r", lookup_keys(hashes(1, 1)), 0.0, (5, 5)) == 0
    assert state.clients[OTHER].principal == (5, 5)
    with pytest.raises(NotOwner):
        state.lookup(OTHER, "r", lookup_keys(hashes(1, 1)), 0.0, (5, 6))
    assert len(state.sessions.sessions) == 1  # the refused lookup opened nothing
