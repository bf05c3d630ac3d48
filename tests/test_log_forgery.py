"""Nobody can forge a log line or write to the operator's terminal through relayd.

SPEC section 7: control characters or non-ASCII in anything a client or a
remote server sends that ends up in a log line or in ``relayctl`` output
are escaped (``\\x00``, ``\\x1b``, ``\\xff``), never written raw; a log line
is one line. The tests send such bytes to a real relayd (HELO, commands,
addresses, AUTH, a remote server's reply) and read back its stderr, the
journald datagrams it would send, and relayctl's output.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.certs import client_context
from support.mxserver import MXServer
from support.ports import free_port
from support.relayd_proc import HOSTNAME, RawClient, Relayd, raw_session

from relayd import log, systemd
from relayd.escape import printable
from relayd.spool.model import Attempt, Envelope, Recipient
from relayd.spool.queueid import new_queue_id
from relayd.spool.store import Spool

ESC_REPLY = "451 4.7.1 \x1b[2J\x1b[31mgreylisted \xe9\nfake: removed"
ESCAPED_REPLY = "451 4.7.1 \\x1b[2J\\x1b[31mgreylisted \\xc3\\xa9\\nfake: removed"
# One log line: relayd's program name, maybe a pid, then text of printable ASCII.
LOG_LINE = re.compile(rb"^relayd(/[a-z/]+)?(\[\d+\])?: [\x20-\x7e]*$")


# ---- the escaping itself --------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        ("plain text <a@b.example> [127.0.0.1]", "plain text <a@b.example> [127.0.0.1]"),
        ("a\x00b\x1bc\x7fd", "a\\x00b\\x1bc\\x7fd"),
        ("line\r\nnext\tcol", "line\\r\\nnext\\tcol"),
        ("caf\xe9", "caf\\xc3\\xa9"),  # non-ASCII: the bytes of its UTF-8 form
        (b"x\xffy".decode("utf-8", "surrogateescape"), "x\\xffy"),  # an undecodable byte
        (b"raw \xff\x1b bytes", "raw \\xff\\x1b bytes"),
        ("\u2028\x85", "\\xe2\\x80\\xa8\\xc2\\x85"),  # Unicode line breaks too
    ],
)
def test_printable_escapes_everything_but_printable_ascii(raw: str | bytes, shown: str) -> None:
    assert printable(raw) == shown
    assert printable(shown) == shown  # idempotent: a stored, escaped name stays as it is


# ---- the logging boundary, in-process ---------------------------------------------------------


@pytest.fixture
def logging_restored() -> Iterator[None]:
    """log.setup() changes process-wide loggers; put them back afterwards."""
    names = (log.ROOT, *log.FOREIGN)
    saved = {
        name: (list(lg.handlers), lg.level, lg.propagate)
        for name, lg in ((n, logging.getLogger(n)) for n in names)
    }
    try:
        yield
    finally:
        for name, (handlers, level, propagate) in saved.items():
            logger = logging.getLogger(name)
            for handler in list(logger.handlers):
                logger.removeHandler(handler)
            for handler in handlers:
                logger.addHandler(handler)
            logger.setLevel(level)
            logger.propagate = propagate
        log._foreign_handler = None


FORGERY = "helo=<x>\nrelayd/smtpd[1]: 4F2A9C1B7D: reject: RCPT from evil[203.0.113.9]\r\x1b[2K\xff"


def test_stderr_lines_are_escaped_and_single(
    capsys: pytest.CaptureFixture[str], logging_restored: None
) -> None:
    log.setup("info", "stderr")
    log.event("smtpd", FORGERY, queue_id="4F2A9C1B7D")
    logging.getLogger("mail.log").warning("%r unrecognised: %s", ("127.0.0.1", 1), "\x1bA\rB")
    try:
        raise ValueError("bad\nvalue \x1b")
    except ValueError:
        logging.getLogger("relayd.qmgr").exception("cannot \x00 go on")
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 3
    assert all(LOG_LINE.match(line.encode()) for line in lines), lines
    assert "4F2A9C1B7D: helo=<x>\\nrelayd/smtpd[1]: 4F2A9C1B7D" in lines[0]
    assert lines[0].endswith("\\r\\x1b[2K\\xc3\\xbf")
    assert "unrecognised: \\x1bA\\rB" in lines[1] and lines[1].startswith("relayd[")
    assert "cannot \\x00 go on\\nTraceback" in lines[2]
    assert "ValueError: bad\\nvalue \\x1b" in lines[2]


def test_lines_from_the_loop_and_from_threads_all_arrive_in_order(
    capsys: pytest.CaptureFixture[str], logging_restored: None
) -> None:
    """On the loop lines are held for one round; a thread's line flushes them: none is lost."""
    log.setup("info", "stderr")

    def worker(n: int) -> None:
        for i in range(300):
            logging.getLogger("relayd.qmgr").warning("thread %d handler %d", n, i)
            log.event("qmgr", f"thread {n} event {i}")

    async def main() -> None:
        threads = [threading.Thread(target=worker, args=(n,)) for n in range(2)]
        for thread in threads:
            thread.start()
        for i in range(3000):
            log.event("smtpd", f"loop {i}")
            if i % 20 == 0:
                await asyncio.sleep(0)  # the round ends: what is held is written
        for thread in threads:
            thread.join(30)

    asyncio.run(main())
    lines = capsys.readouterr().err.splitlines()
    loop_lines = [line.rsplit(": ", 1)[1] for line in lines if ": loop " in line]
    assert loop_lines == [f"loop {i}" for i in range(3000)]
    for n in range(2):
        assert [line.rsplit(": ", 1)[1] for line in lines if f": thread {n} event " in line] == [
            f"thread {n} event {i}" for i in range(300)
        ]
        assert sum(f"thread {n} handler " in line for line in lines) == 300


