"""Several relayd nodes sharing counters through a real redis-server (SPEC section 11).

First the shared rate limiter and AUTH guard as two nodes would use them,
then three real relayd processes on 127.0.0.11-13 with one redis-server:
a per-user limit holds in total, one address's wrong passwords spread over
the nodes meet one budget, and with Redis stopped mid-test mail keeps
flowing (each node counting alone, and saying so in its log).
"""

from __future__ import annotations

import asyncio
import shutil
import smtplib
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.certs import client_context
from support.ports import free_port
from support.redisserver import BINARY, RedisServer
from support.relayd_proc import ListenerSpec, Relayd

from relayd.cluster.auth import SharedAuthGuard
from relayd.cluster.limits import SharedRateLimiter
from relayd.cluster.store import Store
from relayd.config import AuthConfig, RateLimits
from relayd.policy.authguard import AuthGuard, Outcome
from relayd.units import Rate

pytestmark = pytest.mark.skipif(BINARY is None, reason="redis-server is not installed")

PASSWORD = "cluster-password-1"
MSG = b"From: app@app.example\r\nSubject: cluster\r\n\r\nbody\r\n"


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    with RedisServer(tmp_path / "redis") as server:
        yield server


# ---- the counters, as two nodes use them ------------------------------------------------


def test_a_rate_limit_holds_in_total_across_nodes(redis_server: RedisServer) -> None:
    limits = RateLimits(per_user=Rate(3, 3600.0, "3/hour"))

    async def run() -> None:
        nodes = [SharedRateLimiter(limits, Store(redis_server.url)) for _ in range(2)]
        now = time.time()
        assert await nodes[0].acheck(now, "127.0.0.1", "alice", None, record=False) is None
        verdicts = [await nodes[i % 2].acheck(now + i, "127.0.0.1", "alice") for i in range(5)]
        assert [v is None for v in verdicts] == [True, True, True, False, False]
        refusal = verdicts[3]
        assert refusal is not None and (refusal.code, refusal.enhanced) == (450, "4.7.1")
        assert "per user (3/hour) reached for alice" in refusal.text
        assert await nodes[1].acheck(now, "127.0.0.1", "bob") is None  # others unaffected

    asyncio.run(run())


