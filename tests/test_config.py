"""The config file as an operator meets it: what loads, what is refused, and how.

Problem lines are compared whole, because their exact form (file, line,
section, key, problem, fix) is part of the operator contract.
"""

from __future__ import annotations

import ipaddress
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest
import trustme
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from hypothesis import given, settings
from hypothesis import strategies as st

from relayd import config as config_module
from relayd import units
from relayd.config import (
    SCHEMA,
    AuthConfig,
    Config,
    ConfigError,
    DeliveryConfig,
    HostPort,
    Limits,
    Listener,
    Rate,
    RelayConfig,
    Route,
    SpoolConfig,
    TLSConfig,
    check_files,
    load_config,
)
from relayd.units import (
    format_duration,
    format_rate,
    format_size,
    parse_duration,
    parse_rate,
    parse_size,
)

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "etc" / "relayd.toml"
DOCS = ROOT / "docs" / "configuration.md"
CORPUS = Path(__file__).resolve().parent / "configs"

# The minimal working relay of the operator contract, verbatim.
MINIMAL = """\
hostname = "mail.example.com"

[[listener]]
name = "submission"
address = "0.0.0.0:587"
mode = "submission"          # "submission" (AUTH required) | "inbound" (port 25 style)
tls = "starttls"             # "none" | "starttls" | "implicit"

[tls]
cert = "/etc/relayd/tls/fullchain.pem"
key = "/etc/relayd/tls/privkey.pem"

[auth]
users_file = "/etc/relayd/users"
"""

HEAD = 'hostname = "mail.example.com"\n'


def write(directory: Path, text: str, name: str = "relayd.toml") -> Path:
    path = directory / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def problems_of(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    return caught.value.problems


def problems(directory: Path, text: str) -> list[str]:
    """The problem lines for ``text``, with the file's path written as {path}."""
    path = write(directory, text)
    return [line.replace(str(path), "{path}") for line in problems_of(path)]


def load(directory: Path, text: str) -> Config:
    return load_config(write(directory, text))


# ---------------------------------------------------------------------------
# Loading good files.


def test_minimal_config_loads_with_every_default(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL)
    config = load_config(path)

    assert config.hostname == "mail.example.com"
    assert config.listeners == (
        Listener("submission", HostPort("0.0.0.0", 587), "submission", "starttls"),
    )
    assert config.tls == TLSConfig(
        Path("/etc/relayd/tls/fullchain.pem"), Path("/etc/relayd/tls/privkey.pem")
    )
    assert config.auth == AuthConfig()
    assert config.spool == SpoolConfig()
    assert config.relay == RelayConfig()
    assert config.limits == Limits()
    assert config.delivery == DeliveryConfig()
    assert config.routes == ()
    assert config.dkim.keys == ()
    assert config.rate_limits.per_ip is None
    assert config.dns.nameservers == ()
    assert config.metrics.address is None
    assert config.source == path
    # The one warning: the hostname is still SPEC's example.
    (warning,) = config.warnings
    assert ':1: hostname: warning: still the example "mail.example.com"' in warning


def test_a_real_hostname_gives_no_warning(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, MINIMAL.replace("mail.example.com", "mx1.relayd.test")))
    assert config.warnings == ()


def test_defaults_match_the_operator_contract(tmp_path: Path) -> None:
    config = load(tmp_path, MINIMAL)

    assert config.limits.max_message_size == 25_000_000
    assert config.limits.idle_timeout == 300
    assert config.delivery.retry == (300, 600, 1800, 3600, 7200, 14400)
    assert config.delivery.max_age == 5 * 86400
    assert config.delivery.delay_warning == 4 * 3600
    assert [str(n) for n in config.relay.networks] == ["127.0.0.0/8", "::1/128"]
    assert config.spool.path == Path("/var/spool/relayd")
    assert config.control.socket == Path("/run/relayd/control.sock")
    assert (config.spf.enabled, config.spf.on_fail, config.spf.on_softfail) == (
        True,
        "reject",
        "tag",
    )
    assert config.dmarc.on_reject == "tag"
    assert (config.logging.level, config.logging.target) == ("info", "auto")