def journal_entry(datagram: bytes) -> dict[bytes, bytes]:
    """Parse one native-protocol datagram; fail on the binary (multi-line) field form."""
    fields: dict[bytes, bytes] = {}
    for line in datagram.split(b"\n")[:-1]:
        key, eq, value = line.partition(b"=")
        assert eq, f"field {key!r} was sent in binary form: it held a newline"
        fields[key] = value
    return fields


def test_journald_message_and_fields_are_escaped_and_single(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, logging_restored: None
) -> None:
    monkeypatch.setitem(sys.modules, "systemd.journal", None)  # relayd's own sender
    path = tmp_path / "journal.sock"
    journal = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    journal.bind(str(path))
    journal.settimeout(5)
    monkeypatch.setattr(systemd, "JOURNAL_SOCKET", str(path))
    try:
        log.setup("info", "journald")
        log.event(
            "smtpd",
            FORGERY,
            queue_id="4F2A9C1B7D",
            recipient="bob\x1b@example.org\n",
            smtp_reply=ESC_REPLY,
            helo=b"h\xff\x00",
            delay=0.5,
        )
        logging.getLogger("mail.log").warning("unrecognised: %s", "\x1bA\rB")
        entries = [journal_entry(journal.recv(65536)), journal_entry(journal.recv(65536))]
    finally:
        journal.close()
    for entry in entries:
        for key, value in entry.items():
            assert re.fullmatch(rb"[\x20-\x7e]*", value), (key, value)
    first = entries[0]
    assert first[b"MESSAGE"].startswith(b"4F2A9C1B7D: helo=<x>\\nrelayd/smtpd[1]:")
    assert first[b"RECIPIENT"] == b"bob\\x1b@example.org\\n"
    assert first[b"SMTP_REPLY"] == ESCAPED_REPLY.encode()
    assert first[b"HELO"] == b"h\\xff\\x00"
    assert first[b"DELAY"] == b"0.5"
    assert first[b"QUEUE_ID"] == b"4F2A9C1B7D"
    assert entries[1][b"MESSAGE"] == b"unrecognised: \\x1bA\\rB"
    assert entries[1][b"SYSLOG_IDENTIFIER"] == b"relayd"


# ---- a real relayd ------------------------------------------------------------------------------


def assert_clean_log(raw: bytes) -> list[bytes]:
    """Every line of relayd's stderr is one escaped event line; returns them."""
    lines = raw.split(b"\n")
    assert lines[-1] == b""
    for line in lines[:-1]:
        assert LOG_LINE.match(line), line
    return lines[:-1]


