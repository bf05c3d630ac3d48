"""Processes: trees, memory and CPU from /proc, and stopping what we started.

Every process the benchmark starts runs in a session (process group) of its
own, so that stopping it stops everything it forked. The benchmark also makes
itself a child subreaper: daemons that outlive their parent (Postfix's
children when the master exits) are re-parented to us and reaped here
instead of lingering as zombies.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import resource
import signal
import subprocess
import time
from dataclasses import dataclass

_PR_SET_CHILD_SUBREAPER = 36
_TICK = os.sysconf("SC_CLK_TCK")


def become_subreaper() -> bool:
    """Orphaned descendants become our children (Linux >= 3.4); False if refused."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


def reap_orphans(keep: set[int] | None = None) -> int:
    """Reap our zombie children that no Popen object is waiting for."""
    me = os.getpid()
    reaped = 0
    for pid, ppid, state in _all_procs():
        if ppid == me and state == "Z" and pid not in (keep or set()):
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
                reaped += 1
    return reaped


def raise_nofile(wanted: int) -> int:
    """Raise the soft open-files limit towards ``wanted`` (children inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            if os.geteuid() == 0:  # root may raise the hard limit too
                with contextlib.suppress(ValueError, OSError):
                    resource.setrlimit(resource.RLIMIT_NOFILE, (target, target))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def _stat_fields(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read().decode("ascii", "replace")
    except OSError:
        return None
    # The command name may contain spaces and parentheses: split after the last ')'.
    close = raw.rfind(")")
    return [raw[: raw.find(" ")], raw[raw.find("(") + 1 : close], *raw[close + 2 :].split()]


def _all_procs() -> list[tuple[int, int, str]]:
    """(pid, ppid, state) of every process we can see."""
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        fields = _stat_fields(int(name))
        if fields is not None and len(fields) > 3:
            out.append((int(name), int(fields[3]), fields[2]))
    return out


def tree(root: int) -> list[int]:
    """``root`` and all its live (non-zombie) descendants."""
    children: dict[int, list[int]] = {}
    states: dict[int, str] = {}
    for pid, ppid, state in _all_procs():
        children.setdefault(ppid, []).append(pid)
        states[pid] = state
    if root not in states:
        return []
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        if states.get(pid) != "Z":
            found.append(pid)
        todo.extend(children.get(pid, ()))
    return found


@dataclass
class Memory:
    processes: int = 0
    rss_kb: int = 0  # sum of VmRSS: counts shared pages once per process
    pss_kb: int = 0  # sum of Pss: shared pages divided among their users

    @property
    def rss_mb(self) -> float:
        return self.rss_kb / 1024

    @property
    def pss_mb(self) -> float:
        return self.pss_kb / 1024


def _kb(path: str, key: bytes) -> int:
    try:
        with open(path, "rb") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def memory(pids: list[int]) -> Memory:
    m = Memory()
    for pid in pids:
        rss = _kb(f"/proc/{pid}/status", b"VmRSS:")
        if not rss:
            continue
        m.processes += 1
        m.rss_kb += rss
        m.pss_kb += _kb(f"/proc/{pid}/smaps_rollup", b"Pss:")
    return m


def cpu_seconds(pids: list[int], with_reaped_children_of: int | None = None) -> float:
    """User + system CPU of ``pids`` (all their threads), plus what one of them reaped.

    A Postfix master's cutime/cstime hold the CPU of its children that have
    already exited, so a short-lived process's work is not lost.
    """
    ticks = 0
    for pid in pids:
        fields = _stat_fields(pid)
        if fields is None or len(fields) < 17:
            continue
        ticks += int(fields[13]) + int(fields[14])
        if pid == with_reaped_children_of:
            ticks += int(fields[15]) + int(fields[16])
    return ticks / _TICK


def thread_cpu(pid: int) -> dict[int, tuple[float, float]]:
    """(user, system) CPU seconds of each thread of ``pid``, by thread id."""
    out = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return {}
    for name in tids:
        try:
            with open(f"/proc/{pid}/task/{name}/stat", "rb") as f:
                raw = f.read().decode("ascii", "replace")
        except OSError:
            continue
        fields = raw[raw.rfind(")") + 2 :].split()
        out[int(name)] = (int(fields[11]) / _TICK, int(fields[12]) / _TICK)
    return out


def kill_group(proc: subprocess.Popen[bytes], grace: float = 5.0) -> None:
    """SIGTERM the process group of ``proc``, then SIGKILL what is left."""
    if proc.poll() is not None:
        _kill_pgid(proc.pid, signal.SIGKILL)  # stragglers of an exited leader
        return
    _kill_pgid(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        _kill_pgid(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)


def _kill_pgid(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def kill_pids(pids: list[int], sig: int = signal.SIGKILL) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def wait_gone(pids: list[int], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        reap_orphans()
        if not any(_alive(p) for p in pids):
            return True
        time.sleep(0.05)
    return False


def _alive(pid: int) -> bool:
    fields = _stat_fields(pid)
    return fields is not None and fields[2] != "Z"
