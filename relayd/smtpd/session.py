"""One SMTP conversation: policy at each step, and 250 only once the spool has it.

aiosmtpd supplies the conversation loop, STARTTLS and the AUTH exchange;
this subclass decides. Each command asks a plain policy function (relay
ACL, sender ownership, limits, SPF, ...) and answers with the reply it
gives; replies get RFC 3463 enhanced codes; DATA is read by
relayd.smtpd.dataread, which refuses smuggling attempts. The message is
handed to ``Services.enqueue`` (spool commit, then the scheduler), and the
client hears ``250 2.0.0 Ok: queued as ID`` only when that returned.

A session keeps the Services snapshot it started with, so a reload never
changes the rules under a client mid-conversation.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import ssl
import time
import warnings
from base64 import b64decode
from typing import Any, TypeGuard

from aiosmtpd.smtp import (
    ALLOWED_BEFORE_STARTTLS,
    BOGUS_LIMIT,
    SMTP,
    AuthResult,
    LoginPassword,
    TLSSetupException,
    _AuthMechAttr,
    login_always_fail,
    make_loop,
)

from relayd import log
from relayd.address import Address, AddressError, parse_params, parse_path
from relayd.config import Listener
from relayd.escape import has_control, printable
from relayd.policy import identity
from relayd.policy.acl import may_relay, recipient_verdict
from relayd.policy.authguard import Outcome, Ticket
from relayd.policy.ratelimit import client_key
from relayd.policy.verdict import Refuse
from relayd.smtpd import authresults, dataread, headers
from relayd.smtpd.content import Content
from relayd.smtpd.services import ClientInfo, Services
from relayd.smtpd.tlslayer import TLSLayer
from relayd.spool.model import Envelope, Recipient
from relayd.spool.queueid import new_queue_id
from relayd.spool.store import SpoolError

# aiosmtpd fills its deprecated Session.login_data itself on every AUTH.
warnings.filterwarnings("ignore", message="Session.login_data is deprecated")

_HAS_ENHANCED = re.compile(r"^\d{3}[ -]\d\.\d{1,3}\.\d{1,3}(?: |$)")
_DEFAULT_ENHANCED = {
    "220": "2.0.0",
    "221": "2.0.0",
    "235": "2.7.0",
    "250": "2.0.0",
    "252": "2.0.0",
    "421": "4.3.0",
    "450": "4.2.0",
    "451": "4.3.0",
    "452": "4.3.1",
    "454": "4.7.0",
    "500": "5.5.2",
    "501": "5.5.4",
    "502": "5.5.1",
    "503": "5.5.1",
    "504": "5.5.4",
    "530": "5.7.0",
    "535": "5.7.8",
    "538": "5.7.11",
    "550": "5.0.0",
    "552": "5.3.4",
    "553": "5.1.3",
    "554": "5.0.0",
    "555": "5.5.4",
}
_DATA_PROBLEMS = {
    dataread.TOO_BIG: "552 5.3.4 Message size exceeds fixed limit",
    dataread.BARE_NEWLINE: (
        "554 5.6.0 Message refused: bare CR or LF in DATA (lines must end in CRLF)"
    ),
    dataread.NUL: "554 5.6.0 Message refused: NUL octet in DATA",
    dataread.LINE_TOO_LONG: "554 5.6.0 Message refused: line longer than 998 octets",
}
MAX_HOPS = 50  # Received: headers before a message is taken for a loop (Postfix's default)
# Refused commands (4xx/5xx replies) before the session is cut (Postfix's smtpd_hard_error_limit).
HARD_ERROR_LIMIT = 20
TOO_MANY_ERRORS = "421 4.7.0 Too many errors"
# "452 4.5.3 too many recipients" is how a client learns max_recipients, not a
# mistake: like Postfix (smtpd_recipient_overshoot_limit) the first 1000 do not count.
TOO_MANY_RECIPIENTS = "452 4.5.3"
RECIPIENT_OVERSHOOT_LIMIT = 1000
# Seconds a TLS handshake may take: implicit TLS (relayd.smtpd.gate) and STARTTLS.
HANDSHAKE_TIMEOUT = 10
_PROGRAM = {"inbound": "smtpd", "submission": "submission/smtpd"}


class _NoHooks:
    """aiosmtpd wants a handler object; every decision lives in the session."""


class Session(SMTP):  # type: ignore[misc]
    # Refused commands so far, and recipients over max_recipients; see push().
    errors = 0
    overshoot = 0
    # Set by admit(): the listener counted this connection at the TCP accept.
    _admitted = False

    def __init__(self, services: Services, listener: Listener) -> None:
        cfg = services.config
        starttls = listener.tls == "starttls" and services.tls_context is not None
        self._smtp_init(
            _NoHooks(),
            data_size_limit=cfg.limits.max_message_size,
            enable_SMTPUTF8=True,
            decode_data=False,
            hostname=cfg.hostname,
            ident="ESMTP",
            tls_context=services.tls_context if starttls else None,
            require_starttls=starttls and listener.mode == "submission",
            timeout=cfg.limits.idle_timeout,
            auth_required=False,
            auth_require_tls=False,
        )
        self.services = services
        self.listener = listener
        self.program = _PROGRAM[listener.mode] if listener.tls != "implicit" else "smtps/smtpd"
        self.client = ClientInfo(
            ip="", port=0, listener=listener.name, inbound=listener.mode == "inbound"
        )
        self.user: str | None = None
        self.sasl_method = ""
        self.queue_id: str | None = None
        self.sender: Address | None = None
        self.mail_params: dict[str, str | None] = {}
        self.recipients: list[Address] = []
        self.trace_headers: list[bytes] = []
        self.check_state: object = None
        self.refusal: Refuse | None = None
        self.counts: dict[str, int] = {}  # commands tried, by name
        self.succeeded: dict[str, int] = {}  # ... and answered 2xx in the end
        self._command = ""  # the command being answered ("" between commands)
        self._previous = ""
        self._command_arg: str | None = None
        self._last_code = ""  # the last reply's code, for the command's outcome
        self._reject_logged = False  # the current command's refusal has its log line
        self.in_data = False  # receiving or committing a message: a stop waits for it
        self._raw_replies = True  # the greeting carries no enhanced code
        self._tls_version: str | None = None  # for metrics, once TLS is up
        self._connected = False
        self._slot_released = False
        self._lost = False
        self.peer: tuple[str, int] | None = None  # the client a PROXY header named
        self._ip_may_relay: tuple[str, bool] | None = None  # see _may_relay
        self._deadline = 0.0  # the idle timeout's moment (loop time); see _reset_timeout

    def _smtp_init(
        self,
        handler: Any,
        *,
        data_size_limit: int,
        enable_SMTPUTF8: bool,
        decode_data: bool,
        hostname: str,
        ident: str,
        tls_context: ssl.SSLContext | None,
        require_starttls: bool,
        timeout: float,
        auth_required: bool,
        auth_require_tls: bool,
    ) -> None:
        """aiosmtpd's ``SMTP.__init__`` for the arguments relayd passes, per session.

        aiosmtpd finds its ``smtp_*``, ``auth_*`` and ``handle_*`` methods with
        ``inspect.getmembers``/``dir`` on every new connection (about a third
        of a millisecond, a tenth of the CPU of a one-message session); here
        the names come from a per-class cache and only the binding is done
        per session. The attributes set are those of aiosmtpd 1.4's
        ``__init__`` (tests/test_session_init.py compares the two).
        """
        self.__ident__ = ident
        # aiosmtpd's make_loop() sets up a warnings filter on every call; a
        # session is made on the running loop but for tests that build one bare.
        self.loop = loop = asyncio._get_running_loop() or make_loop()
        asyncio.StreamReaderProtocol.__init__(
            self,
            asyncio.StreamReader(loop=loop, limit=self.line_length_limit),
            client_connected_cb=self._cb_client_connected,
            loop=loop,
        )
        self.event_handler = handler
        self.data_size_limit = data_size_limit
        self.enable_SMTPUTF8 = enable_SMTPUTF8
        self._decode_data = decode_data
        self.hostname = hostname
        self.tls_context = tls_context
        self.require_starttls = tls_context and require_starttls
        self._timeout_duration = timeout
        self._timeout_handle = None
        self._tls_handshake_okay = True
        self._tls_protocol = None
        self._original_transport = None
        self.session = None
        self.envelope = None
        self.transport = None
        self._handler_coroutine = None
        self._auth_require_tls = auth_require_tls
        self._proxy_timeout = None
        self._authenticator = None
        self._auth_callback = login_always_fail
        self._auth_required = auth_required
        self._handle_hooks = _NO_HOOKS  # _NoHooks has none; aiosmtpd only reads it
        self._ehlo_hook_ver = None
        self._enforce_call_limit = False

    # aiosmtpd builds these two tables in every session's __init__; relayd's
    # command loop dispatches by name, so only HELP and AUTH ever ask, and
    # they get them built on demand.
    @functools.cached_property
    def _smtp_methods(self) -> dict[str, Any]:  # type: ignore[override]
        table = _command_table(type(self))
        return {command: getattr(self, name) for command, name in table.items()}

    @functools.cached_property
    def _auth_methods(self) -> dict[str, _AuthMechAttr]:  # type: ignore[override]
        _, auth = _method_names(type(self))
        return {mech: _AuthMechAttr(getattr(self, name), True) for mech, name in auth}

    # ---- connection lifecycle -------------------------------------------

    def admit(self, refusal: Refuse | None) -> None:
        """Take over the connection slot the listener counted at the TCP accept.

        With ``refusal`` the session only says so (421) and closes; without
        one, the slot is released when the connection ends.
        """
        self._admitted = True
        self.refusal = refusal
        self._connected = refusal is None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.transport is None:
            peer = self.peer or transport.get_extra_info("peername") or ("", 0)
            self.client = ClientInfo(
                ip=str(peer[0]),
                port=int(peer[1]),
                listener=self.listener.name,
                inbound=self.listener.mode == "inbound",
            )
            if not self._admitted:  # not through the listener's gate: count here
                self.admit(self.services.connections.acquire(self.client.ip))
            log.event(
                self.program,
                f"connect from unknown[{self.client.ip}]",
                level=logging.DEBUG,
                client_ip=self.client.ip,
            )
        super().connection_made(transport)
        if self.peer is not None and self.session is not None:
            self.session.peer = self.peer  # type: ignore[assignment]
        if self._tls_active():  # implicit TLS, or the STARTTLS handshake just finished
            self._tls_version = self._tls_info()[0]

    def connection_lost(self, error: Exception | None) -> None:
        if self._lost:  # _timeout_cb may have run it already (a stalled handshake)
            return
        self._lost = True
        if self._connected:
            self._connected = False
            self._release_slot()
            self.services.metrics.tls_used("in", self._tls_version)
            self._log_disconnect()
        super().connection_lost(error)

    def _release_slot(self) -> None:
        """Give the connection slot back, once (at QUIT, else when the connection ends)."""
        if not self._slot_released:
            self._slot_released = True
            self.services.connections.release(self.client.ip)

    async def _handle_client(self) -> None:
        if self.refusal is not None:
            self.services.metrics.refused(self.refusal.reply())
            await self.push(self.refusal.reply())
            assert self.transport is not None
            self.transport.close()
            return
        await self.push(f"220 {self.hostname} {self.__ident__}")
        bogus = BOGUS_LIMIT
        commands = _command_table(type(self))
        while self.transport is not None:
            try:
                line = await self._read_command()
                if line is None:
                    await self.push("500 Command line too long")
                    continue
                name, arg, problem = self._parse_command(line)
                if problem is not None:
                    await self.push(problem)
                    continue
                method = commands.get(name)
                if method is None:
                    bogus -= 1
                    if bogus < 1:
                        await self.push("502 5.5.1 Too many unrecognized commands, goodbye.")
                        self.transport.close()
                        continue
                    await self.push(f'500 Error: command "{name}" not recognized')
                    continue
                self._reset_timeout()
                await self._run_counted(name, getattr(self, method), arg)
            except (asyncio.CancelledError, ConnectionResetError):
                self._writer.close()
                raise
            except Exception as error:
                await self._command_failed(error)

    async def _read_command(self) -> bytes | None:
        """One command line without its CRLF; None for a line over the reader's limit.

        aiosmtpd's loop, less its per-line debug logging (two sanitised
        copies of every line, built even when nothing is logged).
        """
        try:
            return (await self._reader.readuntil()).rstrip(b"\r\n")
        except asyncio.LimitOverrunError as error:
            await self._reader.read(error.consumed)
            while True:  # read up to the end of the line before answering
                try:
                    await self._reader.readuntil()
                    return None
                except asyncio.LimitOverrunError as more:
                    await self._reader.read(more.consumed)

    def _parse_command(self, line: bytes) -> tuple[str, str | None, str | None]:
        """(command, argument, refusal) as aiosmtpd decides them, the refusal None if fit to run."""
        if not line:
            return "", None, "500 Error: bad syntax"
        command_bytes, _, arg_bytes = line.partition(b" ")
        try:
            name = command_bytes.upper().decode("ascii")
        except UnicodeDecodeError:
            return "", None, "500 Error: bad syntax"
        # 8-bit arguments are kept (SMTPUTF8), surrogate-escaped so the bytes survive.
        arg = str(arg_bytes.strip(), "utf-8", "surrogateescape") if arg_bytes else None
        assert self.session is not None
        limit = _COMMAND_LIMITS.get(name, 512) if self.session.extended_smtp else 512
        if len(line) > limit:
            return name, arg, "500 Command line too long"
        if not self._tls_handshake_okay and name != "QUIT":
            return name, arg, "554 Command refused due to lack of security"
        if self.require_starttls and not self._tls_protocol and name not in ALLOWED_BEFORE_STARTTLS:
            return name, arg, "530 Must issue a STARTTLS command first"
        return name, arg, None

    async def _command_failed(self, error: Exception) -> None:
        """A command raised: say so (500), or end a session whose TLS set-up failed."""
        if isinstance(error, TLSSetupException):
            assert self.transport is not None
            self.transport.close()
            self.connection_lost(error)
            return
        log.event(
            self.program,
            f"error: {type(error).__name__} in {self._last_command()} "
            f"from unknown[{self.client.ip}]",
            level=logging.ERROR,
            exc_info=True,
            client_ip=self.client.ip,
        )
        await self.push(f"500 Error: ({type(error).__name__}) {error}")

    def _reset_timeout(self, duration: float | None = None) -> None:
        """Move the idle deadline; the timer is re-armed only when it fires or must fire sooner.

        aiosmtpd cancels and creates a timer on every command and every
        DATA chunk; a deadline checked when the timer fires costs one
        float per command instead.
        """
        loop = self.loop
        self._deadline = deadline = loop.time() + (duration or self._timeout_duration)
        handle = self._timeout_handle
        if handle is None or handle.cancelled() or handle.when() > deadline:
            if handle is not None:
                handle.cancel()
            self._timeout_handle = loop.call_at(deadline, self._timeout_due)

    def _timeout_due(self) -> None:
        if self.loop.time() < self._deadline:  # activity since: wait for the new deadline
            self._timeout_handle = self.loop.call_at(self._deadline, self._timeout_due)
            return
        self._timeout_cb()

    def _timeout_cb(self) -> None:
        assert self.session is not None
        if self._tls_protocol is not None and self.session.ssl is None:
            # Silent in the middle of the STARTTLS handshake: asyncio's TLS layer
            # would never report the closed connection, and the slot would leak.
            raw = self._original_transport
            if writable(raw):
                raw.abort()
            log.event(
                self.program,
                f"lost connection during TLS handshake from unknown[{self.client.ip}]: timeout",
                client_ip=self.client.ip,
            )
            self.connection_lost(None)
            return
        transport = self.transport
        if writable(transport) and not transport.is_closing():
            transport.write(f"421 4.4.2 {self.hostname} Error: timeout exceeded\r\n".encode())
            log.event(
                self.program,
                f"timeout after {self._last_command()} from unknown[{self.client.ip}]",
                client_ip=self.client.ip,
            )
        super()._timeout_cb()  # type: ignore[no-untyped-call]

    def _log_disconnect(self) -> None:
        """Postfix's shape: ``auth=1/3`` is 1 of 3 tried, a plain number when all went well."""
        stats = " ".join(
            f"{name.lower()}={_ratio(self.succeeded.get(name, 0), tried)}"
            for name, tried in self.counts.items()
        )
        total = _ratio(sum(self.succeeded.values()), sum(self.counts.values()))
        log.event(
            self.program,
            f"disconnect from unknown[{self.client.ip}] {stats} commands={total}",
            client_ip=self.client.ip,
            listener=self.listener.name,
        )

    def _last_command(self) -> str:
        return self._command or self._previous or "CONNECT"

    async def _run_counted(self, name: str, method: Any, arg: str | None) -> None:
        counts = self.counts
        counts[name] = counts.get(name, 0) + 1
        self._command, self._command_arg = name, arg
        self._last_code, self._reject_logged = "", False
        try:
            await method(arg)
        finally:
            if self._last_code.startswith("2"):
                self.succeeded[name] = self.succeeded.get(name, 0) + 1
            self._previous, self._command = name, ""
            self._reject_logged = False

    # ---- replies ----------------------------------------------------------

    async def push(self, status: str | bytes) -> None:  # type: ignore[override]
        """Every reply goes out here: enhanced codes, escaping, and the error count.

        A reply may echo what the client sent (a HELO name, an address, a
        parameter); it is escaped to printable ASCII, so it always encodes and
        stays one line. A 4xx/5xx reply counts as a refused command; at
        HARD_ERROR_LIMIT the session ends with 421 (Postfix's hard error limit),
        counted here once rather than in every command.
        """
        raw, self._raw_replies = self._raw_replies, False
        if isinstance(status, bytes):
            await super().push(status)
            self._last_code = status[:3].decode("ascii", "replace")
            return
        text = printable(status if raw else _enhance(status))
        await self._send(text.encode("ascii") + b"\r\n")  # printable: ASCII only
        self._last_code = text[:3]
        if text[:1] in ("4", "5") and not self._reject_logged and self.refusal is None:
            self._log_refused(text)
        if text[:1] in ("4", "5") and self.refusal is None and not self._overshoot(text):
            self.errors += 1
            if self.errors >= HARD_ERROR_LIMIT and not text.startswith("421"):
                await self._too_many_errors()

    async def _send(self, data: bytes) -> None:
        """Write a reply; wait only when drain() would (a full buffer, a closing transport).

        A reply almost always goes to the kernel whole; drain() then returns
        at once, but costs two coroutine calls for every reply.
        """
        writer = self._writer
        writer.write(data)
        if writer.transport.get_write_buffer_size() or writer.is_closing():
            await writer.drain()

    def _overshoot(self, reply: str) -> bool:
        """True for a too-many-recipients reply that does not count as an error."""
        if not reply.startswith(TOO_MANY_RECIPIENTS) or self.overshoot >= RECIPIENT_OVERSHOOT_LIMIT:
            return False
        self.overshoot += 1
        return True

    async def _too_many_errors(self) -> None:
        """Say 421 and hang up; nothing the client pipelined after is read."""
        log.event(
            self.program,
            f"too many errors after {self._last_command()} from unknown[{self.client.ip}]",
            client_ip=self.client.ip,
        )
        self.services.metrics.refused(TOO_MANY_ERRORS)
        self._reader._buffer.clear()  # type: ignore[attr-defined]
        await super().push(TOO_MANY_ERRORS)
        if self.transport is not None:
            self.transport.close()
        if self._handler_coroutine is not None:
            self._handler_coroutine.cancel()

    async def _push_lines(self, code: int, lines: list[str]) -> None:
        text = "".join(
            f"{code}{'-' if i < len(lines) - 1 else ' '}{line}\r\n" for i, line in enumerate(lines)
        )
        self._last_code = str(code)
        await self._send(text.encode())

    def _tls_active(self) -> bool:
        return self.listener.tls == "implicit" or self._tls_protocol is not None

    def _tls_info(self) -> tuple[str | None, str | None]:
        if not self._tls_active() or self.transport is None:
            return None, None
        obj = self.transport.get_extra_info("ssl_object")
        if not isinstance(obj, ssl.SSLObject | ssl.SSLSocket):
            return None, None
        cipher = obj.cipher()
        return obj.version(), cipher[0] if cipher else None

    # ---- greeting and TLS ------------------------------------------------------

    async def smtp_EHLO(self, hostname: str | None) -> None:
        if not await self._helo_ok("EHLO", hostname):
            return
        assert hostname is not None
        self._reset_transaction()
        assert self.session is not None
        self.session.extended_smtp = True
        self.session.host_name = printable(hostname)
        lines = [
            self.hostname,
            "PIPELINING",
            f"SIZE {self.data_size_limit}",
            "8BITMIME",
            "SMTPUTF8",
            "ENHANCEDSTATUSCODES",
        ]
        if self.tls_context is not None and self._tls_protocol is None:
            lines.append("STARTTLS")
        if self._tls_active():
            lines.append("AUTH PLAIN LOGIN")
        await self._push_lines(250, lines)

    async def smtp_HELO(self, hostname: str | None) -> None:
        if not await self._helo_ok("HELO", hostname):
            return
        assert hostname is not None
        self._reset_transaction()
        assert self.session is not None
        self.session.extended_smtp = False
        self.session.host_name = printable(hostname)
        await self._push_lines(250, [self.hostname])

    async def _helo_ok(self, verb: str, hostname: str | None) -> bool:
        """Refuse a missing name, or one with control characters (no host has one).

        An accepted name is kept escaped to printable ASCII (8-bit bytes as
        ``\\xNN``): it goes into Received:, Received-SPF:, SPF queries, the
        spool and logs, and every one of them then takes it as it is.
        """
        if not hostname:
            await self.push(f"501 5.5.4 Syntax: {verb} hostname")
            return False
        if has_control(hostname):
            reply = f"501 5.5.2 <{hostname}>: {verb} name contains control characters"
            log.event(
                self.program,
                f"reject: {verb} from unknown[{self.client.ip}]: {reply}; "
                f"proto={'ESMTP' if verb == 'EHLO' else 'SMTP'} helo=<{hostname}>",
                queue_id="NOQUEUE",
                client_ip=self.client.ip,
                smtp_reply=reply,
            )
            self.services.metrics.refused(reply)
            await self.push(reply)
            return False
        return True

    async def smtp_STARTTLS(self, arg: str | None) -> None:
        if self.tls_context is None or self._tls_protocol is not None:
            await self.push("502 5.5.1 STARTTLS not available")
            return
        # Anything the client pipelined behind STARTTLS was sent in clear text
        # and must not be executed after the handshake (CVE-2011-0411).
        self._reader._buffer.clear()  # type: ignore[attr-defined]
        if arg:
            await self.push("501 5.5.4 Syntax: STARTTLS")
            return
        # The handshake gets HANDSHAKE_TIMEOUT, then _timeout_cb frees the slot.
        self._reset_timeout(min(HANDSHAKE_TIMEOUT, self._timeout_duration))
        await self.push("220 2.0.0 Ready to start TLS")
        await self._start_tls()
        self._reset_transaction()

    async def _start_tls(self) -> None:
        """What aiosmtpd's STARTTLS does, with relayd's TLSLayer (a 32 KiB buffer, not 256)."""
        assert self.tls_context is not None
        waiter: asyncio.Future[None] = self.loop.create_future()
        layer = TLSLayer(self.loop, self, self.tls_context, waiter, server_side=True)
        self._tls_protocol = layer
        self._original_transport = self.transport
        assert self._original_transport is not None
        self._original_transport.set_protocol(layer)
        self.transport = layer._app_transport
        layer.connection_made(self._original_transport)
        try:
            await waiter
        except asyncio.CancelledError:
            raise
        except Exception as error:  # aiosmtpd's loop closes the connection on this one
            raise TLSSetupException() from error

    async def smtp_RSET(self, arg: str | None) -> None:
        if arg:
            await self.push("501 5.5.4 Syntax: RSET")
            return
        self._reset_transaction()
        await self.push("250 2.0.0 Ok")

    async def smtp_QUIT(self, arg: str | None) -> None:
        """The slot is free before the 221: a client reconnecting at once is not over its limit."""
        if self._connected:
            self._release_slot()
        await super().smtp_QUIT(arg)

    async def smtp_NOOP(self, arg: str | None) -> None:
        await self.push("250 2.0.0 Ok")

    async def smtp_VRFY(self, arg: str | None) -> None:
        await self.push("252 2.0.0 Cannot VRFY user, but will accept message and attempt delivery")

    async def smtp_EXPN(self, arg: str | None) -> None:
        await self.push("502 5.5.1 EXPN not available")

    @property
    def sending_message(self) -> bool:
        """A message is under way (MAIL accepted, or DATA being read): a stop waits for it."""
        return self.in_data or self.queue_id is not None

    def _reset_transaction(self) -> None:
        self._set_rset_state()  # type: ignore[no-untyped-call]
        self.queue_id = None
        self.sender = None
        self.mail_params = {}
        self.recipients = []
        self.trace_headers = []
        self.check_state = None

    # ---- AUTH ---------------------------------------------------------------

    async def smtp_AUTH(self, arg: str | None) -> None:
        assert self.session is not None
        if not self.session.host_name or not self.session.extended_smtp:
            await self.push("503 5.5.1 Error: send EHLO first")
            return
        if self.listener.tls == "none":
            await self.push("503 5.5.1 Error: authentication not enabled")
            return
        if not self._tls_active():
            await self.push("530 5.7.0 Must issue a STARTTLS command first")
            return
        if await self.services.auth_guard.blocked(self.client.ip):
            mechanism = (arg or "").split(" ", 1)[0].upper()
            mechanism = mechanism if mechanism in ("PLAIN", "LOGIN") else "AUTH"
            blocked = Ticket(Outcome.ADDRESS_BLOCKED, address=client_key(self.client.ip))
            await self._auth_refused(mechanism, "", blocked)
            return
        await super().smtp_AUTH(arg)

    async def _close_with(self, reply: str) -> None:
        self.services.metrics.refused(reply)
        await self.push(reply)
        assert self.transport is not None
        self.transport.close()

    async def auth_PLAIN(self, _: Any, args: list[str]) -> AuthResult:
        blob = await self._auth_blob(args[1] if len(args) > 1 else None, "")
        if blob is None:
            return AuthResult(success=False, handled=True)
        parts = blob.split(b"\x00")
        if len(parts) != 3:
            await self.push("501 5.5.2 Cannot split authentication value")
            return AuthResult(success=False, handled=True)
        authzid, login = parts[0], parts[1]
        if authzid and authzid.lower() != login.lower():
            # Acting as another user is not something relayd offers (SPEC §7):
            # refused before any password is checked.
            log.event(
                self.program,
                f"warning: unknown[{self.client.ip}]: SASL PLAIN authentication failed: "
                "authorization identity differs from the login",
                level=logging.WARNING,
                client_ip=self.client.ip,
                sasl_username=login.decode("utf-8", "replace"),
            )
            reply = "535 5.7.8 Error: authorization identity must be empty or the login"
            self.services.metrics.refused(reply)
            return AuthResult(success=False, handled=False, message=reply)
        return await self._verify("PLAIN", login, parts[2])

    async def auth_LOGIN(self, _: Any, args: list[str]) -> AuthResult:
        login = await self._auth_blob(args[1] if len(args) > 1 else None, "Username:")
        if login is None:
            return AuthResult(success=False, handled=True)
        password = await self._auth_blob(None, "Password:")
        if password is None:
            return AuthResult(success=False, handled=True)
        return await self._verify("LOGIN", login, password)

    async def _auth_blob(self, initial: str | None, challenge: str) -> bytes | None:
        if initial is not None:
            if initial == "=":
                return b""
            try:
                return b64decode(initial.encode(), validate=True)
            except ValueError:
                await self.push("501 5.5.2 Cannot decode base64")
                return None
        blob = await self.challenge_auth(challenge)
        return None if not isinstance(blob, bytes) else blob

    async def _verify(self, mechanism: str, login: bytes, password: bytes) -> AuthResult:
        """Check a password within the limits of relayd.policy.authguard (SPEC §7)."""
        name = login.decode("utf-8", "replace")
        guard = self.services.auth_guard
        ticket = await guard.begin(self.client.ip, name)
        if ticket.outcome is not Outcome.CHECK:
            return await self._auth_refused(mechanism, name, ticket)
        try:
            ok = await self.services.users.verify(name, password.decode("utf-8", "replace"))
        except BaseException:
            guard.abandon(ticket)  # the session went away mid-check: counted as wrong
            raise
        delay = await guard.finish(ticket, ok)
        if ok:
            self.user = name.lower()
            self.sasl_method = mechanism
            return AuthResult(
                success=True,
                auth_data=LoginPassword(login, b""),
                message="235 2.7.0 Authentication successful",
            )
        log.event(
            self.program,
            f"warning: unknown[{self.client.ip}]: SASL {mechanism} "
            "authentication failed: authentication failure",
            level=logging.WARNING,
            client_ip=self.client.ip,
            sasl_username=name,
        )
        if delay > 0:
            await asyncio.sleep(delay)
        reply = "535 5.7.8 Error: authentication failed"
        self.services.metrics.refused(reply)
        return AuthResult(success=False, handled=False, message=reply)

    async def _auth_refused(self, mechanism: str, name: str, ticket: Ticket) -> AuthResult:
        """No password checked: the address, the account or the counts say no."""
        if ticket.outcome is Outcome.ADDRESS_BLOCKED:
            why = f"too many failed authentications from {ticket.address}"
            reply = "421 4.7.0 Too many failed authentications; try again later"
        elif ticket.outcome is Outcome.BUSY:
            why = f"too many authentications at once from {ticket.address}"
            reply = "454 4.7.0 Too many authentications at once; try again later"
        elif ticket.outcome is Outcome.ACCOUNT_LOCKED:
            why = "too many failed authentications for this account"
            reply = "454 4.7.0 Temporary authentication failure; try again later"
        else:
            why = "failure counts unavailable"
            reply = "454 4.7.0 Temporary authentication failure"
        log.event(
            self.program,
            f"warning: unknown[{self.client.ip}]: SASL {mechanism} authentication refused "
            f"without a password check: {why}",
            level=logging.WARNING,
            client_ip=self.client.ip,
            sasl_username=name,
        )
        if reply.startswith("421"):
            await self._close_with(reply)
            return AuthResult(success=False, handled=True)
        self.services.metrics.refused(reply)
        return AuthResult(success=False, handled=False, message=reply)

    # ---- the transaction ------------------------------------------------------

    def _may_relay(self) -> bool:
        if self.user is not None:
            return True
        # The address and the session's config snapshot never change, so the
        # networks are searched once per session, not at every MAIL, RCPT and DATA.
        ip_may = self._ip_may_relay
        if ip_may is None or ip_may[0] != self.client.ip:
            ip = self.client.ip
            ip_may = self._ip_may_relay = (
                ip, may_relay(False, ip, self.services.config.relay.networks)
            )
        return ip_may[1]

    async def smtp_MAIL(self, arg: str | None) -> None:
        refusal = await self._mail_refusal(arg)
        if refusal is not None:
            self.services.metrics.refused(refusal)
            await self.push(refusal)
            return
        assert self.queue_id is not None
        await self.push("250 2.1.0 Ok")

    async def _mail_refusal(self, arg: str | None) -> str | None:
        assert self.session is not None
        if not self.session.host_name:
            return "503 5.5.1 Error: send HELO/EHLO first"
        if self.listener.mode == "submission" and self.user is None:
            return "530 5.7.0 Authentication required"
        if self.queue_id is not None:
            return "503 5.5.1 Error: nested MAIL command"
        if not arg or arg[:5].upper() != "FROM:":
            return "501 5.5.4 Syntax: MAIL FROM:<address>"
        try:
            sender, param_text = parse_path(arg[5:], allow_null=True, smtputf8=True)
            params = parse_params(param_text)
        except (AddressError, ValueError) as exc:
            return f"501 5.1.7 Bad sender address syntax: {exc}"
        problem = self._mail_params_problem(params, sender)
        if problem:
            return problem
        return await self._mail_policy(sender, params)

    def _mail_params_problem(
        self, params: dict[str, str | None], sender: Address | None
    ) -> str | None:
        limit = self.services.config.limits.max_message_size
        for key, value in params.items():
            if key == "SIZE":
                if value is None or not (value.isascii() and value.isdigit()):
                    return "501 5.5.4 Bad SIZE parameter"
                if int(value) > limit:
                    return "552 5.3.4 Message size exceeds fixed limit"
            elif key == "BODY":
                if (value or "").upper() not in ("7BIT", "8BITMIME"):
                    return "501 5.5.4 BODY must be 7BIT or 8BITMIME"
            elif key == "SMTPUTF8":
                if value is not None:
                    return "501 5.5.4 SMTPUTF8 takes no value"
            else:
                return f"555 5.5.4 Unsupported MAIL parameter {key}"
        if sender is not None and sender.needs_smtputf8 and "SMTPUTF8" not in params:
            return "553 5.6.7 Non-ASCII sender requires SMTPUTF8"
        return None

    async def _mail_policy(
        self, sender: Address | None, params: dict[str, str | None]
    ) -> str | None:
        services = self.services
        if services.spool_full():
            return "452 4.3.1 Insufficient system storage"
        if self.user is not None:
            verdict = services.sender_verdict(self.user, str(sender) if sender else "")
            if verdict is not None:
                return verdict.reply()
        domain = sender.domain if sender else ""
        verdict = await services.rate_limiter.acheck(
            time.time(), self.client.ip, self.user, domain, record=False
        )
        if verdict is not None:
            return verdict.reply()
        assert self.session is not None
        verdict, trace, self.check_state = await services.checks.at_mail(
            self.client,
            self.session.host_name or "",
            sender,
            self.user is not None or self._may_relay(),
        )
        if verdict is not None:
            return verdict.reply()
        self.trace_headers = trace
        self.sender = sender
        self.mail_params = params
        self.queue_id = new_queue_id()
        who = f"client=unknown[{self.client.ip}]"
        if self.user is not None:
            who += f", sasl_method={self.sasl_method}, sasl_username={self.user}"
        log.event(
            self.program,
            who,
            queue_id=self.queue_id,
            client_ip=self.client.ip,
            sasl_username=self.user,
            listener=self.listener.name,
        )
        return None

    async def smtp_RCPT(self, arg: str | None) -> None:
        reply = await self._rcpt_reply(arg)
        if not reply.startswith("250"):
            self.services.metrics.refused(reply)
            self._log_reject("RCPT", reply, arg)
        await self.push(reply)

    async def _rcpt_reply(self, arg: str | None) -> str:
        if self.queue_id is None:
            return "503 5.5.1 Error: need MAIL command"
        if not arg or arg[:3].upper() != "TO:":
            return "501 5.5.4 Syntax: RCPT TO:<address>"
        try:
            rcpt, param_text = parse_path(
                arg[3:], allow_null=False, smtputf8="SMTPUTF8" in self.mail_params
            )
            params = parse_params(param_text)
        except (AddressError, ValueError) as exc:
            return f"501 5.1.3 Bad recipient address syntax: {exc}"
        assert rcpt is not None
        if params:
            return f"555 5.5.4 Unsupported RCPT parameter {next(iter(params))}"
        if len(self.recipients) >= self.services.config.limits.max_recipients:
            return "452 4.5.3 Error: too many recipients"
        relay = self.services.config.relay
        relay_allowed = self._may_relay()
        verdict = recipient_verdict(
            rcpt,
            relay_allowed=relay_allowed,
            inbound=self.listener.mode == "inbound",
            domains=relay.domains,
        )
        if verdict is None and not relay_allowed:
            # A stranger writing to a served domain: refuse unknown users now,
            # rather than accept and bounce to a sender who is likely forged.
            verdict = await self.services.recipients.verdict(rcpt)
        if verdict is not None:
            return f"{verdict.code} {verdict.enhanced} <{rcpt}>: {verdict.text}"
        if self.user is not None:  # submission (SPEC §10): not inbound, not [relay] networks
            suppressed = await self.services.suppressed(str(rcpt))
            if suppressed is not None:
                return suppressed
        self.recipients.append(rcpt)
        return "250 2.1.5 Ok"

    def _log_refused(self, reply: str) -> None:
        """Every refused command gets a line (SPEC §9), unless its handler wrote one.

        AUTH failures have their own warning (fail2ban reads it), a 421 that
        ends the session is logged where it is decided.
        """
        if self._command in ("AUTH", "") and not reply.startswith("500"):
            return
        if reply.startswith("421"):
            return
        if not self._command:  # not a command relayd knows: Postfix's "unknown=0/1"
            self.counts["UNKNOWN"] = self.counts.get("UNKNOWN", 0) + 1
        self._log_reject(self._command or "UNKNOWN", reply, self._command_arg)

    def _log_reject(self, stage: str, reply: str, arg: str | None) -> None:
        assert self.session is not None
        self._reject_logged = True
        sender = f"<{self.sender}>" if self.sender else "<>"
        if stage == "MAIL":
            sender = (arg or "")[5:].strip() or "<>"
        parties = f"from={sender}"
        if stage == "RCPT":
            parties += f" to={(arg or '')[3:].strip()}"
        log.event(
            self.program,
            f"reject: {stage} from unknown[{self.client.ip}]: {reply}; "
            f"{parties} proto={'ESMTP' if self.session.extended_smtp else 'SMTP'} "
            f"helo=<{self.session.host_name or ''}>",
            # Nothing is queued before DATA: a refused RCPT is NOQUEUE, as Postfix logs it.
            queue_id="NOQUEUE" if stage == "RCPT" else self.queue_id or "NOQUEUE",
            client_ip=self.client.ip,
            smtp_reply=reply,
        )

    async def smtp_DATA(self, arg: str | None) -> None:
        if self.queue_id is None:
            await self.push("503 5.5.1 Error: need MAIL command")
            return
        if not self.recipients:
            await self.push("554 5.5.1 Error: no valid recipients")
            return
        if arg:
            await self.push("501 5.5.4 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        self.in_data = True
        try:
            await self._receive()
        finally:
            self.in_data = False

    async def _receive(self) -> None:
        """Read the message, decide, and answer: the part a stop waits for."""
        result = await dataread.read_data(
            self._reader,
            self.services.config.limits.max_message_size,
            on_progress=self._reset_timeout,
            spill_dir=self.services.spill_dir or None,
        )
        try:
            reply = await self._accept(result)
        except Exception:  # never a 5xx or a stuck session for our own bug
            log.event(
                self.program,
                "error: cannot accept message; told the client to retry",
                queue_id=self.queue_id,
                level=logging.ERROR,
                exc_info=True,
            )
            reply = "451 4.3.0 Error: local problem, try again later"
        finally:
            if result.content is not None:
                result.content.discard()
            self._reset_transaction()
        if reply.startswith("250"):
            self.services.metrics.message_accepted(self.listener.name)
        else:
            self.services.metrics.refused(reply)
        await self.push(reply)

    async def _accept(self, result: dataread.DataResult) -> str:
        if result.problem is not None:
            reply = _DATA_PROBLEMS[result.problem]
            self._log_reject("END-OF-MESSAGE", reply, None)
            return reply
        assert self.queue_id is not None and self.session is not None
        content = result.content
        assert content is not None
        try:
            head = await self._prepare(content)
        except _Refused as refused:
            self._log_reject("END-OF-MESSAGE", refused.reply, None)
            return refused.reply
        # Checked and counted in one step (no await between on one node, one
        # Lua script with [cluster] redis), so parallel sessions from one
        # client cannot all slip under the limit.
        verdict = await self.services.rate_limiter.acheck(
            time.time(),
            self.client.ip,
            self.user,
            self.sender.domain if self.sender else None,
            record=True,
        )
        if verdict is not None:
            self._log_reject("END-OF-MESSAGE", verdict.reply(), None)
            return verdict.reply()
        # The stored message: our head (trace, results, signature, the header
        # block) and then the rest of what the client sent, from wherever it is.
        if content.memory is not None:
            rest = memoryview(content.memory)[content.body_offset :]
            data, tail = b"".join((head, rest)), None
        else:
            assert content.path is not None
            data, tail = head, (content.path, content.body_offset)
        envelope = self._envelope(len(head) + content.size - content.body_offset)
        try:
            await self.services.enqueue(envelope, data, tail)
        except SpoolError as exc:
            log.event(
                self.program,
                f"warning: queue file write error: {exc}",
                queue_id=self.queue_id,
                level=logging.ERROR,
            )
            return "451 4.3.0 Error: queue file write error"
        message_id = headers.message_id(head)
        log.event(self.program, f"message-id={message_id}", queue_id=self.queue_id)
        return f"250 2.0.0 Ok: queued as {self.queue_id}"

    async def _prepare(self, content: Content) -> bytes:
        """Policy on the header block, then ours on top: what goes before the body.

        Only the header block is parsed here; checks that need the whole
        message (DKIM) read it from ``content`` in bounded pieces.
        """
        services = self.services
        header = content.header
        if headers.count_received(header) > MAX_HOPS:
            raise _Refused("554 5.4.6 Too many hops: mail forwarding loop")
        # Results claiming to be ours are forged, whoever sends them (RFC 8601 §5).
        header = authresults.strip_forged(header, services.config.hostname)
        if self.user is not None:
            refusal = identity.header_refusal(
                header, lambda address: services.sender_verdict(self.user or "", address)
            )
            if refusal is not None:
                raise _Refused(refusal.reply())
        submitted = self.user is not None or self._may_relay()
        assert self.session is not None
        verdict, results = await services.checks.at_data(
            self.client,
            self.session.host_name or "",
            self.sender,
            submitted,
            content,
            self.check_state,
        )
        if verdict is not None:
            raise _Refused(verdict.reply())
        signature = b""
        if submitted:
            header = headers.submission_fixups(header, services.config.hostname)
            signature = await services.sign(header, content)
        # Received-SPF goes above our Received: (RFC 7208 §9.1).
        return b"".join(self.trace_headers) + self._received() + results + signature + header

    def _received(self) -> bytes:
        assert self.session is not None and self.queue_id is not None
        version, cipher = self._tls_info()
        info = headers.TraceInfo(
            helo=self.session.host_name or "",
            client_ip=self.client.ip,
            hostname=self.services.config.hostname,
            queue_id=self.queue_id,
            recipient=str(self.recipients[0]) if len(self.recipients) == 1 else None,
            esmtp=bool(self.session.extended_smtp),
            tls_version=version,
            tls_cipher=cipher,
            authenticated=self.user is not None,
        )
        return headers.received(info)

    def _envelope(self, size: int) -> Envelope:
        assert self.queue_id is not None and self.session is not None
        return Envelope(
            queue_id=self.queue_id,
            sender=str(self.sender) if self.sender else "",
            recipients=[Recipient(address=str(r)) for r in self.recipients],
            arrival_time=time.time(),
            size=size,
            client_ip=self.client.ip,
            helo=self.session.host_name or "",
            listener=self.listener.name,
            sasl_username=self.user or "",
            smtputf8="SMTPUTF8" in self.mail_params,
            body_8bit=(self.mail_params.get("BODY") or "").upper() == "8BITMIME",
        )


def _ratio(succeeded: int, tried: int) -> str:
    return str(tried) if succeeded == tried else f"{succeeded}/{tried}"


class _Refused(Exception):
    def __init__(self, reply: str) -> None:
        super().__init__(reply)
        self.reply = reply


def _enhance(status: str) -> str:
    """Give a reply the RFC 3463 code its class implies when it has none."""
    if _HAS_ENHANCED.match(status) or status[:1] not in "245":
        return status
    enhanced = _DEFAULT_ENHANCED.get(status[:3])
    if enhanced is None:
        enhanced = f"{status[0]}.0.0"
    return f"{status[:4]}{enhanced} {status[4:]}"


_Names = tuple[tuple[str, str], ...]
_METHOD_NAMES: dict[type, tuple[_Names, _Names]] = {}


def _method_names(cls: type) -> tuple[_Names, _Names]:
    """(command, method) for ``smtp_*`` and (mechanism, method) for ``auth_*``, as aiosmtpd."""
    found = _METHOD_NAMES.get(cls)
    if found is None:
        found = _METHOD_NAMES[cls] = _find_method_names(cls)
    return found


def _find_method_names(cls: type) -> tuple[_Names, _Names]:
    names = dir(cls)
    smtp = tuple((m.replace("smtp_", ""), m) for m in names if m.startswith("smtp_"))
    auth = tuple(
        (
            getattr(
                getattr(cls, m),
                "__auth_mechanism_name__",
                m.replace("auth_", "").replace("__", "-"),
            ),
            m,
        )
        for m in names
        if m.startswith("auth_")
    )
    return smtp, auth


_COMMAND_TABLES: dict[type, dict[str, str]] = {}


def _command_table(cls: type) -> dict[str, str]:
    """Command name to ``smtp_*`` method name, found once per class."""
    table = _COMMAND_TABLES.get(cls)
    if table is None:
        table = _COMMAND_TABLES[cls] = dict(_method_names(cls)[0])
    return table


# Longest command line by command after EHLO (512 otherwise), as aiosmtpd allows them.
_COMMAND_LIMITS = {"MAIL": 1024, "RCPT": 1024, "AUTH": 2048}
_NO_HOOKS: dict[str, Any] = {}


def writable(transport: object) -> TypeGuard[asyncio.WriteTransport]:
    """A transport we can write to; uvloop's do not subclass asyncio's ABCs."""
    return transport is not None and hasattr(transport, "write") and hasattr(transport, "abort")