def test_every_section_is_read(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        HEAD
        + """
[[listener]]
address = "[::1]:2525"
mode = "inbound"
tls = "none"

[auth]
max_failures = 3
failure_window = "10m"

[relay]
domains = ["Example.COM", "example.org."]
networks = ["10.0.0.0/8", "192.0.2.7", "2001:db8::/32"]

[limits]
max_message_size = "10MiB"
max_recipients = 5
max_connections = 10
max_connections_per_ip = 2
idle_timeout = 90

[rate_limits]
per_ip = "300/hour"
per_user = "10/min"
per_sender_domain = "20/15m"

[spf]
enabled = false
on_fail = "tag"
on_softfail = "reject"

[[dkim.key]]
domain = "example.com"
selector = "mail2024"
key_file = "/etc/relayd/dkim/example.com.mail2024.key"

[dmarc]
on_reject = "reject"

[spool]
path = "/srv/spool"
min_free_space = "1GB"

[delivery]
retry = ["1m", "1h30m"]
max_age = "2d"
delay_warning = "0"
concurrency = 8
per_domain_concurrency = 2
port = 2525
tls = "verify"
connect_timeout = "10s"
command_timeout = "2m"

[[route]]
domain = "example.net"
via = "[2001:db8::25]"
tls = "implicit"
tls_verify = false
ca_file = "/etc/relayd/ca.pem"

[dns]
nameservers = ["127.0.0.1:5353", "[::1]:53", "192.0.2.53", "::1"]
timeout = "2s"

[control]
socket = "/run/relayd/ctl.sock"
group = "relayd"

[logging]
level = "DEBUG"
target = "stderr"

[metrics]
address = "127.0.0.1:9587"
""",
    )
    assert config.listeners == (Listener("smtp", HostPort("::1", 2525), "inbound", "none"),)
    assert (config.auth.max_failures, config.auth.failure_window) == (3, 600)
    assert config.relay.domains == ("example.com", "example.org")
    assert [str(n) for n in config.relay.networks] == [
        "10.0.0.0/8",
        "192.0.2.7/32",
        "2001:db8::/32",
    ]
    assert config.limits == Limits(10 * 2**20, 5, 10, 2, 90)
    assert config.rate_limits.per_ip == Rate(300, 3600, "300/hour")
    assert config.rate_limits.per_user == Rate(10, 60, "10/min")
    assert config.rate_limits.per_sender_domain == Rate(20, 900, "20/15m")
    assert (config.spf.enabled, config.spf.on_fail, config.spf.on_softfail) == (
        False,
        "tag",
        "reject",
    )
    assert [(k.domain, k.selector) for k in config.dkim.keys] == [("example.com", "mail2024")]
    assert config.dmarc.on_reject == "reject"
    assert config.spool == SpoolConfig(Path("/srv/spool"), 10**9)
    assert config.delivery == DeliveryConfig(
        (60, 5400), 2 * 86400, 0, 8, 2, 2525, "verify", 10, 120
    )
    assert config.routes == (
        Route(
            "example.net",
            HostPort("2001:db8::25", 25),
            tls="implicit",
            tls_verify=False,
            ca_file=Path("/etc/relayd/ca.pem"),
        ),
    )
    assert config.dns.nameservers == (
        HostPort("127.0.0.1", 5353),
        HostPort("::1", 53),
        HostPort("192.0.2.53", 53),
        HostPort("::1", 53),
    )
    assert config.dns.timeout == 2
    assert (config.control.socket, config.control.group) == (Path("/run/relayd/ctl.sock"), "relayd")
    assert (config.logging.level, config.logging.target) == ("debug", "stderr")
    assert config.metrics.address == HostPort("127.0.0.1", 9587)


def test_listener_name_and_address_default_from_mode_and_tls(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        HEAD
        + """
[[listener]]
mode = "inbound"
[[listener]]
mode = "submission"
[[listener]]
tls = "implicit"
[tls]
cert = "cert.pem"
key = "key.pem"
""",
    )
    assert [(x.name, str(x.address)) for x in config.listeners] == [
        ("smtp", "0.0.0.0:25"),
        ("submission", "0.0.0.0:587"),
        ("submissions", "0.0.0.0:465"),
    ]


def test_relative_paths_are_taken_from_the_config_directory(tmp_path: Path) -> None:
    path = write(
        tmp_path / "etc",
        HEAD
        + """
[tls]
cert = "tls/cert.pem"
key = "/abs/key.pem"
[auth]
users_file = "users"
[spool]
path = "../spool"
[control]
socket = "run/control.sock"
[[dkim.key]]
domain = "example.com"
selector = "s1"
key_file = "dkim/s1.pem"
[[route]]
via = "smtp.example.net:587"
username = "me"
password_file = "smarthost.password"
ca_file = "ca.pem"
""",
    )
    config = load_config(path)
    etc = tmp_path / "etc"
    assert config.tls == TLSConfig(etc / "tls/cert.pem", Path("/abs/key.pem"))
    assert config.auth.users_file == etc / "users"
    assert config.spool.path == etc / "../spool"
    assert config.control.socket == etc / "run/control.sock"
    assert config.dkim.keys[0].key_file == etc / "dkim/s1.pem"
    assert config.routes[0].password_file == etc / "smarthost.password"
    assert config.routes[0].ca_file == etc / "ca.pem"


def test_route_port_defaults_to_25_and_domain_to_every_domain(tmp_path: Path) -> None:
    config = load(tmp_path, HEAD + '[[route]]\nvia = "smarthost.example.net"\n')
    assert config.routes == (Route("*", HostPort("smarthost.example.net", 25)),)


def test_the_same_file_loads_to_equal_configs(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL)
    assert load_config(path) == load_config(path)


def test_rate_is_shared_with_the_units_module() -> None:
    assert config_module.Rate is units.Rate


# ---------------------------------------------------------------------------
# Problems: where they are reported and how they read.


def test_unreadable_file_names_the_path_and_the_reason(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    assert problems_of(missing) == [
        f"relayd: {missing}: cannot read config: No such file or directory"
    ]
    assert problems_of(tmp_path) == [f"relayd: {tmp_path}: cannot read config: Is a directory"]


def test_toml_syntax_error_points_at_its_line(tmp_path: Path) -> None:
    assert problems(tmp_path, HEAD + "\n[limits]\nmax_recipients = = 3\n") == [
        "relayd: {path}:4: TOML syntax error: Invalid value (column 18)"
    ]


def test_every_problem_is_reported_at_once_in_file_order(tmp_path: Path) -> None:
    text = """\
[limits]
max_message_size = "lots"
max_recipients = "many"

[delivery]
tls = "sometimes"
"""
    assert problems(tmp_path, text) == [
        'relayd: {path}:1: hostname: missing; add hostname = "mail.example.com"',
        'relayd: {path}:2: [limits] max_message_size: expected a size like "25MB", got "lots"',
        'relayd: {path}:3: [limits] max_recipients: expected an integer, got "many"',
        'relayd: {path}:6: [delivery] tls: expected "opportunistic", "required", "verify" '
        'or "none", got "sometimes"',
    ]
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, text)
    assert str(caught.value) == "\n".join(caught.value.problems)


