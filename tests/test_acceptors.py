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
from support.relayd_proc import Relayd, raw_session, send
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


# ---- limits are relayd's, not one process's ----------------------------------------


def served_pids(log: str) -> list[int]:
    """The pid of the process that served each EHLO-and-QUIT session ended in ``log``."""
    return [
        int(pid)
        for pid in re.findall(r"relayd/smtpd\[(\d+)\]: disconnect from \S+ ehlo=1 quit=1 ", log)
    ]


def test_connection_and_rate_limits_hold_across_processes(tmp_path: Path) -> None:
    """Connections from one client land on several processes; its limits still hold exactly."""
    r = Relayd(
        tmp_path,
        extra=(
            "[server]\nprocesses = 3\n\n[limits]\nmax_connections_per_ip = 3\n\n"
            '[rate_limits]\nper_ip = "6/hour"\n'
        ),
    )
    with r:
        r.start()
        assert r.proc is not None
        wait_for(lambda: len(acceptor_pids(r.proc.pid)) == 2)  # type: ignore[union-attr]
        spread = False
        for _ in range(20):  # bounded: until three held connections spanned processes
            seen = len(r.log())
            held = [r.smtp("inbound") for _ in range(3)]
            try:
                for s in held:
                    assert s.ehlo("client.test")[0] == 250
                with raw_session(r.port("inbound")) as fourth:
                    assert fourth.reply().startswith("421 4.7.0 too many connections from ")
            finally:
                for s in held:
                    s.quit()
            wait_for(lambda seen=seen: len(served_pids(r.log()[seen:])) == 3)
            spread = len(set(served_pids(r.log()[seen:]))) > 1
            if spread:
                break
        assert spread, "the three connections never spanned two processes"
        sent, refused = 0, None
        for i in range(7):
            with r.smtp("inbound") as s:
                s.ehlo("client.test")
                code, text = s.mail("alice@sender.test")
                if code != 250:
                    refused = (code, text.decode())
                    break
                assert s.rcpt(f"r{i}@example.org")[0] == 250
                assert s.data(MSG)[0] == 250
                sent += 1
        assert sent == 6
        assert refused is not None and refused[0] == 450
        assert refused[1].startswith("4.7.1 rate limit per ip (6/hour) reached for 127.0.0.1")
        assert r.stop() == 0


# ---- processes = "auto": acceptors come with load ------------------------------------


def test_on_demand_decisions() -> None:
    from relayd.acceptor import wants_acceptor, wants_to_leave

    assert not wants_acceptor([1.2, 1.1], running=0, limit=1, sessions=20)  # a blip
    assert wants_acceptor([0.1, 0.9, 1.3, 0.8], running=0, limit=1, sessions=20)
    assert not wants_acceptor([0.9, 0.9, 0.5], running=0, limit=1, sessions=20)
    busy = [1.0, 1.0, 1.0]
    assert not wants_acceptor(busy, running=1, limit=1, sessions=20)  # every core has one
    assert not wants_acceptor(busy, running=0, limit=1, sessions=0)  # busy delivering
    quiet = [0.01] * 12
    assert wants_to_leave(quiet, sessions=0)
    assert not wants_to_leave(quiet, sessions=1)  # never with a client connected
    assert not wants_to_leave(quiet[:-1], sessions=0)  # a whole minute first
    assert not wants_to_leave([*quiet[:-1], 0.2], sessions=0)


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="auto starts acceptors on multi-core hosts")
def test_auto_starts_an_acceptor_when_the_daemon_is_busy(tmp_path: Path) -> None:
    """Default config: the daemon alone at rest, an acceptor once a load keeps it busy."""
    import threading
    import time

    r = Relayd(tmp_path)
    with r:
        r.start()
        assert r.proc is not None
        daemon = r.proc.pid
        time.sleep(1.5)
        assert acceptor_pids(daemon) == []
        done = threading.Event()

        def load() -> None:
            while not done.is_set():
                with r.smtp("inbound") as s:
                    s.ehlo("client.test")
                    send(s, "alice@sender.test", ["load@example.org"], MSG)

        clients = [threading.Thread(target=load, daemon=True) for _ in range(8)]
        for client in clients:
            client.start()
        try:
            wait_for(lambda: acceptor_pids(daemon) != [], timeout=30)
        finally:
            done.set()
            for client in clients:
                client.join(timeout=15)
        pid = acceptor_pids(daemon)[0]
        wait_for(lambda: f"busy: started acceptor process {pid} on demand" in r.log())
        wait_for(lambda: f"acceptor process {pid} ready" in r.log())
        with r.smtp("inbound") as s:  # and everything still works
            s.ehlo("client.test")
            send(s, "alice@sender.test", ["after@example.org"], MSG)
        assert r.stop() == 0


def test_acceptors_run_the_daemons_config_not_an_edited_file(
    world: tuple[Relayd, MXServer],
) -> None:
    """An edit without a reload must not reach a process started after it."""
    r, _ = world
    assert r.proc is not None
    daemon = r.proc.pid
    text = r.config_text()
    assert 'hostname = "' in text
    edited = re.sub(r'hostname = "[^"]*"', 'hostname = "edited.example"', text, count=1)
    r.config_path.write_text(edited)
    victims = acceptor_pids(daemon)
    for victim in victims:  # the replacements start after the edit
        os.kill(victim, signal.SIGKILL)
    wait_for(
        lambda: len(acceptor_pids(daemon)) == 2 and not set(victims) & set(acceptor_pids(daemon))
    )
    wait_for(lambda: all(f"acceptor process {p} ready" in r.log() for p in acceptor_pids(daemon)))
    for _ in range(30):
        with r.smtp("inbound") as s:
            assert b"edited.example" not in s.ehlo("client.test")[1]
