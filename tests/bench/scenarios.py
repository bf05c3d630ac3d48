"""What is measured, one function per block; each starts and stops its own MTA.

- ``accept_block``: delivery held (relayd: ``relayctl delivery pause``;
  Postfix: access action ``HOLD``), so every message stays queued and
  nothing is tried. smtp-source sends 2 KB then 100 KB messages with a new
  connection per message, then 2 KB over kept sessions (``-d``); then the
  asyncio client measures the end-of-DATA latency, both habits. Also:
  memory of the fresh instance and CPU seconds per message (until the MTA
  is idle again).
- ``relay_block``: next hop an smtp-sink; the time from the first message
  sent to the sink holding all of them (new connection per message, then
  2 KB over kept sessions).
- ``idle_block``: N sessions held open after EHLO; memory of all the MTA's
  processes and how long a new client waits for its greeting.
- ``durability``: relayd is SIGKILLed halfway through a load and restarted;
  every queue id a client heard in a 250 must be in the spool (or delivered).
"""

from __future__ import annotations

import asyncio
import math
import re
import shutil
import statistics
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from support.ports import free_port

from bench import client, procs
from bench.load import Sink, smtp_source
from bench.mta import Postfix, Relayd

SMALL = 2 * 1024
LARGE = 100 * 1024
KINDS = ("relayd", "postfix")

MTA = Relayd | Postfix


@dataclass(frozen=True)
class Plan:
    """Counts from the issue; each load also has a time cap (None: no cap).

    A load stops at its count or its cap, whichever comes first; a capped
    figure is the rate over what was sent, and is marked in the table. The
    caps keep three runs of both MTAs under five minutes on a 2-core
    machine whose disk syncs in ~4 ms (see docs/performance.md).
    """

    runs: int = 3
    sessions: int = 20
    accept_small: int = 5000
    accept_large: int = 2000
    relay_small: int = 5000
    relay_large: int = 2000
    latency: int = 2000
    idle: int = 1000
    durability: int = 1500
    accept_small_cap: float | None = 6.0
    accept_large_cap: float | None = 4.0
    relay_small_cap: float | None = 6.0
    relay_large_cap: float | None = 4.0
    latency_cap: float | None = 3.0
    drain_limit: float = 5.0  # relay: waiting for the queue to empty after the load
    settle_limit: float = 2.0  # waiting for the MTA to go idle after a load (CPU/msg)
    idle_parallel: int = 100  # handshakes in progress at once while opening idle sessions
    handshake_timeout: float = 10.0
    open_limit: float = 25.0  # the whole opening of the idle sessions
    greeting_timeout: float = 5.0
    postfix_default_limit: bool = True  # also run Postfix's idle test at maxproc 100

    @classmethod
    def quick(cls) -> Plan:
        return cls(
            runs=1,
            accept_small=1000,
            accept_large=200,
            relay_small=1000,
            relay_large=200,
            latency=400,
            idle=200,
            durability=600,
            accept_small_cap=4.0,
            accept_large_cap=3.0,
            relay_small_cap=4.0,
            relay_large_cap=3.0,
            latency_cap=2.0,
            handshake_timeout=5.0,
            greeting_timeout=3.0,
            postfix_default_limit=False,
        )

    def uncapped(self) -> Plan:
        """The issue's counts to the end, however long that takes."""
        return replace(
            self,
            accept_small_cap=None,
            accept_large_cap=None,
            relay_small_cap=None,
            relay_large_cap=None,
            latency_cap=None,
            drain_limit=300.0,
            settle_limit=15.0,
        )


# [server] processes for every relayd started (--relayd-processes); None: the default.
RELAYD_PROCESSES: str | None = None


def make(
    kind: str, root: Path, next_hop: int, smtpd_maxproc: int | None = 2000, hold: bool = False
) -> MTA:
    if kind == "relayd":
        return Relayd(root, next_hop, processes=RELAYD_PROCESSES, hold=hold)
    if kind == "postfix":
        return Postfix(root, next_hop, smtpd_maxproc=smtpd_maxproc, hold=hold)
    raise ValueError(kind)


