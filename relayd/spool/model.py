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


_SCALAR_FIELDS = tuple(
    f.name for f in fields(Envelope) if f.name not in ("recipients", "history")
)
