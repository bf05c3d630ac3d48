"""What relayd needs from systemd, in pure Python, with systemd-python optional.

systemd-python has no wheel (it compiles against libsystemd), so nothing here
requires it:

- readiness, reload and watchdog notifications are one datagram each to the
  Unix socket named by ``$NOTIFY_SOCKET`` (the sd_notify protocol);
- socket activation is reading ``$LISTEN_PID``, ``$LISTEN_FDS`` and
  ``$LISTEN_FDNAMES`` and wrapping fds 3, 4, ... (sd_listen_fds);
- only the structured journal handler needs ``systemd.journal``; without it
  ``journal_handler()`` returns None and relayd.log writes to stderr, which
  journald still captures (with ``<N>`` priority prefixes).

Every function is a no-op (returning False/None/{}) when not started by
systemd, so the daemon calls them unconditionally.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
import socket
import struct
import time
from collections.abc import Callable
from typing import Any

from relayd.log import SYSLOG_PRIORITY

# Logger names and syslog identifiers all start with this.
ROOT = "relayd"

# Where journald listens for native-protocol entries; systemd-python's send()
# fails with ENOENT without it (e.g. inside a container without journald).
JOURNAL_SOCKET = "/run/systemd/journal/socket"

# The first inherited fd under socket activation (SD_LISTEN_FDS_START).
LISTEN_FDS_START = 3

# An fd's name when $LISTEN_FDNAMES does not give one (a launcher other than
# systemd, or systemd before v227), as sd_listen_fds_with_names() has it.
UNNAMED = "unknown"

# A notification that cannot be delivered within this time is dropped rather
# than stalling the event loop; systemd reads its socket promptly.
_SEND_TIMEOUT = 1.0

_LISTEN_VARS = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")

# syslog priorities: the same table relayd.log uses for the stderr stream.
_PRIORITY = SYSLOG_PRIORITY

# LOG_MAIL: `journalctl --facility=mail` finds relayd next to other MTAs.
_FACILITY_MAIL = 2

JournalSend = Callable[..., Any]


# --- sd_notify -------------------------------------------------------------


def _notify_address() -> str | None:
    """The datagram address from $NOTIFY_SOCKET; '@name' is an abstract socket."""
    address = os.environ.get("NOTIFY_SOCKET", "")
    if address.startswith("@"):
        return "\0" + address[1:]
    if address.startswith("/"):
        return address
    return None  # unset, or a transport we do not speak (vsock:...)


def notify(*assignments: str) -> bool:
    """Send ``KEY=value`` lines to the service manager; True if it was sent.

    Returns False (and does nothing) when not run by systemd with
    Type=notify, so callers need no guard of their own.
    """
    address = _notify_address()
    if address is None or not assignments:
        return False
    payload = "\n".join(assignments).encode("utf-8")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.settimeout(_SEND_TIMEOUT)
        try:
            sock.sendto(payload, address)
        except OSError:
            return False
    return True


def _one_line(text: str) -> str:
    """Keep status text on one line; a newline would start a new assignment."""
    return " ".join(text.splitlines())


def ready(status: str | None = None) -> bool:
    """Startup (or a reload) finished: systemd now reports the unit active."""
    if status is None:
        return notify("READY=1")
    return notify("READY=1", f"STATUS={_one_line(status)}")


def monotonic_usec() -> int:
    """CLOCK_MONOTONIC in microseconds, the clock systemd matches reloads by."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def reloading() -> bool:
    """A reload started; ``ready()`` must follow when it is done.

    MONOTONIC_USEC lets systemd tell this reload from an older one, so a
    synchronous ``systemctl reload`` waits for the matching READY=1.
    """
    return notify("RELOADING=1", f"MONOTONIC_USEC={monotonic_usec()}")


def stopping(status: str | None = None) -> bool:
    """Shutdown started (draining); systemd shows the unit as deactivating."""
    if status is None:
        return notify("STOPPING=1")
    return notify("STOPPING=1", f"STATUS={_one_line(status)}")


def status(text: str) -> bool:
    """Free-form text shown by ``systemctl status relayd``."""
    return notify(f"STATUS={_one_line(text)}")


def watchdog_ping() -> bool:
    """Tell systemd we are alive (WatchdogSec=)."""
    return notify("WATCHDOG=1")


# --- watchdog --------------------------------------------------------------


