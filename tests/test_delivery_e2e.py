"""Delivery as a user sees it: relayd finds MX hosts in (loopback) DNS and hands over.

relayd runs as a real process; a DNS server on 127.0.0.1 serves the test's
zone and SMTP servers on 127.0.0.2-5 stand in for remote MX hosts (relayd's
``[delivery] port`` points at them). Clients on loopback are in the
default ``[relay] networks``, so they may relay.
"""

from __future__ import annotations

import email
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.certs import ca_file, server_cert_files
from support.dnsserver import DNSServer
from support.mxserver import MXPool, MXServer
from support.ports import free_port
from support.relayd_proc import Relayd, send

MSG = b"From: alice@sender.test\r\nTo: bob@example.org\r\nSubject: hello\r\n\r\nHello Bob.\r\n"


def zone(dns: DNSServer, pool: MXPool) -> None:
    """example.org: mx1 (10), mx2 (20); sender.test (where bounces go): mx3."""
    dns.add(
        "example.org MX 10 mx1.test",
        "example.org MX 20 mx2.test",
        "sender.test MX 10 mx3.test",
        "mx1.test A 127.0.0.2",
        "mx2.test A 127.0.0.3",
        "mx3.test A 127.0.0.4",
        "mx4.test A 127.0.0.5",
    )


def start(
    tmp_path: Path,
    dns: DNSServer,
    pool: MXPool,
    delivery: str = "",
    extra: str = "",
    retry: str = "1s",
) -> Relayd:
    r = Relayd(
        tmp_path / "relayd",
        dns_address=dns.address,
        hold_delivery=False,
        extra=(
            f'[delivery]\nport = {pool.port}\nretry = ["{retry}"]\nconnect_timeout = "3s"\n'
            f'command_timeout = "5s"\n{delivery}\n{extra}'
        ),
    )
    return r.start()


def inject(r: Relayd, sender: str, rcpts: list[str], message: bytes = MSG) -> str:
    with r.smtp("inbound") as s:
        s.ehlo("client.test")
        return send(s, sender, rcpts, message)


def queue(r: Relayd) -> dict[str, dict[str, object]]:
    out = r.ctl("--json", "queue")
    assert out.returncode == 0, out.stderr
    return {m["queue_id"]: m for m in json.loads(out.stdout)["messages"]}


