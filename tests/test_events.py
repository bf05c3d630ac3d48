"""The parts of webhooks and suppression that need no running daemon (SPEC §10)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

from relayd.config import ConfigError, load_config
from relayd.events import event_body, message_id_of
from relayd.events.outbox import Outbox
from relayd.events.webhook import GIVE_UP_AFTER, retry_after, signature
from relayd.suppression import SuppressionList, is_hard_bounce, refusal


def test_signature_is_hmac_sha256_of_timestamp_dot_body() -> None:
    body = b'{"event":"bounced"}'
    header = signature(b"secret", body, 1700000000)
    stamp, mac = header.split(",")
    assert stamp == "t=1700000000"
    expected = hmac.new(b"secret", b"1700000000." + body, hashlib.sha256).hexdigest()
    assert mac == f"v1={expected}"


def test_retry_schedule_then_hourly_for_three_days() -> None:
    assert [retry_after(n) for n in range(1, 8)] == [10, 30, 60, 300, 900, 3600, 3600]
    # Tries in three days: 5 quick ones, then hourly.
    elapsed, tries = 0.0, 1
    while elapsed + retry_after(tries) <= GIVE_UP_AFTER:
        elapsed += retry_after(tries)
        tries += 1
    assert tries == 1 + 5 + int((GIVE_UP_AFTER - 1300) // 3600)


def test_event_body_has_exactly_the_spec_keys() -> None:
    body = json.loads(
        event_body("deferred", "4F2A9C1B7D", "b@x.test", "a@y.test", "<m@y>", "4.7.1",
                   "451 4.7.1 later", 1700000123.7, 1700000000.2)
    )  # fmt: skip
    assert body == {
        "event": "deferred",
        "id": "4F2A9C1B7D",
        "timestamp": 1700000000,
        "recipient": "b@x.test",
        "sender": "a@y.test",
        "message_id": "<m@y>",
        "dsn": "4.7.1",
        "reply": "451 4.7.1 later",
        "next_attempt": 1700000123,
    }


def test_message_id_is_read_from_the_header_block_only() -> None:
    assert message_id_of(b"Subject: x\r\nMessage-ID: <a@b>\r\n\r\nbody\r\n") == "<a@b>"
    assert message_id_of(b"Subject: x\r\n\r\nMessage-ID: <not@this>\r\n") is None
    assert message_id_of(b"") is None


def test_outbox_claims_retries_and_releases(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "events.db")
    now = 1000.0
    box.put([("http://h/", "queued", b"1"), ("http://h/", "bounced", b"2")], now)
    first = box.claim(now, 10)
    assert [p.body for p in first] == [b"1", b"2"]
    assert box.claim(now, 10) == []  # claimed: not handed out twice
    box.done(first[0].id)
    box.retry(first[1].id, now + 10, "HTTP 500")
    assert box.claim(now + 5, 10) == []
    [again] = box.claim(now + 10, 10)
    assert again.attempts == 1 and again.body == b"2"
    # A new process finds what the last one had claimed due at once.
    box.close()
    box = Outbox(tmp_path / "events.db")
    box.release_claims(now + 11)
    assert [p.body for p in box.claim(now + 11, 10)] == [b"2"]
    assert box.count() == 1


def test_outbox_is_bounded_and_drops_the_oldest(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "events.db", max_events=5)
    dropped = [box.put([("u", "queued", str(i).encode())], float(i)) for i in range(8)]
    assert dropped == [0, 0, 0, 0, 0, 1, 1, 1]
    assert box.count() == 5
    assert [p.body for p in box.claim(100.0, 10)] == [b"3", b"4", b"5", b"6", b"7"]


def test_outbox_does_not_drop_an_old_row_when_few_are_left(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "events.db", max_events=3)
    box.put([("u", "bounced", b"old")], 0.0)
    for _ in range(10):  # sent and gone: ids grow, the row count does not
        box.put([("u", "queued", b"x")], 1.0)
        [row] = [p for p in box.claim(1.0, 10) if p.body == b"x"]
        box.done(row.id)
    assert box.count() == 1


def test_hard_bounces() -> None:
    assert is_hard_bounce("5.1.1", expired=False)
    assert is_hard_bounce("5.1.10", expired=False)  # null MX
    assert not is_hard_bounce("5.7.1", expired=False)  # policy: the address may be fine
    assert not is_hard_bounce("4.7.1", expired=False)
    assert is_hard_bounce("4.4.7", expired=True)


def test_suppression_list_expires_and_is_case_insensitive(tmp_path: Path) -> None:
    sl = SuppressionList(tmp_path / "suppression.db")
    assert sl.add("Bob@Example.org", 1000.0, 60.0, dsn="5.1.1", queue_id="Q1") is True
    assert sl.add("bob@example.org", 1010.0, 60.0, dsn="5.1.1", queue_id="Q2") is False
    entry = sl.lookup("BOB@example.ORG", 1020.0)
    assert entry is not None and entry.queue_id == "Q2" and entry.expires == 1070.0
    assert sl.lookup("bob@example.org", 1070.0) is None  # expired
    assert refusal("bob@example.org", entry) == (
        "550 5.1.1 <bob@example.org>: suppressed after a hard bounce on 1970-01-01"
    )
    assert [e.address for e in sl.entries(1020.0)] == ["bob@example.org"]
    assert sl.remove("bob@example.org") and not sl.remove("bob@example.org")


def test_suppression_list_is_shared_between_connections(tmp_path: Path) -> None:
    """Acceptor processes each open the file: what one writes, the others read."""
    a = SuppressionList(tmp_path / "suppression.db")
    b = SuppressionList(tmp_path / "suppression.db")
    now = time.time()
    a.add("gone@example.org", now, 3600.0)
    assert b.lookup("gone@example.org", now) is not None
    mode = sqlite3.connect(tmp_path / "suppression.db").execute("PRAGMA journal_mode").fetchone()
    assert mode == ("wal",)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "relayd.toml"
    path.write_text('hostname = "mail.example.com"\n' + text)
    return path


def test_config_defaults_and_values(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, ""))
    assert config.suppression.enabled is True
    assert config.suppression.expire == 30 * 86400
    assert config.webhooks == ()
    config = load_config(
        write(
            tmp_path,
            '[suppression]\nenabled = false\nexpire = "7d"\n'
            '[[webhook]]\nurl = "https://app.example.com/hook"\n'
            '[[webhook]]\nurl = "http://10.0.0.1:8080/h"\nevents = ["bounced", "suppressed"]\n'
            'secret_file = "hook.secret"\n',
        )
    )
    assert (config.suppression.enabled, config.suppression.expire) == (False, 7 * 86400)
    first, second = config.webhooks
    assert first.events == (
        "queued", "delivered", "deferred", "delayed", "bounced", "suppressed",
    )  # fmt: skip
    assert second.events == ("bounced", "suppressed")
    assert second.secret_file == tmp_path / "hook.secret"


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ('[[webhook]]\nevents = ["bounced"]\n', "[[webhook]] url: missing"),
        ('[[webhook]]\nurl = "ftp://x"\n', "expected an http:// or https:// URL"),
        ('[[webhook]]\nurl = "http://x/"\nevents = ["bounce"]\n', '(did you mean "bounced"?)'),
        ('[[webhook]]\nurl = "http://x/"\nretries = 3\n', "[[webhook]] retries"),
        ('[[webhook]]\nurl = "http://x/"\n[[webhook]]\nurl = "http://x/"\n', "already has"),
        ('[suppression]\nexpire = "soon"\n', "[suppression] expire"),
        ("[webhook]\nurl = 'http://x/'\n", "write [[webhook]]"),
    ],
)
def test_config_errors(tmp_path: Path, text: str, problem: str) -> None:
    with pytest.raises(ConfigError) as raised:
        load_config(write(tmp_path, text))
    assert problem in str(raised.value)


# ---- the scheduler's outcomes, in order with the spool ------------------------------


def test_outcomes_reach_the_outbox_before_the_queue_state(tmp_path: Path) -> None:
    from test_scheduler import GREYLISTED, UNKNOWN, Clock, FakeAgent, RecordingSpool, until

    from relayd.config import Config, DeliveryConfig, SpoolConfig, Webhook
    from relayd.events import Outcomes
    from relayd.scheduler import Scheduler
    from relayd.spool.model import Envelope, Recipient
    from relayd.spool.queueid import new_queue_id

    clock = Clock()
    spool = RecordingSpool(tmp_path / "spool")
    spool.ensure()
    cfg = Config(
        hostname="mail.example.com",
        spool=SpoolConfig(path=tmp_path / "spool"),
        delivery=DeliveryConfig(retry=(300.0,), max_age=3600.0, delay_warning=0.0),
        webhooks=(Webhook(url="http://127.0.0.1:9/"),),
    )
    seen: list[list[tuple[str, str]]] = []

    class Ordered(Outcomes):
        async def settled(self, env: Envelope, *args: Any) -> None:
            await super().settled(env, *args)
            seen.append(list(spool.ops))

    agent = FakeAgent(
        clock, script={"gone@example.org": [UNKNOWN], "grey@example.org": [GREYLISTED]}
    )
    scheduler = Scheduler(
        cfg, spool, agent, clock=clock, outcomes=Ordered(lambda: cfg, clock=clock)
    )
    box = Outbox(tmp_path / "spool" / "events.db")

    def events() -> list[tuple[str, str, str | None]]:
        rows = box.claim(clock.now + 10**6, 100)
        for row in rows:
            box.done(row.id)
        return [(e["event"], e["recipient"], e["dsn"]) for e in (json.loads(r.body) for r in rows)]

    qid = new_queue_id()

    async def scenario() -> None:
        task = asyncio.create_task(scheduler.run())
        try:
            env = Envelope(qid, "app@example.com",
                           [Recipient(a) for a in ("bob@example.org", "gone@example.org",
                                                   "grey@example.org")],
                           arrival_time=clock.now, size=10)  # fmt: skip
            await spool.commit(env, b"Message-ID: <m1@example.com>\r\n\r\nhi\r\n")
            scheduler.add(env)
            await until(lambda: len(seen) == 1)
            assert ("update", qid) not in seen[0]
            await until(lambda: ("update", qid) in spool.ops)
            assert sorted(events()) == [
                ("bounced", "gone@example.org", "5.1.1"),
                ("deferred", "grey@example.org", "4.7.1"),
                ("delivered", "bob@example.org", "2.0.0"),
                ("suppressed", "gone@example.org", "5.1.1"),
            ]
            clock.now += 3700  # past max_age: grey expires, bounces, and is suppressed
            scheduler.wake()
            await until(lambda: len(seen) == 2)
            assert ("remove", qid) not in seen[1]
            await until(lambda: ("remove", qid) in spool.ops)
            assert sorted(events()) == [
                ("bounced", "grey@example.org", "4.4.7"),
                ("suppressed", "grey@example.org", "4.4.7"),
            ]
        finally:
            await scheduler.stop(1.0)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await spool.close()

    asyncio.run(asyncio.wait_for(scenario(), 20))
    found = SuppressionList(tmp_path / "spool" / "suppression.db").entries(time.time())
    assert sorted(e.address for e in found) == ["gone@example.org", "grey@example.org"]


def test_sender_retries_then_gives_up_after_three_days(tmp_path: Path) -> None:
    from support.webhook import WebhookReceiver

    from relayd.config import Config, SpoolConfig, Webhook
    from relayd.events.webhook import WebhookSender
    from relayd.metrics import Metrics

    spool = tmp_path / "spool"
    spool.mkdir()
    now = [1_700_000_000.0]
    metrics = Metrics()
    with WebhookReceiver() as hook:
        hook.status = 500
        cfg = Config(
            hostname="mail.example.com",
            spool=SpoolConfig(path=spool),
            webhooks=(Webhook(url=hook.url),),
        )
        box = Outbox(spool / "events.db")
        box.put([(hook.url, "bounced", b'{"event":"bounced"}')], now[0])
        sender = WebhookSender(lambda: cfg, metrics, clock=lambda: now[0])

        async def scenario() -> None:
            task = asyncio.create_task(sender.run())
            try:
                await asyncio.to_thread(hook.wait_for, lambda got: len(got) == 1, 10)
                await asyncio.sleep(0.2)
                [row] = box.claim(now[0] + 10, 10)  # retried 10 s later, not before
                assert row.attempts == 1 and box.claim(now[0] + 9.9, 10) == []
                box.retry(row.id, now[0] + 10, "HTTP 500")  # put it back as it was
                now[0] += 3 * 86400 - 5
                sender.wake()
                await asyncio.to_thread(hook.wait_for, lambda got: len(got) == 2, 10)
                await asyncio.sleep(0.2)
                assert box.count() == 0  # the next try would be past three days: dropped
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

        asyncio.run(asyncio.wait_for(scenario(), 30))
    assert metrics.webhook_failed.values[("bounced",)] == 2
    assert metrics.webhook_dropped.values[("expired",)] == 1
