"""The transport seam, found by URL scheme: its interfaces, URLs, plugins and local sockets.

One module each: :mod:`.interface` (what servers and clients need of a transport, and the
optional capabilities), :mod:`.inbox` (the core's one bounded inbox), :mod:`.urls` (parsing
``scheme://...``), :mod:`.registry` (plugins by scheme, from entry points), :mod:`.paths`
(the user's private socket directory) and :mod:`.inproc` (the built-in ``inproc://``
transport). This package only re-exports them.
"""

from kvrpc.transport.inbox import ClientInbox, Inbox, ReadControl
from kvrpc.transport.inproc import InprocPlugin
from kvrpc.transport.interface import (
    BlockingClientTransport,
    ClientSink,
    ClientTransport,
    Oversized,
    Peer,
    PeerCredentials,
    ServerSink,
    ServerTransport,
    SupportsBlockingClient,
    SupportsPeerCredentials,
    SupportsTrySend,
    TransportOptions,
    TransportPlugin,
)
from kvrpc.transport.paths import claim_socket_path, default_url, local_url, runtime_dir
from kvrpc.transport.registry import (
    ENTRY_POINT_GROUP,
    connect_blocking,
    connect_client,
    create_server,
    get_plugin,
    register_plugin,
)
from kvrpc.transport.urls import TransportURL, parse_url

__all__ = [
    "ENTRY_POINT_GROUP",
    "BlockingClientTransport",
    "ClientInbox",
    "ClientSink",
    "ClientTransport",
    "Inbox",
    "InprocPlugin",
    "Oversized",
    "Peer",
    "PeerCredentials",
    "ReadControl",
    "ServerSink",
    "ServerTransport",
    "SupportsBlockingClient",
    "SupportsPeerCredentials",
    "SupportsTrySend",
    "TransportOptions",
    "TransportPlugin",
    "TransportURL",
    "claim_socket_path",
    "connect_blocking",
    "connect_client",
    "create_server",
    "default_url",
    "get_plugin",
    "local_url",
    "parse_url",
    "register_plugin",
    "runtime_dir",
]
