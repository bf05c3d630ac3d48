"""The Authentication-Results header (RFC 8601) relayd adds to inbound mail.

Downstream filters and mail clients trust an Authentication-Results field
whose authserv-id is our hostname, so a sender must not be able to supply
one: :func:`strip_forged` removes any such field that arrived with the
message before relayd adds its own (RFC 8601 §5). Fields from other
hosts stay, as they record what those hosts found.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from relayd.dkim import DKIMResult
from relayd.fold import fold
from relayd.policy.dmarc import DMARCResult
from relayd.policy.spf import SPFResult

_TOKEN = re.compile(r"^[^\x00-\x20\x7f()<>@,;:\\\"/\[\]?=]+$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_HEADER_START = re.compile(rb"^([\x21-\x39\x3b-\x7e]+)[ \t]*:")
_LINE = re.compile(rb"[^\n]*\n|[^\n]+")


def _value(text: str) -> str:
    """A property value: a token as is, anything else a quoted-string."""
    text = _CONTROL.sub("", text)
    # Values can come from a hostile signature (d=, s=): keep the header ASCII.
    text = text.encode("ascii", "replace").decode("ascii")
    if _TOKEN.match(text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _spf(result: SPFResult) -> str:
    prop = "smtp.helo" if result.identity == "helo" else "smtp.mailfrom"
    return f"spf={result.result} {prop}={_value(result.domain)}"


def _comment(text: str) -> str:
    """An RFC 8601 comment: ASCII, no parentheses or backslashes to escape it."""
    text = _CONTROL.sub("", text).encode("ascii", "replace").decode("ascii")
    return "(" + re.sub(r"[()\\]", "", text) + ")"


def _dkim(result: DKIMResult) -> str:
    parts = [f"dkim={result.result}"]
    if result.comment:
        parts.append(_comment(result.comment))
    if result.domain:
        parts.append(f"header.d={_value(result.domain)}")
    if result.selector:
        parts.append(f"header.s={_value(result.selector)}")
    return " ".join(parts)


def _dmarc(result: DMARCResult) -> str:
    comment = f" (p={result.policy})" if result.policy else ""
    if not result.domain:
        return f"dmarc={result.result}{comment}"
    return f"dmarc={result.result}{comment} header.from={_value(result.domain)}"


def authentication_results(
    hostname: str,
    spf: SPFResult | None = None,
    dkim: Sequence[DKIMResult] = (),
    dmarc: DMARCResult | None = None,
) -> str:
    """The field value (without ``Authentication-Results:``), results joined by "; ".

    Checks that were not run are left out; with none at all the value says
    ``none``, as RFC 8601 §2.2 asks.
    """
    results = [_spf(spf)] if spf else []
    results += [_dkim(result) for result in dkim]
    if dmarc:
        results.append(_dmarc(dmarc))
    return "; ".join([_value(hostname), *(results or ["none"])])


def field(
    hostname: str,
    spf: SPFResult | None = None,
    dkim: Sequence[DKIMResult] = (),
    dmarc: DMARCResult | None = None,
) -> bytes:
    """The whole ``Authentication-Results:`` field, folded, ending in CRLF."""
    return fold("Authentication-Results", authentication_results(hostname, spf, dkim, dmarc))


def authserv_id(value: bytes) -> str:
    """The authserv-id an Authentication-Results value names (lower case)."""
    text = _skip_cfws(value.decode("utf-8", "replace"))
    if text.startswith('"'):
        match = re.match(r'"((?:[^"\\]|\\.)*)"', text)
        ident = re.sub(r"\\(.)", r"\1", match.group(1)) if match else ""
    else:
        ident = re.split(r"[\s;(]", text, maxsplit=1)[0]
    return ident.strip().rstrip(".").lower()


def _skip_cfws(text: str) -> str:
    """``text`` after leading blanks and (nested) comments, in one linear pass."""
    i, depth = 0, 0
    while i < len(text):
        char = text[i]
        if char == "(":
            depth += 1
        elif char == ")" and depth:
            depth -= 1
        elif char == "\\" and depth:
            i += 1  # a quoted-pair inside a comment
        elif depth == 0 and char not in " \t\r\n":
            break
        i += 1
    return text[i:]


def _fields(head: list[bytes]) -> list[tuple[bytes, list[bytes]]]:
    """Header lines grouped into fields: (name, lines including continuations)."""
    fields: list[tuple[bytes, list[bytes]]] = []
    for line in head:
        match = _HEADER_START.match(line)
        if match or not fields:
            fields.append((match.group(1).lower() if match else b"", [line]))
        else:
            fields[-1][1].append(line)
    return fields


def strip_forged(header_block: bytes, hostname: str) -> bytes:
    """``header_block`` without Authentication-Results fields that claim ``hostname``.

    Works on a header block (all lines are header) or a whole message (the
    body, after the first empty line, is left alone). A field is matched
    however it is folded, whatever the case of its name or authserv-id, and
    with or without a trailing dot on either hostname. Every other line is
    passed through byte for byte.
    """
    message = header_block
    if b"authentication-results" not in message.lower():  # the common case: nothing to strip
        return message
    lines = _LINE.findall(message)
    end = next((i for i, line in enumerate(lines) if line in (b"\r\n", b"\n")), len(lines))
    ours = hostname.rstrip(".").lower()
    kept: list[bytes] = []
    for name, field in _fields(lines[:end]):
        if name == b"authentication-results":
            value = b"".join(field).split(b":", 1)[1]
            if authserv_id(value.replace(b"\r", b"").replace(b"\n", b"")) == ours:
                continue
        kept.extend(field)
    return b"".join(kept + lines[end:])


__all__ = ["authentication_results", "authserv_id", "field", "strip_forged"]
