"""Sizes, durations and rates as operators write them, and as relayctl shows them.

The config file speaks in ``"25MB"``, ``"15m"`` and ``"100/hour"`` because
bare numbers of bytes and seconds are where typos hide (is 2500000 2.5MB or
25MB?). The parsers raise ValueError whose text is the second half of a
config problem line (``expected a size like "25MB", got "lots"``), so the
config loader only has to put the file, line and key in front of it.

Decimal units are powers of ten (kB = 1000 bytes), binary units powers of
two (KiB = 1024 bytes), as on disk labels and in SI; the short forms that
relayctl prints ("2.9K", "1.2M") are decimal too.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass

__all__ = [
    "Rate",
    "format_duration",
    "format_rate",
    "format_size",
    "parse_duration",
    "parse_rate",
    "parse_size",
]

_SIZE_UNITS: dict[str, int] = {
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
_SIZE_RE = re.compile(r"(?P<number>[0-9]+(?:\.[0-9]+)?)\s*(?P<unit>[A-Za-z]*)")
_SIZE_EXAMPLE = 'expected a size like "25MB"'

_DURATION_UNITS: dict[str, int] = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION_PART_RE = re.compile(r"\s*(?P<number>[0-9]+(?:\.[0-9]+)?)\s*(?P<unit>[a-z]*)\s*")
_DURATION_EXAMPLE = 'expected a duration like "90s", "15m", "4h" or "5d"'

_RATE_PERIODS: dict[str, int] = {
    "s": 1,
    "sec": 1,
    "second": 1,
    "seconds": 1,
    "m": 60,
    "min": 60,
    "minute": 60,
    "minutes": 60,
    "h": 3600,
    "hr": 3600,
    "hour": 3600,
    "hours": 3600,
    "d": 86400,
    "day": 86400,
    "days": 86400,
}
_RATE_NAMES: dict[int, str] = {1: "second", 60: "minute", 3600: "hour", 86400: "day"}
_RATE_RE = re.compile(r"(?P<count>-?[0-9]+)\s*/\s*(?P<period>\S.*)")
_RATE_EXAMPLE = 'expected a rate like "100/hour"'


@dataclass(frozen=True)
class Rate:
    """``count`` messages per ``per_seconds``; "100/hour" is Rate(100, 3600)."""

    count: int
    per_seconds: float
    text: str = ""


def _quoted(text: str) -> str:
    """Show a value the way it appears in the TOML file, quotes included."""
    return json.dumps(text, ensure_ascii=False)


def parse_size(value: str | int) -> int:
    """Bytes from ``"25MB"``, ``"1.5GiB"``, ``"512B"`` or a bare integer.

    Fractions are allowed ("1.5MB") and rounded to whole bytes, because
    that is what an operator means by them.
    """
    if isinstance(value, int):
        return _non_negative_size(value, str(value))
    text = value.strip()
    if text.startswith("-"):
        raise ValueError(f"a size cannot be negative, got {_quoted(value)}")
    match = _SIZE_RE.fullmatch(text)
    if match is None:
        raise ValueError(f"{_SIZE_EXAMPLE}, got {_quoted(value)}")
    unit = match["unit"]
    scale = _SIZE_UNITS.get(unit.lower())
    if scale is None:
        raise ValueError(
            f"unknown size unit {_quoted(unit)} in {_quoted(value)}; "
            "use B, kB, MB, GB (powers of 1000) or KiB, MiB, GiB (powers of 1024)"
        )
    return round(float(match["number"]) * scale)


def _non_negative_size(number: int, shown: str) -> int:
    if number < 0:
        raise ValueError(f"a size cannot be negative, got {shown}")
    return number


def parse_duration(value: str | int | float) -> float:
    """Seconds from ``"90s"``, ``"15m"``, ``"4h"``, ``"5d"``, ``"1h30m"`` or a number.

    A bare number (in the file or in a string, like ``"0"``) is seconds.
    Compound forms are accepted so that whatever format_duration prints can
    be pasted back into the config.
    """
    if isinstance(value, int | float):
        if not math.isfinite(value):
            raise ValueError(f"{_DURATION_EXAMPLE}, got {value}")
        if value < 0:
            raise ValueError(f"a duration cannot be negative, got {value}")
        return float(value)
    text = value.strip()
    if text.startswith("-"):
        raise ValueError(f"a duration cannot be negative, got {_quoted(value)}")
    if not text:
        raise ValueError(f"{_DURATION_EXAMPLE}, got {_quoted(value)}")
    return _sum_duration_parts(text, value)


def _sum_duration_parts(text: str, original: str) -> float:
    total = 0.0
    position = 0
    while position < len(text):
        match = _DURATION_PART_RE.match(text, position)
        if match is None or match.end() == position:
            raise ValueError(f"{_DURATION_EXAMPLE}, got {_quoted(original)}")
        unit = match["unit"]
        if unit == "" and (position > 0 or match.end() < len(text)):
            raise ValueError(f"{_DURATION_EXAMPLE}, got {_quoted(original)}")
        scale = 1 if unit == "" else _DURATION_UNITS.get(unit)
        if scale is None:
            raise ValueError(
                f"unknown duration unit {_quoted(unit)} in {_quoted(original)}; use s, m, h, d or w"
            )
        total += float(match["number"]) * scale
        position = match.end()
    return total


def parse_rate(value: str) -> Rate:
    """A Rate from ``"100/hour"``; the period is a unit name or a duration ("10/15m")."""
    text = value.strip()
    match = _RATE_RE.fullmatch(text)
    if match is None:
        raise ValueError(f"{_RATE_EXAMPLE}, got {_quoted(value)}")
    count = int(match["count"])
    if count < 1:
        raise ValueError(
            f"a rate needs a count of at least 1, got {_quoted(value)}; "
            "to turn the limit off, remove the key"
        )
    return Rate(count, _rate_period(match["period"].strip(), value), text)


def _rate_period(period: str, original: str) -> float:
    named = _RATE_PERIODS.get(period.lower())
    if named is not None:
        return float(named)
    try:
        seconds = parse_duration(period)
    except ValueError:
        seconds = 0.0
    if seconds <= 0:
        raise ValueError(
            f"unknown rate period {_quoted(period)} in {_quoted(original)}; "
            'use second, minute, hour, day or a duration like "15m"'
        )
    return seconds


def format_size(size: int) -> str:
    """A short size for tables: "512B", "2.9K", "25M", "1.2G" (decimal units)."""
    if size < 0:
        return "-" + format_size(-size)
    if size < 1000:
        return f"{size}B"
    for unit, scale in (("K", 10**3), ("M", 10**6), ("G", 10**9)):
        shown = _short_number(size / scale)
        if float(shown) < 1000:
            return shown + unit
    return _short_number(size / 10**12) + "T"


def _short_number(value: float) -> str:
    """One decimal below 10, none above: as many digits as a table column can afford."""
    return f"{value:.1f}" if value < 9.95 else f"{value:.0f}"


def format_duration(seconds: float) -> str:
    """A short duration for tables: "25m", "4m10s", "2h", "3d4h" (two units at most)."""
    if seconds < 0:
        return "-" + format_duration(-seconds)
    remaining = round(seconds)
    parts: list[str] = []
    for unit, scale in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        amount, remaining = divmod(remaining, scale)
        if amount and len(parts) < 2:
            parts.append(f"{amount}{unit}")
        elif parts:
            break
    return "".join(parts) or "0s"


def format_rate(count: int, per_seconds: float) -> str:
    """The config spelling of a rate, e.g. "100/hour" or "10/15m"."""
    name = _RATE_NAMES.get(int(per_seconds)) if float(per_seconds).is_integer() else None
    if name is not None:
        return f"{count}/{name}"
    return f"{count}/{format_duration(per_seconds)}"
