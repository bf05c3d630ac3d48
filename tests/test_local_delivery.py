"""Local delivery routes (SPEC §9): Maildir, and LMTP over TCP and a Unix socket."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from support.lmtpserver import LMTPServer
from support.ports import free_port
from support.relayd_proc import Relayd, send
from support.waiting import wait_for

from relayd.config import load_config
from relayd.delivery import lmtp

MSG = b"From: alice@example.com\r\nSubject: local\r\n\r\n.leading dot\r\nbody\r\n"


def queue(r: Relayd) -> dict[str, dict[str, Any]]:
    out = r.ctl("--json", "queue")
    return {m["queue_id"]: m for m in json.loads(out.stdout)["messages"]}


def inject(r: Relayd, rcpts: list[str]) -> str:
    with r.smtp("inbound") as s:
        s.ehlo("client.test")
        return send(s, "alice@example.com", rcpts, MSG)


def relayd_with_route(tmp_path: Path, via: str) -> Relayd:
    r = Relayd(tmp_path)
    r.extra = f'[[route]]\ndomain = "example.org"\nvia = "{via}"\n[delivery]\nretry = ["1h"]\n'
    r.write_config()
    return r


def test_maildir_route_delivers_one_file_per_message(tmp_path: Path) -> None:
    box = tmp_path / "mail"
    with relayd_with_route(tmp_path, f"maildir:{box}") as r:
        r.start()
        qid = inject(r, ["bob@example.org", "carol@example.org"])
        wait_for(lambda: qid not in queue(r))
        (delivered,) = list((box / "new").iterdir())
        data = delivered.read_bytes()
        assert data.startswith(
            b"Return-Path: <alice@example.com>\r\n"
            b"Delivered-To: bob@example.org\r\nDelivered-To: carol@example.org\r\n"
        )
        assert data.endswith(b"\r\n\r\n.leading dot\r\nbody\r\n")
        assert list((box / "tmp").iterdir()) == []
        assert "relay=maildir" in r.log() and "status=sent" in r.log()


def test_an_unwritable_maildir_defers_and_says_why(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the Maildir should be")
    with relayd_with_route(tmp_path, f"maildir:{blocker}") as r:
        r.start()
        qid = inject(r, ["bob@example.org"])
        wait_for(lambda: queue(r)[qid]["attempts"] == 1)
        reason = queue(r)[qid]["recipients"][0]["delay_reason"]
        assert "cannot write to Maildir" in reason


@pytest.mark.parametrize("kind", ["tcp", "unix"])
def test_lmtp_gives_each_recipient_its_own_outcome(tmp_path: Path, kind: str) -> None:
    if kind == "tcp":
        server = LMTPServer(host="127.0.0.4", port=free_port("127.0.0.4"))
        via = f"lmtp:127.0.0.4:{server.port}"
    else:
        server = LMTPServer(socket_path=tmp_path / "lmtp.sock")
        via = f"lmtp:{tmp_path / 'lmtp.sock'}"
    with server, relayd_with_route(tmp_path, via) as r:
        r.start()
        qid = inject(r, ["bob@example.org", "full@example.org", "nouser@example.org"])
        wait_for(lambda: queue(r).get(qid, {}).get("attempts") == 1)
        assert [(d.recipient, d.sender) for d in server.delivered] == [
            ("bob@example.org", "alice@example.com")
        ]
        assert server.delivered[0].data.endswith(b"\r\n\r\n.leading dot\r\nbody\r\n")
        assert any(c.startswith("LHLO ") for c in server.commands)
        entry = queue(r)[qid]
        pending = {x["address"]: x["delay_reason"] for x in entry["recipients"]}
        assert list(pending) == ["full@example.org"]  # deferred; bob sent, nouser failed
        assert "452 4.2.2" in pending["full@example.org"]
        log = r.log()
        assert "to=<nouser@example.org>" in log and "dsn=5.1.1, status=bounced" in log
        assert "to=<bob@example.org>" in log and "status=sent" in log


def test_lmtp_server_down_defers_every_recipient(tmp_path: Path) -> None:
    port = free_port("127.0.0.4")
    with relayd_with_route(tmp_path, f"lmtp:127.0.0.4:{port}") as r:
        r.start()
        qid = inject(r, ["bob@example.org"])
        wait_for(lambda: queue(r)[qid]["attempts"] == 1)
        assert "connect to LMTP" in queue(r)[qid]["recipients"][0]["delay_reason"]


def test_via_forms_parse_and_print_back(tmp_path: Path) -> None:
    path = tmp_path / "relayd.toml"
    path.write_text(
        'hostname = "mx.relayd.test"\n'
        '[[route]]\ndomain = "a.test"\nvia = "maildir:box"\n'
        '[[route]]\ndomain = "b.test"\nvia = "lmtp:/run/dovecot/lmtp"\n'
        '[[route]]\ndomain = "c.test"\nvia = "lmtp:127.0.0.1:24"\n'
        '[[route]]\ndomain = "d.test"\nvia = "smtp.example.net:587"\n'
    )
    routes = load_config(path).routes
    assert [(r.transport, r.via_text) for r in routes] == [
        ("maildir", f"maildir:{tmp_path / 'box'}"),
        ("lmtp", "lmtp:/run/dovecot/lmtp"),
        ("lmtp", "lmtp:127.0.0.1:24"),
        ("smtp", "smtp.example.net:587"),
    ]


def test_lmtp_dot_stuffing() -> None:
    assert lmtp.stuff(b".a\r\nb\r\n.\r\n") == b"..a\r\nb\r\n..\r\n.\r\n"
    assert lmtp.stuff(b"no end") == b"no end\r\n.\r\n"
