"""Counters for Prometheus, and the small HTTP server that hands them out.

Optional (``[metrics] address``): without it nothing listens, but the
counters still count, because a dict increment is cheaper than asking
everywhere whether anyone is looking. Everything runs on the event loop,
so no locks. The text format (version 0.0.4) is written here rather than
pulled in as a dependency: it is a few lines of escaping and formatting.

What is counted where: the SMTP session counts accepted messages, refused
commands by reason and inbound TLS; the scheduler counts recipient
outcomes, their latency since arrival, outbound TLS and the outbound TLS
policy that applied; the queue gauge is
read from the scheduler at scrape time, so it can never drift.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Final

from relayd import log
from relayd.config import HostPort

CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"

# From a quick local hand-over to the five days a message may wait by default.
LATENCY_BUCKETS: Final = (
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0,
    3600.0, 4 * 3600.0, 86400.0, 2 * 86400.0, 5 * 86400.0,
)  # fmt: skip

DELIVERY_STATUSES: Final = ("sent", "deferred", "bounced")
FINAL_STATUSES: Final = ("sent", "bounced")
QUEUE_STATES: Final = ("active", "deferred", "held")

Labels = tuple[str, ...]

# ---------------------------------------------------------------------------
# Why a command was refused, from the reply relayd gave. The (code, enhanced
# code) pairs are unique across relayd's own refusals except where the text
# tells them apart; anything else is a protocol or syntax error.

_REASONS: Final[Mapping[tuple[str, str], str]] = {
    ("554", "5.7.1"): "relay_denied",
    ("553", "5.7.1"): "sender_not_owned",
    ("550", "5.7.1"): "dmarc",
    ("535", "5.7.8"): "auth_failed",
    ("530", "5.7.0"): "auth_required",
    ("421", "4.7.0"): "connection_limit",
    ("450", "4.7.1"): "rate_limit",
    ("550", "5.7.23"): "spf",
    ("451", "4.7.24"): "spf",
    ("552", "5.3.4"): "size",
    ("554", "5.6.0"): "line_too_long",
    ("452", "4.3.1"): "spool_full",
    ("451", "4.3.0"): "spool_error",
    ("452", "4.5.3"): "too_many_recipients",
    ("454", "4.7.0"): "auth_throttled",  # too many AUTH at once, or the account is locked
}
_BY_TEXT: Final[Mapping[str, tuple[str, str]]] = {
    "authentication": ("421", "auth_throttled"),
    "bare cr or lf": ("554", "bare_newline"),
    "suppressed after a hard bounce": ("550", "suppressed"),
}
REJECT_REASONS: Final = (
    *dict.fromkeys(_REASONS.values()),
    *(reason for _, reason in _BY_TEXT.values()),
    "protocol",
    "other",
)


def rejection_reason(reply: str) -> str:
    """The ``reason`` label for a refusing reply such as ``554 5.7.1 Relay access denied``."""
    code, _, rest = reply.partition(" ")
    enhanced = rest.split(" ", 1)[0]
    text = rest.lower()
    for needle, (needle_code, reason) in _BY_TEXT.items():
        if code == needle_code and needle in text:
            return reason
    known = _REASONS.get((code, enhanced))
    if known is not None:
        return known
    if code[:1] == "5" and enhanced[1:3] in (".5", ".1", ".6"):
        return "protocol"  # bad syntax, address, parameter or command order
    return "other"


# ---------------------------------------------------------------------------
# The text format.


def escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def format_value(value: float) -> str:
    """Integers without a fraction, and Prometheus's spelling of infinities and NaN."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if float(value).is_integer() and abs(value) < 2**53:
        return str(int(value))
    return repr(value)


def sample(name: str, names: Sequence[str], values: Labels, value: float) -> str:
    if not names:
        return f"{name} {format_value(value)}\n"
    pairs = ",".join(f'{n}="{escape_label(v)}"' for n, v in zip(names, values, strict=True))
    return f"{name}{{{pairs}}} {format_value(value)}\n"


def header(name: str, kind: str, help_text: str) -> str:
    return f"# HELP {name} {escape_help(help_text)}\n# TYPE {name} {kind}\n"


