"""The accept path as a client sees it: every accept-side row of SPEC §3.

relayd runs as a real process; clients speak SMTP over loopback TCP, with
real TLS. Loopback clients would be in the default ``[relay] networks``,
so the shared instance narrows networks to an address nobody connects
from, making 127.0.0.1 an ordinary Internet client.
"""

from __future__ import annotations

import smtplib
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.certs import client_context
from support.relayd_proc import HOSTNAME, Relayd, raw_session, send

PASSWORD = "correct horse battery"
MSG = b"From: alice@example.com\r\nTo: bob@example.org\r\nSubject: hi\r\n\r\nHello.\r\n"

EXTRA = """
[relay]
domains = ["relay.test"]
networks = ["127.0.0.5/32"]

[limits]
max_message_size = "20kB"
max_recipients = 3
"""


@pytest.fixture(scope="module")
def relayd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Relayd]:
    root = tmp_path_factory.mktemp("accept")
    r = Relayd(root, extra=EXTRA)
    r.add_user("alice@example.com", PASSWORD)
    r.add_user("app1", PASSWORD, "*@app.example")
    with r:
        r.start()
        yield r
        assert r.stop() == 0


def spool_ids(r: Relayd) -> set[str]:
    queue = r.spool / "queue"
    return {p.name.split(".")[0] for p in queue.iterdir()} if queue.exists() else set()


def ehlo_lines(client: smtplib.SMTP) -> list[str]:
    code, text = client.ehlo("client.test")
    assert code == 250
    return text.decode().splitlines()[1:]


# ---- greeting, EHLO, TLS --------------------------------------------------------------


def test_greeting_names_the_host(relayd: Relayd) -> None:
    with raw_session(relayd.port("inbound")) as c:
        assert c.reply() == f"220 {HOSTNAME} ESMTP"


def test_ehlo_before_and_after_starttls(relayd: Relayd) -> None:
    with relayd.smtp("inbound") as s:
        before = ehlo_lines(s)
        assert before == [
            "PIPELINING",
            "SIZE 20000",
            "8BITMIME",
            "SMTPUTF8",
            "ENHANCEDSTATUSCODES",
            "STARTTLS",
        ]
        s.starttls(context=client_context())
        after = ehlo_lines(s)
        assert "AUTH PLAIN LOGIN" in after
        assert "STARTTLS" not in after


def test_implicit_tls_offers_auth_at_once(relayd: Relayd) -> None:
    with relayd.smtp("submissions") as s:
        lines = ehlo_lines(s)
        assert "AUTH PLAIN LOGIN" in lines and "STARTTLS" not in lines


@pytest.mark.parametrize("listener", ["inbound", "submission"])
def test_auth_before_tls_is_refused(relayd: Relayd, listener: str) -> None:
    with raw_session(relayd.port(listener)) as c:
        c.reply()
        c.cmd("EHLO client.test")
        assert c.cmd("AUTH PLAIN AGFsaWNlAHg=").startswith("530 5.7.0")


def test_mail_on_submission_needs_auth(relayd: Relayd) -> None:
    with raw_session(relayd.port("submission")) as c:
        c.reply()
        c.cmd("EHLO client.test")
        assert c.cmd("MAIL FROM:<alice@example.com>").startswith("530 5.7.0")
        c.starttls()
        c.cmd("EHLO client.test")
        assert c.cmd("MAIL FROM:<alice@example.com>").startswith("530 5.7.0")


def test_bad_credentials(relayd: Relayd) -> None:
    with relayd.smtp("submissions") as s:
        s.ehlo("client.test")
        with pytest.raises(smtplib.SMTPAuthenticationError) as err:
            s.login("alice@example.com", "wrong")
        assert err.value.smtp_code == 535
        assert err.value.smtp_error.startswith(b"5.7.8")


# ---- submission: sender ownership, headers ----------------------------------------------


def test_submission_queues_and_adds_headers(relayd: Relayd) -> None:
    qid = relayd.submit(
        "alice@example.com",
        PASSWORD,
        "alice@example.com",
        ["bob@example.org"],
        b"Subject: no id\r\n\r\nbody\r\n",
    )
    assert qid in spool_ids(relayd)
    shown = relayd.ctl("queue", "show", qid, "--raw")
    assert shown.returncode == 0
    head = shown.stdout.replace("\r\n", "\n").split("\n\n")[0]
    assert head.startswith("Received: from client.test ([127.0.0.1])")
    assert f"by {HOSTNAME} (relayd) with ESMTPSA id {qid}" in head
    assert "\nMessage-ID: <" in head and "\nDate: " in head


def test_subaddress_is_owned_other_address_is_not(relayd: Relayd) -> None:
    with relayd.smtp("submissions") as s:
        s.ehlo("client.test")
        s.login("alice@example.com", PASSWORD)
        assert s.mail("alice+news@example.com")[0] == 250
        s.rset()
        code, text = s.mail("bob@example.com")
        assert code == 553 and text.startswith(b"5.7.1")


