"""Settings of servers and clients are checked when they are made, naming the bad value."""

from __future__ import annotations

from typing import Any

import pytest

from kvrpc import AsyncClient, RPCServer, SyncClient


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("max_workers", 0),
        ("max_in_flight_per_peer", -1),
        ("max_message_size", 10),
        ("shutdown_grace", -0.5),
        ("inbox_burst", 0),
        ("inbox_burst_bytes", 0),
        ("max_workers", "8"),  # strict: no coercion from strings
    ],
)
def test_server_refuses_a_bad_setting_naming_it(option: str, value: Any) -> None:
    with pytest.raises(ValueError, match=rf"RPCServer: {option}={value!r}"):
        RPCServer("inproc://config-test", **{option: value})


@pytest.mark.parametrize("client", [AsyncClient, SyncClient])
@pytest.mark.parametrize(
    ("option", "value"),
    [("timeout", 0), ("connect_timeout", -1.0), ("max_in_flight", 0), ("max_message_size", 1)],
)
def test_client_refuses_a_bad_setting_naming_it(client: Any, option: str, value: Any) -> None:
    with pytest.raises(ValueError, match=rf"^client: {option}={value!r}"):
        client("inproc://config-test", **{option: value})


def test_settings_are_kept_as_given() -> None:
    server = RPCServer("inproc://config-test", max_workers=3, shutdown_grace=1)
    assert (server.max_workers, server.shutdown_grace) == (3, 1.0)
    client = AsyncClient("inproc://config-test", timeout=None, max_in_flight=7)
    assert (client.timeout, client.max_in_flight) == (None, 7)


async def test_the_server_s_inbox_takes_both_burst_bounds_from_its_config() -> None:
    default = RPCServer("inproc://config-inbox-default")
    assert default.config.inbox_burst_bytes == 256 * 1024
    async with RPCServer("inproc://config-inbox", inbox_burst=8, inbox_burst_bytes=4096) as server:
        inbox = server._inbox
        assert inbox is not None
        assert (inbox.burst, inbox.burst_bytes) == (8, 4096)


def test_kvrpc_serve_leaves_the_inbox_byte_budget_to_the_config_unless_given() -> None:
    from kvrpc import cli

    assert cli._parser().parse_args(["serve"]).inbox_burst_bytes is None  # ServerConfig's
    given = cli._parser().parse_args(["serve", "--inbox-burst-bytes", "64KiB"])
    assert given.inbox_burst_bytes == 64 * 1024
