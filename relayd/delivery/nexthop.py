"""Where a domain's mail goes: a configured route, its MX hosts, or its address.

The order is RFC 5321 section 5.1: a ``[[route]]`` for the exact domain,
else one for ``"*"``; else the MX records, lowest preference first and
shuffled among equals so load spreads the way the domain owner asked; else,
when the domain has no MX at all, the domain's own A/AAAA records (the
"implicit MX"). A null MX (RFC 7505) says the domain takes no mail, so its
recipients fail at once without a connection.

Failures are sorted by who can fix them. A domain that does not exist
(NXDOMAIN) or takes no mail fails the recipient; a DNS server that times out
or answers SERVFAIL defers it, as do MX hosts that do not resolve (their
owner may be mid-change, and ``max_age`` still ends the wait).

Addresses are listed IPv4 first: a host with AAAA records but no working
IPv6 route would otherwise spend a whole connect timeout per MX before
falling back. Answers are cached for their TTL (negative answers for the
zone's SOA minimum, as RFC 2308 says); errors are never cached.
"""

from __future__ import annotations

import asyncio
import ipaddress
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import dns.asyncresolver
import dns.exception
import dns.message
import dns.name
import dns.rdatatype
import dns.resolver

from relayd.config import Config, Route
from relayd.delivery.reply import Outcome

Resolver = dns.asyncresolver.Resolver

_MAX_NEGATIVE_TTL = 3600.0


@dataclass(frozen=True)
class Hop:
    """One next-hop host to try, with the addresses it resolved to."""

    host: str
    addresses: list[str]
    port: int
    route: Route | None
    preference: int


@dataclass(frozen=True)
class Resolution:
    """The hops for a domain, in the order to try them, or why there are none."""

    domain: str
    hops: list[Hop] = field(default_factory=list)
    failure: Outcome | None = None


class _TemporaryDNSError(Exception):
    """The lookup itself failed (timeout, SERVFAIL); the answer is unknown."""


class _NoSuchDomain(Exception):
    """NXDOMAIN: the name does not exist."""


@dataclass(frozen=True)
class _Answer:
    nxdomain: bool
    rdatas: tuple[Any, ...]


@dataclass(frozen=True)
class _Addresses:
    addresses: list[str]
    dns_error: str  # "" when the lookups themselves worked


def _literal(domain: str) -> str | None:
    """The IP address of a domain literal ``[192.0.2.1]`` / ``[IPv6:2001:db8::1]``."""
    if not (domain.startswith("[") and domain.endswith("]")):
        return None
    inner = domain[1:-1]
    if inner[:5].lower() == "ipv6:":
        inner = inner[5:]
    try:
        return str(ipaddress.ip_address(inner))
    except ValueError:
        return None


