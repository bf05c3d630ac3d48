"""The scheduler against a real spool on disk and a scripted delivery agent.

Time is an injected clock that only moves when a test moves it (then
``wake()`` makes the scheduler look); real waiting is limited to short,
bounded polls for work running in threads (spool fsyncs).
"""

from __future__ import annotations

import asyncio
import contextlib
import email
import email.message
import email.policy
import functools
import logging
import random
from collections import Counter
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relayd.config import Config, DeliveryConfig
from relayd.scheduler import Scheduler, Stats, retry_delay
from relayd.spool.model import Attempt, Envelope, Recipient
from relayd.spool.queueid import new_queue_id
from relayd.spool.store import Spool, SpoolError

T = TypeVar("T")

START = 1_700_000_000.0
MESSAGE = (
    b"From: alice@example.com\r\nTo: bob@example.org\r\nSubject: hello\r\n"
    b"Message-ID: <m1@example.com>\r\n\r\nHi Bob.\r\n"
)
SENT = ("sent", "2.0.0", "250 2.0.0 Ok")
GREYLISTED = ("deferred", "4.7.1", "451 4.7.1 greylisted, try later")
UNKNOWN = ("failed", "5.1.1", "550 5.1.1 <bob@example.org>: user unknown")


def run(coro: Coroutine[Any, Any, T]) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(coro, 20)

    return asyncio.run(bounded())


class Clock:
    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> float:
        return self.now


@dataclass
class Delivery:
    envelope: Envelope
    data: bytes
    recipients: list[str]


@dataclass
class FakeAgent:
    """Answers per recipient from a script (default: 250); can block on a gate."""

    clock: Clock
    script: dict[str, list[tuple[str, str, str]]] = field(default_factory=dict)
    deliveries: list[Delivery] = field(default_factory=list)
    gate: asyncio.Event | None = None
    fail_with: Exception | None = None
    forget: set[str] = field(default_factory=set)  # no outcome at all (an agent bug)
    active: int = 0
    max_active: int = 0
    by_domain: Counter[str] = field(default_factory=Counter)
    max_by_domain: Counter[str] = field(default_factory=Counter)

    async def deliver(
        self, envelope: Envelope, data: bytes, recipients: list[str]
    ) -> list[Attempt]:
        self.deliveries.append(Delivery(envelope, data, list(recipients)))
        domains = {r.rpartition("@")[2] for r in recipients}
        self._enter(domains)
        try:
            if self.gate is not None:
                await self.gate.wait()
            if self.fail_with is not None:
                raise self.fail_with
            return [self._attempt(r) for r in recipients if r not in self.forget]
        finally:
            self.active -= 1
            self.by_domain.subtract(domains)

    def _enter(self, domains: set[str]) -> None:
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        self.by_domain.update(domains)
        for d in domains:
            self.max_by_domain[d] = max(self.max_by_domain[d], self.by_domain[d])

    def _attempt(self, rcpt: str) -> Attempt:
        outcomes = self.script.get(rcpt) or [SENT]
        status, dsn, reply = outcomes.pop(0) if len(outcomes) > 1 else outcomes[0]
        domain = rcpt.rpartition("@")[2]
        return Attempt(
            time=self.clock(),
            recipients=[rcpt],
            host=f"mx.{domain}",
            address="203.0.113.5",
            port=25,
            tls="TLSv1.3",
            reply=reply,
            dsn=dsn,
            status=status,  # type: ignore[arg-type]
            duration=0.1,
        )

    def bounces(self) -> list[Delivery]:
        return [d for d in self.deliveries if d.envelope.is_bounce]


