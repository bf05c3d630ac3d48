"""``[server] processes``: extra accepting processes feeding the one queue manager.

Real processes throughout: the daemon starts acceptors with the listening
sockets, each commits what it accepts and announces it to the daemon,
which delivers it. An acceptor that dies is replaced, a reload replaces
them, and SIGTERM stops them all.
"""

from __future__ import annotations

import os
import re
import signal
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.dnsserver import DNSServer
from support.mxserver import MXServer
from support.ports import free_port
from support.relayd_proc import Relayd, send
from support.waiting import wait_for

MSG = b"From: alice@sender.test\r\nSubject: acceptors\r\n\r\nbody\r\n"


def acceptor_pids(daemon_pid: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == daemon_pid and b"relayd.acceptor" in cmdline:
            pids.append(int(entry.name))
    return sorted(pids)


@pytest.fixture
def world(tmp_path: Path) -> Iterator[tuple[Relayd, MXServer]]:
    port = free_port("127.0.0.2")
    with DNSServer() as dns, MXServer("127.0.0.2", port) as mx:
        dns.add("example.org MX 10 mx.example.org", "mx.example.org A 127.0.0.2")
        r = Relayd(
            tmp_path,
            dns_address=dns.address,
            hold_delivery=False,
            extra=(
                f"[delivery]\nport = {port}\n\n[server]\nprocesses = 3\n\n"
                f'[metrics]\naddress = "127.0.0.1:{free_port()}"\n'
            ),
        )
        with r:
            r.start()
            assert r.proc is not None
            wait_for(lambda: len(acceptor_pids(r.proc.pid)) == 2)  # type: ignore[union-attr]
            yield r, mx
            assert r.stop() == 0


def served_by(r: Relayd, qid: str) -> int:
    match = re.search(rf"relayd/smtpd\[(\d+)\]: {qid}: client=", r.log())
    assert match, qid
    return int(match.group(1))


def test_acceptors_share_the_work_and_everything_is_delivered(
    world: tuple[Relayd, MXServer],
) -> None:
    r, mx = world
    assert r.proc is not None
    acceptors = set(acceptor_pids(r.proc.pid))
    ids: list[str] = []
    for i in range(200):  # bounded: until an acceptor (not the daemon) took one
        with r.smtp("inbound") as s:
            s.ehlo("client.test")
            ids.append(send(s, "alice@sender.test", [f"u{i}@example.org"], MSG))
        if len(ids) >= 10 and {served_by(r, q) for q in ids} & acceptors:
            break
    assert {served_by(r, q) for q in ids} & acceptors, "no session reached an acceptor"
    got = mx.wait_for_messages(len(ids), timeout=30)
    assert sorted(m.rcpt_tos[0] for m in got) == sorted(
        f"u{i}@example.org" for i in range(len(ids))
    )


def test_relayd_is_ready_only_once_every_acceptor_listens(
    world: tuple[Relayd, MXServer],
) -> None:
    r, _ = world
    wait_for(lambda: "daemon started" in r.log())  # logged right after READY=1
    log = r.log()
    started = log.index("daemon started")
    ready = [int(pid) for pid in re.findall(r"acceptor process (\d+) ready", log[:started])]
    assert r.proc is not None
    assert sorted(ready) == acceptor_pids(r.proc.pid)


def test_a_dead_acceptor_is_replaced(world: tuple[Relayd, MXServer]) -> None:
    r, mx = world
    assert r.proc is not None
    daemon = r.proc.pid
    victim = acceptor_pids(daemon)[0]
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: victim not in acceptor_pids(daemon) and len(acceptor_pids(daemon)) == 2)
    with r.smtp("inbound") as s:
        s.ehlo("client.test")
        send(s, "alice@sender.test", ["after@example.org"], MSG)
    [got] = mx.wait_for_messages(1)
    assert got.rcpt_tos == ["after@example.org"]
    assert "exited with status" in r.log()


def test_reload_replaces_acceptors_and_stop_ends_them(world: tuple[Relayd, MXServer]) -> None:
    r, _ = world
    assert r.proc is not None
    daemon = r.proc.pid
    before = set(acceptor_pids(daemon))
    assert r.ctl("reload").returncode == 0
    wait_for(lambda: len(acceptor_pids(daemon)) == 2 and before.isdisjoint(acceptor_pids(daemon)))
    survivors = acceptor_pids(daemon)
    assert r.stop() == 0
    for pid in survivors:
        assert (
            not Path(f"/proc/{pid}").exists()
            or b"relayd" not in Path(f"/proc/{pid}/cmdline").read_bytes()
        )


def accepted_and_denied(r: Relayd) -> tuple[float, float]:
    """relayd_messages_accepted_total and relayd_messages_rejected_total, all labels, as served."""
    address = re.search(r'\[metrics\]\naddress = "([^"]+)"', r.config_text())
    assert address
    with urllib.request.urlopen(f"http://{address.group(1)}/metrics", timeout=5) as response:
        text = response.read().decode()
    accepted = sum(
        float(m) for m in re.findall(r"^relayd_messages_accepted_total\{.*\} (\S+)$", text, re.M)
    )
    refused = sum(
        float(m) for m in re.findall(r"^relayd_messages_rejected_total\{.*\} (\S+)$", text, re.M)
    )
    return accepted, refused


def test_metrics_count_the_sessions_of_every_process(world: tuple[Relayd, MXServer]) -> None:
    r, _ = world
    assert r.proc is not None
    acceptors = set(acceptor_pids(r.proc.pid))
    ids: list[str] = []
    for i in range(200):  # bounded: until an acceptor (not the daemon) took some
        with r.smtp("inbound") as s:
            s.ehlo("client.test")
            ids.append(send(s, "alice@sender.test", [f"m{i}@example.org"], MSG))
            assert s.mail("alice@sender.test")[0] == 250
            assert s.rcpt("not an address")[0] == 501  # one refused command
        if len(ids) >= 12 and len({served_by(r, q) for q in ids} & acceptors) == 2:
            break
    assert len({served_by(r, q) for q in ids} & acceptors) == 2, "both acceptors must serve"
    wait_for(lambda: accepted_and_denied(r) == (len(ids), len(ids)), timeout=10)
    # A replaced acceptor's counts stay: counters never go down.
    victim = acceptor_pids(r.proc.pid)[0]
    os.kill(victim, signal.SIGTERM)
    wait_for(
        lambda: len(acceptor_pids(r.proc.pid)) == 2 and victim not in acceptor_pids(r.proc.pid)
    )  # type: ignore[union-attr]
    assert accepted_and_denied(r) == (len(ids), len(ids))
