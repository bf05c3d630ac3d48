"""Test harness that stands in for the Internet: DNS, remote MX hosts, certificates, ports.

Everything here listens on loopback only (127.0.0.0/8 and ::1), so tests never
touch the real network, and every server can be stopped from any thread with
its threads joined and sockets closed.

The servers run their own asyncio event loop in a background thread
(:class:`LoopThread`) rather than in the test's loop: a test that drives relayd
with ``asyncio`` and a test that calls ``smtplib`` from plain code can both use
them, and a server stuck in a deliberate "hang" cannot block the code under
test.

Modules:

- :mod:`.dnsserver` -- ``DNSServer``, an authoritative DNS server with faults.
- :mod:`.mxserver` -- ``MXServer`` and ``MXPool``, scriptable SMTP servers.
- :mod:`.certs` -- a session-wide trustme CA and PEM file helpers.
- :mod:`.ports` -- ``free_port``, one port free on several addresses at once.
- :mod:`.fixtures` -- pytest fixtures (``tls_ca``, ``dns_server``, ``mx_pool``).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from types import TracebackType
from typing import Any, Self, TypeVar

T = TypeVar("T")

__all__ = ["LoopThread", "ThreadedServer"]


class LoopThread:
    """An asyncio event loop running in a daemon thread, with a bounded, clean shutdown.

    Shared by the DNS and MX servers so that both stop the same way: the
    server closes its own sockets through :meth:`call`, then :meth:`stop`
    cancels whatever is left (for instance a connection deliberately left
    hanging), lets the cancellations run, and joins the thread.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()

    def start(self, timeout: float = 10.0) -> None:
        """Start the loop thread and wait until the loop is running."""
        if self._thread is not None:
            raise RuntimeError(f"{self.name}: already started")
        self._ready.clear()
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError(f"{self.name}: event loop did not start within {timeout}s")

    def _run(self) -> None:
        loop = self.loop
        assert loop is not None
        asyncio.set_event_loop(loop)
        loop.call_soon(self._ready.set)
        try:
            loop.run_forever()
        finally:
            # Whatever is still running (a hung session, a handler) is cancelled
            # and given a bounded time to unwind, so no thread or socket outlives stop().
            tasks = asyncio.all_tasks(loop)
            for task in tasks:
                task.cancel()
            if tasks:
                loop.run_until_complete(asyncio.wait(tasks, timeout=5.0))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 10.0) -> T:
        """Run ``coro`` on the loop from another thread and return its result."""
        if self.loop is None or not self.running:
            coro.close()
            raise RuntimeError(f"{self.name}: event loop is not running")
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout)
        except TimeoutError:
            future.cancel()
            raise

    @property
    def running(self) -> bool:
        """True while the loop thread is alive."""
        return self._thread is not None and self._thread.is_alive()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the loop, cancel leftover tasks and join the thread (idempotent)."""
        thread, loop = self._thread, self.loop
        if thread is None or loop is None:
            return
        if thread.is_alive():
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout)
            if thread.is_alive():
                raise TimeoutError(f"{self.name}: thread did not stop within {timeout}s")
        self._thread = None


class ThreadedServer:
    """What the DNS and MX servers share: stop() and the context manager.

    A subclass sets ``self._loop`` (a :class:`LoopThread`) and defines
    ``start()`` and ``async _close()`` (close its own sockets).
    """

    _loop: LoopThread

    def start(self) -> Self:
        raise NotImplementedError

    async def _close(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        """Close every socket and join the server thread (idempotent)."""
        if self._loop.running:
            try:
                self._loop.call(self._close())
            finally:
                self._loop.stop()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