def watchdog_interval() -> float | None:
    """The watchdog timeout in seconds, or None when no watchdog is armed.

    This is the full WatchdogSec= value; ping at half of it, as sd_watchdog
    advises, so one late wake-up does not get the daemon killed. A
    $WATCHDOG_PID naming another process means the watchdog is not ours.
    """
    try:
        usec = int(os.environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    pid = os.environ.get("WATCHDOG_PID")
    if pid is not None and pid.strip() != str(os.getpid()):
        return None
    if usec <= 0:
        return None
    return usec / 1_000_000


async def watchdog_task(timeout: float | None = None) -> None:
    """Ping the watchdog from the event loop until cancelled.

    Running on the loop itself is the point: if a blocking call stalls the
    loop, the pings stop and systemd restarts the daemon. Returns at once
    when no watchdog is armed. ``timeout`` overrides watchdog_interval().
    """
    if timeout is None:
        timeout = watchdog_interval()
    if timeout is None or timeout <= 0:
        return
    period = timeout / 2
    while True:
        watchdog_ping()
        await asyncio.sleep(period)


# --- socket activation -----------------------------------------------------


def _unset_listen_env() -> None:
    """Forget the variables so child processes do not take our fds for theirs."""
    for name in _LISTEN_VARS:
        os.environ.pop(name, None)


def _listen_count() -> int:
    """How many fds systemd passed to *this* process (0 if none or not ours)."""
    try:
        pid = int(os.environ.get("LISTEN_PID", ""))
        count = int(os.environ.get("LISTEN_FDS", ""))
    except ValueError:
        return 0
    if pid != os.getpid() or count <= 0:
        return 0
    return count


def _fd_names(count: int) -> list[str]:
    """One name per fd from $LISTEN_FDNAMES, 'unknown' where it says nothing."""
    given = os.environ.get("LISTEN_FDNAMES", "")
    names = given.split(":") if given else []
    names += [UNNAMED] * (count - len(names))
    return [name or UNNAMED for name in names[:count]]


def _adopt(fd: int) -> socket.socket | None:
    """Wrap an inherited fd as a socket (family and type read from the fd)."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError:
        return None  # not a socket: leave the fd alone
    sock.set_inheritable(False)  # sd_listen_fds sets FD_CLOEXEC too
    return sock


def listen_fds() -> dict[str, list[socket.socket]]:
    """Sockets passed by socket activation, grouped by FileDescriptorName=.

    The shipped socket units name them ``smtp`` (25), ``submission`` (587)
    and ``submissions`` (465); the daemon serves each on the [[listener]]
    of the same name instead of binding that address itself. The LISTEN_*
    variables are removed whatever they said, like sd_listen_fds(1).
    """
    try:
        count = _listen_count()
        names = _fd_names(count)
    finally:
        _unset_listen_env()
    found: dict[str, list[socket.socket]] = {}
    for index, name in enumerate(names):
        sock = _adopt(LISTEN_FDS_START + index)
        if sock is not None:
            found.setdefault(name, []).append(sock)
    return found


# --- journald --------------------------------------------------------------


def under_systemd() -> bool:
    """True when started by systemd (a unit) or with stderr on the journal."""
    return bool(os.environ.get("INVOCATION_ID") or os.environ.get("JOURNAL_STREAM"))


def _journal_send() -> JournalSend:
    """systemd.journal.send when systemd-python is installed, else our own sender."""
    # Imported by name: a checkout's systemd/ directory (the unit files) would
    # otherwise shadow the package for static checkers.
    try:
        journal = importlib.import_module("systemd.journal")
    except ImportError:
        return native_sender(JOURNAL_SOCKET)
    send: JournalSend = journal.send
    return send


def encode_entry(fields: dict[str, Any]) -> bytes:
    """One entry in journald's native protocol (``KEY=value`` lines).

    A value holding a newline is sent as ``KEY\n``, its length as a 64-bit
    little-endian integer, the bytes, and ``\n`` -- the protocol's binary-safe form.
    """
    out = bytearray()
    for key, value in fields.items():
        data = value if isinstance(value, bytes) else str(value).encode("utf-8", "replace")
        name = key.encode("ascii")
        if b"\n" in data:
            out += name + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
        else:
            out += name + b"=" + data + b"\n"
    return bytes(out)


def native_sender(path: str) -> JournalSend:
    """A pure-Python ``send(**fields)`` to the journal socket at ``path``.

    Lets relayd log structured entries without systemd-python (which has no
    wheel and needs a compiler and libsystemd-dev to install).
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)

    def send(**fields: Any) -> None:
        sock.sendto(encode_entry(fields), path)

    return send


