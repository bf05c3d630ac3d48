"""The connection to Redis, with a breaker: a failure means "count locally for a while".

The maintained ``redis`` client (redis-py). Calls are synchronous and short
(one Lua script on loopback or a LAN): rate limits are checked on the event
loop, wrong passwords in the AUTH worker thread. A socket timeout of
``TIMEOUT`` bounds how long a dead or slow store can hold either; after a
failure the store is skipped for ``RETRY_AFTER`` seconds.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar
from urllib.parse import urlsplit

import redis
import redis.asyncio

from relayd.log import event

TIMEOUT = 0.25  # seconds for connect and for each reply
RETRY_AFTER = 30.0  # seconds of local counting after a failure
LOG_EVERY = 60.0  # at most one "unreachable" line per this many seconds

T = TypeVar("T")


class Store:
    """One Redis URL; ``call`` runs a function on the client or says it cannot."""

    def __init__(self, url: str, clock: Callable[[], float] = time.monotonic) -> None:
        self.url = url
        self.shown = _shown(url)
        self.clock = clock
        self.client: redis.Redis = redis.Redis.from_url(
            url, socket_timeout=TIMEOUT, socket_connect_timeout=TIMEOUT, health_check_interval=30
        )
        # The asyncio client, for checks made on the event loop (rate limits).
        self.aclient: redis.asyncio.Redis = redis.asyncio.Redis.from_url(
            url, socket_timeout=TIMEOUT, socket_connect_timeout=TIMEOUT, health_check_interval=30
        )
        self._down_until = 0.0
        self._logged = -LOG_EVERY
        self._lock = threading.Lock()
        self._scripts: dict[str, Any] = {}

    def script(self, source: str, asynchronous: bool = False) -> Any:
        with self._lock:
            key = f"{asynchronous}:{source}"
            if key not in self._scripts:
                client = self.aclient if asynchronous else self.client
                self._scripts[key] = client.register_script(source)
            return self._scripts[key]

    def call(self, what: str, func: Callable[[redis.Redis], T]) -> T | None:
        """``func(client)``, or None when the store is down (then count locally)."""
        now = self.clock()
        if now < self._down_until:
            return None
        try:
            return func(self.client)
        except (redis.RedisError, OSError) as exc:
            self._failed(now, what, exc)
            return None

    async def acall(
        self, what: str, func: Callable[[redis.asyncio.Redis], Awaitable[T]]
    ) -> T | None:
        """``await func(aclient)``, or None when the store is down (then count locally)."""
        now = self.clock()
        if now < self._down_until:
            return None
        try:
            return await asyncio.wait_for(func(self.aclient), TIMEOUT * 2)
        except (redis.RedisError, OSError, TimeoutError) as exc:
            self._failed(now, what, exc)
            return None

    def _failed(self, now: float, what: str, exc: BaseException) -> None:
        self._down_until = now + RETRY_AFTER
        if now - self._logged >= LOG_EVERY:
            self._logged = now
            event(
                "master",
                f"warning: cluster store {self.shown} unreachable ({type(exc).__name__}: "
                f"{str(exc)[:120]}); {what} counted on this node only for now",
                level=logging.WARNING,
            )


def _shown(url: str) -> str:
    """The URL for the log, without a password."""
    parts = urlsplit(url)
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{parts.hostname or ''}{port}{parts.path}"
