"""Strict parsing of SMTP envelope addresses (RFC 5321 §4.1.2).

The relay decision is only as good as the parser in front of it: a lenient
parser that reads ``<"bob@evil.test"@example.com>`` or
``<@relay.test:bob@evil.test>`` differently from the next server is how
open relays happen. So the grammar here is the RFC's, nothing more:
``<local@domain>`` with a dot-string or quoted-string local part and an LDH
domain or address literal; source routes are refused rather than guessed
at, and the routing characters ``@ % !`` inside a local part are reported
so the ACL can refuse them for clients that may not relay.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
_DOT_STRING = re.compile(rf"{_ATEXT}+(?:\.{_ATEXT}+)*")
_QUOTED = re.compile(r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])*"')
_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")
_UTF8_DOT_STRING = re.compile(
    r"(?:[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]|[^\x00-\x7f])+"
    r"(?:\.(?:[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]|[^\x00-\x7f])+)*"
)

MAX_LOCAL = 64
MAX_DOMAIN = 255
MAX_PATH = 256


class AddressError(ValueError):
    """Why an address was refused, in words fit for an SMTP reply."""


@dataclass(frozen=True)
class Address:
    local: str  # as written (quoted local parts keep their quotes)
    domain: str  # lower-cased; A-labels for internationalised names
    literal: bool = False  # domain is an address literal like [192.0.2.1]

    def __str__(self) -> str:
        return f"{self.local}@{self.domain}"

    @property
    def unquoted_local(self) -> str:
        if self.local.startswith('"'):
            return re.sub(r"\\(.)", r"\1", self.local[1:-1])
        return self.local

    @property
    def has_routing(self) -> bool:
        """True for ``bob%evil@x``, ``bob!evil@x``, ``"bob@evil"@x``: sender-specified routing."""
        return any(c in self.unquoted_local for c in "@%!")

    @property
    def needs_smtputf8(self) -> bool:
        return not str(self).isascii()


def parse_path(
    text: str, *, allow_null: bool, smtputf8: bool = False
) -> tuple[Address | None, str]:
    """Split ``<addr> PARAMS`` into the address (None for ``<>``) and the parameter text.

    Angle brackets are expected; a bare mailbox without spaces is accepted as
    many clients send one, and parsed with the same strict grammar.
    """
    text = text.lstrip()
    if text.startswith("<"):
        end = _closing_bracket(text)
        inner, rest = text[1:end], text[end + 1 :]
        if rest and not rest.startswith(" "):
            raise AddressError("Syntax error in address: text after '>'")
    else:
        inner, _, rest = text.partition(" ")
    if len(inner) > MAX_PATH:
        raise AddressError("Address too long")
    if inner == "":
        if not allow_null:
            raise AddressError("Null address not allowed here")
        return None, rest.strip()
    if inner.startswith("@"):
        raise AddressError("Source routes are not accepted")
    return parse_mailbox(inner, smtputf8=smtputf8), rest.strip()


def _closing_bracket(text: str) -> int:
    """Index of the '>' closing the path, skipping quoted local parts."""
    quoted = escaped = False
    for i, c in enumerate(text[1:], start=1):
        if escaped:
            escaped = False
        elif c == "\\" and quoted:
            escaped = True
        elif c == '"':
            quoted = not quoted
        elif c == ">" and not quoted:
            return i
    raise AddressError("Syntax error in address: missing '>'")


def parse_mailbox(text: str, *, smtputf8: bool = False) -> Address:
    """Parse ``local@domain`` exactly; raise AddressError with the reason."""
    if not smtputf8 and not text.isascii():
        raise AddressError("Non-ASCII address requires SMTPUTF8")
    local, domain = _split_local(text)
    _check_local(local, smtputf8)
    domain_norm, literal = _check_domain(domain)
    return Address(local=local, domain=domain_norm, literal=literal)


def _split_local(text: str) -> tuple[str, str]:
    if text.startswith('"'):
        m = _QUOTED.match(text)
        if not m:
            raise AddressError("Syntax error in quoted local part")
        local, rest = m.group(0), text[m.end() :]
        if not rest.startswith("@"):
            raise AddressError("Syntax error in address: expected '@' after local part")
        return local, rest[1:]
    local, at, domain = text.rpartition("@")
    if not at:
        raise AddressError("Address must be local@domain")
    return local, domain


def _check_local(local: str, smtputf8: bool) -> None:
    if not local:
        raise AddressError("Empty local part")
    if len(local.encode("utf-8")) > MAX_LOCAL:
        raise AddressError("Local part too long")
    if local.startswith('"'):
        return
    pattern = _UTF8_DOT_STRING if smtputf8 else _DOT_STRING
    if not pattern.fullmatch(local):
        raise AddressError("Syntax error in local part")


def _check_domain(domain: str) -> tuple[str, bool]:
    if not domain:
        raise AddressError("Empty domain")
    if domain.startswith("["):
        return _check_literal(domain), True
    if not domain.isascii():
        try:
            domain = domain.encode("idna").decode("ascii")
        except UnicodeError as exc:
            raise AddressError("Invalid internationalised domain") from exc
    if len(domain) > MAX_DOMAIN:
        raise AddressError("Domain too long")
    labels = domain.split(".")
    if not all(_LABEL.fullmatch(label) for label in labels):
        raise AddressError("Syntax error in domain")
    return domain.lower(), False


def _check_literal(domain: str) -> str:
    if not domain.endswith("]"):
        raise AddressError("Syntax error in address literal")
    body = domain[1:-1]
    try:
        if body[:5].lower() == "ipv6:":
            return f"[IPv6:{ipaddress.IPv6Address(body[5:])}]"
        return f"[{ipaddress.IPv4Address(body)}]"
    except ValueError as exc:
        raise AddressError("Invalid address literal") from exc


def parse_params(text: str) -> dict[str, str | None]:
    """ESMTP parameters ``KEY=value KEY2`` (keys upper-cased); ValueError on bad syntax."""
    params: dict[str, str | None] = {}
    for word in text.split():
        key, eq, value = word.partition("=")
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9-]*", key) or (eq and not value):
            raise ValueError(f"bad parameter {word!r}")
        params[key.upper()] = value if eq else None
    return params
