"""Scriptable SMTP servers standing in for remote MX hosts and smarthosts.

relayd delivers to every MX host on one port (``[delivery] port``), so the
stand-ins listen on different loopback addresses (127.0.0.2, 127.0.0.3, ...;
all of 127/8 is loopback on Linux) and share one port: :class:`MXPool`.

Normal sessions are aiosmtpd's SMTP implementation, driven by per-recipient
and end-of-DATA replies the test sets. What a well-behaved library will not
produce (no greeting, a 421 greeting, silence after the greeting) comes from a
raw asyncio session, and ``raw_handler`` hands a connection to the test for
anything else. Every server runs on its own event-loop thread; ``stop()``
aborts live connections, including deliberately hung ones, and joins it.

Usage::

    with MXServer("127.0.0.2", port, cert=server_cert_files(tmp_path, "mx.test")) as mx:
        mx.reply_for("bob@example.test", "451 4.7.1 greylisted", "250 2.1.5 OK")
        ...  # let relayd deliver
        [message] = mx.wait_for_messages(1)
        assert message.tls and message.rcpt_tos == ["bob@example.test"]
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import ssl
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, AnyStr, cast

from aiosmtpd.smtp import MISSING, SMTP, AuthResult, LoginPassword, Session

from . import LoopThread, ThreadedServer
from .ports import free_port

__all__ = ["BEHAVIOURS", "MXPool", "MXServer", "RawHandler", "ReceivedMessage"]

BEHAVIOURS = (
    "normal",
    "hang_after_greeting",
    "drop_after_data",
    "no_greeting",
    "hang_at_data_end",
)
"""Values accepted by :attr:`MXServer.behaviour`."""

RawHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
"""A coroutine function given each new connection's streams (runs on the server's loop)."""

_IDLE_TIMEOUT = 60.0  # a session with no traffic this long is closed (bounds every wait)
_MAX_LINES = 100_000  # bound on raw-session read loops


def _wire(reply: str) -> str:
    """Accept ``\\n``-separated multi-line replies; SMTP wants CRLF."""
    return "\r\n".join(reply.replace("\r\n", "\n").split("\n"))


def _check_reply(reply: str) -> str:
    if len(reply) < 3 or not reply[:3].isdigit() or reply[0] not in "2345":
        raise ValueError(f"not an SMTP reply: {reply!r}")
    return reply


@dataclass
class ReceivedMessage:
    """One complete DATA transfer as the server saw it.

    ``data`` is the message after dot-unstuffing, with the CRLF line endings
    it travelled with. ``connection`` is the 0-based index of the TCP
    connection it came on (compare with :attr:`MXServer.connections` to
    assert connection reuse). ``reply`` is what the server answered at the end
    of DATA, empty when it answered nothing (``drop_after_data``,
    ``hang_at_data_end``).
    """

    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    tls: bool
    auth_user: str | None
    peer: str
    helo: str
    mail_options: list[str]
    connection: int
    reply: str = ""
    rcpt_options: list[str] = field(default_factory=list)


class _Replies:
    """A scripted sequence of replies: each use takes the next, the last one repeats."""

    def __init__(self, replies: tuple[str, ...]) -> None:
        if not replies:
            raise ValueError("give at least one reply")
        self._replies = [_check_reply(reply) for reply in replies]

    def next(self) -> str:
        if len(self._replies) > 1:
            return self._replies.pop(0)
        return self._replies[0]


class _QuietSession(Session):
    """aiosmtpd's Session without the deprecation log line on every successful AUTH."""

    @property
    def login_data(self) -> Any:
        return self._login_data

    @login_data.setter
    def login_data(self, value: Any) -> None:
        self._login_data = value