def test_allow_from_patterns(relayd: Relayd) -> None:
    with relayd.smtp("submissions") as s:
        s.ehlo("client.test")
        s.login("app1", PASSWORD)
        assert s.mail("noreply@app.example")[0] == 250
        s.rset()
        code, text = s.mail("app1@other.example")
        assert code == 553 and text.startswith(b"5.7.1")


# ---- never an open relay ------------------------------------------------------------------


def inbound_rcpt(relayd: Relayd, rcpt: str, source: str = "127.0.0.1") -> str:
    with raw_session(relayd.port("inbound")) as c:
        if source != "127.0.0.1":
            c.close()
            sock = socket.create_connection(
                ("127.0.0.1", relayd.port("inbound")), timeout=10, source_address=(source, 0)
            )
            c.sock = sock
        c.reply()
        c.cmd("EHLO client.test")
        assert c.cmd("MAIL FROM:<someone@sender.test>").startswith("250")
        return c.cmd(f"RCPT TO:{rcpt}")


def test_served_domain_is_accepted(relayd: Relayd) -> None:
    assert inbound_rcpt(relayd, "<bob@relay.test>").startswith("250 2.1.5")
    assert inbound_rcpt(relayd, "<bob@RELAY.TEST>").startswith("250 2.1.5")


@pytest.mark.parametrize(
    "rcpt",
    [
        "<bob@evil.test>",
        "<bob@sub.relay.test>",
        '<"bob@evil.test"@relay.test>',
        "<bob%evil.test@relay.test>",
        "<bob!evil.test@relay.test>",
        "<@relay.test:bob@evil.test>",
        "<@relay.test,@x.test:bob@evil.test>",
        "<bob@evil.test@relay.test>",
        "<bob@[127.0.0.1]>",
        "<bob@relay.test.>",
        "<bob@relay.test.evil.test>",
        "bob@evil.test",
        "<bob@evil.test> NOTIFY=NEVER",
        "<bob@relay.test\x00.evil.test>",
        "<bob@evil.test\r\n>",
    ],
)
def test_open_relay_attempts_are_refused(relayd: Relayd, rcpt: str) -> None:
    reply = inbound_rcpt(relayd, rcpt)
    assert reply[0] == "5", reply
    assert not reply.startswith("250")


def test_relay_network_client_may_relay(relayd: Relayd) -> None:
    assert inbound_rcpt(relayd, "<bob@evil.test>", source="127.0.0.5").startswith("250")


def test_relay_denied_code(relayd: Relayd) -> None:
    assert inbound_rcpt(relayd, "<bob@elsewhere.test>").startswith("554 5.7.1")


# ---- limits ---------------------------------------------------------------------------------


def test_size_parameter_over_limit(relayd: Relayd) -> None:
    with raw_session(relayd.port("inbound")) as c:
        c.reply()
        c.cmd("EHLO client.test")
        assert c.cmd("MAIL FROM:<a@sender.test> SIZE=20001").startswith("552 5.3.4")
        assert c.cmd("MAIL FROM:<a@sender.test> SIZE=1000").startswith("250")


def test_actual_size_over_limit(relayd: Relayd) -> None:
    before = spool_ids(relayd)
    with relayd.smtp("inbound") as s:
        s.ehlo("client.test")
        s.mail("a@sender.test")
        s.rcpt("bob@relay.test")
        code, text = s.data(b"Subject: big\r\n\r\n" + (b"x" * 70 + b"\r\n") * 400)
        assert code == 552 and text.startswith(b"5.3.4")
        assert s.noop()[0] == 250  # the session is still in step
    assert spool_ids(relayd) == before


def test_too_many_recipients(relayd: Relayd) -> None:
    with raw_session(relayd.port("inbound")) as c:
        c.reply()
        c.cmd("EHLO client.test")
        c.cmd("MAIL FROM:<a@sender.test>")
        for i in range(3):
            assert c.cmd(f"RCPT TO:<u{i}@relay.test>").startswith("250")
        assert c.cmd("RCPT TO:<u9@relay.test>").startswith("452 4.5.3")


# ---- protocol safety -------------------------------------------------------------------------

SMUGGLE = [b"\n.\n", b"\n.\r\n", b"\r.\r", b"\r\n.\r", b"\r.\r\n", b"\r\n.\n", b".\n"]


