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

_NAMED = {0x09: "\\t", 0x0A: "\\n", 0x0D: "\\r"}
# What each byte is shown as: printable ASCII as itself, every other byte escaped.
_SHOWN = {
    byte: chr(byte) if 0x20 <= byte < 0x7F else _NAMED.get(byte, f"\\x{byte:02x}")
    for byte in range(256)
}


def printable(text: str | bytes) -> str:
    """``text`` as printable ASCII on one line: every other character escaped."""
    if isinstance(text, bytes):
        data = text
    elif text.isascii() and text.isprintable():
        return text
    else:
        try:  # surrogateescape gives back the bytes aiosmtpd could not decode
            data = text.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:  # a lone surrogate of another kind (from JSON, say)
            data = text.encode("utf-8", "surrogatepass")
    # Bytes as latin-1 characters 0-255, then one table lookup each (done in C).
    return data.decode("latin-1").translate(_SHOWN)


def has_control(text: str) -> bool:
    """True if ``text`` holds a C0 control character or DEL (what no name may contain)."""
    return any(ord(c) < 0x20 or ord(c) == 0x7F for c in text)


__all__ = ["has_control", "printable"]