class RecordingSpool(Spool):
    """The real spool, noting the order of writes and able to refuse notices."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.ops: list[tuple[str, str]] = []
        self.refuse_notices = False

    async def commit(self, envelope: Envelope, data: bytes) -> None:
        if self.refuse_notices and envelope.is_bounce:
            raise SpoolError("disk full")
        await super().commit(envelope, data)
        self.ops.append(("commit", envelope.queue_id))

    async def update(self, envelope: Envelope) -> None:
        await super().update(envelope)
        self.ops.append(("update", envelope.queue_id))

    async def remove(self, queue_id: str) -> None:
        await super().remove(queue_id)
        self.ops.append(("remove", queue_id))


def config(**delivery: Any) -> Config:
    defaults: dict[str, Any] = {
        "retry": (300.0, 600.0, 1800.0),
        "max_age": 86400.0,
        "delay_warning": 0.0,
    }
    return Config(hostname="mail.example.com", delivery=DeliveryConfig(**{**defaults, **delivery}))


@dataclass
class World:
    clock: Clock
    spool: RecordingSpool
    agent: FakeAgent
    scheduler: Scheduler
    run_task: asyncio.Task[None]

    async def queue(self, *rcpts: str, sender: str = "alice@example.com", **kw: Any) -> Envelope:
        env = Envelope(
            new_queue_id(),
            sender,
            [Recipient(r) for r in rcpts],
            arrival_time=self.clock.now,
            size=len(MESSAGE),
            **kw,
        )
        await self.spool.commit(env, MESSAGE)
        self.scheduler.add(env)
        return env

    def advance(self, seconds: float) -> None:
        self.clock.now += seconds
        self.scheduler.wake()

    def queued(self) -> list[str]:
        return self.spool.queue_ids()

    def on_disk(self, qid: str) -> Envelope:
        return self.spool.load(qid)

    async def idle(self) -> None:
        """Until nothing is waiting to be tried now and nothing is in flight."""
        await until(lambda: self.scheduler.counts()["active"] == 0)


def tried(w: World, n: int) -> bool:
    """The original message has had ``n`` attempts (notices not counted)."""
    return len(w.agent.deliveries) - len(w.agent.bounces()) == n


async def until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.002)


async def quiet() -> None:
    """Give the scheduler a fair chance to do something it should not do."""
    await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def world(
    tmp_path: Path,
    cfg: Config | None = None,
    spool: RecordingSpool | None = None,
    clock: Clock | None = None,
) -> AsyncIterator[World]:
    clock = clock or Clock()
    spool = spool or RecordingSpool(tmp_path / "spool")
    spool.ensure()
    agent = FakeAgent(clock)
    scheduler = Scheduler(cfg or config(), spool, agent, clock=clock, rng=random.Random(7))
    task = asyncio.create_task(scheduler.run())
    try:
        yield World(clock, spool, agent, scheduler, task)
    finally:
        if agent.gate is not None:
            agent.gate.set()
        await scheduler.stop(1.0)
        done, _ = await asyncio.wait([task], timeout=2)
        assert done, "run() did not return after stop()"
        if not task.cancelled():
            task.result()
        await spool.close()


def dsn_blocks(data: bytes) -> list[email.message.Message]:
    msg = email.message_from_bytes(data, policy=email.policy.default)
    assert msg.get_content_type() == "multipart/report"
    report = msg.get_payload()
    assert isinstance(report, list) and isinstance(report[1], email.message.Message)
    blocks = report[1].get_payload()
    assert isinstance(blocks, list)
    return [b for b in blocks if isinstance(b, email.message.Message)]


# ---- the retry schedule ------------------------------------------------------------


def test_retry_intervals_follow_the_list_and_the_last_repeats() -> None:
    rng = random.Random(1)
    retry = (300.0, 600.0, 1800.0)
    for attempts, base in [(1, 300), (2, 600), (3, 1800), (4, 1800), (50, 1800)]:
        assert 0.9 * base <= retry_delay(retry, attempts, rng) <= 1.1 * base


@given(attempts=st.integers(1, 100), seed=st.integers(0, 2**32))
def test_jitter_stays_within_ten_percent(attempts: int, seed: int) -> None:
    retry = (60.0, 120.0)
    base = retry[min(attempts, 2) - 1]
    assert 0.9 * base <= retry_delay(retry, attempts, random.Random(seed)) <= 1.1 * base


def test_jitter_actually_spreads_retries() -> None:
    rng = random.Random(3)
    samples = [retry_delay((1000.0,), 1, rng) for _ in range(500)]
    assert min(samples) < 920 and max(samples) > 1080


# ---- outcomes ----------------------------------------------------------------------


def test_sent_message_is_removed_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="relayd")

    async def main() -> None:
        async with world(tmp_path) as w:
            env = await w.queue("bob@example.org")
            await w.idle()
            assert w.queued() == []
            assert w.scheduler.stats.delivered == 1
            lines = [r.getMessage() for r in caplog.records]
            qid = env.queue_id
            assert (
                f"{qid}: from=<alice@example.com>, size={len(MESSAGE)}, nrcpt=1 "
                "(queue active)" in lines
            )
            assert (
                f"{qid}: to=<bob@example.org>, relay=mx.example.org[203.0.113.5]:25, "
                "delay=0.00, dsn=2.0.0, status=sent (250 2.0.0 Ok)"
            ) in lines
            assert lines[-1] == f"{qid}: removed"
            smtp = next(r for r in caplog.records if r.name == "relayd.smtp")
            assert smtp.__dict__["journal_fields"] == {
                "RECIPIENT": "bob@example.org",
                "DSN": "2.0.0",
                "STATUS": "sent",
                "RELAY_HOST": "mx.example.org",
                "SMTP_REPLY": "250 2.0.0 Ok",
                "DELAY": "0.00",
                "QUEUE_ID": qid,
            }

    run(main())


def test_4xx_defers_then_flush_delivers_and_removes(tmp_path: Path) -> None:
    async def main() -> None:
        async with world(tmp_path) as w:
            w.agent.script["bob@example.org"] = [GREYLISTED, SENT]
            env = await w.queue("bob@example.org")
            await w.idle()
            stored = w.on_disk(env.queue_id)
            assert stored.recipients[0].status == "deferred"
            assert stored.recipients[0].reply == GREYLISTED[2]
            assert stored.attempts == 1 and len(stored.history) == 1
            assert START + 270 <= stored.next_attempt <= START + 330
            assert w.scheduler.counts() == {"active": 0, "deferred": 1, "held": 0}
            await quiet()
            assert len(w.agent.deliveries) == 1  # not due yet
            assert w.scheduler.flush([env.queue_id, "NOSUCHID"]) == ["NOSUCHID"]
            await until(lambda: len(w.agent.deliveries) == 2)
            await w.idle()
            assert w.queued() == []
            assert w.scheduler.stats.deferred == 1
            assert w.scheduler.stats.delivered == 1

    run(main())


def test_deferred_message_is_retried_when_due(tmp_path: Path) -> None:
    async def main() -> None:
        async with world(tmp_path) as w:
            w.agent.script["bob@example.org"] = [GREYLISTED, GREYLISTED, SENT]
            env = await w.queue("bob@example.org")
            await w.idle()
            w.advance(200)
            await quiet()
            assert len(w.agent.deliveries) == 1
            w.advance(200)  # past 300s ±10%
            await until(lambda: len(w.agent.deliveries) == 2)
            await w.idle()
            second = w.on_disk(env.queue_id).next_attempt
            assert w.clock.now + 540 <= second <= w.clock.now + 660  # retry[1] = 600

    run(main())


def test_5xx_sends_exactly_one_bounce_before_the_original_goes(tmp_path: Path) -> None:
    async def main() -> None:
        async with world(tmp_path) as w:
            w.agent.script["bob@example.org"] = [UNKNOWN]
            w.agent.script["carol@example.org"] = [UNKNOWN]
            env = await w.queue("bob@example.org", "carol@example.org", "dave@example.org")
            await w.idle()
            commits = [q for op, q in w.spool.ops if op == "commit" and q != env.queue_id]
            assert len(commits) == 1
            notice_id = commits[0]
            assert w.spool.ops.index(("commit", notice_id)) < w.spool.ops.index(
                ("remove", env.queue_id)
            )
            [bounce] = w.agent.bounces()
            assert bounce.envelope.queue_id == notice_id
            assert bounce.envelope.sender == ""
            assert bounce.recipients == ["alice@example.com"]
            blocks = dsn_blocks(bounce.data)
            assert [b["Final-Recipient"] for b in blocks[1:]] == [
                "rfc822; bob@example.org",
                "rfc822; carol@example.org",
            ]
            assert all(b["Status"] == "5.1.1" and b["Action"] == "failed" for b in blocks[1:])
            assert blocks[1]["Remote-MTA"] == "dns; mx.example.org"
            assert blocks[1]["Diagnostic-Code"] == f"smtp; {UNKNOWN[2]}"
            assert w.queued() == []  # original and delivered bounce both gone
            assert w.scheduler.stats.bounced == 2

    run(main())


def test_null_sender_never_bounces(tmp_path: Path) -> None:
    async def main() -> None:
        async with world(tmp_path) as w:
            w.agent.script["bob@example.org"] = [UNKNOWN]
            env = await w.queue("bob@example.org", sender="")
            await w.idle()
            assert [op for op in w.spool.ops if op[0] == "commit"] == [("commit", env.queue_id)]
            assert w.agent.bounces() == [] and w.queued() == []

    run(main())


def test_a_bounce_never_bounces(tmp_path: Path) -> None:
    async def main() -> None:
        async with world(tmp_path) as w:
            w.agent.script["bob@example.org"] = [UNKNOWN]
            await w.queue("bob@example.org", sender="someone@example.com", is_bounce=True)
            await w.idle()
            assert len([op for op in w.spool.ops if op[0] == "commit"]) == 1
            assert len(w.agent.deliveries) == 1 and w.queued() == []

    run(main())


def test_max_age_fails_deferred_recipients_with_4_4_7(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="relayd")

    async def main() -> None:
        async with world(tmp_path, config(retry=(600.0,), max_age=1000.0)) as w:
            w.agent.script["bob@example.org"] = [GREYLISTED]
            env = await w.queue("bob@example.org", "dave@example.org")
            await w.idle()
            assert w.queued() == [env.queue_id]
            w.advance(700)
            await until(lambda: len(w.agent.deliveries) == 2)
            await w.idle()
            # the retry after that is clamped to the moment the message expires
            assert w.on_disk(env.queue_id).next_attempt == START + 1000
            w.advance(300)
            await until(lambda: len(w.agent.bounces()) == 1)
            await w.idle()
            assert w.queued() == []
            block = dsn_blocks(w.agent.bounces()[0].data)[1]
            assert block["Final-Recipient"] == "rfc822; bob@example.org"
            assert (block["Action"], block["Status"]) == ("failed", "4.4.7")
            assert block["Diagnostic-Code"] == f"smtp; {GREYLISTED[2]}"
            assert any(
                "dsn=4.4.7, status=expired, returned to sender" in r.getMessage()
                for r in caplog.records
            )

    run(main())


def test_delay_warning_is_sent_once(tmp_path: Path) -> None:
    async def main() -> None:
        cfg = config(retry=(600.0,), delay_warning=1000.0, max_age=86400.0)
        async with world(tmp_path, cfg) as w:
            w.agent.script["bob@example.org"] = [GREYLISTED]
            env = await w.queue("bob@example.org")
            await w.idle()
            for n in range(2, 6):
                w.advance(700)
                await until(functools.partial(tried, w, n))
                await w.idle()
            [notice] = w.agent.bounces()
            msg = email.message_from_bytes(notice.data, policy=email.policy.default)
            assert msg["Subject"] == "Delayed Mail (still being retried)"
            block = dsn_blocks(notice.data)[1]
            assert (block["Action"], block["Status"]) == ("delayed", "4.7.1")
            assert block["Will-Retry-Until"] is not None
            assert w.on_disk(env.queue_id).recipients[0].delay_warned
            assert w.queued() == [env.queue_id]

    run(main())


def test_no_delay_warning_when_turned_off(tmp_path: Path) -> None:
    async def main() -> None:
        async with world(tmp_path, config(retry=(600.0,), delay_warning=0.0)) as w:
            w.agent.script["bob@example.org"] = [GREYLISTED]
            await w.queue("bob@example.org")
            await w.idle()
            for n in range(2, 4):
                w.advance(10_000)
                await until(functools.partial(tried, w, n))
                await w.idle()
            assert w.agent.bounces() == []

    run(main())


def test_bounce_that_cannot_be_queued_is_retried(tmp_path: Path) -> None:
    async def main() -> None:
        async with world(tmp_path) as w:
            w.agent.script["bob@example.org"] = [UNKNOWN]
            w.spool.refuse_notices = True
            env = await w.queue("bob@example.org")
            await w.idle()
            stored = w.on_disk(env.queue_id)
            assert stored.recipients[0].status == "deferred"  # not final until bounced
            w.spool.refuse_notices = False
            w.scheduler.flush(None)
            await until(lambda: len(w.agent.bounces()) == 1)
            await w.idle()
            assert w.queued() == []

    run(main())


def test_agent_error_defers_with_a_local_reason(tmp_path: Path) -> None:
    async def main() -> None:
        async with world(tmp_path) as w:
            w.agent.fail_with = RuntimeError("boom")
            env = await w.queue("bob@example.org")
            await w.idle()
            rcpt = w.on_disk(env.queue_id).recipients[0]
            assert (rcpt.status, rcpt.dsn) == ("deferred", "4.3.0")
            assert "boom" in rcpt.reply

    run(main())


def test_recipient_the_agent_forgot_is_deferred(tmp_path: Path) -> None:
    async def main() -> None:
        async with world(tmp_path) as w:
            w.agent.forget.add("carol@example.org")
            env = await w.queue("bob@example.org", "carol@example.org")
            await w.idle()
            bob, carol = w.on_disk(env.queue_id).recipients
            assert bob.status == "sent"
            assert (carol.status, carol.dsn) == ("deferred", "4.3.0")
            assert w.scheduler.stats == Stats(delivered=1, bounced=0, deferred=1)

    run(main())


# ---- caps --------------------------------------------------------------------------


def test_concurrency_cap(tmp_path: Path) -> None:
    async def main() -> None:
        async with world(tmp_path, config(concurrency=2, per_domain_concurrency=10)) as w:
            w.agent.gate = asyncio.Event()
            for i in range(5):
                await w.queue(f"user@d{i}.example")
            await until(lambda: w.agent.active == 2)
            await quiet()
            assert len(w.agent.deliveries) == 2
            assert w.scheduler.counts()["active"] == 5
            w.agent.gate.set()
            await w.idle()
            assert len(w.agent.deliveries) == 5 and w.agent.max_active == 2
            assert w.queued() == []

    run(main())


def test_per_domain_cap_lets_other_domains_pass(tmp_path: Path) -> None:
    async def main() -> None:
        async with world(tmp_path, config(concurrency=10, per_domain_concurrency=1)) as w:
            w.agent.gate = asyncio.Event()
            for i in range(3):
                await w.queue(f"user{i}@example.org")
            await w.queue("someone@example.net")
            await until(lambda: w.agent.active == 2)
            await quiet()
            assert w.agent.by_domain == Counter({"example.org": 1, "example.net": 1})
            w.agent.gate.set()
            await w.idle()
            assert len(w.agent.deliveries) == 4
            assert w.agent.max_by_domain["example.org"] == 1

    run(main())


def test_backlog_across_domains_all_goes_under_the_caps(tmp_path: Path) -> None:
    """Messages waiting for a domain's slot (some for two domains) all start in the end."""

    async def main() -> None:
        async with world(tmp_path, config(concurrency=10, per_domain_concurrency=1)) as w:
            w.agent.gate = asyncio.Event()
            await w.queue("one@a.example")
            await w.queue("two@a.example", "two@b.example")
            await w.queue("three@b.example")
            for i in range(4):
                await w.queue(f"more{i}@a.example")
                await w.queue(f"more{i}@c.example", f"more{i}@b.example")
            await until(lambda: w.agent.active == 2)
            await quiet()
            w.agent.gate.set()
            await w.idle()
            assert len(w.agent.deliveries) == 11
            assert all(n == 1 for n in w.agent.max_by_domain.values())
            assert w.queued() == []

    run(main())