def test_unknown_key_suggests_the_closest_one(tmp_path: Path) -> None:
    assert problems(tmp_path, HEAD + "[limits]\nmax_mesage_size = '1MB'\n") == [
        'relayd: {path}:3: [limits] max_mesage_size: unknown key "max_mesage_size" '
        '(did you mean "max_message_size"?)'
    ]


def test_unknown_key_without_a_close_match_lists_the_keys(tmp_path: Path) -> None:
    assert problems(tmp_path, HEAD + "[tls]\nchain = 'x.pem'\n") == [
        'relayd: {path}:3: [tls] chain: unknown key "chain"; the keys here are cert, key'
    ]


def test_unknown_top_level_key_suggests_a_section(tmp_path: Path) -> None:
    assert problems(tmp_path, HEAD + "limit = 3\n") == [
        'relayd: {path}:2: limit: unknown key "limit" (did you mean "limits"?)'
    ]


def test_unknown_section_is_an_error(tmp_path: Path) -> None:
    assert problems(tmp_path, HEAD + "\n[smtp]\nport = 25\n") == [
        "relayd: {path}:3: [smtp]: unknown section"
    ]


def test_missing_required_key_points_at_the_table_header(tmp_path: Path) -> None:
    text = HEAD + "\n[[route]]\ndomain = 'example.org'\n"
    assert problems(tmp_path, text) == [
        'relayd: {path}:3: [[route]] via: missing; add via = "smtp.example.net:587"'
    ]


def test_lines_follow_multiline_values(tmp_path: Path) -> None:
    text = (
        HEAD
        + """[control]
group = '''
socket = "a"
'''
socket = 5

[delivery]
retry = [
  "5m",  # first
  "1h",
]
max_age = "soon"
"""
    )
    assert problems(tmp_path, text) == [
        'relayd: {path}:3: [control] group: expected a group name, got "socket = \\"a\\"\\n"',
        "relayd: {path}:6: [control] socket: expected a string, got 5 (put it in quotes)",
        'relayd: {path}:13: [delivery] max_age: expected a duration like "90s", "15m", "4h" '
        'or "5d", got "soon"',
    ]


def test_each_array_table_reports_its_own_lines(tmp_path: Path) -> None:
    text = (
        HEAD
        + """
[[listener]]
name = "a"
address = "127.0.0.1:2525"
tls = "none"

[[listener]]
name = "b"
address = "127.0.0.1:70000"
tls = "none"
"""
    )
    assert problems(tmp_path, text) == [
        "relayd: {path}:10: [[listener]] address: the port must be a number from 1 to 65535, "
        'got "127.0.0.1:70000"'
    ]


def too_wide(network: str, line: int = 4) -> str:
    shortest = 32 if ":" in network else 8
    bits = (128 if ":" in network else 32) - int(network.rsplit("/", 1)[1])
    who = "anyone on the internet" if bits in (32, 128) else f"2^{bits} addresses"
    return (
        f'relayd: {{path}}:{line}: [relay] networks: "{network}" is shorter than /{shortest}: '
        f"it lets {who} relay mail through relayd, an open relay by accident; list only your "
        f"own networks (/{shortest} or longer) and let other senders authenticate on a "
        "submission listener"
    )


@pytest.mark.parametrize("network", ["10.0.0.0/7", "0.0.0.0/0", "2001:db8::/31", "::/0"])
def test_relay_network_shorter_than_8_or_32_is_refused(tmp_path: Path, network: str) -> None:
    text = HEAD + f'\n[relay]\nnetworks = ["10.0.0.0/8", "{network}"]\n'
    assert problems(tmp_path, text) == [too_wide(network)]


def test_relay_networks_of_8_and_32_load(tmp_path: Path) -> None:
    path = write(tmp_path, HEAD + '\n[relay]\nnetworks = ["10.0.0.0/8", "2001:db8::/32"]\n')
    config = load_config(path)
    assert [str(n) for n in config.relay.networks] == ["10.0.0.0/8", "2001:db8::/32"]
    assert not [w for w in config.warnings if "[relay]" in w]


def test_allow_open_relay_no_longer_opens_the_relay(tmp_path: Path) -> None:
    text = HEAD + '\n[relay]\nnetworks = ["0.0.0.0/0", "::/0"]\nallow_open_relay = true\n'
    assert problems(tmp_path, text) == [
        too_wide("0.0.0.0/0"),
        too_wide("::/0"),
        "relayd: {path}:5: [relay] allow_open_relay: no longer supported: relayd never relays "
        "for networks shorter than /8 (IPv4) or /32 (IPv6); remove allow_open_relay and list "
        "only your own networks",
    ]
    config = load_config(write(tmp_path, HEAD + "\n[relay]\nallow_open_relay = false\n"))
    assert config.relay.allow_open_relay is False


