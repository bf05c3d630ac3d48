"""The outbound SMTP client: one session to one address of one next hop.

Written on asyncio streams rather than aiosmtplib, for three reasons:

- ``verify`` and ``tls_verify`` dial an address that DNS gave us but must
  check the certificate against the MX (or route) *name*. aiosmtplib uses
  the dialled host as the TLS server name for implicit TLS, so it would
  check the certificate against an IP address.
- PIPELINING (RFC 2920): MAIL, every RCPT and DATA go out in one write and
  their replies are read in order, one round trip instead of N+2.
- Every reply goes through ``reply.py``, so there is one parser and one
  place that decides what a code means; 4xx and 5xx are values here, not
  exceptions to catch.

What the caller sees: ``open_session`` either returns a ready ``Session``
(greeted, EHLO done, TLS and AUTH as the policy asks) or raises
``SessionError``, which means "try the next address or MX". ``Session.send``
never raises for anything the server says: it returns one Outcome per
recipient, and a lost connection or timeout becomes a temporary Outcome for
every recipient not yet answered.

TLS policy (``[delivery] tls`` and ``[[route]] tls``):

- ``opportunistic``: STARTTLS when offered, any certificate. If the TLS
  handshake fails, the same address is retried once in clear text at once,
  as Postfix does for its ``may`` level: opportunistic TLS only ever guards
  against passive eavesdropping (RFC 7435), and a server with a broken TLS
  stack should still get its mail rather than have it wait for days.
- ``required``: STARTTLS must be offered and succeed (any certificate unless
  ``verify``); otherwise the hop fails with 4.7.4 / 4.7.5 and nothing is sent.
- ``implicit``: TLS from the first byte (port 465), same verification rules.
- ``none``: clear text, STARTTLS is never tried.

A next hop is not trusted to behave (SPEC section 8). Bytes buffered after
the ``220`` to STARTTLS, or before any command outside PIPELINING, are never
taken as a reply: the session is dropped (4.7.5 for STARTTLS injection,
4.5.0 otherwise). Replies are bounded as they are read (reply.MAX_LINE,
MAX_LINES, MAX_REPLY_BYTES, command_timeout per reply) and every Outcome
carries them escaped and cut to 1 KB. A next hop that greets with our own
hostname, where no ``[[route]]`` chose it, raises ``LoopsBack``.

AUTH (PLAIN, else LOGIN) is only ever sent inside TLS. A message with 8-bit
data goes out with BODY=8BITMIME when offered, and as it is when not: MIME
down-conversion would break DKIM signatures, and servers that choke on 8-bit
data are rarer today than ones that check signatures. SMTPUTF8 is asked for
when the envelope has non-ASCII addresses (if it is not offered, those
recipients fail with 5.6.7, since there is no faithful downgrade) and also
when the submitting client used it, if offered.
"""

from __future__ import annotations

import _ssl
import asyncio
import base64
import contextlib
import os
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

from relayd.config import DeliveryConfig, Route
from relayd.delivery import dane
from relayd.delivery.dane import TLSA
from relayd.delivery.reply import (
    MAX_LINE,
    MAX_LINES,
    MAX_REPLY_BYTES,
    DeliveryError,
    MalformedReply,
    Outcome,
    Reply,
    ReplyLine,
    ehlo_extensions,
    parse_line,
    parse_reply,
    size_limit,
)

TLSMode = Literal["none", "opportunistic", "required", "implicit"]
TLSContextFactory = Callable[[bool, Path | None], ssl.SSLContext]

_QUIT_TIMEOUT = 2.0
_VERBS = frozenset({"EHLO", "HELO", "STARTTLS", "AUTH", "MAIL", "RCPT", "DATA", "RSET", "QUIT"})