# ---- operator actions ------------------------------------------------------------------


def test_held_messages_are_skipped_until_released(tmp_path: Path) -> None:
    async def main() -> None:
        clock = Clock()
        spool = RecordingSpool(tmp_path / "spool")
        spool.ensure()
        env = Envelope(
            new_queue_id(),
            "alice@example.com",
            [Recipient("bob@example.org")],
            arrival_time=clock.now,
        )
        await spool.commit(env, MESSAGE)
        agent = FakeAgent(clock)
        scheduler = Scheduler(config(), spool, agent, clock=clock)
        scheduler.load(spool.recover())
        assert scheduler.hold([env.queue_id, "NOSUCHID"]) == ["NOSUCHID"]
        task = asyncio.create_task(scheduler.run())
        await quiet()
        assert agent.deliveries == []
        await scheduler.persisted(5)
        assert spool.load(env.queue_id).held
        assert scheduler.counts() == {"active": 0, "deferred": 0, "held": 1}
        assert scheduler.release([env.queue_id]) == []
        await until(lambda: spool.queue_ids() == [])
        assert len(agent.deliveries) == 1
        await scheduler.stop(1)
        await asyncio.wait_for(task, 2)
        await spool.close()

    run(main())


def test_hold_and_release_persist(tmp_path: Path) -> None:
    async def main() -> None:
        async with world(tmp_path) as w:
            w.agent.script["bob@example.org"] = [GREYLISTED]
            env = await w.queue("bob@example.org")
            await w.idle()
            w.scheduler.hold([env.queue_id])
            w.advance(10_000)
            await quiet()
            assert len(w.agent.deliveries) == 1
            await w.scheduler.persisted(5)
            assert w.on_disk(env.queue_id).held
            w.scheduler.release([env.queue_id])
            await until(lambda: len(w.agent.deliveries) == 2)  # its retry time has passed
            await w.idle()
            assert not w.on_disk(env.queue_id).held

    run(main())


