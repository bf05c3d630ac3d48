"""The HTTP API end to end (SPEC section 10): HTTP on loopback → spool → a loopback MX.

A real relayd with ``[api] address``, a real HTTP client (httpx), a DNS
server and an MX server of the test's own. Every answer is checked as an
app would: status, JSON body, and what arrives at the MX.
"""

from __future__ import annotations

import base64
import email
import json
import time
from collections.abc import Iterator
from email import policy
from pathlib import Path

import dkim as dkimpy
import httpx
import pytest
from support.dnsserver import DNSServer
from support.mxserver import MXServer
from support.ports import free_port
from support.relayd_proc import Relayd

from relayd import dkim

PASSWORD = "api-password-123"


class World:
    def __init__(self, r: Relayd, mx: MXServer, dns: DNSServer, api: str) -> None:
        self.r, self.mx, self.dns, self.api = r, mx, dns, api

    def post(
        self, body: object = None, auth: object = ("app1", PASSWORD), **kw: object
    ) -> httpx.Response:
        with httpx.Client(timeout=20) as client:
            if body is not None:
                kw["json"] = body
            return client.post(f"{self.api}/v1/messages", auth=auth, **kw)  # type: ignore[arg-type]

    def get(self, qid: str, auth: object = ("app1", PASSWORD), **kw: object) -> httpx.Response:
        with httpx.Client(timeout=20) as client:
            return client.get(f"{self.api}/v1/messages/{qid}", auth=auth, **kw)  # type: ignore[arg-type]


def make_world(
    tmp_path: Path, dns: DNSServer, mx: MXServer, extra: str = "", hold: bool = False
) -> World:
    api_port = free_port()
    key = tmp_path / "app.example.key"
    record = dkim.keygen(key, "app.example", "s1")
    value = record.split('"', 1)[1].rsplit('"', 1)[0].replace('" "', "")
    dns.add(f's1._domainkey.app.example TXT "{value}"')
    r = Relayd(
        tmp_path / "relayd",
        dns_address=dns.address,
        hold_delivery=hold,
        extra=(
            f"[delivery]\nport = {mx.port}\n\n"
            f'[api]\naddress = "127.0.0.1:{api_port}"\n\n'
            f'[[dkim.key]]\ndomain = "app.example"\nselector = "s1"\nkey_file = "{key}"\n\n' + extra
        ),
    )
    r.add_user("app1", PASSWORD, "*@app.example")
    return World(r, mx, dns, f"http://127.0.0.1:{api_port}")


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    port = free_port("127.0.0.2")
    with DNSServer() as dns, MXServer("127.0.0.2", port) as mx:
        dns.add("example.org MX 10 mx.example.org", "mx.example.org A 127.0.0.2")
        w = make_world(tmp_path, dns, mx)
        with w.r:
            w.r.start()
            yield w
            w.r.kill()


MESSAGE = {
    "from": "App <app@app.example>",
    "to": ["bob@example.org"],
    "cc": "carol@example.org",
    "bcc": ["dave@example.org"],
    "reply_to": "help@app.example",
    "subject": "Your receipt",
    "text": "Thanks for your order.\n",
    "html": "<p>Thanks for your order.</p>",
    "headers": {"X-App-Id": "order-42"},
    "attachments": [
        {
            "filename": "receipt.txt",
            "content_type": "text/plain",
            "content": base64.b64encode(b"total: 42\n").decode(),
        }
    ],
}


def test_post_json_is_queued_signed_and_delivered(world: World) -> None:
    answer = world.post(MESSAGE)
    assert answer.status_code == 202, answer.text
    body = answer.json()
    assert body["recipients"] == ["bob@example.org", "carol@example.org", "dave@example.org"]
    [got] = world.mx.wait_for_messages(1, timeout=20)
    assert sorted(got.rcpt_tos) == body["recipients"]
    assert got.mail_from == "app@app.example"
    msg = email.message_from_bytes(got.data, policy=policy.default)
    assert msg["Subject"] == "Your receipt"
    assert msg["X-App-Id"] == "order-42"
    assert "dave" not in str(msg)  # Bcc is never a header
    assert [p.get_filename() for p in msg.iter_attachments()] == ["receipt.txt"]
    assert msg.get_body(("html",)) is not None
    # DKIM-signed with the app.example key, and the signature verifies.
    assert got.data.startswith(b"Received:") and b"DKIM-Signature:" in got.data

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes:
        answer = world.dns.resolver().resolve(name.decode(), "TXT")
        return b"".join(answer[0].strings)  # type: ignore[attr-defined,no-any-return]

    assert dkimpy.verify(got.data, dnsfunc=dnsfunc)
    # GET after it left the queue: delivered, from the ledger.
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        view = world.get(body["id"])
        if view.status_code == 200 and all(
            r["status"] == "delivered" for r in view.json()["recipients"]
        ):
            break
        time.sleep(0.2)
    assert view.status_code == 200, view.text
    assert view.json()["sender"] == "app@app.example"
    assert {r["address"]: r["status"] for r in view.json()["recipients"]} == {
        "bob@example.org": "delivered",
        "carol@example.org": "delivered",
        "dave@example.org": "delivered",
    }


