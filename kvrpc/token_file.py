"""Reading the shared secret from a token file, refusing one that others could read.

The one piece of the authentication that touches the file system; the handshake itself is in
:mod:`kvrpc.auth`, with no I/O.
"""

from __future__ import annotations

import os
import stat

from kvrpc.auth import MIN_TOKEN_BYTES, Authenticator
from kvrpc.errors import KvrpcError

__all__ = ["TokenFileError", "load_authenticator", "read_private_file", "read_token_file"]


class TokenFileError(KvrpcError, ValueError):
    """A token file that cannot be used: missing, readable by others, not ours, or too short."""


def read_private_file(path: str | os.PathLike[str], what: str) -> bytes:
    """The bytes of ``path``, a file only its owner may read; raises :class:`TokenFileError`.

    The file must be a regular file owned by this process's user whose mode gives the group
    and others nothing (0600 or stricter), and at most 64 KiB. The check is made on the open
    descriptor, so the file read is the file checked. ``what`` names the file in errors.
    """
    name = os.fspath(path)
    try:
        fd = os.open(name, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise TokenFileError(f"cannot open the {what} {name}: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise TokenFileError(f"the {what} {name} is not a regular file")
        if info.st_uid != os.getuid():
            raise TokenFileError(
                f"the {what} {name} belongs to uid {info.st_uid}, not to this user "
                f"(uid {os.getuid()}); use a file of your own"
            )
        if info.st_mode & 0o077:
            raise TokenFileError(
                f"the {what} {name} has mode {stat.S_IMODE(info.st_mode):04o}, which "
                f"lets other users read it; run: chmod 600 {name}"
            )
        data = b""
        while chunk := os.read(fd, 4096):
            data += chunk
            if len(data) > 64 * 1024:
                raise TokenFileError(f"the {what} {name} is over 64 KiB; is it the right file?")
    finally:
        os.close(fd)
    return data


def read_token_file(path: str | os.PathLike[str]) -> bytes:
    """The token in ``path``, without a trailing newline; raises :class:`TokenFileError`.

    The file must pass :func:`read_private_file`'s checks (0600, this user's) and hold at
    least :data:`MIN_TOKEN_BYTES` bytes.
    """
    name = os.fspath(path)
    data = read_private_file(path, "auth token file")
    token = data.rstrip(b"\r\n")
    if len(token) < MIN_TOKEN_BYTES:
        raise TokenFileError(
            f"the auth token file {name} holds {len(token)} bytes; a token needs at least "
            f"{MIN_TOKEN_BYTES} (make one with: "
            f"python -c 'import secrets; print(secrets.token_hex(32))' > {name})"
        )
    return token


def load_authenticator(path: str | os.PathLike[str] | None) -> Authenticator | None:
    """An :class:`Authenticator` for the token in ``path``; None for no path."""
    if path is None:
        return None
    return Authenticator(read_token_file(path))
