"""Which transport carries each recipient: a local one (LMTP, Maildir) or SMTP.

A ``[[route]]`` whose ``via`` is ``lmtp:...`` or ``maildir:...`` takes its
domain's recipients out of the SMTP path; the rest go to the SMTP agent as
before. The scheduler sees one agent and gets one Attempt list back, so
retries, bounces and logs are the same whatever the transport.
"""

from __future__ import annotations

import asyncio
import time

from relayd.config import Config, Route
from relayd.delivery import lmtp, maildir
from relayd.delivery.agent import DeliveryAgent, domain_of
from relayd.delivery.nexthop import match_route
from relayd.delivery.reply import Outcome
from relayd.spool.model import Attempt, Envelope


class Router:
    """The daemon's delivery agent: local routes here, everything else over SMTP."""

    def __init__(self, config: Config, smtp: DeliveryAgent) -> None:
        self._config = config
        self.smtp = smtp

    async def deliver(
        self, envelope: Envelope, data: bytes, recipients: list[str]
    ) -> list[Attempt]:
        local: dict[Route, list[str]] = {}
        remote: list[str] = []
        for rcpt in recipients:
            route = match_route(self._config.routes, domain_of(rcpt))
            if route is not None and route.transport != "smtp":
                local.setdefault(route, []).append(rcpt)
            else:
                remote.append(rcpt)
        if not local:  # the usual case: no tasks to gather
            return await self.smtp.deliver(envelope, data, remote) if remote else []
        jobs = [self._local(route, envelope, data, rcpts) for route, rcpts in local.items()]
        if remote:
            jobs.append(self.smtp.deliver(envelope, data, remote))
        results = await asyncio.gather(*jobs)
        return [attempt for attempts in results for attempt in attempts]

    def revive_hops(self) -> None:
        self.smtp.revive_hops()

    async def close(self) -> None:
        await self.smtp.close()

    async def _local(
        self, route: Route, envelope: Envelope, data: bytes, recipients: list[str]
    ) -> list[Attempt]:
        started, t0 = time.time(), time.monotonic()
        if route.transport == "maildir":
            assert route.path is not None
            outcome = await maildir.deliver(
                route.path, envelope.queue_id, envelope.sender, recipients, data
            )
            outcomes = dict.fromkeys(recipients, outcome)
            host = "maildir"
        else:
            target = lmtp.Target(
                address=route.via if route.path is None else None, socket=route.path
            )
            delivery = self._config.delivery
            outcomes = await lmtp.deliver(
                target,
                self._config.hostname,
                envelope.sender,
                recipients,
                data,
                connect_timeout=delivery.connect_timeout,
                command_timeout=delivery.command_timeout,
            )
            host = f"lmtp:{target}"
        duration = time.monotonic() - t0
        return _attempts(outcomes, started, host, str(route.path or route.via), duration)


def _attempts(
    outcomes: dict[str, Outcome], started: float, host: str, address: str, duration: float
) -> list[Attempt]:
    """One Attempt per distinct outcome, as the SMTP agent reports them."""
    grouped: dict[Outcome, list[str]] = {}
    for rcpt, outcome in outcomes.items():
        grouped.setdefault(outcome, []).append(rcpt)
    return [
        Attempt(
            time=started,
            recipients=rcpts,
            host=host,
            address=address,
            port=0,
            tls=None,
            reply=outcome.reply,
            dsn=outcome.enhanced,
            status=outcome.status,
            duration=duration,
        )
        for outcome, rcpts in grouped.items()
    ]
