"""One delivery attempt for one message: recipients in, Attempt records out.

The agent decides nothing about the queue. The scheduler hands it a message
and the recipients still pending; it returns what happened to each of them
as ``Attempt`` records, and the scheduler applies those to the spool, the
logs and the retry clock. So a crash anywhere in here loses no state.

Recipients are grouped by domain, domains by their set of next hops, and
each group travels in one SMTP session: one message to five people at one
provider is one transaction, as SPEC section 4 asks. Hops are tried in order,
each address of each hop in turn, moving on when a connection fails, the
greeting or EHLO is refused, or TLS cannot be had where it is required. Once
a session is up, its replies are final for this attempt: a 4xx to RCPT
defers the recipient, it does not send us to the next MX.

Sessions outlive messages. After a message, a healthy session waits in an
idle pool keyed by next-hop host, port and security settings, for a few
seconds; a message to the same host in that window reuses it after RSET. A
burst of mail to one big provider then costs a handful of TLS handshakes
instead of one per message.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from relayd import log
from relayd.config import Config
from relayd.delivery.client import (
    ConnectFailed,
    Endpoint,
    LoopsBack,
    Session,
    SessionError,
    TLSContextFactory,
    TLSPolicy,
    default_tls_context,
    load_credentials,
    open_session,
    tls_policy,
)
from relayd.delivery.deadhops import MAX_HOLD, DeadHops
from relayd.delivery.nexthop import Hop, NextHops, Resolution, Resolver
from relayd.delivery.reply import DeliveryError, Outcome
from relayd.delivery.tlspolicy import DomainSecurity, SecurityLookup, hop_policy, testing_mismatch
from relayd.spool.model import Attempt, Envelope

# A session kept for reuse is identified by where it goes and how it is secured.
# The policy's name counts too: a route's session is never reused for an MX,
# whose sessions were checked for loops.
_PoolKey = tuple[str, int, TLSPolicy, str, str | None]


@dataclass
class _Idle:
    session: Session
    timer: asyncio.TimerHandle | None = None


@dataclass
class _Group:
    """Recipients that share a set of next hops, and the hops in trying order."""

    hops: list[Hop]
    security: DomainSecurity
    recipients: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _HopError:
    """Why one address of one hop could not be used."""

    outcome: Outcome
    host: str
    address: str
    port: int
    tls_policy: str = ""


@dataclass
class _Result:
    """Where a group's attempt ended up, for the Attempt records."""

    outcomes: dict[str, Outcome]
    host: str = ""
    address: str = ""
    port: int = 0
    tls: str | None = None
    tls_policy: str = ""
    tls_verified: bool = False


def domain_of(address: str) -> str:
    return address.rpartition("@")[2].lower().rstrip(".")


