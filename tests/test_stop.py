"""A restart that keeps nobody waiting, and loses nothing (issue: stop within 5 s).

Every queued message is durable, so SIGTERM abandons deliveries stuck on a
next hop and closes idle sessions at once; only a client in the middle of
DATA is waited for, since it has no 250 yet.
"""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.ports import free_port
from support.relayd_proc import Relayd, raw_session, send

MSG = b"From: a@example.com\r\nSubject: stop\r\n\r\nbody\r\n"


@pytest.fixture
def silent_next_hop() -> Iterator[int]:
    """A port whose kernel completes the TCP handshake but nobody ever greets."""
    port = free_port("127.0.0.3")
    sock = socket.socket()
    sock.bind(("127.0.0.3", port))
    sock.listen(16)
    try:
        yield port
    finally:
        sock.close()


def queued(r: Relayd) -> list[str]:
    out = r.ctl("--json", "queue")
    return [m["queue_id"] for m in json.loads(out.stdout)["messages"]]


def stop_time(r: Relayd) -> float:
    assert r.proc is not None
    start = time.monotonic()
    r.signal(signal.SIGTERM)
    r.proc.wait(30)
    elapsed = time.monotonic() - start
    assert r.proc.returncode == 0
    r.proc = None
    return elapsed


def test_sigterm_with_a_stuck_delivery_and_idle_sessions_stops_within_5s(
    tmp_path: Path, silent_next_hop: int
) -> None:
    r = Relayd(tmp_path, hold_delivery=False)
    r.extra = (
        f'[[route]]\ndomain = "*"\nvia = "127.0.0.3:{silent_next_hop}"\ntls = "none"\n'
        '[delivery]\nconnect_timeout = "60s"\ncommand_timeout = "60s"\n'
    )
    r.write_config()
    with r:
        r.start()
        with r.smtp("inbound") as s:
            s.ehlo("client.test")
            qid = send(s, "a@example.com", ["bob@example.org"], MSG)
        r.wait_log("(queue active)")
        idle = [raw_session(r.port("inbound")) for _ in range(3)]
        for client in idle:
            assert client.reply().startswith("220")
        elapsed = stop_time(r)
        assert elapsed < 5.0, f"took {elapsed:.1f}s to stop"
        for client in idle:
            assert client.reply().startswith("421 4.3.2")
            client.close()
        assert "stopped 1 delivery in flight" in r.log()
        r.start()  # nothing lost: the message is there, to be retried
        assert qid in queued(r)


def test_a_client_in_the_middle_of_data_is_waited_for(tmp_path: Path) -> None:
    r = Relayd(tmp_path)
    with r:
        r.start()
        client = raw_session(r.port("inbound"), timeout=30)
        assert client.reply().startswith("220")
        client.cmd("EHLO client.test")
        client.cmd("MAIL FROM:<a@example.com>")
        client.cmd("RCPT TO:<bob@example.org>")
        assert client.cmd("DATA").startswith("354")
        client.send(MSG[:20])
        time.sleep(0.3)
        assert r.proc is not None
        r.signal(signal.SIGTERM)
        time.sleep(1.0)
        assert r.proc.poll() is None  # still there for the message under way
        finish = threading.Timer(0.5, lambda: client.send(MSG[20:] + b".\r\n"))
        finish.start()
        reply = client.reply()
        finish.join()
        assert reply.startswith("250 2.0.0"), reply
        client.close()
        r.proc.wait(30)
        assert r.proc.returncode == 0
        r.proc = None
        r.start()
        assert reply.rsplit(" ", 1)[1] in queued(r)


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_sigterm_drain_under_each_event_loop(tmp_path: Path, loop: str) -> None:
    """Greeting, drain and stop work alike under uvloop and asyncio.

    Under uvloop every connection used to fail in the listener's gate
    (uvloop's transports are no asyncio.Transport subclass): the client
    never got its 220 and waited, which looked like a hung SIGTERM drain.
    Idle relayctl and sendmail connections must not delay the stop either.
    """
    if loop == "uvloop":
        pytest.importorskip("uvloop")
    r = Relayd(tmp_path)
    r.env = {"RELAYD_EVENT_LOOP": loop}
    with r:
        r.start()
        sessions = [raw_session(r.port("inbound"), timeout=5) for _ in range(3)]
        for client in sessions:
            assert client.reply().startswith("220")
        with r.smtp("inbound") as s:
            s.ehlo("client.test")
            send(s, "a@example.com", ["bob@example.org"], MSG)
        idle = []
        for name in ("control.sock", "sendmail.sock"):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(str(tmp_path / name))
            idle.append(sock)
        try:
            elapsed = stop_time(r)
        finally:
            for sock in idle:
                sock.close()
        assert elapsed < 5.0, f"took {elapsed:.1f}s to stop"
        for client in sessions:
            assert client.reply().startswith("421 4.3.2")
            client.close()
        assert f"event loop: {loop}" in r.log()


def test_asyncio_when_uvloop_does_not_import(monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncio
    import sys

    from relayd.daemon import event_loop_runner

    monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop raises ImportError
    assert event_loop_runner() is asyncio.run
    monkeypatch.delitem(sys.modules, "uvloop")
    monkeypatch.setenv("RELAYD_EVENT_LOOP", "asyncio")
    assert event_loop_runner() is asyncio.run
