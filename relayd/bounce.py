"""Delivery status notifications (RFC 3464) sent back to a message's sender.

A failure notice tells the sender which recipients will never get the
message; a delay notice tells them which ones are still being retried, so
nobody loses mail silently. Both are a ``multipart/report`` with a human
part, a machine-readable ``message/delivery-status`` part and the original
headers (never the body: a bounce must not become a way to relay content).
For mail from a client that did not authenticate, the headers returned stop
at ``STRANGER_HEADER_LIMIT`` octets: such a sender is usually forged, and a
bounce that echoed a huge header block would make relayd an amplifier
aimed at whoever the forger named (SPEC §7).

Everything here is pure: the scheduler hands in the recipients with the
typed fields the delivery agent filled in (enhanced status, the remote
reply, the host that gave it) and gets bytes back. No reply string is ever
parsed again here; what the sender reads is what the remote server said.
Deciding *whether* to send a notice (never to ``<>``, never for a bounce)
is the scheduler's job.
"""

from __future__ import annotations

import io
import re
import textwrap
from collections.abc import Sequence
from datetime import UTC, datetime
from email.utils import format_datetime

from relayd.spool.model import Envelope, Recipient

FAILURE_SUBJECT = "Undelivered Mail Returned to Sender"
DELAY_SUBJECT = "Delayed Mail (still being retried)"
EXPIRED_DSN = "4.4.7"
# At most this much of the original header block goes back to an
# unauthenticated sender: 16 kB, so also within 16 KiB.
STRANGER_HEADER_LIMIT = 16_000

_ENHANCED = re.compile(r"[245]\.\d{1,3}\.\d{1,3}")
_FOLD_AT = 76
_HEADER_LINE = re.compile(rb"[!-9;-~]+[ \t]*:")


def build_failure_dsn(
    hostname: str,
    envelope: Envelope,
    failed: Sequence[Recipient],
    original: bytes,
    now: float,
    *,
    message_id: str | None = None,
) -> bytes:
    """The one notice that tells the sender these recipients will not get the message."""
    intro = (
        f"This is the mail system at host {hostname}.\r\n\r\n"
        "I'm sorry to have to inform you that your message could not\r\n"
        "be delivered to one or more recipients. Its headers are attached\r\n"
        "below.\r\n\r\n"
        "The mail system\r\n"
    )
    fields = [_recipient_fields(envelope, r, "failed", now) for r in failed]
    return _report(
        hostname, envelope, FAILURE_SUBJECT, intro, failed, fields, original, now, message_id
    )


def build_delay_dsn(
    hostname: str,
    envelope: Envelope,
    delayed: Sequence[Recipient],
    original: bytes,
    now: float,
    *,
    retry_until: float,
    message_id: str | None = None,
) -> bytes:
    """A warning that delivery is late but still being retried until ``retry_until``."""
    until = _date(retry_until)
    intro = (
        f"This is the mail system at host {hostname}.\r\n\r\n"
        "####################################################################\r\n"
        "# THIS IS A WARNING ONLY.  YOU DO NOT NEED TO RESEND YOUR MESSAGE. #\r\n"
        "####################################################################\r\n\r\n"
        "Your message could not be delivered yet to one or more recipients.\r\n"
        f"It will be retried until {until}.\r\n\r\n"
        "The mail system\r\n"
    )
    fields = [_recipient_fields(envelope, r, "delayed", now, retry_until) for r in delayed]
    return _report(
        hostname, envelope, DELAY_SUBJECT, intro, delayed, fields, original, now, message_id
    )


def _report(
    hostname: str,
    envelope: Envelope,
    subject: str,
    intro: str,
    recipients: Sequence[Recipient],
    per_recipient: list[list[str]],
    original: bytes,
    now: float,
    message_id: str | None,
) -> bytes:
    """Assemble the three parts; built by hand so every byte on the wire is known."""
    human = (intro + "\r\n" + "".join(_explain(r) for r in recipients)).encode()
    status, global_status = _status_part(hostname, envelope, per_recipient)
    headers = returned_headers(envelope, original)
    boundary = _boundary(envelope, now, human + status + headers)
    status_type = "message/global-delivery-status" if global_status else "message/delivery-status"
    parts = [
        _part("text/plain; charset=utf-8", human),
        _part(status_type, status),
        _part("text/rfc822-headers", headers),
    ]
    msgid = message_id or f"<{envelope.queue_id}.{int(now)}.dsn@{hostname}>"
    head = _header_block(hostname, envelope.sender, subject, now, msgid, boundary)
    body = b"".join(b"--" + boundary + b"\r\n" + p for p in parts)
    return head + b"\r\n" + _PREAMBLE + body + b"--" + boundary + b"--\r\n"


_PREAMBLE = b"This is a MIME-encapsulated message.\r\n\r\n"


def _header_block(
    hostname: str, sender: str, subject: str, now: float, msgid: str, boundary: bytes
) -> bytes:
    lines = [
        f"From: MAILER-DAEMON@{hostname} (Mail Delivery System)",
        f"To: <{sender}>",
        f"Subject: {subject}",
        f"Date: {_date(now)}",
        f"Message-ID: {msgid}",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        "Content-Type: multipart/report; report-type=delivery-status;",
        f'\tboundary="{boundary.decode()}"',
    ]
    return "".join(line + "\r\n" for line in lines).encode()


