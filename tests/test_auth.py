"""The handshake of kvrpc.auth as plain function calls: no sockets, no event loop."""

from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path

import pytest

from kvrpc.auth import (
    CLIENT_LABEL,
    MAGIC,
    NONCE_BYTES,
    SERVER_LABEL,
    Authenticator,
    ClientHandshake,
    FailureLimiter,
    Kind,
    ServerHandshake,
    Verdict,
    client_mac,
    is_handshake,
    message,
    refusal_error,
    server_mac,
)
from kvrpc.errors import AuthenticationFailed, Status
from kvrpc.token_file import TokenFileError, read_token_file

TOKEN = b"0123456789abcdef0123456789abcdef"


def _pair(
    server_token: bytes = TOKEN, client_token: bytes = TOKEN
) -> tuple[ServerHandshake, ClientHandshake]:
    return ServerHandshake(server_token), ClientHandshake(client_token, "test://server")


def test_the_right_token_passes_in_four_messages_and_both_sides_are_proved() -> None:
    server, client = _pair()
    challenge = server.receive([client.hello()])
    assert challenge.verdict is Verdict.PENDING
    answer = client.receive([challenge.reply])
    assert answer is not None and answer[: len(MAGIC) + 1] == MAGIC + bytes((Kind.ANSWER,))
    accept = server.receive([answer])
    assert accept.verdict is Verdict.ACCEPTED and server.verdict is Verdict.ACCEPTED
    assert client.receive([accept.reply]) is None
    assert client.done


def test_a_wrong_token_is_refused_and_the_client_is_told_why() -> None:
    server, client = _pair(client_token=b"another token, 32 bytes long!!!!")
    answer = client.receive([server.receive([client.hello()]).reply])
    assert answer is not None
    refused = server.receive([answer])
    assert refused.verdict is Verdict.REFUSED and refused.reason == "wrong token"
    with pytest.raises(AuthenticationFailed, match="wrong token"):
        client.receive([refused.reply])


def test_a_request_before_the_handshake_is_refused_without_being_decoded() -> None:
    server = ServerHandshake(TOKEN)
    request = b"\x95\x02\x00\x01\xa8rpc.ping\x90"  # a msgpack request header
    step = server.receive([request])
    assert step.verdict is Verdict.REFUSED
    assert "not a handshake message" in step.reason


@pytest.mark.parametrize(
    "frames",
    [
        [message(Kind.ANSWER, bytes(32))],  # an answer with no hello
        [message(Kind.HELLO, bytes(5))],  # a short nonce
        [message(Kind.HELLO, bytes(NONCE_BYTES)), b"x"],  # two frames
        [MAGIC + b"\x09" + bytes(32)],  # an unknown kind
        [MAGIC + bytes(1000)],  # too long
        [b""],
    ],
    ids=["answer-first", "short-nonce", "two-frames", "unknown-kind", "too-long", "empty"],
)
def test_a_misshapen_first_message_is_refused(frames: list[bytes]) -> None:
    assert ServerHandshake(TOKEN).receive(frames).verdict is Verdict.REFUSED


def test_a_second_hello_in_place_of_the_answer_is_refused() -> None:
    server, client = _pair()
    server.receive([client.hello()])
    assert server.receive([client.hello()]).verdict is Verdict.REFUSED


def test_nothing_is_accepted_after_the_handshake_ended() -> None:
    server, client = _pair()
    answer = client.receive([server.receive([client.hello()]).reply])
    assert answer is not None
    server.receive([answer])
    assert server.receive([answer]).verdict is Verdict.REFUSED


def test_the_macs_are_hmac_sha256_over_the_label_and_both_nonces() -> None:
    sn, cn = os.urandom(32), os.urandom(32)
    assert (
        client_mac(TOKEN, sn, cn)
        == hmac.new(TOKEN, CLIENT_LABEL + sn + cn, hashlib.sha256).digest()
    )
    assert (
        server_mac(TOKEN, sn, cn)
        == hmac.new(TOKEN, SERVER_LABEL + sn + cn, hashlib.sha256).digest()
    )
    assert client_mac(TOKEN, sn, cn) != server_mac(TOKEN, sn, cn)


def test_a_replayed_answer_fails_against_a_fresh_nonce() -> None:
    server, client = _pair()
    answer = client.receive([server.receive([client.hello()]).reply])
    assert answer is not None
    again = ServerHandshake(TOKEN)
    again.receive([client.hello()])  # the same client nonce, a new server nonce
    assert again.receive([answer]).verdict is Verdict.REFUSED


