"""Prometheus metrics: the text format, the HTTP endpoint, and what a running relayd counts.

The format tests read relayd's output with prometheus_client's own parser
when it is installed (it is a test-only dependency; relayd writes the
format itself), else with a small fallback that understands the subset
relayd emits. The end-to-end test runs relayd as a process, talks SMTP to
it, lets it deliver to a loopback MX, and scrapes ``/metrics`` over HTTP.
"""

from __future__ import annotations

import asyncio
import base64
import math
import re
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Coroutine, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
from support.certs import client_context
from support.dnsserver import DNSServer
from support.mxserver import MXPool
from support.ports import free_port
from support.relayd_proc import Relayd

from relayd import metrics
from relayd.config import HostPort
from relayd.metrics import Counter, Histogram, Metrics, MetricsServer, rejection_reason
from relayd.policy.acl import RELAY_DENIED

real_parser: Callable[[str], Iterable[Any]] | None
try:
    from prometheus_client import parser as _prometheus_parser

    real_parser = _prometheus_parser.text_string_to_metric_families
except ImportError:  # depends on the test environment
    real_parser = None

Key = tuple[str, frozenset[tuple[str, str]]]

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse(text: str) -> dict[Key, float]:
    """Every sample as {(name, labels): value}, read by a real Prometheus parser if possible."""
    if real_parser is not None:
        return {
            (s.name, frozenset(s.labels.items())): s.value
            for family in real_parser(text)
            for s in family.samples
        }
    return _fallback_parse(text)