class DeliveryAgent:
    """Delivers messages; one instance per daemon, shared by all deliveries."""

    def __init__(
        self,
        config: Config,
        resolver: Resolver,
        *,
        tls_context_factory: TLSContextFactory | None = None,
        idle_timeout: float = 5.0,
        max_idle: int = 32,
        max_messages_per_session: int = 100,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._config = config
        self._nexthops = NextHops(config, resolver)
        self._security = SecurityLookup(config, resolver)
        self._tls_context = tls_context_factory or default_tls_context
        self._idle_timeout = idle_timeout
        self._max_idle = max_idle
        self._max_messages = max_messages_per_session
        self._clock = clock
        self._idle: dict[_PoolKey, list[_Idle]] = {}
        retry = config.delivery.retry
        self._dead = DeadHops(hold=min(MAX_HOLD, retry[0] if retry else MAX_HOLD), clock=clock)
        self._closing: set[asyncio.Task[None]] = set()

    # -- public --------------------------------------------------------------

    async def deliver(
        self, envelope: Envelope, data: bytes, recipients: list[str]
    ) -> list[Attempt]:
        """Try ``recipients`` of ``envelope`` once; one Attempt per group and outcome."""
        started, t0 = self._clock(), time.monotonic()
        attempts: list[Attempt] = []
        groups, failed = await self._plan(recipients)
        for outcome, rcpts in failed:
            attempts += _attempts(rcpts, _Result(dict.fromkeys(rcpts, outcome)), started, t0)
        results = await _each(
            [self._deliver_group(envelope, data, g) for g in groups]
        )  # _deliver_group turns every local failure into a deferral, never raises
        for group, result in zip(groups, results, strict=True):
            attempts += _attempts(group.recipients, result, started, t0)
        return attempts

    def revive_hops(self) -> None:
        """End every suspension (``relayctl queue flush``: the operator says try now)."""
        self._dead.clear()

    async def close(self) -> None:
        """Close every idle session (QUIT, briefly awaited)."""
        idle = [entry for entries in self._idle.values() for entry in entries]
        self._idle.clear()
        for entry in idle:
            if entry.timer is not None:
                entry.timer.cancel()
        await asyncio.gather(*(entry.session.quit() for entry in idle), *self._closing)

    # -- planning ------------------------------------------------------------

    async def _plan(
        self, recipients: list[str]
    ) -> tuple[list[_Group], list[tuple[Outcome, list[str]]]]:
        """Group recipients by next-hop set; and those that have no next hop."""
        by_domain: dict[str, list[str]] = {}
        failed: list[tuple[Outcome, list[str]]] = []
        bad = [r for r in recipients if "@" not in r or not domain_of(r)]
        if bad:
            failed.append((Outcome.perm("5.1.3", "bad recipient address syntax"), bad))
        for rcpt in dict.fromkeys(recipients):
            if rcpt not in bad:
                by_domain.setdefault(domain_of(rcpt), []).append(rcpt)
        domains = list(by_domain)
        resolutions = await _each([self._nexthops.resolve(d) for d in domains])
        usable = [r for r in resolutions if r.failure is None and r.hops]
        securities = await _each([self._security.for_domain(r.domain, r.hops) for r in usable])
        security_of = {r.domain: s for r, s in zip(usable, securities, strict=True)}
        groups: dict[tuple[object, ...], _Group] = {}
        for domain, res in zip(domains, resolutions, strict=True):
            if res.failure is not None or not res.hops:
                failed.append((_no_hops(res), by_domain[domain]))
                continue
            security = security_of[res.domain]
            key = (frozenset((h.host, h.port, h.route) for h in res.hops), security.key())
            group = groups.setdefault(key, _Group(res.hops, security))
            group.recipients += by_domain[domain]
        return list(groups.values()), failed

    # -- one group -------------------------------------------------------------

    async def _deliver_group(self, envelope: Envelope, data: bytes, group: _Group) -> _Result:
        errors: list[_HopError] = []
        for hop in group.hops:
            try:
                result = await self._try_hop(envelope, data, group, hop, errors)
            except DeliveryError as e:  # a local problem with this hop's settings
                return _Result(dict.fromkeys(group.recipients, e.outcome), hop.host, "", hop.port)
            except Exception as e:
                # Any other local failure (a ca_file gone missing, ...) defers this
                # group only; the other groups' results must still be recorded, or
                # recipients already delivered would be sent again.
                outcome = Outcome.temp("4.3.0", f"local error: {e}")
                return _Result(dict.fromkeys(group.recipients, outcome), hop.host, "", hop.port)
            if result is not None:
                return result
        return _give_up(group.recipients, errors)

    async def _try_hop(
        self,
        envelope: Envelope,
        data: bytes,
        group: _Group,
        hop: Hop,
        errors: list[_HopError],
    ) -> _Result | None:
        """Deliver through ``hop``; None (with ``errors`` added to) if it could not be had."""
        rcpts = group.recipients
        credentials = load_credentials(hop.route)
        base = tls_policy(self._config.delivery, hop.route)
        policy = hop_policy(base, group.security, hop, self._config.delivery.ca_file)
        if isinstance(policy, Outcome):  # DANE or MTA-STS rules this hop out
            name = "dane" if group.security.dane else "mta-sts"
            errors.append(_HopError(policy, hop.host, "", hop.port, name))
            return None
        if credentials is not None and policy.mode == "none":
            text = f"route to {hop.host} has credentials but tls = none: AUTH is only sent over TLS"
            raise DeliveryError(Outcome.temp("4.7.4", text))
        user = credentials and credentials[0]
        key: _PoolKey = (hop.host.lower(), hop.port, policy, policy.name, user)
        session = await self._reuse(key)
        if session is None and (dead := self._dead.reason(hop.host, hop.port)) is not None:
            outcome = Outcome.temp("4.4.1", f"delivery temporarily suspended: {dead}")
            errors.append(_HopError(outcome, hop.host, "", hop.port, policy.name))
            return None
        addresses = [] if session is not None else hop.addresses
        refused: list[str] = []
        for address in addresses:
            try:
                session = await open_session(self._endpoint(hop, address, policy, credentials))
                break
            except LoopsBack as e:
                # Mail for these domains would come back here: fail it now, once,
                # rather than let it bounce between us and ourselves until the hop
                # count runs out. No other MX is tried (Postfix does the same).
                loop = e.outcome
                outcomes = {
                    r: replace(loop, reply=f"mail for {domain_of(r)} loops back to myself")
                    for r in rcpts
                }
                return _Result(outcomes, hop.host, address, hop.port, None, policy.name)
            except SessionError as e:
                errors.append(_HopError(e.outcome, hop.host, address, hop.port, policy.name))
                if isinstance(e, ConnectFailed):
                    refused.append(e.outcome.reply)
        if session is None:
            if addresses and len(refused) == len(addresses):
                self._dead.failed(hop.host, hop.port, refused[-1])
            return None
        self._dead.alive(hop.host, hop.port)
        tls = session.tls_version  # as negotiated, even if the connection dies mid-message
        verified = session.verified
        self._log_testing(envelope, group.security, hop, session)
        try:
            outcomes = await session.send(
                envelope.sender,
                rcpts,
                data,
                smtputf8=envelope.smtputf8,
                body_8bit=envelope.body_8bit,
            )
        except BaseException:  # cancelled mid-message: the session is in no known state
            session.abort()
            raise
        result = _Result(outcomes, hop.host, session.address, hop.port, tls, policy.name, verified)
        self._release(key, session)
        return result

    def _log_testing(
        self, envelope: Envelope, security: DomainSecurity, hop: Hop, session: Session
    ) -> None:
        """MTA-STS testing mode: say what enforce would have refused, deliver all the same."""
        notes = list(session.notes)
        mismatch = testing_mismatch(security, hop)
        if mismatch is not None:
            notes.insert(0, mismatch)
        session.notes.clear()
        if not notes:
            return
        log.event(
            "smtp",
            f"warning: MTA-STS policy of {security.domain} (mode testing) would refuse "
            f"delivery to {session.endpoint.where}: {'; '.join(notes)}",
            queue_id=envelope.queue_id,
            level=logging.WARNING,
        )

    def _endpoint(
        self, hop: Hop, address: str, policy: TLSPolicy, credentials: tuple[str, str] | None
    ) -> Endpoint:
        delivery = self._config.delivery
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
            connect_timeout=delivery.connect_timeout,
            command_timeout=delivery.command_timeout,
            myself=None if hop.route is not None else self._config.hostname,
        )

    # -- the idle pool ---------------------------------------------------------

    async def _reuse(self, key: _PoolKey) -> Session | None:
        """An idle session for ``key`` that still answers RSET, if there is one."""
        while self._idle.get(key):
            entry = self._idle[key].pop()
            if entry.timer is not None:
                entry.timer.cancel()
            if await entry.session.reset():
                return entry.session
            await entry.session.close()
        return None

    def _release(self, key: _PoolKey, session: Session) -> None:
        """Keep a healthy session for a while; close anything else."""
        if not session.usable or session.messages >= self._max_messages:
            self._close_later(session)
            return
        if sum(len(v) for v in self._idle.values()) >= self._max_idle:
            self._evict_oldest()
        entry = _Idle(session)
        loop = asyncio.get_running_loop()
        entry.timer = loop.call_later(self._idle_timeout, self._expire, key, entry)
        self._idle.setdefault(key, []).append(entry)

    def _expire(self, key: _PoolKey, entry: _Idle) -> None:
        entries = self._idle.get(key, [])
        if entry in entries:
            entries.remove(entry)
            self._close_later(entry.session)

    def _evict_oldest(self) -> None:
        oldest: tuple[_PoolKey, _Idle] | None = None
        for key, entries in self._idle.items():
            for entry in entries:
                if oldest is None or _deadline(entry) < _deadline(oldest[1]):
                    oldest = (key, entry)
        if oldest is not None:
            if oldest[1].timer is not None:
                oldest[1].timer.cancel()
            self._expire(*oldest)

    def _close_later(self, session: Session) -> None:
        task = asyncio.get_running_loop().create_task(session.quit())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)