def test_hostile_bytes_from_clients_and_servers_are_escaped(tmp_path: Path) -> None:
    port = free_port("127.0.0.2")
    route = f'[[route]]\ndomain = "example.org"\nvia = "127.0.0.2:{port}"\ntls = "none"\n'
    with MXServer("127.0.0.2", port) as mx, Relayd(tmp_path, hold_delivery=False) as r:
        mx.reply_for("bob@example.org", ESC_REPLY)
        r.extra = route + '[delivery]\nretry = ["1h"]\n'
        r.write_config()
        r.start()
        with raw_session(r.port("inbound")) as c:
            c.reply()
            c.send(b"EHLO bad\x1b[31m\x7f\x00name\r\n")
            assert c.reply().startswith("501 5.5.2")  # control characters: no host has them
            c.send(b"EHLO h\xff\xfe.example\r\n")  # 8-bit: taken, kept escaped
            assert c.reply().startswith("250")
            c.send(b"\x1bFOO\rBAR\r\n")
            assert c.reply().startswith("500")
            c.send(b"MAIL FROM:<a\xff\x1b@example.com>\r\n")
            odd = c.reply()
            assert odd[:1] == "5" and "Error: (" not in odd, odd
            assert c.cmd("MAIL FROM:<alice@example.com>").startswith("250")
            c.send(b"RCPT TO:<bob@example.org> X=\xff\r\n")
            assert c.reply()[:1] == "5"
            assert c.cmd("RCPT TO:<bob@example.org>").startswith("250")
            assert c.cmd("DATA").startswith("354")
            c.send(b"From: alice@example.com\r\nSubject: \x1b[2J hi\r\n\r\nbody\r\n.\r\n")
            queued = c.reply()
            assert queued.startswith("250 2.0.0 Ok: queued as "), queued
            qid = queued.rsplit(" ", 1)[1]
            assert c.cmd("QUIT").startswith("221")
        r.wait_log(f"{qid}: to=<bob@example.org>")
        auth_garbage(r)
        raw_log = r.log_path.read_bytes()
        lines = assert_clean_log(raw_log)
        text = raw_log.decode("ascii")
        assert "helo=<bad\\x1b[31m\\x7f\\x00name>" in text
        assert "status=deferred (451 4.7.1 \\x1b[2J\\x1b[31mgreylisted \\xc3\\xa9" in text
        assert not any(line.startswith(b"fake") for line in lines)
        show = r.ctl("queue", "show", qid)
        assert show.returncode == 0, show.stderr
        assert_clean_output(show.stdout)
        assert "helo h\\xff\\xfe.example" in show.stdout
        assert "4.7.1: 451 4.7.1 \\x1b[2J\\x1b[31mgreylisted \\xc3\\xa9" in show.stdout
        assert "Subject: \\x1b[2J hi" in show.stdout
        listing = r.ctl("queue")
        assert_clean_output(listing.stdout)
        assert "\\x1b[2J" in listing.stdout
        doc = json.loads(r.ctl("--json", "queue", "show", qid).stdout)
        # A remote reply is untrusted data: stored escaped (SPEC section 8), so no
        # consumer of the JSON can print an ESC from it either.
        assert "\\x1b[2J" in doc["history"][0]["reply"]
        assert "\x1b" not in doc["history"][0]["reply"]
        assert r.stop() == 0


def auth_garbage(r: Relayd) -> None:
    """AUTH with undecodable bytes and control characters: refused, the session goes on."""
    raw = socket.create_connection(("127.0.0.1", r.port("submissions")), timeout=10)
    with client_context().wrap_socket(raw, server_hostname=HOSTNAME) as tls:
        c = RawClient(tls)
        assert c.reply().startswith("220")
        assert c.cmd("EHLO client.test").startswith("250")
        for line in (b"AUTH PLAIN \xff\x1b\x00", b"AUTH \xff\x1bLOGIN", b"AUTH LOGIN \x1b"):
            c.send(line + b"\r\n")
            reply = c.reply()
            assert reply[:1] in "45" and "Error: (" not in reply, reply
        assert c.cmd("NOOP").startswith("250")


def assert_clean_output(out: str) -> None:
    for line in out.split("\n"):
        assert re.fullmatch(r"[\x20-\x7e]*", line), line


def test_relayctl_escapes_what_it_reads_from_the_spool(tmp_path: Path) -> None:
    """An entry whose sender, HELO, replies and headers hold ESC (written by an older relayd)."""
    r = Relayd(tmp_path)
    with r:
        qid = new_queue_id()
        envelope = Envelope(
            queue_id=qid,
            sender="evil\x1b[2J@example.com",
            recipients=[
                Recipient(
                    address="bob\x1b@example.org",
                    status="pending",
                    dsn="4.7.1",
                    reply=ESC_REPLY,
                    remote_host="mx\x1b.example.org",
                )
            ],
            arrival_time=time.time(),
            helo="x\x1b]0;owned\x07y",
            attempts=1,
            history=[
                Attempt(
                    time=time.time(),
                    recipients=["bob\x1b@example.org"],
                    host="mx\x1b.example.org",
                    address="127.0.0.2",
                    port=25,
                    tls=None,
                    reply=ESC_REPLY,
                    dsn="4.7.1",
                    status="deferred",
                    duration=0.1,
                )
            ],
        )
        data = b"Subject: \x1b[2J\xff\r\nX-Fold: a\r\n\tb\x00\r\n\r\nbody\r\n"
        spool = Spool(r.spool)
        spool.ensure()

        async def commit() -> None:
            await spool.commit(envelope, data)
            await spool.close()

        asyncio.run(commit())
        for args in (("queue",), ("queue", "show", qid)):
            out = r.ctl(*args)
            assert out.returncode == 0, out.stderr
            assert "\x1b" not in out.stdout
            assert_clean_output(out.stdout)
            assert "evil\\x1b[2J@example.com" in out.stdout
        show = r.ctl("queue", "show", qid).stdout
        assert "helo x\\x1b]0;owned\\x07y" in show
        assert "Subject: \\x1b[2J\\xff" in show
        assert "\\tb\\x00" in show
        assert "mx\\x1b.example.org" in show
        listing = json.loads(r.ctl("--json", "queue").stdout)
        assert listing["messages"][0]["sender"] == "evil\x1b[2J@example.com"
