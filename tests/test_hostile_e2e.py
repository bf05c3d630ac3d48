"""SPEC section 8 from outside: relayd as a process against next hops that misbehave.

A DNS server on 127.0.0.1 serves the zone, the MX stand-ins listen on
127.0.0.2-5 (``[delivery] port`` points at them), and the misbehaving ones
are raw asyncio sessions (support.hostile). What is checked is what an
operator sees: log lines, ``relayctl``, the state file, the bounce, and
relayd's peak memory in /proc.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.dnsserver import DNSServer
from support.hostile import Hostile
from support.mxserver import MXPool
from support.relayd_proc import HOSTNAME, Relayd, send

MSG = b"From: alice@sender.test\r\nTo: bob@example.org\r\nSubject: hi\r\n\r\nHello.\r\n"
INJECTED = b"250 2.0.0 fake\r\n250 2.1.0 fake\r\n250 2.1.5 fake\r\n354 fake\r\n250 2.0.0 fake\r\n"


@pytest.fixture
def relayd(tmp_path: Path, dns_server: DNSServer, mx_pool: MXPool) -> Iterator[Relayd]:
    dns_server.add(
        "example.org MX 10 mx1.test",
        "sender.test MX 10 mx3.test",
        "mx1.test A 127.0.0.2",
        "mx3.test A 127.0.0.4",
    )
    r = Relayd(
        tmp_path / "relayd",
        dns_address=dns_server.address,
        hold_delivery=False,
        extra=(
            f'[delivery]\nport = {mx_pool.port}\nretry = ["1s"]\nconnect_timeout = "3s"\n'
            'command_timeout = "5s"\n'
        ),
    )
    with r:
        r.start()
        yield r
        assert r.stop() == 0


def inject(r: Relayd, rcpts: list[str]) -> str:
    with r.smtp("inbound") as s:
        s.ehlo("client.test")
        return send(s, "alice@sender.test", rcpts, MSG)


def queue(r: Relayd) -> dict[str, dict[str, object]]:
    out = r.ctl("--json", "queue")
    assert out.returncode == 0, out.stderr
    return {m["queue_id"]: m for m in json.loads(out.stdout)["messages"]}


def wait_attempts(r: Relayd, qid: str, n: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = queue(r).get(qid)
        assert got is not None, f"{qid} left the queue\n{r.log()[-3000:]}"
        if int(str(got["attempts"])) >= n:
            return
        time.sleep(0.3)
    raise TimeoutError(f"{qid}: fewer than {n} attempts in {timeout}s\n{r.log()[-3000:]}")


def wait_gone(r: Relayd, qid: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if qid not in queue(r):
            return
        time.sleep(0.2)
    raise TimeoutError(f"{qid} still queued\n{r.log()[-3000:]}")


def vm_hwm_kb(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"^VmHWM:\s+(\d+) kB", status, re.MULTILINE)
    assert match, status
    return int(match.group(1))


def test_injected_replies_after_starttls_are_not_taken(relayd: Relayd, mx_pool: MXPool) -> None:
    """A man in the middle appends 250s to the 220; the real server refuses everything."""
    mx = mx_pool["127.0.0.2"]
    hostile = Hostile(cert=mx.cert, inject=INJECTED)
    mx.raw_handler = hostile
    qid = inject(relayd, ["bob@example.org"])
    wait_attempts(relayd, qid, 2, 20.0)
    log = relayd.log()
    assert "status=sent" not in log and f"{qid}: removed" not in log
    assert f"{qid}: to=<bob@example.org>, relay=mx1.test[127.0.0.2]:{mx_pool.port}" in log
    assert "dsn=4.7.5, status=deferred (" in log
    why = "STARTTLS injection: unexpected data after the reply to STARTTLS"
    assert f"{why}) tls=opportunistic verified=no" in log
    assert hostile.saw("MAIL") == []
    shown = relayd.ctl("queue", "show", qid)
    assert shown.returncode == 0, shown.stderr
    assert "policy=opportunistic verified=no" in shown.stdout
    assert "deferred 4.7.5" in shown.stdout
    [entry] = json.loads(relayd.ctl("--json", "queue", "show", qid).stdout)["history"][:1]
    assert entry["tls_policy"] == "opportunistic" and entry["tls_verified"] is False


def test_megabyte_binary_replies_stay_small(relayd: Relayd, mx_pool: MXPool) -> None:
    """20 recipients, every reply 1.2 MB or 54 KB of NUL/ESC/0xff, over 24 attempts."""
    rcpts = [f"user{i}@example.org" for i in range(20)]
    huge = b"".join(b"450-\x00\x1b[31m\xff" + b"A" * 1190 + b"\r\n" for _ in range(999))
    huge += b"450 4.2.0 end\r\n"  # 1.2 MB in 1000 lines
    assert len(huge) > 1_200_000

    def reply(i: int, address: str) -> bytes:
        if hostile.sessions % 4 == 1:  # every 4th session: megabytes, refused by the reader
            return huge
        line = f"450-4.2.0 {address} ".encode() + b"\x00\x1b]0;owned\x07\xff" * 50 + b"\r\n"
        return line * 89 + b"450 4.2.0 try later\r\n"  # 90 lines, ~54 KB: within bounds

    hostile = Hostile(rcpt_reply=reply)
    mx_pool["127.0.0.2"].raw_handler = hostile
    assert relayd.proc is not None
    pid = relayd.proc.pid
    before = vm_hwm_kb(pid)
    qid = inject(relayd, rcpts)
    wait_attempts(relayd, qid, 24, 120.0)
    after = vm_hwm_kb(pid)
    state = relayd.spool / "state" / f"{qid}.json"
    size = state.stat().st_size
    doc = json.loads(state.read_text())
    numbers = sorted({a["number"] for a in doc["history"]})
    assert size < 1_000_000
    assert numbers[0] == 1 and len(numbers) == 21
    assert all(len(a["reply"]) <= 1024 for a in doc["history"])
    assert all(len(r["reply"]) <= 1024 for r in doc["recipients"])
    raw = relayd.log_path.read_bytes()
    assert not re.search(rb"[\x00-\x08\x0b-\x1f\x7f-\xff]", raw)
    lines = [x for x in raw.decode().splitlines() if f"{qid}: to=<" in x]
    print(
        f"state file {size} bytes, VmHWM {before} kB -> {after} kB, attempts kept {numbers}, "
        f"log {len(raw)} bytes, {len(lines)} delivery lines of at most {max(map(len, lines))}"
    )
    assert len(lines) >= 24 * 20 // 2
    assert max(len(x) for x in lines) < 1400
    assert any("\\x00\\x1b]0;owned\\x07\\xff" in x for x in lines)
    assert any("reply too long" in x or "malformed reply" in x for x in lines)
    assert after - before < 50 * 1024, (before, after)


def test_next_hop_greeting_with_my_hostname_bounces_once(relayd: Relayd, mx_pool: MXPool) -> None:
    me = Hostile(banner=HOSTNAME)
    mx_pool["127.0.0.2"].raw_handler = me
    qid = inject(relayd, ["bob@example.org", "carol@example.org"])
    wait_gone(relayd, qid)
    [bounce] = mx_pool["127.0.0.4"].wait_for_messages(1, 15.0)
    assert bounce.mail_from in ("", "<>") and bounce.rcpt_tos == ["alice@sender.test"]
    assert b"5.4.6" in bounce.data and b"loops back to myself" in bounce.data
    log = relayd.wait_log(f"{qid}: removed")
    bounced = [x for x in log.splitlines() if f"{qid}: to=<" in x]
    assert len(bounced) == 2
    assert all(
        "dsn=5.4.6, status=bounced (mail for example.org loops back to myself)" in x
        for x in bounced
    )
    assert me.sessions == 1 and me.saw("MAIL") == []
    assert log.count("sender non-delivery notification") == 1
    time.sleep(1.5)  # one retry interval: nothing more goes to the looping hop
    assert me.sessions == 1 and len(mx_pool["127.0.0.4"].messages) == 1
