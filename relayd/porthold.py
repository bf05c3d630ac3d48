"""Why a listener cannot bind: who holds the port, or what permission is missing.

A busy port on a new mail server is nearly always another MTA (exim4 or
Postfix pulled in by a package) or a second relayd. The kernel does not say
who; /proc does: the LISTEN socket's inode in ``/proc/net/tcp`` and
``/proc/net/tcp6``, then the process with a descriptor on that inode under
``/proc/*/fd``. A process of another user is invisible without root (and
under the unit's ``ProtectProc=invisible``); the explanation then says how
to find it instead.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Holder", "explain", "holder", "listening_inodes"]

_LISTEN = "0A"
PROC = Path("/proc")


@dataclass(frozen=True)
class Holder:
    """A process with a listening socket on the port."""

    pid: int
    comm: str  # /proc/PID/comm, e.g. "master"
    command: str  # argv[0], e.g. "/usr/lib/postfix/sbin/master"

    def __str__(self) -> str:
        name = self.comm or "?"
        if self.command and os.path.basename(self.command) == name:
            # "/usr/lib/postfix/sbin/master" reads better as "postfix/master".
            # (a daemon kept in its package's own lib/ or libexec/ directory)
            parts = self.command.split("/")
            for i, part in enumerate(parts[:-2]):
                if part in ("lib", "libexec"):
                    name = f"{parts[i + 1]}/{name}"
                    break
        return f"{name} (pid {self.pid})"


def _decode(hexaddr: str) -> str:
    """The textual IP address of a /proc/net/tcp{,6} address field (host byte order words)."""
    raw = bytes.fromhex(hexaddr)
    words = struct.unpack(f"<{len(raw) // 4}I", raw)
    packed = struct.pack(f">{len(words)}I", *words)
    return str(ipaddress.ip_address(packed))


def _unspecified(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False


def _same_host(a: str, b: str) -> bool:
    try:
        ia, ib = ipaddress.ip_address(a), ipaddress.ip_address(b)
    except ValueError:
        return a == b
    if isinstance(ia, ipaddress.IPv6Address) and ia.ipv4_mapped is not None:
        ia = ia.ipv4_mapped
    if isinstance(ib, ipaddress.IPv6Address) and ib.ipv4_mapped is not None:
        ib = ib.ipv4_mapped
    return ia == ib


def listening_inodes(host: str, port: int, proc: Path = PROC) -> list[int]:
    """Inodes of LISTEN sockets that collide with ``host:port``, exact address first."""
    exact: list[int] = []
    overlapping: list[int] = []
    for table in ("tcp", "tcp6"):
        try:
            lines = (proc / "net" / table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 10 or fields[3] != _LISTEN:
                continue
            addr, _, hexport = fields[1].partition(":")
            try:
                if int(hexport, 16) != port:
                    continue
                bound = _decode(addr)
                inode = int(fields[9])
            except ValueError:
                continue
            if inode == 0:
                continue
            if _same_host(bound, host):
                exact.append(inode)
            elif _unspecified(bound) or _unspecified(host):
                overlapping.append(inode)
    return exact + overlapping


def _owner(inodes: list[int], proc: Path) -> Holder | None:
    wanted = {f"socket:[{inode}]": inode for inode in inodes}
    found: dict[int, Holder] = {}
    try:
        pids = [int(p.name) for p in proc.iterdir() if p.name.isdigit()]
    except OSError:
        return None
    for pid in sorted(pids):
        try:
            fds = os.listdir(proc / str(pid) / "fd")
        except OSError:
            continue  # gone, or another user's process
        for fd in fds:
            try:
                target = os.readlink(proc / str(pid) / "fd" / fd)
            except OSError:
                continue
            inode = wanted.get(target)
            if inode is not None and inode not in found:
                found[inode] = _describe(pid, proc)
        if len(found) == len(wanted):
            break
    for inode in inodes:  # the exact match first
        if inode in found:
            return found[inode]
    return None


def _describe(pid: int, proc: Path) -> Holder:
    base = proc / str(pid)
    try:
        comm = (base / "comm").read_text().strip()
    except OSError:
        comm = ""
    try:
        command = (base / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
    except OSError:
        command = ""
    return Holder(pid, comm, command)


def holder(host: str, port: int, proc: Path = PROC) -> Holder | None:
    """The process listening on ``host:port`` (or a wildcard covering it), if visible."""
    inodes = listening_inodes(host, port, proc)
    return _owner(inodes, proc) if inodes else None


def _unprivileged_port_start(proc: Path) -> int:
    try:
        return int((proc / "sys/net/ipv4/ip_unprivileged_port_start").read_text())
    except (OSError, ValueError):
        return 1024


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def explain(err: int | None, host: str, port: int, proc: Path = PROC) -> str | None:
    """What to tell the operator about a failed bind of ``host:port``; None if nothing useful."""
    where = _hostport(host, port)
    if err == errno.EADDRINUSE:
        who = holder(host, port, proc)
        if who is not None:
            return f"{where} is in use by {who}; stop it or change [[listener]] address"
        return (
            f"{where} is in use by another process (one this user cannot see; "
            f"`ss -ltnp 'sport = :{port}'` run as root names it); stop it or change "
            "[[listener]] address"
        )
    if err == errno.EACCES:
        start = _unprivileged_port_start(proc)
        if port < start:
            return (
                f"port {port} is below {start} and this process lacks CAP_NET_BIND_SERVICE: "
                "start relayd through relayd.service (it grants the capability) or the "
                f"relayd*.socket units, or listen on a port from {start} up"
            )
        return None
    if err == errno.EADDRNOTAVAIL:
        return (
            f"no network interface of this host has the address {host} "
            "(`ip -brief address` lists them); use 0.0.0.0 or [::] for all of them"
        )
    return None


def _main() -> None:  # pragma: no cover - a debugging aid: python -m relayd.porthold HOST PORT
    import sys

    host, port = sys.argv[1], int(sys.argv[2])
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError as exc:
            print(explain(exc.errno, host, port) or exc.strerror)
            return
    print(f"{_hostport(host, port)} is free")


if __name__ == "__main__":  # pragma: no cover
    _main()
