"""The one place relayd reads its TOML file.

The file is parsed once into frozen dataclasses that are handed to every
other module; no other module reads TOML or looks at globals. A reload
builds a new snapshot and swaps it in, so sessions that started on the old
snapshot finish on it.

Every problem in a file is reported at once, one line each, in the form
``relayd: /etc/relayd.toml:12: [limits] max_message_size: expected a size
like "25MB", got "lots"`` so an operator can fix them all in one edit.
"""

from __future__ import annotations

import difflib
import ipaddress
import json
import re
import ssl
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, time
from pathlib import Path
from typing import Any, Final, Literal, TypeVar, get_args

from relayd.units import Rate as Rate
from relayd.units import parse_duration, parse_rate, parse_size

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

ListenerMode = Literal["submission", "inbound"]
ListenerTLS = Literal["none", "starttls", "implicit"]
RouteTLS = Literal["starttls", "implicit", "none"]
RouteTransport = Literal["smtp", "lmtp", "maildir"]
DeliveryTLS = Literal["opportunistic", "required", "verify", "none"]
DNSSEC = Literal["off", "trust-ad"]
SPFAction = Literal["reject", "tag"]
DMARCAction = Literal["tag", "reject"]
LogTarget = Literal["auto", "journald", "stderr"]

DEFAULT_PATH = Path("/etc/relayd.toml")


EXAMPLE_HOSTNAME = "mail.example.com"


class ConfigError(Exception):
    """All the problems found in one config file, each a ready-to-print line."""

    def __init__(self, problems: list[str], partial: Config | None = None) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems
        # What could be read around the problems (defaults in their place), so
        # that --check-config can still look at the files it names: one run
        # lists every problem.
        self.partial = partial


@dataclass(frozen=True)
class HostPort:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class Listener:
    name: str
    address: HostPort
    mode: ListenerMode = "submission"
    tls: ListenerTLS = "starttls"
    # SPEC section 11: connections start with a PROXY header (from [server] proxy_from).
    proxy_protocol: bool = False


@dataclass(frozen=True)
class TLSConfig:
    cert: Path | None = None
    key: Path | None = None


@dataclass(frozen=True)
class AuthConfig:
    users_file: Path = Path("/etc/relayd/users")
    # Extension: wrong passwords checked for one address (IPv6: per /64)
    # before 421 4.7.0, and the window they are counted in (SPEC §7: 5 per
    # 15 minutes). Per-account limits are fixed (relayd.policy.authguard).
    max_failures: int = 5
    failure_window: float = 900.0


@dataclass(frozen=True)
class SpoolConfig:
    path: Path = Path("/var/spool/relayd")
    # Extension: refuse new mail with 452 4.3.1 below this much free space.
    min_free_space: int = 100_000_000


@dataclass(frozen=True)
class ControlConfig:
    socket: Path = Path("/run/relayd/control.sock")
    # Extension: group allowed to use the socket (mode 0660); None = 0600.
    group: str | None = None


@dataclass(frozen=True)
class LocalConfig:
    """The sendmail socket (SPEC §9): local programs hand mail to the daemon here."""

    socket: Path | None = Path("/run/relayd/sendmail.sock")  # None (``""``): no socket


@dataclass(frozen=True)
class RelayConfig:
    domains: tuple[str, ...] = ()
    networks: tuple[IPNetwork, ...] = (
        ipaddress.ip_network("127.0.0.0/8"),
        ipaddress.ip_network("::1/128"),
    )
    # Extension, deprecated: only false is accepted. Networks shorter than /8
    # (IPv4) or /32 (IPv6) are config errors whatever it says (_network).
    allow_open_relay: bool = False
    # Extension: ask a served domain's next hop about each inbound RCPT, so
    # mail for unknown users is refused at RCPT instead of bounced later.
    verify_recipients: bool = False
    # Extension: the valid recipients of served domains, one per line.
    recipients_file: Path | None = None


@dataclass(frozen=True)
class Route:
    domain: str
    via: HostPort
    username: str | None = None
    password_file: Path | None = None
    tls: RouteTLS = "starttls"
    tls_verify: bool = True
    ca_file: Path | None = None
    # How: "smtp" to ``via``; "lmtp" to ``via`` or to the Unix socket ``path``;
    # "maildir" into the Maildir ``path`` (SPEC §9: via = "lmtp:..." / "maildir:...").
    transport: RouteTransport = "smtp"
    path: Path | None = None

    @property
    def via_text(self) -> str:
        """``via`` as the config writes it."""
        if self.transport == "smtp":
            return str(self.via)
        return f"{self.transport}:{self.path if self.path is not None else self.via}"


@dataclass(frozen=True)
class Limits:
    max_message_size: int = 25_000_000
    max_recipients: int = 100
    max_connections: int = 1000
    max_connections_per_ip: int = 20
    idle_timeout: float = 300.0


@dataclass(frozen=True)
class RateLimits:
    per_ip: Rate | None = None
    per_user: Rate | None = None
    per_sender_domain: Rate | None = None


@dataclass(frozen=True)
class SPFConfig:
    enabled: bool = True
    on_fail: SPFAction = "reject"
    on_softfail: SPFAction = "tag"


@dataclass(frozen=True)
class DKIMKey:
    domain: str
    selector: str
    key_file: Path


@dataclass(frozen=True)
class DKIMConfig:
    keys: tuple[DKIMKey, ...] = ()


@dataclass(frozen=True)
class DMARCConfig:
    on_reject: DMARCAction = "tag"


@dataclass(frozen=True)
class DeliveryConfig:
    retry: tuple[float, ...] = (300.0, 600.0, 1800.0, 3600.0, 7200.0, 14400.0)
    max_age: float = 5 * 86400.0
    delay_warning: float = 4 * 3600.0  # 0 = off
    concurrency: int = 50
    per_domain_concurrency: int = 5
    port: int = 25
    tls: DeliveryTLS = "opportunistic"
    connect_timeout: float = 30.0
    command_timeout: float = 300.0
    # Extension of SPEC §8: MTA-STS (RFC 8461) for MX delivery; on by default.
    mta_sts: bool = True
    # Extra CA certificates trusted for MX hosts and MTA-STS policy servers.
    ca_file: Path | None = None


@dataclass(frozen=True)
class DNSConfig:
    nameservers: tuple[HostPort, ...] = ()  # empty: the system resolver
    timeout: float = 5.0
    # "trust-ad": the resolver validates DNSSEC and relayd believes its AD bit (DANE).
    dnssec: DNSSEC = "off"


# SPEC §10: the blocklists `relayctl doctor` asks when [doctor] dnsbl is absent.
DEFAULT_DNSBL: Final = ("zen.spamhaus.org", "bl.spamcop.net", "b.barracudacentral.org")


@dataclass(frozen=True)
class DoctorConfig:
    # This host's public addresses (SPF, PTR, blocklists); empty: those of hostname.
    addresses: tuple[str, ...] = ()
    dnsbl: tuple[str, ...] = DEFAULT_DNSBL


@dataclass(frozen=True)
class LoggingConfig:
    level: str = "info"
    target: LogTarget = "auto"


@dataclass(frozen=True)
class MetricsConfig:
    # Extension: serve Prometheus text format here; None = off.
    address: HostPort | None = None


@dataclass(frozen=True)
class ClusterConfig:
    # SPEC section 11: rate limits and wrong-password counts in Redis/Valkey.
    redis: str | None = None


@dataclass(frozen=True)
class ApiConfig:
    # SPEC section 10: the HTTP API listens here; None = off.
    address: HostPort | None = None
    tls: bool = False  # serve HTTPS with the [tls] certificate


@dataclass(frozen=True)
class ServerConfig:
    # Extension: processes accepting SMTP (1 = the daemon alone; 0 = "auto":
    # up to one per CPU core, started when the daemon is busy and gone when
    # idle). Extra ones share the listening sockets and hand every accepted
    # message to the daemon's single queue manager.
    processes: int = 0
    # SPEC section 11: balancers whose PROXY header relayd believes.
    proxy_from: tuple[IPNetwork, ...] = ()


EVENT_TYPES: Final[tuple[str, ...]] = (
    "queued",
    "delivered",
    "deferred",
    "delayed",
    "bounced",
    "suppressed",
)


@dataclass(frozen=True)
class SuppressionConfig:
    """SPEC §10: addresses that failed permanently, refused at RCPT for a while."""

    enabled: bool = True
    expire: float = 30 * 86400.0


