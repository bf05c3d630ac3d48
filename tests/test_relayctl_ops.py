"""The relayctl habits Postfix operators bring (SPEC §9), against a real daemon.

delivery pause/resume, flush --domain, hold/release --all, bounce, config,
user test and dkim show, each checked the way an operator would: by what
reaches the next hop, what the queue lists and what the commands print.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.mxserver import MXServer
from support.ports import free_port
from support.relayd_proc import Relayd, send
from support.waiting import wait_for

from relayd.config import load_config

PASSWORD = "correct horse battery staple"


def ctl(r: Relayd, *args: str, code: int = 0, input: str | None = None) -> str:
    out = r.ctl(*args, input=input.encode() if input is not None else None)
    assert out.returncode == code, (args, out.returncode, out.stdout, out.stderr)
    assert "Traceback" not in out.stderr
    return out.stdout


def queue(r: Relayd) -> dict[str, dict[str, Any]]:
    return {m["queue_id"]: m for m in json.loads(ctl(r, "--json", "queue"))["messages"]}


def inject(r: Relayd, rcpts: list[str], sender: str = "alice@example.com") -> str:
    message = f"From: {sender}\r\nSubject: ops\r\n\r\nbody\r\n".encode()
    with r.smtp("inbound") as s:
        s.ehlo("client.test")
        return send(s, sender, rcpts, message)


@pytest.fixture
def live(tmp_path: Path) -> Iterator[tuple[Relayd, MXServer]]:
    """relayd whose example.org mail goes to a real sink; everything else to a dead port."""
    port = free_port("127.0.0.2")
    with MXServer("127.0.0.2", port) as mx:
        r = Relayd(tmp_path)
        r.extra = (
            f'[[route]]\ndomain = "example.org"\nvia = "127.0.0.2:{port}"\ntls = "none"\n'
            '[delivery]\nretry = ["1h"]\n'
        )
        r.write_config()
        r.add_user("alice@example.com", PASSWORD)
        with r:
            r.start()
            yield r, mx


def test_pause_keeps_mail_queued_and_resume_delivers_it(live: tuple[Relayd, MXServer]) -> None:
    r, mx = live
    assert "paused" in ctl(r, "delivery", "pause")
    qid = inject(r, ["bob@example.org"])
    assert "PAUSED" in ctl(r, "status")
    assert json.loads(ctl(r, "--json", "status"))["paused"] is True
    time.sleep(1.0)
    assert mx.messages == [] and qid in queue(r)
    ctl(r, "delivery", "resume")
    wait_for(lambda: len(mx.messages) == 1)
    wait_for(lambda: qid not in queue(r))


def test_flush_domain_retries_only_that_domain(live: tuple[Relayd, MXServer]) -> None:
    r, _ = live
    one = inject(r, ["a@one.test"])
    two = inject(r, ["b@two.test"])
    wait_for(lambda: all(queue(r)[q]["attempts"] == 1 for q in (one, two)))
    assert "1 message for one.test" in ctl(r, "queue", "flush", "--domain", "one.test")
    wait_for(lambda: queue(r)[one]["attempts"] == 2)
    time.sleep(0.5)
    assert queue(r)[two]["attempts"] == 1


def test_hold_all_and_release_all(live: tuple[Relayd, MXServer]) -> None:
    r, _ = live
    ids = {inject(r, ["a@one.test"]), inject(r, ["b@two.test"])}
    assert "2 messages placed on hold" in ctl(r, "queue", "hold", "--all")
    listing = queue(r)
    assert {listing[q]["state"] for q in ids} == {"held"}
    assert {listing[q]["queue_name"] for q in ids} == {"hold"}
    assert "2 messages released" in ctl(r, "queue", "release", "--all")
    assert {queue(r)[q]["state"] for q in ids} <= {"active", "deferred"}


def test_bounce_returns_the_message_to_its_sender_now(live: tuple[Relayd, MXServer]) -> None:
    r, mx = live
    qid = inject(r, ["a@one.test", "c@one.test"], sender="carol@example.org")
    wait_for(lambda: queue(r)[qid]["attempts"] == 1)
    ctl(r, "queue", "bounce", qid)
    wait_for(lambda: qid not in queue(r))
    wait_for(lambda: len(mx.messages) == 1)  # the DSN, to carol@example.org via the sink
    dsn = mx.messages[0]
    assert dsn.mail_from in ("", "<>") and dsn.rcpt_tos == ["carol@example.org"]
    assert b"Action: failed" in dsn.data and b"a@one.test" in dsn.data
    assert f"{qid}: returned to sender by the operator" in r.log()
    ctl(r, "queue", "bounce", "01ABCDEFGHJKMNPQ", code=1)


def test_config_prints_every_key_as_toml_that_loads_back_the_same(
    live: tuple[Relayd, MXServer], tmp_path: Path
) -> None:
    r, _ = live
    text = ctl(r, "config")
    for key in ("max_message_size", "idle_timeout", "retry", "per_domain_concurrency", "socket"):
        assert f"\n{key} = " in text
    dumped = tmp_path / "effective.toml"
    dumped.write_text(text)
    check = subprocess.run(
        [sys.executable, "-m", "relayd.cli", "--config", str(dumped), "--check-config"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    original = load_config(r.config_path)
    again = load_config(dumped)
    assert again.__class__(**{**again.__dict__, "source": original.source}) == original


def test_user_test_checks_a_password_offline(live: tuple[Relayd, MXServer]) -> None:
    r, _ = live
    args = ("user", "test", "alice@example.com", "--password-stdin")
    assert "is correct" in ctl(r, *args, input=PASSWORD + "\n")
    ctl(r, *args, input="wrong\n", code=1)
    ctl(r, "user", "test", "nobody@example.com", "--password-stdin", input="x\n", code=1)


def test_dkim_show_prints_the_record_keygen_printed(live: tuple[Relayd, MXServer]) -> None:
    r, _ = live
    made = json.loads(ctl(r, "--json", "dkim", "keygen", "example.com", "s1"))
    shown = ctl(r, "dkim", "show", "example.com", "s1")
    assert shown.strip() == made["record"].strip()
    out = r.ctl("dkim", "show", "example.com", "nokey")
    assert out.returncode == 1 and "relayctl dkim keygen example.com nokey" in out.stderr


def test_a_short_password_is_accepted_with_a_warning(live: tuple[Relayd, MXServer]) -> None:
    r, _ = live
    out = r.ctl("user", "add", "bob@example.com", "--password-stdin", input=b"short\n")
    assert out.returncode == 0
    assert "shorter than 12 characters" in out.stderr
    out = r.ctl("user", "add", "eve@example.com", "--password-stdin", input=b"x" * 20 + b"\n")
    assert out.returncode == 0 and "warning" not in out.stderr


def test_check_config_warns_about_a_user_who_may_send_from_nothing(
    live: tuple[Relayd, MXServer],
) -> None:
    r, _ = live
    r.add_user("app1", PASSWORD)  # a bare name without --allow-from owns no address
    check = subprocess.run(
        [sys.executable, "-m", "relayd.cli", "--config", str(r.config_path), "--check-config"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert check.returncode == 0
    assert "user app1 may send from no address" in check.stderr
