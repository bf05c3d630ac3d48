"""Where relayd's CPU goes under the accept load (``--profile``; needs py-spy).

py-spy samples the running daemon from outside (no change to relayd), in
collapsed-stack form; the summary groups samples by function and by area
(SMTP conversation, DATA reading, spool, scheduler, logging, ...) and turns
the shares into CPU milliseconds per message with the CPU time /proc reports.
"""

from __future__ import annotations

import collections
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from support.ports import free_port

from bench import procs
from bench.mta import Relayd
from bench.scenarios import SMALL, Plan, _accept

# First match wins, tested against each frame from the innermost outwards.
AREAS = (
    (
        "spool: file write + fsync",
        r"relayd/spool/(store\.py.*(_write_file|_write_all)|groupcommit\.py.*sync_dir)",
    ),
    ("spool: group commit", r"relayd/spool/(store|groupcommit)\.py"),
    ("DATA reader (check, unstuff)", r"relayd/smtpd/dataread\.py"),
    ("logging", r"relayd/log\.py|/logging/"),
    ("scheduler", r"relayd/scheduler\.py"),
    ("delivery attempt", r"relayd/delivery/"),
    ("envelope JSON", r"relayd/spool/model\.py|/json/"),
    ("queue id", r"relayd/spool/queueid\.py"),
    ("headers", r"relayd/smtpd/headers\.py"),
    ("address parsing", r"relayd/address\.py"),
    ("session policy (relayd)", r"relayd/smtpd/session\.py|relayd/policy/"),
    ("aiosmtpd command loop", r"aiosmtpd/"),
    ("asyncio streams", r"asyncio/streams\.py"),
    ("asyncio event loop + transports", r"asyncio/|selectors\.py"),
    ("thread pool", r"concurrent/futures|threading\.py"),
)
_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def _frames(stack: str) -> list[tuple[str, str]]:
    out = []
    for part in stack.split(";"):
        m = _FRAME.match(part.strip())
        if m:
            out.append((m.group("func"), m.group("file")))
        else:
            out.append((part.strip(), ""))
    return out


def summarize(raw: str, messages: int, cpu_seconds: float, top: int = 25) -> dict[str, Any]:
    """Shares of the samples by thread, area, function; ``cpu_seconds`` turns them into ms."""
    self_time: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    areas: collections.Counter[str] = collections.Counter()
    threads: collections.Counter[str] = collections.Counter()
    total = 0
    compiled = [(name, re.compile(rx)) for name, rx in AREAS]
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = _frames(stack)
        if frames and frames[0][1] == "":
            threads[frames[0][0]] += count
        code = [f for f in frames if f[1]]
        if not code:
            continue
        func, file = code[-1]
        self_time[f"{func} ({_short(file)})"] += count
        for name in {f"{fn} ({_short(fl)})" for fn, fl in code}:
            inclusive[name] += count
        areas[_area(code, compiled)] += count
    per_msg = cpu_seconds * 1000 / messages if messages else 0.0

    def table(counter: collections.Counter[str], n: int) -> list[dict[str, Any]]:
        return [
            {
                "name": name,
                "share": round(c / total, 4),
                "ms_per_msg": round(per_msg * c / total, 4),
            }
            for name, c in counter.most_common(n)
        ]

    return {
        "samples": total,
        "messages": messages,
        "sampled_cpu_seconds": round(cpu_seconds, 3),
        "sampled_cpu_ms_per_msg": round(per_msg, 4),
        "threads": table(threads, 10),
        "areas": table(areas, len(AREAS) + 1),
        "self": table(self_time, top),
        "inclusive": table(inclusive, top),
    }


def _short(file: str) -> str:
    for marker in ("site-packages/", "relayd/", "lib/python3"):
        i = file.rfind(marker)
        if i >= 0:
            return file[i:] if marker == "relayd/" else file[i + len(marker) :].lstrip("/")
    return file


def _area(code: list[tuple[str, str]], compiled: list[tuple[str, re.Pattern[str]]]) -> str:
    for func, file in reversed(code):
        key = f"{file} {func}"
        for name, rx in compiled:
            if rx.search(key):
                return name
    return "other"


def py_spy() -> str | None:
    found = shutil.which("py-spy")
    if found:
        return found
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else None


def profile_accept(
    root: Path, plan: Plan, out_dir: Path, size: int = SMALL, rate: int = 200
) -> dict[str, Any]:
    """relayd under the accept load: CPU per thread from /proc, Python CPU from py-spy.

    py-spy runs with ``--gil``: only the thread holding the GIL is sampled,
    so threads waiting in a queue or in fdatasync (which py-spy would
    otherwise count as busy) are left out and the samples are Python's own
    CPU. The shares are turned into milliseconds with the user CPU time
    /proc reports. The raw collapsed stacks are kept beside the JSON.
    """
    count = plan.accept_small if size <= SMALL else plan.accept_large
    spy = py_spy()
    if spy is None:
        return {"error": "py-spy not found (pip install py-spy)"}
    out_dir.mkdir(parents=True, exist_ok=True)
    raw_path = out_dir / f"relayd-accept-{size // 1024}k-profile.txt"
    # One process, so that every message's work is in the one sampled pid
    # (with acceptors each process does the same work for its share).
    mta = Relayd(root, next_hop=free_port(), hold=True, processes="1")
    sampler: subprocess.Popen[bytes] | None = None
    try:
        mta.start()
        assert mta.proc is not None
        pid = mta.proc.pid
        sampler = subprocess.Popen(
            [spy, "record", "--pid", str(pid), "--rate", str(rate), "--format", "raw",
             "--output", str(raw_path), "--gil", "--nonblocking"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )  # fmt: skip
        time.sleep(1.0)
        if sampler.poll() is not None:
            err = sampler.stderr.read().decode(errors="replace") if sampler.stderr else ""
            return {"error": f"py-spy exited: {err.strip()[-300:]}"}
        before = procs.thread_cpu(pid)
        accept = _accept(mta, size, count, plan.sessions, None, plan.settle_limit)
        after = procs.thread_cpu(pid)
        sampler.send_signal(signal.SIGINT)
        try:
            sampler.wait(60)
        except subprocess.TimeoutExpired:
            procs.kill_group(sampler, grace=1)
        threads = _thread_split(pid, before, after, count)
        raw = raw_path.read_text(errors="replace") if raw_path.exists() else ""
        user_s = sum(v["user_ms_per_msg"] for v in threads.values()) * count / 1000
        summary = summarize(raw, count, user_s)
        summary["cpu_by_thread"] = threads
        summary["accept"] = accept
        summary["raw_file"] = raw_path.name
        return summary
    finally:
        if sampler is not None and sampler.poll() is None:
            procs.kill_group(sampler, grace=1)
        mta.stop()
        shutil.rmtree(root, ignore_errors=True)


def _thread_split(
    pid: int,
    before: dict[int, tuple[float, float]],
    after: dict[int, tuple[float, float]],
    messages: int,
) -> dict[str, dict[str, float]]:
    """User and system CPU per message: the event loop thread, and all the others."""
    split: dict[str, list[float]] = {"event loop": [0.0, 0.0], "worker threads": [0.0, 0.0]}
    for tid, (user, system) in after.items():
        u0, s0 = before.get(tid, (0.0, 0.0))
        key = "event loop" if tid == pid else "worker threads"
        split[key][0] += user - u0
        split[key][1] += system - s0
    return {
        k: {
            "user_ms_per_msg": round(u * 1000 / messages, 3),
            "system_ms_per_msg": round(s * 1000 / messages, 3),
        }
        for k, (u, s) in split.items()
    }
