"""Specification of transport URLs, and of finding the transport plugin for a URL's scheme."""

from __future__ import annotations

import itertools
from typing import Any

import pytest

from kvrpc.errors import InvalidURL, TransportError, TransportNotFound
from kvrpc.testing.raw import RawClient, RawServer
from kvrpc.transport import (
    ENTRY_POINT_GROUP,
    ClientTransport,
    InprocPlugin,
    ServerTransport,
    TransportOptions,
    TransportURL,
    connect_client,
    create_server,
    get_plugin,
    parse_url,
    register_plugin,
)

_unique = itertools.count()


def unique_scheme() -> str:
    """A scheme no other test (or plugin) uses: the plugin table is process-global."""
    return f"test-urls{next(_unique)}+fake"


class RecordingPlugin:
    """A plugin that hands out sentinels and remembers what it was asked for."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, TransportURL, TransportOptions]] = []

    def create_server(self, url: TransportURL, options: TransportOptions) -> Any:
        self.calls.append(("server", url, options))
        return "server-transport"

    def create_client(self, url: TransportURL, options: TransportOptions) -> Any:
        self.calls.append(("client", url, options))
        return "client-transport"


# ---------------------------------------------------------------------------- parse_url


def test_parse_url_of_zmq_tcp_gives_host_and_port() -> None:
    url = parse_url("zmq+tcp://127.0.0.1:5555")
    assert url == TransportURL(
        raw="zmq+tcp://127.0.0.1:5555",
        scheme="zmq+tcp",
        host="127.0.0.1",
        port=5555,
        path="",
        netloc="127.0.0.1:5555",
        params={},
    )


@pytest.mark.parametrize(
    ("raw", "scheme", "path"),
    [
        ("zmq+ipc:///tmp/x.sock", "zmq+ipc", "/tmp/x.sock"),
        ("unix:///tmp/a.sock", "unix", "/tmp/a.sock"),
    ],
)
def test_parse_url_of_a_socket_path_gives_the_path_and_no_host(
    raw: str, scheme: str, path: str
) -> None:
    url = parse_url(raw)
    assert url.scheme == scheme
    assert url.path == path
    assert url.host == ""
    assert url.port is None
    assert url.netloc == ""


def test_parse_url_of_inproc_keeps_the_case_of_the_name_in_netloc() -> None:
    url = parse_url("inproc://Name")
    assert url.scheme == "inproc"
    assert url.netloc == "Name"
    assert url.path == ""
    assert url.port is None


def test_parse_url_lower_cases_the_scheme() -> None:
    assert parse_url("ZMQ+TCP://h:1").scheme == "zmq+tcp"


def test_parse_url_of_an_ipv6_address_strips_the_brackets() -> None:
    url = parse_url("zmq+tcp://[::1]:7000")
    assert url.host == "::1"
    assert url.port == 7000


def test_parse_url_collects_query_params() -> None:
    url = parse_url("zmq+tcp://127.0.0.1:5555/?hwm=10&linger=0")
    assert url.params == {"hwm": "10", "linger": "0"}
    assert url.port == 5555


def test_parse_url_keeps_the_last_of_a_repeated_param() -> None:
    assert parse_url("unix:///tmp/a.sock?mode=a&mode=b").params == {"mode": "b"}


def test_parse_url_keeps_the_raw_url() -> None:
    raw = "unix:///tmp/a.sock?x=1"
    assert parse_url(raw).raw == raw


@pytest.mark.parametrize(
    "raw",
    ["nonsense", "tcp://h:notaport", "tcp://h:70000", "tcp://h:-1", "://x", "1tcp://h:1", ""],
)
def test_parse_url_of_a_malformed_url_raises_invalid_url(raw: str) -> None:
    with pytest.raises(InvalidURL) as info:
        parse_url(raw)
    assert isinstance(info.value, TransportError)
    assert repr(raw) in str(info.value)


def test_parse_url_of_a_non_string_raises_invalid_url() -> None:
    with pytest.raises(InvalidURL):
        parse_url(None)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- plugins


@pytest.mark.parametrize(
    ("scheme", "package"),
    [("unix", "kvrpc-unix"), ("zmq+tcp", "kvrpc-zmq"), ("zmq+ipc", "kvrpc-zmq")],
)
def test_missing_known_plugin_names_the_package_to_install(
    scheme: str, package: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The plugins are installed in this repo's environment: hide them as if they were not.
    import importlib.metadata

    import kvrpc.transport.registry

    monkeypatch.setattr(importlib.metadata, "entry_points", lambda **_: ())
    monkeypatch.setattr(kvrpc.transport.registry, "_plugins", {})
    with pytest.raises(TransportNotFound) as info:
        get_plugin(scheme)
    assert f"pip install {package}" in str(info.value)
    assert isinstance(info.value, TransportError)


def test_unknown_scheme_lists_the_known_schemes_and_the_entry_point_group() -> None:
    with pytest.raises(TransportNotFound) as info:
        get_plugin("carrier-pigeon")
    message = str(info.value)
    assert "carrier-pigeon" in message
    for known in ("inproc", "unix", "zmq+tcp", "zmq+ipc"):
        assert known in message
    assert ENTRY_POINT_GROUP in message


def test_inproc_plugin_is_built_in() -> None:
    assert isinstance(get_plugin("inproc"), InprocPlugin)
    assert get_plugin("INPROC") is get_plugin("inproc")


def test_register_plugin_makes_a_custom_scheme_resolvable() -> None:
    scheme = unique_scheme()
    plugin = RecordingPlugin()
    with pytest.raises(TransportNotFound):
        get_plugin(scheme)
    register_plugin(scheme, plugin)
    assert get_plugin(scheme) is plugin
    assert get_plugin(scheme.upper()) is plugin


def test_registered_scheme_is_listed_among_the_known_schemes() -> None:
    scheme = unique_scheme()
    register_plugin(scheme, RecordingPlugin())
    with pytest.raises(TransportNotFound, match=scheme.replace("+", r"\+")):
        get_plugin(unique_scheme())


def test_create_server_and_connect_client_hand_the_parsed_url_to_the_plugin() -> None:
    scheme = unique_scheme()
    plugin = RecordingPlugin()
    register_plugin(scheme, plugin)
    options = TransportOptions(max_message_size=1234)

    assert create_server(f"{scheme}://host:1?a=b") == "server-transport"
    assert connect_client(f"{scheme}://host:2", options) == "client-transport"

    (kind1, url1, options1), (kind2, url2, options2) = plugin.calls
    assert (kind1, url1.host, url1.port, url1.params) == ("server", "host", 1, {"a": "b"})
    assert options1 == TransportOptions()
    assert (kind2, url2.port) == ("client", 2)
    assert options2 is options


def test_create_server_for_an_uninstalled_scheme_raises_transport_not_found() -> None:
    with pytest.raises(TransportNotFound, match="no transport plugin handles nowhere"):
        create_server("nowhere:///tmp/a.sock")


# ----------------------------------------------------------------------------- inproc


def test_inproc_url_gives_transports_of_both_sides() -> None:
    assert isinstance(create_server("inproc://both-sides"), ServerTransport)
    assert isinstance(connect_client("inproc://both-sides"), ClientTransport)


@pytest.mark.parametrize("raw", ["inproc://", "inproc://?x=1"])
def test_inproc_url_without_a_name_raises_invalid_url(raw: str) -> None:
    with pytest.raises(InvalidURL, match="name"):
        create_server(raw)
    with pytest.raises(InvalidURL, match="name"):
        connect_client(raw)


async def test_inproc_names_are_case_sensitive() -> None:
    name = f"CaseSensitive{next(_unique)}"
    server = await RawServer(f"inproc://{name}").start()
    try:
        with pytest.raises(TransportError, match=name.lower()):
            await RawClient(f"inproc://{name.lower()}").connect()
        client = await RawClient(f"inproc://{name}").connect()
        try:
            await client.send([b"hello"])
            _, frames = await server.recv(10)
            assert frames == [b"hello"]
        finally:
            await client.close()
    finally:
        await server.close()
    with pytest.raises(TransportError):  # and a closed server's name is free of it
        await RawClient(f"inproc://{name}").connect()


@pytest.mark.parametrize(
    ("scheme", "module"),
    [("unix", "kvrpc_unix"), ("zmq+tcp", "kvrpc_zmq"), ("zmq+ipc", "kvrpc_zmq")],
)
def test_installed_plugins_are_found_by_scheme_through_entry_points(
    scheme: str, module: str
) -> None:
    assert type(get_plugin(scheme)).__module__.startswith(module)
