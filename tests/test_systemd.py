"""relayd.systemd against the real mechanisms systemd uses.

Notifications go to a real AF_UNIX datagram socket that the test reads, as
systemd's would; socket activation hands real listening sockets to a child
process at fd 3 onwards with LISTEN_PID naming that child, as systemd does
between fork and exec. Only the journal is not real: journald is not running
here, so the fields are captured where they are handed to systemd-python.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from relayd import log, systemd

WAIT = 5.0  # seconds; every wait below is bounded by this


# --- a NOTIFY_SOCKET that the test reads -------------------------------------


class NotifyListener:
    """The service manager's end of $NOTIFY_SOCKET."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        sock.settimeout(WAIT)

    def receive(self) -> list[str]:
        """The next datagram, split into its KEY=value lines."""
        data = self.sock.recv(4096)
        return data.decode("utf-8").split("\n")

    def pending(self, wait: float = 0.05) -> list[list[str]]:
        """Every datagram that arrives within ``wait`` seconds."""
        self.sock.settimeout(wait)
        found = []
        try:
            while True:
                found.append(self.sock.recv(4096).decode("utf-8").split("\n"))
        except TimeoutError:
            return found
        finally:
            self.sock.settimeout(WAIT)


@pytest.fixture(params=["path", "abstract"])
def notify_socket(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[NotifyListener]:
    """A bound datagram socket, named in $NOTIFY_SOCKET by path or '@name'."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if request.param == "path":
        address = str(tmp_path / "notify")
        sock.bind(address)
        monkeypatch.setenv("NOTIFY_SOCKET", address)
    else:
        name = f"relayd-test-{uuid.uuid4().hex}"
        sock.bind("\0" + name)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
    try:
        yield NotifyListener(sock)
    finally:
        sock.close()


def test_ready_sends_ready_and_status(notify_socket: NotifyListener) -> None:
    assert systemd.ready("accepting mail on 3 listeners")
    assert notify_socket.receive() == ["READY=1", "STATUS=accepting mail on 3 listeners"]


def test_ready_without_status(notify_socket: NotifyListener) -> None:
    assert systemd.ready()
    assert notify_socket.receive() == ["READY=1"]


def test_reloading_carries_monotonic_usec(notify_socket: NotifyListener) -> None:
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert systemd.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    lines = notify_socket.receive()
    assert lines[0] == "RELOADING=1"
    key, _, value = lines[1].partition("=")
    assert key == "MONOTONIC_USEC"
    assert before <= int(value) <= after


def test_stopping_status_and_watchdog(notify_socket: NotifyListener) -> None:
    assert systemd.stopping("draining 2 sessions")
    assert notify_socket.receive() == ["STOPPING=1", "STATUS=draining 2 sessions"]
    assert systemd.watchdog_ping()
    assert notify_socket.receive() == ["WATCHDOG=1"]


def test_status_text_stays_one_assignment(notify_socket: NotifyListener) -> None:
    """A newline in the text must not smuggle in a second assignment."""
    assert systemd.status("queue: 3\nREADY=1")
    assert notify_socket.receive() == ["STATUS=queue: 3 READY=1"]


def test_notify_is_a_no_op_outside_systemd(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert not systemd.notify("READY=1")
    assert not systemd.ready()


@pytest.mark.parametrize("value", ["", "relative/path", "vsock:2:1234"])
def test_notify_ignores_unusable_addresses(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", value)
    assert not systemd.notify("READY=1")


def test_notify_to_a_missing_socket_fails_softly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone"))
    assert not systemd.notify("READY=1")


# --- watchdog ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("usec", "pid", "expected"),
    [
        ("30000000", None, 30.0),
        ("30000000", "self", 30.0),
        ("30000000", "1", None),  # armed for another process
        ("0", None, None),
        ("soon", None, None),
        (None, None, None),
    ],
)
def test_watchdog_interval(
    monkeypatch: pytest.MonkeyPatch, usec: str | None, pid: str | None, expected: float | None
) -> None:
    for name, value in (("WATCHDOG_USEC", usec), ("WATCHDOG_PID", pid)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, str(os.getpid()) if value == "self" else value)
    assert systemd.watchdog_interval() == expected


def test_watchdog_task_pings_at_half_the_interval(
    notify_socket: NotifyListener, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "200000")  # 0.2 s: a ping every 0.1 s
    monkeypatch.delenv("WATCHDOG_PID", raising=False)

    async def run() -> None:
        task = asyncio.create_task(systemd.watchdog_task())
        await asyncio.sleep(0.35)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, WAIT)

    asyncio.run(run())
    pings = notify_socket.pending()
    assert 3 <= len(pings) <= 5
    assert all(p == ["WATCHDOG=1"] for p in pings)


def test_watchdog_pings_stop_while_the_loop_is_stalled(notify_socket: NotifyListener) -> None:
    """The pings come from the event loop, so a blocked loop gets noticed."""
    arrivals: list[float] = []
    done = threading.Event()

    def read() -> None:  # systemd's side: note when each ping arrives
        notify_socket.sock.settimeout(0.05)
        while not done.is_set():
            try:
                notify_socket.sock.recv(4096)
            except TimeoutError:
                continue
            arrivals.append(time.monotonic())

    async def run() -> tuple[float, float]:
        task = asyncio.create_task(systemd.watchdog_task(timeout=0.1))
        await asyncio.sleep(0.15)
        stall_start = time.monotonic()
        time.sleep(0.4)  # a blocking call on the loop
        stall_end = time.monotonic()
        await asyncio.sleep(0.15)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, WAIT)
        return stall_start, stall_end

    reader = threading.Thread(target=read)
    reader.start()
    try:
        stall_start, stall_end = asyncio.run(run())
        time.sleep(0.1)
    finally:
        done.set()
        reader.join(WAIT)
    assert any(t < stall_start for t in arrivals)
    assert any(t > stall_end for t in arrivals)
    # At most the one ping in flight as the stall began; then silence.
    assert len([t for t in arrivals if stall_start + 0.15 < t < stall_end]) == 0


def test_watchdog_task_returns_when_not_armed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    asyncio.run(asyncio.wait_for(systemd.watchdog_task(), WAIT))


# --- socket activation -----------------------------------------------------------

# Run in the child: put the inherited sockets at fds 3, 4, ... and set
# LISTEN_PID to its own pid, as systemd does between fork and exec; then exec
# the reporter, which keeps the pid and the fds.
_LAUNCHER = """
import fcntl, os, sys
fds = [int(fd) for fd in sys.argv[1].split(",")]
high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 100) for fd in fds]  # out of the way of 3, 4, ...
for fd in fds:
    os.close(fd)