@dataclass(frozen=True)
class TLSPolicy:
    """How to protect one session; ``verify`` checks the cert against the host name.

    ``name`` says where the policy came from, for the attempt records, the
    log and the metrics: ``[delivery] tls`` (``none``, ``opportunistic``,
    ``required``, ``verify``) or ``route``. It does not take part in
    comparisons: two policies that protect a session alike are equal.
    """

    mode: TLSMode
    verify: bool = False
    ca_file: Path | None = None
    name: str = field(default="", compare=False)
    # DANE: the certificate must match one of these TLSA records (and needs no CA).
    dane: tuple[TLSA, ...] = ()
    # MTA-STS testing: try a verified handshake, fall back to unverified TLS, note why.
    sts_testing: bool = False


def tls_policy(delivery: DeliveryConfig, route: Route | None) -> TLSPolicy:
    """The policy for a hop: the route's own settings, else ``[delivery] tls``."""
    if route is not None:
        if route.tls == "none":
            return TLSPolicy("none", name="route")
        mode: TLSMode = "implicit" if route.tls == "implicit" else "required"
        return TLSPolicy(mode, route.tls_verify, route.ca_file, name="route")
    if delivery.tls == "verify":
        return TLSPolicy("required", verify=True, ca_file=delivery.ca_file, name="verify")
    if delivery.tls == "required":
        return TLSPolicy("required", name="required")
    if delivery.tls == "none":
        return TLSPolicy("none", name="none")
    return TLSPolicy("opportunistic", name="opportunistic")


def default_tls_context(verify: bool, ca_file: Path | None) -> ssl.SSLContext:
    """The system trust store (plus ``ca_file``) when verifying; anything otherwise."""
    if verify:
        ctx = ssl.create_default_context()
        if ca_file is not None:
            ctx.load_verify_locations(cafile=str(ca_file))
        return ctx
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def load_credentials(route: Route | None) -> tuple[str, str] | None:
    """(username, password) for a route that authenticates; read at each connect.

    Reading it each time lets an operator rotate the password without a
    reload. A missing or unreadable file defers (4.3.5): mail waits for the
    fix instead of going out unauthenticated.
    """
    if route is None or route.username is None:
        return None
    if route.password_file is None:
        raise DeliveryError(Outcome.temp("4.3.5", "route has a username but no password_file"))
    try:
        text = route.password_file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DeliveryError(Outcome.temp("4.3.5", f"cannot read route password_file: {e}")) from e
    lines = text.splitlines()
    return route.username, (lines[0].strip() if lines else "")


def encode_data(data: bytes) -> bytes:
    """The message as it goes on the wire after DATA: CR LF lines, dot-stuffed, ended.

    Lines ending in a bare LF are given CR LF; the spool should not hold
    any, but a stray one must not end the message early on the remote side.
    """
    if not data:
        return b".\r\n"
    text = data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    if not text.endswith(b"\r\n"):
        text += b"\r\n"
    if text.startswith(b"."):
        text = b"." + text
    return text.replace(b"\r\n.", b"\r\n..") + b".\r\n"


def needs_smtputf8(sender: str, recipients: list[str]) -> bool:
    return not (sender.isascii() and all(r.isascii() for r in recipients))


@dataclass(frozen=True)
class Endpoint:
    """Where one session goes and how: ``host`` is the name TLS is checked against."""

    host: str
    address: str
    port: int
    helo: str
    tls: TLSPolicy
    context: ssl.SSLContext | None = None
    credentials: tuple[str, str] | None = None
    connect_timeout: float = 30.0
    command_timeout: float = 300.0
    myself: str | None = None  # our own hostname: a next hop greeting with it is us

    @property
    def where(self) -> str:
        return f"{self.host}[{self.address}]:{self.port}"


class SessionError(DeliveryError):
    """The session could not be set up or kept up: try the next address or MX."""


class ConnectFailed(SessionError):
    """The address refused the connection or did not answer it in time."""


class LoopsBack(SessionError):
    """The next hop greeted us with our own hostname: the mail would come back to us."""


class _TLSFailed(SessionError):
    """The TLS handshake itself failed (opportunistic TLS may go on in clear)."""

    verification = False  # the certificate was refused, not the connection