class Counter:
    """A counter per combination of label values; ``inc`` is one dict update."""

    def __init__(
        self, name: str, help_text: str, labels: Sequence[str] = (), known: Iterable[Labels] = ()
    ) -> None:
        self.name, self.help, self.labels = name, help_text, tuple(labels)
        # Label values known in advance start at 0, so rate() sees the first event.
        self.values: dict[Labels, float] = dict.fromkeys(known, 0.0)
        if not self.labels:
            self.values[()] = 0.0
        # Counts of other processes (acceptors), by process, added in at render.
        self.others: dict[int, dict[Labels, float]] = {}

    def inc(self, *values: str, amount: float = 1.0) -> None:
        self.values[values] = self.values.get(values, 0.0) + amount

    def total(self) -> dict[Labels, float]:
        """This process's counts plus every other process's last report."""
        merged = dict(self.values)
        for other in self.others.values():
            for labels, value in other.items():
                merged[labels] = merged.get(labels, 0.0) + value
        return merged

    def render(self) -> str:
        lines = [header(self.name, "counter", self.help)]
        lines += [sample(self.name, self.labels, k, v) for k, v in self.total().items()]
        return "".join(lines)


class Gauge:
    """Read when scraped: ``read`` returns the value for each combination of labels."""

    def __init__(
        self,
        name: str,
        help_text: str,
        labels: Sequence[str],
        read: Callable[[], Mapping[Labels, float]],
    ) -> None:
        self.name, self.help, self.labels, self.read = name, help_text, tuple(labels), read

    def render(self) -> str:
        lines = [header(self.name, "gauge", self.help)]
        lines += [sample(self.name, self.labels, k, v) for k, v in self.read().items()]
        return "".join(lines)


class _Series:
    """One histogram's counts per bucket (not cumulative: observe touches one slot)."""

    def __init__(self, buckets: int) -> None:
        self.counts = [0] * (buckets + 1)  # the last slot is +Inf
        self.sum = 0.0


class Histogram:
    def __init__(
        self,
        name: str,
        help_text: str,
        buckets: Sequence[float],
        labels: Sequence[str] = (),
        known: Iterable[Labels] = (),
    ) -> None:
        self.name, self.help, self.labels = name, help_text, tuple(labels)
        self.buckets = tuple(sorted(buckets))
        self.series: dict[Labels, _Series] = {k: _Series(len(self.buckets)) for k in known}
        if not self.labels:
            self.series[()] = _Series(len(self.buckets))

    def observe(self, value: float, *values: str) -> None:
        series = self.series.get(values)
        if series is None:
            series = self.series[values] = _Series(len(self.buckets))
        series.counts[bisect.bisect_left(self.buckets, value)] += 1
        series.sum += value

    def render(self) -> str:
        lines = [header(self.name, "histogram", self.help)]
        bucket_labels = (*self.labels, "le")
        for values, series in self.series.items():
            total = 0
            bounds = [*(repr(b) for b in self.buckets), "+Inf"]
            for bound, count in zip(bounds, series.counts, strict=True):
                total += count
                lines.append(sample(f"{self.name}_bucket", bucket_labels, (*values, bound), total))
            lines.append(sample(f"{self.name}_sum", self.labels, values, series.sum))
            lines.append(sample(f"{self.name}_count", self.labels, values, total))
        return "".join(lines)


# ---------------------------------------------------------------------------
# relayd's metrics.