def error_of(answer: httpx.Response) -> tuple[int, int, str]:
    err = answer.json()["error"]
    assert isinstance(err["message"], str)
    return answer.status_code, err["code"], err["enhanced"]


def test_errors_have_their_status_and_smtp_reply(world: World) -> None:
    assert error_of(world.post(MESSAGE, auth=None)) == (401, 530, "5.7.0")
    assert error_of(world.post(MESSAGE, auth=("app1", "wrong-password"))) == (401, 535, "5.7.8")
    ceo = dict(MESSAGE, **{"from": "ceo@corp.example"})
    assert error_of(world.post(ceo)) == (403, 553, "5.7.1")
    assert world.post(dict(MESSAGE, bogus=1)).status_code == 400
    assert world.post(dict(MESSAGE, to=[], cc=[], bcc=[])).status_code == 400
    assert world.post(dict(MESSAGE, to=["not an address"])).status_code == 400
    assert world.post(dict(MESSAGE, headers={"Bcc": "x@y.example"})).status_code == 400
    with httpx.Client(timeout=20) as client:
        bad_json = client.post(
            f"{world.api}/v1/messages",
            auth=("app1", PASSWORD),
            content=b"{not json",
            headers={"Content-Type": "application/json"},
        )
    assert error_of(bad_json)[0] == 400
    # A whole message claiming another From: than the user owns.
    raw = b"From: ceo@corp.example\nSubject: hi\n\nbody\n"
    forged = world.post(
        content=raw,
        headers={"Content-Type": "message/rfc822"},
        params={"from": "app@app.example", "to": "bob@example.org"},
    )
    assert error_of(forged) == (403, 550, "5.7.1")
    assert world.mx.messages == []


def test_too_big_is_413(tmp_path: Path) -> None:
    port = free_port("127.0.0.2")
    with DNSServer() as dns, MXServer("127.0.0.2", port) as mx:
        w = make_world(tmp_path, dns, mx, '[limits]\nmax_message_size = "20KB"\n')
        with w.r:
            w.r.start()
            big = dict(MESSAGE, text="x" * 70 + "\n" * 1 + ("y" * 70 + "\n") * 500)
            assert error_of(w.post(big)) == (413, 552, "5.3.4")


def test_rate_limit_is_429(tmp_path: Path) -> None:
    port = free_port("127.0.0.2")
    with DNSServer() as dns, MXServer("127.0.0.2", port) as mx:
        w = make_world(tmp_path, dns, mx, '[rate_limits]\nper_user = "1/hour"\n', hold=True)
        with w.r:
            w.r.start()
            assert w.post(MESSAGE).status_code == 202
            code, smtp_code, _ = error_of(w.post(MESSAGE))
            assert (code, smtp_code) == (429, 450)


def test_raw_message_with_lf_line_ends(world: World) -> None:
    raw = b"From: app@app.example\nTo: bob@example.org\nSubject: raw\n\nline one\nline two\n"
    answer = world.post(
        content=raw,
        headers={"Content-Type": "message/rfc822"},
        params={"from": "app@app.example", "to": "bob@example.org"},
    )
    assert answer.status_code == 202, answer.text
    [got] = world.mx.wait_for_messages(1, timeout=20)
    assert got.data.endswith(b"\r\n\r\nline one\r\nline two\r\n")
    assert b"\nSubject: raw\r\n" in got.data


def test_tokens_work_list_and_revoke(world: World) -> None:
    made = world.r.ctl("--json", "user", "token", "app1")
    assert made.returncode == 0, made.stderr
    token = json.loads(made.stdout)
    bearer = {"Authorization": f"Bearer {token['token']}"}
    assert world.post(MESSAGE, auth=None, headers=bearer).status_code == 202
    listed = json.loads(world.r.ctl("--json", "user", "token", "app1", "--list").stdout)
    assert [t["id"] for t in listed["tokens"]] == [token["id"]]
    assert token["token"] not in world.r.users_file.read_text()  # stored hashed
    assert world.r.ctl("user", "token", "app1", "--revoke", token["id"]).returncode == 0
    assert error_of(world.post(MESSAGE, auth=None, headers=bearer)) == (401, 535, "5.7.8")
    text = world.r.ctl("user", "token", "app1")
    assert text.stdout.startswith("id: ") and "\ntoken: rly_" in text.stdout


