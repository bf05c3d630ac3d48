"""Who may send mail where: the rule that keeps relayd from being an open relay.

A recipient is accepted when the client may relay (it authenticated, or
its address is in ``[relay] networks``) or when the recipient's domain is
one relayd serves (``[relay] domains``) on an inbound listener. Anything
else is ``554 5.7.1 Relay access denied``. Sender-specified routing in the
local part (``bob%evil@ours``) is refused to clients that may not relay,
since the next server might honour it and relay on our behalf.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterable

from relayd.address import Address
from relayd.config import IPNetwork
from relayd.policy.verdict import Refuse, Verdict

RELAY_DENIED = Refuse(554, "5.7.1", "Relay access denied")


def in_networks(ip: str, networks: Iterable[IPNetwork]) -> bool:
    """True when ``ip`` (IPv4, IPv6 or IPv4-mapped IPv6) is inside one of ``networks``."""
    addr = _address(ip)
    if addr is None:
        return False
    return any(addr.version == net.version and addr in net for net in networks)


@functools.lru_cache(maxsize=4096)
def _address(ip: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The parsed address (a mapped IPv4 as IPv4); cached: a session asks several times."""
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def may_relay(authenticated: bool, client_ip: str, networks: Iterable[IPNetwork]) -> bool:
    return authenticated or in_networks(client_ip, networks)


def serves_domain(domain: str, domains: Iterable[str]) -> bool:
    domain = domain.lower().rstrip(".")
    return any(domain == d for d in domains)


def recipient_verdict(
    rcpt: Address,
    *,
    relay_allowed: bool,
    inbound: bool,
    domains: Iterable[str],
) -> Verdict:
    """Accept ``rcpt`` or refuse it with 554 5.7.1 (SPEC §3)."""
    if relay_allowed:
        return None
    if not inbound or rcpt.literal:
        return RELAY_DENIED
    if not serves_domain(rcpt.domain, domains):
        return RELAY_DENIED
    if rcpt.has_routing:
        return RELAY_DENIED
    return None
