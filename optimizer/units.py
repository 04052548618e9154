"""Byte sizes: parse what a person types, format what a person reads.

Convention (documented in the README):
    * ``GB``, ``G``, ``MB``, ``M``, ``KB``, ``K``, ``TB``, ``T`` are **decimal** (SI): 1 GB = 10**9 bytes.
      That is how the Hugging Face Hub and GPU marketing ("a 16 GB card") state sizes, and it is the
      cautious reading of a budget: ``15GB`` = 13.97 GiB.
    * ``GiB``, ``MiB``, ``KiB``, ``TiB`` are binary: 1 GiB = 2**30 bytes (what nvidia-smi and torch show).
    * A bare number is bytes.

Everything inside exl2opt is an ``int`` number of bytes; only the CLI and reports format them.

>>> parse_size("15GB")
15000000000
>>> parse_size("15.5GiB")
16642998272
>>> parse_sizes("24GB,24GB")
(24000000000, 24000000000)
"""

from __future__ import annotations

import math
import re

from optimizer.errors import SizeParseError

_UNITS: dict[str, int] = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "m": 10**6,
    "mb": 10**6,
    "g": 10**9,
    "gb": 10**9,
    "t": 10**12,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}

_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([a-zA-Z]*)\s*$")

#: Largest size accepted (1 PiB); protects arithmetic downstream from absurd input.
MAX_SIZE = 2**50

GIB = 2**30
MIB = 2**20


def parse_size(text: str, *, allow_zero: bool = False) -> int:
    """Parse one size such as ``15GB``, ``15G``, ``15GiB``, ``15000MiB``, ``15.5GB`` into bytes.

    ``allow_zero`` accepts ``0`` (e.g. an overhead term); budgets must be positive.

    Raises:
        SizeParseError: the text is not a size, uses an unknown unit, or is not positive.
    """
    if not isinstance(text, str):
        raise SizeParseError(f"invalid size {text!r}: expected text such as 15GB or 16GiB")
    shown = shown_value(text)
    m = _SIZE_RE.match(text)
    if not m:
        raise SizeParseError(
            f"invalid size {shown}: expected a number and a unit such as 15GB, 15GiB or 15000MiB"
        )
    number, unit = m.group(1), m.group(2).lower()
    if unit not in _UNITS:
        raise SizeParseError(
            f"invalid size {shown}: unknown unit {shown_value(m.group(2))} (use B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)"
        )
    if len(number.split(".")[0].lstrip("0")) > 20:  # more digits than any size below the cap
        raise SizeParseError(f"invalid size {shown}: larger than 1 PiB")
    value = float(number) * _UNITS[unit]
    if allow_zero and value == 0:
        return 0
    if value > MAX_SIZE:
        raise SizeParseError(f"invalid size {shown}: larger than 1 PiB")
    if not math.isfinite(value) or value <= 0:
        raise SizeParseError(f"invalid size {shown}: must be greater than zero")
    result = int(round(value))
    if result <= 0:
        raise SizeParseError(f"invalid size {shown}: must be at least one byte")
    return result


def shown_value(text: str, limit: int = 40) -> str:
    """``repr(text)`` cut to about ``limit`` characters, for error lines about option values."""
    r = repr(text)
    return r if len(r) <= limit else f"{r[:limit - 8]}...' ({len(text)} characters)"


#: Most entries in a per-GPU list (as ``--gpus``).
MAX_DEVICES = 64


def parse_sizes(text: str, *, allow_zero: bool = False) -> tuple[int, ...]:
    """Parse a comma-separated per-GPU list (``24GB,24GB``) into bytes per device."""
    parts = text.split(",", MAX_DEVICES)
    if len(parts) > MAX_DEVICES:
        raise SizeParseError(f"invalid size list {shown_value(text)}: more than {MAX_DEVICES} GPUs")
    if not parts or any(not p.strip() for p in parts):
        raise SizeParseError(f"invalid size list {shown_value(text)}: expected e.g. 24GB or 24GB,24GB")
    return tuple(parse_size(p, allow_zero=allow_zero) for p in parts)


def fmt_gib(n_bytes: int | float, digits: int = 2) -> str:
    """Format bytes as GiB, e.g. ``12.88 GiB``."""
    return f"{n_bytes / GIB:.{digits}f} GiB"


def fmt_gb(n_bytes: int | float, digits: int = 2) -> str:
    """Format bytes as decimal GB, e.g. ``13.83 GB``."""
    return f"{n_bytes / 1e9:.{digits}f} GB"


def fmt_both(n_bytes: int | float) -> str:
    """Format bytes in both units: ``15.00 GB (13.97 GiB)``."""
    return f"{fmt_gb(n_bytes)} ({fmt_gib(n_bytes)})"


def fmt_mib(n_bytes: int | float) -> str:
    """Format bytes as whole MiB, e.g. ``1002 MiB``."""
    return f"{n_bytes / MIB:.0f} MiB"