def journal_unavailable_reason() -> str | None:
    """Why journal_handler(required=True) would return None, for one warning."""
    if not os.path.exists(JOURNAL_SOCKET):
        return f"the journal socket {JOURNAL_SOCKET} does not exist"
    return None


def journal_handler(required: bool) -> logging.Handler | None:
    """A logging handler writing structured entries to journald, or None.

    ``required`` is ``[logging] target = "journald"``; otherwise ("auto") the
    journal is used only when running under systemd. None means "use stderr":
    always outside systemd unless required, and also when systemd-python or
    the journal socket is missing. With ``required`` the caller then logs
    one warning to stderr, using journal_unavailable_reason() for the text.
    """
    if not (required or under_systemd()):
        return None
    if journal_unavailable_reason() is not None:
        return None
    return JournalHandler(_journal_send())


# Fields the handler sets itself; a same-named journal_fields entry is kept
# under RELAYD_<NAME> rather than overriding it.
_OWN_FIELDS = frozenset(
    {
        "MESSAGE",
        "PRIORITY",
        "SYSLOG_IDENTIFIER",
        "SYSLOG_FACILITY",
        "CODE_FILE",
        "CODE_LINE",
        "CODE_FUNC",
        "RELAYD_COMPONENT",
    }
)


def journal_field_name(key: str) -> str | None:
    """A valid, safe journald field name for ``key``, or None to drop it.

    journald accepts A-Z, 0-9 and '_', not leading with a digit or '_'
    (a leading '_' is a trusted field). MESSAGE_ID is journald's catalogue
    id, not an email header, so a Message-ID goes in HEADER_MESSAGE_ID.
    """
    name = "".join(c if c.isascii() and c.isalnum() else "_" for c in key.upper())
    name = name.lstrip("_")
    if not name:
        return None
    if name[0].isdigit():
        name = "F_" + name
    if name == "MESSAGE_ID":
        return "HEADER_MESSAGE_ID"
    if name in _OWN_FIELDS:
        return "RELAYD_" + name
    return name[:64]


def component(logger_name: str) -> str:
    """The part of a relayd logger name after 'relayd.' ('' for the root)."""
    prefix = ROOT + "."
    return logger_name[len(prefix) :] if logger_name.startswith(prefix) else ""


def syslog_identifier(logger_name: str) -> str:
    """Postfix-style program name: relayd.submission.smtpd -> relayd/submission/smtpd.

    This is what `journalctl -o short` prints before the pid, so pflogsumm
    (--syslog-name=relayd) and fail2ban's Postfix filters read the lines.
    """
    part = component(logger_name)
    return f"{ROOT}/{part.replace('.', '/')}" if part else ROOT


class JournalHandler(logging.Handler):
    """One journald entry per record: the line as MESSAGE plus its fields.

    ``send`` is systemd.journal.send (keyword arguments become fields);
    it is a parameter so the fields can be checked without a journal.
    """

    def __init__(self, send: JournalSend, level: int = logging.NOTSET) -> None:
        super().__init__(level)
        self.send = send

    def fields(self, record: logging.LogRecord) -> dict[str, Any]:
        """All journal fields for ``record`` (MESSAGE included)."""
        extra: dict[str, Any] = getattr(record, "journal_fields", None) or {}
        fields: dict[str, Any] = {}
        for key, value in extra.items():
            name = journal_field_name(str(key))
            if name is not None and value is not None:
                fields[name] = value
        fields.update(
            MESSAGE=self.format(record),
            PRIORITY=_PRIORITY.get(record.levelno, 6),
            SYSLOG_IDENTIFIER=syslog_identifier(record.name),
            SYSLOG_FACILITY=_FACILITY_MAIL,
            CODE_FILE=record.pathname,
            CODE_LINE=record.lineno,
            CODE_FUNC=record.funcName,
        )
        part = component(record.name)
        if part:
            fields["RELAYD_COMPONENT"] = part
        return fields

    def emit(self, record: logging.LogRecord) -> None:
        """Send the entry; a journal failure must never break the caller."""
        try:
            self.send(**self.fields(record))
        except Exception:
            self.handleError(record)
