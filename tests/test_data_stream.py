"""DATA as an attacker sends it: huge, oddly chunked, NUL-laden, spoofing its From:.

The reader is checked against a plain whole-buffer reference on random
chunkings; the daemon is attacked for real on loopback, with its peak memory
read from /proc (VmHWM) and a second session's NOOP timed throughout.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support.certs import client_context
from support.relayd_proc import Relayd, raw_session, send

from relayd.smtpd import dataread
from relayd.spool.store import Spool

PASSWORD = "correct horse battery staple"
MB = 1_000_000


# ---- the reader against a reference ------------------------------------------------


def reference(raw: bytes, max_size: int) -> tuple[bytes | None, str | None]:
    """What DATA ``raw`` (up to, not including, the final ".CRLF") must give, done naively."""
    if len(raw) > max_size:
        return None, "too_big"
    if b"\0" in raw:
        return None, "nul"
    crlf = raw.count(b"\r\n")
    if raw.count(b"\n") != crlf or raw.count(b"\r") != crlf:
        return None, "bare_newline"
    lines = raw.split(b"\r\n")[:-1]
    lines = [line[1:] if line.startswith(b".") else line for line in lines]
    if any(len(line) > dataread.MAX_LINE for line in lines):
        return None, "line_too_long"
    return b"".join(line + b"\r\n" for line in lines), None


async def read_chunked(data: bytes, cuts: list[int], max_size: int, spill: str) -> object:
    reader = asyncio.StreamReader()
    pos = 0
    for cut in sorted(set(cuts)):
        reader.feed_data(data[pos:cut])
        pos = cut
    reader.feed_data(data[pos:])
    reader.feed_eof()
    result = await dataread.read_data(reader, max_size, spill_dir=spill)
    rest = await reader.read()
    return result, rest


line = st.one_of(
    st.binary(max_size=40).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),
    st.sampled_from([b".", b"..", b".x", b"", b"\0", b"a\rb", b"a\nb", b"x" * 998, b"y" * 999]),
    st.sampled_from([b"." + b"z" * 998, b"w" * 3000]),
)


@settings(max_examples=300, deadline=None)
@given(
    lines=st.lists(line, max_size=30),
    cuts=st.lists(st.integers(min_value=0, max_value=5000), max_size=8),
    max_size=st.sampled_from([50, 2000, 10**6]),
)
def test_streamed_reader_agrees_with_the_whole_buffer_reference(
    tmp_path_factory: pytest.TempPathFactory, lines: list[bytes], cuts: list[int], max_size: int
) -> None:
    # A lone "." would end DATA: a client sends it stuffed.
    raw = b"".join((b".." if line == b"." else line) + b"\r\n" for line in lines)
    data = raw + b".\r\nQUIT\r\n"
    spill = str(tmp_path_factory.mktemp("spill"))
    result, rest = asyncio.run(read_chunked(data, cuts, max_size, spill))
    assert isinstance(result, dataread.DataResult)
    want, problem = reference(raw, max_size)
    assert rest == b"QUIT\r\n"  # pipelined commands stay for the session
    assert result.problem == problem
    if problem is None:
        assert result.content is not None
        assert result.content.read() == want
        assert result.content.size == len(want)
        result.content.discard()
    assert list(Path(spill).iterdir()) == []  # nothing left behind


def test_large_message_spills_to_a_file_and_keeps_its_header_in_memory(tmp_path: Path) -> None:
    body = b"line of text\r\n" * 200_000  # 2.8 MB, over the spill threshold
    raw = b"From: a@example.com\r\nSubject: big\r\n\r\n" + body
    result, _ = asyncio.run(read_chunked(raw + b".\r\n", [7, 300_000], 10**8, str(tmp_path)))
    assert isinstance(result, dataread.DataResult)
    content = result.content
    assert content is not None and content.memory is None and content.path is not None
    assert content.header == b"From: a@example.com\r\nSubject: big\r\n"
    assert content.read() == raw
    content.discard()
    assert list(tmp_path.iterdir()) == []


def test_long_line_detector_finds_exactly_lines_over_998() -> None:
    for n in (0, 1, 997, 998):
        assert not dataread.has_long_line(b"a\r\n" + b"x" * n + b"\r\nb\r\n")
    for n in (999, 1000, 1497, 5000):
        for prefix in (b"", b"a\r\n", b"ab" * 250 + b"\r\n"):
            assert dataread.has_long_line(prefix + b"x" * n + b"\r\n")


# ---- the daemon under attack -----------------------------------------------------


def vm_hwm(pid: int) -> int:
    """Peak resident memory of ``pid`` in bytes."""
    for row in Path(f"/proc/{pid}/status").read_text().splitlines():
        if row.startswith("VmHWM:"):
            return int(row.split()[1]) * 1024
    raise AssertionError("no VmHWM")


class NoopProbe:
    """A second session answering NOOPs while the attack runs: the worst round trip."""

    def __init__(self, port: int) -> None:
        self.client = raw_session(port, timeout=10)
        assert self.client.reply().startswith("220")
        assert self.client.cmd("EHLO probe.test").startswith("250")
        self.worst = 0.0
        self.count = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            t = time.monotonic()
            assert self.client.cmd("NOOP").startswith("250")
            self.worst = max(self.worst, time.monotonic() - t)
            self.count += 1

    def __enter__(self) -> NoopProbe:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(15)
        self.client.close()


def raw_data(port: int, message: bytes, sender: str = "a@sender.test") -> str:
    """One message over a raw socket (already CRLF and dot-safe); the final reply."""
    with raw_session(port, timeout=120) as c:
        assert c.reply().startswith("220")
        assert c.cmd("EHLO attacker.test").startswith("250")
        assert c.cmd(f"MAIL FROM:<{sender}>").startswith("250")
        assert c.cmd("RCPT TO:<bob@example.net>").startswith("250")
        assert c.cmd("DATA").startswith("354")
        c.sock.sendall(message)
        c.sock.sendall(b".\r\n")
        return c.reply()


@pytest.fixture
def exposed(tmp_path: Path) -> Relayd:
    """An inbound relay whose loopback clients are strangers, as on the Internet."""
    r = Relayd(tmp_path)
    r.extra = (
        '[relay]\ndomains = ["example.net"]\nnetworks = ["10.0.0.0/8"]\n'
        '[limits]\nmax_message_size = "26MB"\n'
    )
    r.write_config()
    return r


SIGNED_BY_STRANGER = (
    b"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; d=example.org; s=s1;\r\n"
    b" h=from:subject; bh=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=; b=AAAA\r\n"
    b"From: someone@example.org\r\n"
)


@pytest.mark.parametrize("case", ["plain", "dkim-verified", "dkim-signed"])
def test_20mb_of_two_octet_lines_costs_little_memory_and_stalls_nobody(
    exposed: Relayd, case: str
) -> None:
    """Inbound from a stranger (DKIM verified when signed), or signed on the way out."""
    r = exposed
    head = b"Subject: short lines\r\n"
    sender = "a@sender.test"
    if case == "dkim-verified":
        head = SIGNED_BY_STRANGER + head
    if case == "dkim-signed":  # from a [relay] networks client, signed with our key
        from relayd import dkim

        dkim.keygen(r.root / "example.com.key", "example.com", "s1")
        r.extra = r.extra.replace('"10.0.0.0/8"', '"127.0.0.0/8"') + (
            f'[[dkim.key]]\ndomain = "example.com"\nselector = "s1"\n'
            f'key_file = "{r.root / "example.com.key"}"\n'
        )
        r.write_config()
        head = b"From: app@example.com\r\n" + head
        sender = "app@example.com"
    with r:
        r.start()
        assert raw_data(r.port("inbound"), b"Subject: warm-up\r\n\r\nhi\r\n").startswith("250")
        assert r.proc is not None
        before = vm_hwm(r.proc.pid)
        message = head + b"\r\n" + b"ab\r\n" * (5 * MB)  # 20 MB
        with NoopProbe(r.port("inbound")) as probe:
            reply = raw_data(r.port("inbound"), message, sender=sender)
        assert reply.startswith("250 2.0.0"), reply
        rise = vm_hwm(r.proc.pid) - before
        print(f"20 MB, {case}: +{rise / MB:.0f} MB peak, NOOP worst {probe.worst:.3f}s")
        assert rise <= 100 * MB, f"peak RSS rose by {rise / MB:.0f} MB"
        assert probe.count > 0 and probe.worst <= 0.25, f"NOOP took {probe.worst:.3f}s"
        qid = reply.rsplit(" ", 1)[1]
        stored = Spool(r.spool).read_data(qid)
        assert stored.endswith(b"\r\n\r\n" + b"ab\r\n" * (5 * MB))
        if case == "dkim-verified":
            assert b"dkim=fail" in stored.split(b"\r\n\r\n", 1)[0]
        if case == "dkim-signed":
            assert stored.startswith(b"Received:") and b"\r\nDKIM-Signature: " in stored
        # The spilled DATA is gone; a state file the scheduler is writing for a
        # delivery attempt (ID.PID-N.json, renamed into state/ at once) may pass by.
        left = [p.name for p in (r.spool / "tmp").iterdir() if not p.name.endswith(".json")]
        assert left == []


def test_ten_25mb_messages_at_once_stay_within_400mb(exposed: Relayd) -> None:
    with exposed as r:
        r.start()
        assert raw_data(r.port("inbound"), b"Subject: warm-up\r\n\r\nhi\r\n").startswith("250")
        assert r.proc is not None
        before = vm_hwm(r.proc.pid)
        body = (b"x" * 76 + b"\r\n") * (25 * MB // 78 - 1)
        message = b"Subject: big\r\n\r\n" + body
        replies: list[str] = []

        def one() -> None:
            replies.append(raw_data(r.port("inbound"), message))

        threads = [threading.Thread(target=one) for _ in range(10)]
        with NoopProbe(r.port("inbound")) as probe:
            for t in threads:
                t.start()
            for t in threads:
                t.join(240)
        assert len(replies) == 10 and all(x.startswith("250 2.0.0") for x in replies), replies
        rise = vm_hwm(r.proc.pid) - before
        print(f"10 x 25 MB at once: +{rise / MB:.0f} MB peak, NOOP worst {probe.worst:.3f}s")
        assert rise <= 400 * MB, f"peak RSS rose by {rise / MB:.0f} MB"
        assert probe.worst <= 0.25, f"NOOP took {probe.worst:.3f}s"


def test_nul_in_data_is_refused_and_nothing_is_queued(exposed: Relayd) -> None:
    with exposed as r:
        r.start()
        for message in (b"Subject: x\r\n\r\na\0b\r\n", b"Subject: \0\r\n\r\nb\r\n"):
            reply = raw_data(r.port("inbound"), message)
            assert reply.startswith("554 5.6.0"), reply
        out = r.ctl("--json", "queue")
        assert json.loads(out.stdout)["messages"] == []
        assert list((r.spool / "tmp").iterdir()) == []


def test_a_client_gone_mid_data_leaves_no_file_behind(exposed: Relayd) -> None:
    with exposed as r:
        r.start()
        with raw_session(r.port("inbound")) as c:
            assert c.reply().startswith("220")
            c.cmd("EHLO attacker.test")
            c.cmd("MAIL FROM:<a@sender.test>")
            c.cmd("RCPT TO:<bob@example.net>")
            assert c.cmd("DATA").startswith("354")
            c.sock.sendall(b"Subject: cut\r\n\r\n" + b"y" * 70 + b"\r\n" * 40_000)
            c.sock.shutdown(socket.SHUT_RDWR)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and list((r.spool / "tmp").iterdir()):
            time.sleep(0.1)
        assert list((r.spool / "tmp").iterdir()) == []
        assert json.loads(r.ctl("--json", "queue").stdout)["messages"] == []


# ---- who the message says it is from ------------------------------------------------


@pytest.fixture
def submission(tmp_path: Path) -> Relayd:
    r = Relayd(tmp_path)
    r.add_user("app1", PASSWORD, "app@example.com")
    return r


def headers(from_: str, extra: str = "") -> bytes:
    return f"From: {from_}\r\n{extra}Subject: hi\r\n\r\nbody\r\n".encode()


@pytest.mark.parametrize(
    "message",
    [
        headers("The CEO <ceo@example.com>"),
        headers("app@example.com, ceo@example.com"),
        headers("app@example.com", "Sender: ceo@example.com\r\n"),
        headers("app@example.com", "From: ceo@example.com\r\n"),
        headers("=?utf-8?q?x?= <ceo@example.com>"),
        headers("undisclosed-senders:;"),
        b"FROM:\r\n ceo@example.com\r\nSubject: folded\r\n\r\nbody\r\n",
    ],
)
def test_submission_may_not_claim_a_from_it_does_not_own(
    submission: Relayd, message: bytes
) -> None:
    with submission as r:
        r.start()
        with r.smtp("submission") as s:
            s.ehlo("client.test")
            s.starttls(context=client_context())
            s.ehlo("client.test")
            s.login("app1", PASSWORD)
            assert s.mail("app@example.com")[0] == 250
            assert s.rcpt("bob@example.org")[0] == 250
            code, reply = s.data(message)
        assert (code, reply[:5]) == (550, b"5.7.1"), (code, reply)
        assert json.loads(r.ctl("--json", "queue").stdout)["messages"] == []


def test_submission_with_its_own_from_and_sender_is_accepted(submission: Relayd) -> None:
    with submission as r:
        r.start()
        message = headers("App <app@example.com>", "Sender: app@example.com\r\n")
        qid = r.submit("app1", PASSWORD, "app@example.com", ["bob@example.org"], message)
        stored = Spool(r.spool).read_data(qid)
        assert b"\r\nFrom: App <app@example.com>\r\n" in stored
        assert stored.endswith(b"\r\n\r\nbody\r\n")


def test_relay_network_clients_are_trusted_with_any_from(submission: Relayd) -> None:
    with submission as r:
        r.start()
        with r.smtp("inbound") as s:
            s.ehlo("app.local")
            send(s, "ceo@example.com", ["bob@example.org"], headers("ceo@example.com"))