def test_network_with_host_bits_names_both_fixes(tmp_path: Path) -> None:
    assert problems(tmp_path, HEAD + '[relay]\nnetworks = ["192.168.1.1/24"]\n') == [
        'relayd: {path}:3: [relay] networks: "192.168.1.1/24" has host bits set; write '
        '"192.168.1.0/24" for the whole network or "192.168.1.1/32" for the one address'
    ]


def test_tls_listener_without_certificate_names_the_listener(tmp_path: Path) -> None:
    text = HEAD + '\n[[listener]]\nname = "smtps"\naddress = "0.0.0.0:465"\ntls = "implicit"\n'
    assert problems(tmp_path, text) == [
        'relayd: {path}:6: [tls] cert: missing; listener "smtps" uses tls = "implicit", so add '
        'cert = "/etc/relayd/tls/fullchain.pem" under [tls]',
        'relayd: {path}:6: [tls] key: missing; listener "smtps" uses tls = "implicit", so add '
        'key = "/etc/relayd/tls/privkey.pem" under [tls]',
    ]


def test_listeners_without_tls_need_no_certificate(tmp_path: Path) -> None:
    config = load(tmp_path, HEAD + '[[listener]]\naddress = "127.0.0.1:25"\ntls = "none"\n')
    assert config.tls == TLSConfig()


def test_route_username_over_clear_text_is_refused(tmp_path: Path) -> None:
    text = (
        HEAD + '[[route]]\nvia = "smtp.example.net:25"\nusername = "me"\n'
        'password_file = "pw"\ntls = "none"\n'
    )
    assert problems(tmp_path, text) == [
        "relayd: {path}:4: [[route]] username: relayd sends AUTH only over TLS, but this route "
        'has tls = "none"; set tls = "starttls" or "implicit", or remove username and '
        "password_file"
    ]


def test_quoted_numbers_and_booleans_say_to_remove_the_quotes(tmp_path: Path) -> None:
    text = HEAD + '[limits]\nmax_recipients = "20"\n[spf]\nenabled = "false"\n'
    assert problems(tmp_path, text) == [
        'relayd: {path}:3: [limits] max_recipients: expected an integer, got "20" '
        "(remove the quotes)",
        'relayd: {path}:5: [spf] enabled: expected true or false, got "false" (remove the quotes)',
    ]


def test_inline_tables_report_the_line_of_their_key(tmp_path: Path) -> None:
    text = HEAD + 'route = [{ via = "smtp.example.net:99999" }]\n'
    assert problems(tmp_path, text) == [
        "relayd: {path}:2: [[route]] via: the port must be a number from 1 to 65535, "
        'got "smtp.example.net:99999"'
    ]


@settings(max_examples=40, deadline=None)
@given(
    order=st.permutations(["max_recipients", "max_connections", "idle_timeout", "bad"]),
    gaps=st.lists(st.sampled_from(["", "# note", "   "]), min_size=4, max_size=4),
)
def test_the_line_of_a_bad_key_is_where_it_was_written(order: list[str], gaps: list[str]) -> None:
    values = {"max_recipients": "5", "max_connections": "9", "idle_timeout": '"1m"'}
    lines = [HEAD.rstrip("\n"), "[limits]"]
    for key, gap in zip(order, gaps, strict=True):
        lines.append(gap)
        if key == "bad":
            bad_line = len(lines) + 1
            lines.append('max_message_size = "huge"')
        else:
            lines.append(f"{key} = {values[key]}")
    with tempfile.TemporaryDirectory() as directory:
        found = problems(Path(directory), "\n".join(lines) + "\n")
    assert found == [
        f"relayd: {{path}}:{bad_line}: [limits] max_message_size: expected a size like "
        '"25MB", got "huge"'
    ]


@settings(max_examples=60, deadline=None)
@given(address=st.ip_addresses(), port=st.integers(1, 65535))
def test_any_listener_address_round_trips(
    address: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int
) -> None:
    written = str(HostPort(str(address), port))
    text = HEAD + f'[[listener]]\naddress = "{written}"\ntls = "none"\n'
    with tempfile.TemporaryDirectory() as directory:
        config = load(Path(directory), text)
    assert config.listeners[0].address == HostPort(str(address), port)
    assert str(config.listeners[0].address) == written


# ---------------------------------------------------------------------------
# The broken-config corpus: each tests/configs/NAME.toml is refused (or loads
# with warnings) with exactly the lines in NAME.expected.


@pytest.mark.parametrize("case", sorted(CORPUS.glob("*.toml")), ids=lambda path: path.stem)
def test_broken_config_corpus(case: Path) -> None:
    expected = case.with_suffix(".expected").read_text(encoding="utf-8").splitlines()
    try:
        found = list(load_config(case).warnings)
    except ConfigError as error:
        found = error.problems
    assert [line.replace(str(case), "{path}") for line in found] == expected


def test_corpus_is_not_empty() -> None:
    assert len(list(CORPUS.glob("*.toml"))) >= 20


# ---------------------------------------------------------------------------
# etc/relayd.toml and docs/configuration.md stay in step with the schema.

_EXAMPLE_HEADER = re.compile(r"#? ?(\[\[?[a-z_.]+\]\]?)\s*")
_EXAMPLE_KEY = re.compile(r"#? ?([a-z_]+) = ")


