"""The effective configuration as TOML: every key, with its value or its default (SPEC §9).

``relayctl config`` prints it (Postfix's ``postconf``): what relayd runs with
after defaults are filled in, in a form ``relayd --check-config`` accepts,
so it can be diffed, kept, or used as a starting point. It walks the same
SCHEMA the loader checks, so a key added there is printed without more code.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from pathlib import Path

import tomli_w

from relayd.config import SCHEMA, Config, HostPort
from relayd.units import Rate

_SIZES = frozenset({"max_message_size", "min_free_space"})
_ARRAYS = {
    "[[listener]]": "listeners",
    "[[route]]": "routes",
    "[[dkim.key]]": "dkim.keys",
    "[[webhook]]": "webhooks",
}


def dump(config: Config) -> str:
    """TOML text for ``config``; keys whose value is unset are shown as comments."""
    out = [f"# Effective configuration of relayd, from {config.source}\n"]
    out.append(_table(None, config, SCHEMA[""]))
    for section, keys in SCHEMA.items():
        if not section:
            continue
        if section in _ARRAYS:
            for entry in _entries(config, _ARRAYS[section]):
                out.append(_table(section, entry, keys))
        else:
            out.append(_table(section, getattr(config, section.strip("[]")), keys))
    return "\n".join(out)


def _entries(config: Config, attribute: str) -> Iterable[object]:
    obj: object = config
    for part in attribute.split("."):
        obj = getattr(obj, part)
    assert isinstance(obj, tuple)
    return obj


def _table(section: str | None, obj: object, keys: Iterable[str]) -> str:
    lines = [section] if section else []
    for key in keys:
        value = _toml_value(key, getattr(obj, "via_text" if key == "via" else key))
        if value is None:
            lines.append(f"# {key} is not set")
            continue
        lines.append(tomli_w.dumps({key: value}).rstrip("\n"))
    return "\n".join(lines) + "\n"


def _toml_value(key: str, value: object) -> object:
    """The TOML form the loader reads back to the same value."""
    if value is None:
        return None
    if isinstance(value, bool | str):
        return value
    if isinstance(value, Path | HostPort | ipaddress.IPv4Network | ipaddress.IPv6Network):
        return str(value)
    if isinstance(value, Rate):
        return _rate(value)
    if isinstance(value, int):
        if key == "processes" and value == 0:
            return "auto"
        return f"{value}B" if key in _SIZES else value
    if isinstance(value, float):
        return _duration(value)
    if isinstance(value, tuple | list):
        return [_toml_value(key, item) for item in value]
    return str(value)


def _duration(seconds: float) -> str:
    whole = int(seconds)
    return f"{whole}s" if whole == seconds else f"{seconds}s"


def _rate(rate: Rate) -> str:
    from relayd.policy.ratelimit import rate_text

    return rate_text(rate)