def _ip(host: str) -> str | None:
    try:
        return str(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        return None


def _negative_ttl(response: dns.message.Message | None) -> float:
    """RFC 2308: a negative answer lives min(SOA TTL, SOA minimum); 0 if unknown."""
    if response is None:
        return 0.0
    for rrset in response.authority:
        if rrset.rdtype == dns.rdatatype.SOA:
            return float(min(rrset.ttl, min(r.minimum for r in rrset), _MAX_NEGATIVE_TTL))
    return 0.0


def match_route(routes: tuple[Route, ...], domain: str) -> Route | None:
    """The route for ``domain``: an exact match beats ``"*"``, first of each wins."""
    domain = domain.lower().rstrip(".")
    exact = [r for r in routes if r.domain.lower().rstrip(".") == domain]
    if exact:
        return exact[0]
    return next((r for r in routes if r.domain == "*"), None)


def order_mx(records: list[tuple[int, str]], rng: random.Random) -> list[tuple[int, str]]:
    """Lowest preference first, shuffled within each preference."""
    shuffled = list(records)
    rng.shuffle(shuffled)
    return sorted(shuffled, key=lambda r: r[0])  # sort is stable: keeps the shuffle


class NextHops:
    """Resolves domains to next hops; one instance keeps one DNS cache."""

    def __init__(
        self,
        config: Config,
        resolver: Resolver,
        *,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._config = config
        self._resolver = resolver
        self._rng = rng or random.Random()
        self._clock = clock
        self._cache: dict[tuple[str, str], tuple[float, _Answer]] = {}

    async def resolve(self, domain: str) -> Resolution:
        domain = domain.lower().rstrip(".")
        route = match_route(self._config.routes, domain)
        if route is not None:
            return await self._via_route(domain, route)
        literal = _literal(domain)
        if literal is not None:
            hop = Hop(literal, [literal], self._config.delivery.port, None, 0)
            return Resolution(domain, [hop])
        return await self._via_dns(domain)

    async def _via_route(self, domain: str, route: Route) -> Resolution:
        host = route.via.host
        ip = _ip(host)
        if ip is not None:
            return Resolution(domain, [Hop(host, [ip], route.via.port, route, 0)])
        found = await self._addresses(host)
        if not found.addresses:
            return Resolution(domain, failure=_unresolvable([host], found.dns_error))
        return Resolution(domain, [Hop(host, found.addresses, route.via.port, route, 0)])

    async def _via_dns(self, domain: str) -> Resolution:
        try:
            answer = await self._query(domain, "MX")
        except _NoSuchDomain:
            return Resolution(domain, failure=Outcome.perm("5.1.2", f"domain {domain} not found"))
        except _TemporaryDNSError as e:
            return Resolution(domain, failure=_dns_failure(domain, "MX", str(e)))
        if not answer.rdatas:
            return await self._implicit_mx(domain)
        usable = [
            (int(r.preference), r.exchange.to_text(omit_final_dot=True).lower())
            for r in answer.rdatas
            if r.exchange != dns.name.root
        ]
        if not usable:
            text = f"domain {domain} does not accept mail (null MX)"
            return Resolution(domain, failure=Outcome.perm("5.1.10", text))
        return await self._mx_hops(domain, order_mx(usable, self._rng))

    async def _implicit_mx(self, domain: str) -> Resolution:
        found = await self._addresses(domain)
        if found.addresses:
            hop = Hop(domain, found.addresses, self._config.delivery.port, None, 0)
            return Resolution(domain, [hop])
        if found.dns_error:
            return Resolution(domain, failure=_dns_failure(domain, "A", found.dns_error))
        text = f"domain {domain} has no MX and no address records"
        return Resolution(domain, failure=Outcome.perm("5.4.4", text))

    async def _mx_hops(self, domain: str, ordered: list[tuple[int, str]]) -> Resolution:
        port = self._config.delivery.port
        found = await asyncio.gather(*(self._addresses(host) for _, host in ordered))
        hops = [
            Hop(host, f.addresses, port, None, pref)
            for (pref, host), f in zip(ordered, found, strict=True)
            if f.addresses
        ]
        if hops:
            return Resolution(domain, hops)
        error = next((f.dns_error for f in found if f.dns_error), "")
        return Resolution(domain, failure=_unresolvable([h for _, h in ordered], error))

    async def _addresses(self, host: str) -> _Addresses:
        """A and AAAA of ``host``; IPv4 first. An IP literal is its own address."""
        ip = _ip(host)
        if ip is not None:
            return _Addresses([ip], "")
        results = await asyncio.gather(
            self._query(host, "A"), self._query(host, "AAAA"), return_exceptions=True
        )
        addresses: list[str] = []
        error = ""
        for result in results:
            if isinstance(result, _Answer):
                addresses.extend(r.to_text() for r in result.rdatas)
            elif isinstance(result, _TemporaryDNSError):
                error = str(result)
            elif isinstance(result, BaseException) and not isinstance(result, _NoSuchDomain):
                raise result
        return _Addresses(addresses, "" if addresses else error)

    async def _query(self, name: str, rdtype: str) -> _Answer:
        """One lookup through the cache; raises _NoSuchDomain or _TemporaryDNSError."""
        key = (name.lower(), rdtype)
        cached = self._cache.get(key)
        now = self._clock()
        if cached is not None and cached[0] > now:
            return _raise_nx(cached[1])
        answer, ttl = await self._lookup(name, rdtype)
        if ttl > 0:
            self._cache[key] = (now + ttl, answer)
        return _raise_nx(answer)

    async def _lookup(self, name: str, rdtype: str) -> tuple[_Answer, float]:
        try:
            qname = dns.name.from_text(name)
        except dns.exception.DNSException as e:
            raise _NoSuchDomain(name) from e
        try:
            ans = await self._resolver.resolve(
                qname, rdtype, search=False, raise_on_no_answer=False
            )
        except dns.resolver.NXDOMAIN as e:
            responses = list(e.responses().values())  # type: ignore[no-untyped-call]
            return _Answer(True, ()), _negative_ttl(responses[0] if responses else None)
        except dns.exception.Timeout as e:
            raise _TemporaryDNSError("DNS lookup timed out") from e
        except dns.resolver.NoNameservers as e:
            raise _TemporaryDNSError("DNS server failure (SERVFAIL)") from e
        except dns.exception.DNSException as e:
            raise _TemporaryDNSError(f"DNS error: {e}") from e
        if ans.rrset is None:
            return _Answer(False, ()), _negative_ttl(ans.response)
        return _Answer(False, tuple(ans.rrset)), float(ans.rrset.ttl)


def _raise_nx(answer: _Answer) -> _Answer:
    if answer.nxdomain:
        raise _NoSuchDomain()
    return answer


def _dns_failure(name: str, rdtype: str, error: str) -> Outcome:
    return Outcome.temp("4.4.3", f"{error} looking up {rdtype} for {name}")


def _unresolvable(hosts: list[str], dns_error: str) -> Outcome:
    """No next-hop host resolved: deferred, since the DNS may be mid-change."""
    names = ", ".join(hosts)
    if dns_error:
        return Outcome.temp("4.4.3", f"{dns_error} looking up the address of {names}")
    return Outcome.temp("4.4.4", f"no address found for {names}")