def _deadline(entry: _Idle) -> float:
    return entry.timer.when() if entry.timer is not None else 0.0


def _no_hops(res: Resolution) -> Outcome:
    if res.failure is not None:
        return res.failure
    return Outcome.temp("4.4.4", f"no next hop for {res.domain}")


def _give_up(recipients: list[str], errors: list[_HopError]) -> _Result:
    """Every hop failed: report the last failure, deferred unless all were permanent.

    A 5xx greeting from every MX is a clear "no"; a mix of 5xx and refused
    connections is not, and mail must not bounce on a maybe.
    """
    if not errors:
        outcome = Outcome.temp("4.4.4", "no next hop had a usable address")
        return _Result(dict.fromkeys(recipients, outcome))
    last = errors[-1]
    outcome = last.outcome
    if not all(e.outcome.permanent for e in errors):
        outcome = outcome.softened()
    return _Result(
        dict.fromkeys(recipients, outcome),
        last.host,
        last.address,
        last.port,
        tls_policy=last.tls_policy,
    )


def _attempts(recipients: list[str], result: _Result, started: float, t0: float) -> list[Attempt]:
    """One Attempt per distinct outcome, recipients in their original order."""
    duration = round(time.monotonic() - t0, 3)
    by_outcome: dict[Outcome, list[str]] = {}
    for rcpt in recipients:
        by_outcome.setdefault(result.outcomes[rcpt], []).append(rcpt)
    return [
        Attempt(
            time=started,
            recipients=rcpts,
            host=result.host,
            address=result.address,
            port=result.port,
            tls=result.tls,
            reply=outcome.reply,
            dsn=outcome.enhanced,
            status=outcome.status,
            duration=duration,
            tls_policy=result.tls_policy,
            tls_verified=result.tls_verified,
        )
        for outcome, rcpts in by_outcome.items()
    ]


T = TypeVar("T")


async def _each(coros: list[Coroutine[Any, Any, T]]) -> list[T]:
    """``asyncio.gather`` of ``coros``; one (the usual case: one domain) is awaited as it is.

    gather wraps every coroutine in a task; for a single one that is a
    task, a callback and a future per message for nothing.
    """
    if len(coros) == 1:
        return [await coros[0]]
    return list(await asyncio.gather(*coros))