def test_202_survives_sigkill(tmp_path: Path) -> None:
    port = free_port("127.0.0.2")
    with DNSServer() as dns, MXServer("127.0.0.2", port) as mx:
        w = make_world(tmp_path, dns, mx, hold=True)
        with w.r:
            w.r.start()
            answer = w.post(MESSAGE)
            assert answer.status_code == 202
            qid = answer.json()["id"]
            w.r.kill()
            w.r.start()
            view = w.get(qid)
            assert view.status_code == 200, view.text
            assert {r["status"] for r in view.json()["recipients"]} <= {"queued", "deferred"}
            # Another user's message is not shown.
            w.r.add_user("other", PASSWORD, "*@other.example")
            assert w.get(qid, auth=("other", PASSWORD)).status_code == 404


def test_suppressed_recipient_is_refused(world: World) -> None:
    added = world.r.ctl("suppression", "add", "gone@example.org")
    assert added.returncode == 0, added.stderr
    answer = world.post(dict(MESSAGE, to=["gone@example.org"], cc=[], bcc=[]))
    status, code, enhanced = error_of(answer)
    assert (status, code, enhanced) == (403, 550, "5.1.1")
    assert "suppressed" in answer.json()["error"]["message"]
    assert world.post(MESSAGE).status_code == 202  # others still go


def test_an_app_sends_by_http_and_learns_of_the_bounce_by_webhook(tmp_path: Path) -> None:
    """The whole story without SMTP on the app's side: POST, then a signed `bounced` event."""
    import hashlib
    import hmac

    from support.webhook import WebhookReceiver

    secret = tmp_path / "webhook.secret"
    secret.write_text("s3cret-for-the-app\n")
    port = free_port("127.0.0.2")
    receiver = WebhookReceiver().start()
    try:
        with DNSServer() as dns, MXServer("127.0.0.2", port) as mx:
            dns.add("example.org MX 10 mx.example.org", "mx.example.org A 127.0.0.2")
            mx.reply_for("nobody@example.org", "550 5.1.1 no such user")
            hook = (
                f'[[webhook]]\nurl = "{receiver.url}"\nevents = ["bounced"]\n'
                f'secret_file = "{secret}"\n'
            )
            w = make_world(tmp_path, dns, mx, hook)
            with w.r:
                w.r.start()
                answer = w.post(dict(MESSAGE, to=["nobody@example.org"], cc=[], bcc=[]))
                assert answer.status_code == 202, answer.text
                qid = answer.json()["id"]
                [request] = receiver.wait_for(lambda rs: len(rs) >= 1, timeout=30)
                view = w.get(qid)
        stamp, mac = (p.split("=", 1)[1] for p in request.headers["Relayd-Signature"].split(","))
        expected = hmac.new(
            b"s3cret-for-the-app", stamp.encode() + b"." + request.body, hashlib.sha256
        ).hexdigest()
        assert hmac.compare_digest(mac, expected)
        event = request.json()
        assert (event["event"], event["id"], event["recipient"]) == (
            "bounced",
            qid,
            "nobody@example.org",
        )
        assert event["dsn"] == "5.1.1"
        assert view.status_code == 200
        assert view.json()["recipients"][0]["status"] == "bounced"
    finally:
        receiver.stop()


def test_api_over_https_with_the_tls_certificate(tmp_path: Path) -> None:
    from support.certs import client_context

    port = free_port("127.0.0.2")
    with DNSServer() as dns, MXServer("127.0.0.2", port) as mx:
        w = make_world(tmp_path, dns, mx, hold=True)
        w.r.extra = w.r.extra.replace("[api]\n", "[api]\ntls = true\n")
        w.r.write_config()
        with w.r:
            w.r.start()
            https = w.api.replace("http://", "https://")
            with httpx.Client(timeout=20, verify=client_context()) as http:
                answer = http.post(f"{https}/v1/messages", auth=("app1", PASSWORD), json=MESSAGE)
            assert answer.status_code == 202, answer.text
            with pytest.raises(httpx.HTTPError):  # no clear-text HTTP on that port
                w.post(MESSAGE)


def test_a_spool_that_cannot_be_written_is_503_and_nothing_is_queued(world: World) -> None:
    queue, saved = world.r.spool / "queue", world.r.spool / "queue.saved"
    queue.rename(saved)
    queue.write_text("not a directory\n")  # a disk gone bad
    try:
        answer = world.post(MESSAGE)
        assert error_of(answer) == (503, 451, "4.3.0")
    finally:
        queue.unlink()
        saved.rename(queue)
    assert world.mx.messages == []
    assert world.post(MESSAGE).status_code == 202  # and it recovers