class _SMTPSession(SMTP):
    """aiosmtpd's SMTP with a settable greeting and connection tracking for stop()."""

    def __init__(self, mx: MXServer, index: int, greeting: str, **kwargs: Any) -> None:
        super().__init__(_Handler(mx, index, self), **kwargs)
        self._mx = mx
        self._mx_greeting = greeting
        self._mx_greeted = False
        self._mx_raw_transport: asyncio.Transport | None = None
        self.implicit_tls = False

    def _create_session(self) -> Session:
        return _QuietSession(self.loop)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._mx_raw_transport is None:  # the first call; the second follows STARTTLS
            self._mx_raw_transport = cast(asyncio.Transport, transport)
            self.implicit_tls = transport.get_extra_info("ssl_object") is not None
            self._mx._transports.add(self._mx_raw_transport)
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        if self._mx_raw_transport is not None:
            self._mx._transports.discard(self._mx_raw_transport)
        super().connection_lost(error)

    async def push(self, status: AnyStr) -> None:
        # aiosmtpd's first push is always its fixed "220 host ident" greeting.
        if not self._mx_greeted:
            self._mx_greeted = True
            await super().push(_wire(self._mx_greeting))
            return
        await super().push(status)

    def drop(self) -> None:
        """Close the TCP connection at once, without a reply or a TLS close_notify."""
        transport = self._mx_raw_transport
        if transport is not None:
            transport.abort()


