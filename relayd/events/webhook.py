"""Sending the outbox to the ``[[webhook]]`` receivers (SPEC §10).

One task in the daemon, apart from delivery: it claims due rows from the
outbox, POSTs each with httpx (at most ``CONCURRENCY`` at once, each within
``TIMEOUT`` seconds), deletes it on a 2xx answer and otherwise schedules
the next try after 10 s, 30 s, 1 min, 5 min, 15 min, then every hour,
until three days after the event; then it is dropped and logged. A
receiver that is down or slow holds up nothing but its own events: the
scheduler only ever writes rows to the outbox (a local SQLite commit).

Each request carries ``Relayd-Signature: t=UNIX,v1=HEX``, HEX being
HMAC-SHA256 over ``t.body`` keyed with the content of ``secret_file``
(white space around it stripped), so a receiver can check that the event
comes from this relayd and refuse old ones replayed. Without a
``secret_file`` the header is left out.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from relayd import __version__
from relayd.config import Config, Webhook
from relayd.events.outbox import Outbox, Pending
from relayd.events.store import POOL, outbox_for
from relayd.log import event
from relayd.metrics import Metrics

if TYPE_CHECKING:  # imported when the first webhook is configured (memory at rest)
    import httpx

RETRY = (10.0, 30.0, 60.0, 300.0, 900.0)
THEN_EVERY = 3600.0
GIVE_UP_AFTER = 3 * 86400.0
CONCURRENCY = 8
TIMEOUT = 10.0
BATCH = 64
POLL = 1.0  # acceptor processes write events too: look at the outbox this often
ERROR_PAUSE = 10.0  # after a failure of the outbox itself
SIGNATURE_HEADER = "Relayd-Signature"


def retry_after(attempts: int) -> float:
    """Seconds before the next try once ``attempts`` tries have failed."""
    return RETRY[attempts - 1] if 1 <= attempts <= len(RETRY) else THEN_EVERY


def signature(secret: bytes, body: bytes, timestamp: int) -> str:
    mac = hmac.new(secret, str(timestamp).encode("ascii") + b"." + body, hashlib.sha256)
    return f"t={timestamp},v1={mac.hexdigest()}"


def shown(url: str) -> str:
    """The URL for the log, without a query that may carry a token."""
    return url.split("?", 1)[0].split("#", 1)[0]


def read_secret(path: Path | None) -> bytes | None:
    if path is None:
        return None
    return path.read_bytes().strip()


class WebhookSender:
    """The daemon's sending task; ``config`` is read each round, so a reload applies."""

    def __init__(
        self,
        config: Callable[[], Config],
        metrics: Metrics | None = None,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._config = config
        self._metrics = metrics or Metrics()
        self._clock = clock
        self._wake = asyncio.Event()
        self._client: httpx.AsyncClient | None = None
        self._outbox: Outbox | None = None
        self._backlog = 0

    @property
    def backlog(self) -> int:
        return self._backlog

    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        while not self._config().webhooks:
            await asyncio.sleep(POLL)  # until a reload adds one
        self._outbox = outbox_for(self._config().spool.path)
        self._metrics.webhook_backlog = lambda: self._backlog
        await POOL.run(self._outbox.release_claims, self._clock())
        import httpx

        limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
        self._client = httpx.AsyncClient(
            timeout=TIMEOUT,
            limits=limits,
            follow_redirects=False,
            headers={"User-Agent": f"relayd/{__version__}"},
        )
        try:
            while True:
                try:
                    await self._round()
                except Exception as exc:  # the outbox or the client failed: not the end
                    event(
                        "webhook", f"warning: sending events failed: {exc!r}", level=logging.ERROR
                    )
                    await asyncio.sleep(ERROR_PAUSE)
        finally:
            await self._client.aclose()

    async def _round(self) -> None:
        outbox = self._outbox
        assert outbox is not None
        try:
            rows = await POOL.run(outbox.claim, self._clock(), BATCH)
            self._backlog = await POOL.run(outbox.count)
        except Exception as exc:
            event("webhook", f"warning: event outbox unusable: {exc}", level=logging.ERROR)
            await asyncio.sleep(ERROR_PAUSE)
            return
        if rows:
            hooks = {hook.url: hook for hook in self._config().webhooks}
            sem = asyncio.Semaphore(CONCURRENCY)
            await asyncio.gather(
                *(self._send(outbox, row, hooks.get(row.url), sem) for row in rows)
            )
            return
        self._wake.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), POLL)

    async def _send(
        self, outbox: Outbox, row: Pending, hook: Webhook | None, sem: asyncio.Semaphore
    ) -> None:
        if hook is None:
            await self._give_up(outbox, row, "no [[webhook]] with this url any more")
            return
        async with sem:
            problem = await self._post(hook, row.body)
        if problem is None:
            self._metrics.webhook_sent.inc(row.event)
            await POOL.run(outbox.done, row.id)
            return
        self._metrics.webhook_failed.inc(row.event)
        attempts = row.attempts + 1
        next_try = self._clock() + retry_after(attempts)
        if next_try > row.created + GIVE_UP_AFTER:
            await self._give_up(outbox, row, problem)
            return
        event(
            "webhook",
            f"{shown(hook.url)}: {row.event} event not taken ({problem}); try {attempts + 1} "
            f"in {retry_after(attempts):.0f}s",
            level=logging.WARNING,
        )
        await POOL.run(outbox.retry, row.id, next_try, problem)

    async def _post(self, hook: Webhook, body: bytes) -> str | None:
        """None when the receiver took the event (2xx), else why not."""
        assert self._client is not None
        import httpx  # loaded by run() already

        headers = {"Content-Type": "application/json"}
        try:
            secret = read_secret(hook.secret_file)
        except OSError as exc:
            return f"cannot read secret_file: {exc.strerror or exc}"
        if secret is not None:
            headers[SIGNATURE_HEADER] = signature(secret, body, int(self._clock()))
        try:
            # Streamed and never read: only the status matters, so a receiver that
            # answers with a huge body costs relayd nothing.
            async with self._client.stream(
                "POST", hook.url, content=body, headers=headers
            ) as response:
                status = response.status_code
        except httpx.HTTPError as exc:
            return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        if 200 <= status < 300:
            return None
        return f"HTTP {status}"

    async def _give_up(self, outbox: Outbox, row: Pending, problem: str) -> None:
        self._metrics.webhook_dropped.inc("expired")
        event(
            "webhook",
            f"warning: {shown(row.url)}: {row.event} event dropped after {row.attempts + 1} tries "
            f"({problem})",
            level=logging.WARNING,
        )
        await POOL.run(outbox.done, row.id)
