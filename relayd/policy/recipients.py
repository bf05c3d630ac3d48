"""Which recipients of served domains exist: refuse the rest at RCPT, not by bounce.

A message for an unknown user that is accepted on port 25 has to be bounced
later, to a sender that is usually forged: backscatter, which gets a server
blocklisted. So on inbound listeners relayd can know its users up front,
two ways that may be combined:

- ``[relay] recipients_file``: one address or ``@domain`` per line, ``#``
  starts a comment, case does not matter. Only domains that appear in the
  file are checked: a served domain with no line in it is not restricted by
  the file, so listing the users of one domain never locks out another. A
  ``@domain`` line accepts every address at that domain.
- ``[relay] verify_recipients``: ask the domain's next hop (see
  relayd.delivery.verify); this module turns its answer into the reply.

The decisions are plain functions of plain data; ``RecipientsFile`` (the
file as it is now) and ``RecipientChecks`` (the two checks in order) hold
the state around them.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from relayd.address import Address
from relayd.log import event
from relayd.policy.verdict import Refuse, Verdict

ProbeResult = Literal["accepted", "refused", "unknown"]

_MAX_DETAIL = 200  # characters of a next hop's reply quoted back to the client


@dataclass(frozen=True)
class RecipientList:
    """The parsed file: full addresses, and domains accepted whole (``@domain``)."""

    addresses: frozenset[str] = frozenset()
    whole_domains: frozenset[str] = frozenset()
    domains: frozenset[str] = frozenset()  # every domain with a line: the checked ones


def parse_recipients(text: str, source: str = "recipients_file") -> tuple[RecipientList, list[str]]:
    """The list, and a warning naming file and line for every line that is not an address."""
    addresses: set[str] = set()
    whole: set[str] = set()
    warnings: list[str] = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = _strip_comment(raw).strip().lower().rstrip(".")
        if not line:
            continue
        local, at, domain = line.rpartition("@")
        if not at or not domain or any(c.isspace() for c in line):
            warnings.append(
                f"{source}:{number}: {raw.strip()!r} is not an address or @domain; "
                "write one per line, like bob@example.com or @example.com"
            )
        elif local:
            addresses.add(line)
        else:
            whole.add(domain)
    domains = {a.rpartition("@")[2] for a in addresses} | whole
    return RecipientList(frozenset(addresses), frozenset(whole), frozenset(domains)), warnings


def _strip_comment(line: str) -> str:
    """``#`` starts a comment at the start of a line or after a space (``#`` is legal in
    a local part, so ``a#b@example.com`` stays an address)."""
    if line.lstrip().startswith("#"):
        return ""
    cut = min((i for i in (line.find(" #"), line.find("\t#")) if i >= 0), default=-1)
    return line if cut < 0 else line[:cut]


def unknown_user(detail: str) -> Refuse:
    """The session puts ``<address>:`` before the text, as Postfix words it."""
    return Refuse(550, "5.1.1", f"Recipient address rejected: {detail}")


def listed_verdict(rcpt: Address, recipients: RecipientList) -> Verdict:
    """550 5.1.1 for an address at a listed domain that has no line of its own."""
    domain = rcpt.domain.lower().rstrip(".")
    if domain not in recipients.domains or domain in recipients.whole_domains:
        return None
    if f"{rcpt.local.lower()}@{domain}" in recipients.addresses:
        return None
    return unknown_user("no such user here")


def probe_verdict(result: ProbeResult, detail: str) -> Verdict:
    """What a next hop's answer to our probe means for the client's RCPT."""
    if result == "accepted":
        return None
    detail = _printable(detail)
    if result == "refused":
        return unknown_user(f"undeliverable address: {detail}")
    return Refuse(
        450, "4.1.1", f"Recipient address rejected: unverified address: {detail}; try again later"
    )


def _printable(text: str) -> str:
    """A next hop's words, safe to put in our reply: one line, ASCII, bounded."""
    one = " ".join(text.split())
    return "".join(c if " " <= c <= "~" else "?" for c in one)[:_MAX_DETAIL]


_FileKey = tuple[int, int, int] | None  # (mtime_ns, size, inode); None: no file


class RecipientsFile:
    """The file as it is now: re-read when it changes, so edits need no reload.

    A stat per RCPT is cheap next to the network round trip of a probe. A
    file that vanishes or cannot be read keeps the list loaded before it
    (with a warning), so a half-finished edit never opens or closes a domain.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._list = RecipientList()
        self._key: _FileKey | str = "unread"

    def current(self) -> RecipientList:
        key = self._stat()
        if key != self._key:
            self._key = key
            self._reload()
        return self._list

    def _stat(self) -> _FileKey | str:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return None
        except OSError as exc:
            return f"error: {exc.strerror}"
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def _reload(self) -> None:
        try:
            text = self.path.read_text(encoding="utf-8", errors="replace")
        except OSError as exc:
            _warn(f"cannot read {self.path}: {exc.strerror or exc}; keeping the list loaded before")
            return
        self._list, warnings = parse_recipients(text, str(self.path))
        for warning in warnings:
            _warn(warning)
        event(
            "smtpd",
            f"recipients file {self.path}: {len(self._list.addresses)} addresses, "
            f"{len(self._list.domains)} domains",
        )


def _warn(text: str) -> None:
    event("smtpd", f"warning: {text}", level=logging.WARNING)


Probe = Callable[[str], Awaitable[tuple[ProbeResult, str]]]


class RecipientChecks:
    """Both checks for one RCPT to a served domain from a client that may not relay.

    The file is asked first: it is free, and an address it refuses costs the
    next hop nothing. Shared by every session of a config snapshot.
    """

    def __init__(self, listed: RecipientsFile | None = None, probe: Probe | None = None) -> None:
        self.listed = listed
        self.probe = probe

    async def verdict(self, rcpt: Address) -> Verdict:
        if self.listed is not None:
            verdict = listed_verdict(rcpt, self.listed.current())
            if verdict is not None:
                return verdict
        if self.probe is None:
            return None
        result, detail = await self.probe(str(rcpt))
        return probe_verdict(result, detail)
