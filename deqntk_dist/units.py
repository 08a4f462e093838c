"""Sizes in bytes: the one parser behind every memory option of the library and the CLI.

``GiB`` / ``MiB`` / ``KiB`` / ``TiB`` are powers of two, ``GB`` / ``MB`` / ``kB`` / ``TB``
powers of ten, ``B`` or a bare number is bytes.  Units are case-insensitive; a bare
``G`` / ``M`` / ``K`` / ``T`` is refused as ambiguous (the CLI once read ``1G`` as 2³⁰).
"""

from __future__ import annotations

import math
import re

from .errors import InputError

__all__ = ["UNITS", "format_size", "parse_size"]

#: Unit (lower case) -> bytes.
UNITS: dict[str, int] = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}

_SIZE = re.compile(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*")


def parse_size(value: int | float | str, *, param: str = "size", minimum: int = 1) -> int:
    """Bytes from an integer or a string such as ``"16GB"``, ``"512 MiB"``, ``"2e9"``.

    Parameters
    ----------
    value : int, float or str
        A number of bytes (an integral float is accepted), or a number and a unit.
    param : str
        Name used in the error message (a keyword argument or a CLI flag).
    minimum : int
        Smallest accepted size in bytes.

    Returns
    -------
    int
        The size in bytes (fractions of a byte are rounded down).

    Raises
    ------
    InputError
        Not a size, an unknown or ambiguous unit, not finite, or below ``minimum``.
    """
    hint = "a size such as 16GB (10^9), 512MiB (2^20) or 4096 (bytes)"
    if isinstance(value, bool):
        raise InputError(f"{param} must be {hint}, got {value!r}")
    if isinstance(value, int | float):
        n = float(value)
    elif isinstance(value, str):
        m = _SIZE.fullmatch(value)
        if not m:
            raise InputError(f"{param} must be {hint}, got {value!r}")
        unit = m.group(2).lower()
        if unit in ("k", "m", "g", "t"):
            raise InputError(
                f"{param} has the ambiguous unit {m.group(2)!r} in {value!r}: write "
                f"{m.group(2).upper()}B (powers of 10) or {m.group(2).upper()}iB (powers of 2)"
            )
        if unit not in UNITS:
            raise InputError(
                f"{param} has an unknown unit {m.group(2)!r} in {value!r}; use one of "
                "B, kB, MB, GB, TB, KiB, MiB, GiB, TiB"
            )
        n = float(m.group(1)) * UNITS[unit]
    else:
        raise InputError(f"{param} must be {hint}, got {type(value).__name__} {value!r}")
    if not math.isfinite(n):
        raise InputError(f"{param} must be a finite size, got {value!r}")
    if n < minimum:
        raise InputError(f"{param} must be at least {format_size(minimum)}, got {value!r}")
    return int(n)


def format_size(n: int) -> str:
    """A byte count for messages: ``1 MiB``, ``1.5 GiB``, ``4096 B``."""
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.4g} {unit}"
    return f"{n} B"