def example_keys(text: str) -> list[tuple[str, str]]:
    """(section, key) in the order the example documents them, commented-out keys too."""
    section = ""
    keys: list[tuple[str, str]] = []
    for line in text.splitlines():
        header = _EXAMPLE_HEADER.fullmatch(line)
        if header is not None:
            section = header[1]
            continue
        key = _EXAMPLE_KEY.match(line)
        if key is not None and (section, key[1]) not in keys:
            keys.append((section, key[1]))
    return keys


def schema_keys() -> list[tuple[str, str]]:
    return [(section, key) for section, keys in SCHEMA.items() for key in keys]


def test_example_config_documents_exactly_the_schema_in_order() -> None:
    assert example_keys(EXAMPLE.read_text(encoding="utf-8")) == schema_keys()


def test_example_config_gives_every_key_a_comment_and_a_default() -> None:
    section = ""
    comments: list[str] = []
    seen: set[tuple[str, str]] = set()
    undocumented: list[tuple[str, str]] = []
    for line in EXAMPLE.read_text(encoding="utf-8").splitlines():
        header = _EXAMPLE_HEADER.fullmatch(line)
        key = _EXAMPLE_KEY.match(line)
        if header is not None:
            section, comments = header[1], []
        elif key is not None:
            if (section, key[1]) not in seen:
                seen.add((section, key[1]))
                if not any(c.startswith("# Default: ") for c in comments):
                    undocumented.append((section, key[1]))
            comments = []
        elif line.startswith("#"):
            comments.append(line)
    assert undocumented == []


def test_example_config_loads() -> None:
    config = load_config(EXAMPLE)
    assert [(x.name, x.address.port, x.mode, x.tls) for x in config.listeners] == [
        ("smtp", 25, "inbound", "starttls"),
        ("submission", 587, "submission", "starttls"),
        ("submissions", 465, "submission", "implicit"),
    ]
    assert [w for w in config.warnings if "still the example" not in w] == []


def test_example_config_loads_with_every_optional_key_uncommented(tmp_path: Path) -> None:
    text = EXAMPLE.read_text(encoding="utf-8")
    uncommented = re.sub(r"(?m)^# ((?:\[\[?[a-z_.]+\]\]?$)|(?:[a-z_]+ = ))", r"\1", text)
    config = load(tmp_path, uncommented)
    assert config.rate_limits.per_ip == Rate(300, 3600, "300/hour")
    assert len(config.dkim.keys) == 1
    assert config.routes[0].via == HostPort("smtp.example.net", 587)
    assert config.dns.nameservers == (HostPort("127.0.0.1", 53), HostPort("::1", 53))
    assert config.control.group == "relayd"
    assert config.metrics.address == HostPort("127.0.0.1", 9587)


EXTENSIONS = {
    ("[auth]", "max_failures"),
    ("[auth]", "failure_window"),
    ("[relay]", "allow_open_relay"),
    ("[relay]", "verify_recipients"),
    ("[relay]", "recipients_file"),
    ("[spool]", "min_free_space"),
    ("[control]", "group"),
    ("[metrics]", "address"),
    ("[server]", "processes"),
}


def docs_rows() -> dict[tuple[str, str], str]:
    """Each reference table row of the docs, by (section, key)."""
    rows: dict[tuple[str, str], str] = {}
    section = None
    for line in DOCS.read_text(encoding="utf-8").splitlines():
        if line.startswith("### "):
            found = re.search(r"`(\[\[?[a-z_.]+\]\]?)`", line)
            section = found[1] if found else ""
        row = re.match(r"\| `([a-z_]+)`", line)
        if row is not None and section is not None:
            rows[(section, row[1])] = line
    return rows


def test_docs_describe_every_key_and_mark_the_extensions() -> None:
    rows = docs_rows()
    assert sorted(rows) == sorted(schema_keys())
    marked = {key for key, row in rows.items() if "*(extension)*" in row}
    assert marked == EXTENSIONS


# ---------------------------------------------------------------------------
# check_files: the certificate, keys and secrets a config names.


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def write_tls(directory: Path, ca: trustme.CA, key_from_another_cert: bool = False) -> None:
    issued = ca.issue_cert("mail.example.com")
    key_source = ca.issue_cert("other.example.com") if key_from_another_cert else issued
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "cert.pem").write_bytes(b"".join(p.bytes() for p in issued.cert_chain_pems))
    key_source.private_key_pem.write_to_path(str(directory / "key.pem"))


