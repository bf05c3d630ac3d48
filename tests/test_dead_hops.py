"""A next hop that refuses connections is suspended, not tried once per queued message.

The table itself is plain data; the behaviour is checked on a real relayd
whose route points at a closed loopback port, which later opens.
"""

from __future__ import annotations

import re
from pathlib import Path

from support.mxserver import MXServer
from support.relayd_proc import Relayd, send
from support.waiting import wait_for

from relayd.delivery.deadhops import MAX_ENTRIES, DeadHops

MSG = b"From: a@sender.test\r\nSubject: dead hop\r\n\r\nbody\r\n"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_refusing_hop_is_suspended_for_its_hold_then_tried_again() -> None:
    clock = Clock()
    dead = DeadHops(hold=30.0, clock=clock)
    assert dead.reason("MX.example.org", 25) is None
    dead.failed("MX.example.org", 25, "connect to mx.example.org[192.0.2.1]:25: refused")
    assert dead.reason("mx.example.org", 25) == "connect to mx.example.org[192.0.2.1]:25: refused"
    assert dead.reason("mx.example.org", 587) is None  # another port is another hop
    clock.now += 29.9
    assert dead.reason("mx.example.org", 25) is not None
    clock.now += 0.1
    assert dead.reason("mx.example.org", 25) is None


def test_a_session_that_gets_through_ends_the_suspension() -> None:
    dead = DeadHops(hold=30.0, clock=Clock())
    dead.failed("mx.example.org", 25, "refused")
    dead.alive("MX.EXAMPLE.ORG", 25)
    assert dead.reason("mx.example.org", 25) is None


def test_no_hold_means_no_suspension() -> None:
    dead = DeadHops(hold=0.0, clock=Clock())
    dead.failed("mx.example.org", 25, "refused")
    assert dead.reason("mx.example.org", 25) is None


def test_the_table_is_bounded() -> None:
    clock = Clock()
    dead = DeadHops(hold=30.0, clock=clock)
    for i in range(MAX_ENTRIES + 500):
        dead.failed(f"mx{i}.example.org", 25, "refused")
    assert len(dead._until) <= MAX_ENTRIES
    assert dead.reason(f"mx{MAX_ENTRIES + 499}.example.org", 25) == "refused"  # newest kept


def _deferrals(r: Relayd, qids: list[str]) -> dict[str, str]:
    found: dict[str, str] = {}
    for qid in qids:
        m = re.search(rf"{qid}: to=<[^>]+>, relay=.*status=deferred \((.*)\)", r.log())
        if m:
            found[qid] = m.group(1)
    return found


def test_a_backlog_for_a_refusing_hop_costs_one_connection_attempt(tmp_path: Path) -> None:
    r = Relayd(tmp_path, extra='[delivery]\nretry = ["1m"]\n')
    with r:
        r.start()
        qids = []
        with r.smtp("inbound") as s:
            s.ehlo("client.test")
            for i in range(5):
                qids.append(send(s, "a@sender.test", [f"u{i}@example.org"], MSG))
        wait_for(lambda: len(_deferrals(r, qids)) == len(qids), 20.0)
        reasons = _deferrals(r, qids)
        tried = [q for q, why in reasons.items() if why.startswith("connect to")]
        suspended = [q for q, why in reasons.items() if "delivery temporarily suspended" in why]
        # One message found the hop dead; the others were deferred without a connect,
        # each saying why, as Postfix says it.
        assert len(tried) >= 1 and len(tried) + len(suspended) == len(qids)
        assert len(suspended) >= len(qids) - 2  # at most a second one already in flight
        assert all("Connection refused" in reasons[q] for q in suspended)
        assert r.stop() == 0


def test_flush_tries_a_suspended_hop_at_once(tmp_path: Path) -> None:
    r = Relayd(tmp_path, extra='[delivery]\nretry = ["1m"]\n')
    with r:
        r.start()
        with r.smtp("inbound") as s:
            s.ehlo("client.test")
            qid = send(s, "a@sender.test", ["bob@example.org"], MSG)
        wait_for(lambda: qid in _deferrals(r, [qid]), 20.0)
        with MXServer("127.0.0.1", r.dead_port) as mx:
            # Within the suspension a flush (the operator fixed the next hop) delivers.
            r.ctl("queue", "flush")
            [got] = mx.wait_for_messages(1, timeout=20)
            assert got.rcpt_tos == ["bob@example.org"]
        assert r.stop() == 0
