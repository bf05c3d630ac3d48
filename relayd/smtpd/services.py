"""What a session may call on: one immutable snapshot, built by the daemon.

A session talks to the rest of relayd only through this object, which keeps
the SMTP code ignorant of how the spool, the users file or DNS work, and
lets a reload hand new sessions a new snapshot while old ones finish on
theirs. Long-lived counters (rate limits, connection counts) are shared
between snapshots so a reload does not reset them.
"""

from __future__ import annotations

import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

from relayd.address import Address
from relayd.config import Config
from relayd.metrics import Metrics
from relayd.policy.authguard import Ticket
from relayd.policy.verdict import Verdict
from relayd.smtpd.content import Content
from relayd.spool.model import Envelope
from relayd.spool.store import Tail


@dataclass(frozen=True)
class ClientInfo:
    ip: str
    port: int
    listener: str
    inbound: bool  # on an inbound (port 25 style) listener


class Checks(Protocol):
    """Content and sender checks that need DNS (SPF, DKIM verification, DMARC).

    ``at_data`` returns the header lines to prepend (Authentication-Results),
    never a whole message: the message itself stays where the session put it
    (memory or a spool file) and is only read, in chunks, through ``content``.
    Stripping forged Authentication-Results is the session's job, for every
    client (relayd.smtpd.authresults.strip_forged on ``content.header``).
    """

    async def at_mail(
        self, client: ClientInfo, helo: str, sender: Address | None, trusted: bool
    ) -> tuple[Verdict, list[bytes], object]:
        """A refusal, trace headers to add, and state handed on to ``at_data``."""
        ...

    async def at_data(
        self,
        client: ClientInfo,
        helo: str,
        sender: Address | None,
        trusted: bool,
        content: Content,
        state: object,
    ) -> tuple[Verdict, bytes]:
        """A refusal, and the header lines to prepend (b"" for none)."""
        ...


class NoChecks:
    """Used where no inbound checks are configured."""

    async def at_mail(
        self, client: ClientInfo, helo: str, sender: Address | None, trusted: bool
    ) -> tuple[Verdict, list[bytes], object]:
        return None, [], None

    async def at_data(
        self,
        client: ClientInfo,
        helo: str,
        sender: Address | None,
        trusted: bool,
        content: Content,
        state: object,
    ) -> tuple[Verdict, bytes]:
        return None, b""


class Users(Protocol):
    async def verify(self, name: str, password: str) -> bool: ...


class Connections(Protocol):
    def acquire(self, ip: str) -> Verdict: ...
    def release(self, ip: str) -> None: ...


class AuthGuard(Protocol):
    """Wrong-password counts shared by every process (relayd.policy.authguard)."""

    async def blocked(self, ip: str) -> bool: ...
    async def begin(self, ip: str, name: str) -> Ticket: ...
    async def finish(self, ticket: Ticket, ok: bool) -> float: ...
    def abandon(self, ticket: Ticket) -> None: ...


class RecipientCheck(Protocol):
    """Does a served domain have this user? (``[relay] recipients_file`` / ``verify_recipients``)"""

    async def verdict(self, rcpt: Address) -> Verdict: ...


class NoRecipientCheck:
    """Every user of a served domain is taken to exist (the default)."""

    async def verdict(self, rcpt: Address) -> Verdict:
        return None


class RateLimiter(Protocol):
    async def acheck(
        self, now: float, ip: str, user: str | None, sender_domain: str | None, *, record: bool
    ) -> Verdict: ...


@dataclass
class _FreeSpaceCache:
    """statvfs at most once a second: cheap enough for every MAIL command."""

    probe: Callable[[], int]
    value: int = 0
    checked: float = 0.0

    def get(self) -> int:
        now = time.monotonic()
        if now - self.checked > 1.0:
            self.value = self.probe()
            self.checked = now
        return self.value


@dataclass(frozen=True)
class Services:
    config: Config
    tls_context: ssl.SSLContext | None
    users: Users
    connections: Connections
    auth_guard: AuthGuard
    rate_limiter: RateLimiter
    # The message is the bytes, then the rest of a file (a large message) when given.
    enqueue: Callable[[Envelope, bytes, Tail | None], Awaitable[None]]
    sender_verdict: Callable[[str, str], Verdict]
    # sign(header, content): the DKIM-Signature line(s) to prepend for the
    # message header + content's body (b"" when no key matches); the header
    # is the block as it will be stored, after the session's own fixups.
    sign: Callable[[bytes, Content], Awaitable[bytes]]
    checks: Checks = field(default_factory=NoChecks)
    recipients: RecipientCheck = field(default_factory=NoRecipientCheck)
    # The RCPT reply for an address on the suppression list (relayd.suppression),
    # asked only for authenticated clients' mail; None: not suppressed.
    suppressed: Callable[[str], Awaitable[str | None]] = field(default=lambda _: _not_suppressed())
    free_space: Callable[[], int] = lambda: 1 << 62
    spill_dir: str = ""  # where DATA goes once it is large: the spool's tmp/
    # The daemon's one registry, shared across reloads; a private one counts for nobody.
    metrics: Metrics = field(default_factory=Metrics)
    _free: _FreeSpaceCache | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "_free", _FreeSpaceCache(self.free_space))

    def spool_full(self) -> bool:
        """Under the ``[spool] min_free_space`` floor: refuse new mail with 452 4.3.1."""
        assert self._free is not None
        return self._free.get() < self.config.spool.min_free_space


async def _not_suppressed() -> None:
    return None


def server_tls_context(cert: str, key: str) -> ssl.SSLContext:
    """TLS for listeners: TLS 1.2+, the operator's certificate chain."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    return ctx
