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
from typing import cast

from relayd import log
from relayd.policy.verdict import Refuse
from relayd.smtpd.services import Services
from relayd.smtpd.session import HANDSHAKE_TIMEOUT, Session
from relayd.smtpd.tlslayer import TLSLayer


class Gate(asyncio.Protocol):
    """The first protocol of every accepted connection; hands it to a Session."""

    def __init__(
        self,
        services: Services,
        make_session: Callable[[], Session],
        tls: ssl.SSLContext | None,
        handshake_timeout: int = HANDSHAKE_TIMEOUT,
    ) -> None:
        self.services = services
        self.make_session = make_session
        self.tls = tls
        self.handshake_timeout = handshake_timeout
        self.ip = ""
        self._counted = False  # this gate still owns a slot (until a Session takes it)
        self._handed_over = False
        self._task: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Not isinstance(transport, asyncio.Transport): uvloop's transports do
        # not subclass asyncio's, and every connection would fail here.
        transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername") or ("", 0)
        self.ip = str(peer[0])
        refusal = self.services.connections.acquire(self.ip)
        self._counted = refusal is None
        if self.tls is None:  # clear text: the session speaks from here on, 421 included
            self._hand_over(transport, refusal)
            return
        if refusal is not None:
            self.services.metrics.refused(refusal.reply())
            transport.abort()
            return
        self._start_tls(transport, self.tls)

    def _hand_over(self, transport: asyncio.BaseTransport, refusal: Refuse | None) -> None:
        """The Session takes the connection and its slot (or says 421 for a refused one)."""
        session = self.make_session()
        session.admit(refusal)
        self._counted = False
        self._handed_over = True
        transport.set_protocol(session)
        session.connection_made(transport)

    def _start_tls(self, transport: asyncio.Transport, context: ssl.SSLContext) -> None:
        """Put the TLS layer on the connection; the Session is made once the handshake is done.

        What loop.start_tls does, with TLSLayer, and with _Handshaken as the
        application protocol meanwhile: it hands over from inside the TLS
        layer, before any application data is delivered. Done here, within
        connection_made, so not a byte is read before the layer is in place.
        """
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        layer = TLSLayer(
            loop,
            _Handshaken(self),
            context,
            waiter,
            server_side=True,
            ssl_handshake_timeout=self.handshake_timeout,
        )
        transport.set_protocol(layer)
        layer.connection_made(transport)
        self._task = loop.create_task(self._await_handshake(transport, waiter))

    async def _await_handshake(
        self, transport: asyncio.Transport, waiter: asyncio.Future[None]
    ) -> None:
        try:
            # wait_for is a second bound in case the TLS layer's own timer never fires.
            await asyncio.wait_for(waiter, self.handshake_timeout + 1)
        except Exception as exc:  # whatever went wrong, the slot must come back
            self._fail(transport, _why(exc))
            return
        if not self._handed_over:  # the client left during the handshake
            self._fail(transport, "client closed the connection")

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


class _Handshaken(asyncio.Protocol):
    """Stands in for the Session until the TLS handshake is done, then hands over."""

    def __init__(self, gate: Gate) -> None:
        self.gate = gate

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.gate._hand_over(transport, None)


def _why(exc: Exception) -> str:
    """A short reason for the log line: the timeout, or what the TLS layer said."""
    if isinstance(exc, TimeoutError | ConnectionAbortedError):
        return "timeout"
    return f"{type(exc).__name__}: {exc}"[:200]


__all__ = ["Gate"]