for index, fd in enumerate(high):
    os.dup2(fd, 3 + index)
    os.close(fd)
os.environ["LISTEN_PID"] = str(os.getpid())
os.execv(sys.executable, [sys.executable, "-c", sys.argv[2]])
"""

# Report what listen_fds() found, then serve one connection on each socket.
_REPORTER = """
import json, os, sys
from relayd import systemd
found = systemd.listen_fds()
report = {
    "pid": os.getpid(),
    "env": sorted(k for k in os.environ if k.startswith("LISTEN_")),
    "sockets": {
        name: [[s.family, s.type, s.getsockname()[1], os.get_inheritable(s.fileno()), s.fileno()]
               for s in socks]
        for name, socks in found.items()
    },
}
print(json.dumps(report), flush=True)
for name, socks in found.items():
    for s in socks:
        s.settimeout(5)
        conn, _ = s.accept()
        conn.sendall(("hello from " + name).encode())
        conn.close()
"""


def _listening_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock


def _activate(socks: list[socket.socket], env: dict[str, str]) -> subprocess.Popen[str]:
    fds = [s.fileno() for s in socks]
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("LISTEN_")}
    child_env.update(env)
    return subprocess.Popen(
        [sys.executable, "-c", _LAUNCHER, ",".join(map(str, fds)), _REPORTER],
        pass_fds=fds,
        env=child_env,
        stdout=subprocess.PIPE,
        text=True,
    )


def _greeting(port: int) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as conn:
        return conn.recv(100).decode()


def test_listen_fds_with_inherited_sockets() -> None:
    socks = [_listening_socket() for _ in range(3)]
    ports = [s.getsockname()[1] for s in socks]
    env = {"LISTEN_FDS": "3", "LISTEN_FDNAMES": "smtp:submission:submission"}
    child = _activate(socks, env)
    try:
        assert child.stdout is not None
        report = json.loads(child.stdout.readline())
        assert report["env"] == []  # LISTEN_* removed after use
        found = report["sockets"]
        assert sorted(found) == ["smtp", "submission"]
        stream = [int(socket.AF_INET), int(socket.SOCK_STREAM)]
        assert found["smtp"] == [[*stream, ports[0], False, 3]]
        assert found["submission"] == [[*stream, ports[1], False, 4], [*stream, ports[2], False, 5]]
        # The sockets are live: the child accepts on them.
        assert _greeting(ports[0]) == "hello from smtp"
        assert _greeting(ports[1]) == "hello from submission"
        assert _greeting(ports[2]) == "hello from submission"
        assert child.wait(timeout=WAIT) == 0
    finally:
        child.kill()
        child.wait(timeout=WAIT)
        for s in socks:
            s.close()


def test_listen_fds_without_names_are_unknown() -> None:
    sock = _listening_socket()
    child = _activate([sock], {"LISTEN_FDS": "1"})
    try:
        assert child.stdout is not None
        report = json.loads(child.stdout.readline())
        assert list(report["sockets"]) == ["unknown"]
        assert _greeting(sock.getsockname()[1]) == "hello from unknown"
        assert child.wait(timeout=WAIT) == 0
    finally:
        child.kill()
        child.wait(timeout=WAIT)
        sock.close()


@pytest.mark.parametrize(
    "env",
    [
        {"LISTEN_PID": "1", "LISTEN_FDS": "2", "LISTEN_FDNAMES": "smtp:submission"},
        {"LISTEN_PID": "self", "LISTEN_FDS": "0"},
        {"LISTEN_PID": "self", "LISTEN_FDS": "many"},
        {},
    ],
)
def test_listen_fds_not_for_us(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> None:
    """Fds meant for another process (or none) are left alone; vars unset."""
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, str(os.getpid()) if value == "self" else value)
    assert systemd.listen_fds() == {}
    assert not any(name.startswith("LISTEN_") for name in os.environ)


# --- journald ----------------------------------------------------------------------


def _outside_systemd(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("INVOCATION_ID", raising=False)
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)


def test_under_systemd(monkeypatch: pytest.MonkeyPatch) -> None:
    _outside_systemd(monkeypatch)
    assert not systemd.under_systemd()
    monkeypatch.setenv("INVOCATION_ID", "0123456789abcdef0123456789abcdef")
    assert systemd.under_systemd()
    monkeypatch.delenv("INVOCATION_ID")
    monkeypatch.setenv("JOURNAL_STREAM", "8:12345")
    assert systemd.under_systemd()


def test_no_journal_handler_outside_systemd(monkeypatch: pytest.MonkeyPatch) -> None:
    _outside_systemd(monkeypatch)
    assert systemd.journal_handler(required=False) is None


def test_required_journal_without_systemd_python(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Without systemd-python relayd speaks journald's protocol itself."""
    monkeypatch.setitem(sys.modules, "systemd.journal", None)  # import fails
    monkeypatch.setenv("INVOCATION_ID", "0123456789abcdef0123456789abcdef")
    monkeypatch.setattr(systemd, "JOURNAL_SOCKET", str(tmp_path / "missing.sock"))
    assert systemd.journal_handler(required=True) is None  # no journal: stderr
    reason = systemd.journal_unavailable_reason()
    assert reason is not None and "journal socket" in reason
    path = tmp_path / "journal.sock"
    journal = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    journal.bind(str(path))
    try:
        monkeypatch.setattr(systemd, "JOURNAL_SOCKET", str(path))
        handler = systemd.journal_handler(required=False)
        assert isinstance(handler, systemd.JournalHandler)
    finally:
        journal.close()