class Metrics:
    """Every metric relayd exports; shared by all config snapshots, so a reload keeps counts."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.started = clock()
        self._clock = clock
        self.queue: Callable[[], Mapping[str, int]] = dict
        # Arrival time of the oldest queued message; None when the queue is empty.
        self.oldest: Callable[[], float | None] = lambda: None
        self.accepted = Counter(
            "relayd_messages_accepted_total",
            "Messages accepted into the queue, by listener.",
            ["listener"],
        )
        self.rejected = Counter(
            "relayd_messages_rejected_total",
            "Refused SMTP commands, by reason (one per refused MAIL, RCPT, DATA, AUTH "
            "or connection).",
            ["reason"],
            known=[(r,) for r in REJECT_REASONS],
        )
        self.deliveries = Counter(
            "relayd_deliveries_total",
            "Delivery outcomes per recipient (expired recipients count as bounced).",
            ["status"],
            known=[(s,) for s in DELIVERY_STATUSES],
        )
        self.latency = Histogram(
            "relayd_delivery_duration_seconds",
            "Time from arrival to a recipient's final outcome.",
            LATENCY_BUCKETS,
            ["status"],
            known=[(s,) for s in FINAL_STATUSES],
        )
        self.tls = Counter(
            "relayd_tls_connections_total",
            "TLS use: accepted SMTP connections (in) and successful deliveries (out), "
            'by TLS version; "none" is clear text.',
            ["direction", "version"],
        )
        self.tls_policy = Counter(
            "relayd_outbound_tls_policy_total",
            "Outbound delivery outcomes per recipient (sent, deferred, bounced), by the TLS "
            "policy that applied (none, opportunistic, required, verify, route) and whether "
            "the next hop's certificate was verified (yes, no).",
            ["tls_policy", "verified", "status"],
        )
        # Webhooks (relayd.events): events waiting in the outbox, and send results.
        self.webhook_backlog: Callable[[], int] = lambda: 0
        self.webhook_sent = Counter(
            "relayd_webhook_events_sent_total",
            "Events a webhook receiver took (2xx), by event.",
            ["event"],
        )
        self.webhook_failed = Counter(
            "relayd_webhook_events_failed_total",
            "Event sends that failed (error, timeout or non-2xx; retried), by event.",
            ["event"],
        )
        self.webhook_dropped = Counter(
            "relayd_webhook_events_dropped_total",
            "Events given up: expired (3 days of retries), full (outbox bound), "
            "unwritable (outbox write failed).",
            ["reason"],
            known=[("expired",), ("full",), ("unwritable",)],
        )
        self._families: tuple[Counter | Gauge | Histogram, ...] = (
            Gauge("relayd_up", "1 while relayd is running.", [], lambda: {(): 1.0}),
            Gauge(
                "relayd_start_time_seconds",
                "When relayd started, in seconds since the Unix epoch.",
                [],
                lambda: {(): self.started},
            ),
            self.accepted,
            self.rejected,
            self.deliveries,
            Gauge(
                "relayd_queue_messages", "Messages queued, by state.", ["state"], self._queue_counts
            ),
            Gauge(
                "relayd_queue_oldest_message_age_seconds",
                "Age of the oldest queued message, held ones included (0 when the queue is empty).",
                [],
                self._oldest_age,
            ),
            self.latency,
            self.tls,
            self.tls_policy,
            Gauge(
                "relayd_webhook_backlog",
                "Events in the webhook outbox, not yet taken by their receiver.",
                [],
                lambda: {(): float(self.webhook_backlog())},
            ),
            self.webhook_sent,
            self.webhook_failed,
            self.webhook_dropped,
        )

    # ---- counting (hot path) ------------------------------------------------

    def message_accepted(self, listener: str) -> None:
        self.accepted.inc(listener)

    def refused(self, reply: str) -> None:
        self.rejected.inc(rejection_reason(reply))

    def delivery(self, status: str, seconds: float) -> None:
        self.deliveries.inc(status)
        if status in FINAL_STATUSES:
            self.latency.observe(max(0.0, seconds), status)

    def tls_used(self, direction: str, version: str | None) -> None:
        self.tls.inc(direction, version or "none")

    def tls_policy_used(self, policy: str, verified: bool, status: str, recipients: int) -> None:
        self.tls_policy.inc(policy, "yes" if verified else "no", status, amount=recipients)

    # ---- several processes ---------------------------------------------------------
    #
    # Acceptor processes run SMTP sessions too. Each reports its session
    # counters (absolute values) to the daemon about once a second; the
    # daemon serves its own counts plus the last report of each acceptor,
    # and folds an acceptor's counts into its own when that process ends,
    # so no counter ever goes down.

    def _shared(self) -> tuple[Counter, ...]:
        return (self.accepted, self.rejected, self.tls)

    def shared_counts(self) -> dict[str, list[list[object]]]:
        """The session counters of this process, as JSON-ready data."""
        return {
            c.name: [[list(labels), value] for labels, value in c.values.items()]
            for c in self._shared()
        }

    def absorb(self, source: int, counts: Mapping[str, object]) -> None:
        """Take another process's report (see shared_counts); malformed parts are ignored."""
        for counter in self._shared():
            rows = counts.get(counter.name)
            if not isinstance(rows, list):
                continue
            values: dict[Labels, float] = {}
            for row in rows:
                with contextlib.suppress(TypeError, ValueError):
                    labels, value = row
                    if len(labels) == len(counter.labels):
                        values[tuple(str(v) for v in labels)] = float(value)
            counter.others[source] = values

    def retire(self, source: int) -> None:
        """A process ended: keep its last counts as this process's own."""
        for counter in self._shared():
            for labels, value in counter.others.pop(source, {}).items():
                counter.inc(*labels, amount=value)

    # ---- scraping ----------------------------------------------------------------

    def render(self) -> str:
        return "".join(family.render() for family in self._families)

    def _oldest_age(self) -> dict[Labels, float]:
        arrival = self.oldest()
        return {(): 0.0 if arrival is None else max(0.0, self._clock() - arrival)}

    def _queue_counts(self) -> dict[Labels, float]:
        counts = self.queue()
        return {(state,): float(counts.get(state, 0)) for state in QUEUE_STATES}


