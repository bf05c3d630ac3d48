"""Reading the DATA section: streamed, checked as it arrives, deaf to every end but CRLF.CRLF.

aiosmtpd reads DATA one line per await and splits lines only on CRLF, so a
bare ``\\n.\\n`` passes into the content and smuggles a second message past
any downstream server that ends DATA on a bare LF. Here DATA is read in
large chunks and the end is found with one ``bytes.find`` per chunk.

Nothing here holds a whole message. Each chunk's complete lines are checked
at once, in C-speed passes over the chunk (a bare CR or LF, a NUL, a line
over 998 octets: the message is refused, never split, never queued),
unstuffed, and handed to a :class:`_Sink` that keeps the first megabyte in
memory and writes the rest to a file in the spool's ``tmp/``. Only the
partial line at the end of a chunk is carried over, and a line that grows
past the limit is dropped on the spot, so a peer can make relayd hold at
most one chunk plus one line, whatever it sends.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass

from relayd.smtpd.content import Content, split_header
from relayd.spool.store import write_all

END = b"\r\n.\r\n"
CHUNK = 256 * 1024
MAX_LINE = 998  # octets, without CRLF (RFC 5322 §2.1.1)
MAX_HEADER = 1 << 20  # policy parses at most this much of the header block
SPILL_AT = 1 << 20  # a message larger than this goes to a file as it arrives
# A raw partial line may hold a stuffing dot and the CR of its CRLF on top.
_MAX_PARTIAL = MAX_LINE + 2
_BLOCK = (MAX_LINE + 1) // 2
_SPILL_SEQ = itertools.count()

# Problems, in the order a reply is chosen when several apply.
TOO_BIG = "too_big"
BARE_NEWLINE = "bare_newline"
NUL = "nul"
LINE_TOO_LONG = "line_too_long"


@dataclass(frozen=True)
class DataResult:
    """The message as received, or why it was refused (``content`` is then None)."""

    content: Content | None
    size: int  # octets received, even when the message was dropped
    problem: str | None = None


def line_problem(lines: bytes | bytearray) -> str | None:
    """What is wrong with ``lines`` (whole raw lines, each ending in CRLF), if anything."""
    if b"\0" in lines:
        return NUL
    crlf = lines.count(b"\r\n")
    if lines.count(b"\n") != crlf or lines.count(b"\r") != crlf:
        return BARE_NEWLINE
    return None


def unstuff(lines: bytes | bytearray) -> bytes | bytearray:
    """Undo dot-stuffing (RFC 5321 §4.5.2) on whole lines that start at a line start."""
    if lines.startswith(b"."):
        lines = lines[1:]
    return lines.replace(b"\r\n.", b"\r\n")


def has_long_line(lines: bytes | bytearray) -> bool:
    """A line over 998 octets in ``lines`` (whole lines ending in CRLF, no bare CR/LF).

    Linear and allocation-free: a line of 999 octets or more must contain a
    whole aligned block of 499 octets with no LF in it, so only such blocks
    are measured. A regex such as ``[^\\r\\n]{999,}`` would backtrack at every
    position instead, and splitting into lines allocates one object per line.
    """
    n = len(lines)
    if n <= MAX_LINE + 2:
        return False
    for i in range(0, n - _BLOCK + 1, _BLOCK):
        if lines.find(b"\n", i, i + _BLOCK) < 0:
            start = lines.rfind(b"\n", 0, i) + 1
            stop = lines.find(b"\r\n", i)
            if (stop if stop >= 0 else n) - start > MAX_LINE:
                return True
    return False


class _Sink:
    """The unstuffed message: memory while small, a file in ``spill_dir`` once large."""

    def __init__(self, spill_dir: str) -> None:
        self.spill_dir = spill_dir
        self.buf = bytearray()
        self.size = 0
        self.fd: int | None = None
        self.path: str | None = None
        self.head = bytearray()  # the first MAX_HEADER octets, where the header block is
        self._head_done = False

    def write(self, data: bytes | bytearray) -> None:
        self.size += len(data)
        if not self._head_done:
            self._probe_header(data)
        if self.fd is None:
            self.buf += data
            if len(self.buf) > SPILL_AT:
                self._spill()
        else:
            write_all(self.fd, data)

    def _probe_header(self, data: bytes | bytearray) -> None:
        """Keep the header lines, and no more: ``data`` is whole lines following whole lines."""
        room = MAX_HEADER + 2 - len(self.head)
        if data.startswith(b"\r\n"):  # an empty line first: the block ended before
            end = 0
        else:
            found = data.find(b"\r\n\r\n", 0, room + 2)
            end = found + 2 if found >= 0 else -1
        if end >= 0:
            self.head += data[:end]
            self._head_done = True
            return
        self.head += data[:room]
        if len(self.head) > MAX_HEADER:
            self._head_done = True

    def _spill(self) -> None:
        name = f"data.{os.getpid()}.{next(_SPILL_SEQ)}"
        self.path = os.path.join(self.spill_dir, name)
        self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        write_all(self.fd, self.buf)
        self.buf = bytearray()

    def finish(self) -> Content:
        header = split_header(bytes(self.head), MAX_HEADER)
        if self.fd is None:
            return Content(header=header, size=self.size, memory=bytes(self.buf))
        os.close(self.fd)
        self.fd = None
        return Content(header=header, size=self.size, path=self.path)

    def abort(self) -> None:
        """Drop what was kept: a refused message costs nothing from here on."""
        self.buf = bytearray()
        self.head = bytearray()
        self._head_done = True
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        if self.path is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.path)
            self.path = None


class _Reader:
    """The state of one DATA section being read."""

    def __init__(self, max_size: int, spill_dir: str, stuffed: bool = True) -> None:
        self.max_size = max_size
        self.stuffed = stuffed
        self.sink = _Sink(spill_dir)
        self.raw = 0  # octets of DATA consumed so far, as sent (stuffed)
        self.problem: str | None = None

    def lines(self, raw: bytes | bytearray) -> None:
        """Take whole raw lines: count, check, unstuff, keep."""
        self.raw += len(raw)
        if self.problem is not None:
            return
        if self.raw > self.max_size:
            return self.refuse(TOO_BIG)
        problem = line_problem(raw)
        if problem is not None:
            return self.refuse(problem)
        data = unstuff(raw) if self.stuffed else raw
        if has_long_line(data):
            return self.refuse(LINE_TOO_LONG)
        self.sink.write(data)

    def drop(self, count: int) -> None:
        """``count`` octets of an overlong line went by unseen."""
        self.raw += count
        if self.problem is None:
            self.refuse(TOO_BIG if self.raw > self.max_size else LINE_TOO_LONG)

    def refuse(self, problem: str) -> None:
        self.problem = problem
        self.sink.abort()

    def result(self) -> DataResult:
        if self.raw > self.max_size:
            self.problem = TOO_BIG
            self.sink.abort()
        if self.problem is not None:
            return DataResult(None, self.raw, self.problem)
        return DataResult(self.sink.finish(), self.raw)


async def read_data(
    reader: asyncio.StreamReader,
    max_size: int,
    on_progress: Callable[[], None] | None = None,
    spill_dir: str | None = None,
) -> DataResult:
    """Read DATA up to CRLF.CRLF; octets pipelined after it stay in ``reader``.

    Past ``max_size`` or after the first problem the content is discarded
    while reading goes on to the end marker, so the client gets its reply at
    the right moment and the session stays in step. A large message is
    written to a file in ``spill_dir`` (the spool's tmp/); the caller owns it
    through the returned Content and must ``discard()`` it.
    """
    state = _Reader(max_size, spill_dir or tempfile.gettempdir())
    # pending[:ctx] was consumed already: the end of the previous line, so that
    # an end marker right at the start (".\r\n") is found like any other.
    pending = bytearray(b"\r\n")
    ctx = 2
    searched = 0
    try:
        while True:
            end = pending.find(END, searched)
            if end >= 0:
                state.lines(pending[min(ctx, end + 2) : end + 2])
                _unread(reader, bytes(pending[end + len(END) :]))
                return state.result()
            cut = pending.rfind(b"\r\n", ctx)
            if cut >= 0:
                state.lines(pending[ctx : cut + 2])
                del pending[:cut]
                ctx = 2
            if len(pending) - ctx > _MAX_PARTIAL:
                state.drop(len(pending) - ctx)
                del pending[: len(pending) - (len(END) - 1)]
                ctx = len(pending)
            searched = max(0, len(pending) - len(END) + 1)
            chunk = await reader.read(CHUNK)
            if not chunk:
                raise ConnectionResetError("connection closed during DATA")
            if on_progress is not None:
                on_progress()
            pending += chunk
    except BaseException:
        state.sink.abort()
        raise


async def read_sized(
    reader: asyncio.StreamReader, size: int, max_size: int, spill_dir: str | None = None
) -> DataResult:
    """Read a message of exactly ``size`` octets (no dot-stuffing), checked like DATA.

    For local submission, where the length is announced up front. The
    message must end in CRLF; it is refused like DATA for the same faults.
    """
    state = _Reader(max_size, spill_dir or tempfile.gettempdir(), stuffed=False)
    if size > max_size:
        state.drop(size)
        return state.result()
    pending = bytearray()
    left = size
    try:
        while left > 0:
            chunk = await reader.read(min(CHUNK, left))
            if not chunk:
                raise ConnectionResetError("connection closed during the message")
            left -= len(chunk)
            pending += chunk
            cut = pending.rfind(b"\r\n")
            if cut >= 0:
                state.lines(pending[: cut + 2])
                del pending[: cut + 2]
            if len(pending) > _MAX_PARTIAL:
                state.drop(len(pending))
                pending.clear()
        if pending and state.problem is None:  # the last line has no CRLF
            state.refuse(BARE_NEWLINE)
        return state.result()
    except BaseException:
        state.sink.abort()
        raise


def _unread(reader: asyncio.StreamReader, data: bytes) -> None:
    """Give back octets read past the end marker (pipelined commands)."""
    if data:
        reader._buffer[0:0] = data  # type: ignore[attr-defined]