class _Broken(Exception):
    """The connection is gone or unusable; carries the Outcome for what's unanswered."""

    def __init__(self, outcome: Outcome) -> None:
        super().__init__(outcome.reply)
        self.outcome = outcome


class Session:
    """A greeted, ready SMTP session; use ``open_session`` to get one."""

    def __init__(
        self, endpoint: Endpoint, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.endpoint = endpoint
        self._reader = reader
        self._writer = writer
        self.extensions: dict[str, str] = {}
        self.messages = 0
        self._broken = False
        self.notes: list[str] = []  # what MTA-STS enforce would have refused (testing mode)

    # -- state -------------------------------------------------------------

    @property
    def address(self) -> str:
        return self.endpoint.address

    @property
    def tls_version(self) -> str | None:
        """ "TLSv1.3" and the like, or None for clear text."""
        obj = self._writer.get_extra_info("ssl_object")
        return obj.version() if isinstance(obj, ssl.SSLObject | ssl.SSLSocket) else None

    @property
    def verified(self) -> bool:
        """The session is encrypted and its certificate was checked (host name, or DANE)."""
        tls = self.endpoint.tls
        return self.tls_version is not None and (tls.verify or bool(tls.dane))

    @property
    def usable(self) -> bool:
        return not self._broken and not self._writer.is_closing()

    # -- wire --------------------------------------------------------------

    async def _write(self, data: bytes, doing: str) -> None:
        try:
            writer = self._writer
            writer.write(data)
            # Everything handed to the kernel at once, as a command is: drain()
            # would return at once, and the timer around it would cost more.
            if writer.transport.get_write_buffer_size() == 0 and not writer.is_closing():
                return
            async with asyncio.timeout(self.endpoint.command_timeout):
                await writer.drain()
        except TimeoutError as e:
            raise self._fail(f"timed out while {doing}") from e
        except (OSError, ConnectionError) as e:
            raise self._fail(f"lost connection while {doing}: {e}") from e

    async def _command(self, line: str) -> None:
        verb = line.split(" ")[0].upper()
        what = verb if verb in _VERBS else "AUTH data"  # never a secret in an error text
        await self._write(line.encode("utf-8") + b"\r\n", f"sending {what}")

    async def _read(self, doing: str) -> Reply:
        """One whole reply, within command_timeout, bounded in lines and bytes.

        A line over MAX_LINE octets, more than MAX_LINES lines or
        MAX_REPLY_BYTES in all is a protocol error: the session is dropped
        and the recipients deferred (4.5.0), nothing more is read.
        """
        lines: list[str] = []
        parsed: list[ReplyLine] = []
        size = 0
        try:
            async with asyncio.timeout(self.endpoint.command_timeout):
                while len(lines) < MAX_LINES:
                    raw = await self._reader.readline()
                    if not raw.endswith(b"\n"):
                        raise self._fail(f"lost connection while {doing}")
                    size += len(raw)
                    if size > MAX_REPLY_BYTES:
                        break
                    lines.append(raw.decode("utf-8", errors="surrogateescape"))
                    parsed.append(parse_line(lines[-1]))
                    if parsed[-1].last:
                        return self._note(parse_reply(lines, parsed))
        except TimeoutError as e:
            raise self._fail(f"timed out while {doing}") from e
        except ValueError as e:  # MalformedReply, or a line over the reader's limit
            why = e if isinstance(e, MalformedReply) else "reply line too long"
            raise self._fail(f"malformed reply while {doing}: {why}", "4.5.0") from e
        except (OSError, ConnectionError) as e:
            raise self._fail(f"lost connection while {doing}: {e}") from e
        raise self._fail(f"reply too long while {doing}", "4.5.0")

    def _unsolicited(self, doing: str) -> None:
        """Refuse to go on if the server has sent something we did not ask for yet.

        Outside PIPELINING a server speaks only when spoken to: bytes waiting
        before a command is sent are not its reply, whatever they say. Read
        later, they would be taken as the answer to the next command (the
        class of CVE-2011-0411), so the session is dropped instead.
        """
        if buffered(self._reader):
            raise self._fail(f"unexpected data from the server before {doing}", "4.5.0")

    def _note(self, reply: Reply) -> Reply:
        """A 421 means the server is closing the session (RFC 5321 3.8): never reuse it."""
        if reply.code == 421:
            self.abort()
        return reply

    async def _ask(self, line: str, doing: str) -> Reply:
        verb = line.split(" ")[0].upper()
        self._unsolicited(f"sending {verb if verb in _VERBS else 'AUTH data'}")
        await self._command(line)
        return await self._read(doing)

    def _fail(self, text: str, enhanced: str = "4.4.2") -> _Broken:
        self.abort()
        return _Broken(Outcome.temp(enhanced, f"{self.endpoint.where}: {text}"))

    # -- session setup -----------------------------------------------------

    async def _greet(self) -> None:
        greeting = await self._read("waiting for the greeting")
        if greeting.code != 220:
            raise self._refuse(greeting, "greeted us with")
        self._check_loop(greeting)
        await self._ehlo()

    def _check_loop(self, reply: Reply) -> None:
        """A next hop that calls itself by our name is us (Postfix: "loops back to myself").

        The first word of the 220 banner or of the EHLO reply is the
        server's name (RFC 5321 4.2). Checked only where ``myself`` is set:
        not for ``[[route]]`` next hops, which the operator chose.
        """
        me = self.endpoint.myself
        words = reply.lines[0].split() if reply.lines else []
        if me and words and words[0].rstrip(".").lower() == me.rstrip(".").lower():
            self.abort()
            text = f"{self.endpoint.where} greeted us with our own hostname {me}"
            raise LoopsBack(Outcome.perm("5.4.6", text))

    async def _ehlo(self) -> None:
        reply = await self._ask(f"EHLO {self.endpoint.helo}", "waiting for the reply to EHLO")
        if reply.code == 250:
            self._check_loop(reply)
            self.extensions = ehlo_extensions(reply)
            return
        if not reply.permanent:
            raise self._refuse(reply, "refused EHLO with")
        reply = await self._ask(f"HELO {self.endpoint.helo}", "waiting for the reply to HELO")
        if reply.code != 250:
            raise self._refuse(reply, "refused HELO with")
        self._check_loop(reply)
        self.extensions = {}

    def _refuse(self, reply: Reply, how: str) -> SessionError:
        self.abort()
        text = f"{self.endpoint.where} {how}: {reply.line()}"
        return SessionError(replace(Outcome.refused(reply), reply=text))

    async def _starttls(self) -> None:
        """STARTTLS as the policy wants; returns in clear only where that is allowed."""
        mode = self.endpoint.tls.mode
        if mode not in ("opportunistic", "required"):
            return
        # A domain's own policy (DANE, MTA-STS) that cannot be met is 4.7.5 (SPEC section 8).
        missing = "4.7.5" if self.endpoint.tls.name in ("dane", "mta-sts") else "4.7.4"
        if "STARTTLS" not in self.extensions:
            if mode == "required":
                raise self._refuse_tls(missing, "TLS is required, but was not offered")
            return
        reply = await self._ask("STARTTLS", "waiting for the reply to STARTTLS")
        if reply.code != 220:
            if mode == "required":
                raise self._refuse_tls(missing, f"STARTTLS refused: {reply.line()}")
            return
        self._injected("after the reply to STARTTLS")
        await self._handshake()
        self._injected("in clear text before the TLS handshake")
        await self._ehlo()

    def _injected(self, where: str) -> None:
        """STARTTLS response injection (the client side of CVE-2011-0411).

        Bytes already buffered after the ``220`` to STARTTLS came in clear
        text, from the server or from anyone on the path; read after the
        handshake they would pass for replies from the authenticated server
        (a forged ``250`` to the end of data would lose the message). Such a
        session is dropped as a TLS failure of this host (4.7.5): the next
        address or MX is tried, else the recipients are deferred. It is not
        retried in clear, even under opportunistic TLS, since someone is
        tampering with the connection.
        """
        if buffered(self._reader):
            raise self._refuse_tls("4.7.5", f"STARTTLS injection: unexpected data {where}")

    async def _handshake(self) -> None:
        ep = self.endpoint
        assert ep.context is not None
        clear = self._writer.transport
        try:
            await self._writer.start_tls(
                ep.context, server_hostname=ep.host, ssl_handshake_timeout=ep.connect_timeout
            )
        except (ssl.SSLError, OSError, ConnectionError, TimeoutError) as e:
            self.abort()
            text = f"{ep.where}: TLS handshake failed: {_tls_error(e)}"
            failed = _TLSFailed(Outcome.temp("4.7.5", text))
            failed.verification = isinstance(e, ssl.SSLCertVerificationError)
            raise failed from e
        if self._writer.transport is None:  # the peer hung up during the handshake
            # Python 3.11's start_tls leaves the writer without a transport, and the
            # writer's __del__ would then print an "Exception ignored" traceback.
            self._writer._transport = clear  # type: ignore[attr-defined]
            clear.abort()
            self._broken = True
            text = f"{ep.where}: TLS handshake failed: connection closed"
            raise _TLSFailed(Outcome.temp("4.7.5", text))
        if ep.tls.dane:
            self._check_dane()

    def _check_dane(self) -> None:
        """RFC 7672: the presented chain must match a TLSA record, else no mail for this host."""
        chain = _peer_chain(self._writer.get_extra_info("ssl_object"))
        problem = dane.check_chain(self.endpoint.tls.dane, chain, [self.endpoint.host])
        if problem is not None:
            raise self._refuse_tls("4.7.5", f"DANE: {problem}")

    def _refuse_tls(self, enhanced: str, text: str) -> SessionError:
        self.abort()
        return SessionError(Outcome.temp(enhanced, f"{self.endpoint.where}: {text}"))

    async def _auth(self) -> None:
        creds = self.endpoint.credentials
        if creds is None:
            return
        if self.tls_version is None:
            raise self._refuse_tls("4.7.4", "refusing to send AUTH over clear text")
        mechs = self.extensions.get("AUTH", "").upper().split()
        if "PLAIN" in mechs:
            reply = await self._auth_plain(*creds)
        elif "LOGIN" in mechs:
            reply = await self._auth_login(*creds)
        else:
            raise self._refuse_tls("4.7.4", "AUTH PLAIN or LOGIN is not offered")
        if reply.code != 235:
            # Our credentials are ours to fix: defer, never bounce.
            self.abort()
            text = f"{self.endpoint.where} refused AUTH: {reply.line()}"
            raise SessionError(replace(Outcome.of(reply).softened(), reply=text))

    async def _auth_plain(self, user: str, password: str) -> Reply:
        token = _b64(f"\0{user}\0{password}")
        reply = await self._ask(f"AUTH PLAIN {token}", "waiting for the reply to AUTH")
        if reply.code == 334:  # a server that ignores the initial response
            reply = await self._ask(token, "waiting for the reply to AUTH")
        return reply

    async def _auth_login(self, user: str, password: str) -> Reply:
        reply = await self._ask("AUTH LOGIN", "waiting for the reply to AUTH")
        for secret in (user, password):
            if reply.code != 334:
                return reply
            reply = await self._ask(_b64(secret), "waiting for the reply to AUTH")
        return reply

    # -- one message -------------------------------------------------------

    async def send(
        self,
        sender: str,
        recipients: list[str],
        data: bytes,
        *,
        smtputf8: bool = False,
        body_8bit: bool = False,
    ) -> dict[str, Outcome]:
        """Offer one message to ``recipients``; one Outcome per recipient, never raises."""
        refusal = self._precheck(sender, recipients, data)
        if refusal is not None:
            return dict.fromkeys(recipients, refusal)
        self.messages += 1
        outcomes: dict[str, Outcome] = {}
        try:
            await self._transaction(sender, recipients, data, smtputf8, body_8bit, outcomes)
        except _Broken as e:
            for rcpt in recipients:
                outcomes.setdefault(rcpt, e.outcome)
        return outcomes

    def _precheck(self, sender: str, recipients: list[str], data: bytes) -> Outcome | None:
        """What this server cannot take, found before a byte is sent."""
        if needs_smtputf8(sender, recipients) and "SMTPUTF8" not in self.extensions:
            text = f"{self.endpoint.where}: SMTPUTF8 is required, but was not offered"
            return Outcome.perm("5.6.7", text)
        limit = size_limit(self.extensions)
        if limit is not None and len(data) > limit:
            text = f"{self.endpoint.where}: message size {len(data)} exceeds size limit {limit}"
            return Outcome.perm("5.3.4", text)
        return None

    def _mail_command(self, sender: str, size: int, utf8: bool, body_8bit: bool) -> str:
        params = []
        if "SIZE" in self.extensions:
            params.append(f"SIZE={size}")
        if body_8bit and "8BITMIME" in self.extensions:
            params.append("BODY=8BITMIME")
        if utf8 and "SMTPUTF8" in self.extensions:
            params.append("SMTPUTF8")
        return " ".join([f"MAIL FROM:<{sender}>", *params])

    async def _transaction(
        self,
        sender: str,
        recipients: list[str],
        data: bytes,
        smtputf8: bool,
        body_8bit: bool,
        outcomes: dict[str, Outcome],
    ) -> None:
        utf8 = smtputf8 or needs_smtputf8(sender, recipients)
        mail = self._mail_command(sender, len(data), utf8, body_8bit or not data.isascii())
        rcpts = [f"RCPT TO:<{r}>" for r in recipients]
        exchange = self._pipelined if "PIPELINING" in self.extensions else self._lockstep
        mail_reply, rcpt_replies, data_reply = await exchange(mail, rcpts)
        if mail_reply.code // 100 != 2:
            outcomes.update(dict.fromkeys(recipients, Outcome.refused(mail_reply)))
            await self._end_refused_data(data_reply)
            return
        accepted = _accepted(recipients, rcpt_replies, outcomes)
        if not accepted or data_reply is None:
            await self._end_refused_data(data_reply)
            return
        if data_reply.code != 354:
            outcomes.update(dict.fromkeys(accepted, Outcome.refused(data_reply)))
            return
        self._unsolicited("sending the message")  # nothing may follow the 354
        await self._write(encode_data(data), "sending the message")
        final = await self._read("waiting for the reply to the end of data")
        outcomes.update(dict.fromkeys(accepted, Outcome.of(final)))

    async def _pipelined(
        self, mail: str, rcpts: list[str]
    ) -> tuple[Reply, list[Reply], Reply | None]:
        """RFC 2920: MAIL, RCPTs and DATA in one write, replies read in order."""
        batch = "".join(f"{c}\r\n" for c in [mail, *rcpts, "DATA"]).encode("utf-8")
        self._unsolicited("sending MAIL")
        await self._write(batch, "sending MAIL, RCPT and DATA")
        mail_reply = await self._read("waiting for the reply to MAIL")
        rcpt_replies = [await self._read("waiting for the reply to RCPT") for _ in rcpts]
        data_reply = await self._read("waiting for the reply to DATA")
        return mail_reply, rcpt_replies, data_reply

    async def _lockstep(
        self, mail: str, rcpts: list[str]
    ) -> tuple[Reply, list[Reply], Reply | None]:
        mail_reply = await self._ask(mail, "waiting for the reply to MAIL")
        if mail_reply.code // 100 != 2:
            return mail_reply, [], None
        rcpt_replies = [await self._ask(r, "waiting for the reply to RCPT") for r in rcpts]
        if not any(r.code // 100 == 2 for r in rcpt_replies):
            return mail_reply, rcpt_replies, None
        data_reply = await self._ask("DATA", "waiting for the reply to DATA")
        return mail_reply, rcpt_replies, data_reply

    async def _end_refused_data(self, data_reply: Reply | None) -> None:
        """A pipelined DATA that got 354 with no recipient left: send an empty end.

        RFC 2920 section 3.1: the client then sends a lone dot, which a
        correct server refuses for want of recipients.
        """
        if data_reply is not None and data_reply.code == 354:
            self._unsolicited("ending an empty message")
            await self._write(b".\r\n", "ending an empty message")
            await self._read("waiting for the reply to the end of data")

    # -- asking about a recipient --------------------------------------------

    async def probe_recipient(self, recipient: str) -> Outcome:
        """Would the server take mail for ``recipient``? MAIL FROM:<>, RCPT, RSET; no data.

        The Outcome is the RCPT reply's ("sent" meaning it would be taken).
        A refused MAIL FROM:<> says nothing about the recipient, so it comes
        back temporary. Never raises for anything the server says or does.
        """
        utf8 = needs_smtputf8("", [recipient])
        if utf8 and "SMTPUTF8" not in self.extensions:
            text = f"{self.endpoint.where}: SMTPUTF8 is required, but was not offered"
            return Outcome.perm("5.6.7", text)
        try:
            mail = await self._ask(
                "MAIL FROM:<>" + (" SMTPUTF8" if utf8 else ""), "waiting for the reply to MAIL"
            )
            if mail.code // 100 != 2:
                return Outcome.refused(mail).softened()
            rcpt = await self._ask(f"RCPT TO:<{recipient}>", "waiting for the reply to RCPT")
        except _Broken as e:
            return e.outcome
        await self.reset()
        return Outcome.of(rcpt) if rcpt.code // 100 == 2 else Outcome.refused(rcpt)

    # -- between and after messages ------------------------------------------

    async def reset(self) -> bool:
        """RSET before the next message; False when the session is no longer usable."""
        if not self.usable:
            return False
        try:
            reply = await self._ask("RSET", "waiting for the reply to RSET")
        except _Broken:
            return False
        if reply.code != 250:
            self.abort()
            return False
        return True

    async def quit(self) -> None:
        """Say goodbye politely, but never wait long for it."""
        if self.usable:
            with contextlib.suppress(_Broken, TimeoutError):
                async with asyncio.timeout(_QUIT_TIMEOUT):
                    await self._ask("QUIT", "waiting for the reply to QUIT")
        await self.close()

    async def close(self) -> None:
        """Close cleanly (TLS close_notify included) if that is quick, else drop."""
        self._broken = True
        self._writer.close()
        try:
            async with asyncio.timeout(_QUIT_TIMEOUT):
                await self._writer.wait_closed()
        except (TimeoutError, OSError, ssl.SSLError):
            self.abort()

    def abort(self) -> None:
        """Drop the connection now: a broken session owes the server no goodbye."""
        self._broken = True
        transport: asyncio.WriteTransport | None = self._writer.transport
        if transport is not None:  # None after a handshake the peer cut short
            transport.abort()


def _accepted(
    recipients: list[str], replies: list[Reply], outcomes: dict[str, Outcome]
) -> list[str]:
    """The recipients the server took; the refused ones get their Outcome."""
    accepted = []
    for rcpt, reply in zip(recipients, replies, strict=True):
        if reply.code // 100 == 2:
            accepted.append(rcpt)
        else:
            outcomes[rcpt] = Outcome.refused(reply)
    return accepted


def buffered(reader: asyncio.StreamReader) -> int:
    """Bytes received and not yet read. StreamReader has no public way to ask."""
    buffer = getattr(reader, "_buffer", None)
    if buffer is None:  # pragma: no cover - guards against asyncio internals changing
        raise RuntimeError("asyncio.StreamReader has no _buffer: cannot check for injection")
    return len(buffer)


def _b64(text: str) -> str:
    return base64.b64encode(text.encode("utf-8")).decode("ascii")


def _tls_error(e: BaseException) -> str:
    if isinstance(e, ssl.SSLCertVerificationError):
        return f"certificate verification failed: {e.verify_message}"
    if isinstance(e, TimeoutError):
        return "timed out"
    return str(e) or e.__class__.__name__


async def _connect(ep: Endpoint) -> Session:
    implicit = ep.tls.mode == "implicit"
    try:
        async with asyncio.timeout(ep.connect_timeout):
            reader, writer = await asyncio.open_connection(
                ep.address,
                ep.port,
                ssl=ep.context if implicit else None,
                server_hostname=ep.host if implicit else None,
                ssl_handshake_timeout=ep.connect_timeout if implicit else None,
                limit=MAX_LINE,  # readline() refuses a longer line
            )
    except ssl.SSLError as e:
        text = f"{ep.where}: TLS handshake failed: {_tls_error(e)}"
        raise SessionError(Outcome.temp("4.7.5", text)) from e
    except TimeoutError as e:
        raise ConnectFailed(Outcome.temp("4.4.1", f"connect to {ep.where}: timed out")) from e
    except OSError as e:
        # asyncio words it "Connect call failed (addr)"; say what the OS said.
        reason = os.strerror(e.errno) if e.errno else (str(e) or e.__class__.__name__)
        raise ConnectFailed(Outcome.temp("4.4.1", f"connect to {ep.where}: {reason}")) from e
    return Session(ep, reader, writer)


async def _setup(ep: Endpoint) -> Session:
    session = await _connect(ep)
    try:
        await session._greet()
        await session._starttls()
        await session._auth()
    except _Broken as e:
        raise SessionError(e.outcome) from e
    except BaseException:
        session.abort()
        raise
    return session


async def open_session(ep: Endpoint) -> Session:
    """A ready session to ``ep``, or SessionError (try the next address or MX)."""
    if ep.tls.mode != "none" and ep.context is None:
        raise ValueError("a TLS policy needs an SSL context")
    try:
        session = await _setup(ep)
    except _TLSFailed as e:
        if ep.tls.mode != "opportunistic":
            raise
        if ep.tls.sts_testing and e.verification:
            # MTA-STS testing: enforce would refuse this certificate; deliver as
            # usual (TLS without verification) and say so.
            relaxed = replace(ep.tls, verify=False, sts_testing=False, name=ep.tls.name)
            session = await open_session(
                replace(ep, tls=relaxed, context=default_tls_context(False, None))
            )
            session.notes.append(f"certificate not valid ({e.outcome.reply})")
            return session
        # Opportunistic TLS whose handshake failed: the same address, in clear.
        session = await _setup(replace(ep, tls=TLSPolicy("none", name=ep.tls.name), context=None))
        if ep.tls.sts_testing:
            session.notes.append(f"TLS failed ({e.outcome.reply})")
        return session
    if ep.tls.sts_testing and session.tls_version is None:
        session.notes.append(f"{ep.where} offers no STARTTLS")
    return session


def _peer_chain(ssl_object: object) -> list[bytes]:
    """The certificates the server presented, leaf first, as DER.

    Python 3.13 has ``get_unverified_chain``; before it, the same method sits
    on the private ``_sslobj``. Without either, the leaf alone (enough for
    DANE-EE, the common case).
    """
    getter = getattr(ssl_object, "get_unverified_chain", None)
    if getter is not None:
        return [bytes(der) for der in getter() or []]
    inner = getattr(ssl_object, "_sslobj", None)
    getter = getattr(inner, "get_unverified_chain", None)
    if getter is not None:
        return [cert.public_bytes(_ssl.ENCODING_DER) for cert in getter() or []]
    getpeercert = getattr(ssl_object, "getpeercert", None)
    leaf = getpeercert(binary_form=True) if getpeercert is not None else None
    return [leaf] if leaf else []
