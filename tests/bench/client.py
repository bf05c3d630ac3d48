"""A small asyncio SMTP client for what smtp-source does not report.

- per-message latency of the end of DATA: the time from sending the final
  ``.`` to the server's 250, over N concurrent sessions;
- the queue id of every message that got a 250 (for the durability check),
  with reconnection and resending of unanswered messages, as a real client
  would do while the server restarts;
- idle sessions: many connections held open after EHLO, and how long a new
  client then waits for its greeting.

Commands go in lock step (no pipelining), like smtp-source. Every loop is
bounded by a message count and every wait by a timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from bench.mta import LOOPBACK, RECIPIENT, SENDER

REPLY_TIMEOUT = 60.0
_QUEUED_AS = re.compile(r"queued as ([0-9A-Za-z]+)")


class SMTPError(Exception):
    def __init__(self, code: int, text: str) -> None:
        super().__init__(f"{code} {text}")
        self.code = code
        self.text = text


def message_body(size: int) -> bytes:
    """``size`` octets of body in 78-octet lines (plus CRLFs), no line starting with a dot."""
    line = b"abcdefghijklmnopqrstuvwxyz0123456789" * 3
    line = line[:76] + b"\r\n"
    lines, rest = divmod(max(size, 1), len(line))
    return line * lines + (b"x" * max(0, rest - 2) + b"\r\n" if rest > 2 else b"")


def message_head(seq: int, tag: str) -> bytes:
    return (
        f"From: <{SENDER}>\r\nTo: <{RECIPIENT}>\r\nSubject: bench {tag} {seq}\r\n"
        f"Message-ID: <{tag}.{seq}@bench.test>\r\nX-Bench-Seq: {tag}.{seq}\r\n\r\n"
    ).encode()


class Conn:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int, timeout: float, ehlo: bool = True) -> Conn:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(LOOPBACK, port, limit=1 << 20), timeout
        )
        conn = cls(reader, writer)
        try:
            code, text = await conn.reply(timeout)
            if code != 220:
                raise SMTPError(code, text)
            if ehlo:
                await conn.expect("EHLO client.bench.test", 250, timeout)
        except BaseException:
            conn.close()
            raise
        return conn

    async def reply(self, timeout: float = REPLY_TIMEOUT) -> tuple[int, str]:
        lines = []
        while True:
            raw = await asyncio.wait_for(self.reader.readline(), timeout)
            if not raw.endswith(b"\n"):
                raise ConnectionResetError("connection closed by the server")
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            lines.append(line[4:])
            if len(line) < 4 or line[3] != "-":
                return int(line[:3]), "\n".join(lines)

    async def expect(self, line: str, code: int, timeout: float = REPLY_TIMEOUT) -> str:
        self.writer.write(line.encode() + b"\r\n")
        got, text = await self.reply(timeout)
        if got != code:
            raise SMTPError(got, text)
        return text

    async def send(self, body: bytes) -> tuple[float, str]:
        """One transaction; (seconds from the final "." to the 250, its text)."""
        await self.expect(f"MAIL FROM:<{SENDER}>", 250)
        await self.expect(f"RCPT TO:<{RECIPIENT}>", 250)
        await self.expect("DATA", 354)
        self.writer.write(body)
        await self.writer.drain()
        start = time.perf_counter()
        self.writer.write(b".\r\n")
        code, text = await self.reply()
        elapsed = time.perf_counter() - start
        if code != 250:
            raise SMTPError(code, text)
        return elapsed, text

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()

    async def quit(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.write(b"QUIT\r\n")
            await asyncio.wait_for(self.reply(), 5)
        self.close()


@dataclass
class LoadResult:
    count: int
    sessions: int
    size: int
    elapsed: float = 0.0
    latencies: list[float] = field(default_factory=list)
    acked: dict[str, str] = field(default_factory=dict)  # X-Bench-Seq -> queue id
    unanswered: int = 0  # a transaction cut off before its reply (then resent)
    refused: int = 0  # a transaction answered with something other than 250
    failed: int = 0  # messages given up on
    capped: bool = False  # the time cap stopped it before ``count``

    @property
    def rate(self) -> float:
        return len(self.acked) / self.elapsed if self.elapsed else 0.0


async def send_load(
    port: int,
    *,
    sessions: int,
    count: int,
    size: int,
    tag: str,
    resend_for: float = 0.0,
    on_ack: Callable[[LoadResult], None] | None = None,
    cap: float | None = None,
    per_message: bool = False,
) -> LoadResult:
    """``count`` messages over ``sessions`` concurrent sessions.

    ``per_message``: a new connection for each message (QUIT after its 250),
    as applications and ``smtp-source`` without ``-d`` do; otherwise each
    session is kept for its next message.

    With ``resend_for`` > 0 a session whose connection breaks reconnects
    (for up to that many seconds) and sends the unanswered message again.
    After ``cap`` seconds no new message is started (``capped``).
    """
    result = LoadResult(count, sessions, size)
    stop_at = None if cap is None else time.monotonic() + cap
    body = message_body(size)
    todo = list(range(count - 1, -1, -1))

    async def worker() -> None:
        conn: Conn | None = None
        seq: int | None = None
        try:
            while todo or seq is not None:
                if seq is None:
                    if stop_at is not None and time.monotonic() > stop_at:
                        result.capped = True
                        return
                    seq = todo.pop()
                if conn is None:
                    conn = await _connect(port, resend_for)
                    if conn is None:
                        result.failed += 1 + len(todo)
                        todo.clear()
                        return
                key = f"{tag}.{seq}"
                try:
                    latency, text = await conn.send(message_head(seq, tag) + body)
                except (OSError, EOFError, TimeoutError, ConnectionError):
                    conn.close()
                    conn = None
                    result.unanswered += 1
                    if not resend_for:
                        result.failed += 1
                        seq = None
                    continue
                except SMTPError as e:
                    result.refused += 1
                    conn.close()
                    conn = None
                    if not resend_for or e.code >= 500:
                        result.failed += 1
                        seq = None
                    continue
                result.latencies.append(latency)
                m = _QUEUED_AS.search(text)
                result.acked[key] = m.group(1) if m else ""
                seq = None
                if on_ack is not None:
                    on_ack(result)
                if per_message:
                    await conn.quit()
                    conn = None
        finally:
            if conn is not None:
                await conn.quit()

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(sessions)))
    result.elapsed = time.perf_counter() - start
    return result


async def _connect(port: int, resend_for: float) -> Conn | None:
    deadline = time.monotonic() + max(resend_for, 0.0)
    while True:
        try:
            return await Conn.open(port, 10.0)
        except (OSError, TimeoutError, SMTPError, ConnectionError):
            if time.monotonic() >= deadline:
                if resend_for:
                    return None
                raise
        await asyncio.sleep(0.05)


@dataclass
class IdleSessions:
    wanted: int
    established: int = 0  # greeted and answered EHLO
    waiting: int = 0  # connected, no greeting within the timeout (kept open)
    failed: int = 0  # could not connect within the timeout
    skipped: int = 0  # not tried: the opening as a whole ran out of time
    seconds: float = 0.0
    conns: list[Conn] = field(default_factory=list)
    pending: list[asyncio.StreamWriter] = field(default_factory=list)

    async def close(self) -> None:
        for c in self.conns:
            c.close()
        for w in self.pending:
            with contextlib.suppress(Exception):
                w.close()
        self.conns.clear()
        self.pending.clear()
        await asyncio.sleep(0)


async def hold_idle(
    port: int, n: int, timeout: float, parallel: int = 100, limit: float = 60.0
) -> IdleSessions:
    """Open ``n`` sessions and leave them idle after EHLO (``parallel`` handshakes at once).

    No new connection is started once ``limit`` seconds have passed.
    """
    idle = IdleSessions(n)
    gate = asyncio.Semaphore(parallel)
    stop_at = time.monotonic() + limit

    async def one() -> None:
        async with gate:
            if time.monotonic() > stop_at:
                idle.skipped += 1
                return
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(LOOPBACK, port), timeout
                )
            except (OSError, TimeoutError):
                idle.failed += 1
                return
            conn = Conn(reader, writer)
            try:
                code, _ = await conn.reply(timeout)
                if code != 220:
                    raise SMTPError(code, "")
                await conn.expect("EHLO idle.bench.test", 250, timeout)
            except TimeoutError:
                idle.waiting += 1
                idle.pending.append(writer)
                return
            except (OSError, SMTPError, ConnectionError):
                idle.failed += 1
                conn.close()
                return
            idle.established += 1
            idle.conns.append(conn)

    start = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(n)))
    idle.seconds = time.perf_counter() - start
    return idle


async def time_to_greeting(port: int, timeout: float) -> float | None:
    """Seconds from connect() to a complete 220 line; None if not within ``timeout``."""
    start = time.perf_counter()
    try:
        conn = await Conn.open(port, timeout, ehlo=False)
    except (OSError, TimeoutError, SMTPError, ConnectionError):
        return None
    elapsed = time.perf_counter() - start
    await conn.quit()
    return elapsed
