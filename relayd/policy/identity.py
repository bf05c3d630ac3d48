"""Who a submitted message says it is from: the authenticated user must own it (SPEC §7).

MAIL FROM is only the envelope; recipients see ``From:`` (and ``Sender:``),
and DKIM signs whatever domain ``From:`` names. An app password that may
use ``app@example.com`` in MAIL FROM must therefore not put
``ceo@example.com`` in ``From:``, or it could send DKIM-signed mail as
anyone relayd holds a key for. Each address in every ``From:`` and
``Sender:`` field is held to the MAIL FROM rule (relayd.policy.sender), and
a field in which no address can be found is refused too: what relayd cannot
read, the next hop or the reader's mail client may still show as a sender.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from email.utils import getaddresses

from relayd.policy.verdict import Refuse, Verdict

_FIELD = re.compile(rb"^(from|sender)[ \t]*:", re.IGNORECASE)


def identity_fields(header: bytes) -> list[tuple[str, str]]:
    """(lower-case name, unfolded value) of each From:/Sender: field in a header block."""
    fields: list[tuple[str, str]] = []
    current: tuple[str, list[bytes]] | None = None
    for line in header.split(b"\r\n"):
        if line[:1] in (b" ", b"\t"):
            if current is not None:
                current[1].append(line)
            continue
        if current is not None:
            fields.append(_unfold(current))
            current = None
        match = _FIELD.match(line)
        if match:
            current = (match.group(1).decode("ascii").lower(), [line[match.end() :]])
    if current is not None:
        fields.append(_unfold(current))
    return fields


def _unfold(field: tuple[str, list[bytes]]) -> tuple[str, str]:
    name, parts = field
    return name, b" ".join(p.strip() for p in parts).decode("utf-8", "replace")


def header_refusal(header: bytes, sender_verdict: Callable[[str], Verdict]) -> Verdict:
    """550 5.7.1 when a From:/Sender: address is not the user's to use, else None.

    ``sender_verdict`` is the MAIL FROM rule for the authenticated user
    (None: owned). A message without From: names nobody and passes here.
    """
    for name, value in identity_fields(header):
        addresses = [addr for _, addr in getaddresses([value]) if addr]
        if not addresses:
            return Refuse(550, "5.7.1", f"{name.capitalize()}: header without an address")
        for address in addresses:
            if sender_verdict(address) is not None:
                return Refuse(
                    550,
                    "5.7.1",
                    f"<{address}>: {name.capitalize()}: header address not owned by the "
                    "authenticated user",
                )
    return None
