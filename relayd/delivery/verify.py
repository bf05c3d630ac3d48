"""Asking a served domain's next hop whether a recipient exists (``verify_recipients``).

For an inbound RCPT to a served domain, relayd opens a session to the same
next hop delivery would use (``[[route]]``, else MX; relayd.delivery.nexthop)
with the same client (relayd.delivery.client) and says ``MAIL FROM:<>``,
``RCPT TO:<address>``, ``RSET``, ``QUIT``. The answer decides the client's
RCPT: accepted, refused (550 5.1.1 at RCPT, nothing queued, nobody to bounce
to), or unknown (450 4.1.1: the client's server tries again later).

Every RCPT a stranger sends could cost a connection to our own next hop,
so what one peer can make relayd spend is bounded:

- answers are cached (accepted for a day, refused for an hour, as SPEC §7
  says) in an LRU cache of at most ``CACHE_SIZE`` entries, shared by every
  session; many distinct addresses evict old entries, never grow memory;
- concurrent RCPTs for one address share one probe;
- at most ``MAX_RUNNING`` probes talk to next hops at once, and at most
  ``MAX_PENDING`` are in flight or queued; beyond that the RCPT gets 450
  at once, without a probe;
- a probe, queueing included, ends within ``PROBE_TIMEOUT`` whatever the
  next hop does (silence, a trickle, a hang), and then counts as unknown.

Temporary answers are not cached: a next hop back from an outage is used at
once, and the caps above bound the cost of asking again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from relayd.config import Config
from relayd.delivery.client import (
    Endpoint,
    Session,
    SessionError,
    TLSContextFactory,
    default_tls_context,
    load_credentials,
    open_session,
    tls_policy,
)
from relayd.delivery.nexthop import Hop, NextHops, Resolver
from relayd.delivery.reply import DeliveryError, Outcome
from relayd.log import event
from relayd.policy.recipients import ProbeResult

ACCEPTED_TTL = 86400.0  # SPEC §7: an accepted answer is cached for a day
REFUSED_TTL = 3600.0  # and a refusal for an hour
CACHE_SIZE = 10_000  # addresses remembered: at most about 8.5 MB, measured (security.md)
MAX_DETAIL = 200  # characters of a next hop's reply kept with an answer
PROBE_TIMEOUT = 10.0  # seconds one RCPT may wait for its answer, queueing included
MAX_RUNNING = 10  # probes talking to next hops at once
MAX_PENDING = 100  # probes running or waiting for a slot; more get 450 at once
# A probe that gets its slot with less time than this left would only open a
# session it cannot finish (and the next hop would count one more connection).
MIN_PROBE_TIME = 0.1


@dataclass(frozen=True)
class Answer:
    result: ProbeResult
    detail: str  # the next hop's reply, or why there was none


_BUSY = Answer("unknown", "too many recipient checks in progress")


class AnswerCache:
    """Answers by address, each with its own expiry; least recently used goes first."""

    def __init__(self, max_entries: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_entries = max_entries
        self._clock = clock
        self._entries: OrderedDict[str, tuple[float, Answer]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> Answer | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry[0] <= self._clock():
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return entry[1]

    def put(self, key: str, answer: Answer, ttl: float) -> None:
        if len(answer.detail) > MAX_DETAIL:  # a next hop's long reply is not ours to keep
            answer = Answer(answer.result, answer.detail[:MAX_DETAIL])
        self._entries[key] = (self._clock() + ttl, answer)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        self._entries.clear()


def answer_of(outcome: Outcome) -> Answer:
    """Only a permanent refusal of the RCPT itself is a "no"."""
    if outcome.sent:
        return Answer("accepted", outcome.reply)
    if outcome.permanent:
        return Answer("refused", outcome.reply)
    return Answer("unknown", outcome.reply)


def ttl_of(answer: Answer) -> float:
    """How long to believe an answer; 0: not at all."""
    return {"accepted": ACCEPTED_TTL, "refused": REFUSED_TTL}.get(answer.result, 0.0)


class RecipientProber:
    """Probes next hops for the daemon; one per process, kept across reloads."""

    def __init__(
        self,
        config: Config,
        resolver: Resolver,
        *,
        cache_size: int = CACHE_SIZE,
        timeout: float = PROBE_TIMEOUT,
        max_running: int = MAX_RUNNING,
        max_pending: int = MAX_PENDING,
        tls_context_factory: TLSContextFactory = default_tls_context,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cache = AnswerCache(cache_size, clock)
        self.timeout = timeout
        self.max_pending = max_pending
        self.probes = 0  # sessions opened so far, for tests and metrics
        self._tls_context = tls_context_factory
        self._slots = asyncio.Semaphore(max_running)
        self._inflight: dict[str, asyncio.Task[Answer]] = {}
        self._closing: set[asyncio.Task[None]] = set()
        self.reconfigure(config, resolver)

    def reconfigure(self, config: Config, resolver: Resolver) -> None:
        """New routes may mean new next hops: forget what the old ones said."""
        self._config = config
        self._nexthops = NextHops(config, resolver)
        self.cache.clear()

    async def check(self, address: str) -> tuple[ProbeResult, str]:
        """The answer for ``address``: cached, shared with a probe in flight, or new."""
        key = address.lower()
        cached = self.cache.get(key)
        if cached is not None:
            return cached.result, cached.detail
        task = self._inflight.get(key)
        if task is None:
            if len(self._inflight) >= self.max_pending:
                return _BUSY.result, _BUSY.detail
            task = asyncio.ensure_future(self._run(key, address))
            self._inflight[key] = task
            task.add_done_callback(lambda _: self._inflight.pop(key, None))
        # A client that goes away must not cancel the answer others wait for.
        answer = await asyncio.shield(task)
        return answer.result, answer.detail

    async def close(self) -> None:
        """At shutdown: stop probes in flight, let goodbyes finish briefly."""
        for task in list(self._inflight.values()):
            task.cancel()
        await asyncio.gather(*self._inflight.values(), *self._closing, return_exceptions=True)

    async def _run(self, key: str, address: str) -> Answer:
        try:
            async with asyncio.timeout(self.timeout) as budget:
                async with self._slots:
                    if _left(budget) < MIN_PROBE_TIME:  # a slot freed as our time ran out
                        raise TimeoutError
                    answer = await self._probe(address)
        except TimeoutError:
            answer = Answer("unknown", f"the next hop did not answer within {self.timeout:g}s")
        except Exception as exc:  # a local problem must give 450, never a stuck RCPT
            answer = Answer("unknown", f"local error: {exc}")
        ttl = ttl_of(answer)
        if ttl > 0:
            self.cache.put(key, answer, ttl)
        _log(address, answer)
        return answer

    async def _probe(self, address: str) -> Answer:
        domain = address.rpartition("@")[2]
        resolution = await self._nexthops.resolve(domain)
        if resolution.failure is not None or not resolution.hops:
            why = resolution.failure.reply if resolution.failure else "no next hop"
            return Answer("unknown", why)  # a served domain we cannot route is ours to fix
        last = "no next hop had a usable address"
        for hop in resolution.hops:
            for ip in hop.addresses:
                try:
                    session = await open_session(self._endpoint(hop, ip))
                except DeliveryError as e:  # SessionError, or a route's missing password
                    last = e.outcome.reply
                    if not isinstance(e, SessionError):
                        return Answer("unknown", last)
                    continue
                return await self._ask(session, address)
        return Answer("unknown", last)

    async def _ask(self, session: Session, address: str) -> Answer:
        self.probes += 1
        try:
            outcome = await session.probe_recipient(address)
        except BaseException:  # timed out or cancelled mid-command: no goodbye owed
            session.abort()
            raise
        self._quit_later(session)
        return answer_of(outcome)

    def _endpoint(self, hop: Hop, address: str) -> Endpoint:
        delivery = self._config.delivery
        policy = tls_policy(delivery, hop.route)
        credentials = load_credentials(hop.route)
        if credentials is not None and policy.mode == "none":
            raise DeliveryError(Outcome.temp("4.7.4", "route has credentials but tls = none"))
        context = None
        if policy.mode != "none":
            context = self._tls_context(policy.verify, policy.ca_file)
        return Endpoint(
            host=hop.host,
            address=address,
            port=hop.port,
            helo=self._config.hostname,
            tls=policy,
            context=context,
            credentials=credentials,
            connect_timeout=min(delivery.connect_timeout, self.timeout),
            command_timeout=min(delivery.command_timeout, self.timeout),
        )

    def _quit_later(self, session: Session) -> None:
        """QUIT off the RCPT's path: the client has its answer already."""
        task = asyncio.get_running_loop().create_task(session.quit())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)


def _log(address: str, answer: Answer) -> None:
    level = logging.WARNING if answer.result == "unknown" else logging.INFO
    event(
        "verify",
        f"<{address}>: recipient {answer.result} by next hop: {answer.detail}",
        level=level,
        recipient=address,
    )


def _left(budget: asyncio.Timeout) -> float:
    """Seconds left before ``budget`` expires."""
    when = budget.when()
    return float("inf") if when is None else when - asyncio.get_running_loop().time()
