"""Bounce and delay notices: read back with the email package, as a sender's MUA would."""

from __future__ import annotations

import email
import email.policy
import re
from email.message import EmailMessage, Message
from typing import cast

from hypothesis import given
from hypothesis import strategies as st

from relayd.bounce import (
    DELAY_SUBJECT,
    FAILURE_SUBJECT,
    build_delay_dsn,
    build_failure_dsn,
    original_headers,
    returned_headers,
)
from relayd.spool.model import Attempt, Envelope, Recipient

HOST = "mail.example.com"
NOW = 1_700_000_000.0
ORIGINAL = (
    b"From: Alice <alice@example.com>\r\n"
    b"To: bob@example.org\r\n"
    b"Subject: quarterly numbers\r\n"
    b"Message-ID: <abc@example.com>\r\n"
    b"X-Long: first part\r\n"
    b"\tcontinued\r\n"
    b"\r\n"
    b"The secret body.\r\n"
)


def envelope(*recipients: Recipient, sender: str = "alice@example.com") -> Envelope:
    return Envelope(
        queue_id="01HF0000000000AB",
        sender=sender,
        recipients=list(recipients),
        arrival_time=NOW - 3600,
        size=len(ORIGINAL),
    )


def unknown_user() -> Recipient:
    return Recipient(
        "bob@example.org",
        status="failed",
        dsn="5.1.1",
        reply="550 5.1.1 <bob@example.org>: Recipient address rejected: User unknown",
        remote_host="mx.example.org",
    )


def refused() -> Recipient:
    return Recipient(
        "carol@example.net", status="failed", dsn="5.4.4", reply="host not found (NXDOMAIN)"
    )


def parse(raw: bytes) -> EmailMessage:
    return email.message_from_bytes(raw, policy=email.policy.default)


def parts(msg: EmailMessage) -> list[Message]:
    payload = msg.get_payload()
    assert isinstance(payload, list)
    return [p for p in payload if isinstance(p, Message)]


def status_blocks(msg: EmailMessage) -> list[Message]:
    blocks = parts(msg)[1].get_payload()
    assert isinstance(blocks, list)
    return [b for b in blocks if isinstance(b, Message)]


def test_failure_notice_structure() -> None:
    env = envelope(unknown_user(), refused())
    raw = build_failure_dsn(HOST, env, env.recipients, ORIGINAL, NOW)
    msg = parse(raw)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    assert [p.get_content_type() for p in parts(msg)] == [
        "text/plain",
        "message/delivery-status",
        "text/rfc822-headers",
    ]
    assert msg["From"].addresses[0].addr_spec == f"MAILER-DAEMON@{HOST}"
    assert msg["To"].addresses[0].addr_spec == "alice@example.com"
    assert msg["Subject"] == FAILURE_SUBJECT
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg["Date"].datetime.timestamp() == NOW
    assert msg["Message-ID"].startswith("<") and msg["Message-ID"].endswith(f"@{HOST}>")
    assert not msg.defects


def test_failure_notice_delivery_status_fields() -> None:
    env = envelope(unknown_user(), refused())
    env.history.append(
        Attempt(
            NOW - 60,
            ["bob@example.org"],
            "mx.example.org",
            "203.0.113.5",
            25,
            None,
            "550 5.1.1 ...",
            "5.1.1",
            "failed",
            0.3,
        )
    )
    msg = parse(build_failure_dsn(HOST, env, env.recipients, ORIGINAL, NOW))
    per_message, bob, carol = status_blocks(msg)
    assert per_message["Reporting-MTA"] == f"dns; {HOST}"
    assert per_message["Arrival-Date"] is not None
    assert bob["Final-Recipient"] == "rfc822; bob@example.org"
    assert bob["Action"] == "failed"
    assert bob["Status"] == "5.1.1"
    assert bob["Remote-MTA"] == "dns; mx.example.org"
    assert bob["Diagnostic-Code"] == (
        "smtp; 550 5.1.1 <bob@example.org>: Recipient address rejected: User unknown"
    )
    assert email.utils.parsedate_to_datetime(bob["Last-Attempt-Date"]).timestamp() == NOW - 60
    assert bob["Will-Retry-Until"] is None
    assert carol["Status"] == "5.4.4"
    assert carol["Remote-MTA"] is None  # no server said it; we did
    assert carol["Diagnostic-Code"] == "X-Relayd; host not found (NXDOMAIN)"


