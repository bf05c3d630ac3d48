"""The queue manager: when each queued message is tried, and what happens after.

How this works. Every message in the spool has its Envelope here, keyed by
queue id, and an entry ``(next_attempt, queue_id)`` in a heap. The run loop
takes the entries that are due, skips held messages, and starts one task
per message while fewer than ``[delivery] concurrency`` are in flight and
every recipient domain of the message has fewer than
``per_domain_concurrency`` deliveries in flight; a message that does not fit
waits, in due order, until a running delivery frees a slot. The task reads
the message, hands the pending recipients to the delivery agent and applies
the attempts it returns: ``sent`` and ``failed`` recipients are final,
``deferred`` ones wait for the next retry, and once ``max_age`` has passed
they fail too (``4.4.7``). Failed recipients produce one bounce, and
recipients deferred longer than ``delay_warning`` one delay notice, both
committed to the spool as new messages *before* the original's new state
is written: a crash in between at worst sends a notice twice, never loses
one. A message whose recipients are all final is removed from the spool;
any other is written back with its next attempt time before the task lets
go of it, so the spool always says what the scheduler would do next.

The next attempt is ``retry[k]`` after the end of attempt k (the last
interval repeats), times a random factor in [0.9, 1.1] so that a restart
or an outage does not line every retry up at once. It counts from the end
of the attempt rather than from arrival: a long outage or a slow attempt
never leaves a backlog of past-due slots to burn through, and no retry is
later than ``max_age`` so the last one happens when the message expires.

The scheduler owns time; the store owns bytes. Operator actions (flush,
hold, release, delete) change state here at once and write it to the
spool in the background; ``persisted()`` waits for those writes.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import random
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from relayd import bounce
from relayd.config import Config
from relayd.delivery.reply import clip_reply
from relayd.log import event
from relayd.metrics import Metrics
from relayd.spool.model import Attempt, Envelope, Recipient, trim_history
from relayd.spool.queueid import new_queue_id

Clock = Callable[[], float]
NoticeKind = Literal["failure", "delay"]

DEFAULT_RETRY = 300.0
MAX_IDLE = 30.0  # look at the heap at least this often, so a clock step is noticed
SPOOL_TIMEOUT = 120.0  # one spool read or write; a stuck disk must not stall a slot
INLINE_READ_MAX = 64 * 1024  # messages up to this size are read on the event loop
STOP_GRACE = 5.0  # after cancelling deliveries, time allowed to write their state
EXPIRED_DSN = bounce.EXPIRED_DSN
INTERRUPTED_DSN = "4.3.2"
LOCAL_ERROR_DSN = "4.3.0"
TIMEOUT_DSN = "4.4.2"
RETURNED_DSN = "5.0.0"  # relayctl queue bounce

_STATUS_WORD = {"sent": "sent", "deferred": "deferred", "failed": "bounced"}
_STAT_KEY = {"sent": "delivered", "deferred": "deferred", "failed": "bounced"}


class SpoolLike(Protocol):
    """What the scheduler needs of relayd.spool.store.Spool."""

    async def commit(self, envelope: Envelope, data: bytes) -> None: ...
    async def update(self, envelope: Envelope) -> None: ...
    async def remove(self, queue_id: str) -> None: ...
    def read_data(self, queue_id: str) -> bytes: ...


class OutcomesLike(Protocol):
    """What the scheduler tells relayd.events.Outcomes (webhook events, suppression)."""

    def wants(self, env: Envelope, expired: list[Recipient], delayed: list[Recipient]) -> bool: ...

    async def settled(
        self,
        env: Envelope,
        attempted: list[str],
        expired: list[Recipient],
        delayed: list[Recipient],
        data: bytes,
    ) -> None: ...


class AgentLike(Protocol):
    """What the scheduler needs of relayd.delivery.agent.DeliveryAgent."""

    async def deliver(
        self, envelope: Envelope, data: bytes, recipients: list[str]
    ) -> list[Attempt]: ...


@dataclass(frozen=True)
class Stats:
    """Recipient outcomes since start, for ``relayctl status``."""

    delivered: int = 0
    bounced: int = 0
    deferred: int = 0


def retry_delay(retry: Sequence[float], attempts: int, rng: random.Random) -> float:
    """Seconds to wait after ``attempts`` tries: the matching interval (the last repeats) ±10%."""
    if not retry:
        return DEFAULT_RETRY * rng.uniform(0.9, 1.1)
    base = retry[min(max(attempts, 1) - 1, len(retry) - 1)]
    return base * rng.uniform(0.9, 1.1)


def domain_of(address: str) -> str:
    return address.rpartition("@")[2].lower()


class Scheduler:
    def __init__(
        self,
        config: Config,
        spool: SpoolLike,
        agent: AgentLike,
        *,
        clock: Clock = time.time,
        rng: random.Random | None = None,
        new_id: Callable[[], str] = new_queue_id,
        attempt_timeout: float | None = None,
        metrics: Metrics | None = None,
        outcomes: OutcomesLike | None = None,
    ) -> None:
        self._config = config
        self._outcomes = outcomes
        self._spool = spool
        self._agent = agent
        self._clock = clock
        self._rng = rng or random.Random()
        self._new_id = new_id
        self._attempt_timeout = attempt_timeout
        self._metrics = metrics or Metrics()
        self._envelopes: dict[str, Envelope] = {}
        # Told of each message that leaves the queue (the API's ledger listens).
        self.on_removed: Callable[[Envelope], None] | None = None
        self._heap: list[tuple[float, str]] = []
        self._blocked: list[tuple[float, str]] = []  # due, waiting for a free slot
        # Due, waiting for a slot at one domain (a heap per domain): looked at
        # only when that domain frees a slot, not on every wake-up.
        self._waiting: dict[str, list[tuple[float, str]]] = {}
        self._freed: set[str] = set()  # domains that freed a slot since the last look
        self._rescan = False  # look at every waiting domain (caps changed, resumed)
        self._tasks: dict[str, asyncio.Task[None]] = {}  # one per message in flight
        self._delivering: dict[str, asyncio.Task[list[Attempt]]] = {}
        self._per_domain: Counter[str] = Counter()
        self._deleted: set[str] = set()  # deleted by the operator, removal under way
        self._locks: dict[str, asyncio.Lock] = {}
        self._writes: set[asyncio.Task[Any]] = set()
        self._stats: Counter[str] = Counter()
        self._wake = asyncio.Event()
        self._stopping = False
        self._paused = False
        self._bouncing: set[str] = set()  # returned by the operator at their next attempt

    # ---- feeding it ---------------------------------------------------------

    def load(self, envelopes: Iterable[Envelope]) -> None:
        """Take over what the spool held at start."""
        for envelope in envelopes:
            self.add(envelope)

    def add(self, envelope: Envelope) -> None:
        """Schedule a committed message; a new one (next_attempt 0) is due at once."""
        qid = envelope.queue_id
        if qid in self._envelopes:
            return
        self._envelopes[qid] = envelope
        self._push(envelope)

    def knows(self, queue_id: str) -> bool:
        return queue_id in self._envelopes

    def envelope(self, queue_id: str) -> Envelope | None:
        """The message's current state (a copy), or None when it is not queued."""
        env = self._envelopes.get(queue_id)
        return env.copy() if env is not None else None

    def reconfigure(self, config: Config, agent: AgentLike | None = None) -> None:
        """Use a new config snapshot (and delivery agent) from now on.

        Attempts in flight finish with the agent they started with.
        """
        self._config = config
        if agent is not None:
            self._agent = agent
        self._rescan = True
        self._wake.set()

    def wake(self) -> None:
        """Look at the queue now, e.g. after the clock was changed."""
        self._wake.set()

    # ---- operator actions ---------------------------------------------------

    def flush(self, ids: list[str] | None = None) -> list[str]:
        """Make deferred messages (all, or ``ids``) due now; returns the unknown ids.

        Not written to the spool: the attempt follows at once and its result
        is written; a crash before it only means the old retry time.
        """
        unknown, found = self._resolve(ids)
        self._make_due(found)
        return unknown

    def flush_domain(self, domain: str) -> int:
        """Make due now the messages with recipients still open at ``domain``; how many."""
        found = [
            env
            for env in self._envelopes.values()
            if env.queue_id not in self._deleted and domain in _domains(env)
        ]
        return self._make_due(found)

    def _make_due(self, found: list[Envelope]) -> int:
        now = self._clock()
        count = 0
        for env in found:
            if not env.held and env.queue_id not in self._tasks and env.next_attempt > now:
                env.next_attempt = now
                self._push(env)
                count += 1
        self._wake.set()
        return count

    def bounce(self, ids: list[str]) -> list[str]:
        """Fail every open recipient now, with a bounce to the sender; returns unknown ids.

        The message goes through an attempt of its own (held ones are released
        for it), so the bounce, the log lines and the removal are the usual ones.
        """
        unknown, found = self._resolve(ids)
        for env in found:
            self._bouncing.add(env.queue_id)
            event("qmgr", "returned to sender by the operator", queue_id=env.queue_id)
            if env.held:
                env.held = False
            env.next_attempt = min(env.next_attempt, self._clock())
            self._push(env)
        self._wake.set()
        return unknown

    def in_flight(self) -> int:
        """Messages with a delivery attempt running now."""
        return len(self._tasks)

    @property
    def paused(self) -> bool:
        return self._paused

    def pause(self) -> None:
        """No new delivery attempts until resume(); mail is still accepted and queued."""
        if not self._paused:
            self._paused = True
            event("qmgr", "delivery paused by the operator")

    def resume(self) -> None:
        if self._paused:
            self._paused = False
            event("qmgr", "delivery resumed by the operator")
            self._rescan = True
            self._wake.set()

    def hold(self, ids: list[str]) -> list[str]:
        """Keep messages from delivery until released; returns the unknown ids."""
        unknown, found = self._resolve(ids)
        for env in found:
            if not env.held:
                env.held = True
                event("qmgr", "placed on hold", queue_id=env.queue_id)
                self._background(self._persist(env))
        return unknown

    def release(self, ids: list[str]) -> list[str]:
        """Put held messages back; they keep their retry time (or go now if it passed)."""
        unknown, found = self._resolve(ids)
        for env in found:
            if env.held:
                env.held = False
                event("qmgr", "released from hold", queue_id=env.queue_id)
                self._push(env)
                self._background(self._persist(env))
        return unknown

    def delete(self, ids: list[str]) -> list[str]:
        """Remove messages without a bounce; one in flight goes when its attempt returns."""
        unknown, found = self._resolve(ids)
        for env in found:
            self._deleted.add(env.queue_id)
            if env.queue_id not in self._tasks:
                self._background(self._remove_deleted(env))
        return unknown

    def snapshot(self) -> list[Envelope]:
        """Copies of every queued message, oldest first, safe to serialise elsewhere."""
        envs = [e for e in self._envelopes.values() if e.queue_id not in self._deleted]
        envs.sort(key=lambda e: (e.arrival_time, e.queue_id))
        copies = [env.copy() for env in envs]
        for env in copies:
            if env.queue_id in self._tasks:
                # Mid-attempt, its open recipients are pending this attempt's
                # outcome: the message lists as active, as counts() has it.
                for rcpt in env.pending:
                    rcpt.status = "pending"
        return copies

    def counts(self) -> dict[str, int]:
        """Messages by state; one in flight counts as active, as in Postfix."""
        counts = {"active": 0, "deferred": 0, "held": 0}
        for qid, env in self._envelopes.items():
            if qid in self._deleted:
                continue
            state = "active" if qid in self._tasks and not env.held else env.state
            counts[state] += 1
        return counts

    def oldest_arrival(self) -> float | None:
        """When the oldest queued message (held ones too) arrived; None for an empty queue."""
        arrivals = [e.arrival_time for q, e in self._envelopes.items() if q not in self._deleted]
        return min(arrivals, default=None)

    @property
    def stats(self) -> Stats:
        return Stats(
            delivered=self._stats["delivered"],
            bounced=self._stats["bounced"],
            deferred=self._stats["deferred"],
        )

    async def persisted(self, timeout: float = SPOOL_TIMEOUT) -> None:
        """Wait until the state changes made so far by operator actions are on disk."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self._writes and loop.time() < deadline:
            await asyncio.wait(set(self._writes), timeout=deadline - loop.time())

    # ---- running --------------------------------------------------------------

    async def run(self) -> None:
        """Start due deliveries until stop(); cancelling it cancels what is in flight."""
        try:
            while not self._stopping:
                self._wake.clear()
                self._dispatch_due()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self._idle_time())
        finally:
            if not self._stopping:
                self._stopping = True
                await self._cancel_in_flight()

    async def stop(self, timeout: float) -> None:
        """Start nothing new; give deliveries ``timeout`` to finish, then interrupt them.

        An interrupted message is written back as deferred and due at once,
        so the next start retries it; it is never lost.
        """
        self._stopping = True
        self._wake.set()
        running = set(self._tasks.values())
        if running:
            await asyncio.wait(running, timeout=timeout)
        await self._cancel_in_flight()
        await self.persisted(STOP_GRACE)

    async def _cancel_in_flight(self) -> None:
        """Interrupt deliveries; their tasks still write state, and are cut off if they hang."""
        for delivery in list(self._delivering.values()):
            delivery.cancel()
        pending = {t for t in self._tasks.values() if not t.done()}
        if pending:
            _, pending = await asyncio.wait(pending, timeout=STOP_GRACE)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=STOP_GRACE)

    def _idle_time(self) -> float:
        if not self._heap or self._paused:  # resume() wakes the loop
            return MAX_IDLE
        return min(MAX_IDLE, max(0.0, self._heap[0][0] - self._clock()))

    def _push(self, env: Envelope) -> None:
        if not env.held:
            heapq.heappush(self._heap, (env.next_attempt, env.queue_id))
            self._wake.set()

    def _dispatch_due(self) -> None:
        """Start every due message that fits under the caps, in due order.

        A message that does not fit under a domain's cap waits in that
        domain's heap until the domain frees a slot; a wake-up looks only at
        the domains that did, so a backlog behind a busy next hop costs
        nothing per finished attempt.
        """
        if self._paused:
            return
        now = self._clock()
        due, self._blocked = self._blocked, []
        while self._heap and self._heap[0][0] <= now:
            due.append(heapq.heappop(self._heap))
        limit = max(1, self._config.delivery.concurrency)
        cap = max(1, self._config.delivery.per_domain_concurrency)
        freed = self._freed if not self._rescan else set(self._waiting)
        self._freed, self._rescan = set(), False
        for domain in freed:
            waiting = self._waiting.get(domain)
            free = cap - self._per_domain[domain]
            while waiting and free > 0:
                entry = heapq.heappop(waiting)
                if self._current(entry) is not None:
                    due.append(entry)
                    free -= 1
            if not waiting:
                self._waiting.pop(domain, None)
        due.sort()
        full = {d for d, n in self._per_domain.items() if n >= cap}
        for i, entry in enumerate(due):
            if self._stopping or len(self._tasks) >= limit:
                # Full: the rest waits as it is, without a look at each entry
                # (a large backlog would otherwise cost O(n) per finished attempt).
                self._blocked.extend(due[i:])
                return
            env = self._current(entry)
            if env is None:
                continue
            domains = _domains(env)
            blocking = domains & full
            if not blocking:
                self._start(env, domains)
                full.update(d for d in domains if self._per_domain[d] >= cap)
            else:
                heapq.heappush(self._waiting.setdefault(min(blocking), []), entry)
                # Its other domains may have a free slot and others waiting for it:
                # look at them again at the next wake-up.
                self._freed.update(domains - full)

    def _current(self, entry: tuple[float, str]) -> Envelope | None:
        """The envelope a heap entry stands for, or None if the entry is stale."""
        when, qid = entry
        env = self._envelopes.get(qid)
        if env is None or env.held or qid in self._tasks or qid in self._deleted:
            return None
        if env.next_attempt != when:
            return None
        return env

    def _start(self, env: Envelope, domains: set[str]) -> None:
        self._per_domain.update(domains)
        qid = env.queue_id
        self._tasks[qid] = asyncio.create_task(self._attempt(env, domains), name=f"qmgr {qid}")

    # ---- one attempt ------------------------------------------------------------

    async def _attempt(self, env: Envelope, domains: set[str]) -> None:
        qid = env.queue_id
        try:
            nrcpt = len(env.recipients)
            event(
                "qmgr",
                f"from=<{env.sender}>, size={env.size}, nrcpt={nrcpt} (queue active)",
                queue_id=qid,
                mail_from=env.sender,
            )
            recipients = [r.address for r in env.pending]
            data, attempts = await self._try(env, recipients)
            await self._settle(env, recipients, attempts, data)
        except Exception as exc:
            event("qmgr", f"warning: attempt failed: {exc!r}", queue_id=qid, level=logging.ERROR)
            self._reschedule(env, self._clock())
        finally:
            self._per_domain.subtract(domains)
            self._per_domain += Counter()  # drop domains that reached zero
            self._freed.update(domains)
            self._tasks.pop(qid, None)
            if qid in self._deleted and qid in self._envelopes:
                # Deleted while this attempt was settling (e.g. during its state
                # write): nobody else will remove it now that the task is gone.
                self._background(self._remove_deleted(env))
            self._wake.set()

    async def _try(
        self, env: Envelope, recipients: list[str]
    ) -> tuple[bytes, list[Attempt] | None]:
        """The message and the agent's attempts; None for attempts interrupted by stop()."""
        if not recipients:
            return b"", []
        if env.queue_id in self._bouncing:
            self._bouncing.discard(env.queue_id)
            return await self._read(env), [self._returned(recipients)]
        try:
            data = await self._read(env)
        except Exception as exc:
            reply = f"cannot read the queued message: {exc}"
            return b"", [self._local(recipients, LOCAL_ERROR_DSN, reply)]
        if self._stopping:
            return data, None
        return data, await self._deliver(env, data, recipients)

    async def _read(self, env: Envelope) -> bytes:
        """The queued message; a small one is read on the loop.

        A message just accepted is in the page cache, and a read of a few
        kilobytes costs less than handing it to a thread and back; a large
        one (or a disk that hangs) is read in a thread, within SPOOL_TIMEOUT.
        """
        if env.size <= INLINE_READ_MAX:
            return self._spool.read_data(env.queue_id)
        return await asyncio.wait_for(
            asyncio.to_thread(self._spool.read_data, env.queue_id), SPOOL_TIMEOUT
        )

    async def _deliver(
        self, env: Envelope, data: bytes, recipients: list[str]
    ) -> list[Attempt] | None:
        task = asyncio.create_task(self._agent.deliver(env, data, recipients))
        self._delivering[env.queue_id] = task
        try:
            return await asyncio.wait_for(task, self._timeout())
        except TimeoutError:
            return [self._local(recipients, TIMEOUT_DSN, "delivery attempt timed out")]
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise
            return None  # stop() interrupted the delivery, not this task
        except Exception as exc:
            event(
                "qmgr",
                f"warning: delivery failed: {exc!r}",
                queue_id=env.queue_id,
                level=logging.ERROR,
            )
            return [self._local(recipients, LOCAL_ERROR_DSN, f"local delivery error: {exc}")]
        finally:
            self._delivering.pop(env.queue_id, None)

    def _timeout(self) -> float:
        """A backstop for an agent that never returns, far above its own protocol timers."""
        if self._attempt_timeout is not None:
            return self._attempt_timeout
        d = self._config.delivery
        return d.connect_timeout + 12 * d.command_timeout

    def _returned(self, recipients: list[str]) -> Attempt:
        attempt = self._local(recipients, RETURNED_DSN, "message returned by the operator")
        attempt.status = "failed"
        return attempt

    def _local(self, recipients: list[str], dsn: str, reply: str) -> Attempt:
        return Attempt(
            time=self._clock(),
            recipients=list(recipients),
            host="",
            address="",
            port=0,
            tls=None,
            reply=reply,
            dsn=dsn,
            status="deferred",
            duration=0.0,
        )

    async def _settle(
        self,
        env: Envelope,
        recipients: list[str],
        attempts: list[Attempt] | None,
        data: bytes,
    ) -> None:
        """Apply the outcome, send notices, then write or remove the message (in that order)."""
        now = self._clock()
        qid = env.queue_id
        if attempts is None:
            self._interrupted(env)
            env.next_attempt = now
        else:
            failed = self._apply(env, recipients, attempts, now)
            expired = self._expire(env, now)
            failed += expired
            unwarned = [r for r in env.recipients if not r.delay_warned]
            if qid not in self._deleted and _bounceable(env):
                await self._notify(env, failed, data, now)
            env.next_attempt = self._next_time(env, now)
            warned = [r for r in unwarned if r.delay_warned]
            await self._tell(env, recipients, expired, warned, data)
        if qid in self._deleted or env.done:
            if await self._remove(qid):
                return
            self._deleted.discard(qid)  # still on disk: show it again rather than lie
        await self._persist(env)
        self._push(env)

    async def _tell(
        self,
        env: Envelope,
        attempted: list[str],
        expired: list[Recipient],
        delayed: list[Recipient],
        data: bytes,
    ) -> None:
        """Events and suppression (relayd.events), before the new state is written."""
        if self._outcomes is None or not self._outcomes.wants(env, expired, delayed):
            return
        try:
            await asyncio.wait_for(
                self._outcomes.settled(env, attempted, expired, delayed, data), SPOOL_TIMEOUT
            )
        except Exception as exc:
            event(
                "qmgr",
                f"warning: delivery events not recorded: {exc!r}",
                queue_id=env.queue_id,
                level=logging.ERROR,
            )

    def _reschedule(self, env: Envelope, now: float) -> None:
        if env.queue_id in self._envelopes:
            env.next_attempt = self._next_time(env, now)
            self._push(env)

    def _next_time(self, env: Envelope, now: float) -> float:
        d = self._config.delivery
        after = now + retry_delay(d.retry, env.attempts, self._rng)
        expiry = env.arrival_time + d.max_age
        return min(after, expiry) if expiry > now else after

    def _interrupted(self, env: Envelope) -> None:
        for rcpt in env.recipients:
            if rcpt.status == "pending":
                rcpt.status = "deferred"
                rcpt.dsn = INTERRUPTED_DSN
                rcpt.reply = "delivery interrupted by shutdown"

    def _apply(
        self, env: Envelope, recipients: list[str], attempts: list[Attempt], now: float
    ) -> list[Recipient]:
        """Record the attempts on the envelope and log them; returns who failed just now."""
        covered = {a for attempt in attempts for a in attempt.recipients}
        missing = [a for a in recipients if a not in covered]
        if missing:
            attempts = [*attempts, self._local(missing, LOCAL_ERROR_DSN, "no delivery outcome")]
        by_address: dict[str, list[Recipient]] = {}
        for rcpt in env.pending:
            by_address.setdefault(rcpt.address, []).append(rcpt)
        failed: list[Recipient] = []
        for attempt in attempts:
            # Whatever agent made it, a record is bounded before it is kept or logged.
            attempt.reply = clip_reply(attempt.reply)
            attempt.dsn = clip_reply(attempt.dsn, 16)
            attempt.number = env.attempts + 1
            if attempt.status == "sent":
                self._metrics.tls_used("out", attempt.tls)
            if attempt.tls_policy:
                self._metrics.tls_policy_used(
                    attempt.tls_policy,
                    attempt.tls_verified,
                    _STATUS_WORD[attempt.status],
                    len(attempt.recipients),
                )
            for address in attempt.recipients:
                for rcpt in by_address.pop(address, []):
                    _record(rcpt, attempt)
                    self._log_result(env, address, attempt, now)
                    if rcpt.status == "failed":
                        failed.append(rcpt)
        if attempts:
            env.history = trim_history([*env.history, *attempts])
            env.attempts += 1
        return failed

    def _log_result(self, env: Envelope, address: str, attempt: Attempt, now: float) -> None:
        status = _STATUS_WORD[attempt.status]
        self._stats[_STAT_KEY[attempt.status]] += 1
        self._metrics.delivery(status, now - env.arrival_time)
        relay = f"{attempt.host}[{attempt.address}]:{attempt.port}" if attempt.address else "none"
        delay = _delay(now - env.arrival_time)
        # Postfix's line as it is, then the TLS policy (appended: tools such as
        # pflogsumm read the fields up to status= by name and position).
        policy = ""
        if attempt.tls_policy:
            verified = "yes" if attempt.tls_verified else "no"
            policy = f" tls={attempt.tls_policy} verified={verified}"
        event(
            "smtp",
            f"to=<{address}>, relay={relay}, delay={delay}, dsn={attempt.dsn}, "
            f"status={status} ({attempt.reply}){policy}",
            queue_id=env.queue_id,
            recipient=address,
            dsn=attempt.dsn,
            status=status,
            relay_host=attempt.host,
            smtp_reply=attempt.reply,
            delay=delay,
            tls_policy=attempt.tls_policy,
            tls_verified=("yes" if attempt.tls_verified else "no") if attempt.tls_policy else "",
        )

    def _expire(self, env: Envelope, now: float) -> list[Recipient]:
        """Fail the recipients still deferred once the message is older than max_age."""
        if now - env.arrival_time < self._config.delivery.max_age:
            return []
        expired = [r for r in env.recipients if r.status == "deferred"]
        returned = ", returned to sender" if _bounceable(env) else ""
        for rcpt in expired:
            rcpt.status = "failed"
            rcpt.dsn = EXPIRED_DSN
            delay = _delay(now - env.arrival_time)
            self._stats["bounced"] += 1
            self._metrics.delivery("bounced", now - env.arrival_time)
            event(
                "qmgr",
                f"to=<{rcpt.address}>, relay=none, delay={delay}, dsn={EXPIRED_DSN}, "
                f"status=expired{returned} ({rcpt.reply})",
                queue_id=env.queue_id,
                recipient=rcpt.address,
                dsn=EXPIRED_DSN,
                status="expired",
                smtp_reply=rcpt.reply,
                delay=delay,
            )
        return expired

    # ---- notices to the sender -------------------------------------------------

    async def _notify(
        self, env: Envelope, failed: list[Recipient], data: bytes, now: float
    ) -> None:
        """Queue the bounce and the delay notice this attempt calls for.

        A bounce that cannot be queued puts its recipients back to deferred,
        so the next attempt fails them again and retries the bounce.
        """
        if failed and not await self._send_notice(env, "failure", failed, data, now):
            for rcpt in failed:
                rcpt.status = "deferred"
        delayed = self._to_warn(env, now)
        if delayed and await self._send_notice(env, "delay", delayed, data, now):
            for rcpt in delayed:
                rcpt.delay_warned = True

    def _to_warn(self, env: Envelope, now: float) -> list[Recipient]:
        after = self._config.delivery.delay_warning
        if after <= 0 or now - env.arrival_time < after:
            return []
        return [r for r in env.recipients if r.status == "deferred" and not r.delay_warned]

    async def _send_notice(
        self, env: Envelope, kind: NoticeKind, rcpts: list[Recipient], data: bytes, now: float
    ) -> bool:
        notice_id = self._new_id()
        message = self._build_notice(env, kind, rcpts, data, now, notice_id)
        notice = Envelope(
            queue_id=notice_id,
            sender="",
            recipients=[Recipient(env.sender)],
            arrival_time=now,
            size=len(message),
            smtputf8=not env.sender.isascii(),
            body_8bit=not message.isascii(),
            is_bounce=True,
        )
        try:
            await asyncio.wait_for(self._spool.commit(notice, message), SPOOL_TIMEOUT)
        except Exception as exc:
            event(
                "bounce",
                f"warning: cannot queue {kind} notice: {exc}",
                queue_id=env.queue_id,
                level=logging.WARNING,
            )
            return False
        what = "non-delivery notification" if kind == "failure" else "delay notification"
        event("bounce", f"sender {what}: {notice_id}", queue_id=env.queue_id)
        self.add(notice)
        return True

    def _build_notice(
        self,
        env: Envelope,
        kind: NoticeKind,
        rcpts: list[Recipient],
        data: bytes,
        now: float,
        notice_id: str,
    ) -> bytes:
        hostname = self._config.hostname
        msgid = f"<{notice_id}@{hostname}>"
        if kind == "failure":
            return bounce.build_failure_dsn(hostname, env, rcpts, data, now, message_id=msgid)
        until = env.arrival_time + self._config.delivery.max_age
        return bounce.build_delay_dsn(
            hostname, env, rcpts, data, now, retry_until=until, message_id=msgid
        )

    # ---- the spool ----------------------------------------------------------------

    def _lock(self, qid: str) -> asyncio.Lock:
        """Writes for one message go one at a time, so an older state never lands last."""
        return self._locks.setdefault(qid, asyncio.Lock())

    async def _persist(self, env: Envelope) -> bool:
        qid = env.queue_id
        async with self._lock(qid):
            if self._envelopes.get(qid) is not env:
                return True  # removed meanwhile; writing would bring it back
            try:
                await asyncio.wait_for(self._spool.update(env.copy()), SPOOL_TIMEOUT)
            except Exception as exc:
                event(
                    "qmgr",
                    f"warning: cannot save queue state: {exc}",
                    queue_id=qid,
                    level=logging.ERROR,
                )
                return False
        return True

    async def _remove(self, qid: str) -> bool:
        async with self._lock(qid):
            try:
                await asyncio.wait_for(self._spool.remove(qid), SPOOL_TIMEOUT)
            except KeyError:
                pass  # already gone: that is what we wanted
            except Exception as exc:
                event(
                    "qmgr",
                    f"warning: cannot remove from the queue: {exc}",
                    queue_id=qid,
                    level=logging.ERROR,
                )
                return False
        env = self._envelopes.pop(qid, None)
        self._deleted.discard(qid)
        self._locks.pop(qid, None)
        event("qmgr", "removed", queue_id=qid)
        if env is not None and self.on_removed is not None:
            self.on_removed(env)
        return True

    async def _remove_deleted(self, env: Envelope) -> None:
        if not await self._remove(env.queue_id):
            self._deleted.discard(env.queue_id)  # still on disk: show it again rather than lie
            self._push(env)

    def _background(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.create_task(coro)
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    def _resolve(self, ids: list[str] | None) -> tuple[list[str], list[Envelope]]:
        """Split ids into unknown ones and known envelopes; None means every message."""
        if ids is None:
            return [], [e for q, e in self._envelopes.items() if q not in self._deleted]
        unknown = [q for q in ids if q not in self._envelopes or q in self._deleted]
        found = [self._envelopes[q] for q in dict.fromkeys(ids) if q not in unknown]
        return unknown, found


def _record(rcpt: Recipient, attempt: Attempt) -> None:
    rcpt.status = attempt.status
    rcpt.dsn = attempt.dsn
    rcpt.reply = attempt.reply
    rcpt.remote_host = attempt.host if attempt.address else ""


def _domains(env: Envelope) -> set[str]:
    return {domain_of(r.address) for r in env.pending}


def _bounceable(env: Envelope) -> bool:
    """Mail from <> and our own notices never bounce: no loops."""
    return env.sender != "" and not env.is_bounce


def _delay(seconds: float) -> str:
    """Postfix's habit: two decimals for short delays, fewer as they grow."""
    seconds = max(0.0, seconds)
    if seconds < 10:
        return f"{seconds:.2f}"
    if seconds < 100:
        return f"{seconds:.1f}"
    return f"{seconds:.0f}"