def _part(content_type: str, payload: bytes) -> bytes:
    """One body part; 8bit only when the payload (e.g. UTF-8 headers) needs it."""
    cte = "7bit" if payload.isascii() else "8bit"
    head = f"Content-Type: {content_type}\r\nContent-Transfer-Encoding: {cte}\r\n\r\n"
    if not payload.endswith(b"\r\n"):
        payload += b"\r\n"
    return head.encode() + payload + b"\r\n"


def _status_part(
    hostname: str, envelope: Envelope, per_recipient: list[list[str]]
) -> tuple[bytes, bool]:
    """The per-message block, then one block per recipient (RFC 3464 §2.1-2.3)."""
    blocks = [[f"Reporting-MTA: dns; {hostname}", f"X-Relayd-Queue-ID: {envelope.queue_id}"]]
    if envelope.arrival_time:
        blocks[0].append(f"Arrival-Date: {_date(envelope.arrival_time)}")
    blocks.extend(per_recipient)
    text = "\r\n".join("".join(_fold(f) + "\r\n" for f in block) for block in blocks)
    return text.encode(), not text.isascii()


def _recipient_fields(
    envelope: Envelope,
    rcpt: Recipient,
    action: str,
    now: float,
    retry_until: float | None = None,
) -> list[str]:
    addr_type = "rfc822" if rcpt.address.isascii() else "utf-8"
    fields = [
        f"Final-Recipient: {addr_type}; {rcpt.address}",
        f"Action: {action}",
        f"Status: {status_code(rcpt, action)}",
    ]
    if rcpt.remote_host:
        fields.append(f"Remote-MTA: dns; {rcpt.remote_host}")
    if rcpt.reply:
        kind = "smtp" if rcpt.remote_host else "X-Relayd"
        fields.append(f"Diagnostic-Code: {kind}; {_ascii(_one_line(rcpt.reply))}")
    fields.append(f"Last-Attempt-Date: {_date(_last_attempt(envelope, rcpt, now))}")
    if retry_until is not None:
        fields.append(f"Will-Retry-Until: {_date(retry_until)}")
    return fields


def status_code(rcpt: Recipient, action: str) -> str:
    """The recipient's enhanced code, or the class default RFC 3463 gives an unknown one."""
    if _ENHANCED.fullmatch(rcpt.dsn):
        return rcpt.dsn
    return "4.0.0" if action == "delayed" else "5.0.0"


def _explain(rcpt: Recipient) -> str:
    """The human-readable paragraph for one recipient, quoting the remote server."""
    reply = _one_line(rcpt.reply) if rcpt.reply else "no reason was given"
    reason = f"host {rcpt.remote_host} said: {reply}" if rcpt.remote_host else reply
    if rcpt.dsn == EXPIRED_DSN and rcpt.status == "failed":
        reason = f"message expired in the queue; last error: {reason}"
    lines = textwrap.wrap(
        f"<{rcpt.address}>: {reason}",
        width=_FOLD_AT,
        subsequent_indent="    ",
        break_long_words=False,
        break_on_hyphens=False,
    )
    return "".join(line + "\r\n" for line in lines) + "\r\n"


def _last_attempt(envelope: Envelope, rcpt: Recipient, now: float) -> float:
    for attempt in reversed(envelope.history):
        if rcpt.address in attempt.recipients:
            return attempt.time
    return now


def original_headers(original: bytes) -> bytes:
    """The original header block as CRLF lines: up to the blank line, or the first non-header."""
    out: list[bytes] = []
    for raw in io.BytesIO(original):
        line = raw.rstrip(b"\r\n")
        continuation = bool(out) and line[:1] in (b" ", b"\t")
        if not (continuation or _HEADER_LINE.match(line)):
            break
        out.append(line + b"\r\n")
    return b"".join(out)


def returned_headers(envelope: Envelope, original: bytes) -> bytes:
    """The headers to return: all of them to a user who logged in, else the first 16 kB.

    The envelope records the login, not whether the client was in ``[relay]
    networks``; so mail from those networks is returned like a stranger's,
    which costs a trusted sender nothing but the tail of a huge header block.
    """
    headers = original_headers(original)
    if envelope.sasl_username:
        return headers
    return _whole_lines(headers, STRANGER_HEADER_LIMIT)


def _whole_lines(block: bytes, limit: int) -> bytes:
    """The longest run of whole CRLF lines from the start of ``block`` within ``limit``."""
    if len(block) <= limit:
        return block
    cut = block.rfind(b"\r\n", 0, limit)
    return block[: cut + 2] if cut >= 0 else b""


def _boundary(envelope: Envelope, now: float, content: bytes) -> bytes:
    """A boundary that cannot occur in the parts (RFC 2046 §5.1.1)."""
    base = f"{envelope.queue_id}.{int(now)}/relayd"
    boundary, n = base, 0
    while boundary.encode() in content:
        n += 1
        boundary = f"{base}.{n}"
    return boundary.encode()


def _date(ts: float) -> str:
    return format_datetime(datetime.fromtimestamp(ts, UTC))


def _one_line(text: str) -> str:
    """One line of printable text: a remote reply must not inject lines or control bytes."""
    return "".join(c if c.isprintable() else "?" for c in " ".join(text.split()))


def _ascii(text: str) -> str:
    """Remote replies are ASCII by RFC 5321; keep the machine part plain 7-bit."""
    return text.encode("ascii", "replace").decode()


def _fold(field: str) -> str:
    """Fold a long field at spaces so no line exceeds what SMTP allows."""
    if len(field) <= _FOLD_AT:
        return field
    words, lines, line = field.split(" "), [], ""
    for word in words:
        if line and len(line) + 1 + len(word) > _FOLD_AT:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}" if line else word
    lines.append(line)
    return "\r\n ".join(lines)