def pem(key: ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


# Too short for DKIM, and too short for cryptography to generate: a fixed test key.
RSA_512_PEM = b"""-----BEGIN PRIVATE KEY-----
MIIBVgIBADANBgkqhkiG9w0BAQEFAASCAUAwggE8AgEAAkEAlmhET6Oc46uVGhGx
X8lwflarcAKhm94UbHodeSE2OythHHqoDW/qdPjGUlhYhCojtr4iLm/HhYc/pwi7
a4O7/wIDAQABAkB2iyVT82sjEcgJbOp0yWqNWLf0J07Cb41/VdvG7YM1rCyZr/Fi
gerUIEyfbanEMPMJSD/HFBiFkfh2vdz6iQN5AiEAx3yWuUPuubUsDol6Yw01FEEb
AK8LYUsldiKMBygVTksCIQDBBEjODzdjAR27fPypRkZAO1n7lNpaS5jicD/iOEUo
nQIhAK0rV0AOW560SkF4UFjJ70jc1475ZTyZWjS5+qp/vjcPAiEAlEYfS7Rivvp3
hbTxP3RNuUAe0uY5iw3x51mFqdnCPv0CIQCTtjPjWiCYaHzVSW9HdR0JgaSfJ/1v
o7zvsmaoDUmWMQ==
-----END PRIVATE KEY-----
"""

FILES_CONFIG = (
    HEAD
    + """
[[listener]]
address = "127.0.0.1:587"

[tls]
cert = "tls/cert.pem"
key = "tls/key.pem"

[auth]
users_file = "users"

[[dkim.key]]
domain = "example.com"
selector = "s1"
key_file = "dkim/s1.pem"
"""
)


def files_setup(tmp_path: Path, ca: trustme.CA, mismatched: bool = False) -> Path:
    write_tls(tmp_path / "tls", ca, key_from_another_cert=mismatched)
    (tmp_path / "dkim").mkdir()
    (tmp_path / "dkim" / "s1.pem").write_bytes(pem(ed25519.Ed25519PrivateKey.generate()))
    (tmp_path / "users").write_text("")
    return write(tmp_path, FILES_CONFIG)


def checked(path: Path) -> tuple[list[str], list[str]]:
    errors, warnings = check_files(load_config(path))
    return (
        [line.replace(str(path), "{path}") for line in errors],
        [line.replace(str(path), "{path}") for line in warnings],
    )


def test_check_files_accepts_a_matching_certificate_and_key(tmp_path: Path, ca: trustme.CA) -> None:
    assert checked(files_setup(tmp_path, ca)) == ([], [])


def test_check_files_refuses_a_key_of_another_certificate(tmp_path: Path, ca: trustme.CA) -> None:
    path = files_setup(tmp_path, ca, mismatched=True)
    key, cert = tmp_path / "tls" / "key.pem", tmp_path / "tls" / "cert.pem"
    assert checked(path) == (
        [
            f'relayd: {{path}}:8: [tls] key: "{key}" is not the private key of the '
            f'certificate in "{cert}"'
        ],
        [],
    )


def test_check_files_reports_missing_and_garbled_files(tmp_path: Path, ca: trustme.CA) -> None:
    path = files_setup(tmp_path, ca)
    (tmp_path / "tls" / "cert.pem").write_text("not a certificate\n")
    (tmp_path / "dkim" / "s1.pem").unlink()
    (tmp_path / "users").unlink()
    cert, dkim, users = tmp_path / "tls/cert.pem", tmp_path / "dkim/s1.pem", tmp_path / "users"
    assert checked(path) == (
        [
            f'relayd: {{path}}:7: [tls] cert: "{cert}" holds no PEM certificate '
            "(BEGIN CERTIFICATE)",
            f'relayd: {{path}}:16: [[dkim.key]] key_file: cannot read "{dkim}": '
            "No such file or directory; create it with: relayctl dkim keygen example.com s1",
        ],
        [
            f'relayd: {{path}}:11: [auth] users_file: warning: "{users}" does not exist yet; '
            '"relayctl user add NAME" creates it'
        ],
    )


def test_check_files_warns_about_an_expired_certificate(tmp_path: Path, ca: trustme.CA) -> None:
    path = files_setup(tmp_path, ca)
    expired = ca.issue_cert(
        "mail.example.com",
        not_before=datetime(2020, 1, 1, tzinfo=UTC),
        not_after=datetime(2021, 1, 1, tzinfo=UTC),
    )
    cert = tmp_path / "tls" / "cert.pem"
    cert.write_bytes(expired.cert_chain_pems[0].bytes())
    expired.private_key_pem.write_to_path(str(tmp_path / "tls" / "key.pem"))
    assert checked(path) == (
        [],
        [
            f'relayd: {{path}}:7: [tls] cert: warning: the certificate in "{cert}" '
            "expired on 2021-01-01"
        ],
    )


@pytest.mark.parametrize(
    ("make_key", "problem"),
    [
        (lambda: pem(rsa.generate_private_key(65537, 1024)), None),
        (lambda: pem(ed25519.Ed25519PrivateKey.generate()), None),
        (
            lambda: pem(ec.generate_private_key(ec.SECP256R1())),
            "is not an RSA or Ed25519 key, which DKIM needs",
        ),
        (
            lambda: ed25519.Ed25519PrivateKey.generate().private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.BestAvailableEncryption(b"secret"),
            ),
            "is encrypted with a passphrase; relayd needs it unencrypted "
            "(openssl pkey -in OLD -out NEW)",
        ),
        (
            lambda: RSA_512_PEM,
            "is a 512-bit RSA key; receivers ignore DKIM signatures under 1024 bits "
            '(RFC 8301): make a new one with "relayctl dkim keygen"',
        ),
    ],
    ids=["rsa", "ed25519", "ec", "encrypted", "rsa-512"],
)
def test_check_files_accepts_only_rsa_and_ed25519_dkim_keys(
    tmp_path: Path, ca: trustme.CA, make_key: Callable[[], bytes], problem: str | None
) -> None:
    path = files_setup(tmp_path, ca)
    key_file = tmp_path / "dkim" / "s1.pem"
    key_file.write_bytes(make_key())
    errors, _ = checked(path)
    expected = [f'relayd: {{path}}:16: [[dkim.key]] key_file: "{key_file}" {problem}']
    assert errors == ([] if problem is None else expected)


