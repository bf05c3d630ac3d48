"""Reading the DATA section: fast, and deaf to every end-of-data but CRLF.CRLF.

aiosmtpd reads DATA one line per await and splits lines only on CRLF, so a
bare ``\\n.\\n`` passes into the content and smuggles a second message past
any downstream server that ends DATA on a bare LF. Here DATA is read in
large chunks, the end is found with one ``bytes.find`` per chunk, and the
whole section is then checked in C-speed passes: a bare CR or LF anywhere,
or a line over 998 octets, refuses the message (never split, never queued).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

END = b"\r\n.\r\n"
CHUNK = 256 * 1024
MAX_LINE = 998  # octets, without CRLF (RFC 5322 §2.1.1)


@dataclass(frozen=True)
class DataResult:
    """The unstuffed message, or why it was refused (``message`` is then empty)."""

    message: bytes
    size: int  # octets received, even when the message was dropped
    problem: str | None = None  # "too_big" | "bare_newline" | "line_too_long"


def check_and_unstuff(raw: bytes) -> tuple[bytes, str | None]:
    """Validate a DATA body (without the final ``.CRLF``) and undo dot-stuffing.

    ``raw`` starts at the first octet after the 354 reply and ends with the
    CRLF of the last line (or is empty). Every pass here runs in C: a regex
    like ``[^\\r\\n]{999,}`` would backtrack at each position instead.
    """
    crlf = raw.count(b"\r\n")
    if raw.count(b"\n") != crlf or raw.count(b"\r") != crlf:
        return b"", "bare_newline"
    message = raw.replace(b"\r\n.", b"\r\n")
    if message.startswith(b"."):
        message = message[1:]
    if len(message) > MAX_LINE and max(map(len, message.split(b"\r\n"))) > MAX_LINE:
        return b"", "line_too_long"
    return message, None


async def read_data(
    reader: asyncio.StreamReader,
    max_size: int,
    on_progress: Callable[[], None] | None = None,
) -> DataResult:
    """Read DATA up to CRLF.CRLF; octets pipelined after it stay in ``reader``.

    Past ``max_size`` the content is discarded while reading goes on to the
    end marker, so the client gets its 552 at the right moment and the
    session stays in step.
    """
    buf = bytearray(b"\r\n")  # a virtual line end: ".\r\n" right away is the end too
    searched = 0
    received = 0
    too_big = False
    while True:
        end = buf.find(END, searched)
        if end >= 0:
            _unread(reader, bytes(buf[end + len(END) :]))
            body = bytes(buf[2 : end + 2])
            if too_big or len(body) > max_size:
                return DataResult(b"", received, "too_big")
            message, problem = check_and_unstuff(body)
            return DataResult(message, len(body), problem)
        if received > max_size + len(END):
            # Over the limit: keep only what could still hold part of the end marker.
            too_big = True
            del buf[: -(len(END) - 1)]
        searched = max(0, len(buf) - len(END) + 1)
        chunk = await reader.read(CHUNK)
        if not chunk:
            raise ConnectionResetError("connection closed during DATA")
        if on_progress is not None:
            on_progress()
        received += len(chunk)
        buf += chunk


def _unread(reader: asyncio.StreamReader, data: bytes) -> None:
    """Give back octets read past the end marker (pipelined commands)."""
    if data:
        reader._buffer[0:0] = data  # type: ignore[attr-defined]
