"""A next hop that misbehaves on purpose, for :attr:`MXServer.raw_handler`.

aiosmtpd is a well-behaved server; what a hostile or broken next hop does
has to be written by hand on raw asyncio streams:

- ``inject``: bytes sent in the same write as the ``220`` to STARTTLS, in
  clear text, as a man in the middle would (the client side of
  CVE-2011-0411). Inside TLS the server then refuses every transaction.
- ``rcpt_reply(i, address)``: the reply (raw bytes, CR LF included) to the
  i-th RCPT of a session: megabytes, hundreds of lines, control bytes.
- ``banner`` / ``ehlo_name``: the name the server calls itself.
- ``after_greeting``: bytes sent right behind the greeting, unasked.

Every read has a timeout and every loop a bound, so a confused client can
never hang a test.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import threading
from collections.abc import Callable
from pathlib import Path

from .certs import server_context

_TIMEOUT = 15.0
_MAX_COMMANDS = 1000

ReplyFor = Callable[[int, str], bytes]


def _ok(_: int, __: str) -> bytes:
    return b"250 2.1.5 ok\r\n"


class Hostile:
    """One scripted behaviour, shared by every connection of an MXServer."""

    def __init__(
        self,
        *,
        cert: tuple[Path, Path] | None = None,
        inject: bytes = b"",
        rcpt_reply: ReplyFor = _ok,
        banner: str = "hostile.test",
        ehlo_name: str | None = None,
        after_greeting: bytes = b"",
        pipelining: bool = True,
    ) -> None:
        self.context: ssl.SSLContext | None = server_context(cert) if cert else None
        self.inject = inject
        self.rcpt_reply = rcpt_reply
        self.banner = banner
        self.ehlo_name = ehlo_name or banner
        self.after_greeting = after_greeting
        self.pipelining = pipelining
        self.lock = threading.Lock()
        self.commands: list[tuple[bool, str]] = []  # (inside TLS, command)
        self.sessions = 0
        self.messages = 0  # end of data accepted

    def saw(self, verb: str) -> list[tuple[bool, str]]:
        with self.lock:
            return [c for c in self.commands if c[1].upper().startswith(verb)]

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with self.lock:
            self.sessions += 1
        with contextlib.suppress(
            TimeoutError, ConnectionError, asyncio.IncompleteReadError, ssl.SSLError, OSError
        ):
            await self._session(reader, writer)

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(f"220 {self.banner} ESMTP\r\n".encode() + self.after_greeting)
        await writer.drain()
        tls = False
        rcpt = 0
        for _ in range(_MAX_COMMANDS):
            line = await asyncio.wait_for(reader.readline(), _TIMEOUT)
            if not line:
                return
            cmd = line.decode("utf-8", "replace").strip()
            with self.lock:
                self.commands.append((tls, cmd))
            verb = cmd.split(" ")[0].split(":")[0].upper()
            if verb == "EHLO":
                exts = ["8BITMIME", "SMTPUTF8"]
                if self.pipelining:
                    exts.append("PIPELINING")
                if self.context is not None and not tls:
                    exts.append("STARTTLS")
                lines = [self.ehlo_name, *exts]
                text = "".join(f"250-{x}\r\n" for x in lines[:-1]) + f"250 {lines[-1]}\r\n"
                writer.write(text.encode())
            elif verb == "STARTTLS" and self.context is not None and not tls:
                # The injection travels in the same segment as the 220.
                writer.write(b"220 2.0.0 ready\r\n" + self.inject)
                await writer.drain()
                plain = writer.transport
                await writer.start_tls(self.context)
                if writer.transport is None:  # the client hung up during the handshake
                    # Give the writer its closed transport back, so that its
                    # __del__ does not trip over None.
                    writer._transport = plain  # type: ignore[attr-defined]
                    return
                tls = True
                rcpt = 0
                continue
            elif verb == "MAIL":
                writer.write(b"554 5.7.1 refused inside TLS\r\n" if self.inject else b"250 ok\r\n")
            elif verb == "RCPT":
                if self.inject:
                    writer.write(b"554 5.7.1 refused inside TLS\r\n")
                else:
                    writer.write(self.rcpt_reply(rcpt, cmd[9:].strip("<> ")))
                rcpt += 1
            elif verb == "DATA":
                writer.write(b"554 5.5.1 no valid recipients\r\n")
            elif verb == "QUIT":
                writer.write(b"221 2.0.0 bye\r\n")
                await writer.drain()
                return
            else:
                writer.write(b"250 2.0.0 ok\r\n")
            await writer.drain()