@pytest.mark.parametrize("marker", SMUGGLE, ids=[repr(m) for m in SMUGGLE])
def test_smuggling_is_refused(relayd: Relayd, marker: bytes) -> None:
    before = spool_ids(relayd)
    smuggled = (
        b"MAIL FROM:<admin@relay.test>\r\nRCPT TO:<victim@relay.test>\r\nDATA\r\n"
        b"Subject: smuggled\r\n\r\nevil\r\n"
    )
    with raw_session(relayd.port("inbound")) as c:
        c.reply()
        c.cmd("EHLO client.test")
        c.cmd("MAIL FROM:<a@sender.test>")
        c.cmd("RCPT TO:<bob@relay.test>")
        assert c.cmd("DATA").startswith("354")
        c.send(b"Subject: x\r\n\r\nfirst" + marker + smuggled + b".\r\n")
        reply = c.reply()
        assert reply.startswith("5"), reply
        # The smuggled commands were content, not commands: the session is clean.
        assert c.cmd("RCPT TO:<bob@relay.test>").startswith("503")
    assert spool_ids(relayd) == before


def test_line_over_998_octets_is_refused(relayd: Relayd) -> None:
    before = spool_ids(relayd)
    with relayd.smtp("inbound") as s:
        s.ehlo("client.test")
        s.mail("a@sender.test")
        s.rcpt("bob@relay.test")
        code, _ = s.data(b"Subject: long\r\n\r\n" + b"y" * 999 + b"\r\n")
        assert 500 <= code < 600
    assert spool_ids(relayd) == before


def test_line_of_998_octets_is_fine(relayd: Relayd) -> None:
    with relayd.smtp("inbound") as s:
        s.ehlo("client.test")
        qid = send(s, "a@sender.test", ["bob@relay.test"], b"Subject: ok\r\n\r\n" + b"y" * 998)
    assert qid in spool_ids(relayd)


def test_starttls_injection_is_discarded(relayd: Relayd) -> None:
    with raw_session(relayd.port("inbound")) as c:
        c.reply()
        c.cmd("EHLO client.test")
        c.send(b"STARTTLS\r\nMAIL FROM:<injected@sender.test>\r\n")
        assert c.reply().startswith("220")
        c.sock = client_context().wrap_socket(c.sock, server_hostname=HOSTNAME)
        c.cmd("EHLO client.test")
        # Had the injected MAIL run, RCPT would be accepted now.
        assert c.cmd("RCPT TO:<bob@relay.test>").startswith("503")


def test_pipelined_transaction(relayd: Relayd) -> None:
    with raw_session(relayd.port("inbound")) as c:
        c.reply()
        c.cmd("EHLO client.test")
        c.send(
            b"MAIL FROM:<a@sender.test>\r\nRCPT TO:<bob@relay.test>\r\n"
            b"RCPT TO:<carol@relay.test>\r\nDATA\r\n"
        )
        assert [c.reply()[:3] for _ in range(4)] == ["250", "250", "250", "354"]
        c.send(b"Subject: p\r\n\r\nbody\r\n.\r\nNOOP\r\nQUIT\r\n")
        assert c.reply().startswith("250 2.0.0 Ok: queued as ")
        assert c.reply().startswith("250")
        assert c.reply().startswith("221")


def test_replies_carry_enhanced_codes(relayd: Relayd) -> None:
    with raw_session(relayd.port("inbound")) as c:
        c.reply()
        c.cmd("EHLO client.test")
        for cmd in [
            "NOOP",
            "RSET",
            "RCPT TO:<x@relay.test>",
            "DATA",
            "FOO",
            "MAIL FROM:<bad",
            "VRFY bob",
        ]:
            reply = c.cmd(cmd)
            assert reply[4:5].isdigit() and reply[5] == ".", (cmd, reply)


def test_null_sender_accepted_inbound(relayd: Relayd) -> None:
    with relayd.smtp("inbound") as s:
        s.ehlo("client.test")
        qid = send(s, "<>", ["postmaster@relay.test"], b"Subject: bounce\r\n\r\nx\r\n")
    listing = relayd.ctl("--json", "queue")
    assert listing.returncode == 0
    assert qid in listing.stdout


# ---- instances with their own settings -------------------------------------------------------


def test_idle_timeout_closes_silent_session(tmp_path: Path) -> None:
    with Relayd(tmp_path, extra='[limits]\nidle_timeout = "1s"\n') as r:
        r.start()
        with raw_session(r.port("inbound")) as idle, raw_session(r.port("inbound")) as busy:
            idle.reply()
            busy.reply()
            started = time.monotonic()
            assert busy.cmd("EHLO client.test").startswith("250")
            assert idle.reply().startswith("421 4.4.2")
            assert time.monotonic() - started < 5
            with pytest.raises((ConnectionError, OSError)):
                idle.cmd("NOOP")
        assert r.stop() == 0


def test_connection_caps(tmp_path: Path) -> None:
    with Relayd(tmp_path, extra="[limits]\nmax_connections_per_ip = 2\n") as r:
        r.start()
        with raw_session(r.port("inbound")) as a, raw_session(r.port("inbound")) as b:
            assert a.reply().startswith("220") and b.reply().startswith("220")
            with raw_session(r.port("inbound")) as c:
                assert c.reply().startswith("421 4.7.0")
        assert r.stop() == 0


