"""Delivery events for applications, and the suppression list they feed (SPEC §10).

Events are produced where outcomes happen: an accepted message gives one
``queued`` event per recipient (the session's spool commit, in whichever
process took it), the scheduler's settled attempts give ``delivered``,
``deferred`` and ``bounced``, a delay notice gives ``delayed``, and a
hard bounce (5.1.x, or expiry after ``max_age``) suppresses the address
and gives ``suppressed``. Each is one JSON object::

    {"event", "id", "timestamp", "recipient", "sender", "message_id",
     "dsn", "reply", "next_attempt"}

``id`` is the queue id, ``timestamp`` and ``next_attempt`` Unix seconds
(``next_attempt`` only for ``deferred`` and ``delayed``, else null),
``message_id`` the stored ``Message-ID:`` (null when there is none).

Every event goes to the outbox (relayd.events.outbox) before the queue
state it reports is written, and is sent from there by
relayd.events.webhook. Our own notices (bounces, delay warnings) produce
no delivery events; a hard bounce of one still suppresses its recipient.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from relayd.config import Config
from relayd.events.store import POOL, outbox_for
from relayd.log import event
from relayd.metrics import Metrics
from relayd.spool.model import Envelope, Recipient
from relayd.suppression import Suppression, is_hard_bounce

WRITE_TIMEOUT = 30.0

_KIND = {"sent": "delivered", "deferred": "deferred", "failed": "bounced"}

Enqueue = Callable[[Envelope, bytes, Any], Awaitable[None]]


def message_id_of(message: bytes) -> str | None:
    """The Message-ID of a stored message (its header block only), or None."""
    from relayd.smtpd.content import split_header
    from relayd.smtpd.headers import message_id

    found = message_id(split_header(message, limit=1 << 20))
    return None if found == "<>" else found


def event_body(
    kind: str,
    queue_id: str,
    recipient: str,
    sender: str,
    message_id: str | None,
    dsn: str,
    reply: str,
    next_attempt: float | None,
    now: float,
) -> bytes:
    body = {
        "event": kind,
        "id": queue_id,
        "timestamp": int(now),
        "recipient": recipient,
        "sender": sender,
        "message_id": message_id,
        "dsn": dsn,
        "reply": reply,
        "next_attempt": int(next_attempt) if next_attempt is not None else None,
    }
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


class Outcomes:
    """The application side of relayd's outcomes: events to the outbox, hard bounces suppressed.

    ``config`` is read at each call, so a reload applies at once. Nothing
    here ever fails a delivery or an accept: a problem is logged.
    """

    def __init__(
        self,
        config: Callable[[], Config],
        metrics: Metrics | None = None,
        *,
        written: Callable[[], None] = lambda: None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._config = config
        self._metrics = metrics or Metrics()
        self._written = written
        self._clock = clock
        self._suppression: Suppression | None = None

    # ---- suppression -------------------------------------------------------------

    @property
    def suppression(self) -> Suppression:
        config = self._config()
        if self._suppression is None or self._suppression.path.parent != config.spool.path:
            self._suppression = Suppression(config.spool.path, config.suppression)
        self._suppression.config = config.suppression
        return self._suppression

    async def refusal(self, address: str) -> str | None:
        """The RCPT reply for a suppressed address (submission and API mail), or None."""
        if not self._config().suppression.enabled:
            return None
        return await self.suppression.refusal(address)

    # ---- events ----------------------------------------------------------------------

    def wrap_enqueue(self, enqueue: Enqueue) -> Enqueue:
        """The session's enqueue, then its ``queued`` events."""

        async def enqueue_and_tell(envelope: Envelope, message: bytes, tail: Any) -> None:
            await enqueue(envelope, message, tail)
            await self.queued(envelope, message)

        return enqueue_and_tell

    async def queued(self, envelope: Envelope, message: bytes) -> None:
        if envelope.is_bounce or not self._wanted("queued"):
            return
        now = self._clock()
        msgid = message_id_of(message)
        reply = f"250 2.0.0 Ok: queued as {envelope.queue_id}"
        bodies = [
            ("queued", event_body("queued", envelope.queue_id, r.address, envelope.sender,
                                  msgid, "2.0.0", reply, None, now))
            for r in envelope.recipients
        ]  # fmt: skip
        await self._store(bodies, envelope.queue_id)

    def wants(self, env: Envelope, expired: list[Recipient], delayed: list[Recipient]) -> bool:
        """Whether ``settled`` has anything to do: the scheduler skips it otherwise.

        Without webhooks only a failed recipient (a candidate for the
        suppression list) matters; a message delivered at once costs nothing.
        """
        config = self._config()
        if config.webhooks:
            return True
        if not config.suppression.enabled:
            return False
        return bool(expired) or any(r.status == "failed" for r in env.recipients)

    async def settled(
        self,
        env: Envelope,
        attempted: list[str],
        expired: list[Recipient],
        delayed: list[Recipient],
        data: bytes,
    ) -> None:
        """After an attempt's outcome is applied, before its state is written."""
        config = self._config()
        if not config.webhooks and not config.suppression.enabled:
            return
        now = self._clock()
        tried = set(attempted)
        lapsed = {id(r) for r in expired}
        wanted = {kind for hook in config.webhooks for kind in hook.events}
        msgid = message_id_of(data) if data and wanted else None
        own = env.is_bounce
        bodies: list[tuple[str, bytes]] = []

        def add(kind: str, rcpt: Recipient, next_attempt: float | None = None) -> None:
            if kind not in wanted:  # no receiver asked: no JSON on every delivery
                return
            body = event_body(kind, env.queue_id, rcpt.address, env.sender, msgid,
                              rcpt.dsn, rcpt.reply, next_attempt, now)  # fmt: skip
            bodies.append((kind, body))

        for rcpt in env.recipients:
            if rcpt.address not in tried and id(rcpt) not in lapsed:
                continue
            kind = _KIND.get(rcpt.status)
            if kind is None:
                continue
            if not own:
                add(kind, rcpt, env.next_attempt if kind == "deferred" else None)
            hard = rcpt.status == "failed" and is_hard_bounce(rcpt.dsn, id(rcpt) in lapsed)
            if hard and await self._suppress(rcpt, env.queue_id):
                add("suppressed", rcpt)
        if not own:
            for rcpt in delayed:
                add("delayed", rcpt, env.next_attempt)
        await self._store(bodies, env.queue_id)

    async def _suppress(self, rcpt: Recipient, queue_id: str) -> bool:
        if not self._config().suppression.enabled:
            return False
        suppression = self.suppression
        try:
            new = await asyncio.wait_for(
                suppression.add(rcpt.address, dsn=rcpt.dsn, reply=rcpt.reply, queue_id=queue_id),
                WRITE_TIMEOUT,
            )
        except TimeoutError:
            return False
        if new:
            expire = self._config().suppression.expire
            event(
                "suppression",
                f"<{rcpt.address}> suppressed for {expire / 86400:g}d after dsn={rcpt.dsn}",
                queue_id=queue_id,
                recipient=rcpt.address,
                dsn=rcpt.dsn,
            )
        return new

    def _wanted(self, kind: str) -> bool:
        return any(kind in hook.events for hook in self._config().webhooks)

    async def _store(self, bodies: list[tuple[str, bytes]], queue_id: str) -> None:
        hooks = self._config().webhooks
        rows = [(h.url, kind, body) for kind, body in bodies for h in hooks if kind in h.events]
        if not rows:
            return
        spool: Path = self._config().spool.path
        try:
            outbox = outbox_for(spool)
            dropped = await asyncio.wait_for(
                POOL.run(outbox.put, rows, self._clock()), WRITE_TIMEOUT
            )
        except Exception as exc:
            self._metrics.webhook_dropped.inc("unwritable", amount=len(rows))
            event(
                "webhook",
                f"warning: {len(rows)} event(s) not written to the outbox: {exc}",
                queue_id=queue_id,
                level=logging.ERROR,
            )
            return
        if dropped:
            self._metrics.webhook_dropped.inc("full", amount=dropped)
            event(
                "webhook",
                f"warning: event outbox full: dropped the {dropped} oldest event(s)",
                level=logging.WARNING,
            )
        self._written()