def test_check_files_reads_route_password_and_ca_files(tmp_path: Path, ca: trustme.CA) -> None:
    text = (
        HEAD
        + """
[[route]]
domain = "example.org"
via = "smtp.example.org:587"
username = "me"
password_file = "missing.password"

[[route]]
domain = "example.net"
via = "smtp.example.net:587"
username = "me"
password_file = "empty.password"
ca_file = "ca.pem"
"""
    )
    (tmp_path / "empty.password").write_text("\n")
    (tmp_path / "ca.pem").write_text("garbage\n")
    (tmp_path / "users").write_text("")
    path = write(tmp_path, text)
    missing, empty, ca_file = (
        tmp_path / n for n in ("missing.password", "empty.password", "ca.pem")
    )
    errors, _ = checked(path)
    assert errors == [
        f'relayd: {{path}}:7: [[route]] password_file: cannot read "{missing}": '
        "No such file or directory",
        f'relayd: {{path}}:13: [[route]] password_file: "{empty}" is empty',
        f'relayd: {{path}}:14: [[route]] ca_file: "{ca_file}" holds no PEM certificate',
    ]
    ca.cert_pem.write_to_path(str(ca_file))
    (tmp_path / "missing.password").write_text("hunter2\n")
    (tmp_path / "empty.password").write_text("hunter2\n")
    assert checked(path)[0] == []


def test_check_files_works_on_a_config_built_in_code(tmp_path: Path) -> None:
    missing = tmp_path / "cert.pem"
    config = Config(
        hostname="mail.example.com",
        tls=TLSConfig(cert=missing),
        auth=AuthConfig(users_file=tmp_path),
        source=tmp_path / "nowhere.toml",
    )
    errors, warnings = check_files(config)
    assert errors == [
        f'relayd: {tmp_path}/nowhere.toml:1: [tls] cert: cannot read "{missing}": '
        "No such file or directory; put the certificate chain and key there (docs/install.md: "
        "a certbot deploy hook copies them), or for a test make a self-signed pair with "
        "openssl req -x509",
        f'relayd: {tmp_path}/nowhere.toml:1: [auth] users_file: cannot read "{tmp_path}": '
        "Is a directory",
    ]
    assert warnings == []