def test_wrong_passwords_spread_over_nodes_meet_one_budget(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    guards = [
        SharedAuthGuard(
            AuthGuard.in_spool(tmp_path / f"n{i}", AuthConfig()), Store(redis_server.url)
        )
        for i in range(3)
    ]
    for i in range(3):
        (tmp_path / f"n{i}").mkdir()

    async def guess(node: int) -> Outcome:
        ticket = await guards[node].begin("127.0.0.40", "alice")
        if ticket.outcome is Outcome.CHECK:
            await guards[node].finish(ticket, False)
        return ticket.outcome

    outcomes = [asyncio.run(guess(i % 3)) for i in range(7)]
    assert outcomes == [Outcome.CHECK] * 5 + [Outcome.ADDRESS_BLOCKED] * 2
    assert asyncio.run(guards[2].blocked("127.0.0.40"))
    assert not asyncio.run(guards[2].blocked("127.0.0.41"))


def test_store_down_means_counting_locally(redis_server: RedisServer) -> None:
    limits = RateLimits(per_user=Rate(1, 3600.0, "1/hour"))

    async def run() -> None:
        node = SharedRateLimiter(limits, Store(redis_server.url))
        now = time.time()
        assert await node.acheck(now, "127.0.0.1", "alice") is None
        redis_server.stop()
        started = time.monotonic()
        # Shared count said 1 of 1; alone the node starts from its own (empty) count.
        assert await node.acheck(now + 1, "127.0.0.1", "alice") is None
        assert await node.acheck(now + 2, "127.0.0.1", "alice") is not None  # local limit
        assert time.monotonic() - started < 2  # one short timeout, then no more waiting

    asyncio.run(run())


# ---- three relayd nodes ----------------------------------------------------------------------


def node(tmp_path: Path, index: int, redis_url: str) -> Relayd:
    host = f"127.0.0.{11 + index}"
    r = Relayd(
        tmp_path / f"node{index}",
        listeners=(ListenerSpec("submission", "submission", "starttls", host=host),),
        extra=f'[cluster]\nredis = "{redis_url}"\n\n[rate_limits]\nper_user = "3/hour"\n',
    )
    r.add_user("app1", PASSWORD, "*@app.example")
    return r


def submit(r: Relayd, password: str = PASSWORD, source: str = "127.0.0.1") -> int:
    """The SMTP code the node answered: 250 queued, 450 rate limited, 535/421/454 at AUTH."""
    with smtplib.SMTP(
        r.listeners[0].host, r.port("submission"), timeout=15, source_address=(source, 0)
    ) as s:
        s.ehlo("client.test")
        context = client_context()
        context.check_hostname = False  # the certificate names 127.0.0.1, not 127.0.0.1x
        s.starttls(context=context)
        s.ehlo("client.test")
        s.user, s.password = "app1", password
        try:
            s.auth("PLAIN", s.auth_plain)  # one AUTH command, one password checked
        except smtplib.SMTPAuthenticationError as exc:
            return exc.smtp_code
        except smtplib.SMTPServerDisconnected:
            return 421
        code = s.mail("app@app.example")[0]
        if code != 250:
            return int(code)
        assert s.rcpt("bob@example.org")[0] == 250
        return int(s.data(MSG)[0])


def test_three_nodes_share_limits_and_survive_redis_going_away(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    nodes = [node(tmp_path, i, redis_server.url) for i in range(3)]
    try:
        for r in nodes:
            r.start()
        codes = [submit(nodes[i % 3]) for i in range(5)]
        assert sorted(codes) == [250, 250, 250, 450, 450], codes  # 3/hour in total
        guesses = [submit(nodes[i % 3], "wrong", source="127.0.0.50") for i in range(7)]
        assert guesses[:5] == [535] * 5, guesses
        assert set(guesses[5:]) <= {421, 454}, guesses
        # The account: 20 wrong passwords an hour from all addresses and nodes together
        # (5 spent above); then 454 without a check, except for addresses it knows.
        spread = [submit(nodes[i % 3], "wrong", f"127.0.0.{100 + i}") for i in range(17)]
        assert spread == [535] * 15 + [454] * 2, spread
        assert submit(nodes[0], source="127.0.0.99") == 454  # right password, unknown address
        # 127.0.0.1 logged in before: its login is still checked and accepted (the 450
        # comes after AUTH, at MAIL: the user's 3/hour are used up).
        assert submit(nodes[1]) == 450
        redis_server.stop()
        # Mail keeps flowing: each node now counts alone (it has 0 of its own).
        assert [submit(r) for r in nodes] == [250, 250, 250]
        for r in nodes:
            assert "unreachable" in r.wait_log("cluster store")
    finally:
        for r in nodes:
            r.__exit__(None, None, None)  # kills relayd, stops its own DNS server


HAPROXY = shutil.which("haproxy")


@pytest.mark.skipif(HAPROXY is None, reason="haproxy is not installed")
def test_haproxy_in_front_passes_the_client_address(tmp_path: Path) -> None:
    """A real HAProxy (send-proxy-v2) balancing three nodes: each sees the real client."""
    ports = [free_port(f"127.0.0.{11 + i}") for i in range(3)]
    nodes = [
        Relayd(
            tmp_path / f"node{i}",
            listeners=(
                ListenerSpec("submission", "submission", "starttls", host=f"127.0.0.{11 + i}"),
            ),
            extra=(
                f'[[listener]]\nname = "balanced"\naddress = "127.0.0.{11 + i}:{ports[i]}"\n'
                'mode = "inbound"\ntls = "none"\nproxy_protocol = true\n\n'
                '[relay]\ndomains = ["served.example"]\n\n[server]\nproxy_from = ["127.0.0.20"]\n'
            ),
        )
        for i in range(3)
    ]
    front = free_port("127.0.0.20")
    config = tmp_path / "haproxy.cfg"
    config.write_text(
        "global\n  maxconn 200\n"
        "defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n"
        f"frontend smtp\n  bind 127.0.0.20:{front}\n  default_backend nodes\n"
        "backend nodes\n  balance roundrobin\n  source 127.0.0.20\n"
        + "".join(f"  server n{i} 127.0.0.{11 + i}:{ports[i]} send-proxy-v2\n" for i in range(3))
    )
    haproxy = subprocess.Popen(
        [HAPROXY, "-f", str(config), "-db"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        for r in nodes:
            r.start()
        for i in range(3):  # round robin: one session on each node
            deadline = time.monotonic() + 10
            while True:
                try:
                    client = smtplib.SMTP(
                        "127.0.0.20", front, timeout=10, source_address=(f"127.0.0.{77 + i}", 0)
                    )
                    break
                except (OSError, smtplib.SMTPServerDisconnected):
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.1)
            with client:
                client.ehlo("client.test")
                assert client.mail("a@sender.test")[0] == 250
                assert client.rcpt("bob@served.example")[0] == 250
                assert client.data(b"Subject: x\r\n\r\nbody\r\n")[0] == 250
        seen = "".join(r.log() for r in nodes)
        for i in range(3):
            assert f"client=unknown[127.0.0.{77 + i}]" in seen
        assert "client=unknown[127.0.0.20]" not in seen
        assert all("client=unknown[127.0.0." in r.log() for r in nodes)  # all three served
    finally:
        haproxy.terminate()
        haproxy.wait(10)
        for r in nodes:
            r.__exit__(None, None, None)  # kills relayd, stops its own DNS server