def test_a_server_that_does_not_hold_the_token_is_found_out_by_the_client() -> None:
    client = ClientHandshake(TOKEN, "test://impostor")
    impostor = ServerHandshake(b"the impostor's own token, 32 B!!")
    client.receive([impostor.receive([client.hello()]).reply])
    forged = message(Kind.ACCEPT, bytes(32))
    with pytest.raises(AuthenticationFailed, match="wrong server"):
        client.receive([forged])


def test_a_client_refuses_a_reply_that_is_no_handshake_message() -> None:
    client = ClientHandshake(TOKEN, "test://server")
    with pytest.raises(AuthenticationFailed, match="is it kvrpc"):
        client.receive([b"\x95\x02\x01\x00\xa0\xa4pong"])


def test_a_refusal_in_place_of_a_reply_becomes_an_error_that_says_what_to_do() -> None:
    refused = ServerHandshake(TOKEN).receive([b"\x95"]).reply
    error = refusal_error([refused], "unix:///s.sock")
    assert isinstance(error, AuthenticationFailed) and "auth_token_file" in str(error)
    assert error.status == Status.AUTHENTICATION_FAILED == 11
    assert refusal_error([b"\x95\x02"], "unix:///s.sock") is None
    assert is_handshake([refused]) and not is_handshake([b"\x95\x02"])


def test_a_token_shorter_than_16_bytes_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 16 bytes"):
        Authenticator(b"short")
    assert "0123" not in repr(Authenticator(TOKEN))  # the secret stays out of logs


# ------------------------------------------------------------------ the rate limit


def test_a_key_may_fail_its_burst_then_one_per_period() -> None:
    limiter = FailureLimiter(rate=2.0, burst=3)
    for _ in range(3):
        assert limiter.allowed("a", 0.0)
        limiter.failed("a", 0.0)
    assert not limiter.allowed("a", 0.0)
    assert limiter.retry_after("a", 0.0) == pytest.approx(0.5)
    assert not limiter.allowed("a", 0.49)
    assert limiter.allowed("a", 0.5)
    limiter.failed("a", 0.5)
    assert not limiter.allowed("a", 0.5)


def test_one_key_failing_leaves_the_others_alone() -> None:
    limiter = FailureLimiter(rate=1.0, burst=1)
    limiter.failed("attacker", 0.0)
    assert not limiter.allowed("attacker", 0.0)
    assert limiter.allowed("worker", 0.0)


def test_a_bucket_refills_to_its_burst_and_no_further() -> None:
    limiter = FailureLimiter(rate=1.0, burst=2)
    limiter.failed("a", 0.0)
    limiter.failed("a", 0.0)
    for _ in range(2):  # a long quiet spell gives back the burst, not more
        assert limiter.allowed("a", 1000.0)
        limiter.failed("a", 1000.0)
    assert not limiter.allowed("a", 1000.0)


def test_the_limiter_remembers_a_bounded_number_of_keys() -> None:
    limiter = FailureLimiter(rate=1.0, burst=1, max_keys=8)
    for index in range(100):
        limiter.failed(f"k{index}", 0.0)
    assert len(limiter._buckets) == 8
    assert not limiter.allowed("k99", 0.0)  # the latest are kept
    assert limiter.allowed("k0", 0.0)  # the oldest forgotten


# ------------------------------------------------------------------ the token file


def _token_file(tmp_path: Path, data: bytes, mode: int) -> Path:
    path = tmp_path / "token"
    path.write_bytes(data)
    path.chmod(mode)
    return path


def test_a_private_token_file_is_read_without_its_newline(tmp_path: Path) -> None:
    path = _token_file(tmp_path, TOKEN + b"\n", 0o600)
    assert read_token_file(path) == TOKEN
    assert read_token_file(_token_file(tmp_path, TOKEN, 0o400)) == TOKEN


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660])
def test_a_token_file_others_may_read_is_refused_naming_chmod(tmp_path: Path, mode: int) -> None:
    path = _token_file(tmp_path, TOKEN, mode)
    with pytest.raises(TokenFileError, match=f"mode {mode:04o}.*chmod 600"):
        read_token_file(path)


def test_a_short_or_empty_token_is_refused_naming_the_minimum(tmp_path: Path) -> None:
    for data in (b"", b"\n", b"tooshort\n"):
        with pytest.raises(TokenFileError, match="at least 16"):
            read_token_file(_token_file(tmp_path, data, 0o600))


def test_a_missing_token_file_or_a_link_is_refused(tmp_path: Path) -> None:
    with pytest.raises(TokenFileError, match="cannot open"):
        read_token_file(tmp_path / "absent")
    target = _token_file(tmp_path, TOKEN, 0o600)
    link = tmp_path / "link"
    link.symlink_to(target)
    with pytest.raises(TokenFileError, match="cannot open"):
        read_token_file(link)