# ---------------------------------------------------------------------------
# Units.


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("25MB", 25_000_000),
        ("25 MB", 25_000_000),
        ("1kB", 1000),
        ("1KB", 1000),
        ("1GB", 10**9),
        ("2KiB", 2048),
        ("1MiB", 2**20),
        ("1GiB", 2**30),
        ("512B", 512),
        ("512", 512),
        ("1.5MB", 1_500_000),
        ("2.9K", 2900),
        ("0", 0),
        (4096, 4096),
    ],
)
def test_parse_size(text: str | int, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("lots", 'expected a size like "25MB", got "lots"'),
        ("", 'expected a size like "25MB", got ""'),
        ("-1MB", 'a size cannot be negative, got "-1MB"'),
        (-5, "a size cannot be negative, got -5"),
        (
            "5 parsecs",
            'unknown size unit "parsecs" in "5 parsecs"; use B, kB, MB, GB (powers of 1000) '
            "or KiB, MiB, GiB (powers of 1024)",
        ),
    ],
)
def test_parse_size_refuses(text: str | int, message: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_size(text)
    assert str(caught.value) == message


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90s", 90),
        ("15m", 900),
        ("4h", 14400),
        ("5d", 432000),
        ("1w", 604800),
        ("1h30m", 5400),
        ("4m10s", 250),
        ("1.5h", 5400),
        ("0", 0),
        ("300", 300),
        (45, 45),
        (2.5, 2.5),
    ],
)
def test_parse_duration(text: str | int | float, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("-5m", 'a duration cannot be negative, got "-5m"'),
        (-1, "a duration cannot be negative, got -1"),
        ("soon", 'expected a duration like "90s", "15m", "4h" or "5d", got "soon"'),
        ("1h30", 'expected a duration like "90s", "15m", "4h" or "5d", got "1h30"'),
        ("", 'expected a duration like "90s", "15m", "4h" or "5d", got ""'),
        ("3y", 'unknown duration unit "y" in "3y"; use s, m, h, d or w'),
        (float("inf"), 'expected a duration like "90s", "15m", "4h" or "5d", got inf'),
    ],
)
def test_parse_duration_refuses(text: str | float, message: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_duration(text)
    assert str(caught.value) == message


@pytest.mark.parametrize(
    ("text", "count", "per"),
    [
        ("100/hour", 100, 3600),
        ("100 / hour", 100, 3600),
        ("5/second", 5, 1),
        ("5/s", 5, 1),
        ("5/sec", 5, 1),
        ("10/minute", 10, 60),
        ("10/m", 10, 60),
        ("10/min", 10, 60),
        ("7/h", 7, 3600),
        ("7/hr", 7, 3600),
        ("1000/day", 1000, 86400),
        ("1000/d", 1000, 86400),
        ("20/15m", 20, 900),
    ],
)
def test_parse_rate(text: str, count: int, per: float) -> None:
    assert parse_rate(text) == Rate(count, per, text)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("100", 'expected a rate like "100/hour", got "100"'),
        ("many/hour", 'expected a rate like "100/hour", got "many/hour"'),
        (
            "0/hour",
            'a rate needs a count of at least 1, got "0/hour"; to turn the limit off, '
            "remove the key",
        ),
        (
            "5/year",
            'unknown rate period "year" in "5/year"; use second, minute, hour, day or a '
            'duration like "15m"',
        ),
    ],
)
def test_parse_rate_refuses(text: str, message: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_rate(text)
    assert str(caught.value) == message


@pytest.mark.parametrize(
    ("size", "shown"),
    [
        (0, "0B"),
        (999, "999B"),
        (1000, "1.0K"),
        (2900, "2.9K"),
        (9949, "9.9K"),
        (12_345, "12K"),
        (999_499, "999K"),
        (999_950, "1.0M"),
        (1_200_000, "1.2M"),
        (25_000_000, "25M"),
        (3 * 10**9, "3.0G"),
        (5 * 10**12, "5.0T"),
    ],
)
def test_format_size(size: int, shown: str) -> None:
    assert format_size(size) == shown


@pytest.mark.parametrize(
    ("seconds", "shown"),
    [
        (0, "0s"),
        (0.4, "0s"),
        (59, "59s"),
        (1500, "25m"),
        (250, "4m10s"),
        (7200, "2h"),
        (7260, "2h1m"),
        (7261, "2h1m"),
        (3 * 86400, "3d"),
        (3 * 86400 + 4 * 3600 + 59, "3d4h"),
        (86400 + 60, "1d"),
        (-250, "-4m10s"),
    ],
)
def test_format_duration(seconds: float, shown: str) -> None:
    assert format_duration(seconds) == shown


@pytest.mark.parametrize(
    ("count", "per", "shown"),
    [(100, 3600, "100/hour"), (5, 1, "5/second"), (20, 900, "20/15m"), (3, 86400, "3/day")],
)
def test_format_rate(count: int, per: float, shown: str) -> None:
    assert format_rate(count, per) == shown


@settings(max_examples=50)
@given(st.integers(0, 10**13))
def test_sizes_round_trip_through_every_unit(size: int) -> None:
    assert parse_size(size) == size
    assert parse_size(str(size)) == size
    assert parse_size(f"{size}B") == size
    assert parse_size(f"{size}kB") == size * 1000
    assert parse_size(f"{size}KiB") == size * 1024


@settings(max_examples=50)
@given(st.integers(0, 10**13))
def test_format_size_reads_back_within_rounding(size: int) -> None:
    shown = parse_size(format_size(size))
    if size < 1000:
        assert shown == size
    else:
        assert abs(shown - size) <= 0.05 * size


@settings(max_examples=50)
@given(st.integers(0, 1000), st.integers(0, 23), st.integers(0, 59), st.integers(0, 59))
def test_compound_durations_add_up(days: int, hours: int, minutes: int, seconds: int) -> None:
    text = f"{days}d{hours}h{minutes}m{seconds}s"
    assert parse_duration(text) == days * 86400 + hours * 3600 + minutes * 60 + seconds


@settings(max_examples=50)
@given(st.integers(0, 10**8))
def test_format_duration_reads_back_to_its_two_largest_units(seconds: int) -> None:
    shown = parse_duration(format_duration(seconds))
    assert shown <= seconds
    if seconds < 3600:
        assert shown == seconds
    else:
        assert seconds - shown < (3600 if seconds >= 86400 else 60)


@settings(max_examples=50)
@given(
    st.integers(1, 10**6),
    st.one_of(st.sampled_from([1, 60, 3600, 86400]), st.integers(1, 59).map(lambda m: m * 60)),
)
def test_rates_round_trip(count: int, per: int) -> None:
    rate = parse_rate(format_rate(count, per))
    assert (rate.count, rate.per_seconds) == (count, per)


@pytest.mark.parametrize(("value", "expected"), [("1", 1), ("4", 4), ('"auto"', 0)])
def test_server_processes(tmp_path: Path, value: str, expected: int) -> None:
    path = tmp_path / "relayd.toml"
    path.write_text(f'hostname = "mail.example.com"\n[server]\nprocesses = {value}\n')
    assert load_config(path).server.processes == expected


def test_server_processes_bad_value(tmp_path: Path) -> None:
    path = tmp_path / "relayd.toml"
    path.write_text('hostname = "mail.example.com"\n[server]\nprocesses = "many"\n')
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert f'relayd: {path}:3: [server] processes: expected "auto" or a number' in str(err.value)


def test_check_config_reports_missing_files_together_with_bad_keys(tmp_path: Path) -> None:
    """One run lists every problem: a bad key does not hide the missing files (SPEC §9)."""
    path = write(
        tmp_path,
        MINIMAL.replace("mail.example.com", "mx.relayd.test")
        + '[limits]\nmax_message_size = "lots"\n'
        + '[[dkim.key]]\ndomain = "example.com"\nselector = "s1"\n'
        + f'key_file = "{tmp_path}/none.key"\n',
    )
    done = subprocess.run(
        [sys.executable, "-m", "relayd.cli", "--config", str(path), "--check-config"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 1
    lines = done.stderr.splitlines()
    assert any("max_message_size: expected a size" in line for line in lines)
    assert any("[tls] cert: cannot read" in line and "certbot" in line for line in lines)
    assert any("relayctl dkim keygen example.com s1" in line for line in lines)
    numbers = [int(line.split(":")[2]) for line in lines if "warning" not in line]
    assert numbers == sorted(numbers)
