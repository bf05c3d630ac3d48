"""Queue ids: 16 characters that sort by arrival and survive every log tool.

An id is 80 bits written as 16 characters of Crockford base32 (digits and
upper-case letters without I, L, O, U): a 50-bit millisecond Unix timestamp
followed by 30 random bits. Letters and digits only, so fail2ban's Postfix
filter (``\\w+``) and grep patterns keep working; the timestamp first, so
``ls`` of the spool, ``sort`` of a log and relayctl's listing all order
messages by arrival without reading them.

Within one process ids strictly increase: when the clock repeats a
millisecond (or steps back), the next id is the previous one plus one rather
than a fresh random value, so order never depends on a random draw or on
NTP. The random part keeps ids from two processes (a restarted daemon that
races an old one, a test) from colliding.
"""

from __future__ import annotations

import os
import random
import threading
import time

ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
LENGTH = 16
_BITS = LENGTH * 5
_RANDOM_BITS = 30
_MAX = (1 << _BITS) - 1
_INDEX = {c: i for i, c in enumerate(ALPHABET)}

_clock = time.time_ns  # a seam for tests of clocks that stand still or step back
_lock = threading.Lock()
_last = 0
# The random part only has to differ between processes, not to be secret: a
# generator seeded from the kernel once per process costs no system call per
# id (os.urandom did, on every message), and a forked child reseeds.
_random = random.Random(os.urandom(16))
os.register_at_fork(after_in_child=lambda: _random.seed(os.urandom(16)))


def _encode(value: int) -> str:
    chars = []
    for _ in range(LENGTH):
        chars.append(ALPHABET[value & 31])
        value >>= 5
    return "".join(reversed(chars))


def _decode(qid: str) -> int:
    value = 0
    for c in qid:
        value = (value << 5) | _INDEX[c]
    return value


def new_queue_id() -> str:
    """A fresh id, greater than every id this process made before.

    Thread-safe: bounces may be created off the event loop.
    """
    global _last
    fresh = (_clock() // 1_000_000) << _RANDOM_BITS | _random.getrandbits(_RANDOM_BITS)
    with _lock:
        value = max(fresh, _last + 1) & _MAX
        _last = value
    return _encode(value)


def is_queue_id(s: str) -> bool:
    """True for a well-formed id; guards every path built from outside input."""
    return len(s) == LENGTH and all(c in _INDEX for c in s)


def queue_id_time(qid: str) -> float:
    """Unix time (seconds, millisecond precision) at which ``qid`` was made."""
    if not is_queue_id(qid):
        raise ValueError(f"not a queue id: {qid!r}")
    return (_decode(qid) >> _RANDOM_BITS) / 1000.0
