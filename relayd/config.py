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

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

ListenerMode = Literal["submission", "inbound"]
ListenerTLS = Literal["none", "starttls", "implicit"]
RouteTLS = Literal["starttls", "implicit", "none"]
DeliveryTLS = Literal["opportunistic", "required", "verify", "none"]
SPFAction = Literal["reject", "tag"]
DMARCAction = Literal["tag", "reject"]
LogTarget = Literal["auto", "journald", "stderr"]

DEFAULT_PATH = Path("/etc/relayd.toml")


class ConfigError(Exception):
    """All the problems found in one config file, each a ready-to-print line."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class HostPort:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class Rate:
    """``count`` messages per ``per_seconds``; "100/hour" is Rate(100, 3600)."""

    count: int
    per_seconds: float
    text: str = ""


@dataclass(frozen=True)
class Listener:
    name: str
    address: HostPort
    mode: ListenerMode = "submission"
    tls: ListenerTLS = "starttls"


@dataclass(frozen=True)
class TLSConfig:
    cert: Path | None = None
    key: Path | None = None


@dataclass(frozen=True)
class AuthConfig:
    users_file: Path = Path("/etc/relayd/users")
    # Extension: failed AUTH attempts from one IP before 421 4.7.0, and the
    # window they are counted in.
    max_failures: int = 5
    failure_window: float = 300.0


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
class RelayConfig:
    domains: tuple[str, ...] = ()
    networks: tuple[IPNetwork, ...] = (
        ipaddress.ip_network("127.0.0.0/8"),
        ipaddress.ip_network("::1/128"),
    )
    # Extension: must be true for a network that covers everyone
    # (0.0.0.0/0, ::/0); otherwise such a network is a config error.
    allow_open_relay: bool = False


@dataclass(frozen=True)
class Route:
    domain: str
    via: HostPort
    username: str | None = None
    password_file: Path | None = None
    tls: RouteTLS = "starttls"
    tls_verify: bool = True
    ca_file: Path | None = None


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


@dataclass(frozen=True)
class DNSConfig:
    nameservers: tuple[HostPort, ...] = ()  # empty: the system resolver
    timeout: float = 5.0


@dataclass(frozen=True)
class LoggingConfig:
    level: str = "info"
    target: LogTarget = "auto"


@dataclass(frozen=True)
class MetricsConfig:
    # Extension: serve Prometheus text format here; None = off.
    address: HostPort | None = None


@dataclass(frozen=True)
class Config:
    hostname: str
    listeners: tuple[Listener, ...] = ()
    tls: TLSConfig = field(default_factory=TLSConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    spool: SpoolConfig = field(default_factory=SpoolConfig)
    control: ControlConfig = field(default_factory=ControlConfig)
    relay: RelayConfig = field(default_factory=RelayConfig)
    routes: tuple[Route, ...] = ()
    limits: Limits = field(default_factory=Limits)
    rate_limits: RateLimits = field(default_factory=RateLimits)
    spf: SPFConfig = field(default_factory=SPFConfig)
    dkim: DKIMConfig = field(default_factory=DKIMConfig)
    dmarc: DMARCConfig = field(default_factory=DMARCConfig)
    delivery: DeliveryConfig = field(default_factory=DeliveryConfig)
    dns: DNSConfig = field(default_factory=DNSConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    source: Path = DEFAULT_PATH
    warnings: tuple[str, ...] = ()


def load_config(path: Path) -> Config:
    """Read, parse and validate ``path``; raise ConfigError with every problem."""
    raise NotImplementedError  # filled in by the config loader


def check_files(config: Config) -> list[str]:
    """Problems with the files a config names (TLS cert/key, DKIM keys, ...)."""
    raise NotImplementedError
