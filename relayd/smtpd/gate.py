"""Between the TCP accept and the SMTP session: the connection slot and implicit TLS.

Every accepted connection is counted against ``max_connections`` and
``max_connections_per_ip`` at once, before a byte is read. Were TLS left
to asyncio's server (``create_server(ssl=...)``), the session -- and the
count -- would only start after the handshake, and any number of clients
that connect to port 465 and say nothing would hold sockets and memory
uncounted. So implicit-TLS listeners accept in clear and the gate runs the
handshake itself, with HANDSHAKE_TIMEOUT: a silent client is cut after it
and its slot released.

A connection over the limits is refused here: on a clear-text listener the
session says ``421 4.7.0`` and closes; on an implicit-TLS listener no clear
text reply is possible, so the socket is simply closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Callable

from relayd import log
from relayd.smtpd.services import Services
from relayd.smtpd.session import HANDSHAKE_TIMEOUT, Session


class Gate(asyncio.Protocol):
    """The first protocol of every accepted connection; hands it to a Session."""

    def __init__(
        self,
        services: Services,
        make_session: Callable[[], Session],
        tls: ssl.SSLContext | None,
        handshake_timeout: float = HANDSHAKE_TIMEOUT,
    ) -> None:
        self.services = services
        self.make_session = make_session
        self.tls = tls
        self.handshake_timeout = handshake_timeout
        self.ip = ""
        self._counted = False  # this gate still owns a slot (until a Session takes it)
        self._task: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        peer = transport.get_extra_info("peername") or ("", 0)
        self.ip = str(peer[0])
        refusal = self.services.connections.acquire(self.ip)
        self._counted = refusal is None
        if self.tls is None:  # clear text: the session speaks from here on, 421 included
            session = self.make_session()
            session.admit(refusal)
            self._counted = False
            transport.set_protocol(session)
            session.connection_made(transport)
            return
        if refusal is not None:
            self.services.metrics.refused(refusal.reply())
            transport.abort()
            return
        transport.pause_reading()  # nothing is read before the TLS layer is in place
        self._task = asyncio.get_running_loop().create_task(self._handshake(transport))

    async def _handshake(self, transport: asyncio.Transport) -> None:
        session = self.make_session()
        loop = asyncio.get_running_loop()
        try:
            # wait_for is a second bound in case the TLS layer's own timer never fires.
            tls_transport = await asyncio.wait_for(
                loop.start_tls(
                    transport,
                    session,
                    self.tls,  # type: ignore[arg-type]
                    server_side=True,
                    ssl_handshake_timeout=self.handshake_timeout,
                ),
                self.handshake_timeout + 1,
            )
        except Exception as exc:  # whatever went wrong, the slot must come back
            self._fail(transport, _why(exc))
            return
        if tls_transport is None:
            self._fail(transport, "client closed the connection")
            return
        session.admit(None)
        self._counted = False
        session.connection_made(tls_transport)

    def _fail(self, transport: asyncio.Transport, why: str) -> None:
        with contextlib.suppress(Exception):
            transport.abort()
        self._release()
        log.event(
            "smtps/smtpd",
            f"lost connection during TLS handshake from unknown[{self.ip}]: {why}",
            client_ip=self.ip,
        )

    def _release(self) -> None:
        if self._counted:
            self._counted = False
            self.services.connections.release(self.ip)

    def connection_lost(self, exc: Exception | None) -> None:
        """Only reached if the client left before the TLS layer took the connection."""
        if self._task is not None and not self._task.done():
            self._task.cancel()
        self._release()

    def data_received(self, data: bytes) -> None:  # pragma: no cover - reading is paused
        """Nothing is read here; the TLS layer or the session takes the transport first."""


def _why(exc: Exception) -> str:
    """A short reason for the log line: the timeout, or what the TLS layer said."""
    if isinstance(exc, TimeoutError | ConnectionAbortedError):
        return "timeout"
    return f"{type(exc).__name__}: {exc}"[:200]


__all__ = ["Gate"]