def test_required_journal_with_systemd_python() -> None:
    journal = pytest.importorskip("systemd.journal")
    if not os.path.exists(systemd.JOURNAL_SOCKET):
        pytest.skip("systemd-python is installed but no journal is running here")
    handler = systemd.journal_handler(required=True)
    assert isinstance(handler, systemd.JournalHandler)
    assert handler.send is journal.send


class Captured:
    """Stands in for systemd.journal.send: records the fields it is given."""

    def __init__(self) -> None:
        self.entries: list[dict[str, object]] = []

    def __call__(self, **fields: object) -> None:
        self.entries.append(fields)


@pytest.fixture
def journal() -> Iterator[Captured]:
    """A JournalHandler on relayd's loggers whose send function is captured."""
    captured = Captured()
    handler = systemd.JournalHandler(captured)
    root = logging.getLogger("relayd")
    saved = (root.level, root.propagate)
    root.setLevel(logging.DEBUG)
    root.propagate = False
    root.addHandler(handler)
    try:
        yield captured
    finally:
        root.removeHandler(handler)
        root.setLevel(saved[0])
        root.propagate = saved[1]


def test_journal_fields_of_a_delivery_event(journal: Captured) -> None:
    log.event(
        "smtp",
        "to=<bob@example.org>, relay=mx.example.org[203.0.113.5]:25, dsn=2.0.0, status=sent",
        queue_id="4F2A9C1B7D",
        recipient="bob@example.org",
        dsn="2.0.0",
        status="sent",
        client_ip="10.0.0.7",
        sasl_username="app1",
        message_id="<abc@example.com>",
    )
    [entry] = journal.entries
    assert entry["MESSAGE"] == (
        "4F2A9C1B7D: to=<bob@example.org>, relay=mx.example.org[203.0.113.5]:25, "
        "dsn=2.0.0, status=sent"
    )
    assert entry["QUEUE_ID"] == "4F2A9C1B7D"
    assert entry["RECIPIENT"] == "bob@example.org"
    assert entry["DSN"] == "2.0.0"
    assert entry["STATUS"] == "sent"
    assert entry["CLIENT_IP"] == "10.0.0.7"
    assert entry["SASL_USERNAME"] == "app1"
    assert entry["PRIORITY"] == 6
    assert entry["SYSLOG_IDENTIFIER"] == "relayd/smtp"
    assert entry["SYSLOG_FACILITY"] == 2
    assert entry["RELAYD_COMPONENT"] == "smtp"
    # journald's MESSAGE_ID is a catalogue id; the header goes elsewhere.
    assert "MESSAGE_ID" not in entry
    assert entry["HEADER_MESSAGE_ID"] == "<abc@example.com>"


