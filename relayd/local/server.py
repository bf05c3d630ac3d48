"""The daemon's side of ``sendmail``: local programs hand over mail on a Unix socket.

cron, unattended-upgrades, logwatch and PHP's ``mail()`` run
``/usr/sbin/sendmail``. relayd-sendmail reads the message and passes it
here, over a socket every local user may open (mode 0666), as Postfix's
postdrop passes it to pickup. The kernel tells us who is calling
(SO_PEERCRED), so the calling user is recorded in ``Received:`` and the
log whatever the message claims. The reply comes only after the spool
commit, so ``sendmail`` exits 0 only for mail that is durably queued.

The exchange, one message per connection::

    client: RELAYD-SUBMIT 1\\n
            {"sender": "a@b" | "" | null, "recipients": [...], "full_name": str | null,
             "size": N}\\n
            N octets of message, CRLF line ends
    server: one SMTP-style reply line, e.g. 250 2.0.0 Ok: queued as ID\\r\\n

``sender`` null means the caller's ``USER@hostname``; ``""`` the null
sender. Local mail is trusted like ``[relay] networks`` mail: it is
DKIM-signed when a key matches its From:.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import pwd
import socket
import struct
import time
from collections.abc import Callable
from email.utils import formataddr, formatdate
from pathlib import Path
from typing import Any

from relayd import log
from relayd.address import Address, AddressError, parse_path
from relayd.smtpd import authresults, dataread, headers
from relayd.smtpd.content import Content
from relayd.smtpd.services import Services
from relayd.spool.model import Envelope, Recipient
from relayd.spool.queueid import new_queue_id
from relayd.spool.store import SpoolError

MAGIC = b"RELAYD-SUBMIT 1\n"
MAX_REQUEST = 256 * 1024  # the JSON line: sender, recipients, name
STEP_TIMEOUT = 60.0  # for each read: a local writer that stalls is cut off
MAX_CLIENTS = 100  # at once; more get 421 and sendmail exits 75 (try again)
PROGRAM = "pickup"


class LocalError(Exception):
    """A refusal, as the reply line sendmail turns into its exit status."""

    def __init__(self, reply: str) -> None:
        super().__init__(reply)
        self.reply = reply


class LocalSubmission:
    """The sendmail socket, served by the daemon (never by acceptor processes)."""

    def __init__(self, services: Callable[[], Services]) -> None:
        self.services = services
        self.server: asyncio.AbstractServer | None = None
        self.path: Path | None = None
        self.clients = 0

    async def start(self, path: Path | None) -> None:
        if path is None:
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            self.server = await asyncio.start_unix_server(
                self._serve, path=str(path), limit=MAX_REQUEST
            )
            os.chmod(path, 0o666)
        except OSError as exc:  # sendmail is an extra: mail over SMTP still flows
            log.event(
                "master",
                f"warning: cannot create the sendmail socket {path}: {exc.strerror or exc}; "
                "local sendmail will exit 75 until this is fixed ([local] socket)",
                level=logging.WARNING,
            )
            return
        self.path = path

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
        if self.path is not None:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        uid, user = _peer(writer.get_extra_info("socket"))
        self.clients += 1
        try:
            if self.clients > MAX_CLIENTS:
                reply = "421 4.3.2 Too many local submissions at once, try again later"
            else:
                reply = await self._reply(reader, uid, user)
            writer.write(reply.encode("utf-8", "backslashreplace") + b"\r\n")
            with contextlib.suppress(ConnectionError):
                await writer.drain()
        finally:
            self.clients -= 1
            writer.close()

    async def _reply(self, reader: asyncio.StreamReader, uid: int, user: str) -> str:
        try:
            return await self._submit(reader, uid, user)
        except LocalError as exc:
            return exc.reply
        except (TimeoutError, ConnectionError, asyncio.IncompleteReadError):
            return "421 4.4.2 Message not received in time"
        except SpoolError as exc:
            log.event(PROGRAM, f"warning: queue file write error: {exc}", level=logging.ERROR)
            return "451 4.3.0 Error: queue file write error"
        except Exception:  # our bug: the caller retries, nothing is lost
            log.event(PROGRAM, "error: local submission failed", level=logging.ERROR, exc_info=True)
            return "451 4.3.0 Error: local problem, try again later"

    async def _submit(self, reader: asyncio.StreamReader, uid: int, user: str) -> str:
        services = self.services()
        request = await _request(reader)
        cfg = services.config
        sender = _sender(request.get("sender"), user, cfg.hostname)
        recipients = _recipients(request.get("recipients"), cfg.limits.max_recipients)
        size = request.get("size")
        if not isinstance(size, int) or size < 0:
            raise LocalError("501 5.5.4 Bad request: size")
        if services.spool_full():
            raise LocalError("452 4.3.1 Insufficient system storage")
        result = await asyncio.wait_for(
            dataread.read_sized(reader, size, cfg.limits.max_message_size, services.spill_dir),
            timeout=STEP_TIMEOUT + size / 1_000_000,
        )
        if result.problem is not None:
            raise LocalError(_PROBLEMS[result.problem])
        assert result.content is not None
        try:
            return await self._queue(
                services, result.content, sender, recipients, uid, user, request
            )
        finally:
            result.content.discard()

    async def _queue(
        self,
        services: Services,
        content: Content,
        sender: Address | None,
        recipients: list[Address],
        uid: int,
        user: str,
        request: dict[str, Any],
    ) -> str:
        cfg = services.config
        qid = new_queue_id()
        header = authresults.strip_forged(content.header, cfg.hostname)
        if not headers.has_header(header, "From"):
            name = request.get("full_name")
            shown = formataddr((name if isinstance(name, str) else "", str(sender or "")))
            header += b"From: " + _header_text(shown) + b"\r\n"
        header = headers.submission_fixups(header, cfg.hostname)
        signature = await services.sign(header, content)
        received = (
            f"Received: by {cfg.hostname} (relayd, from userid {uid})\r\n"
            f"\tid {qid}; {formatdate(time.time(), localtime=False)}\r\n"
        ).encode()
        head = received + signature + header
        if content.memory is not None:
            data = b"".join((head, memoryview(content.memory)[content.body_offset :]))
            tail = None
        else:
            assert content.path is not None
            data, tail = head, (content.path, content.body_offset)
        envelope = Envelope(
            queue_id=qid,
            sender=str(sender) if sender else "",
            recipients=[Recipient(address=str(r)) for r in recipients],
            arrival_time=time.time(),
            size=len(head) + content.size - content.body_offset,
            client_name=user,
            listener="local",
            smtputf8=any(a.needs_smtputf8 for a in [*recipients, *([sender] if sender else [])]),
        )
        log.event(PROGRAM, f"uid={uid} from=<{envelope.sender}>", queue_id=qid)
        await services.enqueue(envelope, data, tail)
        services.metrics.message_accepted("local")
        return f"250 2.0.0 Ok: queued as {qid}"


_PROBLEMS = {
    dataread.TOO_BIG: "552 5.3.4 Message size exceeds fixed limit",
    dataread.BARE_NEWLINE: "554 5.6.0 Message refused: bare CR or LF",
    dataread.NUL: "554 5.6.0 Message refused: NUL octet in the message",
    dataread.LINE_TOO_LONG: "554 5.6.0 Message refused: line longer than 998 octets",
}


async def _request(reader: asyncio.StreamReader) -> dict[str, Any]:
    try:
        magic = await asyncio.wait_for(reader.readline(), STEP_TIMEOUT)
    except ValueError:  # a line over MAX_REQUEST
        magic = b""
    if magic != MAGIC:
        raise LocalError("500 5.5.1 Not a relayd-sendmail request")
    try:
        line = await asyncio.wait_for(reader.readline(), STEP_TIMEOUT)
        request = json.loads(line)
    except ValueError as exc:  # over MAX_REQUEST, or not JSON
        raise LocalError("501 5.5.4 Bad request") from exc
    if not isinstance(request, dict):
        raise LocalError("501 5.5.4 Bad request")
    return request


def _sender(value: object, user: str, hostname: str) -> Address | None:
    """The envelope sender: as given (``""`` is <>), else the caller's USER@hostname."""
    if value is None:
        value = f"{user}@{hostname}"
    if not isinstance(value, str):
        raise LocalError("501 5.1.7 Bad sender address syntax")
    try:
        sender, _ = parse_path(f"<{value}>", allow_null=True, smtputf8=True)
    except AddressError as exc:
        raise LocalError(f"501 5.1.7 Bad sender address syntax: {exc}") from exc
    return sender


def _recipients(value: object, limit: int) -> list[Address]:
    if not isinstance(value, list) or not value:
        raise LocalError("554 5.5.1 Error: no recipients")
    if len(value) > limit:
        raise LocalError(f"452 4.5.3 Error: too many recipients (at most {limit})")
    found: list[Address] = []
    for item in value:
        try:
            rcpt, _ = parse_path(f"<{item}>", allow_null=False, smtputf8=True)
        except (AddressError, TypeError) as exc:
            raise LocalError(f"501 5.1.3 Bad recipient address syntax: {item!r}") from exc
        assert rcpt is not None
        found.append(rcpt)
    return found


def _header_text(text: str) -> bytes:
    """A header value from a caller's full name: one line, no control characters."""
    clean = "".join(c if c.isprintable() else " " for c in text)
    return clean.encode("utf-8")


def _peer(sock: socket.socket | None) -> tuple[int, str]:
    """The calling process's uid and user name, from the kernel."""
    if sock is None:
        return -1, "unknown"
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    try:
        return uid, pwd.getpwuid(uid).pw_name
    except KeyError:
        return uid, str(uid)
