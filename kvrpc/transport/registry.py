"""The transport plugins, found by URL scheme: registered in this process or by entry point.

A distribution registers a :class:`~kvrpc.transport.TransportPlugin` under the entry-point
group ``kvrpc.transports`` with the URL scheme as the entry-point name. ``inproc://`` is
registered here, built in.
"""

from __future__ import annotations

import threading

from kvrpc.errors import TransportNotFound
from kvrpc.transport.inproc import InprocPlugin
from kvrpc.transport.interface import (
    BlockingClientTransport,
    ClientTransport,
    ServerTransport,
    SupportsBlockingClient,
    TransportOptions,
    TransportPlugin,
)
from kvrpc.transport.urls import parse_url

__all__ = [
    "ENTRY_POINT_GROUP",
    "connect_blocking",
    "connect_client",
    "create_server",
    "get_plugin",
    "register_plugin",
]

ENTRY_POINT_GROUP = "kvrpc.transports"

#: Schemes whose plugin kvrpc knows by name, so a missing one can be named in the error.
_KNOWN_PACKAGES = {"zmq+tcp": "kvrpc-zmq", "zmq+ipc": "kvrpc-zmq", "unix": "kvrpc-unix"}

_plugins: dict[str, TransportPlugin] = {}
_plugins_lock = threading.Lock()


def register_plugin(scheme: str, plugin: TransportPlugin) -> None:
    """Make ``plugin`` handle ``scheme`` in this process, ahead of any entry point."""
    with _plugins_lock:
        _plugins[scheme.lower()] = plugin


def get_plugin(scheme: str) -> TransportPlugin:
    """The plugin for ``scheme``: registered in this process, or found by entry point.

    Raises :class:`TransportNotFound` naming the package to install.
    """
    scheme = scheme.lower()
    with _plugins_lock:
        plugin = _plugins.get(scheme)
        if plugin is not None:
            return plugin
        from importlib.metadata import entry_points  # 10 ms: only when a plugin is needed

        found = entry_points(group=ENTRY_POINT_GROUP, name=scheme)
        for entry in found:
            try:
                loaded = entry.load()
            except Exception as exc:
                raise TransportNotFound(
                    f"the plugin for {scheme}:// ({entry.value}) failed to import: {exc}"
                ) from exc
            # An entry point may name a plugin class or a ready instance.
            found_plugin: TransportPlugin = loaded() if isinstance(loaded, type) else loaded
            _plugins[scheme] = found_plugin
            return found_plugin
    package = _KNOWN_PACKAGES.get(scheme)
    if package is not None:
        raise TransportNotFound(
            f"no transport for {scheme}:// is installed; install it with 'pip install {package}'"
        )
    known = ", ".join(sorted({"inproc", *_KNOWN_PACKAGES, *_plugins}))
    raise TransportNotFound(
        f"no transport plugin handles {scheme}://; known schemes: {known}. A plugin registers "
        f"its scheme under the entry-point group {ENTRY_POINT_GROUP!r}"
    )


def create_server(url: str, options: TransportOptions | None = None) -> ServerTransport:
    """A server transport for ``url``, from the plugin of its scheme."""
    parsed = parse_url(url)
    return get_plugin(parsed.scheme).create_server(parsed, options or TransportOptions())


def connect_client(url: str, options: TransportOptions | None = None) -> ClientTransport:
    """A client transport for ``url`` (call ``connect()`` on it), from its scheme's plugin."""
    parsed = parse_url(url)
    return get_plugin(parsed.scheme).create_client(parsed, options or TransportOptions())


def connect_blocking(
    url: str, options: TransportOptions, timeout: float
) -> BlockingClientTransport | None:
    """A connected blocking client for ``url``, or None where its plugin offers none."""
    parsed = parse_url(url)
    plugin = get_plugin(parsed.scheme)
    if not isinstance(plugin, SupportsBlockingClient):
        return None
    return plugin.connect_blocking(parsed, options, timeout)


register_plugin("inproc", InprocPlugin())