@pytest.mark.parametrize(
    ("level", "priority"),
    [
        (logging.DEBUG, 7),
        (logging.INFO, 6),
        (logging.WARNING, 4),
        (logging.ERROR, 3),
        (logging.CRITICAL, 2),
    ],
)
def test_journal_priority_follows_the_level(journal: Captured, level: int, priority: int) -> None:
    log.event("qmgr", "removed", queue_id="4F2A9C1B7D", level=level)
    assert journal.entries[0]["PRIORITY"] == priority


def test_journal_identifier_of_nested_components(journal: Captured) -> None:
    log.event("submission.smtpd", "client=app1[10.0.0.7]", queue_id="4F2A9C1B7D")
    entry = journal.entries[0]
    assert entry["SYSLOG_IDENTIFIER"] == "relayd/submission/smtpd"
    assert entry["RELAYD_COMPONENT"] == "submission.smtpd"


def test_journal_field_names_are_made_safe(journal: Captured) -> None:
    record = logging.LogRecord("relayd.smtpd", logging.INFO, __file__, 1, "hi", None, None)
    record.journal_fields = {
        "MESSAGE_ID": "<x@y>",
        "_PID": "1",  # trusted fields cannot be set by clients
        "PRIORITY": "0",
        "MESSAGE": "forged",
        "tls-version": "TLSv1.3",
        "ok": None,
    }
    logging.getLogger("relayd.smtpd").handle(record)
    entry = journal.entries[0]
    assert entry["MESSAGE"] == "hi"
    assert entry["PRIORITY"] == 6
    assert entry["HEADER_MESSAGE_ID"] == "<x@y>"
    assert entry["PID"] == "1"
    assert entry["RELAYD_PRIORITY"] == "0"
    assert entry["RELAYD_MESSAGE"] == "forged"
    assert entry["TLS_VERSION"] == "TLSv1.3"
    assert "OK" not in entry and "MESSAGE_ID" not in entry
    assert all(not key.startswith("_") for key in entry)