def test_human_part_quotes_the_remote_server() -> None:
    env = envelope(unknown_user(), refused())
    msg = parse(build_failure_dsn(HOST, env, env.recipients, ORIGINAL, NOW))
    text = " ".join(cast(EmailMessage, parts(msg)[0]).get_content().split())
    assert (
        "<bob@example.org>: host mx.example.org said: 550 5.1.1 <bob@example.org>: "
        "Recipient address rejected: User unknown" in text
    )
    assert "<carol@example.net>: host not found (NXDOMAIN)" in text


def test_third_part_is_the_original_headers_without_the_body() -> None:
    env = envelope(unknown_user())
    raw = build_failure_dsn(HOST, env, env.recipients, ORIGINAL, NOW)
    headers = parts(parse(raw))[2].get_payload()
    assert isinstance(headers, str)
    assert "Subject: quarterly numbers" in headers
    assert "X-Long: first part\r\n\tcontinued" in headers or "\tcontinued" in headers
    assert b"secret body" not in raw


BIG_HEADERS = b"".join(b"X-Filler-%03d: " % i + b"y" * 380 + b"\r\n" for i in range(110))
BIG = ORIGINAL.replace(b"\r\n\r\n", b"\r\n" + BIG_HEADERS + b"\r\n", 1)


def test_a_stranger_gets_back_at_most_16kb_of_headers_in_whole_lines() -> None:
    assert len(original_headers(BIG)) > 40_000
    env = envelope(unknown_user())  # no sasl_username: the sender did not log in
    raw = build_failure_dsn(HOST, env, env.recipients, BIG, NOW)
    returned = parts(parse(raw))[2].get_payload(decode=True)
    assert isinstance(returned, bytes)
    assert 15_000 < len(returned) <= 16_000
    assert returned.startswith(b"From: Alice") and returned.endswith(b"y\r\n")
    assert b"secret body" not in raw
    assert returned_headers(env, ORIGINAL) == original_headers(ORIGINAL)  # small: all of it


def test_a_user_who_logged_in_gets_back_all_headers_but_still_no_body() -> None:
    env = envelope(unknown_user())
    env.sasl_username = "alice@example.com"
    raw = build_failure_dsn(HOST, env, env.recipients, BIG, NOW)
    returned = parts(parse(raw))[2].get_payload(decode=True)
    assert returned == original_headers(BIG)
    assert b"secret body" not in raw


def test_only_crlf_line_ends_and_short_lines() -> None:
    long_reply = "550 5.7.1 " + " ".join(["policy"] * 400)
    rcpt = Recipient("bob@example.org", "failed", "5.7.1", long_reply, "mx.example.org")
    raw = build_failure_dsn(HOST, envelope(rcpt), [rcpt], ORIGINAL.replace(b"\r\n", b"\n"), NOW)
    assert re.search(rb"(?<!\r)\n", raw) is None
    assert max(len(line) for line in raw.split(b"\r\n")) <= 998
    bob = status_blocks(parse(raw))[1]
    assert bob["Diagnostic-Code"] == f"smtp; {long_reply}"


def test_expired_recipient_is_reported_as_failed_with_4_4_7() -> None:
    rcpt = Recipient("bob@example.org", "failed", "4.4.7", "451 4.7.1 greylisted", "mx.example.org")
    msg = parse(build_failure_dsn(HOST, envelope(rcpt), [rcpt], ORIGINAL, NOW))
    bob = status_blocks(msg)[1]
    assert (bob["Action"], bob["Status"]) == ("failed", "4.4.7")
    assert bob["Diagnostic-Code"] == "smtp; 451 4.7.1 greylisted"
    text = " ".join(cast(EmailMessage, parts(msg)[0]).get_content().split())
    assert "expired" in text and "451 4.7.1 greylisted" in text


