"""The machine a result was measured on: CPU, memory, and the disk as measured."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.mta import tool


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mem_total_mb() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    except (OSError, ValueError):
        pass
    return 0


def _mount_of(path: Path) -> tuple[str, str, str]:
    """(device, mount point, file system type) holding ``path``."""
    best = ("?", "/", "?")
    target = str(path.resolve())
    try:
        for line in Path("/proc/self/mounts").read_text().splitlines():
            dev, mnt, fstype, *_ = line.split()
            inside = target == mnt or target.startswith(mnt.rstrip("/") + "/")
            if inside and len(mnt) >= len(best[1]):
                best = (dev, mnt, fstype)
    except OSError:
        pass
    return best


def fsync_latency(directory: Path, rounds: int = 100) -> dict[str, float]:
    """Create, write 4 KB, fdatasync, close: per-file milliseconds (what one commit costs)."""
    directory.mkdir(parents=True, exist_ok=True)
    times = []
    for i in range(rounds):
        path = directory / f"fsync-probe-{i}"
        start = time.perf_counter()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, b"x" * 4096)
            os.fdatasync(fd)
        finally:
            os.close(fd)
        times.append((time.perf_counter() - start) * 1000)
        path.unlink()
    times.sort()
    return {
        "fdatasync_4k_median_ms": round(statistics.median(times), 3),
        "fdatasync_4k_p90_ms": round(times[int(len(times) * 0.9) - 1], 3),
    }


def write_throughput(directory: Path, megabytes: int = 64) -> float:
    """Sequential write of ``megabytes`` MB then fsync: MB/s."""
    path = directory / "write-probe"
    block = os.urandom(1 << 20)
    start = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for _ in range(megabytes):
            os.write(fd, block)
        os.fsync(fd)
    finally:
        os.close(fd)
        path.unlink()
    return round(megabytes / (time.perf_counter() - start), 1)


def _version(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=False)
        return (out.stdout or out.stderr).strip().splitlines()[-1]
    except (OSError, subprocess.TimeoutExpired, IndexError):
        return "unknown"


def relayd_revision() -> str:
    """The checkout's commit, "+changes" when relayd/ differs from it."""
    repo = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "--", "relayd"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("+changes" if dirty else "")


def describe(workdir: Path) -> dict[str, Any]:
    dev, mnt, fstype = _mount_of(workdir)
    st = os.statvfs(workdir)
    from relayd import __version__ as relayd_version

    facts: dict[str, Any] = {
        "cpus": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "memory_mb": _mem_total_mb(),
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "relayd": relayd_version,
        "relayd_revision": relayd_revision(),
        "postfix": _version([tool("postconf") or "postconf", "-d", "-h", "mail_version"]),
        "disk": {
            "device": dev,
            "mount": mnt,
            "fstype": fstype,
            "free_gb": round(st.f_bavail * st.f_frsize / 1e9, 1),
            **fsync_latency(workdir / "probe"),
            "seq_write_mb_s": write_throughput(workdir),
        },
        "loadavg_start": os.getloadavg(),
    }
    return facts