def test_flush_leaves_held_messages_alone(tmp_path: Path) -> None:
    async def main() -> None:
        async with world(tmp_path) as w:
            w.agent.script["bob@example.org"] = [GREYLISTED]
            env = await w.queue("bob@example.org")
            await w.idle()
            w.scheduler.hold([env.queue_id])
            assert w.scheduler.flush(None) == []
            await quiet()
            assert len(w.agent.deliveries) == 1

    run(main())


def test_delete_removes_without_bounce(tmp_path: Path) -> None:
    async def main() -> None:
        async with world(tmp_path) as w:
            w.agent.script["bob@example.org"] = [GREYLISTED]
            env = await w.queue("bob@example.org")
            await w.idle()
            assert w.scheduler.delete([env.queue_id, "NOSUCHID"]) == ["NOSUCHID"]
            assert w.scheduler.snapshot() == []
            await w.scheduler.persisted(5)
            assert w.queued() == []
            assert w.scheduler.delete([env.queue_id]) == [env.queue_id]
            assert w.agent.bounces() == []

    run(main())


def test_delete_in_flight_removes_when_the_attempt_returns(tmp_path: Path) -> None:
    async def main() -> None:
        async with world(tmp_path) as w:
            w.agent.gate = asyncio.Event()
            w.agent.script["bob@example.org"] = [UNKNOWN]
            env = await w.queue("bob@example.org")
            await until(lambda: w.agent.active == 1)
            assert w.scheduler.delete([env.queue_id]) == []
            assert w.scheduler.snapshot() == []
            assert w.queued() == [env.queue_id]
            w.agent.gate.set()
            await until(lambda: w.queued() == [])
            await w.idle()
            assert w.agent.bounces() == []

    run(main())


