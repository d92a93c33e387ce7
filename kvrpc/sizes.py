"""Byte sizes as people write them on a command line: ``8GiB``, ``512MiB``, ``8GB``, ``4096B``.

Pure functions, no I/O: :func:`parse_size` turns such text into a byte count and
:func:`format_size` writes a byte count back for messages.
"""

from __future__ import annotations

import math
import re

__all__ = ["UNITS", "format_size", "parse_size"]

#: Every unit :func:`parse_size` knows (case-insensitive), in bytes. ``KB``/``MB``/``GB``/``TB``
#: are decimal, as disk makers and ``df -H`` count; ``KiB``... and the one-letter ``K``/``M``/
#: ``G``/``T`` are binary, as ``free``, Docker and the JVM read them.
UNITS: dict[str, int] = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 1 << 10,
    "mib": 1 << 20,
    "gib": 1 << 30,
    "tib": 1 << 40,
    "k": 1 << 10,
    "m": 1 << 20,
    "g": 1 << 30,
    "t": 1 << 40,
}

_SIZE = re.compile(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*")


def parse_size(text: str, default_unit: str = "B") -> int:
    """The number of bytes ``text`` names, rounded down to a whole byte.

    ``text`` is a non-negative number with an optional unit of :data:`UNITS`, spaces allowed
    between them (``"8GiB"``, ``"0.5 gib"``, ``"8GB"``, ``"4096"``); a bare number is in
    ``default_unit``. Raises :class:`ValueError` with a message saying what is accepted for
    anything else: another unit, a sign, ``inf`` or ``nan``, or more bytes than fit in 64 bits.
    Zero is returned as 0: whether it is allowed is the caller's rule.
    """
    unit_bytes = UNITS.get(default_unit.lower())
    if unit_bytes is None:
        raise ValueError(f"unknown default unit {default_unit!r}; one of {_unit_names()}")
    match = _SIZE.fullmatch(text)
    if match is None:
        raise ValueError(
            f"{text!r} is not a size: give a number with an optional unit, like 8GiB, "
            f"512MiB, 8GB or 4096B (a bare number is {default_unit})"
        )
    number, unit = match.groups()
    if unit:
        found = UNITS.get(unit.lower())
        if found is None:
            raise ValueError(f"{text!r}: unknown unit {unit!r}; use one of {_unit_names()}")
        unit_bytes = found
    value = float(number) * unit_bytes
    # The pattern admits only finite numbers, but a huge one overflows to inf when scaled.
    if not math.isfinite(value) or value >= 2**63:
        raise ValueError(
            f"{text!r} is more bytes than any machine has; give a size like 8GiB or 512MiB"
        )
    return int(value)


def format_size(nbytes: int) -> str:
    """``nbytes`` in the largest binary unit that leaves at least 1, like ``1.5 GiB``."""
    for name, scale in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f}".removesuffix(".0") + f" {name}"
    return f"{nbytes} B"


def _unit_names() -> str:
    return "B, KB, MB, GB, TB (powers of 1000), KiB, MiB, GiB, TiB or K, M, G, T (of 1024)"
