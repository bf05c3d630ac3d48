"""Benchmark blocks beyond SMTP accept and relay: the HTTP API, and several nodes.

- ``api_block``: messages POSTed to ``/v1/messages`` (JSON, 2 KB of text,
  a bearer token, 20 clients on kept HTTP connections), delivery paused;
  the API's accept rate and CPU per message, to set beside SMTP's.
- ``cluster_block``: a real HAProxy (``send-proxy-v2``) in front of 1, 2
  and 3 relayd nodes on 127.0.0.11-13 sharing one redis-server; SMTP with a
  new connection per message through the balancer; the rate for each node
  count. On a 2-core machine the nodes share the two cores, so this shows
  the cost of the balancer and the shared store more than scaling.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
from support.ports import free_port
from support.redisserver import RedisServer

from bench import client, mta
from bench.scenarios import settle
from relayd import users

FRONT = "127.0.0.20"  # the balancer's source address towards the nodes (proxy_from)


class ApiRelayd(mta.Relayd):
    """The benchmark's relayd with ``[api]`` on and one user with a token."""

    def __init__(self, root: Path, next_hop: int, **kw: Any) -> None:
        super().__init__(root, next_hop, **kw)
        self.api_port = free_port(mta.LOOPBACK)
        self.token = ""

    def config_text(self) -> str:
        return super().config_text() + f'\n[api]\naddress = "{mta.LOOPBACK}:{self.api_port}"\n'

    def start(self, timeout: float = 30.0) -> None:
        path = self.root / "users"
        users.cmd_user_add(path, "bench", "bench-password-123", ["*@bench.test"])
        self.token = users.cmd_user_token(path, "bench")[1]  # type: ignore[index]
        super().start(timeout)


async def _post_load(port: int, token: str, count: int, clients: int) -> tuple[int, float]:
    body = {
        "from": "app@bench.test",
        "to": ["rcpt@sink.test"],
        "subject": "bench",
        "text": ("x" * 70 + "\n") * 28,  # about 2 KB
    }
    done = 0
    todo = list(range(count))
    headers = {"Authorization": f"Bearer {token}"}
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=30, limits=limits, headers=headers) as http:

        async def worker() -> None:
            nonlocal done
            while todo:
                todo.pop()
                answer = await http.post(f"http://{mta.LOOPBACK}:{port}/v1/messages", json=body)
                if answer.status_code == 202:
                    done += 1

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        return done, time.perf_counter() - start


def api_block(root: Path, count: int, clients: int = 20) -> dict[str, Any]:
    relayd = ApiRelayd(root / "api", free_port(mta.LOOPBACK), hold=True)
    relayd.start()
    try:
        cpu0 = relayd.cpu()
        accepted, elapsed = asyncio.run(_post_load(relayd.api_port, relayd.token, count, clients))
        cpu = settle(relayd) - cpu0
    finally:
        relayd.stop()
    return {
        "messages": count,
        "clients": clients,
        "accepted": accepted,
        "seconds": round(elapsed, 3),
        "rate": round(accepted / elapsed, 1) if elapsed else 0.0,
        "cpu_ms_per_msg": round(cpu / max(accepted, 1) * 1000, 3),
    }


class Node(mta.Relayd):
    """A relayd node behind the balancer: PROXY protocol, counters in Redis."""

    def __init__(self, root: Path, next_hop: int, host: str, redis_url: str, **kw: Any) -> None:
        super().__init__(root, next_hop, **kw)
        self.host = host
        self.redis_url = redis_url
        self.proxy_port = free_port(host)

    def config_text(self) -> str:
        return super().config_text() + (
            f'\n[[listener]]\nname = "balanced"\naddress = "{self.host}:{self.proxy_port}"\n'
            'mode = "inbound"\ntls = "none"\nproxy_protocol = true\n'
            f'\n[server]\nproxy_from = ["{FRONT}"]\n'
            f'\n[cluster]\nredis = "{self.redis_url}"\n'
            '\n[rate_limits]\nper_ip = "1000000/hour"\n'
        )


def _haproxy(config: Path, nodes: list[Node], front: int) -> subprocess.Popen[bytes]:
    config.write_text(
        "global\n  maxconn 4000\n"
        "defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n"
        f"frontend smtp\n  bind {mta.LOOPBACK}:{front}\n  default_backend nodes\n"
        f"backend nodes\n  balance roundrobin\n  source {FRONT}\n"
        + "".join(
            f"  server n{i} {n.host}:{n.proxy_port} send-proxy-v2\n" for i, n in enumerate(nodes)
        )
    )
    binary = shutil.which("haproxy")
    assert binary is not None
    proc = subprocess.Popen(
        [binary, "-f", str(config), "-db"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((mta.LOOPBACK, front), timeout=1) as s:
                s.settimeout(5)
                if s.recv(4).startswith(b"220"):
                    return proc
        except OSError:
            time.sleep(0.1)
    proc.terminate()
    raise RuntimeError("haproxy did not come up")


def cluster_block(root: Path, count: int, sessions: int = 20) -> dict[str, Any]:
    if shutil.which("haproxy") is None or shutil.which("redis-server") is None:
        return {"error": "haproxy or redis-server is not installed"}
    results: dict[str, Any] = {}
    with RedisServer(root / "redis") as redis:
        for size in (1, 2, 3):
            nodes = [
                Node(root / f"n{size}-{i}", free_port(mta.LOOPBACK), f"127.0.0.{11 + i}",
                     redis.url, hold=True)
                for i in range(size)
            ]  # fmt: skip
            front = free_port(mta.LOOPBACK)
            proc = None
            try:
                for n in nodes:
                    n.start()
                proc = _haproxy(root / f"haproxy-{size}.cfg", nodes, front)
                cpu0 = sum(n.cpu() for n in nodes)
                load = asyncio.run(
                    client.send_load(
                        front, sessions=sessions, count=count, size=2048,
                        tag=f"cluster{size}", per_message=True, cap=60.0,
                    )
                )  # fmt: skip
                cpu = sum(n.cpu() for n in nodes) - cpu0
                results[f"{size}_nodes"] = {
                    "accepted": len(load.acked),
                    "seconds": round(load.elapsed, 3),
                    "rate": round(load.rate, 1),
                    "cpu_ms_per_msg": round(cpu / max(len(load.acked), 1) * 1000, 3),
                    "refused": load.refused,
                    "failed": load.failed,
                }
            finally:
                if proc is not None:
                    proc.terminate()
                    proc.wait(10)
                for n in nodes:
                    n.stop()
    return results
