"""Listening sockets: open what the config names, close what it no longer does.

Each accepted connection is counted and, on implicit-TLS listeners, put
through the TLS handshake by a Gate (relayd.smtpd.gate); then it becomes a
Session holding the Services snapshot current at that moment. A reload only
opens added listeners and closes removed ones; sessions in flight keep
their sockets. Implicit-TLS listeners pick up a renewed certificate through
an SNI callback that swaps in the current context, so no listener has to be
reopened for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import weakref
from collections.abc import Callable

from relayd import log
from relayd.config import Listener
from relayd.smtpd.gate import Gate
from relayd.smtpd.services import Services
from relayd.smtpd.session import Session, writable

BACKLOG = 1024


def _key(listener: Listener) -> tuple[str, str, int, str, str]:
    return (
        listener.name,
        listener.address.host,
        listener.address.port,
        listener.mode,
        listener.tls,
    )


def bind(listener: Listener) -> socket.socket:
    """A listening TCP socket for ``host:port`` (IPv4 or IPv6)."""
    host, port = listener.address.host, listener.address.port
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, port))
        sock.listen(BACKLOG)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


class Listeners:
    def __init__(self, current: Callable[[], Services]) -> None:
        self._current = current
        self._servers: dict[tuple[str, str, int, str, str], asyncio.Server] = {}
        self._sessions: weakref.WeakSet[Session] = weakref.WeakSet()
        self._front_tls: ssl.SSLContext | None = None

    def names(self) -> list[str]:
        return [f"{k[0]} {k[1]}:{k[2]} ({k[3]}, tls={k[4]})" for k in self._servers]

    def fds(self) -> dict[str, int]:
        """Listening socket descriptors by listener name, for acceptor processes."""
        return {key[0]: server.sockets[0].fileno() for key, server in self._servers.items()}

    @property
    def active_sessions(self) -> int:
        return sum(1 for s in self._sessions if s.transport is not None)

    async def apply(
        self,
        listeners: tuple[Listener, ...],
        inherited: dict[str, list[socket.socket]] | None = None,
    ) -> None:
        """Open the listeners not yet open, close those no longer configured.

        Raises OSError (naming the address) if a new socket cannot be bound.
        """
        wanted = {_key(lst): lst for lst in listeners}
        for key in [k for k in self._servers if k not in wanted]:
            server = self._servers.pop(key)
            server.close()
            log.event("master", f"closed listener {key[0]} {key[1]}:{key[2]}")
        for key, listener in wanted.items():
            if key not in self._servers:
                sock = _take_inherited(listener, inherited or {})
                self._servers[key] = await self._serve(listener, sock)

    async def _serve(self, listener: Listener, sock: socket.socket | None) -> asyncio.Server:
        if sock is None:
            try:
                sock = bind(listener)
            except OSError as exc:
                raise OSError(
                    exc.errno,
                    f"listener {listener.name}: cannot bind {listener.address}: {exc.strerror}",
                ) from exc
        loop = asyncio.get_running_loop()
        tls = self._implicit_context() if listener.tls == "implicit" else None
        # Accepted in clear even for implicit TLS: the Gate counts the
        # connection first, then runs the handshake with its own timeout.
        server = await loop.create_server(
            lambda: Gate(
                self._current(),
                lambda: self._session(listener),
                tls,
                proxy_protocol=listener.proxy_protocol,
            ),
            sock=sock,
        )
        log.event(
            "master",
            f"listening on {listener.address} as {listener.name} "
            f"({listener.mode}, tls={listener.tls})",
        )
        return server

    def _session(self, listener: Listener) -> Session:
        session = Session(self._current(), listener)
        self._sessions.add(session)
        return session

    def _implicit_context(self) -> ssl.SSLContext:
        """One context for all implicit-TLS listeners, forwarding to the current cert."""
        if self._front_tls is None:
            tls = self._current().config.tls
            if tls.cert is None or tls.key is None:
                raise OSError(0, "implicit TLS listener needs [tls] cert and key")
            front = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            front.minimum_version = ssl.TLSVersion.TLSv1_2
            front.load_cert_chain(tls.cert, tls.key)
            front.sni_callback = self._pick_context
            self._front_tls = front
        return self._front_tls

    def _pick_context(self, obj: ssl.SSLObject, name: str | None, ctx: ssl.SSLContext) -> None:
        current = self._current().tls_context
        if current is not None:
            obj.context = current

    def close(self) -> None:
        """Stop accepting; sessions in flight go on."""
        for server in self._servers.values():
            server.close()
        self._servers.clear()

    async def drain(self, timeout: float) -> int:
        """Close idle sessions now; give those sending a message ``timeout``, then cut them.

        A session between messages loses nothing by a 421 (the client retries
        what it had not sent), so only a message under way (MAIL given, or
        DATA being received) is waited for. Returns how many were cut short.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        self._close_idle()
        while self._receiving() and loop.time() < deadline:
            await asyncio.sleep(0.05)
            self._close_idle()
        cut = len(self._receiving())
        for session in list(self._sessions):
            _say_goodbye(session)
        return cut

    def _receiving(self) -> list[Session]:
        return [s for s in self._sessions if s.transport is not None and s.sending_message]

    def _close_idle(self) -> None:
        for session in list(self._sessions):
            if not session.sending_message:
                _say_goodbye(session)


def _say_goodbye(session: Session) -> None:
    transport = session.transport
    if writable(transport) and not transport.is_closing():
        with contextlib.suppress(Exception):
            transport.write(b"421 4.3.2 Service shutting down\r\n")
            transport.close()


def _take_inherited(
    listener: Listener, inherited: dict[str, list[socket.socket]]
) -> socket.socket | None:
    """A socket systemd passed for this listener (matched by name, then by address)."""
    for name, socks in inherited.items():
        for sock in list(socks):
            addr = sock.getsockname()
            if name == listener.name or (
                addr[1] == listener.address.port
                and addr[0] in (listener.address.host, "::", "0.0.0.0")
            ):
                socks.remove(sock)
                sock.setblocking(False)
                return sock
    return None