def _bound(cap: float | None, count: int, size: int) -> float:
    """The cap, or without one a generous bound (a stuck run must still end)."""
    return cap if cap is not None else 60.0 + count * (0.05 if size <= SMALL else 0.25)


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


def settle(mta: MTA, quiet: float = 0.5, limit: float = 5.0) -> float:
    """Wait until the MTA uses (almost) no CPU; its CPU seconds then."""
    deadline = time.monotonic() + limit
    last = mta.cpu()
    while time.monotonic() < deadline:
        time.sleep(quiet)
        now = mta.cpu()
        if now - last < 0.02:
            return now
        last = now
    return last


def _memory(mta: MTA) -> dict[str, Any]:
    m = procs.memory(mta.pids())
    return {"processes": m.processes, "rss_mb": round(m.rss_mb, 1), "pss_mb": round(m.pss_mb, 1)}


def _accept(
    mta: MTA,
    size: int,
    count: int,
    sessions: int,
    cap: float | None,
    settle_limit: float,
    keep: bool = False,
) -> dict[str, Any]:
    before, cpu0 = mta.queued(), mta.cpu()
    run = smtp_source(mta.port, sessions, count, size, _bound(cap, count, size), keep)
    cpu_load = mta.cpu() - cpu0
    cpu_all = settle(mta, limit=settle_limit) - cpu0  # each message's deferral included
    queued = mta.queued() - before
    return {
        "messages": count,
        "size": size,
        "sessions": sessions,
        "kept_sessions": keep,
        "capped": run.capped,
        "seconds": round(run.elapsed, 3),
        "rate": round(queued / run.elapsed, 1) if run.elapsed else 0.0,
        "queued": queued,
        "ok": run.returncode == 0 and (run.capped or queued == count),
        "smtp_source_exit": run.returncode,
        "smtp_source_output": run.output if run.returncode else "",
        "cpu_s_during_load": round(cpu_load, 2),
        "cpu_s_until_idle": round(cpu_all, 2),
        "cpu_ms_per_msg": round(cpu_all / max(queued, 1) * 1000, 3),
    }


def _latency(mta: MTA, plan: Plan, tag: str, keep: bool = False) -> dict[str, Any]:
    res = asyncio.run(
        client.send_load(
            mta.port,
            sessions=plan.sessions,
            count=plan.latency,
            size=SMALL,
            tag=tag,
            cap=plan.latency_cap,
            per_message=not keep,
        )
    )
    lat = [x * 1000 for x in res.latencies]
    return {
        "messages": plan.latency,
        "sessions": plan.sessions,
        "kept_sessions": keep,
        "size": SMALL,
        "capped": res.capped,
        "acked": len(res.acked),
        "failed": res.failed,
        "ok": not res.failed and (res.capped or len(res.acked) == plan.latency),
        "rate": round(res.rate, 1),
        "p50_ms": round(percentile(lat, 50), 2),
        "p90_ms": round(percentile(lat, 90), 2),
        "p99_ms": round(percentile(lat, 99), 2),
        "max_ms": round(max(lat), 2) if lat else math.nan,
        "mean_ms": round(statistics.fmean(lat), 2) if lat else math.nan,
    }


def accept_block(kind: str, root: Path, plan: Plan, run: int) -> dict[str, Any]:
    mta = make(kind, root, next_hop=free_port(), hold=True)
    out: dict[str, Any] = {}
    try:
        mta.start()
        time.sleep(0.5)
        out["memory_at_rest"] = _memory(mta)
        out["accept_2k"] = _accept(
            mta, SMALL, plan.accept_small, plan.sessions, plan.accept_small_cap, plan.settle_limit
        )
        out["accept_100k"] = _accept(
            mta, LARGE, plan.accept_large, plan.sessions, plan.accept_large_cap, plan.settle_limit
        )
        out["accept_2k_keep"] = _accept(
            mta, SMALL, plan.accept_small, plan.sessions, plan.accept_small_cap,
            plan.settle_limit, keep=True,
        )  # fmt: skip
        out["latency"] = _latency(mta, plan, f"lat{run}")
        out["latency_keep"] = _latency(mta, plan, f"latk{run}", keep=True)
    finally:
        mta.stop()
        shutil.rmtree(root, ignore_errors=True)
    return out


