"""SMTP replies from remote servers, and what a delivery outcome is made of.

Everything here is pure: the client feeds it the lines it read, and the
agent, the scheduler and the bounce builder read typed fields from what
comes back. A bounce quotes ``Outcome.reply`` and copies ``Outcome.enhanced``;
nothing downstream ever parses a reply string again.

Servers that do not send enhanced status codes (RFC 3463) still get one:
the class default ``2.0.0`` / ``4.0.0`` / ``5.0.0``, which is what RFC 3463
says a code-less reply means and what DSNs (RFC 3464) need.

A next hop chooses every byte of its replies, so they are untrusted data.
The reader bounds them as they arrive (``MAX_LINE``, ``MAX_LINES``,
``MAX_REPLY_BYTES``: more is a protocol error), and an ``Outcome`` keeps
at most ``MAX_STORED_REPLY`` characters of printable ASCII (see
``clip_reply``): that text goes into the spool, the log, ``relayctl`` and
bounces, once per recipient and attempt, so it must be small and inert.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from relayd.escape import printable

Status = Literal["sent", "deferred", "failed"]

# RFC 3463: class "." subject "." detail, subject and detail 1-3 digits.
_ENHANCED = re.compile(r"([245])\.(\d{1,3})\.(\d{1,3})(?=\s|$)")
_LINE = re.compile(r"([2-5][0-9][0-9])([ -]?)(.*)", re.DOTALL)
MAX_LINE = 4096  # octets in one reply line, CR LF included (RFC 5321 says 512)
MAX_LINES = 100  # lines in one reply
MAX_REPLY_BYTES = 64 * 1024  # octets in one whole reply
MAX_STORED_REPLY = 1024  # characters of a reply kept per recipient and attempt
_CUT = "...[cut]"


class MalformedReply(ValueError):
    """The server sent something that is not an SMTP reply (RFC 5321 4.2)."""


@dataclass(frozen=True)
class ReplyLine:
    """One line of a reply: its code, whether it ends the reply, its text."""

    code: int
    last: bool
    text: str


@dataclass(frozen=True)
class Reply:
    """A whole (possibly multiline) reply; ``text`` joins the lines with spaces.

    ``lines`` keeps each line's text (without code or enhanced code) for
    replies whose lines mean something one by one, such as EHLO.
    """

    code: int
    enhanced: str
    text: str
    lines: tuple[str, ...] = ()

    @property
    def positive(self) -> bool:
        return 200 <= self.code < 400

    @property
    def temporary(self) -> bool:
        return 400 <= self.code < 500

    @property
    def permanent(self) -> bool:
        return 500 <= self.code < 600

    def line(self) -> str:
        """The reply on one line, as logs, `queue show` and bounces quote it."""
        parts = [str(self.code), self.enhanced, self.text]
        return " ".join(p for p in parts if p)


def default_enhanced(code: int) -> str:
    """RFC 3463's meaning of a reply that carries no enhanced code."""
    klass = code // 100
    return f"{klass}.0.0" if klass in (2, 4, 5) else ""


def parse_line(line: str) -> ReplyLine:
    """Split ``250-text`` / ``250 text`` / ``250``; CR LF may still be attached."""
    line = line.rstrip("\r\n")
    m = _LINE.fullmatch(line)
    if m is None or (m.group(2) == "" and m.group(3) != ""):
        raise MalformedReply(f"not an SMTP reply line: {line[:80]!r}")
    return ReplyLine(int(m.group(1)), m.group(2) != "-", m.group(3))


def _split_enhanced(code: int, text: str) -> tuple[str, str]:
    """Take a leading enhanced code off ``text`` if its class agrees with ``code``.

    A class that disagrees with the reply code (``250 5.0.0``) is a server
    bug; the reply code wins and the odd token stays in the text.
    """
    m = _ENHANCED.match(text)
    if m is None or int(m.group(1)) != code // 100:
        return "", text
    return m.group(0), text[m.end() :].lstrip()


def parse_reply(lines: Sequence[str], parsed: Sequence[ReplyLine] | None = None) -> Reply:
    """Build a Reply from all of its lines, last line included.

    ``parsed``: the lines' parse_line results, when the reader has them
    already (it parses each line as it arrives to know where a reply ends).
    """
    if not lines:
        raise MalformedReply("empty reply")
    if len(lines) > MAX_LINES:
        raise MalformedReply("reply has too many lines")
    if parsed is None:
        parsed = [parse_line(x) for x in lines]
    code = parsed[0].code
    if any(p.code != code for p in parsed):
        raise MalformedReply("reply lines disagree on the reply code")
    if any(p.last for p in parsed[:-1]) or not parsed[-1].last:
        raise MalformedReply("reply continuation markers are inconsistent")
    enhanced, first = _split_enhanced(code, parsed[0].text)
    texts = [first]
    for p in parsed[1:]:
        rest = p.text
        if enhanced and rest.startswith(enhanced):
            rest = rest[len(enhanced) :].lstrip()
        texts.append(rest)
    text = " ".join(t for t in texts if t)
    return Reply(code, enhanced or default_enhanced(code), text, tuple(texts))