def test_journal_message_includes_the_traceback(journal: Captured) -> None:
    try:
        raise OSError("disk full")
    except OSError:
        logging.getLogger("relayd.qmgr").exception("spool write failed")
    message = journal.entries[0]["MESSAGE"]
    assert isinstance(message, str)
    assert message.startswith("spool write failed\nTraceback")
    assert "OSError: disk full" in message


def test_fields_suit_systemd_pythons_send(monkeypatch: pytest.MonkeyPatch) -> None:
    """Through the real journal.send down to the datagram's KEY=value lines."""
    journal = pytest.importorskip("systemd.journal")
    lines: list[str] = []
    monkeypatch.setattr(journal, "sendv", lambda *args: lines.extend(args))
    handler = systemd.JournalHandler(journal.send)
    record = logging.LogRecord("relayd.smtp", logging.WARNING, __file__, 7, "%s", ("x",), None)
    record.journal_fields = {"QUEUE_ID": "4F2A9C1B7D", "DELAY": 0.42, "MESSAGE_ID": "<a@b>"}
    handler.emit(record)
    assert "MESSAGE=x" in lines
    assert "QUEUE_ID=4F2A9C1B7D" in lines
    assert "DELAY=0.42" in lines
    assert "PRIORITY=4" in lines
    assert "SYSLOG_IDENTIFIER=relayd/smtp" in lines
    assert "CODE_LINE=7" in lines
    assert not any(line.startswith("MESSAGE_ID=") for line in lines)


def test_journal_send_failure_does_not_reach_the_caller(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken(**fields: object) -> None:
        raise OSError("journal gone")

    handler = systemd.JournalHandler(broken)
    monkeypatch.setattr(logging, "raiseExceptions", False)
    record = logging.LogRecord("relayd.smtpd", logging.INFO, __file__, 1, "hi", None, None)
    handler.emit(record)  # must not raise


def test_native_sender_speaks_the_journal_protocol(tmp_path: Path) -> None:
    """Without systemd-python, entries still reach journald with their fields."""
    path = tmp_path / "journal.sock"
    journal = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    journal.bind(str(path))
    journal.settimeout(5)
    try:
        handler = systemd.JournalHandler(systemd.native_sender(str(path)))
        logger = logging.getLogger("relayd.smtp")
        saved = logger.level, logger.propagate
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
        try:
            logger.info(
                "%s",
                "4F2A: to=<bob@example.org>, status=sent",
                extra={"journal_fields": {"QUEUE_ID": "4F2A", "SMTP_REPLY": "250-a\n250 b"}},
            )
        finally:
            logger.removeHandler(handler)
            logger.level, logger.propagate = saved
        entry = journal.recv(65536)
    finally:
        journal.close()
    assert b"MESSAGE=4F2A: to=<bob@example.org>, status=sent\n" in entry
    assert b"QUEUE_ID=4F2A\n" in entry
    assert b"SYSLOG_IDENTIFIER=relayd/smtp\n" in entry
    reply = b"250-a\n250 b"
    assert b"SMTP_REPLY\n" + struct.pack("<Q", len(reply)) + reply + b"\n" in entry
