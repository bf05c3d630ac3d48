"""A crash or a failing disk during delivery loses no recipient (SPEC section 4: at least once).

Real relayd processes, killed with SIGKILL at the worst moments of an
outbound transaction, then started again on the same spool; and a spool
whose state directory cannot be written after the next hop said 250.
A duplicate is allowed, a loss never; and relayd must not start resending
what was delivered while it keeps running.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.dnsserver import DNSServer
from support.mxserver import MXServer
from support.ports import free_port
from support.relayd_proc import Relayd, send
from support.waiting import wait_for

MSG = b"From: a@sender.test\r\nSubject: crash\r\n\r\nbody\r\n"


def queue_empty(r: Relayd) -> bool:
    return not any((r.spool / "queue").iterdir())


@pytest.fixture
def world(tmp_path: Path) -> Iterator[tuple[Relayd, MXServer, DNSServer]]:
    port = free_port("127.0.0.2")
    with DNSServer() as dns, MXServer("127.0.0.2", port) as mx:
        dns.add(
            "example.org MX 10 mx.example.org",
            "example.net MX 10 mx.example.org",
            "mx.example.org A 127.0.0.2",
        )
        r = Relayd(
            tmp_path,
            dns_address=dns.address,
            hold_delivery=False,
            extra=f'[delivery]\nport = {port}\nretry = ["1s"]\ncommand_timeout = "60s"\n',
        )
        with r:
            yield r, mx, dns
            r.kill()


def test_sigkill_while_the_next_hop_hangs_after_data(
    world: tuple[Relayd, MXServer, DNSServer],
) -> None:
    r, mx, _ = world
    mx.behaviour = "hang_at_data_end"
    r.start()
    with r.smtp("inbound") as s:
        s.ehlo("client.test")
        send(s, "a@sender.test", ["bob@example.org"], MSG)
    mx.wait_for_attempts(1)
    r.kill()  # SIGKILL: the next hop has the whole message but never answered
    mx.behaviour = "normal"
    r.start()
    [got] = mx.wait_for_messages(1, timeout=20)
    assert got.rcpt_tos == ["bob@example.org"]
    wait_for(lambda: queue_empty(r), timeout=20)


def test_sigkill_right_after_the_remote_250(world: tuple[Relayd, MXServer, DNSServer]) -> None:
    r, mx, _ = world
    delivered: list[str] = []
    killed = threading.Event()

    async def accept_then_kill(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """A next hop that says 250 to the message and, in the same instant, kills relayd."""
        writer.write(b"220 mx.test ESMTP\r\n")
        rcpts: list[str] = []
        for _ in range(1000):  # bounded
            line = await asyncio.wait_for(reader.readline(), 30)
            if not line:
                return
            verb = line[:4].upper()
            if verb == b"DATA":
                writer.write(b"354 go on\r\n")
                await writer.drain()
                while (await asyncio.wait_for(reader.readline(), 30)) not in (b".\r\n", b""):
                    pass
                writer.write(b"250 2.0.0 queued\r\n")
                await writer.drain()
                delivered.extend(rcpts)
                if not killed.is_set() and r.proc is not None:
                    killed.set()
                    os.kill(r.proc.pid, signal.SIGKILL)
                continue
            if verb == b"RCPT":
                rcpts.append(line.decode().split(":", 1)[1].strip().strip("<>"))
            if verb == b"QUIT":
                writer.write(b"221 bye\r\n")
                await writer.drain()
                return
            writer.write(b"250 ok\r\n")
            await writer.drain()

    mx.raw_handler = accept_then_kill
    r.start()
    with r.smtp("inbound") as s:
        s.ehlo("client.test")
        send(s, "a@sender.test", ["bob@example.org"], MSG)
    assert killed.wait(20)
    assert r.proc is not None
    r.proc.wait(10)
    r.proc = None
    r.start()
    wait_for(lambda: queue_empty(r), timeout=20)
    # Delivered at least once; a second delivery is allowed after a crash, a loss is not.
    assert delivered.count("bob@example.org") >= 1


def test_state_write_failing_after_250_neither_loses_nor_resends(
    world: tuple[Relayd, MXServer, DNSServer],
) -> None:
    r, mx, _ = world
    mx.reply_for("later@example.net", *["451 4.7.1 try later"] * 100)
    r.start()
    # The state directory becomes unusable (a disk gone bad): accepting still works
    # (messages go to queue/), but no delivery outcome can be stored.
    state = r.spool / "state"
    saved = r.spool / "state.saved"
    state.rename(saved)
    state.write_text("not a directory\n")
    try:
        with r.smtp("inbound") as s:
            s.ehlo("client.test")
            send(s, "a@sender.test", ["bob@example.org", "later@example.net"], MSG)
        mx.wait_for_messages(1)
        wait_for(lambda: "cannot save queue state" in r.log(), timeout=10)
        time.sleep(4)  # several retry intervals of 1 s
        # No storm: bob got his message once while relayd kept running.
        assert sum("bob@example.org" in m.rcpt_tos for m in mx.messages) == 1
        # The scheduler goes on: a new message is still delivered.
        with r.smtp("inbound") as s:
            s.ehlo("client.test")
            send(s, "a@sender.test", ["carol@example.org"], MSG)
        wait_for(lambda: any("carol@example.org" in m.rcpt_tos for m in mx.messages), timeout=20)
        assert r.proc is not None and r.proc.poll() is None
    finally:
        state.unlink()
        saved.rename(state)
    # After a restart nothing is lost: the deferred recipient is still queued.
    assert r.stop() == 0
    mx.reply_for("later@example.net", "250 2.1.5 ok")
    r.start()
    wait_for(lambda: any("later@example.net" in m.rcpt_tos for m in mx.messages), timeout=20)
    wait_for(lambda: queue_empty(r), timeout=20)
    shutil.rmtree(r.spool / "corrupt", ignore_errors=True)


def test_removal_failing_after_250_does_not_resend(
    world: tuple[Relayd, MXServer, DNSServer],
) -> None:
    r, mx, _ = world
    answer = threading.Event()
    delivered: list[str] = []

    async def slow_250(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Answers the end of data only when the test says so."""
        writer.write(b"220 mx.test ESMTP\r\n")
        for _ in range(1000):  # bounded
            line = await asyncio.wait_for(reader.readline(), 30)
            if not line:
                return
            if line[:4].upper() == b"DATA":
                writer.write(b"354 go on\r\n")
                await writer.drain()
                while (await asyncio.wait_for(reader.readline(), 30)) not in (b".\r\n", b""):
                    pass
                await asyncio.to_thread(answer.wait, 20)
                delivered.append("message")
                writer.write(b"250 2.0.0 queued\r\n")
            elif line[:4].upper() == b"QUIT":
                writer.write(b"221 bye\r\n")
                await writer.drain()
                return
            else:
                writer.write(b"250 ok\r\n")
            await writer.drain()

    mx.raw_handler = slow_250
    r.start()
    with r.smtp("inbound") as s:
        s.ehlo("client.test")
        qid = send(s, "a@sender.test", ["bob@example.org"], MSG)
    queue, saved = r.spool / "queue", r.spool / "queue.saved"
    wait_for(lambda: mx.connections >= 1, timeout=20)
    time.sleep(0.5)  # the message is being sent; its data is already read
    queue.rename(saved)
    queue.write_text("not a directory\n")
    answer.set()
    try:
        wait_for(lambda: f"{qid}: to=<bob@example.org>" in r.log(), timeout=20)
        time.sleep(3)  # several retry intervals of 1 s
        assert delivered == ["message"]  # once, however the removal went
        assert r.proc is not None and r.proc.poll() is None
    finally:
        queue.unlink()
        saved.rename(queue)
    # relayd goes on accepting and delivering.
    with r.smtp("inbound") as s:
        s.ehlo("client.test")
        send(s, "a@sender.test", ["carol@example.org"], MSG)
    wait_for(lambda: len(delivered) >= 2, timeout=20)
    assert len(delivered) == 2
