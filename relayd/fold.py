"""Folding the header fields relayd writes (RFC 5322 §2.2.3), in one place.

Values relayd puts into ``Received:``, ``Received-SPF:`` and
``Authentication-Results:`` carry what peers chose: HELO names, sender
addresses, d= and s= of hostile signatures, SPF explanations. Whatever
their length, no line may exceed 998 octets (RFC 5322 §2.1.1), or the next
hop refuses the message, or splits it somewhere worse. :func:`fold` breaks
lines before whitespace, aiming at 78 octets; unfolding (removing each
CRLF) gives back the value unchanged. A TAB in the value always starts a
new line: callers use it to put each clause of a trace field on its own
line, in the shape operators know from other MTAs.

Two inputs cannot be kept exactly, and are bounded instead: a run of more
than :data:`MAX_BLANKS` blanks becomes one space, and a word with no
whitespace longer than fits on a line is cut with a CRLF and a space
inserted (on a character boundary, never inside a UTF-8 sequence).
Control characters (CR, LF, NUL and the rest of C0 except TAB, and DEL)
become spaces: a value can never end the field or start another. Non-ASCII
is passed through as UTF-8 and never introduced.
"""

from __future__ import annotations

import re

WIDTH = 78
LIMIT = 998
MAX_BLANKS = 64

_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_LONG_BLANKS = re.compile(r"[ \t]{" + str(MAX_BLANKS + 1) + ",}")
_WORDS = re.compile(r"[ \t]*[^ \t]+|[ \t]+")


def _octets(text: str) -> int:
    return len(text.encode("utf-8", "surrogateescape"))


def _cut(word: str, room: int) -> list[str]:
    """``word`` in pieces of at most ``room`` octets; pieces after the first start with a space."""
    pieces: list[str] = []
    current, size = "", 0
    for char in word:
        n = _octets(char)
        if current and size + n > room:
            pieces.append(current)
            current, size = " ", 1
        current += char
        size += n
    pieces.append(current)
    return pieces


def fold(name: str, value: str, width: int = WIDTH, limit: int = LIMIT) -> bytes:
    """``name: value`` as header lines, each at most ``limit`` octets, ending in CRLF."""
    text = _LONG_BLANKS.sub(" ", _CONTROL.sub(" ", f"{name}: {value}"))
    quick = _fold_short(text, width)
    if quick is not None:
        return quick
    lines: list[str] = []
    current, size = "", 0
    for word in _WORDS.findall(text):
        n = _octets(word)
        if not word.strip(" \t"):  # blanks at the very end: keep them if they fit
            if size + n <= limit:
                current, size = current + word, size + n
            continue
        if current and (size + n > width or word[0] == "\t") and word[0] in " \t":
            lines.append(current)  # fold: the word's leading blank starts the next line
            current, size = "", 0
        if size + n > limit:  # one word longer than a line: cut it
            first, *middle, last = _cut(word, limit - size)
            lines.extend([current + first, *middle])
            current, size = last, _octets(last)
            continue
        current, size = current + word, size + n
    lines.append(current)
    return "".join(line + "\r\n" for line in lines).encode("utf-8", "surrogateescape")


def _fold_short(text: str, width: int) -> bytes | None:
    """The common case at a fraction of the cost: ASCII clauses that each fit on a line.

    Then the only folds are the ones each TAB asks for, and the lines are
    the TAB-separated pieces; anything else (blanks next to a TAB or at the
    end, a long clause, non-ASCII) is left to the general loop, which
    gives the same result for these inputs (tests/test_fold.py compares).
    """
    if not text.isascii() or text[-1:] in (" ", "\t") or " \t" in text or "\t " in text:
        return None
    if "\t\t" in text:
        return None
    lines = text.split("\t")
    if any(len(line) + 1 > width for line in lines):
        return None
    return ("\r\n\t".join(lines) + "\r\n").encode("ascii")


def unfold(field: bytes) -> bytes:
    """A field as one line again: every CRLF removed (RFC 5322 §2.2.3)."""
    return field.removesuffix(b"\r\n").replace(b"\r\n", b"")


__all__ = ["LIMIT", "MAX_BLANKS", "WIDTH", "fold", "unfold"]