def test_auth_failures_are_throttled(tmp_path: Path) -> None:
    with Relayd(tmp_path, auth='max_failures = 2\nfailure_window = "1m"\n') as r:
        r.add_user("alice@example.com", PASSWORD)
        r.start()
        wrong = "PLAIN AGFsaWNlQGV4YW1wbGUuY29tAHdyb25n"  # alice@example.com / wrong
        with r.smtp("submissions") as s:
            s.ehlo("client.test")
            for _ in range(2):
                code, text = s.docmd("AUTH", wrong)
                assert code == 535 and text.startswith(b"5.7.8")
            code, text = s.docmd("AUTH", wrong)
            assert code == 421 and text.startswith(b"4.7.0")
        with r.smtp("submissions") as s:  # the address stays refused, on a new connection too
            s.ehlo("client.test")
            assert s.docmd("AUTH", wrong)[0] == 421
        r.stop()


def test_disk_space_floor(tmp_path: Path) -> None:
    r = Relayd(tmp_path)
    r.write_config()
    text = r.config_path.read_text().replace('min_free_space = "1MB"', 'min_free_space = "1000TB"')
    r.config_path.write_text(text)
    with r:
        r.start()
        with raw_session(r.port("inbound")) as c:
            c.reply()
            c.cmd("EHLO client.test")
            assert c.cmd("MAIL FROM:<a@sender.test>").startswith("452 4.3.1")
        r.stop()


def test_spool_write_failure_is_451_and_leaves_nothing(tmp_path: Path) -> None:
    with Relayd(tmp_path, fsize_limit=200_000) as r:
        r.start()
        with r.smtp("inbound") as s:
            s.ehlo("client.test")
            s.mail("a@sender.test")
            s.rcpt("bob@relay.test")
            code, text = s.data(b"Subject: big\r\n\r\n" + (b"z" * 76 + b"\r\n") * 4000)
            assert code == 451 and text.startswith(b"4.3.0")
            qid = send(s, "a@sender.test", ["bob@relay.test"], b"Subject: small\r\n\r\nok\r\n")
        assert spool_ids(r) == {qid}
        # Under so low a file size limit the shared counts cannot be made either:
        # relayd says so and stays one process, its limits still exact.
        assert "cannot create the counts shared between processes" in r.log()
        assert r.stop() == 0
        leftovers = list((r.spool / "tmp").iterdir()) if (r.spool / "tmp").exists() else []
        assert leftovers == []


def test_kill_9_after_acknowledgements_loses_nothing(tmp_path: Path) -> None:
    with Relayd(tmp_path) as r:
        r.start()
        acked: list[str] = []
        with r.smtp("inbound") as s:
            s.ehlo("client.test")
            for i in range(20):
                acked.append(
                    send(
                        s,
                        "a@sender.test",
                        ["bob@relay.test"],
                        f"Subject: {i}\r\n\r\nmessage {i}\r\n".encode(),
                    )
                )
        r.kill()
        assert set(acked) <= spool_ids(r)
        r.start()
        listing = r.ctl("--json", "queue")
        assert listing.returncode == 0
        for qid in acked:
            assert qid in listing.stdout
        assert r.stop() == 0


def test_ipv6_listener(tmp_path: Path) -> None:
    try:
        socket.socket(socket.AF_INET6).bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback here")
    from support.relayd_proc import ListenerSpec

    with Relayd(tmp_path, listeners=(ListenerSpec("v6", "inbound", "none", 0, "::1"),)) as r:
        r.start()
        with smtplib.SMTP("::1", r.port("v6"), timeout=10) as s:
            s.ehlo("client.test")
            qid = send(s, "a@sender.test", ["bob@relay.test"], MSG)
        assert qid in spool_ids(r)
        assert r.stop() == 0


def test_slow_client_does_not_hold_up_others(relayd: Relayd) -> None:
    with raw_session(relayd.port("inbound")) as slow:
        slow.reply()
        slow.cmd("EHLO slow.test")
        slow.cmd("MAIL FROM:<a@sender.test>")
        slow.cmd("RCPT TO:<bob@relay.test>")
        assert slow.cmd("DATA").startswith("354")
        for piece in (b"Subject: sl", b"ow\r\n\r\nbo", b"dy\r"):
            slow.send(piece)
            started = time.monotonic()
            with relayd.smtp("inbound") as fast:
                fast.ehlo("fast.test")
                send(fast, "a@sender.test", ["bob@relay.test"], MSG)
            assert time.monotonic() - started < 5
        slow.send(b"\n.\r\n")
        assert slow.reply().startswith("250 2.0.0 Ok: queued as ")
