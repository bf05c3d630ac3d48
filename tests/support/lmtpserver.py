"""A small LMTP server (RFC 2033) on loopback TCP or a Unix socket, for delivery tests.

Written on raw asyncio streams so that it can answer per recipient after
DATA the way Dovecot does: ``full@...`` gets ``452 4.2.2`` there,
``nouser@...`` a ``550 5.1.1`` at RCPT, everyone else ``250``.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path

from support import LoopThread, ThreadedServer


@dataclass
class Delivered:
    sender: str
    recipient: str
    data: bytes


@dataclass
class LMTPServer(ThreadedServer):
    host: str = "127.0.0.1"
    port: int = 0
    socket_path: Path | None = None
    delivered: list[Delivered] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._loop = LoopThread("lmtp-server")
        self._server: asyncio.AbstractServer | None = None

    def start(self) -> LMTPServer:
        self._loop.start()
        self._server = self._loop.call(self._listen())
        return self

    async def _listen(self) -> asyncio.AbstractServer:
        if self.socket_path is not None:
            return await asyncio.start_unix_server(self._session, path=str(self.socket_path))
        return await asyncio.start_server(self._session, self.host, self.port)

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        def say(line: str) -> None:
            writer.write(line.encode() + b"\r\n")

        say("220 lmtp.test LMTP ready")
        sender, rcpts = "", []
        while line := (await reader.readline()).decode().rstrip("\r\n"):
            self.commands.append(line)
            verb = line[:4].upper()
            if verb == "LHLO":
                say("250-lmtp.test\r\n250 PIPELINING")
            elif verb == "MAIL":
                sender, rcpts = line[10:].strip("<>"), []
                say("250 2.1.0 Ok")
            elif verb == "RCPT":
                rcpt = line[8:].strip("<>")
                if rcpt.startswith("nouser@"):
                    say(f"550 5.1.1 <{rcpt}> User doesn't exist")
                else:
                    rcpts.append(rcpt)
                    say("250 2.1.5 Ok")
            elif verb == "DATA":
                say("354 go ahead")
                await writer.drain()
                data = b""
                while (chunk := await reader.readline()) != b".\r\n":
                    data += chunk[1:] if chunk.startswith(b"..") else chunk
                for rcpt in rcpts:
                    if rcpt.startswith("full@"):
                        say(f"452 4.2.2 <{rcpt}> Mailbox is full")
                    else:
                        self.delivered.append(Delivered(sender, rcpt, data))
                        say(f"250 2.0.0 <{rcpt}> Saved")
            elif verb == "QUIT":
                say("221 2.0.0 Bye")
                break
            else:
                say("500 5.5.1 Unknown command")
            await writer.drain()
        writer.close()