def test_snapshot_is_a_copy(tmp_path: Path) -> None:
    async def main() -> None:
        async with world(tmp_path) as w:
            w.agent.script["bob@example.org"] = [GREYLISTED]
            env = await w.queue("bob@example.org")
            await w.idle()
            [snap] = w.scheduler.snapshot()
            assert snap.queue_id == env.queue_id and snap.recipients[0].status == "deferred"
            snap.held = True
            assert w.scheduler.counts()["held"] == 0

    run(main())


# ---- restarts and shutdown -------------------------------------------------------------


def test_next_attempt_survives_a_restart(tmp_path: Path) -> None:
    async def main() -> None:
        clock = Clock()
        async with world(tmp_path, clock=clock) as w:
            w.agent.script["bob@example.org"] = [GREYLISTED]
            env = await w.queue("bob@example.org")
            await w.idle()
            due = w.scheduler.snapshot()[0].next_attempt
        assert due > START
        async with world(tmp_path, clock=clock) as w2:
            [recovered] = w2.spool.recover()
            assert recovered.queue_id == env.queue_id
            assert recovered.next_attempt == due and recovered.attempts == 1
            w2.scheduler.load([recovered])
            await quiet()
            assert w2.agent.deliveries == []
            w2.advance(due - clock.now)
            await until(lambda: w2.queued() == [])
            assert len(w2.agent.deliveries) == 1

    run(main())