def _fallback_parse(text: str) -> dict[Key, float]:
    out: dict[Key, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE.match(line)
        assert match, f"not a sample line: {line!r}"
        name, labels, value = match.groups()
        pairs = {
            (k, v.replace('\\"', '"').replace("\\n", "\n").replace("\\\\", "\\"))
            for k, v in _LABEL.findall(labels or "")
        }
        out[(name, frozenset(pairs))] = float(value)
    return out


def value(samples: dict[Key, float], name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def labelled(samples: dict[Key, float], name: str, **fixed: str) -> dict[str, float]:
    """{value of the one free label: sample} for the samples of ``name`` matching ``fixed``."""
    out: dict[str, float] = {}
    for (n, labels), v in samples.items():
        d = dict(labels)
        if n == name and all(d.get(k) == x for k, x in fixed.items()):
            free = [x for k, x in d.items() if k not in fixed]
            out[free[0] if free else ""] = v
    return out


# ---- the text format ------------------------------------------------------------------


def test_counter_lines_escape_label_values_and_help() -> None:
    c = Counter("relayd_demo_total", 'Things.\nSecond line \\ "quoted".', ["who"])
    c.inc('a "b"\\c\nd')
    c.inc('a "b"\\c\nd', amount=2)
    assert c.render() == (
        '# HELP relayd_demo_total Things.\\nSecond line \\\\ "quoted".\n'
        "# TYPE relayd_demo_total counter\n"
        'relayd_demo_total{who="a \\"b\\"\\\\c\\nd"} 3\n'
    )
    assert value(parse(c.render()), "relayd_demo_total", who='a "b"\\c\nd') == 3


def test_values_are_spelled_as_prometheus_expects() -> None:
    assert metrics.format_value(3.0) == "3"
    assert metrics.format_value(0.25) == "0.25"
    assert metrics.format_value(math.inf) == "+Inf"
    assert metrics.format_value(-math.inf) == "-Inf"
    assert metrics.format_value(math.nan) == "NaN"


def test_unlabelled_counter_starts_at_zero() -> None:
    assert Counter("relayd_x_total", "X.").render().endswith("relayd_x_total 0\n")


def test_histogram_buckets_are_cumulative_with_le_inclusive() -> None:
    h = Histogram("relayd_wait_seconds", "Wait.", [1.0, 0.1, 10.0], ["status"], [("sent",)])
    for seconds in (0.05, 0.1, 7.0, 1e9):
        h.observe(seconds, "sent")
    samples = parse(h.render())
    buckets = labelled(samples, "relayd_wait_seconds_bucket", status="sent")
    assert buckets == {"0.1": 2, "1.0": 2, "10.0": 3, "+Inf": 4}
    assert value(samples, "relayd_wait_seconds_count", status="sent") == 4
    assert value(samples, "relayd_wait_seconds_sum", status="sent") == pytest.approx(1e9 + 7.15)


def test_a_whole_scrape_parses_and_says_what_happened() -> None:
    m = Metrics(clock=lambda: 1_700_000_000.0)
    m.queue = lambda: {"active": 2, "deferred": 5}
    m.message_accepted("submission")
    m.refused(RELAY_DENIED.reply())
    m.delivery("sent", 3.0)
    m.delivery("deferred", 60.0)
    m.tls_used("in", "TLSv1.3")
    m.tls_used("out", None)
    text = m.render()
    for name in ("relayd_messages_rejected_total", "relayd_delivery_duration_seconds"):
        assert f"# TYPE {name} " in text and f"# HELP {name} " in text
    s = parse(text)
    assert value(s, "relayd_up") == 1
    assert value(s, "relayd_start_time_seconds") == 1_700_000_000
    assert labelled(s, "relayd_queue_messages") == {"active": 2, "deferred": 5, "held": 0}
    assert value(s, "relayd_queue_oldest_message_age_seconds") == 0  # not told of any
    m.oldest = lambda: 1_700_000_000.0 - 90
    assert value(parse(m.render()), "relayd_queue_oldest_message_age_seconds") == 90
    assert labelled(s, "relayd_messages_accepted_total") == {"submission": 1}
    assert value(s, "relayd_messages_rejected_total", reason="relay_denied") == 1
    assert value(s, "relayd_messages_rejected_total", reason="spf") == 0  # known, zero
    assert labelled(s, "relayd_deliveries_total") == {"sent": 1, "deferred": 1, "bounced": 0}
    # Deferrals are not final, so only the sent recipient has a latency.
    assert value(s, "relayd_delivery_duration_seconds_count", status="sent") == 1
    assert value(s, "relayd_delivery_duration_seconds_count", status="bounced") == 0
    assert value(s, "relayd_tls_connections_total", direction="in", version="TLSv1.3") == 1
    assert value(s, "relayd_tls_connections_total", direction="out", version="none") == 1


@pytest.mark.parametrize(
    ("reply", "reason"),
    [
        (RELAY_DENIED.reply(), "relay_denied"),
        ("554 5.7.1 <bob@example.org>: Relay access denied", "relay_denied"),
        (
            "553 5.7.1 <x@y.test>: Sender address rejected: not owned by user app1",
            "sender_not_owned",
        ),
        ("550 5.7.1 message rejected by the DMARC policy of y.test", "dmarc"),
        ("535 5.7.8 Error: authentication failed", "auth_failed"),
        ("421 4.7.0 Too many failed authentications; try again later", "auth_throttled"),
        ("421 4.7.0 too many connections from 10.0.0.1, try again later", "connection_limit"),
        ("530 5.7.0 Authentication required", "auth_required"),
        ("450 4.7.1 rate limit messages per ip (10/minute) reached for 1.2.3.4", "rate_limit"),
        ("550 5.7.23 SPF fail for y.test: not authorized", "spf"),
        ("451 4.7.24 SPF temporary error for y.test, try again later", "spf"),
        ("552 5.3.4 Message size exceeds fixed limit", "size"),
        (
            "554 5.6.0 Message refused: bare CR or LF in DATA (lines must end in CRLF)",
            "bare_newline",
        ),
        ("554 5.6.0 Message refused: line longer than 998 octets", "line_too_long"),
        ("452 4.3.1 Insufficient system storage", "spool_full"),
        ("451 4.3.0 Error: queue file write error", "spool_error"),
        ("452 4.5.3 Error: too many recipients", "too_many_recipients"),
        ("501 5.1.7 Bad sender address syntax: missing @", "protocol"),
        ("503 5.5.1 Error: nested MAIL command", "protocol"),
        ("553 5.6.7 Non-ASCII sender requires SMTPUTF8", "protocol"),
        ("451 4.4.0 something nobody planned for", "other"),
    ],
)
def test_rejection_reasons(reply: str, reason: str) -> None:
    assert rejection_reason(reply) == reason
    assert reason in metrics.REJECT_REASONS  # so it is exported from the start, at 0


# ---- the HTTP endpoint ------------------------------------------------------------------


def fetch(url: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def raw_http(port: int, data: bytes) -> bytes:
    """Send ``data``, then everything the server says until it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(data)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks)


class _Served:
    """A MetricsServer on a loopback port, for the duration of one asyncio test."""

    def __init__(self, text: str = "relayd_up 1\n") -> None:
        self.port = free_port()
        self.server = MetricsServer(lambda: text)
        self.url = f"http://127.0.0.1:{self.port}"

    async def __aenter__(self) -> _Served:
        await self.server.start(HostPort("127.0.0.1", self.port))
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.server.stop()


def run(coro: Coroutine[Any, Any, None]) -> None:
    asyncio.run(asyncio.wait_for(coro, 15))


def test_get_metrics_serves_the_text_format() -> None:
    async def main() -> None:
        async with _Served("relayd_up 1\n") as s:
            status, headers, body = await asyncio.to_thread(fetch, s.url + "/metrics?x=1")
            assert status == 200 and body == b"relayd_up 1\n"
            assert headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
            status, headers, body = await asyncio.to_thread(fetch, s.url + "/metrics", "HEAD")
            assert status == 200 and body == b"" and headers["Content-Length"] == "12"

    run(main())


def test_anything_else_is_refused() -> None:
    async def main() -> None:
        async with _Served() as s:
            assert (await asyncio.to_thread(fetch, s.url + "/"))[0] == 404
            assert (await asyncio.to_thread(fetch, s.url + "/metrics/x"))[0] == 404
            assert (await asyncio.to_thread(fetch, s.url + "/metrics", "POST"))[0] == 405
            garbage = await asyncio.to_thread(raw_http, s.port, b"hello\r\n\r\n")
            assert garbage.startswith(b"HTTP/1.0 400 ")
            huge = b"GET /" + b"a" * 20000 + b" HTTP/1.0\r\n\r\n"
            assert (await asyncio.to_thread(raw_http, s.port, huge)).startswith(b"HTTP/1.0 400 ")

    run(main())


def test_a_silent_client_is_dropped_and_blocks_no_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics, "REQUEST_TIMEOUT", 0.5)

    async def main() -> None:
        async with _Served() as s:
            reader, writer = await asyncio.open_connection("127.0.0.1", s.port)
            status, _, _ = await asyncio.to_thread(fetch, s.url + "/metrics")
            assert status == 200  # served while the silent one waits
            started = time.monotonic()
            assert await asyncio.wait_for(reader.read(), 5) == b""  # closed on us
            assert time.monotonic() - started < 2
            writer.close()

    run(main())


def test_too_many_clients_are_turned_away(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics, "MAX_CLIENTS", 1)

    async def main() -> None:
        async with _Served() as s:
            _, first = await asyncio.open_connection("127.0.0.1", s.port)
            await asyncio.sleep(0.1)  # let the server take the first one
            reader, second = await asyncio.open_connection("127.0.0.1", s.port)
            assert await asyncio.wait_for(reader.read(), 5) == b""  # closed at once
            first.close()
            second.close()

    run(main())


def test_no_address_listens_nowhere() -> None:
    async def main() -> None:
        server = MetricsServer(lambda: "")
        await server.start(None)
        assert not server.listening
        await server.stop()

    run(main())


# ---- a running relayd -----------------------------------------------------------------

PASSWORD = "correct horse battery"
MSG = b"From: alice@sender.test\r\nTo: bob@example.org\r\nSubject: hi\r\n\r\nHello.\r\n"


@pytest.fixture
def relayd(tmp_path: Path, dns_server: DNSServer, mx_pool: MXPool) -> Iterator[Relayd]:
    """relayd delivering example.org to a loopback MX, relay.test to a closed port.

    127.0.0.1 is outside ``[relay] networks``: an Internet client that may
    only send to relay.test, while submission with a login may send anywhere.
    """
    dns_server.add("example.org MX 10 mx1.test", "mx1.test A 127.0.0.2")
    r = Relayd(
        tmp_path / "relayd",
        dns_address=dns_server.address,
        hold_delivery=False,
        extra=(
            '[relay]\ndomains = ["relay.test"]\nnetworks = ["127.0.0.5/32"]\n'
            f'[delivery]\nport = {mx_pool.port}\nretry = ["1h"]\n'
            'connect_timeout = "3s"\ncommand_timeout = "5s"\n'
            f'[[route]]\ndomain = "relay.test"\nvia = "127.0.0.1:{free_port()}"\ntls = "none"\n'
            f'[metrics]\naddress = "127.0.0.1:{free_port()}"\n'
        ),
    )
    r.add_user("alice@sender.test", PASSWORD)
    with r:
        r.start()
        yield r
        assert r.stop() == 0


def metrics_url(r: Relayd) -> str:
    address = re.search(r'\[metrics\]\naddress = "([^"]+)"', r.config_text())
    assert address
    return f"http://{address.group(1)}/metrics"


def scrape_until(
    r: Relayd, done: Callable[[dict[Key, float]], bool], timeout: float = 15.0
) -> dict[Key, float]:
    """Scrape until ``done(samples)`` holds (counts settle after the client has its reply)."""
    deadline = time.monotonic() + timeout
    while True:
        status, headers, body = fetch(metrics_url(r))
        assert status == 200 and headers["Content-Type"].startswith("text/plain; version=0.0.4")
        samples = parse(body.decode())
        if done(samples) or time.monotonic() > deadline:
            return samples
        time.sleep(0.1)


def test_relayd_counts_what_happened(relayd: Relayd, mx_pool: MXPool) -> None:
    started = time.time()
    with relayd.smtp("inbound") as client:  # an Internet client: relay.test only
        client.ehlo("client.test")
        client.starttls(context=client_context())
        client.ehlo("client.test")
        assert client.mail("alice@sender.test")[0] == 250
        assert client.rcpt("bob@example.org")[0] == 554  # relay denied
        assert client.rcpt("carol@relay.test")[0] == 250
        assert client.data(MSG)[0] == 250
    with relayd.smtp("submission") as client:
        client.ehlo("client.test")
        client.starttls(context=client_context())
        client.ehlo("client.test")
        blob = base64.b64encode(b"\0alice@sender.test\0wrong").decode()
        assert client.docmd("AUTH", f"PLAIN {blob}")[0] == 535
    relayd.submit("alice@sender.test", PASSWORD, "alice@sender.test", ["bob@example.org"], MSG)
    mx_pool["127.0.0.2"].wait_for_messages(1)

    def settled(s: dict[Key, float]) -> bool:
        """Both attempts made and written back, every session closed."""
        delivered = labelled(s, "relayd_deliveries_total")
        tls_in = labelled(s, "relayd_tls_connections_total", direction="in")
        queued = labelled(s, "relayd_queue_messages")
        return (
            delivered["sent"] == delivered["deferred"] == queued["deferred"] == 1
            and queued["active"] == 0
            and sum(tls_in.values()) == 3
        )

    s = scrape_until(relayd, settled)
    assert value(s, "relayd_up") == 1
    assert started - 60 < value(s, "relayd_start_time_seconds") <= time.time()
    assert labelled(s, "relayd_messages_accepted_total") == {"inbound": 1, "submission": 1}
    rejected = {k: v for k, v in labelled(s, "relayd_messages_rejected_total").items() if v}
    assert rejected == {"relay_denied": 1, "auth_failed": 1}
    assert labelled(s, "relayd_deliveries_total") == {"sent": 1, "deferred": 1, "bounced": 0}
    # The relay.test message waits for its retry; the delivered one is gone.
    assert labelled(s, "relayd_queue_messages") == {"active": 0, "deferred": 1, "held": 0}
    assert 0 < value(s, "relayd_queue_oldest_message_age_seconds") < time.time() - started + 1
    assert value(s, "relayd_delivery_duration_seconds_count", status="sent") == 1
    assert 0 < value(s, "relayd_delivery_duration_seconds_sum", status="sent") < 30
    buckets = labelled(s, "relayd_delivery_duration_seconds_bucket", status="sent")
    assert buckets["+Inf"] == 1 and buckets["30.0"] == 1
    tls_in = labelled(s, "relayd_tls_connections_total", direction="in")
    tls_out = labelled(s, "relayd_tls_connections_total", direction="out")
    assert sum(tls_in.values()) == 3 and all(v.startswith("TLSv1.") for v in tls_in)
    assert list(tls_out.values()) == [1] and next(iter(tls_out)).startswith("TLSv1.")
    # example.org under [delivery] tls = opportunistic; relay.test by its route (refused connection)
    policy = "relayd_outbound_tls_policy_total"
    assert value(s, policy, tls_policy="opportunistic", verified="no", status="sent") == 1
    assert value(s, policy, tls_policy="route", verified="no", status="deferred") == 1
    assert fetch(metrics_url(relayd).removesuffix("metrics"))[0] == 404


def test_prometheus_parser_is_available() -> None:
    """Tells the run that the format was only checked by the fallback parser."""
    if real_parser is None:
        pytest.skip("prometheus_client not installed: format checked by the fallback parser only")