def test_delay_notice() -> None:
    rcpt = Recipient(
        "bob@example.org", "deferred", "4.7.1", "451 4.7.1 try later", "mx.example.org"
    )
    until = NOW + 4 * 86400
    msg = parse(build_delay_dsn(HOST, envelope(rcpt), [rcpt], ORIGINAL, NOW, retry_until=until))
    assert msg["Subject"] == DELAY_SUBJECT
    assert msg.get_param("report-type") == "delivery-status"
    bob = status_blocks(msg)[1]
    assert (bob["Action"], bob["Status"]) == ("delayed", "4.7.1")
    assert email.utils.parsedate_to_datetime(bob["Will-Retry-Until"]).timestamp() == until
    assert "WARNING ONLY" in cast(EmailMessage, parts(msg)[0]).get_content()


def test_missing_or_odd_enhanced_code_gets_the_class_default() -> None:
    failed = Recipient("bob@example.org", "failed", "", "550 no", "mx.example.org")
    delayed = Recipient("bob@example.org", "deferred", "x", "connection refused")
    fail_msg = parse(build_failure_dsn(HOST, envelope(failed), [failed], ORIGINAL, NOW))
    delay_msg = parse(
        build_delay_dsn(HOST, envelope(delayed), [delayed], ORIGINAL, NOW, retry_until=NOW)
    )
    assert status_blocks(fail_msg)[1]["Status"] == "5.0.0"
    assert status_blocks(delay_msg)[1]["Status"] == "4.0.0"


def test_boundary_never_occurs_in_the_content() -> None:
    env = envelope(unknown_user())
    clash = f"X-Trap: {env.queue_id}.{int(NOW)}/relayd\r\n".encode()
    raw = build_failure_dsn(HOST, env, env.recipients, clash + ORIGINAL, NOW)
    msg = parse(raw)
    assert len(parts(msg)) == 3
    assert "X-Trap" in str(parts(msg)[2].get_payload())


def test_utf8_recipient_uses_the_global_status_type() -> None:
    rcpt = Recipient("jürgen@example.de", "failed", "5.1.1", "550 5.1.1 unknown", "mx.example.de")
    raw = build_failure_dsn(HOST, envelope(rcpt, sender="alice@example.com"), [rcpt], ORIGINAL, NOW)
    msg = parse(raw)
    assert parts(msg)[1].get_content_type() == "message/global-delivery-status"
    assert "utf-8; jürgen@example.de" in raw.decode()


def test_reply_cannot_inject_lines_or_control_bytes() -> None:
    rcpt = Recipient(
        "bob@example.org", "failed", "5.0.0", "550 no\r\nX-Evil: yes\x00\x1b", "mx.example.org"
    )
    raw = build_failure_dsn(HOST, envelope(rcpt), [rcpt], ORIGINAL, NOW)
    assert b"\r\nX-Evil" not in raw and b"\x00" not in raw and b"\x1b" not in raw


def test_original_headers_stop_at_the_first_non_header_line() -> None:
    assert original_headers(b"Subject: x\nbody line without colon\nNot: header\n") == (
        b"Subject: x\r\n"
    )
    assert original_headers(b"\r\nbody only") == b""
    assert original_headers(b"A: 1\r\n b\r\nC: 2") == b"A: 1\r\n b\r\nC: 2\r\n"


@given(
    reply=st.text(max_size=600),
    local=st.from_regex(r"[a-z0-9.+_-]{1,30}", fullmatch=True),
    remote=st.booleans(),
)
def test_any_reply_parses_back(reply: str, local: str, remote: bool) -> None:
    rcpt = Recipient(
        f"{local}@example.org", "failed", "5.1.1", reply, "mx.example.org" if remote else ""
    )
    raw = build_failure_dsn(HOST, envelope(rcpt), [rcpt], ORIGINAL, NOW)
    assert re.search(rb"(?<!\r)\n", raw) is None
    msg = parse(raw)
    assert len(parts(msg)) == 3
    block = status_blocks(msg)[1]
    assert block["Final-Recipient"] == f"rfc822; {local}@example.org"
    assert block["Status"] == "5.1.1"