class _Handler:
    """aiosmtpd hooks that apply the MXServer's script and record what arrives."""

    def __init__(self, mx: MXServer, index: int, session: _SMTPSession) -> None:
        self.mx = mx
        self.index = index
        self.session = session
        self.behaviour = mx.behaviour

    async def handle_EHLO(
        self, server: SMTP, session: Any, envelope: Any, hostname: str, responses: list[str]
    ) -> list[str]:
        session.host_name = hostname
        if not self.mx.auth:
            # aiosmtpd always lists AUTH; an MX without accounts must not.
            responses = [r for r in responses if not r[4:].upper().startswith("AUTH")]
        return responses

    async def handle_AUTH(self, server: SMTP, session: Any, envelope: Any, args: list[str]) -> Any:
        if not self.mx.auth:
            return "502 5.5.1 AUTH not available"
        return MISSING

    async def handle_MAIL(
        self, server: SMTP, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        if self.mx.auth_required and not session.authenticated:
            return "530 5.7.0 Authentication required"
        reply = self.mx._next_mail_reply()
        if reply.startswith("2"):
            envelope.mail_from = address
            envelope.mail_options.extend(options)
        return _wire(reply)

    async def handle_RCPT(
        self, server: SMTP, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        reply = self.mx._next_rcpt_reply(address)
        with self.mx._cond:
            self.mx.rcpts.append((address, reply))
        if reply.startswith("2"):
            envelope.rcpt_tos.append(address)
            envelope.rcpt_options.extend(options)
        return _wire(reply)

    async def handle_DATA(self, server: SMTP, session: Any, envelope: Any) -> str:
        auth = session.auth_data
        login = auth.login if isinstance(auth, LoginPassword) else None
        message = ReceivedMessage(
            mail_from=envelope.mail_from,
            rcpt_tos=list(envelope.rcpt_tos),
            data=bytes(envelope.original_content or b""),
            tls=self.session.implicit_tls or session.ssl is not None,
            auth_user=login.decode("utf-8", "replace") if isinstance(login, bytes) else None,
            peer=str(session.peer[0]) if session.peer else "",
            helo=session.host_name or "",
            mail_options=list(envelope.mail_options),
            connection=self.index,
            rcpt_options=list(envelope.rcpt_options),
        )
        if self.behaviour == "drop_after_data":
            self.mx._record(message, accepted=False)
            self.session.drop()
            await asyncio.Event().wait()  # cancelled by connection_lost
        if self.behaviour == "hang_at_data_end":
            self.mx._record(message, accepted=False)
            await asyncio.Event().wait()  # cancelled when the client or stop() closes
        reply = self.mx._next_data_reply()
        message.reply = reply
        self.mx._record(message, accepted=reply.startswith("2"))
        return _wire(reply)


class _RawProtocol(asyncio.StreamReaderProtocol):
    """A stream protocol whose transport is tracked so that stop() can abort it."""

    def __init__(self, mx: MXServer, callback: RawHandler, loop: asyncio.AbstractEventLoop):
        self._mx = mx
        self._transport: asyncio.Transport | None = None
        reader = asyncio.StreamReader(limit=65536, loop=loop)
        super().__init__(reader, callback, loop=loop)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        self._mx._transports.add(self._transport)
        super().connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._transport is not None:
            self._mx._transports.discard(self._transport)
        super().connection_lost(exc)


class MXServer(ThreadedServer):
    """A scriptable SMTP server on one loopback address.

    ``cert`` is ``(cert_path, key_path)`` (see :mod:`.certs`); with it the
    server offers STARTTLS unless ``starttls=False``; ``implicit_tls`` makes it
    speak TLS from the first byte (port 465 style) instead. ``require_tls``
    answers ``530`` to MAIL before STARTTLS. ``auth`` maps users to
    passwords; AUTH PLAIN and LOGIN are then offered, after TLS only (at once
    with implicit TLS), and ``auth_required`` makes MAIL wait for it.

    Attributes a test may set at any time (new connections pick them up):
    ``greeting`` (a non-2xx greeting is sent by a raw session, which closes
    after a 421 and otherwise answers 503 until QUIT), ``behaviour`` (one of
    :data:`BEHAVIOURS`), ``raw_handler`` (take over every new connection).

    Recorded: ``messages`` (accepted with a 2xx end-of-DATA reply),
    ``attempts`` (every complete DATA, whatever the reply or lack of one),
    ``rcpts`` ((address, reply) for every RCPT), ``connections`` (TCP
    connections accepted).
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        cert: tuple[Path, Path] | None = None,
        implicit_tls: bool = False,
        starttls: bool | None = None,
        require_tls: bool = False,
        auth: dict[str, str] | None = None,
        auth_required: bool = False,
        hostname: str = "mx.test",
    ) -> None:
        ip = ipaddress.ip_address(host)
        if not ip.is_loopback:
            raise ValueError(f"MXServer only listens on loopback, not {host}")
        if (implicit_tls or starttls or require_tls) and cert is None:
            raise ValueError("TLS options need cert=(cert_path, key_path)")
        self.host = host
        self.port = port
        self.cert = cert
        self.implicit_tls = implicit_tls
        self.starttls = (cert is not None) if starttls is None else starttls
        if implicit_tls:
            self.starttls = False
        self.require_tls = require_tls
        self.auth = dict(auth) if auth else None
        self.auth_required = auth_required
        self.hostname = hostname
        self.greeting = f"220 {hostname} ESMTP ready"
        self._behaviour = "normal"
        self.raw_handler: RawHandler | None = None
        self.messages: list[ReceivedMessage] = []
        self.attempts: list[ReceivedMessage] = []
        self.rcpts: list[tuple[str, str]] = []
        self.connections = 0
        self._family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
        self._cond = threading.Condition()
        self._rcpt_replies: dict[str, _Replies] = {}
        self._data_replies = _Replies(("250 2.0.0 OK queued",))
        self._mail_replies = _Replies(("250 2.1.0 OK",))
        self._transports: set[asyncio.Transport] = set()
        self._server: asyncio.Server | None = None
        self._ssl_context: ssl.SSLContext | None = None
        self._loop = LoopThread(f"MXServer-{host}")

    # -- script ------------------------------------------------------------

    @property
    def behaviour(self) -> str:
        """How new connections behave; see :data:`BEHAVIOURS`."""
        return self._behaviour

    @behaviour.setter
    def behaviour(self, value: str) -> None:
        if value not in BEHAVIOURS:
            raise ValueError(f"unknown behaviour {value!r}; want one of {', '.join(BEHAVIOURS)}")
        self._behaviour = value

    def reply_for(self, rcpt: str, *replies: str) -> None:
        """Script the RCPT reply for ``rcpt`` (case-insensitive; ``"*"`` = every other).

        With several replies, successive RCPTs for the address get them in
        order and the last repeats: ``reply_for(a, "451 4.7.1 greylisted",
        "250 2.1.5 OK")`` accepts on the second attempt. Default ``250 2.1.5 OK``.
        """
        with self._cond:
            self._rcpt_replies[rcpt.lower()] = _Replies(replies)

    def data_reply(self, *replies: str) -> None:
        """Script the end-of-DATA reply (sequence as in :meth:`reply_for`)."""
        with self._cond:
            self._data_replies = _Replies(replies)

    def mail_reply(self, *replies: str) -> None:
        """Script the MAIL FROM reply (sequence as in :meth:`reply_for`)."""
        with self._cond:
            self._mail_replies = _Replies(replies)

    def reset(self) -> None:
        """Forget recordings and restore default replies, greeting and behaviour."""
        with self._cond:
            self.messages.clear()
            self.attempts.clear()
            self.rcpts.clear()
            self.connections = 0
            self._rcpt_replies.clear()
            self._data_replies = _Replies(("250 2.0.0 OK queued",))
            self._mail_replies = _Replies(("250 2.1.0 OK",))
        self.greeting = f"220 {self.hostname} ESMTP ready"
        self._behaviour = "normal"
        self.raw_handler = None

    def _next_rcpt_reply(self, address: str) -> str:
        with self._cond:
            script = self._rcpt_replies.get(address.lower()) or self._rcpt_replies.get("*")
            return script.next() if script is not None else "250 2.1.5 OK"

    def _next_data_reply(self) -> str:
        with self._cond:
            return self._data_replies.next()

    def _next_mail_reply(self) -> str:
        with self._cond:
            return self._mail_replies.next()

    def _record(self, message: ReceivedMessage, *, accepted: bool) -> None:
        with self._cond:
            self.attempts.append(message)
            if accepted:
                self.messages.append(message)
            self._cond.notify_all()

    # -- waiting -----------------------------------------------------------

    def wait_for_messages(self, n: int, timeout: float = 10.0) -> list[ReceivedMessage]:
        """Wait until at least ``n`` messages were accepted; return them all (a copy)."""
        with self._cond:
            if not self._cond.wait_for(lambda: len(self.messages) >= n, timeout):
                raise TimeoutError(
                    f"{self.host}: {len(self.messages)} of {n} messages after {timeout}s "
                    f"({len(self.attempts)} DATA attempts, {self.connections} connections)"
                )
            return list(self.messages)

    def wait_for_attempts(self, n: int, timeout: float = 10.0) -> list[ReceivedMessage]:
        """Wait until at least ``n`` complete DATA transfers arrived, whatever the reply."""
        with self._cond:
            if not self._cond.wait_for(lambda: len(self.attempts) >= n, timeout):
                raise TimeoutError(f"{self.host}: {len(self.attempts)} of {n} DATA attempts")
            return list(self.attempts)

    def wait_for_connections(self, n: int, timeout: float = 10.0) -> int:
        """Wait until at least ``n`` TCP connections were accepted; return the count."""
        with self._cond:
            if not self._cond.wait_for(lambda: self.connections >= n, timeout):
                raise TimeoutError(f"{self.host}: {self.connections} of {n} connections")
            return self.connections

    # -- lifecycle ---------------------------------------------------------

    @property
    def address(self) -> str:
        """``host:port`` (``[v6]:port`` for IPv6), the form of relayd's ``via``."""
        if self._family == socket.AF_INET6:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"

    def start(self) -> MXServer:
        """Bind and start serving; returns self. Raises OSError if the port is taken."""
        if self.cert is not None:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(str(self.cert[0]), str(self.cert[1]))
            self._ssl_context = context
        sock = socket.socket(self._family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, self.port))
            sock.listen(64)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self.port = int(sock.getsockname()[1])
        self._loop.start()
        try:
            self._loop.call(self._open(sock))
        except BaseException:
            sock.close()
            self._loop.stop()
            raise
        return self

    async def _open(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self._protocol_factory,
            sock=sock,
            ssl=self._ssl_context if self.implicit_tls else None,
            ssl_handshake_timeout=10.0 if self.implicit_tls else None,
        )

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
        for transport in list(self._transports):
            transport.abort()
        if self._server is not None:
            await asyncio.wait_for(self._server.wait_closed(), 5.0)
            self._server = None
        for _ in range(3):
            await asyncio.sleep(0)  # let connection_lost callbacks run

    # -- connections -------------------------------------------------------

    def _protocol_factory(self) -> asyncio.BaseProtocol:
        """Pick, per new connection, the aiosmtpd session or a raw one."""
        loop = asyncio.get_running_loop()
        with self._cond:
            index = self.connections
            self.connections += 1
            self._cond.notify_all()
        greeting, behaviour, custom = self.greeting, self.behaviour, self.raw_handler
        if custom is not None:
            handler = custom

            async def run_custom(
                reader: asyncio.StreamReader, writer: asyncio.StreamWriter
            ) -> None:
                try:
                    await handler(reader, writer)
                finally:
                    writer.close()

            return _RawProtocol(self, run_custom, loop)
        if behaviour in ("no_greeting", "hang_after_greeting") or not greeting.startswith("2"):

            async def raw(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                await self._raw_session(reader, writer, behaviour, greeting)

            return _RawProtocol(self, raw, loop)
        # auth_required is enforced in handle_MAIL rather than by aiosmtpd, which
        # warns when AUTH is required without STARTTLS even under implicit TLS.
        return _SMTPSession(
            self,
            index,
            greeting,
            hostname=self.hostname,
            ident="",
            tls_context=self._ssl_context if self.starttls else None,
            require_starttls=self.require_tls and self.starttls,
            auth_require_tls=not self.implicit_tls,
            authenticator=self._authenticate,
            enable_SMTPUTF8=True,
            timeout=_IDLE_TIMEOUT,
            loop=loop,
        )

    def _authenticate(
        self, server: SMTP, session: Any, envelope: Any, mechanism: str, auth_data: Any
    ) -> AuthResult:
        if self.auth and isinstance(auth_data, LoginPassword):
            user = auth_data.login.decode("utf-8", "replace")
            password = auth_data.password.decode("utf-8", "replace")
            if user in self.auth and self.auth[user] == password:
                return AuthResult(success=True, auth_data=auth_data)
        return AuthResult(success=False, handled=False)

    async def _raw_session(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        behaviour: str,
        greeting: str,
    ) -> None:
        """What aiosmtpd will not do: silence, or refusing at the greeting."""
        try:
            if behaviour == "no_greeting":
                await self._swallow(reader)
                return
            writer.write(_wire(greeting).encode() + b"\r\n")
            await writer.drain()
            if behaviour == "hang_after_greeting":
                await self._swallow(reader)
                return
            if greeting.startswith("421"):
                return  # 421: the server closes the connection (RFC 5321 3.8)
            for _ in range(_MAX_LINES):  # e.g. 554 greeting: 503 to all but QUIT
                line = await asyncio.wait_for(reader.readline(), _IDLE_TIMEOUT)
                if not line:
                    return
                if line.strip().upper() == b"QUIT":
                    writer.write(b"221 2.0.0 Bye\r\n")
                    await writer.drain()
                    return
                writer.write(b"503 5.5.1 No service\r\n")
                await writer.drain()
        except (ConnectionError, TimeoutError):
            return
        finally:
            writer.close()

    @staticmethod
    async def _swallow(reader: asyncio.StreamReader) -> None:
        """Read and ignore everything until the peer or stop() closes (or idle timeout)."""
        for _ in range(_MAX_LINES):
            chunk = await asyncio.wait_for(reader.read(65536), _IDLE_TIMEOUT)
            if not chunk:
                return


class MXPool:
    """Several :class:`MXServer` on 127.0.0.2, 127.0.0.3, ... sharing one port.

    ``kwargs`` go to every server. Unless ``hostname`` is given, server ``i``
    (from 1) calls itself ``mx{i}.test``. The port is chosen with
    :func:`.ports.free_port` unless ``port`` is given; if another process grabs
    it before the servers bind, start() picks another (bounded retries).
    """

    def __init__(self, count: int = 4, *, port: int | None = None, **kwargs: Any) -> None:
        if not 1 <= count <= 200:
            raise ValueError("count must be between 1 and 200")
        self.hosts = [f"127.0.0.{2 + i}" for i in range(count)]
        self._fixed_port = port
        self.port = port if port is not None else free_port(*self.hosts)
        self.servers = [
            MXServer(
                host,
                self.port,
                **{"hostname": f"mx{i + 1}.test", **kwargs},
            )
            for i, host in enumerate(self.hosts)
        ]

    def __getitem__(self, key: str | int) -> MXServer:
        """A server by IP address (``pool["127.0.0.3"]``) or by index (``pool[1]``)."""
        if isinstance(key, int):
            return self.servers[key]
        for server in self.servers:
            if server.host == key:
                return server
        raise KeyError(key)

    def __iter__(self) -> Any:
        return iter(self.servers)

    def __len__(self) -> int:
        return len(self.servers)

    def start(self) -> MXPool:
        """Start every server on the shared port; returns self."""
        for _ in range(5):
            started: list[MXServer] = []
            try:
                for server in self.servers:
                    server.port = self.port
                    server.start()
                    started.append(server)
            except OSError:
                for server in started:
                    server.stop()
                if self._fixed_port is not None:
                    raise
                self.port = free_port(*self.hosts)
                continue
            return self
        raise OSError(f"could not start {len(self.servers)} servers on one port")

    def stop(self) -> None:
        """Stop every server (idempotent)."""
        errors: list[BaseException] = []
        for server in self.servers:
            try:
                server.stop()
            except Exception as exc:  # stop the others anyway
                errors.append(exc)
        if errors:
            raise errors[0]

    def __enter__(self) -> MXPool:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def messages(self) -> list[ReceivedMessage]:
        """Messages accepted by any server of the pool."""
        return [message for server in self.servers for message in list(server.messages)]

    @property
    def connections(self) -> int:
        """TCP connections accepted by the whole pool."""
        return sum(server.connections for server in self.servers)

    def wait_for_messages(self, n: int, timeout: float = 10.0) -> list[ReceivedMessage]:
        """Wait until the pool as a whole accepted at least ``n`` messages."""
        deadline = time.monotonic() + timeout
        messages = self.messages
        for _ in range(int(timeout / 0.02) + 2):
            messages = self.messages
            if len(messages) >= n:
                return messages
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            time.sleep(min(0.02, remaining))
        raise TimeoutError(f"pool: {len(messages)} of {n} messages after {timeout}s")

    def mx_records(self, domain: str, preference: int | list[int] = 10) -> list[str]:
        """Zone lines for :meth:`DNSServer.add` pointing ``domain`` at this pool.

        One ``MX`` line per server (same preference, or one per server from a
        list) plus an ``A`` line for each server's hostname.
        """
        prefs = preference if isinstance(preference, list) else [preference] * len(self.servers)
        if len(prefs) != len(self.servers):
            raise ValueError("one preference per server")
        lines = [
            f"{domain} MX {pref} {server.hostname}"
            for pref, server in zip(prefs, self.servers, strict=True)
        ]
        lines += [f"{server.hostname} A {server.host}" for server in self.servers]
        return lines
