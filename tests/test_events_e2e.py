"""Webhooks and the suppression list (SPEC §10), end to end.

relayd runs as a real process; loopback DNS and MX servers (127.0.0.2-5)
stand in for the Internet, and a loopback HTTP server for the application's
webhook receiver. The receiver refuses events (500) while relayd is
stopped, started, SIGKILLed and started again; then it takes them (200) and
the set of events it got is compared exactly, every signature checked.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import socket
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from support.certs import client_context
from support.dnsserver import DNSServer
from support.mxserver import MXPool
from support.relayd_proc import Relayd, send
from support.webhook import Request, WebhookReceiver

SECRET = b"s3cret-for-tests"
SENDER = "app@sender.test"
MSG = (
    b"From: app@sender.test\r\nTo: bob@example.org\r\nSubject: receipt\r\n"
    b"Message-ID: <receipt-1@sender.test>\r\n\r\nThanks.\r\n"
)
SIGNATURE = re.compile(r"t=(\d+),v1=([0-9a-f]{64})")
KEYS = {
    "event", "id", "timestamp", "recipient", "sender", "message_id", "dsn", "reply",
    "next_attempt",
}  # fmt: skip


def zone(dns: DNSServer) -> None:
    dns.add(
        "example.org MX 10 mx1.test",
        "sender.test MX 10 mx3.test",
        "mx1.test A 127.0.0.2",
        "mx3.test A 127.0.0.4",
    )


def make_relayd(tmp_path: Path, dns: DNSServer, pool: MXPool, extra: str = "") -> Relayd:
    return Relayd(
        tmp_path / "relayd",
        dns_address=dns.address,
        hold_delivery=False,
        extra=(
            f'[delivery]\nport = {pool.port}\nretry = ["1s"]\nconnect_timeout = "3s"\n'
            f'command_timeout = "5s"\ndelay_warning = "2s"\n{extra}'
        ),
    )


def verified(request: Request) -> dict[str, object]:
    """The event, once its Relayd-Signature checks out (as docs/api.md tells receivers to)."""
    header = request.headers.get("Relayd-Signature", "")
    match = SIGNATURE.fullmatch(header)
    assert match is not None, header
    stamp, mac = match[1], match[2]
    expected = hmac.new(SECRET, stamp.encode() + b"." + request.body, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(mac, expected)
    assert abs(time.time() - int(stamp)) < 300
    assert request.headers.get("Content-Type") == "application/json"
    event = request.json()
    assert set(event) == KEYS
    return event


def keyed(requests: list[Request]) -> set[tuple[str, str, str]]:
    return {(e["event"], e["id"], e["recipient"]) for e in map(verified, requests)}  # type: ignore[misc]


def inject(r: Relayd, rcpts: list[str]) -> str:
    with r.smtp("inbound") as s:
        s.ehlo("client.test")
        return send(s, SENDER, rcpts, MSG)


def wait_empty(r: Relayd, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = r.ctl("--json", "queue")
        if out.returncode == 0 and not json.loads(out.stdout)["messages"]:
            return
        time.sleep(0.2)
    raise TimeoutError(f"queue not empty:\n{r.log()[-3000:]}")


def suppressed(r: Relayd) -> dict[str, dict[str, object]]:
    out = r.ctl("--json", "suppression", "list")
    assert out.returncode == 0, out.stderr
    return {e["address"]: e for e in json.loads(out.stdout)["suppressed"]}


@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    with WebhookReceiver() as hook:
        yield hook


def test_events_survive_restart_and_sigkill_and_arrive_signed(
    tmp_path: Path, dns_server: DNSServer, mx_pool: MXPool, receiver: WebhookReceiver
) -> None:
    zone(dns_server)
    secret = tmp_path / "webhook.secret"
    secret.write_bytes(SECRET + b"\n")
    mx = mx_pool["127.0.0.2"]
    mx.reply_for("bob@example.org", "250 2.1.5 OK")
    mx.reply_for("gone@example.org", "550 5.1.1 <gone@example.org>: no such user")
    mx.reply_for("later@example.org", "451 4.7.1 greylisted", "250 2.1.5 OK")
    mx.reply_for("slow@example.org", *["451 4.4.3 busy"] * 4, "250 2.1.5 OK")
    receiver.status = 500
    r = make_relayd(
        tmp_path,
        dns_server,
        mx_pool,
        f'[[webhook]]\nurl = "{receiver.url}"\nsecret_file = "{secret}"\n',
    )
    rcpts = ["bob@example.org", "gone@example.org", "later@example.org", "slow@example.org"]
    with r:
        r.start()
        qid = inject(r, rcpts)
        wait_empty(r)
        # Refused at least once each, so what follows are retries from the outbox.
        receiver.wait_for(lambda got: len(got) >= 8)
        assert r.stop() == 0
        r.start()
        r.kill()  # SIGKILL: nothing may be lost either
        receiver.status = 200
        r.start()
        expected = {
            *(("queued", qid, a) for a in rcpts),
            ("delivered", qid, "bob@example.org"),
            ("bounced", qid, "gone@example.org"),
            ("suppressed", qid, "gone@example.org"),
            ("deferred", qid, "later@example.org"),
            ("delivered", qid, "later@example.org"),
            ("deferred", qid, "slow@example.org"),
            ("delayed", qid, "slow@example.org"),
            ("delivered", qid, "slow@example.org"),
        }
        receiver.wait_for(lambda got: keyed([g for g in got if g.status == 200]) >= expected, 60)
        time.sleep(1.5)  # anything more would come now
        taken = receiver.taken()
        assert keyed(taken) == expected
        assert all(req.status == 500 for req in receiver.requests[:8])
        events = [verified(req) for req in taken]
        for event in events:
            assert event["sender"] == SENDER
            assert event["message_id"] == "<receipt-1@sender.test>"
            assert isinstance(event["timestamp"], int)
        by_key = {(e["event"], e["recipient"]): e for e in events}
        bounced = by_key[("bounced", "gone@example.org")]
        assert bounced["dsn"] == "5.1.1" and "no such user" in str(bounced["reply"])
        assert bounced["next_attempt"] is None
        deferred = by_key[("deferred", "later@example.org")]
        assert deferred["dsn"] == "4.7.1" and isinstance(deferred["next_attempt"], int)
        assert by_key[("delivered", "bob@example.org")]["dsn"] == "2.0.0"
        assert by_key[("queued", "bob@example.org")]["reply"] == f"250 2.0.0 Ok: queued as {qid}"
        # Only the hard bounce is suppressed: 4xx deferrals never are.
        assert set(suppressed(r)) == {"gone@example.org"}
        assert r.stop() == 0
    log = r.log()
    assert "event not taken (HTTP 500)" in log


def test_events_filter_and_no_signature_without_secret(
    tmp_path: Path, dns_server: DNSServer, mx_pool: MXPool, receiver: WebhookReceiver
) -> None:
    zone(dns_server)
    mx_pool["127.0.0.2"].reply_for("gone@example.org", "550 5.1.1 no such user")
    r = make_relayd(
        tmp_path,
        dns_server,
        mx_pool,
        f'[[webhook]]\nurl = "{receiver.url}"\nevents = ["bounced"]\n',
    )
    with r:
        r.start()
        qid = inject(r, ["bob@example.org", "gone@example.org"])
        wait_empty(r)
        [request] = receiver.wait_for(lambda got: len(got) >= 1)
        time.sleep(1.5)
        assert len(receiver.requests) == 1
        assert "Relayd-Signature" not in request.headers
        event = request.json()
        assert (event["event"], event["id"], event["recipient"]) == (
            "bounced",
            qid,
            "gone@example.org",
        )
        assert r.stop() == 0


# ---- the suppression list ----------------------------------------------------------


def submission_rcpt(r: Relayd, rcpt: str) -> tuple[int, str]:
    with r.smtp("submission") as s:
        s.ehlo("client.test")
        s.starttls(context=client_context())
        s.ehlo("client.test")
        s.login("app@sender.test", "app-password")
        code, _ = s.mail(SENDER)
        assert code == 250
        code, reply = s.rcpt(rcpt)
        return code, reply.decode()


def inbound_rcpt(r: Relayd, rcpt: str) -> int:
    with r.smtp("inbound") as s:
        s.ehlo("client.test")
        code, _ = s.mail("someone@elsewhere.test")
        assert code == 250
        return s.rcpt(rcpt)[0]


def wait_suppressed(r: Relayd, address: str, timeout: float = 20.0) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = suppressed(r).get(address)
        if found is not None:
            return found
        time.sleep(0.2)
    raise TimeoutError(f"{address} not suppressed:\n{r.log()[-3000:]}")


def test_hard_bounce_suppresses_submission_only(
    tmp_path: Path, dns_server: DNSServer, mx_pool: MXPool
) -> None:
    zone(dns_server)
    mx_pool["127.0.0.2"].reply_for("gone@example.org", "550 5.1.1 <gone@example.org>: no such user")
    r = make_relayd(tmp_path, dns_server, mx_pool, '[suppression]\nexpire = "2d"\n')
    r.add_user("app@sender.test", "app-password")
    with r:
        r.start()
        qid = r.submit("app@sender.test", "app-password", SENDER, ["gone@example.org"], MSG)
        entry = wait_suppressed(r, "gone@example.org")
        assert entry["dsn"] == "5.1.1" and entry["queue_id"] == qid
        assert entry["source"] == "bounce"
        assert int(str(entry["expires"])) - int(str(entry["since"])) == 2 * 86400
        today = datetime.fromtimestamp(int(str(entry["since"])), UTC).strftime("%Y-%m-%d")
        for spelled in ("gone@example.org", "Gone@Example.ORG"):
            code, reply = submission_rcpt(r, spelled)
            assert code == 550, reply
            # relayd writes the domain in lower case, as everywhere else
            text = f"5.1.1 <{spelled}>: suppressed after a hard bounce on {today}"
            assert reply.lower() == text.lower()
        r.wait_log("suppressed after a hard bounce")
        # Inbound and [relay] networks clients without AUTH are not affected.
        assert inbound_rcpt(r, "gone@example.org") == 250
        # Other addresses are not affected either.
        assert submission_rcpt(r, "bob@example.org")[0] == 250

        out = r.ctl("suppression", "del", "gone@example.org")
        assert out.returncode == 0, out.stderr
        assert submission_rcpt(r, "gone@example.org")[0] == 250
        out = r.ctl("suppression", "del", "gone@example.org")
        assert out.returncode == 1 and "not suppressed" in out.stderr

        out = r.ctl("--json", "suppression", "add", "Manual@Example.org")
        assert out.returncode == 0, out.stderr
        added = json.loads(out.stdout)
        assert added["ok"] is True and added["entry"]["address"] == "manual@example.org"
        assert added["entry"]["source"] == "operator"
        assert submission_rcpt(r, "manual@example.org")[0] == 550
        listing = r.ctl("suppression", "list")
        assert listing.returncode == 0 and "manual@example.org" in listing.stdout
        assert r.ctl("suppression", "add", "not-an-address").returncode == 2

        # [suppression] enabled = false: the list is not consulted.
        r.extra += "enabled = false\n"
        r.write_config()
        assert r.ctl("reload").returncode == 0
        assert submission_rcpt(r, "manual@example.org")[0] == 250
        assert r.stop() == 0
    # With the daemon stopped, relayctl still reads and edits the file.
    out = r.ctl("--json", "suppression")
    assert out.returncode == 0, out.stderr
    assert [e["address"] for e in json.loads(out.stdout)["suppressed"]] == ["manual@example.org"]
    assert r.ctl("suppression", "del", "manual@example.org").returncode == 0
    assert json.loads(r.ctl("--json", "suppression").stdout) == {"suppressed": []}


def test_a_receiver_that_hangs_does_not_slow_delivery(
    tmp_path: Path, dns_server: DNSServer, mx_pool: MXPool
) -> None:
    zone(dns_server)
    # Accepts connections (the kernel's backlog) and never answers.
    with socket.socket() as hang:
        hang.bind(("127.0.0.1", 0))
        hang.listen(128)
        url = f"http://127.0.0.1:{hang.getsockname()[1]}/hook"
        r = make_relayd(tmp_path, dns_server, mx_pool, f'[[webhook]]\nurl = "{url}"\n')
        with r:
            r.start()
            started = time.monotonic()
            for _ in range(10):
                inject(r, ["bob@example.org"])
            mx_pool.wait_for_messages(10, timeout=20)
            wait_empty(r)
            elapsed = time.monotonic() - started
            # Each POST waits 10 s for its answer; mail is not held up by that.
            print(f"10 messages delivered in {elapsed:.2f}s with a hanging receiver")
            assert elapsed < 5.0, elapsed
            assert r.stop() == 0


def test_acceptor_processes_share_the_list_and_write_events(
    tmp_path: Path, dns_server: DNSServer, mx_pool: MXPool, receiver: WebhookReceiver
) -> None:
    zone(dns_server)
    r = make_relayd(
        tmp_path,
        dns_server,
        mx_pool,
        f'[server]\nprocesses = 3\n[[webhook]]\nurl = "{receiver.url}"\nevents = ["queued"]\n',
    )
    r.add_user("app@sender.test", "app-password")
    with r:
        r.start()
        assert r.proc is not None
        daemon = str(r.proc.pid)
        deadline = time.monotonic() + 15
        while len(set(re.findall(r"\[(\d+)\]: listening on \S+ as submission ", r.log()))) < 3:
            assert time.monotonic() < deadline, r.log()
            time.sleep(0.1)
        assert r.ctl("suppression", "add", "gone@example.org").returncode == 0
        refused = r"\[(\d+)\]: NOQUEUE: reject: RCPT .*: suppressed after a hard bounce"
        for _ in range(100):  # bounded: until an acceptor (not the daemon) refused one
            assert submission_rcpt(r, "gone@example.org")[0] == 550
            if set(re.findall(refused, r.log())) - {daemon}:
                break
        assert set(re.findall(refused, r.log())) - {daemon}, "no acceptor refused"
        qids: dict[str, str] = {}
        for _ in range(100):  # until an acceptor queued one
            qid = inject(r, ["bob@example.org"])
            found = re.search(rf"\[(\d+)\]: {qid}: client=", r.log())
            assert found is not None
            qids[qid] = found[1]
            if len(qids) >= 3 and set(qids.values()) - {daemon}:
                break
        assert set(qids.values()) - {daemon}, "no acceptor queued a message"
        got = receiver.wait_for(lambda got: len(got) >= len(qids), 20)
        time.sleep(1.5)
        assert sorted(
            (e["event"], e["id"]) for e in (g.json() for g in receiver.requests)
        ) == sorted(("queued", q) for q in qids)
        assert len(got) == len(qids)
        assert r.stop() == 0
