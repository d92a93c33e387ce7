"""Transport URLs: ``scheme://netloc/path?options``, parsed once into a :class:`TransportURL`."""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import parse_qsl, urlsplit

from kvrpc.errors import InvalidURL

__all__ = ["TransportURL", "parse_url"]


@dataclass(frozen=True, slots=True)
class TransportURL:
    """A parsed transport URL: ``scheme://host:port/path?key=value``."""

    raw: str
    scheme: str
    host: str
    port: int | None
    path: str
    netloc: str = ""
    params: dict[str, str] = field(default_factory=dict)


def parse_url(url: str) -> TransportURL:
    """Parse a transport URL; raises :class:`InvalidURL` with the reason."""
    if not isinstance(url, str) or "://" not in url:
        raise InvalidURL(f"{url!r} is not a transport URL like 'zmq+tcp://127.0.0.1:5555'")
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError as exc:
        raise InvalidURL(f"{url!r}: {exc}") from None
    scheme = parts.scheme.lower()
    if not scheme:
        raise InvalidURL(f"{url!r} has no scheme")
    return TransportURL(
        raw=url,
        scheme=scheme,
        host=parts.hostname or "",
        port=port,
        path=parts.path,
        netloc=parts.netloc,
        params=dict(parse_qsl(parts.query)),
    )
