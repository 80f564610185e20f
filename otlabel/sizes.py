"""Byte sizes as people write them (``"512M"``, ``"2G"``), for ``memory_budget`` in the API and on the command line.
Imports nothing heavy: the command line reads ``--memory-budget`` before it imports torch."""

from __future__ import annotations

import math
import re


def parse_size(text: str) -> int:
    """``"256M"``, ``"1.5G"``, ``"512MiB"``, ``"1000000"`` -> bytes (powers of 1024). A sign is read, so that ``-1G``
    is told it is not positive rather than not a size. ValueError otherwise."""
    number = r"([-+]?)((?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?)"  # "5." and ".5" too
    m = re.fullmatch(r"\s*" + number + r"\s*([kKmMgGtT]?)(i?[bB])?\s*", text)
    if not m:
        raise ValueError(f"not a size: {text!r} (use e.g. 256M, 2G, 1000000)")
    sign, digits, unit = m.group(1), m.group(2), m.group(3)
    value = float(sign + digits) * 1024 ** " KMGT".index(unit.upper() or " ")
    if not math.isfinite(value):
        raise ValueError(f"not a size: {text!r} (use e.g. 256M, 2G, 1000000)")
    nonzero = re.search(r"[1-9]", re.split(r"[eE]", digits)[0]) is not None  # "1e-400" is tiny, not zero
    if sign == "-" and nonzero or not nonzero:
        raise ValueError(f"memory budget must be positive, got {text!r}")
    if value < 1:
        raise ValueError(f"memory budget must be at least 1 byte, got {text!r}")
    return int(value)
