"""The metrics port: a minimal HTTP/1.1 server of GET requests, on the server's own loop.

Three paths: ``/metrics`` (the Prometheus exposition), ``/livez`` and ``/readyz``. It runs on
the event loop that serves RPC, so a probe reads the live state with no lock, and
``/livez`` answering at all says the loop is responsive. Each connection carries one
request and is closed after the reply (``Connection: close``): scrapers and probes open one
per request anyway, and no keep-alive state is kept.

The request head is parsed by :func:`parse_request_head`, a pure function (h11's way:
bytes in, a value out), tested without sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

__all__ = [
    "MAX_HEAD_BYTES",
    "BadRequest",
    "MetricsHTTPServer",
    "Request",
    "Response",
    "parse_request_head",
    "render_response",
]

logger = logging.getLogger("kvrpc.metrics")

#: A request head longer than this is refused (431): probes and scrapers send a few hundred.
MAX_HEAD_BYTES = 8192
#: Seconds a client may take to send its request head before the connection is closed.
HEAD_TIMEOUT = 5.0

_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
    505: "HTTP Version Not Supported",
}


@dataclass(frozen=True)
class Request:
    """A parsed request line: ``method`` (upper case), ``path`` (decoded, no query)."""

    method: str
    path: str
    query: str
    version: str


@dataclass(frozen=True)
class Response:
    """What a route answers: a status, a body and its content type."""

    status: int
    body: bytes
    content_type: str = "text/plain; charset=utf-8"


class BadRequest(Exception):
    """A request head that cannot be served; ``status`` is the HTTP status to answer."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


def parse_request_head(head: bytes) -> Request:
    """The request of ``head``: its bytes up to and including the blank line.

    Only the request line matters here; header lines are checked for shape and ignored (a
    GET carries no body, so neither ``Content-Length`` nor ``Transfer-Encoding`` changes
    anything). Raises :class:`BadRequest` with 400 for a malformed head, 505 for a version
    other than HTTP/1.0 or 1.1, and 431 past :data:`MAX_HEAD_BYTES`.
    """
    if len(head) > MAX_HEAD_BYTES:
        raise BadRequest(431, f"the request head is over {MAX_HEAD_BYTES} bytes")
    try:
        text = head.decode("ascii")
    except UnicodeDecodeError:
        raise BadRequest(400, "the request head is not ASCII") from None
    lines = text.split("\r\n")
    # RFC 9112 2.2: a server should ignore empty lines received before the request line.
    while lines and lines[0] == "":
        lines.pop(0)
    if not lines:
        raise BadRequest(400, "no request line")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not all(parts):
        raise BadRequest(400, f"a request line is METHOD TARGET VERSION, not {lines[0][:80]!r}")
    method, target, version = parts
    if not method.isalpha() or not method.isupper():
        raise BadRequest(400, f"bad method {method[:20]!r}")
    if version not in ("HTTP/1.0", "HTTP/1.1"):
        if version.startswith("HTTP/"):
            raise BadRequest(505, f"{version[:20]} is not served; use HTTP/1.1")
        raise BadRequest(400, f"bad version {version[:20]!r}")
    if not target.startswith("/"):
        raise BadRequest(400, "the target must be a path (origin form), like /metrics")
    for line in lines[1:]:
        if line and (":" not in line or line[0] in " \t"):
            raise BadRequest(400, f"bad header line {line[:40]!r}")
    split = urlsplit(target)
    return Request(method, unquote(split.path), split.query, version)


def render_response(response: Response, *, head_only: bool = False) -> bytes:
    """The bytes of ``response`` on the wire, closing the connection after it."""
    reason = _REASONS.get(response.status, "Unknown")
    head = (
        f"HTTP/1.1 {response.status} {reason}\r\n"
        f"Content-Type: {response.content_type}\r\n"
        f"Content-Length: {len(response.body)}\r\n"
        "Cache-Control: no-store\r\n"
        "Connection: close\r\n\r\n"
    ).encode("ascii")
    return head if head_only else head + response.body


Route = Callable[[], Response]


def route(request: Request, routes: dict[str, Route]) -> tuple[Response, bool]:
    """The response to ``request`` and whether only its head is sent (a HEAD request)."""
    handler = routes.get(request.path)
    if handler is None:
        known = ", ".join(sorted(routes))
        return Response(404, f"no such path; this port serves {known}\n".encode()), False
    if request.method not in ("GET", "HEAD"):
        return Response(405, b"only GET and HEAD are served\n"), False
    return handler(), request.method == "HEAD"


class MetricsHTTPServer:
    """Serves ``routes`` (path -> a function making the response) on ``host:port``.

    Every route runs on the loop that started the server, between its other callbacks.
    ``port`` 0 picks a free port: :attr:`port` says which, once :meth:`start` returned.
    """

    def __init__(self, host: str, port: int, routes: dict[str, Route]) -> None:
        self.host = host
        self.requested_port = port
        self.routes = routes
        self.port = port
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        """``http://HOST:PORT`` (the host in brackets if it is an IPv6 address)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def start(self) -> MetricsHTTPServer:
        """Listen; raises ``OSError`` if the address cannot be bound."""
        self._server = await asyncio.start_server(
            self._serve_one, self.host, self.requested_port, limit=MAX_HEAD_BYTES + 2
        )
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def aclose(self) -> None:
        """Stop listening and close the connections still open; idempotent."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        for writer in list(self._writers):
            writer.close()
        with contextlib.suppress(Exception):
            await server.wait_closed()

    async def __aenter__(self) -> MetricsHTTPServer:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def _serve_one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # asyncio's server runs each connection in a task of its own; a bounded read timeout
        # ends every one of them, and aclose() closes those still open.
        self._writers.add(writer)
        try:
            try:
                async with asyncio.timeout(HEAD_TIMEOUT):
                    head = await reader.readuntil(b"\r\n\r\n")
                response, head_only = route(parse_request_head(head), self.routes)
            except BadRequest as bad:
                response, head_only = Response(bad.status, f"{bad.detail}\n".encode()), False
            except asyncio.LimitOverrunError:
                response = Response(
                    431, f"the request head is over {MAX_HEAD_BYTES} bytes\n".encode()
                )
                head_only = False
            except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
                return  # the client went quiet or away: nobody to answer
            except Exception:
                logger.exception("the metrics endpoint failed to answer a request")
                response, head_only = Response(500, b"internal error; see the server log\n"), False
            writer.write(render_response(response, head_only=head_only))
            with contextlib.suppress(ConnectionError):
                await writer.drain()
        finally:
            self._writers.discard(writer)
            writer.close()
