"""Delivery by LMTP (RFC 2033): to Dovecot's ``lmtp`` and friends, one reply per recipient.

LMTP is SMTP without a queue on the far side: after the data, the server
answers once for every accepted recipient, so one mailbox over quota does
not defer the others. The server is local and trusted to exist, not to
behave: every reply is bounded in lines, octets and time like an SMTP
next hop's, and a reply that breaks the protocol defers what it concerns.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from pathlib import Path

from relayd.config import HostPort
from relayd.delivery.client import buffered
from relayd.delivery.reply import MalformedReply, Outcome, Reply, parse_line, parse_reply

MAX_LINE = 2048  # octets in one reply line
MAX_LINES = 100  # lines in one reply


class LMTPError(Exception):
    """The session cannot go on; ``outcome`` is what the open recipients get."""

    def __init__(self, outcome: Outcome) -> None:
        super().__init__(outcome.reply)
        self.outcome = outcome


@dataclass(frozen=True)
class Target:
    """Where the LMTP server listens: a TCP address or a Unix socket."""

    address: HostPort | None = None
    socket: Path | None = None

    def __str__(self) -> str:
        return str(self.socket) if self.socket is not None else str(self.address)


def stuff(data: bytes) -> bytes:
    """Dot-stuffing (RFC 5321 §4.5.2) and the end marker."""
    body = data.replace(b"\r\n.", b"\r\n..")
    if body.startswith(b"."):
        body = b"." + body
    if body and not body.endswith(b"\r\n"):
        body += b"\r\n"
    return body + b".\r\n"


class _Conversation:
    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, timeout: float
    ) -> None:
        self.reader, self.writer, self.timeout = reader, writer, timeout

    async def reply(self) -> Reply:
        lines: list[str] = []
        while len(lines) < MAX_LINES:
            try:
                raw = await asyncio.wait_for(self.reader.readuntil(b"\n"), self.timeout)
            except asyncio.LimitOverrunError as exc:
                raise LMTPError(_local("LMTP reply line too long")) from exc
            except (asyncio.IncompleteReadError, ConnectionError) as exc:
                raise LMTPError(_local("LMTP server closed the connection")) from exc
            except TimeoutError as exc:
                raise LMTPError(_local("LMTP server did not answer in time")) from exc
            text = raw.decode("utf-8", "surrogateescape").rstrip("\r\n")
            lines.append(text)
            try:
                if parse_line(text).last:
                    return parse_reply(lines)
            except MalformedReply as exc:
                raise LMTPError(_local(f"malformed LMTP reply: {exc}")) from exc
        raise LMTPError(_local("LMTP reply has too many lines"))

    def unsolicited(self, before: str) -> None:
        """Bytes the server sent unasked are never taken as the reply to what follows."""
        if buffered(self.reader):
            raise LMTPError(_local(f"unexpected data from the LMTP server before {before}"))

    async def command(self, line: str) -> Reply:
        self.unsolicited(line.split(" ")[0].upper())
        self.writer.write(line.encode("utf-8", "surrogateescape") + b"\r\n")
        await self.writer.drain()
        return await self.reply()


def _local(text: str) -> Outcome:
    return Outcome("deferred", "4.4.2", text)


async def _open(
    target: Target, timeout: float
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    if target.socket is not None:
        opening = asyncio.open_unix_connection(str(target.socket), limit=MAX_LINE)
    else:
        assert target.address is not None
        opening = asyncio.open_connection(target.address.host, target.address.port, limit=MAX_LINE)
    try:
        return await asyncio.wait_for(opening, timeout)
    except (OSError, TimeoutError) as exc:
        reason = getattr(exc, "strerror", None) or "timed out"
        raise LMTPError(_local(f"connect to LMTP {target}: {reason}")) from exc


async def deliver(
    target: Target,
    hostname: str,
    sender: str,
    recipients: list[str],
    data: bytes,
    *,
    connect_timeout: float = 30.0,
    command_timeout: float = 300.0,
) -> dict[str, Outcome]:
    """One LMTP transaction; an Outcome for every recipient."""
    try:
        reader, writer = await _open(target, connect_timeout)
    except LMTPError as exc:
        return dict.fromkeys(recipients, exc.outcome)
    talk = _Conversation(reader, writer, command_timeout)
    outcomes: dict[str, Outcome] = {}
    try:
        await _transaction(talk, hostname, sender, recipients, data, outcomes)
    except LMTPError as exc:
        for rcpt in recipients:
            outcomes.setdefault(rcpt, exc.outcome)
    finally:
        with contextlib.suppress(Exception):
            writer.write(b"QUIT\r\n")
            writer.close()
    return outcomes


async def _transaction(
    talk: _Conversation,
    hostname: str,
    sender: str,
    recipients: list[str],
    data: bytes,
    outcomes: dict[str, Outcome],
) -> None:
    reply = await talk.reply()
    if not reply.positive:
        raise LMTPError(_remote(reply, "the greeting"))
    reply = await talk.command(f"LHLO {hostname}")
    if not reply.positive:
        raise LMTPError(_remote(reply, "LHLO"))
    reply = await talk.command(f"MAIL FROM:<{sender}>")
    if not reply.positive:
        raise LMTPError(_remote(reply, "MAIL"))
    accepted: list[str] = []
    for rcpt in recipients:
        reply = await talk.command(f"RCPT TO:<{rcpt}>")
        if reply.positive:
            accepted.append(rcpt)
        else:
            outcomes[rcpt] = Outcome.of(reply)
    if not accepted:
        return
    reply = await talk.command("DATA")
    if reply.code != 354:
        raise LMTPError(_remote(reply, "DATA"))
    talk.unsolicited("the message")
    talk.writer.write(stuff(data))
    await talk.writer.drain()
    for rcpt in accepted:  # RFC 2033 §4.2: one reply per accepted recipient, in order
        outcomes[rcpt] = Outcome.of(await talk.reply())


def _remote(reply: Reply, step: str) -> Outcome:
    outcome = Outcome.of(reply)
    if outcome.sent:  # a positive reply where the protocol wanted another
        return _local(f"unexpected LMTP reply to {step}: {reply.line()}")
    return outcome
