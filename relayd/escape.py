"""Text from the network made safe for one-line logs and terminals.

A client (or a remote server) chooses every byte of a HELO name, an
address or a reply. Written raw into a log, a CR or LF starts a new line
that fail2ban and pflogsumm read as relayd's own, and an ESC sequence
rewrites an operator's terminal. ``printable()`` turns anything that is not
printable ASCII into an escape (``\\r``, ``\\n``, ``\\t``, else ``\\xNN``),
so what comes out is always one line of plain ASCII.

Non-ASCII is shown as the bytes it arrived as: a UTF-8 character as the
escapes of its UTF-8 bytes (``é`` -> ``\\xc3\\xa9``), and a byte that was not
valid UTF-8 (decoded with ``surrogateescape``, as aiosmtpd does for command
arguments) as that byte (``\\udcff`` -> ``\\xff``).

The backslash itself is left alone, so escaping twice changes nothing and
text escaped once (a stored HELO name) reads the same in every log line.
The price is that a client which sends the four characters ``\\x1b`` looks
like one that sent ESC; it can still forge nothing.
"""

from __future__ import annotations

_SAFE = frozenset(chr(c) for c in range(0x20, 0x7F))
_SURROGATE_BYTES = range(0xDC80, 0xDD00)  # surrogateescape's stand-ins for bytes 0x80-0xff
_NAMED = {"\t": "\\t", "\n": "\\n", "\r": "\\r"}


def _escape_char(char: str) -> str:
    code = ord(char)
    if char in _NAMED:
        return _NAMED[char]
    if code < 0x80:
        return f"\\x{code:02x}"
    if code in _SURROGATE_BYTES:
        return f"\\x{code - 0xDC00:02x}"
    data = char.encode("utf-8", "surrogatepass")
    return "".join(f"\\x{b:02x}" for b in data)


def printable(text: str | bytes) -> str:
    """``text`` as printable ASCII on one line: every other character escaped."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "surrogateescape")
    if text.isascii() and text.isprintable():
        return text
    return "".join(c if c in _SAFE else _escape_char(c) for c in text)


def has_control(text: str) -> bool:
    """True if ``text`` holds a C0 control character or DEL (what no name may contain)."""
    return any(ord(c) < 0x20 or ord(c) == 0x7F for c in text)


__all__ = ["has_control", "printable"]
