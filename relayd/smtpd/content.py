"""A received message as the session holds it: header block in memory, the rest where it fits.

Policy only ever needs the header block (From:, Received:, Authentication-Results),
so that is all that is kept as ``bytes`` for every message. The whole message
stays in memory only while it is small; a large one lives in a file under the
spool's ``tmp/`` from the moment it arrives, so a peer sending 25 MB costs
relayd a few hundred kilobytes of buffers, not the message's size. What must
see the whole message (DKIM) reads it in chunks with :meth:`Content.chunks`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

READ_CHUNK = 1 << 20


@dataclass
class Content:
    """One message as received (unstuffed, CRLF line ends, nothing added yet)."""

    header: bytes  # the header block: whole lines with their CRLF, without the blank line
    size: int  # octets of the whole message
    memory: bytes | None = None  # the whole message, when it stayed in memory
    path: str | None = None  # else the file that holds the whole message

    @classmethod
    def from_bytes(cls, message: bytes) -> Content:
        return cls(header=split_header(message), size=len(message), memory=message)

    @property
    def body_offset(self) -> int:
        """Where the part after the header block starts (the blank line, if any)."""
        return len(self.header)

    def chunks(self, start: int = 0, size: int = READ_CHUNK) -> Iterator[bytes]:
        """The message from ``start`` to its end, a bounded piece at a time."""
        if self.memory is not None:
            view = memoryview(self.memory)
            for i in range(start, len(self.memory), size):
                yield bytes(view[i : i + size])
            return
        assert self.path is not None
        with open(self.path, "rb") as f:
            f.seek(start)
            while piece := f.read(size):
                yield piece

    def read(self) -> bytes:
        """The whole message in memory: only for callers that bound its size first."""
        if self.memory is not None:
            return self.memory
        return b"".join(self.chunks())

    def discard(self) -> None:
        """Remove the file behind a large message (idempotent)."""
        if self.path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            self.path = None


def split_header(message: bytes, limit: int | None = None) -> bytes:
    """The header block of ``message``: up to the first empty line, at most ``limit`` octets.

    A message without an empty line is all header (RFC 5322); past ``limit``
    the block is cut at a line end so that policy parses a bounded amount.
    """
    if message.startswith(b"\r\n"):
        return b""
    end = message.find(b"\r\n\r\n", 0, None if limit is None else limit + 2)
    if end >= 0:
        return message[: end + 2]
    if limit is None or len(message) <= limit:
        return message
    cut = message.rfind(b"\r\n", 0, limit)
    return message[: cut + 2] if cut >= 0 else b""