def wait_gone(r: Relayd, qid: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if qid not in queue(r):
            return
        time.sleep(0.2)
    raise TimeoutError(f"{qid} still queued: {queue(r).get(qid)}\n{r.log()[-3000:]}")


@pytest.fixture
def relayd(tmp_path: Path, dns_server: DNSServer, mx_pool: MXPool) -> Iterator[Relayd]:
    zone(dns_server, mx_pool)
    r = start(tmp_path, dns_server, mx_pool)
    with r:
        yield r
        assert r.stop() == 0


def test_delivers_to_the_preferred_mx(relayd: Relayd, mx_pool: MXPool) -> None:
    qid = inject(relayd, "alice@sender.test", ["bob@example.org"])
    [got] = mx_pool["127.0.0.2"].wait_for_messages(1)
    assert got.rcpt_tos == ["bob@example.org"] and got.mail_from == "alice@sender.test"
    assert got.tls  # opportunistic STARTTLS was offered and used
    assert b"Hello Bob." in got.data
    wait_gone(relayd, qid)
    log = relayd.wait_log(f"{qid}: removed")
    assert f"{qid}: to=<bob@example.org>, relay=mx1.test[127.0.0.2]:{mx_pool.port}" in log
    assert "dsn=2.0.0, status=sent (250" in log
    assert not mx_pool["127.0.0.3"].messages


def test_falls_back_to_the_next_mx(relayd: Relayd, mx_pool: MXPool) -> None:
    mx_pool["127.0.0.2"].greeting = "421 4.3.2 busy"
    inject(relayd, "alice@sender.test", ["bob@example.org"])
    [got] = mx_pool["127.0.0.3"].wait_for_messages(1)
    assert got.rcpt_tos == ["bob@example.org"]


def test_implicit_mx(relayd: Relayd, dns_server: DNSServer, mx_pool: MXPool) -> None:
    dns_server.add("plain.test A 127.0.0.5")
    inject(relayd, "alice@sender.test", ["carol@plain.test"])
    [got] = mx_pool["127.0.0.5"].wait_for_messages(1)
    assert got.rcpt_tos == ["carol@plain.test"]


def dsn_for(server: MXServer, timeout: float = 15.0) -> email.message.Message:
    [bounce] = server.wait_for_messages(1, timeout)
    assert bounce.mail_from in ("", "<>")  # the null sender
    return email.message_from_bytes(bounce.data)


def test_null_mx_bounces_at_once(relayd: Relayd, dns_server: DNSServer, mx_pool: MXPool) -> None:
    dns_server.add("nomail.test MX 0 .")
    qid = inject(relayd, "alice@sender.test", ["dave@nomail.test"])
    report = dsn_for(mx_pool["127.0.0.4"])
    assert report.get_content_type() == "multipart/report"
    assert "Status: 5.1.10" in report.as_string()
    wait_gone(relayd, qid)
    assert all(not s.messages for s in mx_pool if s.host != "127.0.0.4")


def test_5xx_gives_exactly_one_dsn_quoting_the_reply(relayd: Relayd, mx_pool: MXPool) -> None:
    mx_pool["127.0.0.2"].reply_for("nobody@example.org", "550 5.1.1 no such user here")
    qid = inject(relayd, "alice@sender.test", ["nobody@example.org", "bob@example.org"])
    report = dsn_for(mx_pool["127.0.0.4"])
    text = report.as_string()
    assert "550 5.1.1 no such user here" in text
    assert "Final-Recipient: rfc822; nobody@example.org" in text
    assert "bob@example.org" not in text.split("message/delivery-status")[1].split("--")[0]
    wait_gone(relayd, qid)
    assert [m.rcpt_tos for m in mx_pool["127.0.0.2"].messages] == [["bob@example.org"]]
    time.sleep(1.5)
    assert len(mx_pool["127.0.0.4"].messages) == 1  # exactly one


def test_null_sender_is_never_bounced(relayd: Relayd, mx_pool: MXPool) -> None:
    mx_pool["127.0.0.2"].reply_for("nobody@example.org", "550 5.1.1 no such user")
    qid = inject(relayd, "<>", ["nobody@example.org"])
    wait_gone(relayd, qid)
    time.sleep(1.5)
    assert not mx_pool["127.0.0.4"].messages
    assert f"{qid}: to=<nobody@example.org>" in relayd.log()


def test_4xx_defers_then_flush_delivers(
    tmp_path: Path, dns_server: DNSServer, mx_pool: MXPool
) -> None:
    zone(dns_server, mx_pool)
    mx = mx_pool["127.0.0.2"]
    mx.reply_for("bob@example.org", "451 4.7.1 greylisted, try later", "250 2.1.5 OK")
    mx_pool["127.0.0.3"].reply_for("bob@example.org", "451 4.7.1 greylisted too")
    with start(tmp_path, dns_server, mx_pool, retry="1h") as relayd:
        _defer_then_flush(relayd, mx)


def _defer_then_flush(relayd: Relayd, mx: MXServer) -> None:
    qid = inject(relayd, "alice@sender.test", ["bob@example.org"])
    relayd.wait_log("status=deferred")
    entry = queue(relayd)[qid]
    assert entry["state"] == "deferred"
    recipient = entry["recipients"][0]  # type: ignore[index]
    assert "451 4.7.1" in recipient["delay_reason"]
    shown = relayd.ctl("queue", "show", qid)
    assert shown.returncode == 0 and "mx1.test[127.0.0.2]" in shown.stdout
    assert relayd.ctl("queue", "flush", qid).returncode == 0
    [got] = mx.wait_for_messages(1)
    assert got.rcpt_tos == ["bob@example.org"]
    wait_gone(relayd, qid)
    assert relayd.stop() == 0


def test_max_age_expiry_bounces(tmp_path: Path, dns_server: DNSServer, mx_pool: MXPool) -> None:
    zone(dns_server, mx_pool)
    for host in ("127.0.0.2", "127.0.0.3"):
        mx_pool[host].reply_for("bob@example.org", "451 4.2.0 mailbox busy")
    with start(tmp_path, dns_server, mx_pool, delivery='max_age = "3s"') as r:
        qid = inject(r, "alice@sender.test", ["bob@example.org"])
        report = dsn_for(mx_pool["127.0.0.4"], timeout=20)
        assert "451 4.2.0 mailbox busy" in report.as_string()
        assert "Action: failed" in report.as_string()
        wait_gone(r, qid)
        assert r.stop() == 0


def test_smarthost_with_auth_over_starttls(tmp_path: Path, dns_server: DNSServer) -> None:
    port = free_port("127.0.0.6")
    cert = server_cert_files(tmp_path, "smarthost.test")
    dns_server.add("smarthost.test A 127.0.0.6")
    secret = tmp_path / "smarthost.pw"
    secret.write_text("s3cret\n")
    route = (
        f'[[route]]\ndomain = "*"\nvia = "smarthost.test:{port}"\nusername = "relay"\n'
        f'password_file = "{secret}"\ntls = "starttls"\nca_file = "{ca_file(tmp_path)}"\n'
    )
    with MXServer(
        "127.0.0.6",
        port,
        cert=cert,
        auth={"relay": "s3cret"},
        auth_required=True,
        hostname="smarthost.test",
    ) as smarthost:
        r = Relayd(
            tmp_path / "relayd", dns_address=dns_server.address, hold_delivery=False, extra=route
        )
        with r:
            r.start()
            inject(r, "alice@sender.test", ["bob@example.org", "carol@example.net"])
            [got] = smarthost.wait_for_messages(1)
            assert got.auth_user == "relay" and got.tls
            assert sorted(got.rcpt_tos) == ["bob@example.org", "carol@example.net"]
            assert r.stop() == 0


def test_connection_reuse(relayd: Relayd, mx_pool: MXPool) -> None:
    mx = mx_pool["127.0.0.2"]
    with relayd.smtp("inbound") as s:
        s.ehlo("client.test")
        for i in range(5):
            send(s, "alice@sender.test", [f"user{i}@example.org"], MSG)
            mx.wait_for_messages(i + 1)
    assert len(mx.messages) == 5
    assert mx.connections < 5


def test_restart_mid_queue_loses_nothing(
    tmp_path: Path, dns_server: DNSServer, mx_pool: MXPool
) -> None:
    zone(dns_server, mx_pool)
    for host in ("127.0.0.2", "127.0.0.3"):
        mx_pool[host].reply_for("*", "451 4.3.0 come back later")
    r = start(tmp_path, dns_server, mx_pool, delivery='max_age = "1h"')
    with r:
        ids = [inject(r, "alice@sender.test", [f"u{i}@example.org"]) for i in range(6)]
        r.wait_log("status=deferred")
        assert r.stop() == 0
        assert set(ids) <= set(queue(r))  # offline listing reads the spool
        for host in ("127.0.0.2", "127.0.0.3"):
            mx_pool[host].reply_for("*", "250 2.1.5 OK")
        r.start()
        assert r.ctl("queue", "flush").returncode == 0
        for qid in ids:
            wait_gone(r, qid, timeout=30)
        got = [m.rcpt_tos[0] for host in ("127.0.0.2", "127.0.0.3") for m in mx_pool[host].messages]
        assert sorted(got) == sorted(f"u{i}@example.org" for i in range(6))  # once each
        assert r.stop() == 0
