"""Pick a TCP port that is free on several loopback addresses at once.

relayd delivers to every MX host on one port (``[delivery] port``), so a pool
of stand-in MX servers on 127.0.0.2, 127.0.0.3, ... must all listen on the
same number. Port 0 lets the kernel pick for one address only; this module
picks on the first address and confirms the number is free on the others.
"""

from __future__ import annotations

import ipaddress
import random
import socket

__all__ = ["free_port"]

_ATTEMPTS = 50


def _family(host: str) -> socket.AddressFamily:
    ip = ipaddress.ip_address(host)
    if not ip.is_loopback:
        raise ValueError(f"only loopback addresses are allowed, not {host}")
    return socket.AF_INET6 if ip.version == 6 else socket.AF_INET


def _candidate() -> int:
    """A port below the kernel's ephemeral range, where outgoing connections take theirs.

    With port 0 the kernel hands out a port from the very range that every
    client socket of the test suite also draws its source port from, so a
    busy suite (or two running at once) collides now and then before the
    daemon binds. Below that range only another listener can take it.
    """
    low, _ = _ephemeral_range()
    return random.randrange(max(1024, low - 12000), low) if low > 2048 else 0


def _ephemeral_range() -> tuple[int, int]:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = f.read().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 0, 0


def free_port(*hosts: str) -> int:
    """Return a TCP port that binds on every one of ``hosts`` (default ``127.0.0.1``).

    The probe sockets are closed before returning, so another process could
    in principle take the port before the caller binds it; callers that can
    retry (``MXPool`` does) should. SO_REUSEADDR is deliberately not set on the
    probes, so a port still in TIME_WAIT counts as busy.
    """
    targets = hosts or ("127.0.0.1",)
    families = [_family(host) for host in targets]
    for _ in range(_ATTEMPTS):
        sockets: list[socket.socket] = []
        try:
            first = socket.socket(families[0], socket.SOCK_STREAM)
            sockets.append(first)
            first.bind((targets[0], _candidate()))
            port = int(first.getsockname()[1])
            for host, family in zip(targets[1:], families[1:], strict=True):
                sock = socket.socket(family, socket.SOCK_STREAM)
                sockets.append(sock)
                sock.bind((host, port))
        except OSError:
            continue
        finally:
            for sock in sockets:
                sock.close()
        return port
    raise OSError(f"no TCP port free on all of {', '.join(targets)} after {_ATTEMPTS} tries")