def test_stop_interrupts_a_hung_delivery_and_keeps_the_message(tmp_path: Path) -> None:
    async def main() -> None:
        clock = Clock()
        spool = RecordingSpool(tmp_path / "spool")
        spool.ensure()
        agent = FakeAgent(clock, gate=asyncio.Event())  # never opened
        scheduler = Scheduler(config(), spool, agent, clock=clock)
        task = asyncio.create_task(scheduler.run())
        env = Envelope(
            new_queue_id(),
            "alice@example.com",
            [Recipient("bob@example.org")],
            arrival_time=clock.now,
        )
        await spool.commit(env, MESSAGE)
        scheduler.add(env)
        await until(lambda: agent.active == 1)
        clock.now += 5
        await asyncio.wait_for(scheduler.stop(0.05), 5)
        await asyncio.wait_for(task, 2)
        assert agent.active == 0
        await spool.close()
        [stored] = Spool(tmp_path / "spool").recover()
        assert stored.queue_id == env.queue_id
        assert stored.recipients[0].status == "deferred"
        assert stored.recipients[0].dsn == "4.3.2"
        assert stored.next_attempt == clock.now  # due again at once after the restart

    run(main())


def test_stop_lets_a_quick_delivery_finish(tmp_path: Path) -> None:
    async def main() -> None:
        async with world(tmp_path) as w:
            w.agent.gate = asyncio.Event()
            await w.queue("bob@example.org")
            await until(lambda: w.agent.active == 1)
            asyncio.get_running_loop().call_later(0.02, w.agent.gate.set)
            await w.scheduler.stop(5)
            assert w.queued() == []

    run(main())


def test_nothing_starts_after_stop(tmp_path: Path) -> None:
    async def main() -> None:
        async with world(tmp_path) as w:
            await w.scheduler.stop(1)
            await w.queue("bob@example.org")
            await quiet()
            assert w.agent.deliveries == []

    run(main())


def test_cancelling_run_interrupts_deliveries(tmp_path: Path) -> None:
    async def main() -> None:
        async with world(tmp_path) as w:
            w.agent.gate = asyncio.Event()
            env = await w.queue("bob@example.org")
            await until(lambda: w.agent.active == 1)
            w.run_task.cancel()
            await asyncio.wait([w.run_task], timeout=5)
            assert w.agent.active == 0
            assert w.on_disk(env.queue_id).recipients[0].dsn == "4.3.2"

    run(main())


def test_reconfigure_applies_to_later_decisions(tmp_path: Path) -> None:
    async def main() -> None:
        async with world(tmp_path) as w:
            w.agent.script["bob@example.org"] = [GREYLISTED]
            w.scheduler.reconfigure(config(retry=(5000.0,)))
            env = await w.queue("bob@example.org")
            await w.idle()
            assert w.on_disk(env.queue_id).next_attempt >= START + 4500

    run(main())
