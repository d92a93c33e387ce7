"""``kvrpc.sizes``: byte sizes written with units, as ``--cpu-buffer-size`` takes them."""

from __future__ import annotations

import pytest

from kvrpc.sizes import format_size, parse_size


@pytest.mark.parametrize(
    ("text", "nbytes"),
    [
        ("8GiB", 8 << 30),
        ("512MiB", 512 << 20),
        ("8GB", 8 * 10**9),
        ("4096B", 4096),
        ("4096", 4096),
        ("0.5 gib", 1 << 29),
        ("2g", 2 << 30),
        ("1.5K", 1536),
        ("1e3MB", 10**9),
        ("  3TiB ", 3 << 40),
        ("0", 0),
    ],
)
def test_parse_size_reads_a_number_and_its_unit(text: str, nbytes: int) -> None:
    assert parse_size(text) == nbytes


def test_a_bare_number_is_in_the_default_unit() -> None:
    assert parse_size("1", "GiB") == 1 << 30
    assert parse_size("0.25", "GiB") == 1 << 28
    assert parse_size("1MB", "GiB") == 10**6  # a unit given wins


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("inf", "not a size"),
        ("nan", "not a size"),
        ("-1GiB", "not a size"),
        ("GiB", "not a size"),
        ("", "not a size"),
        ("8 GiB GiB", "not a size"),
        ("8XB", "unknown unit 'XB'"),
        ("1e400", "more bytes than any machine has"),
        ("9e18GiB", "more bytes than any machine has"),
    ],
)
def test_parse_size_refuses_what_is_not_a_size_saying_what_is(text: str, says: str) -> None:
    with pytest.raises(ValueError, match=says) as refused:
        parse_size(text, "GiB")
    assert "GiB" in str(refused.value)  # every message names an accepted unit


def test_parse_size_refuses_an_unknown_default_unit() -> None:
    with pytest.raises(ValueError, match="unknown default unit"):
        parse_size("1", "parsecs")


@pytest.mark.parametrize(
    ("nbytes", "text"),
    [
        (10, "10 B"),
        (1536, "1.5 KiB"),
        (1 << 30, "1 GiB"),
        (1000 << 30, "1000 GiB"),
        (3 << 40, "3 TiB"),
    ],
)
def test_format_size_uses_the_largest_binary_unit(nbytes: int, text: str) -> None:
    assert format_size(nbytes) == text
