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

On a listener with ``proxy_protocol = true`` the gate first reads the PROXY
header (relayd.smtpd.proxy), only from ``[server] proxy_from`` and within
HEADER_TIMEOUT; the client it names is then counted, greeted and logged.
Bytes that came behind the header (a TLS ClientHello, an early talker) are
handed on to whichever protocol comes next.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import ssl
from collections.abc import Callable
from typing import cast

from relayd import log
from relayd.policy.verdict import Refuse
from relayd.smtpd import proxy
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
        proxy_protocol: bool = False,
    ) -> None:
        self.services = services
        self.make_session = make_session
        self.tls = tls
        self.handshake_timeout = handshake_timeout
        self.proxy_protocol = proxy_protocol
        self.ip = ""
        self.peer: tuple[str, int] | None = None  # the client a PROXY header named
        self._early = b""  # bytes that came behind the PROXY header
        self._counted = False  # this gate still owns a slot (until a Session takes it)
        self._handed_over = False
        self._task: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Not isinstance(transport, asyncio.Transport): uvloop's transports do
        # not subclass asyncio's, and every connection would fail here.
        transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername") or ("", 0)
        self.ip = str(peer[0])
        if self.proxy_protocol:
            if not _trusted(self.ip, self.services.config.server.proxy_from):
                self._proxy_failed(transport, "not in [server] proxy_from")
                return
            reader = _ProxyReader(self, transport)
            transport.set_protocol(reader)
            return
        self._admit(transport)

    def proxied(self, transport: asyncio.Transport, header: proxy.ProxyHeader, rest: bytes) -> None:
        """The PROXY header is in: go on as if the client it names had connected."""
        if header.client is not None:
            self.ip, self.peer = header.client[0], header.client
        self._early = rest
        self._admit(transport)

    def _proxy_failed(self, transport: asyncio.Transport, why: str) -> None:
        with contextlib.suppress(Exception):
            transport.abort()
        log.event(
            "smtpd",
            f"warning: PROXY protocol from unknown[{self.ip}]: {why}; connection closed",
            client_ip=self.ip,
        )

    def _admit(self, transport: asyncio.Transport) -> None:
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
        session.peer = self.peer
        self._counted = False
        self._handed_over = True
        transport.set_protocol(session)
        session.connection_made(transport)
        if self._early and self.tls is None:
            early, self._early = self._early, b""
            session.data_received(early)

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
        layer.on_lost = self._release  # a no-op once a Session has the slot
        transport.set_protocol(layer)
        layer.connection_made(transport)
        if self._early:
            early, self._early = self._early, b""
            _feed(layer, early)
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


class _ProxyReader(asyncio.Protocol):
    """Collects the PROXY header (at most proxy.MAX_HEADER bytes, within HEADER_TIMEOUT)."""

    def __init__(self, gate: Gate, transport: asyncio.Transport) -> None:
        self.gate = gate
        self.transport = transport
        self.buffer = b""
        self.done = False
        loop = asyncio.get_running_loop()
        self.timer = loop.call_later(proxy.HEADER_TIMEOUT, self._fail, "no header in time")

    def data_received(self, data: bytes) -> None:
        if self.done:
            return
        self.buffer += data
        try:
            header = proxy.parse(self.buffer[: proxy.MAX_HEADER])
        except proxy.ProxyError as exc:
            self._fail(str(exc))
            return
        if header is None:
            if len(self.buffer) >= proxy.MAX_HEADER:
                self._fail("header too long")
            return
        self.done = True
        self.timer.cancel()
        self.gate.proxied(self.transport, header, self.buffer[header.length :])

    def _fail(self, why: str) -> None:
        if not self.done:
            self.done = True
            self.timer.cancel()
            self.gate._proxy_failed(self.transport, why)

    def connection_lost(self, exc: Exception | None) -> None:
        self.done = True
        self.timer.cancel()


def _trusted(ip: str, networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]) -> bool:
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return False
    return any(address in network for network in networks)


def _feed(protocol: asyncio.BaseProtocol, data: bytes) -> None:
    """Give ``data`` to a protocol as if it had just been read from the socket."""
    if isinstance(protocol, asyncio.BufferedProtocol):
        view = memoryview(data)
        while view:
            buffer = memoryview(protocol.get_buffer(len(view)))
            size = min(len(buffer), len(view))
            buffer[:size] = view[:size]
            protocol.buffer_updated(size)
            view = view[size:]
    else:
        assert isinstance(protocol, asyncio.Protocol)
        protocol.data_received(data)


def _why(exc: Exception) -> str:
    """A short reason for the log line: the timeout, or what the TLS layer said."""
    if isinstance(exc, TimeoutError | ConnectionAbortedError):
        return "timeout"
    return f"{type(exc).__name__}: {exc}"[:200]


__all__ = ["Gate"]
