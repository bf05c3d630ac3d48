"""What relayd knows about one queued message, independent of how it is stored.

An Envelope is the message's whole life: who sent it, to whom, what state
each recipient is in, and every delivery attempt. It is plain data with a
versioned JSON form, so the store, the scheduler, the control socket and
relayctl (even with the daemon stopped) all read the same thing.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Literal

FORMAT_VERSION = 1

RecipientStatus = Literal["pending", "deferred", "sent", "failed"]
MessageState = Literal["active", "deferred", "held"]


@dataclass
class Attempt:
    """One delivery attempt for one or more recipients of a message."""

    time: float
    recipients: list[str]
    host: str  # next hop name (MX or route host)
    address: str  # IP address actually connected to ("" if none)
    port: int
    tls: str | None  # e.g. "TLSv1.3", None for clear text
    reply: str  # the remote reply, or a local description ("connection refused")
    dsn: str  # enhanced status, e.g. "2.0.0", "4.4.1", "5.1.1"
    status: Literal["sent", "deferred", "failed"]
    duration: float
    # Which TLS policy governed the attempt: "none", "opportunistic",
    # "required", "verify" ([delivery] tls) or "route" (a [[route]]'s own
    # settings); "" for local transports and attempts that made no connection
    # of their own. Later policies (MTA-STS, DANE) add their own names.
    tls_policy: str = ""
    tls_verified: bool = False  # the certificate was checked and found valid for the host
    number: int = 0  # which delivery attempt of the message (1-based; 0 in old entries)


HISTORY_KEEP_LAST = 20  # delivery attempts kept besides the first
HISTORY_BUDGET = 640 * 1024  # bytes of history in the state file, well under 1 MB


def _round(attempt: Attempt) -> tuple[int, float]:
    """Which delivery attempt a record belongs to (old records: by start time)."""
    return (attempt.number, 0.0) if attempt.number else (0, attempt.time)


def _weight(attempt: Attempt) -> int:
    """About what a record costs in the state file (JSON keys and numbers included)."""
    addresses = sum(len(r) + 4 for r in attempt.recipients)
    reply = len(attempt.reply) + attempt.reply.count("\\") + attempt.reply.count('"')  # as JSON
    return 300 + reply + len(attempt.host) + addresses


def trim_history(history: list[Attempt]) -> list[Attempt]:
    """The first delivery attempt and the last ``HISTORY_KEEP_LAST``, within the budget.

    A delivery attempt is one or more records (one per distinct outcome).
    However often a message is tried and whatever the next hops answer
    (each reply is already cut to 1 KB), the history stays bounded: older
    attempts than the last 20 go, and if their text still passes
    ``HISTORY_BUDGET`` (a message to very many recipients, each refused in
    its own words), the oldest of them go too. The first attempt and the
    latest one always stay.
    """
    rounds: dict[tuple[int, float], list[Attempt]] = {}
    for attempt in history:
        rounds.setdefault(_round(attempt), []).append(attempt)
    keys = list(rounds)
    if len(keys) > HISTORY_KEEP_LAST + 1:
        keys = [keys[0], *keys[-HISTORY_KEEP_LAST:]]
    weights = {k: sum(_weight(a) for a in rounds[k]) for k in keys}
    total = sum(weights.values())
    while total > HISTORY_BUDGET and len(keys) > 2:
        total -= weights[keys.pop(1)]
    if len(keys) == len(rounds):
        return history
    return [a for k in keys for a in rounds[k]]


@dataclass
class Recipient:
    address: str
    status: RecipientStatus = "pending"
    dsn: str = ""  # last enhanced status
    reply: str = ""  # last reply (quoted in bounces and `queue show`)
    remote_host: str = ""  # host that gave the reply
    delay_warned: bool = False

    @property
    def final(self) -> bool:
        return self.status in ("sent", "failed")


@dataclass
class Envelope:
    queue_id: str
    sender: str  # "" is the null sender <>
    recipients: list[Recipient]
    arrival_time: float
    size: int = 0
    # Who handed it to us: for Received:, logs and `queue show`.
    client_ip: str = ""
    client_name: str = ""
    helo: str = ""
    listener: str = ""
    sasl_username: str = ""
    smtputf8: bool = False
    body_8bit: bool = False
    is_bounce: bool = False  # a DSN we generated; never bounces itself
    # Scheduling state (owned by the scheduler).
    held: bool = False
    attempts: int = 0
    next_attempt: float = 0.0
    history: list[Attempt] = field(default_factory=list)

    @property
    def state(self) -> MessageState:
        if self.held:
            return "held"
        if self.attempts == 0 or any(r.status == "pending" for r in self.recipients):
            return "active"
        return "deferred"

    @property
    def pending(self) -> list[Recipient]:
        return [r for r in self.recipients if not r.final]

    @property
    def done(self) -> bool:
        return all(r.final for r in self.recipients)

    def last_error(self) -> str:
        for r in self.recipients:
            if not r.final and r.reply:
                return r.reply
        return ""

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON. Written out by hand: ``dataclasses.asdict``
        recurses generically and cost ~0.3 ms per call on the hot path."""
        d = {name: getattr(self, name) for name in _SCALAR_FIELDS}
        d["recipients"] = [dict(r.__dict__) for r in self.recipients]
        d["history"] = [dict(a.__dict__, recipients=list(a.recipients)) for a in self.history]
        d["version"] = FORMAT_VERSION
        return d

    def copy(self) -> Envelope:
        """A deep copy, cheaper than copy.deepcopy."""
        return Envelope.from_dict(self.to_dict())

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Envelope:
        d = dict(d)
        version = d.pop("version", FORMAT_VERSION)
        if version != FORMAT_VERSION:
            raise ValueError(f"unsupported envelope format version {version}")
        d["recipients"] = [Recipient(**r) for r in d.get("recipients", [])]
        d["history"] = [Attempt(**a) for a in d.get("history", [])]
        return cls(**d)


_SCALAR_FIELDS = tuple(f.name for f in fields(Envelope) if f.name not in ("recipients", "history"))
