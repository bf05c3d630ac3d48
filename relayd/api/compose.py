"""A message from the API's JSON, or from a whole message an app already built.

Plain functions of plain data: a dict in, (sender, recipients, bytes) out,
or an ApiError saying which field is wrong. The MIME is the standard
library's (``email.message.EmailMessage`` with the SMTP policy: CRLF line
ends, folded headers, a transfer encoding that keeps lines short), so
relayd never writes multipart boundaries or encodings by hand.
"""

from __future__ import annotations

import base64
import binascii
import re
from email import policy
from email.message import EmailMessage
from email.utils import formatdate, getaddresses, make_msgid, parseaddr
from typing import Any

from relayd.api.errors import ApiError

# Headers relayd writes itself from the JSON fields, or that would change the
# message's structure: an app cannot set them through "headers".
_RESERVED = frozenset(
    {
        "from", "to", "cc", "bcc", "reply-to", "subject", "date", "message-id",
        "content-type", "content-transfer-encoding", "mime-version", "sender",
        "received", "return-path", "dkim-signature", "authentication-results",
    }
)  # fmt: skip
_FIELD_NAME = re.compile(r"^[!-9;-~]{1,76}$")  # RFC 5322 field-name, bounded
MAX_ATTACHMENTS = 100
MAX_HEADERS = 50


def bad(text: str, code: int = 501, enhanced: str = "5.5.4") -> ApiError:
    return ApiError(400, code, enhanced, text)


def _text(payload: dict[str, Any], key: str, required: bool = False) -> str | None:
    value = payload.get(key)
    if value is None:
        if required:
            raise bad(f'"{key}" is required')
        return None
    if not isinstance(value, str):
        raise bad(f'"{key}" must be a string')
    return value


def _addresses(payload: dict[str, Any], key: str) -> list[str]:
    """A string or a list of strings, each "addr" or "Name <addr>"."""
    value = payload.get(key)
    if value is None:
        return []
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(v, str) for v in items):
        raise bad(f'"{key}" must be a string or a list of strings')
    found: list[str] = []
    for item in items:
        if "\r" in item or "\n" in item:
            raise bad(f'"{key}": line breaks are not allowed')
        pairs = getaddresses([item])
        if not pairs or any(not addr or "@" not in addr for _, addr in pairs):
            raise bad(f'"{key}": {item[:100]!r} is not an address', 501, "5.1.3")
        found.append(item)
    return found


def _bare(item: str) -> str:
    return parseaddr(item)[1]


def compose_json(payload: object, hostname: str) -> tuple[str, list[str], bytes]:
    """The JSON body of ``POST /v1/messages`` as (envelope sender, recipients, message)."""
    if not isinstance(payload, dict):
        raise bad("the body must be a JSON object")
    unknown = sorted(set(payload) - {
        "from", "to", "cc", "bcc", "reply_to", "subject", "text", "html", "headers",
        "attachments",
    })  # fmt: skip
    if unknown:
        raise bad(f'unknown field "{unknown[0][:40]}"')
    sender_text = _text(payload, "from", required=True)
    assert sender_text is not None
    senders = _addresses({"from": sender_text}, "from")
    to, cc, bcc = (_addresses(payload, k) for k in ("to", "cc", "bcc"))
    if not (to or cc or bcc):
        raise bad('"to" needs at least one address', 554, "5.5.1")
    reply_to = _addresses(payload, "reply_to")
    subject = _text(payload, "subject") or ""
    text, html = _text(payload, "text"), _text(payload, "html")
    msg = EmailMessage(policy=policy.SMTP)
    msg["From"] = senders[0]
    if to:
        msg["To"] = ", ".join(to)
    if cc:
        msg["Cc"] = ", ".join(cc)
    if reply_to:
        msg["Reply-To"] = ", ".join(reply_to)
    if "\r" in subject or "\n" in subject:
        raise bad('"subject": line breaks are not allowed')
    msg["Subject"] = subject
    msg["Date"] = formatdate(localtime=False)
    msg["Message-ID"] = make_msgid(domain=hostname)
    _extra_headers(msg, payload.get("headers"))
    _body(msg, text, html)
    _attachments(msg, payload.get("attachments"))
    recipients = [_bare(a) for a in (*to, *cc, *bcc)]
    return _bare(senders[0]), list(dict.fromkeys(recipients)), msg.as_bytes()


def _extra_headers(msg: EmailMessage, headers: object) -> None:
    if headers is None:
        return
    if not isinstance(headers, dict) or len(headers) > MAX_HEADERS:
        raise bad(f'"headers" must be an object of at most {MAX_HEADERS} names and strings')
    for name, value in headers.items():
        if not isinstance(value, str) or not _FIELD_NAME.match(name):
            raise bad(f'"headers": {name[:40]!r} is not a header name with a string value')
        if name.lower() in _RESERVED:
            raise bad(f'"headers": {name} is set by relayd or by its own field')
        if "\r" in value or "\n" in value:
            raise bad(f'"headers": {name}: line breaks are not allowed')
        msg[name] = value


def _body(msg: EmailMessage, text: str | None, html: str | None) -> None:
    if text is not None:
        msg.set_content(text)
        if html is not None:
            msg.add_alternative(html, subtype="html")
    elif html is not None:
        msg.set_content(html, subtype="html")
    else:
        msg.set_content("")


def _attachments(msg: EmailMessage, attachments: object) -> None:
    if attachments is None:
        return
    if not isinstance(attachments, list) or len(attachments) > MAX_ATTACHMENTS:
        raise bad(f'"attachments" must be a list of at most {MAX_ATTACHMENTS} objects')
    for item in attachments:
        if not isinstance(item, dict):
            raise bad('"attachments": each one is an object')
        filename = item.get("filename")
        kind = item.get("content_type", "application/octet-stream")
        content = item.get("content")
        if not isinstance(filename, str) or not filename or "\n" in filename or "\r" in filename:
            raise bad('"attachments": "filename" is required')
        if not isinstance(kind, str) or kind.count("/") != 1:
            raise bad(f'"attachments": {filename[:60]}: "content_type" like "text/plain"')
        if not isinstance(content, str):
            raise bad(f'"attachments": {filename[:60]}: "content" (base64) is required')
        try:
            data = base64.b64decode(content, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise bad(f'"attachments": {filename[:60]}: "content" is not base64') from exc
        maintype, subtype = kind.split("/")
        msg.add_attachment(data, maintype=maintype, subtype=subtype, filename=filename)


def compose_raw(
    body: bytes, sender: str | None, recipients: list[str]
) -> tuple[str, list[str], bytes]:
    """A whole message (``message/rfc822``) with its envelope from the query string.

    Line ends are made CRLF (apps often write LF); anything else that SMTP
    DATA would refuse is refused here the same way.
    """
    if not sender:
        raise bad('"from" is required in the query string')
    if not recipients:
        raise bad('"to" is required in the query string', 554, "5.5.1")
    for address in (sender, *recipients):
        if "@" not in address or any(c in address for c in "\r\n <>"):
            raise bad(f"{address[:100]!r} is not an address", 501, "5.1.3")
    if b"\x00" in body:
        raise ApiError(400, 554, "5.6.0", "NUL octet in the message")
    message = body.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
    if any(len(line) > 998 for line in message.split(b"\r\n")):
        raise ApiError(400, 554, "5.6.0", "line longer than 998 octets")
    if not message.endswith(b"\r\n"):
        message += b"\r\n"
    return sender, list(dict.fromkeys(recipients)), message


__all__ = ["compose_json", "compose_raw"]