def relay_block(kind: str, root: Path, plan: Plan) -> dict[str, Any]:
    out: dict[str, Any] = {}
    sink_port = free_port()
    mta = make(kind, root, next_hop=sink_port)
    try:
        mta.start()
        for label, size, count, cap, keep in (
            ("relay_2k", SMALL, plan.relay_small, plan.relay_small_cap, False),
            ("relay_100k", LARGE, plan.relay_large, plan.relay_large_cap, False),
            ("relay_2k_keep", SMALL, plan.relay_small, plan.relay_small_cap, True),
        ):
            if count:
                sink = Sink(count, sink_port)
                out[label] = _relay(mta, sink, size, count, plan.sessions, cap, plan, keep)
    finally:
        mta.stop()
        shutil.rmtree(root, ignore_errors=True)
    return out


def _relay(
    mta: MTA,
    sink: Sink,
    size: int,
    count: int,
    sessions: int,
    cap: float | None,
    plan: Plan,
    keep: bool = False,
) -> dict[str, Any]:
    """Time from the first message sent to the last one in the sink.

    Uncapped, the sink exits by itself at ``count``. Capped, the MTA is given
    ``drain_limit`` seconds to empty its queue into the sink, and the rate is
    what the sink received over the time it took.
    """
    sink.start()
    try:
        cpu0 = mta.cpu()
        start = time.perf_counter()
        run = smtp_source(mta.port, sessions, count, size, _bound(cap, count, size), keep)
        if run.capped:
            deadline = time.monotonic() + plan.drain_limit
            while mta.queued() and time.monotonic() < deadline:
                time.sleep(0.05)
            drained = not mta.queued()
            time.sleep(0.2)  # the sink's counter is printed after each message
        else:
            drained = sink.wait(_bound(None, count, size) + plan.drain_limit)
        end = sink.last or time.perf_counter()
        cpu = settle(mta, limit=plan.settle_limit) - cpu0
        received = sink.received
    finally:
        sink.stop()
    seconds = end - start
    return {
        "messages": count,
        "size": size,
        "sessions": sessions,
        "kept_sessions": keep,
        "capped": run.capped,
        "seconds": round(seconds, 3),
        "rate": round(received / seconds, 1) if seconds > 0 else 0.0,
        "accept_seconds": round(run.elapsed, 3),
        "received": received,
        "drained": drained,
        "ok": drained and run.returncode == 0,
        "smtp_source_exit": run.returncode,
        "cpu_ms_per_msg": round(cpu / max(received, 1) * 1000, 3),
    }


def idle_block(
    kind: str,
    root: Path,
    plan: Plan,
    smtpd_maxproc: int | None = 2000,
    probes: int = 3,
    parallel: int | None = None,
    handshake_timeout: float | None = None,
    greeting_timeout: float | None = None,
) -> dict[str, Any]:
    """``plan.idle`` sessions held after EHLO, opened ``parallel`` at a time.

    (All at once, 1,000 SYNs overflow the listen queues and retransmits
    stretch the opening over many seconds for either MTA.)
    """
    mta = make(kind, root, next_hop=free_port(), smtpd_maxproc=smtpd_maxproc)
    wait_limit = greeting_timeout or plan.greeting_timeout
    try:
        mta.start()
        time.sleep(0.5)
        rest = _memory(mta)

        async def hold() -> dict[str, Any]:
            idle = await client.hold_idle(
                mta.port,
                plan.idle,
                handshake_timeout or plan.handshake_timeout,
                parallel=parallel or plan.idle_parallel,
                limit=plan.open_limit,
            )
            try:
                await asyncio.sleep(1.0)
                held = _memory(mta)
                waits = []
                for _ in range(probes):
                    waits.append(await client.time_to_greeting(mta.port, wait_limit))
            finally:
                await idle.close()
            served = [w * 1000 for w in waits if w is not None]
            return {
                "sessions_wanted": plan.idle,
                "established": idle.established,
                "connected_no_greeting": idle.waiting,
                "connect_failed": idle.failed,
                "not_attempted": idle.skipped,
                "seconds_to_open": round(idle.seconds, 2),
                "memory": held,
                "greeting_ms": [None if w is None else round(w * 1000, 2) for w in waits],
                "greeting_ms_median": round(statistics.median(served), 2) if served else None,
                "greeting_timeout_s": wait_limit,
                "new_client_served": len(served) == len(waits),
            }

        out = asyncio.run(hold())
        out["memory_at_rest"] = rest
        if out["established"]:
            grow = out["memory"]["rss_mb"] - rest["rss_mb"]
            out["rss_kb_per_session"] = round(grow * 1024 / out["established"], 1)
        out["smtpd_process_limit"] = None if kind == "relayd" else smtpd_maxproc or "default (100)"
        return out
    finally:
        mta.stop()
        shutil.rmtree(root, ignore_errors=True)