# ---------------------------------------------------------------------------
# The HTTP endpoint: GET /metrics and nothing else.

MAX_REQUEST_LINE = 8192  # bytes per request line or header line
MAX_HEADER_LINES = 64
REQUEST_TIMEOUT = 10.0  # whole request read, so a silent client cannot hold a slot
WRITE_TIMEOUT = 10.0
MAX_CLIENTS = 16

_REASON_PHRASES: Final = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
}


class MetricsServer:
    """A tiny HTTP/1.0 server: one request per connection, bounded in size, time and number."""

    def __init__(self, render: Callable[[], str]) -> None:
        self._render = render
        self._server: asyncio.Server | None = None
        self._clients: set[asyncio.StreamWriter] = set()

    async def start(self, address: HostPort | None) -> None:
        """Listen on ``address``; None (no ``[metrics] address``) listens nowhere."""
        if address is None:
            return
        self._server = await asyncio.start_server(
            self._client, address.host, address.port, limit=MAX_REQUEST_LINE
        )
        log.event("master", f"metrics: listening on http://{address}/metrics")

    @property
    def listening(self) -> bool:
        return self._server is not None

    async def stop(self) -> None:
        if self._server is None:
            return
        self._server.close()
        # Closing, not cancelling: a handler sees EOF and ends by itself (3.11's
        # asyncio logs a spurious error for a cancelled connection handler).
        for writer in list(self._clients):
            writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._server.wait_closed(), 5.0)
        self._server = None

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._clients) >= MAX_CLIENTS:
            writer.close()
            return
        self._clients.add(writer)
        try:
            status, head_only = await asyncio.wait_for(_read_request(reader), REQUEST_TIMEOUT)
            writer.write(self._response(status, head_only))
            await asyncio.wait_for(writer.drain(), WRITE_TIMEOUT)
        except (TimeoutError, OSError, asyncio.IncompleteReadError):
            pass  # the client went away or dawdled; nothing to tell it
        except Exception as exc:
            log.event("master", f"warning: metrics request failed: {exc!r}", level=logging.WARNING)
        finally:
            self._clients.discard(writer)
            writer.close()

    def _response(self, status: int, head_only: bool) -> bytes:
        body = (self._render() if status == 200 else f"{_REASON_PHRASES[status]}\n").encode()
        head = (
            f"HTTP/1.0 {status} {_REASON_PHRASES[status]}\r\n"
            f"Content-Type: {CONTENT_TYPE if status == 200 else 'text/plain; charset=utf-8'}\r\n"
            f"Content-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n"
        ).encode()
        return head if head_only else head + body


async def _read_request(reader: asyncio.StreamReader) -> tuple[int, bool]:
    """The status to answer with, and whether it was a HEAD request."""
    try:
        request = (await reader.readline()).decode("latin-1").split()
        for _ in range(MAX_HEADER_LINES):
            if (await reader.readline()).strip() == b"":
                break
        else:
            return 400, False
    except ValueError:  # a line over MAX_REQUEST_LINE
        return 400, False
    if len(request) != 3 or not request[2].startswith("HTTP/"):
        return 400, False
    method, target = request[0], request[1].split("?", 1)[0]
    if target != "/metrics":
        return 404, method == "HEAD"
    if method not in ("GET", "HEAD"):
        return 405, False
    return 200, method == "HEAD"