def ehlo_extensions(reply: Reply) -> dict[str, str]:
    """The service extensions an EHLO reply offers: keyword (upper case) -> params.

    The first line is the server's greeting name, not an extension.
    """
    exts: dict[str, str] = {}
    for text in reply.lines[1:]:
        keyword, _, params = text.strip().partition(" ")
        if keyword:
            exts[keyword.upper()] = params.strip()
    return exts


def size_limit(exts: dict[str, str]) -> int | None:
    """The server's SIZE limit, or None when it has none or states none (RFC 1870)."""
    if "SIZE" not in exts:
        return None
    value = exts["SIZE"].split(" ")[0]
    if not value.isdigit() or int(value) == 0:
        return None
    return int(value)


def stored_size(text: str) -> int:
    """What ``text`` (printable ASCII) takes in a JSON state file: ``\\`` and ``"`` count twice."""
    return len(text) + text.count("\\") + text.count('"')


def clip_reply(text: str, limit: int = MAX_STORED_REPLY) -> str:
    """``text`` escaped to printable ASCII (relayd.escape) and cut to ``limit`` bytes as stored.

    What a reply becomes before it is stored, logged or quoted. Escaping
    first means the cut can never reopen a control character, and the cut
    never splits an escape (``\\x1b``) in two. The size counts what the text
    takes in the JSON state file (see ``stored_size``), so a reply made of
    escapes is cut shorter. Idempotent.
    """
    text = printable(text)
    if stored_size(text) <= limit:
        return text
    budget = limit - len(_CUT)
    cost = end = 0
    for end, char in enumerate(text):  # noqa: B007 - end is used after the loop
        cost += 2 if char in '\\"' else 1
        if cost > budget:
            break
    head = text[:end]
    tail = head.rfind("\\", max(0, len(head) - 3))
    if tail != -1:  # an escape cut short: drop its start
        head = head[:tail]
    return head + _CUT


@dataclass(frozen=True)
class Outcome:
    """What happened to a recipient (or would have): what the scheduler applies.

    ``reply`` is either the remote reply on one line, or a local description
    of what went wrong ("connection refused"); ``remote`` says which. It
    is always ``clip_reply``'d: printable ASCII, at most 1 KB.
    """

    status: Status
    enhanced: str
    reply: str
    remote: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "reply", clip_reply(self.reply))
        object.__setattr__(self, "enhanced", clip_reply(self.enhanced, 16))

    @property
    def permanent(self) -> bool:
        return self.status == "failed"

    @property
    def temporary(self) -> bool:
        return self.status == "deferred"

    @property
    def sent(self) -> bool:
        return self.status == "sent"

    @classmethod
    def of(cls, reply: Reply) -> Outcome:
        """A final reply to a recipient: 2xx sent, 4xx deferred, 5xx failed.

        A 3xx where a final reply belongs is a protocol error: the message
        was not taken, so it is deferred (X.5.0, "other protocol status").
        """
        if reply.permanent:
            return cls("failed", reply.enhanced, reply.line(), remote=True)
        if reply.temporary:
            return cls("deferred", reply.enhanced, reply.line(), remote=True)
        if reply.code // 100 == 2:
            return cls("sent", reply.enhanced, reply.line(), remote=True)
        return cls("deferred", "4.5.0", f"unexpected reply: {reply.line()}", remote=True)

    @classmethod
    def refused(cls, reply: Reply) -> Outcome:
        """A reply that did not let a step go on (MAIL, RCPT, DATA, greeting).

        5xx fails; anything else defers, even a 2xx where 354 or 220 was due:
        whatever the server meant, the message did not get through.
        """
        if reply.permanent:
            return cls("failed", reply.enhanced, reply.line(), remote=True)
        if reply.temporary:
            return cls("deferred", reply.enhanced, reply.line(), remote=True)
        return cls("deferred", "4.5.0", f"unexpected reply: {reply.line()}", remote=True)

    @classmethod
    def temp(cls, enhanced: str, text: str) -> Outcome:
        return cls("deferred", enhanced, text)

    @classmethod
    def perm(cls, enhanced: str, text: str) -> Outcome:
        return cls("failed", enhanced, text)

    def softened(self) -> Outcome:
        """The same outcome made temporary: for errors that are ours to fix.

        Used where a 5xx must not bounce mail, such as a smarthost rejecting
        our credentials: the operator fixes the password, the mail goes out.
        """
        if self.status != "failed":
            return self
        enhanced = "4" + self.enhanced[1:] if self.enhanced else "4.0.0"
        return Outcome("deferred", enhanced, self.reply, self.remote)


class DeliveryError(Exception):
    """A delivery step failed; carries the Outcome to record for it."""

    def __init__(self, outcome: Outcome) -> None:
        super().__init__(outcome.reply)
        self.outcome = outcome

    @property
    def permanent(self) -> bool:
        return self.outcome.permanent

    @property
    def enhanced(self) -> str:
        return self.outcome.enhanced

    @property
    def reply(self) -> str:
        return self.outcome.reply
