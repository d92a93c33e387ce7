"""ZMQ CURVE keys for ``zmq+tcp://``: making a server's keypair and reading key files.

CURVE (libzmq's CurveZMQ) encrypts a ``zmq+tcp`` connection and proves the server's identity:
a client that does not know the server's public key, or that speaks no CURVE, completes no
zmq handshake, so not one of its requests reaches the server. libzmq then admits any client
that knows that public key (kvrpc installs no ZAP handler to list client keys), so the
public key file is the clients' credential: keep it as private as a token file, or add
``--auth-token-file`` for a shared secret on top.

Key files hold one key in zmq's Z85 text form (40 characters) and a newline. The secret file
must pass the token file's checks (mode 0600, this user's); the public key is derived from it.
pyzmq is imported only where keys are made or checked, so ``import kvrpc`` does not load it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvrpc.token_file import TokenFileError, read_private_file

__all__ = [
    "CURVE_SCHEME",
    "CurveKeys",
    "check_curve_url",
    "client_curve_keys",
    "server_curve_keys",
    "write_keypair",
]

#: The only scheme CURVE applies to (ipc and unix sockets are guarded by file modes).
CURVE_SCHEME = "zmq+tcp"
_Z85_KEY_CHARS = 40


@dataclass(frozen=True, slots=True)
class CurveKeys:
    """One side's CURVE keypair (Z85) and, on a client, the server's public key.

    ``server_key`` None: these are a server's keys (it listens as a CURVE server).
    """

    public: bytes
    secret: bytes
    server_key: bytes | None = None

    def __repr__(self) -> str:  # never print a secret key in a log or a traceback
        role = "server" if self.server_key is None else "client"
        return f"CurveKeys({role}, public={self.public.decode()})"


def _zmq() -> Any:
    try:
        import zmq
    except ImportError:
        raise TokenFileError(
            "CURVE keys need pyzmq: install the zmq transport (pip install kvrpc-zmq)"
        ) from None
    if not zmq.has("curve"):
        raise TokenFileError("this pyzmq's libzmq was built without CURVE support")
    return zmq


def _key(data: bytes, what: str, name: str) -> bytes:
    """The one Z85 key in ``data``; raises :class:`TokenFileError` naming the file."""
    from zmq.utils import z85

    key = data.strip()
    if len(key) != _Z85_KEY_CHARS:
        raise TokenFileError(
            f"the {what} {name} holds {len(key)} characters; a CURVE key is "
            f"{_Z85_KEY_CHARS} in Z85 (make a keypair with: kvrpc keygen-curve DIR)"
        )
    try:
        z85.decode(key)
    except (ValueError, KeyError, TypeError):
        raise TokenFileError(f"the {what} {name} is not a Z85 CURVE key") from None
    return key


def check_curve_url(url: str) -> None:
    """Raise ``ValueError`` unless ``url`` is a ``zmq+tcp://`` URL, the one CURVE applies to."""
    scheme = url.split("://", 1)[0]
    if scheme != CURVE_SCHEME:
        raise ValueError(
            f"{url}: CURVE encryption is for zmq+tcp:// URLs only; {scheme}:// sockets are "
            "guarded by their file modes (use --auth-token-file for a shared secret there)"
        )


def server_curve_keys(secret_file: str | os.PathLike[str] | None) -> CurveKeys | None:
    """A server's keys from its secret key file (mode 0600); None for no file."""
    if secret_file is None:
        return None
    name = os.fspath(secret_file)
    zmq = _zmq()
    secret = _key(read_private_file(name, "CURVE secret key file"), "CURVE secret key file", name)
    public: bytes = zmq.curve_public(secret)
    return CurveKeys(public, secret)


def client_curve_keys(server_key_file: str | os.PathLike[str] | None) -> CurveKeys | None:
    """A client's keys: a fresh keypair of its own and the server's public key from its file.

    The client's keypair is made anew for each client: with no ZAP handler the server admits
    any client key, so a stored one would prove nothing more. None for no file.
    """
    if server_key_file is None:
        return None
    name = os.fspath(server_key_file)
    zmq = _zmq()
    try:
        data = Path(name).read_bytes()
    except OSError as exc:
        raise TokenFileError(
            f"cannot open the CURVE server key file {name}: {exc.strerror}"
        ) from None
    server_key = _key(data, "CURVE server key file", name)
    public, secret = zmq.curve_keypair()
    return CurveKeys(public, secret, server_key)


def write_keypair(directory: str | os.PathLike[str], name: str = "server") -> tuple[Path, Path]:
    """Write a new keypair as ``NAME.key`` (public) and ``NAME.key_secret`` (0600) in ``directory``.

    Refuses (``FileExistsError``) to replace either file. Both files are created with mode
    0600: the public key is what admits a client (see the module's docstring).
    """
    zmq = _zmq()
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    public, secret = zmq.curve_keypair()
    paths = (folder / f"{name}.key", folder / f"{name}.key_secret")
    for path, key in zip(paths, (public, secret), strict=True):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(key + b"\n")
    return paths
