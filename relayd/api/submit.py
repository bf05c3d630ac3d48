"""One API message into the spool, under the rules of authenticated submission.

The same checks, in the same order, as an SMTP session of a logged-in user
(relayd/smtpd/session.py): sender ownership (MAIL FROM), recipients,
``From:``/``Sender:`` ownership, the rate limits, DKIM signing, then the
spool's durable commit. The caller answers 202 only when this returns.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from relayd import log
from relayd.address import AddressError, parse_path
from relayd.api.errors import ApiError
from relayd.policy import identity
from relayd.smtpd import authresults, headers
from relayd.smtpd.content import Content
from relayd.smtpd.services import Services
from relayd.spool.model import Envelope, Recipient
from relayd.spool.queueid import new_queue_id
from relayd.spool.store import SpoolError

PROGRAM = "api"

# Extra refusals at RCPT (the suppression list): the address in, a verdict out.
RecipientCheck = Callable[[str, str], Awaitable[ApiError | None]]


@dataclass(frozen=True)
class Submission:
    """Who sends, from where: the API's equivalent of a logged-in SMTP session."""

    user: str
    client_ip: str
    method: str  # "basic" or "token", for the log


def _address(text: str, what: str) -> str:
    try:
        parsed = parse_path(f"<{text}>", allow_null=False, smtputf8=True)[0]
    except (AddressError, ValueError) as exc:
        code, enhanced = (501, "5.1.7") if what == "sender" else (501, "5.1.3")
        raise ApiError(400, code, enhanced, f"bad {what} address {text[:100]!r}: {exc}") from exc
    assert parsed is not None
    return str(parsed)


async def submit(
    services: Services,
    who: Submission,
    sender_text: str,
    recipient_texts: list[str],
    message: bytes,
    recipient_check: RecipientCheck | None = None,
) -> tuple[str, list[str]]:
    """Queue one message; (queue id, recipients) or ApiError."""
    cfg = services.config
    if services.spool_full():
        raise ApiError(503, 452, "4.3.1", "Insufficient system storage")
    sender = _address(sender_text, "sender")
    verdict = services.sender_verdict(who.user, sender)
    if verdict is not None:
        raise ApiError.of(verdict)
    if len(recipient_texts) > cfg.limits.max_recipients:
        raise ApiError(
            400, 452, "4.5.3", f"too many recipients (at most {cfg.limits.max_recipients})"
        )
    recipients = [_address(r, "recipient") for r in recipient_texts]
    for rcpt in recipients:
        refused = await recipient_check(rcpt, who.user) if recipient_check else None
        if refused is not None:
            raise refused
        suppressed = await services.suppressed(rcpt)  # "550 5.1.1 <addr>: suppressed ..."
        if suppressed is not None:
            code, enhanced, text = suppressed.split(" ", 2)
            raise ApiError(403, int(code), enhanced, text)
    if len(message) > cfg.limits.max_message_size:
        raise ApiError(413, 552, "5.3.4", "Message size exceeds fixed limit")
    content = Content.from_bytes(message)
    header = authresults.strip_forged(content.header, cfg.hostname)
    refusal = identity.header_refusal(header, lambda a: services.sender_verdict(who.user, a))
    if refusal is not None:
        raise ApiError.of(refusal)
    verdict = await services.rate_limiter.acheck(
        time.time(), who.client_ip, who.user, sender.rpartition("@")[2], record=True
    )
    if verdict is not None:
        raise ApiError.of(verdict)
    qid = new_queue_id()
    header = headers.submission_fixups(header, cfg.hostname)
    signature = await services.sign(header, content)
    received = headers.received(
        headers.TraceInfo(
            helo="api",
            client_ip=who.client_ip,
            hostname=cfg.hostname,
            queue_id=qid,
            recipient=recipients[0] if len(recipients) == 1 else None,
            esmtp=True,
            tls_version=None,
            tls_cipher=None,
            authenticated=True,
        )
    )
    head = received + signature + header
    data = head + message[content.body_offset :]
    envelope = Envelope(
        queue_id=qid,
        sender=sender,
        recipients=[Recipient(address=r) for r in recipients],
        arrival_time=time.time(),
        size=len(data),
        client_ip=who.client_ip,
        helo="api",
        listener="api",
        sasl_username=who.user,
        smtputf8=any(not a.isascii() for a in (sender, *recipients)),
        body_8bit=not message.isascii(),
    )
    log.event(
        PROGRAM,
        f"client=api[{who.client_ip}], sasl_method={who.method}, sasl_username={who.user}",
        queue_id=qid,
        client_ip=who.client_ip,
        sasl_username=who.user,
    )
    try:
        await services.enqueue(envelope, data, None)
    except SpoolError as exc:
        log.event(PROGRAM, f"warning: queue file write error: {exc}", queue_id=qid,
                  level=logging.ERROR)  # fmt: skip
        raise ApiError(503, 451, "4.3.0", "queue file write error") from exc
    log.event(PROGRAM, f"message-id={headers.message_id(head)}", queue_id=qid)
    services.metrics.message_accepted("api")
    return qid, recipients