_SENT = re.compile(r"^\S+\[\d+\]: ([0-9A-Z]{16}): .*status=sent", re.M)
_SEQ = re.compile(rb"^X-Bench-Seq: (\S+)\r?$", re.M)


def durability(root: Path, plan: Plan) -> dict[str, Any]:
    """SIGKILL relayd halfway through a load, restart it, compare 250s with the spool."""
    from relayd.spool.store import Spool

    mta = Relayd(root, next_hop=free_port(), processes=RELAYD_PROCESSES)
    info: dict[str, Any] = {}
    try:
        mta.start()

        async def load() -> client.LoadResult:
            half = asyncio.Event()

            def on_ack(res: client.LoadResult) -> None:
                if len(res.acked) >= plan.durability // 2:
                    half.set()

            async def crash() -> None:
                await half.wait()
                mta.kill()
                info["killed_after_acks"] = plan.durability // 2
                start = time.perf_counter()
                await asyncio.to_thread(mta.start)
                info["restart_seconds"] = round(time.perf_counter() - start, 2)

            crasher = asyncio.create_task(crash())
            try:
                return await client.send_load(
                    mta.port,
                    sessions=plan.sessions,
                    count=plan.durability,
                    size=SMALL,
                    tag="dur",
                    resend_for=60.0,
                    on_ack=on_ack,
                )
            finally:
                await crasher

        res = asyncio.run(load())
        mta.stop()
    finally:
        mta.kill()

    spool = Spool(mta.spool)
    in_spool: dict[str, list[str]] = {}  # X-Bench-Seq -> queue ids holding it
    queue_ids = set(spool.queue_ids())
    for qid in queue_ids:
        m = _SEQ.search(spool.read_data(qid))
        if m:
            in_spool.setdefault(m.group(1).decode(), []).append(qid)
    delivered = set(_SENT.findall(mta.log_tail(chars=1 << 26)))
    lost = sorted(
        key for key, qid in res.acked.items() if qid not in queue_ids and qid not in delivered
    )
    copies = {key: len(ids) for key, ids in in_spool.items()}
    out = {
        "messages": plan.durability,
        "sessions": plan.sessions,
        **info,
        "acked": len(res.acked),
        "unanswered_then_resent": res.unanswered,
        "refused_then_resent": res.refused,
        "gave_up": res.failed,
        "in_spool": len(queue_ids),
        "delivered": len(delivered),
        "lost": len(lost),
        "lost_ids": lost[:20],
        "duplicates": sum(n - 1 for n in copies.values() if n > 1),
        "acked_id_mismatch": sum(
            1
            for key, qid in res.acked.items()
            if qid in queue_ids and qid not in in_spool.get(key, [])
        ),
        "corrupt_files": _count(mta.spool / "corrupt"),
        "tmp_files_left": _count(mta.spool / "tmp"),
        "elapsed": round(res.elapsed, 2),
    }
    shutil.rmtree(root, ignore_errors=True)
    return out


def _count(path: Path) -> int:
    try:
        return sum(1 for _ in path.iterdir())
    except FileNotFoundError:
        return 0


def as_dict(plan: Plan) -> dict[str, Any]:
    return asdict(plan)