@dataclass(frozen=True)
class Webhook:
    """SPEC §10: one receiver of delivery events."""

    url: str
    events: tuple[str, ...] = EVENT_TYPES
    secret_file: Path | None = None


@dataclass(frozen=True)
class Config:
    hostname: str
    listeners: tuple[Listener, ...] = ()
    tls: TLSConfig = field(default_factory=TLSConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    spool: SpoolConfig = field(default_factory=SpoolConfig)
    control: ControlConfig = field(default_factory=ControlConfig)
    local: LocalConfig = field(default_factory=LocalConfig)
    relay: RelayConfig = field(default_factory=RelayConfig)
    routes: tuple[Route, ...] = ()
    limits: Limits = field(default_factory=Limits)
    rate_limits: RateLimits = field(default_factory=RateLimits)
    spf: SPFConfig = field(default_factory=SPFConfig)
    dkim: DKIMConfig = field(default_factory=DKIMConfig)
    dmarc: DMARCConfig = field(default_factory=DMARCConfig)
    delivery: DeliveryConfig = field(default_factory=DeliveryConfig)
    dns: DNSConfig = field(default_factory=DNSConfig)
    doctor: DoctorConfig = field(default_factory=DoctorConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    api: ApiConfig = field(default_factory=ApiConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    suppression: SuppressionConfig = field(default_factory=SuppressionConfig)
    webhooks: tuple[Webhook, ...] = ()
    source: Path = DEFAULT_PATH
    warnings: tuple[str, ...] = ()
    # Where each key sits in the source file, so that check_files can point
    # at the line naming a bad file. Not part of the config's value.
    lines: LineMap | None = field(default=None, compare=False, repr=False)
    # The text this config was parsed from, so that a process started later
    # (an acceptor) runs on exactly this config, not on an edited file.
    text: str = field(default="", compare=False, repr=False)


# ---------------------------------------------------------------------------
# The schema: every section and key, in the order a message meets them. The
# loader accepts nothing else, and a test keeps etc/relayd.toml in step.

SCHEMA: Final[Mapping[str, tuple[str, ...]]] = {
    "": ("hostname",),
    "[[listener]]": ("name", "address", "mode", "tls", "proxy_protocol"),
    "[tls]": ("cert", "key"),
    "[auth]": ("users_file", "max_failures", "failure_window"),
    "[relay]": (
        "domains",
        "networks",
        "allow_open_relay",
        "verify_recipients",
        "recipients_file",
    ),
    "[limits]": (
        "max_message_size",
        "max_recipients",
        "max_connections",
        "max_connections_per_ip",
        "idle_timeout",
    ),
    "[rate_limits]": ("per_ip", "per_user", "per_sender_domain"),
    "[spf]": ("enabled", "on_fail", "on_softfail"),
    "[[dkim.key]]": ("domain", "selector", "key_file"),
    "[dmarc]": ("on_reject",),
    "[spool]": ("path", "min_free_space"),
    "[delivery]": (
        "retry",
        "max_age",
        "delay_warning",
        "concurrency",
        "per_domain_concurrency",
        "port",
        "tls",
        "connect_timeout",
        "command_timeout",
        "mta_sts",
        "ca_file",
    ),
    "[[route]]": ("domain", "via", "username", "password_file", "tls", "tls_verify", "ca_file"),
    "[dns]": ("nameservers", "timeout", "dnssec"),
    "[doctor]": ("addresses", "dnsbl"),
    "[control]": ("socket", "group"),
    "[local]": ("socket",),
    "[logging]": ("level", "target"),
    "[metrics]": ("address",),
    "[api]": ("address", "tls"),
    "[cluster]": ("redis",),
    "[server]": ("processes", "proxy_from"),
    "[suppression]": ("enabled", "expire"),
    "[[webhook]]": ("url", "events", "secret_file"),
}

# Top-level names that open a section, and whether they are one table
# ([tls]) or an array of tables ([[listener]]).
_SECTIONS: Final[Mapping[str, Literal["table", "array"]]] = {
    "listener": "array",
    "tls": "table",
    "auth": "table",
    "relay": "table",
    "limits": "table",
    "rate_limits": "table",
    "spf": "table",
    "dkim": "table",
    "dmarc": "table",
    "spool": "table",
    "delivery": "table",
    "route": "array",
    "dns": "table",
    "doctor": "table",
    "control": "table",
    "local": "table",
    "logging": "table",
    "metrics": "table",
    "api": "table",
    "cluster": "table",
    "server": "table",
    "suppression": "table",
    "webhook": "array",
}

LOG_LEVELS: Final = ("debug", "info", "warning", "error")

TablePath = tuple[str | int, ...]
_T = TypeVar("_T")
_S = TypeVar("_S", bound=str)


# ---------------------------------------------------------------------------
# Line numbers. tomllib returns plain dicts, so a small scan of the raw text
# finds the line of every table header and key; it only has to follow
# strings and brackets well enough to skip multi-line values.

_KEY_PART = r"""(?:[A-Za-z0-9_-]+|"(?:[^"\\]|\\.)*"|'[^']*')"""
_DOTTED_KEY = rf"{_KEY_PART}(?:\s*\.\s*{_KEY_PART})*"
_HEADER_RE = re.compile(rf"\s*(\[\[?)\s*({_DOTTED_KEY})\s*\]\]?\s*(?:#.*)?")
_KEY_LINE_RE = re.compile(rf"\s*({_DOTTED_KEY})\s*=(.*)")
_KEY_PART_RE = re.compile(_KEY_PART)


@dataclass(frozen=True)
class LineMap:
    """Where each table and key of one TOML text starts, for problem lines.

    Tables are paths like ("limits",) or ("listener", 1) (the second
    [[listener]]); a key without a line of its own (an inline table, a
    default) falls back to its table's line, and finally to line 1.
    """

    headers: Mapping[TablePath, int] = field(default_factory=dict)
    keys: Mapping[tuple[TablePath, str], int] = field(default_factory=dict)

    @classmethod
    def scan(cls, text: str) -> LineMap:
        return _LineScanner().scan(text)

    def line(self, table: TablePath, key: str | None = None) -> int:
        if key is not None:
            found = self.keys.get((table, key))
            if found is not None:
                return found
        return self._table_line(table)

    def _table_line(self, table: TablePath) -> int:
        found = self.headers.get(table)
        if found is not None:
            return found
        if not table:
            return 1
        parent, last = table[:-1], table[-1]
        if isinstance(last, int):
            return self._table_line(parent)
        return self.line(parent, last)


def _key_parts(dotted: str) -> list[str]:
    return [part.strip("\"'") for part in _KEY_PART_RE.findall(dotted)]


class _LineScanner:
    def __init__(self) -> None:
        self.headers: dict[TablePath, int] = {}
        self.keys: dict[tuple[TablePath, str], int] = {}
        self.arrays: dict[TablePath, int] = {}
        self.table: TablePath = ()
        self.quote: str | None = None  # the delimiter of an open multi-line string
        self.depth = 0  # open [ and { of a multi-line value

    def scan(self, text: str) -> LineMap:
        # tomllib counts "\n" only; str.splitlines would also split on \r, \f, ...
        for number, line in enumerate(text.split("\n"), 1):
            if self.quote is not None or self.depth > 0:
                self._skip_value(line)
            else:
                self._scan_line(number, line)
        return LineMap(self.headers, self.keys)

    def _scan_line(self, number: int, line: str) -> None:
        header = _HEADER_RE.fullmatch(line)
        if header is not None:
            self._enter_table(number, header[1] == "[[", _key_parts(header[2]))
            return
        key = _KEY_LINE_RE.match(line)
        if key is not None:
            self._record_key(number, _key_parts(key[1]))
            self._skip_value(key[2])

    def _enter_table(self, number: int, is_array: bool, parts: list[str]) -> None:
        resolved: list[str | int] = []
        for position, part in enumerate(parts):
            resolved.append(part)
            prefix = tuple(resolved)
            if position < len(parts) - 1 and prefix in self.arrays:
                resolved.append(self.arrays[prefix] - 1)
        table: TablePath = tuple(resolved)
        if is_array:
            index = self.arrays.get(table, 0)
            self.arrays[table] = index + 1
            table = (*table, index)
        self.headers.setdefault(table, number)
        self.table = table

    def _record_key(self, number: int, parts: list[str]) -> None:
        table = self.table
        for part in parts[:-1]:
            self.keys.setdefault((table, part), number)
            table = (*table, part)
        self.keys.setdefault((table, parts[-1]), number)

    def _skip_value(self, text: str) -> None:
        """Follow strings and brackets so that lines inside a value are not keys."""
        position = 0
        while position < len(text):
            if self.quote is not None:
                end = text.find(self.quote, position)
                if end < 0:
                    return
                position, self.quote = end + 3, None
                continue
            position = self._skip_token(text, position)

    def _skip_token(self, text: str, position: int) -> int:
        char = text[position]
        if char == "#":
            return len(text)
        if text.startswith(('"""', "'''"), position):
            self.quote = text[position : position + 3]
            return position + 3
        if char in "\"'":
            return _string_end(text, position)
        if char in "[{":
            self.depth += 1
        elif char in "]}":
            self.depth -= 1
        return position + 1


def _string_end(text: str, start: int) -> int:
    """The position just past the one-line string that opens at ``start``."""
    quote = text[start]
    position = start + 1
    while position < len(text) and text[position] != quote:
        position += 2 if quote == '"' and text[position] == "\\" else 1
    return position + 1


# ---------------------------------------------------------------------------
# Problem lines.


def _label(table: TablePath) -> str:
    names = [part for part in table if isinstance(part, str)]
    if not names:
        return ""
    dotted = ".".join(names)
    return f"[[{dotted}]]" if isinstance(table[-1], int) else f"[{dotted}]"


def _quote(value: object) -> str:
    return json.dumps(str(value), ensure_ascii=False)


def _show(value: object) -> str:
    """A value as the operator wrote it in TOML, for "got ..." in problems."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return _quote(value)
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, datetime | date | time):
        return f"a date/time ({value.isoformat()})"
    return repr(value)


def _either(options: Iterable[str]) -> str:
    quoted = [_quote(option) for option in options]
    return quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " or " + quoted[-1]


@dataclass
class _Report:
    """Problems collected while reading one file, sorted by line at the end."""

    source: Path
    lines: LineMap
    errors: list[tuple[int, int, str]] = field(default_factory=list)
    warnings: list[tuple[int, int, str]] = field(default_factory=list)

    def error(self, table: TablePath, key: str | None, problem: str, line: int = 0) -> None:
        self._add(self.errors, table, key, problem, line)

    def warn(self, table: TablePath, key: str | None, problem: str, line: int = 0) -> None:
        self._add(self.warnings, table, key, "warning: " + problem, line)

    def _add(
        self,
        into: list[tuple[int, int, str]],
        table: TablePath,
        key: str | None,
        problem: str,
        line: int,
    ) -> None:
        line = line or self.lines.line(table, key)
        where = " ".join(part for part in (_label(table), key or "") if part)
        text = f"relayd: {self.source}:{line}: {where + ': ' if where else ''}{problem}"
        into.append((line, len(into), text))

    def error_lines(self) -> list[str]:
        return [text for _, _, text in sorted(self.errors)]

    def warning_lines(self) -> list[str]:
        return [text for _, _, text in sorted(self.warnings)]


class _Bad(Exception):
    """A value that cannot be used; each argument is one problem with it."""

    def __init__(self, *problems: str) -> None:
        super().__init__(*problems)
        self.problems = problems


# Keys people reach for that relayd spells differently.
_KEY_HINTS: Final[Mapping[tuple[str, str], str]] = {
    ("[[listener]]", "port"): 'the port goes in address, like address = "0.0.0.0:587"',
    ("[[listener]]", "host"): 'the host goes in address, like address = "0.0.0.0:587"',
    ("[[route]]", "port"): 'the port goes in via, like via = "smtp.example.net:587"',
    ("[[route]]", "host"): 'the host goes in via, like via = "smtp.example.net:587"',
    ("[[route]]", "password"): "put the password in a file and name it in password_file",
}


def _unknown_key(key: str, known: Iterable[str], here: str) -> str:
    hint = _KEY_HINTS.get((here, key))
    if hint is not None:
        return f"unknown key {_quote(key)}; {hint}"
    known = list(known)
    close = difflib.get_close_matches(key, known, n=1)
    homes = [label for label, keys in SCHEMA.items() if key in keys and label != here]
    home = ""
    if homes:
        home = "at the top, before any [section]" if homes[0] == "" else f"under {homes[0]}"
    if close and home:
        return (
            f"unknown key {_quote(key)} (did you mean {_quote(close[0])}? "
            f"{_quote(key)} belongs {home})"
        )
    if close:
        return f"unknown key {_quote(key)} (did you mean {_quote(close[0])}?)"
    if home:
        return f"unknown key {_quote(key)} (it belongs {home})"
    return f"unknown key {_quote(key)}; the keys here are {', '.join(known)}"


class _Section:
    """One table of the file: typed reads with defaults, and its unknown keys."""

    def __init__(self, report: _Report, table: TablePath, data: Mapping[str, object]) -> None:
        self.report = report
        self.table = table
        self.data = data
        self.label = _label(table)
        self.failed = False  # a problem was found: skip cross-checks built on guesses

    def has(self, key: str) -> bool:
        return key in self.data

    def line(self, key: str | None = None) -> int:
        return self.report.lines.line(self.table, key)

    def get(self, key: str, parse: Callable[[object], _T], default: _T) -> _T:
        if key not in SCHEMA[self.label]:
            raise KeyError(f"{self.label} {key} is missing from SCHEMA")
        if key not in self.data:
            return default
        try:
            return parse(self.data[key])
        except _Bad as bad:
            for problem in bad.problems:
                self.error(key, problem)
            return default

    def require(self, key: str, parse: Callable[[object], _T], example: str) -> _T | None:
        if key not in self.data:
            self.error(key, f"missing; add {key} = {example}")
            return None
        return self.get(key, parse, None)

    def error(self, key: str | None, problem: str, line: int = 0) -> None:
        self.failed = True
        self.report.error(self.table, key, problem, line)

    def warn(self, key: str | None, problem: str, line: int = 0) -> None:
        self.report.warn(self.table, key, problem, line)

    def check_unknown(self) -> None:
        known = SCHEMA[self.label]
        for key in self.data:
            if key not in known:
                self.error(key, _unknown_key(key, known, self.label))


# ---------------------------------------------------------------------------
# Value parsers: each takes what tomllib produced and returns the typed value
# or raises _Bad with the problem, phrased so that it names the fix.


def _integer(minimum: int, maximum: int | None = None) -> Callable[[object], int]:
    def parse(value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            quoted = isinstance(value, str) and value.strip().lstrip("-").isdigit()
            hint = " (remove the quotes)" if quoted else ""
            raise _Bad(f"expected an integer, got {_show(value)}{hint}")
        if maximum is not None and not minimum <= value <= maximum:
            raise _Bad(f"must be between {minimum} and {maximum}, got {value}")
        if value < minimum:
            raise _Bad(f"must be at least {minimum}, got {value}")
        return value

    return parse


def _boolean(value: object) -> bool:
    if isinstance(value, bool):
        return value
    quoted = isinstance(value, str) and value.strip().lower() in ("true", "false")
    hint = " (remove the quotes)" if quoted else ""
    raise _Bad(f"expected true or false, got {_show(value)}{hint}")


def _string(value: object) -> str:
    if not isinstance(value, str):
        scalar = isinstance(value, int | float)
        hint = " (put it in quotes)" if scalar else ""
        raise _Bad(f"expected a string, got {_show(value)}{hint}")
    if not value.strip():
        raise _Bad(f"expected a non-empty string, got {_show(value)}")
    return value


def _choice(options: tuple[_S, ...]) -> Callable[[object], _S]:
    def parse(value: object) -> _S:
        wanted = value.strip().lower() if isinstance(value, str) else None
        for option in options:
            if option == wanted:
                return option
        close = difflib.get_close_matches(wanted, options, n=1) if wanted else []
        hint = f" (did you mean {_quote(close[0])}?)" if close else ""
        raise _Bad(f"expected {_either(options)}, got {_show(value)}{hint}")

    return parse


def _size(minimum: int) -> Callable[[object], int]:
    def parse(value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, str | int):
            raise _Bad(f'expected a size like "25MB", got {_show(value)}')
        try:
            size = parse_size(value)
        except ValueError as error:
            raise _Bad(str(error)) from None
        if size < minimum:
            raise _Bad(f"must be larger than {minimum - 1} bytes, got {_show(value)}")
        return size

    return parse


def _duration(allow_zero: bool) -> Callable[[object], float]:
    def parse(value: object) -> float:
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise _Bad(f'expected a duration like "90s", "15m", "4h" or "5d", got {_show(value)}')
        try:
            seconds = parse_duration(value)
        except ValueError as error:
            raise _Bad(str(error)) from None
        if seconds == 0 and not allow_zero:
            raise _Bad(f"must be longer than 0, got {_show(value)}")
        return seconds

    return parse


def _rate(value: object) -> Rate:
    if not isinstance(value, str):
        raise _Bad(f'expected a rate like "100/hour", got {_show(value)}')
    try:
        return parse_rate(value)
    except ValueError as error:
        raise _Bad(str(error)) from None


def _path(base: Path) -> Callable[[object], Path]:
    """Relative paths are taken from the config file's directory, not the cwd."""

    def parse(value: object) -> Path:
        text = _string(value)
        if "\0" in text:
            raise _Bad("a path cannot contain a NUL character")
        path = Path(text)
        return path if path.is_absolute() else base / path

    return parse


def _array(
    item: Callable[[object], _T], example: str, non_empty: bool = False
) -> Callable[[object], tuple[_T, ...]]:
    def parse(value: object) -> tuple[_T, ...]:
        if not isinstance(value, list):
            hint = f" (put it in brackets: [{_show(value)}])" if isinstance(value, str) else ""
            raise _Bad(f"expected an array like {example}, got {_show(value)}{hint}")
        if non_empty and not value:
            raise _Bad(f"must not be empty; write at least one, like {example}")
        items: list[_T] = []
        problems: list[str] = []
        for entry in value:
            try:
                items.append(item(entry))
            except _Bad as bad:
                problems.extend(bad.problems)
        if problems:
            raise _Bad(*problems)
        return tuple(items)

    return parse


_LABEL_RE = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_SELECTOR_RE = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?")
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def _ascii_name(text: str) -> str | None:
    """A lower-case ASCII (xn--) form of a name, or None when it is not a valid one."""
    name = text.strip().rstrip(".").lower()
    try:
        name = name.encode("idna").decode("ascii")
    except UnicodeError:
        return None
    labels = name.split(".")
    if len(name) > 253 or not all(_LABEL_RE.fullmatch(label) for label in labels):
        return None
    return name


def _hostname(value: object) -> str:
    text = _string(value).strip().rstrip(".")
    name = _ascii_name(text)
    if name is None:
        raise _Bad(f'expected a host name like "mail.example.com", got {_show(value)}')
    # Keep the operator's capitals in the banner; only non-ASCII needs xn--.
    return text if text.isascii() else name


def _domain(value: object) -> str:
    text = _string(value)
    if "@" in text:
        suggestion = text.rpartition("@")[2] or "example.com"
        raise _Bad(
            f"{_show(value)} is an address; write only the domain, like {_quote(suggestion)}"
        )
    name = _ascii_name(text)
    if name is None:
        raise _Bad(f'expected a domain like "example.com", got {_show(value)}')
    return name


def _route_domain(value: object) -> str:
    if isinstance(value, str) and value.strip() == "*":
        return "*"
    try:
        return _domain(value)
    except _Bad:
        raise _Bad(
            f'expected a domain like "example.com" or "*" for all mail, got {_show(value)}'
        ) from None


def _selector(value: object) -> str:
    text = _string(value).strip()
    if not all(_SELECTOR_RE.fullmatch(label) for label in text.lower().split(".")):
        raise _Bad(f'expected a DKIM selector like "mail2024", got {_show(value)}')
    return text


def _listener_name(value: object) -> str:
    text = _string(value)
    if not _NAME_RE.fullmatch(text):
        raise _Bad(
            f'expected a name of letters, digits, ".", "_" and "-" (it appears in log names), '
            f"got {_show(value)}"
        )
    return text


def _group(value: object) -> str:
    text = _string(value).strip()
    if any(char.isspace() or char == ":" for char in text):
        raise _Bad(f"expected a group name, got {_show(value)}")
    return text


# The shortest [relay] networks prefix (SPEC section 7): a shorter one lets a
# large part of the internet relay through relayd -- an open relay by accident.
MIN_RELAY_PREFIX = {4: 8, 6: 32}


def _network(value: object) -> IPNetwork:
    """A [relay] networks entry: a prefix of at least /8 (IPv4) or /32 (IPv6)."""
    network = _strict_network(value)
    shortest = MIN_RELAY_PREFIX[network.version]
    if network.prefixlen < shortest:
        size = network.max_prefixlen - network.prefixlen
        who = "anyone on the internet" if network.prefixlen == 0 else f"2^{size} addresses"
        raise _Bad(
            f"{_quote(network)} is shorter than /{shortest}: it lets {who} relay mail through "
            f"relayd, an open relay by accident; list only your own networks (/{shortest} or "
            "longer) and let other senders authenticate on a submission listener"
        )
    return network


def _no_open_relay(value: object) -> bool:
    """allow_open_relay: kept so old configs load, but it can no longer open anything."""
    if _boolean(value):
        raise _Bad(
            "no longer supported: relayd never relays for networks shorter than /8 (IPv4) "
            "or /32 (IPv6); remove allow_open_relay and list only your own networks"
        )
    return False


def _strict_network(value: object) -> IPNetwork:
    """A network from CIDR or a bare address; host bits set is a typo, not a wish."""
    text = _string(value).strip()
    try:
        return ipaddress.ip_network(text)
    except ValueError:
        pass
    try:
        whole = ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise _Bad(
            f'expected a network like "192.0.2.0/24" or an address like "192.0.2.7", '
            f"got {_show(value)}"
        ) from None
    single = f"{text.partition('/')[0]}/{whole.max_prefixlen}"
    raise _Bad(
        f"{_show(value)} has host bits set; write {_quote(whole)} for the whole network "
        f"or {_quote(single)} for the one address"
    )


def _host_port(
    example: str, default_port: int | None = None, ip_only: bool = False
) -> Callable[[object], HostPort]:
    def parse(value: object) -> HostPort:
        text = _string(value).strip()
        host, port = _split_host_port(text, example)
        if port is None and default_port is None:
            raise _Bad(_missing_port(text, host, example))
        checked = _check_host(host, value, example, ip_only)
        return HostPort(checked, _port(port, default_port, value))

    return parse


def _missing_port(text: str, host: str, example: str) -> str:
    if ":" in host and not text.startswith("["):
        return (
            f'an IPv6 address goes in brackets before the port, like "[::1]:25"; got {_quote(text)}'
        )
    return f"missing the port in {_quote(text)}; write it like {_quote(example)}"


def _split_host_port(text: str, example: str) -> tuple[str, str | None]:
    """(host, port text or None) from "host:port", "[v6]:port", "host" or a bare IP."""
    try:
        return str(ipaddress.ip_address(text)), None
    except ValueError:
        pass
    if text.startswith("["):
        match = re.fullmatch(r"\[([^\]]*)\](?::(.*))?", text)
        if match is None:
            raise _Bad(f"expected host:port like {_quote(example)}, got {_quote(text)}")
        return match[1], match[2]
    host, colon, port = text.rpartition(":")
    if not colon:
        return text, None
    if ":" in host:
        if not port.isdigit():
            raise _Bad(f"expected host:port like {_quote(example)}, got {_quote(text)}")
        raise _Bad(f'IPv6 addresses go in brackets, like "[{host}]:{port}"; got {_quote(text)}')
    return host, port


def _check_host(host: str, value: object, example: str, ip_only: bool) -> str:
    if not host:
        raise _Bad(
            f"missing the host in {_show(value)}; write it like {_quote(example)} "
            '("0.0.0.0" is every IPv4 address, "[::]" every IPv6 address)'
        )
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    if ip_only:
        raise _Bad(f"expected an IP address like {_quote(example)}, got {_show(value)}")
    name = _ascii_name(host)
    if name is None:
        raise _Bad(f"expected host:port like {_quote(example)}, got {_show(value)}")
    return name


def _port(text: str | None, default: int | None, value: object) -> int:
    if text is None:
        return default or 0
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise _Bad(f"the port must be a number from 1 to 65535, got {_show(value)}")
    return int(text)


# ---------------------------------------------------------------------------
# Sections, in message-path order.


_LISTENER_MODES: Final[tuple[ListenerMode, ...]] = get_args(ListenerMode)
_LISTENER_TLS: Final[tuple[ListenerTLS, ...]] = get_args(ListenerTLS)
_ROUTE_TLS: Final[tuple[RouteTLS, ...]] = get_args(RouteTLS)
_DELIVERY_TLS: Final[tuple[DeliveryTLS, ...]] = get_args(DeliveryTLS)
_DNSSEC: Final[tuple[DNSSEC, ...]] = get_args(DNSSEC)
_SPF_ACTIONS: Final[tuple[SPFAction, ...]] = get_args(SPFAction)
_DMARC_ACTIONS: Final[tuple[DMARCAction, ...]] = get_args(DMARCAction)
_LOG_TARGETS: Final[tuple[LogTarget, ...]] = get_args(LogTarget)
_DEFAULT_LISTENER_PORTS: Final = {"inbound": 25, "implicit": 465, "submission": 587}
_DEFAULT_LISTENER_NAMES: Final = {"inbound": "smtp", "implicit": "submissions"}


@dataclass
class _Loader:
    """Reads every section of one parsed file into the Config dataclasses."""

    report: _Report
    data: Mapping[str, Any]
    base: Path

    def section(self, name: str) -> _Section:
        value = self.data.get(name, {})
        return _Section(self.report, (name,), value if isinstance(value, dict) else {})

    def array(self, *names: str) -> list[_Section]:
        value: Any = self.data
        for name in names:
            value = value.get(name, []) if isinstance(value, dict) else []
        if not isinstance(value, list):
            return []
        return [
            _Section(self.report, (*names, index), entry)
            for index, entry in enumerate(value)
            if isinstance(entry, dict)
        ]

    def path(self) -> Callable[[object], Path]:
        return _path(self.base)


def _check_top_level(loader: _Loader) -> None:
    report = loader.report
    for key, value in loader.data.items():
        kind = _SECTIONS.get(key)
        if key == "hostname":
            continue
        if kind is None:
            _unknown_top_level(report, key, value)
        elif kind == "array" and not _is_tables(value):
            _not_array_of_tables(report, key, value)
        elif kind == "table" and not isinstance(value, dict):
            _not_a_table(report, key, value)


def _is_tables(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(entry, dict) for entry in value)


def _unknown_top_level(report: _Report, key: str, value: object) -> None:
    if isinstance(value, dict) or (_is_tables(value) and value):
        array = not isinstance(value, dict)
        close = difflib.get_close_matches(key, list(_SECTIONS), n=1)
        hint = ""
        if close:
            shown = f"[[{close[0]}]]" if _SECTIONS[close[0]] == "array" else f"[{close[0]}]"
            hint = f" (did you mean {shown}?)"
        report.error((key, 0) if array else (key,), None, f"unknown section{hint}")
        return
    report.error((), key, _unknown_key(key, ["hostname", *_SECTIONS], ""))


def _not_array_of_tables(report: _Report, key: str, value: object) -> None:
    if isinstance(value, dict):
        report.error((key,), None, f"write [[{key}]] (one for each {key}), not [{key}]")
    else:
        report.error((), key, f"expected [[{key}]] tables, got {_show(value)}")


def _not_a_table(report: _Report, key: str, value: object) -> None:
    if _is_tables(value):
        report.error((key, 0), None, f"write [{key}], not [[{key}]]: there is only one")
    else:
        report.error((), key, f"expected a [{key}] table, got {_show(value)}")


def _read_hostname(loader: _Loader) -> str:
    top = _Section(loader.report, (), loader.data)
    hostname = top.require("hostname", _hostname, '"mail.example.com"') or "invalid"
    if hostname == EXAMPLE_HOSTNAME:
        top.warn(
            "hostname",
            f'still the example "{EXAMPLE_HOSTNAME}": set it to this server\'s public name '
            "(the name its reverse DNS gives), or receivers will distrust its mail",
        )
    return hostname


# A listener with the section it came from, so cross-checks can point at it.
_Placed = tuple[Listener, _Section]


def _read_listener(section: _Section) -> _Placed | None:
    section.check_unknown()
    mode: ListenerMode = section.get("mode", _choice(_LISTENER_MODES), "submission")
    tls: ListenerTLS = section.get("tls", _choice(_LISTENER_TLS), "starttls")
    kind = "inbound" if mode == "inbound" else "implicit" if tls == "implicit" else "submission"
    default_address = HostPort("0.0.0.0", _DEFAULT_LISTENER_PORTS[kind])
    address = section.get("address", _host_port("0.0.0.0:587"), default_address)
    name = section.get("name", _listener_name, _DEFAULT_LISTENER_NAMES.get(kind, "submission"))
    proxy = section.get("proxy_protocol", _boolean, False)
    if section.failed:
        return None
    return Listener(name, address, mode, tls, proxy), section


def _read_listeners(loader: _Loader) -> list[_Placed]:
    sections = loader.array("listener")
    placed = [_read_listener(section) for section in sections]
    listeners = [entry for entry in placed if entry is not None]
    _check_listener_clashes(listeners)
    for listener, section in listeners:
        if listener.mode == "submission" and listener.tls == "none":
            section.warn(
                "tls",
                f"listener {_quote(listener.name)} is a submission listener without TLS, so no "
                "user can authenticate on it (AUTH needs TLS) and only [relay] networks "
                'clients can send through it; set tls = "starttls" or "implicit"',
            )
    if not sections:
        loader.report.warn((), None, "no [[listener]] is configured, so relayd accepts no mail")
    return listeners


def _check_listener_clashes(listeners: list[_Placed]) -> None:
    names: dict[str, _Placed] = {}
    addresses: dict[HostPort, _Placed] = {}
    for entry in listeners:
        listener, section = entry
        first, first_section = names.setdefault(listener.name, entry)
        if first is not listener:
            section.error(
                "name",
                f"another [[listener]] (line {first_section.line()}) is already named "
                f"{_quote(listener.name)}; give each [[listener]] its own name",
            )
        taken, _ = addresses.setdefault(listener.address, entry)
        if taken is not listener:
            section.error(
                "address",
                f"{_quote(listener.address)} is already the address of listener "
                f"{_quote(taken.name)}; each [[listener]] needs its own address",
            )


_TLS_EXAMPLES: Final = {
    "cert": '"/etc/relayd/tls/fullchain.pem"',
    "key": '"/etc/relayd/tls/privkey.pem"',
}


def _read_tls(loader: _Loader, listeners: list[_Placed]) -> TLSConfig:
    section = loader.section("tls")
    section.check_unknown()
    cert = section.get("cert", loader.path(), None)
    key = section.get("key", loader.path(), None)
    users = [entry for entry in listeners if entry[0].tls != "none"]
    for name, other in (("cert", key), ("key", cert)):
        if section.has(name):
            continue
        if users:
            _tls_needed(loader, section, name, users[0])
        elif other is not None:
            section.error(
                name, f"missing; [tls] needs both cert and key: add {name} = {_TLS_EXAMPLES[name]}"
            )
    return TLSConfig(cert, key)


def _tls_needed(loader: _Loader, section: _Section, name: str, user: _Placed) -> None:
    """Point at [tls] when it exists, else at the listener that asks for TLS."""
    listener, listener_section = user
    line = section.line() if "tls" in loader.data else listener_section.line("tls")
    section.error(
        name,
        f"missing; listener {_quote(listener.name)} uses tls = {_quote(listener.tls)}, "
        f"so add {name} = {_TLS_EXAMPLES[name]} under [tls]",
        line,
    )


def _read_auth(loader: _Loader) -> AuthConfig:
    section = loader.section("auth")
    section.check_unknown()
    default = AuthConfig()
    return AuthConfig(
        users_file=section.get("users_file", loader.path(), default.users_file),
        max_failures=section.get("max_failures", _integer(1), default.max_failures),
        failure_window=section.get("failure_window", _duration(False), default.failure_window),
    )


def _read_relay(loader: _Loader) -> RelayConfig:
    section = loader.section("relay")
    section.check_unknown()
    default = RelayConfig()
    domains = section.get("domains", _array(_domain, '["example.com"]'), default.domains)
    allow_open = section.get("allow_open_relay", _no_open_relay, default.allow_open_relay)
    example = '["127.0.0.0/8", "::1/128"]'
    networks = section.get("networks", _array(_network, example), default.networks)
    return RelayConfig(
        tuple(dict.fromkeys(domains)),
        networks,
        allow_open,
        verify_recipients=section.get("verify_recipients", _boolean, default.verify_recipients),
        recipients_file=section.get("recipients_file", loader.path(), default.recipients_file),
    )


def _read_limits(loader: _Loader) -> Limits:
    section = loader.section("limits")
    section.check_unknown()
    default = Limits()
    return Limits(
        max_message_size=section.get("max_message_size", _size(1), default.max_message_size),
        max_recipients=section.get("max_recipients", _integer(1), default.max_recipients),
        max_connections=section.get("max_connections", _integer(1), default.max_connections),
        max_connections_per_ip=section.get(
            "max_connections_per_ip", _integer(1), default.max_connections_per_ip
        ),
        idle_timeout=section.get("idle_timeout", _duration(False), default.idle_timeout),
    )


def _read_rate_limits(loader: _Loader) -> RateLimits:
    section = loader.section("rate_limits")
    section.check_unknown()
    return RateLimits(
        per_ip=section.get("per_ip", _rate, None),
        per_user=section.get("per_user", _rate, None),
        per_sender_domain=section.get("per_sender_domain", _rate, None),
    )


def _read_spf(loader: _Loader) -> SPFConfig:
    section = loader.section("spf")
    section.check_unknown()
    default = SPFConfig()
    return SPFConfig(
        enabled=section.get("enabled", _boolean, default.enabled),
        on_fail=section.get("on_fail", _choice(_SPF_ACTIONS), default.on_fail),
        on_softfail=section.get("on_softfail", _choice(_SPF_ACTIONS), default.on_softfail),
    )


def _read_dkim(loader: _Loader) -> DKIMConfig:
    dkim = loader.data.get("dkim")
    if isinstance(dkim, dict):
        for key, value in dkim.items():
            if key != "key":
                loader.report.error(("dkim",), key, _unknown_key(key, ["key"], "[dkim]"))
            elif isinstance(value, dict):
                loader.report.error(
                    ("dkim", "key"), None, "write [[dkim.key]] (one for each key), not [dkim.key]"
                )
            elif not _is_tables(value):
                problem = f"expected [[dkim.key]] tables, got {_show(value)}"
                loader.report.error(("dkim",), key, problem)
    keys: list[DKIMKey] = []
    seen: dict[tuple[str, str], int] = {}
    for section in loader.array("dkim", "key"):
        key = _read_dkim_key(loader, section)
        if key is None:
            continue
        first = seen.setdefault((key.domain, key.selector.lower()), section.line())
        if first != section.line():
            section.error(
                "selector",
                f"another [[dkim.key]] (line {first}) already has domain {_quote(key.domain)} "
                f"and selector {_quote(key.selector)}; keep one of them",
            )
        keys.append(key)
    return DKIMConfig(tuple(keys))


def _read_dkim_key(loader: _Loader, section: _Section) -> DKIMKey | None:
    section.check_unknown()
    domain = section.require("domain", _domain, '"example.com"')
    selector = section.require("selector", _selector, '"mail2024"')
    key_file = section.require(
        "key_file", loader.path(), '"/etc/relayd/dkim/example.com.mail2024.key"'
    )
    if domain is None or selector is None or key_file is None:
        return None
    return DKIMKey(domain, selector, key_file)


def _read_dmarc(loader: _Loader) -> DMARCConfig:
    section = loader.section("dmarc")
    section.check_unknown()
    action = section.get("on_reject", _choice(_DMARC_ACTIONS), DMARCConfig().on_reject)
    return DMARCConfig(on_reject=action)


def _read_spool(loader: _Loader) -> SpoolConfig:
    section = loader.section("spool")
    section.check_unknown()
    default = SpoolConfig()
    return SpoolConfig(
        path=section.get("path", loader.path(), default.path),
        min_free_space=section.get("min_free_space", _size(0), default.min_free_space),
    )


def _read_delivery(loader: _Loader) -> DeliveryConfig:
    section = loader.section("delivery")
    section.check_unknown()
    default = DeliveryConfig()
    positive = _duration(False)
    retry = _array(positive, '["5m", "30m", "2h"]', non_empty=True)
    return DeliveryConfig(
        retry=section.get("retry", retry, default.retry),
        max_age=section.get("max_age", positive, default.max_age),
        delay_warning=section.get("delay_warning", _duration(True), default.delay_warning),
        concurrency=section.get("concurrency", _integer(1), default.concurrency),
        per_domain_concurrency=section.get(
            "per_domain_concurrency", _integer(1), default.per_domain_concurrency
        ),
        port=section.get("port", _integer(1, 65535), default.port),
        tls=section.get("tls", _choice(_DELIVERY_TLS), default.tls),
        connect_timeout=section.get("connect_timeout", positive, default.connect_timeout),
        command_timeout=section.get("command_timeout", positive, default.command_timeout),
        mta_sts=section.get("mta_sts", _boolean, default.mta_sts),
        ca_file=section.get("ca_file", loader.path(), None),
    )


def _read_routes(loader: _Loader) -> tuple[Route, ...]:
    routes: list[Route] = []
    seen: dict[str, int] = {}
    for section in loader.array("route"):
        route = _read_route(loader, section)
        if route is None:
            continue
        first = seen.setdefault(route.domain, section.line())
        if first != section.line():
            section.error(
                "domain",
                f"another [[route]] (line {first}) is already for {_quote(route.domain)}; "
                "keep one route per domain",
            )
        routes.append(route)
    return tuple(routes)


_VIA_EXAMPLE = (
    '"smtp.example.net:587", "lmtp:127.0.0.1:24", "lmtp:/run/dovecot/lmtp" '
    'or "maildir:/var/mail/example.com"'
)


def _via(base: Path) -> Callable[[object], tuple[RouteTransport, HostPort, Path | None]]:
    """``via``: host:port (SMTP), lmtp:host:port, lmtp:/socket or maildir:/directory."""
    smtp = _host_port("smtp.example.net:587", 25)
    path = _path(base)

    def parse(value: object) -> tuple[RouteTransport, HostPort, Path | None]:
        text = _string(value).strip()
        scheme, colon, rest = text.partition(":")
        if colon and scheme == "maildir":
            if not rest:
                raise _Bad(f"maildir: needs a directory, e.g. {_VIA_EXAMPLE}")
            return "maildir", HostPort("localhost", 0), path(rest)
        if colon and scheme == "lmtp":
            if rest.startswith(("/", ".")):
                return "lmtp", HostPort("localhost", 0), path(rest)
            return "lmtp", _host_port("127.0.0.1:24", 24)(rest), None
        return "smtp", smtp(value), None

    return parse


def _read_route(loader: _Loader, section: _Section) -> Route | None:
    section.check_unknown()
    domain = section.get("domain", _route_domain, "*")
    parsed = section.require("via", _via(loader.base), '"smtp.example.net:587"')
    transport, via, path = parsed or ("smtp", None, None)
    route = Route(
        domain=domain,
        via=via or HostPort("invalid", 25),
        transport=transport,
        path=path,
        username=section.get("username", _string, None),
        password_file=section.get("password_file", loader.path(), None),
        tls=section.get("tls", _choice(_ROUTE_TLS), "starttls"),
        tls_verify=section.get("tls_verify", _boolean, True),
        ca_file=section.get("ca_file", loader.path(), None),
    )
    _check_route_auth(section, route)
    return route if parsed is not None else None


def _check_route_auth(section: _Section, route: Route) -> None:
    if route.username is not None and route.password_file is None:
        section.error(
            "password_file",
            "missing; username needs a password_file holding the password, "
            'add password_file = "/etc/relayd/smarthost.password"',
            section.line("username"),
        )
    if route.password_file is not None and route.username is None:
        section.error(
            "username",
            'missing; password_file needs a username to log in with, add username = "..."',
            section.line("password_file"),
        )
    if route.username is not None and route.tls == "none":
        section.error(
            "username",
            'relayd sends AUTH only over TLS, but this route has tls = "none"; '
            'set tls = "starttls" or "implicit", or remove username and password_file',
        )
    if route.tls == "implicit" and route.via.port == 25 and not section.failed:
        section.warn(
            "via",
            f'tls = "implicit" on port 25; implicit TLS usually listens on 465, '
            f'write via = "{route.via.host}:465"',
        )


def _read_dns(loader: _Loader) -> DNSConfig:
    section = loader.section("dns")
    section.check_unknown()
    nameserver = _host_port("127.0.0.1:5353", 53, ip_only=True)
    return DNSConfig(
        nameservers=section.get("nameservers", _array(nameserver, '["127.0.0.1"]'), ()),
        timeout=section.get("timeout", _duration(False), DNSConfig().timeout),
        dnssec=section.get("dnssec", _choice(_DNSSEC), DNSConfig().dnssec),
    )


def _ip_address(value: object) -> str:
    text = _string(value).strip()
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise _Bad(f'expected an IP address like "192.0.2.25", got {_show(value)}') from None


def _read_doctor(loader: _Loader) -> DoctorConfig:
    section = loader.section("doctor")
    section.check_unknown()
    none: tuple[str, ...] = ()
    addresses = section.get("addresses", _array(_ip_address, '["192.0.2.25"]'), none)
    default: tuple[str, ...] = DEFAULT_DNSBL
    dnsbl = section.get("dnsbl", _array(_domain, '["zen.spamhaus.org"]'), default)
    return DoctorConfig(
        addresses=tuple(dict.fromkeys(addresses)), dnsbl=tuple(dict.fromkeys(dnsbl))
    )


def _read_control(loader: _Loader) -> ControlConfig:
    section = loader.section("control")
    section.check_unknown()
    return ControlConfig(
        socket=section.get("socket", loader.path(), ControlConfig().socket),
        group=section.get("group", _group, None),
    )


def _read_local(loader: _Loader) -> LocalConfig:
    section = loader.section("local")
    section.check_unknown()
    path = loader.path()

    def socket_or_off(value: object) -> Path | None:
        return None if value == "" else path(value)

    return LocalConfig(socket=section.get("socket", socket_or_off, LocalConfig().socket))


def _read_logging(loader: _Loader) -> LoggingConfig:
    section = loader.section("logging")
    section.check_unknown()
    default = LoggingConfig()
    return LoggingConfig(
        level=section.get("level", _choice(LOG_LEVELS), default.level),
        target=section.get("target", _choice(_LOG_TARGETS), default.target),
    )


def _processes(value: object) -> int:
    if value == "auto":
        return 0
    try:
        return _integer(1, 64)(value)
    except _Bad as bad:
        raise _Bad(f'expected "auto" or a number of processes from 1 to 64; {bad}') from None


def _read_server(loader: _Loader) -> ServerConfig:
    section = loader.section("server")
    section.check_unknown()
    return ServerConfig(
        processes=section.get("processes", _processes, ServerConfig().processes),
        proxy_from=section.get("proxy_from", _array(_strict_network, '["10.0.0.5"]'), ()),
    )


def _read_metrics(loader: _Loader) -> MetricsConfig:
    section = loader.section("metrics")
    section.check_unknown()
    return MetricsConfig(address=section.get("address", _host_port("127.0.0.1:9587"), None))


def _redis_url(value: object) -> str:
    text = _string(value).strip()
    if not text.startswith(("redis://", "rediss://", "unix://")):
        raise _Bad(f'expected a URL like "redis://127.0.0.1:6379/0", got {_show(value)}')
    return text


def _read_cluster(loader: _Loader) -> ClusterConfig:
    section = loader.section("cluster")
    section.check_unknown()
    return ClusterConfig(redis=section.get("redis", _redis_url, None))


def _read_api(loader: _Loader) -> ApiConfig:
    section = loader.section("api")
    section.check_unknown()
    return ApiConfig(
        address=section.get("address", _host_port("127.0.0.1:8025"), None),
        tls=section.get("tls", _boolean, False),
    )


def _read_suppression(loader: _Loader) -> SuppressionConfig:
    section = loader.section("suppression")
    section.check_unknown()
    default = SuppressionConfig()
    return SuppressionConfig(
        enabled=section.get("enabled", _boolean, default.enabled),
        expire=section.get("expire", _duration(False), default.expire),
    )


def _webhook_url(value: object) -> str:
    text = _string(value).strip()
    scheme, sep, rest = text.partition("://")
    if not sep or scheme.lower() not in ("http", "https") or not rest or rest[0] in "/?#":
        raise _Bad(
            'expected an http:// or https:// URL like "https://app.example.com/hooks/mail", '
            f"got {_show(value)}"
        )
    if any(c.isspace() for c in text):
        raise _Bad(f"a URL cannot contain white space, got {_show(value)}")
    return text


def _read_webhooks(loader: _Loader) -> tuple[Webhook, ...]:
    hooks: list[Webhook] = []
    seen: dict[str, int] = {}
    for section in loader.array("webhook"):
        section.check_unknown()
        url = section.require("url", _webhook_url, '"https://app.example.com/hooks/mail"')
        events = section.get(
            "events", _array(_choice(EVENT_TYPES), '["bounced", "suppressed"]'), EVENT_TYPES
        )
        secret_file = section.get("secret_file", loader.path(), None)
        if url is None:
            continue
        first = seen.setdefault(url, section.line())
        if first != section.line():
            section.error(
                "url", f"another [[webhook]] (line {first}) already has this url; keep one"
            )
            continue
        hooks.append(Webhook(url=url, events=tuple(dict.fromkeys(events)), secret_file=secret_file))
    return tuple(hooks)


# ---------------------------------------------------------------------------
# Loading.


def _read_text(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except OSError as error:
        problem = f"relayd: {path}: cannot read config: {error.strerror or error}"
        raise ConfigError([problem]) from None
    try:
        return raw.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        raise ConfigError(
            [f"relayd: {path}:{line}: the file is not UTF-8 text; save it as UTF-8"]
        ) from None


_AT_LINE_RE = re.compile(r"\s*\(at line (\d+), column (\d+)\)$")


def _syntax_error(path: Path, text: str, error: tomllib.TOMLDecodeError) -> str:
    message = str(error)
    match = _AT_LINE_RE.search(message)
    if match is None:
        line = max(1, len(text.rstrip("\n").split("\n")))
        return f"relayd: {path}:{line}: TOML syntax error: {message}"
    detail = f"{message[: match.start()]} (column {match[2]})"
    if detail.startswith("Cannot overwrite a value"):
        detail += "; is this key set twice?"
    return f"relayd: {path}:{match[1]}: TOML syntax error: {detail}"


def load_config(path: Path, text: str | None = None) -> Config:
    """Read, parse and validate ``path``; raise ConfigError with every problem.

    Everything is checked before anything is refused, so one run lists all
    the problems and the operator fixes them in one edit. Files the config
    names are not opened here (see check_files): a reload must not fail on
    a certificate that is being renewed at that very moment. With ``text``
    the file is not read: ``text`` is taken as its content.
    """
    if text is None:
        text = _read_text(path)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError([_syntax_error(path, text, error)]) from None
    report = _Report(path, LineMap.scan(text))
    config = _build(_Loader(report, data, path.absolute().parent), text)
    if report.errors:
        raise ConfigError(report.error_lines(), partial=config)
    return config


def _build(loader: _Loader, text: str) -> Config:
    _check_top_level(loader)
    hostname = _read_hostname(loader)
    listeners = _read_listeners(loader)
    config = Config(
        hostname=hostname,
        listeners=tuple(listener for listener, _ in listeners),
        tls=_read_tls(loader, listeners),
        auth=_read_auth(loader),
        relay=_read_relay(loader),
        limits=_read_limits(loader),
        rate_limits=_read_rate_limits(loader),
        spf=_read_spf(loader),
        dkim=_read_dkim(loader),
        dmarc=_read_dmarc(loader),
        spool=_read_spool(loader),
        delivery=_read_delivery(loader),
        routes=_read_routes(loader),
        dns=_read_dns(loader),
        doctor=_read_doctor(loader),
        control=_read_control(loader),
        local=_read_local(loader),
        logging=_read_logging(loader),
        metrics=_read_metrics(loader),
        api=_read_api(loader),
        cluster=_read_cluster(loader),
        server=_read_server(loader),
        suppression=_read_suppression(loader),
        webhooks=_read_webhooks(loader),
        source=loader.report.source,
        lines=loader.report.lines,
    )
    # The warnings are complete only once every section has been read.
    for listener, section in listeners:
        if listener.proxy_protocol and not config.server.proxy_from:
            section.error(
                "proxy_protocol",
                f"listener {_quote(listener.name)} expects a PROXY header, but [server] "
                "proxy_from lists no balancer, so every connection would be closed; add "
                'the balancer\'s address, like proxy_from = ["10.0.0.5"]',
            )
    return replace(config, warnings=tuple(loader.report.warning_lines()), text=text)


# ---------------------------------------------------------------------------
# The files a config names. Checked apart from load_config because they
# change on their own schedule (certificates renew, keys are generated
# later); `relayd --check-config` runs both.


def check_files(config: Config) -> tuple[list[str], list[str]]:
    """(errors, warnings) about the files ``config`` names, as problem lines.

    TLS certificate and key must load as a pair, DKIM keys must be PEM RSA or
    Ed25519 private keys, route password and CA files must be readable. A
    users file that does not exist yet is only a warning: `relayctl user add`
    creates it, and until then nobody can authenticate.
    """
    report = _Report(config.source, config.lines or _rescan(config.source))
    _check_tls_files(report, config.tls)
    _check_users_file(report, config.auth.users_file)
    if config.relay.recipients_file is not None:
        _check_recipients_file(report, config.relay.recipients_file)
    for index, key in enumerate(config.dkim.keys):
        fix = f"create it with: relayctl dkim keygen {key.domain} {key.selector}"
        _check_dkim_key(report, ("dkim", "key", index), key.key_file, fix)
    for index, route in enumerate(config.routes):
        _check_route_files(report, ("route", index), route)
    _check_ca_file(report, ("delivery",), config.delivery.ca_file)
    for index, hook in enumerate(config.webhooks):
        if hook.secret_file is not None:
            secret = _read_named_file(report, ("webhook", index), "secret_file", hook.secret_file)
            if secret is not None and not secret.strip():
                report.error(
                    ("webhook", index), "secret_file", f"{_quote(hook.secret_file)} is empty"
                )
    _check_control_group(report, config.control.group)
    _check_daemon_access(report, config)
    return report.error_lines(), report.warning_lines()


def _check_daemon_access(report: _Report, config: Config, user: str | None = None) -> None:
    """Run as root: could the daemon's user (relayd.service's User=) read each file?"""
    from relayd.daemon_user import DAEMON_USER, daemon_user

    who = daemon_user(user or DAEMON_USER)
    if who is None:
        return
    named: list[tuple[TablePath, str, Path | None]] = [
        (("tls",), "cert", config.tls.cert),
        (("tls",), "key", config.tls.key),
        (("auth",), "users_file", config.auth.users_file),
        (("relay",), "recipients_file", config.relay.recipients_file),
    ]
    named += [(("dkim", "key", i), "key_file", k.key_file) for i, k in enumerate(config.dkim.keys)]
    for i, route in enumerate(config.routes):
        named += [(("route", i), "password_file", route.password_file)]
        named += [(("route", i), "ca_file", route.ca_file)]
    named += [(("webhook", i), "secret_file", w.secret_file) for i, w in enumerate(config.webhooks)]
    for table, key, path in named:
        if path is None:
            continue
        problem = who.cannot_read(path)
        if problem:
            report.error(table, key, problem)


def _check_control_group(report: _Report, group: str | None) -> None:
    if group is None:
        return
    import grp

    try:
        grp.getgrnam(group)
    except KeyError:
        report.error(
            ("control",),
            "group",
            f'there is no group "{group}" on this system; create it (groupadd {group}) '
            "or remove the key",
        )


def _rescan(source: Path) -> LineMap:
    """Lines for a Config built without load_config: read its source if there is one."""
    try:
        return LineMap.scan(source.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError):
        return LineMap()


def _read_named_file(
    report: _Report, table: TablePath, key: str, path: Path, fix: str = ""
) -> bytes | None:
    """The file's bytes, or an error that says what to do when it is missing."""
    try:
        return path.read_bytes()
    except FileNotFoundError as error:
        hint = f"; {fix}" if fix else ""
        report.error(table, key, f"cannot read {_quote(path)}: {error.strerror}{hint}")
    except OSError as error:
        report.error(table, key, f"cannot read {_quote(path)}: {error.strerror or error}")
    return None


_TLS_FIX = (
    "put the certificate chain and key there (docs/install.md: a certbot deploy hook "
    "copies them), or for a test make a self-signed pair with openssl req -x509"
)


def _check_tls_files(report: _Report, tls: TLSConfig) -> None:
    cert_ok = tls.cert is not None and _check_certificate(report, tls.cert)
    key_ok = tls.key is not None and (
        _load_private_key(report, ("tls",), "key", tls.key, _TLS_FIX) is not None
    )
    if tls.cert is not None and tls.key is not None and cert_ok and key_ok:
        _check_pair(report, tls.cert, tls.key)


def _check_certificate(report: _Report, path: Path) -> bool:
    from cryptography import x509  # here, not at the top: relayctl starts faster

    pem = _read_named_file(report, ("tls",), "cert", path, _TLS_FIX)
    if pem is None:
        return False
    try:
        certificates = x509.load_pem_x509_certificates(pem)
    except ValueError:
        report.error(
            ("tls",), "cert", f"{_quote(path)} holds no PEM certificate (BEGIN CERTIFICATE)"
        )
        return False
    expires = certificates[0].not_valid_after_utc
    if expires < datetime.now(UTC):
        report.warn(
            ("tls",), "cert", f"the certificate in {_quote(path)} expired on {expires:%Y-%m-%d}"
        )
    return True


def _load_private_key(
    report: _Report, table: TablePath, key: str, path: Path, fix: str = ""
) -> object | None:
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    pem = _read_named_file(report, table, key, path, fix)
    if pem is None:
        return None
    try:
        return load_pem_private_key(pem, password=None)
    except TypeError:
        report.error(
            table,
            key,
            f"{_quote(path)} is encrypted with a passphrase; relayd needs it unencrypted "
            "(openssl pkey -in OLD -out NEW)",
        )
    except (ValueError, UnsupportedAlgorithm):
        report.error(table, key, f"{_quote(path)} holds no PEM private key (BEGIN PRIVATE KEY)")
    return None


def _check_pair(report: _Report, cert: Path, key: Path) -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(cert, key)
    except ssl.SSLError as error:
        if error.reason == "KEY_VALUES_MISMATCH":
            problem = f"{_quote(key)} is not the private key of the certificate in {_quote(cert)}"
        else:
            problem = f"cannot use {_quote(cert)} with {_quote(key)}: {error.reason or error}"
        report.error(("tls",), "key", problem)


def _check_users_file(report: _Report, path: Path) -> None:
    try:
        with path.open("rb"):
            pass
    except FileNotFoundError:
        report.warn(
            ("auth",),
            "users_file",
            f'{_quote(path)} does not exist yet; "relayctl user add NAME" creates it',
        )
        return
    except OSError as error:
        report.error(("auth",), "users_file", f"cannot read {_quote(path)}: {error.strerror}")
        return
    _check_users(report, path)


def _check_users(report: _Report, path: Path) -> None:
    """Users that can log in but may send from no address at all: a setup mistake."""
    from relayd.users import UserDB, UserError

    try:
        db = UserDB.load(path)
    except (UserError, OSError) as error:
        report.error(("auth",), "users_file", str(error))
        return
    for name in db.names():
        user = db.get(name)
        if user is not None and "@" not in user.name and not user.allow_from:
            report.warn(
                ("auth",),
                "users_file",
                f"user {user.name} may send from no address: give it one "
                f"(relayctl user del {user.name}; relayctl user add {user.name} "
                "--allow-from 'app@example.com')",
            )


def _check_recipients_file(report: _Report, path: Path) -> None:
    """Unlike the users file, a missing list is an error: it would refuse nobody."""
    try:
        with path.open("rb"):
            pass
    except OSError as error:
        report.error(
            ("relay",),
            "recipients_file",
            f"cannot read {_quote(path)}: {error.strerror or error}; create it (one address "
            "or @domain per line) or remove the key",
        )


def _check_dkim_key(report: _Report, table: TablePath, path: Path, fix: str = "") -> None:
    from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

    key = _load_private_key(report, table, "key_file", path, fix)
    if key is None:
        return
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < 1024:
            report.error(
                table,
                "key_file",
                f"{_quote(path)} is a {key.key_size}-bit RSA key; receivers ignore DKIM "
                'signatures under 1024 bits (RFC 8301): make a new one with "relayctl dkim keygen"',
            )
    elif not isinstance(key, ed25519.Ed25519PrivateKey):
        report.error(
            table, "key_file", f"{_quote(path)} is not an RSA or Ed25519 key, which DKIM needs"
        )


def _check_route_files(report: _Report, table: TablePath, route: Route) -> None:
    if route.password_file is not None:
        password = _read_named_file(report, table, "password_file", route.password_file)
        if password is not None and not password.strip():
            report.error(table, "password_file", f"{_quote(route.password_file)} is empty")
    _check_ca_file(report, table, route.ca_file)


def _check_ca_file(report: _Report, table: TablePath, ca_file: Path | None) -> None:
    if ca_file is not None and _read_named_file(report, table, "ca_file", ca_file):
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        try:
            context.load_verify_locations(cafile=ca_file)
        except ssl.SSLError:
            report.error(table, "ca_file", f"{_quote(ca_file)} holds no PEM certificate")
