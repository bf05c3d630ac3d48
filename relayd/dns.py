"""The one place relayd builds DNS resolvers.

Every lookup relayd makes (MX for delivery, SPF, DKIM keys, DMARC policies)
goes through a resolver made here, so ``[dns] nameservers`` and ``timeout``
hold everywhere, including inside pyspf and dkimpy, which would otherwise
read the system configuration on their own.

Callers must tell "the domain says nothing" from "we could not ask": the
first is a permanent answer (SPF ``none``, no DKIM key), the second must
turn into a 4xx so the sender retries. So the helpers here return an empty
result for NXDOMAIN and no data, and raise :class:`DNSTempError` for
timeouts, SERVFAIL and unreachable nameservers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import dkim
import dns.asyncresolver
import dns.exception
import dns.flags
import dns.name
import dns.nameserver
import dns.resolver

from relayd.config import DNSConfig

# Seconds one try at one nameserver may take; the whole lookup is bounded
# by [dns] timeout. A short try lets a second nameserver answer in time.
_TRY_TIMEOUT = 2.0

DKIMDNSFunc = Callable[..., bytes | None]

# Answers that mean "nothing there", including names that cannot exist
# (an empty or over-long label): asking again would not change them.
_NO_SUCH_NAME = (
    dns.resolver.NXDOMAIN,
    dns.resolver.NoAnswer,
    dns.exception.SyntaxError,
    dns.name.NameTooLong,
)


class DNSTempError(Exception):
    """A lookup failed for a reason that may go away: retry later."""


def _configure(resolver: dns.resolver.BaseResolver, cfg: DNSConfig) -> None:
    if cfg.nameservers:
        resolver.nameservers = [
            dns.nameserver.Do53Nameserver(ns.host, ns.port) for ns in cfg.nameservers
        ]
    resolver.lifetime = cfg.timeout
    resolver.timeout = min(_TRY_TIMEOUT, cfg.timeout)
    if cfg.dnssec == "trust-ad":
        trust_ad(resolver)


def trust_ad(resolver: dns.resolver.BaseResolver) -> None:
    """Ask for DNSSEC (DO and AD set), as a stub that trusts its validating resolver.

    The answers' AD bit then says whether the resolver validated them
    (RFC 6840 5.7); relayd uses it for DANE only.
    """
    resolver.use_edns(0, dns.flags.DO, 1232)
    resolver.flags = dns.flags.RD | dns.flags.AD


def _system_or_empty(cls: type[dns.resolver.BaseResolver], cfg: DNSConfig) -> Any:
    """A resolver reading the system config only when no nameservers are configured.

    A host without /etc/resolv.conf gets a resolver with no nameservers, so
    every lookup is a temporary failure instead of the daemon failing to start.
    """
    if cfg.nameservers:
        return cls(configure=False)
    try:
        return cls(configure=True)
    except dns.resolver.NoResolverConfiguration:
        return cls(configure=False)


def make_resolver(cfg: DNSConfig) -> dns.asyncresolver.Resolver:
    """An asyncio resolver honouring ``[dns]``."""
    resolver: dns.asyncresolver.Resolver = _system_or_empty(dns.asyncresolver.Resolver, cfg)
    _configure(resolver, cfg)
    return resolver


def make_sync_resolver(cfg: DNSConfig) -> dns.resolver.Resolver:
    """A blocking resolver honouring ``[dns]``, for libraries that run in threads."""
    resolver: dns.resolver.Resolver = _system_or_empty(dns.resolver.Resolver, cfg)
    _configure(resolver, cfg)
    return resolver


def _lifetime(resolver: dns.resolver.BaseResolver, timeout: float | None) -> float:
    if timeout is None:
        return float(resolver.lifetime)
    return max(0.01, min(float(resolver.lifetime), timeout))


def query(
    resolver: dns.resolver.Resolver,
    name: str,
    rdtype: str,
    timeout: float | None = None,
) -> list[Any]:
    """The rdata of ``name``/``rdtype``; [] for NXDOMAIN or no data.

    Raises DNSTempError for timeouts, SERVFAIL (all nameservers failed) and
    any other failure to get an answer. ``timeout`` can only shorten the
    resolver's lifetime, never extend it.
    """
    try:
        answer = resolver.resolve(name, rdtype, lifetime=_lifetime(resolver, timeout), search=False)
    except _NO_SUCH_NAME:
        return []
    except dns.exception.DNSException as exc:
        raise DNSTempError(f"DNS lookup of {name} {rdtype} failed: {exc}") from exc
    return list(answer)


async def query_async(
    resolver: dns.asyncresolver.Resolver,
    name: str,
    rdtype: str,
    timeout: float | None = None,
) -> list[Any]:
    """:func:`query` for asyncio code."""
    try:
        answer = await resolver.resolve(
            name, rdtype, lifetime=_lifetime(resolver, timeout), search=False
        )
    except _NO_SUCH_NAME:
        return []
    except dns.exception.DNSException as exc:
        raise DNSTempError(f"DNS lookup of {name} {rdtype} failed: {exc}") from exc
    return list(answer)


def _txt_text(rdata: Any) -> str:
    """One TXT record as text: its character-strings joined, as SPF/DKIM/DMARC want."""
    return b"".join(rdata.strings).decode("utf-8", errors="replace")


def txt_records(
    resolver: dns.resolver.Resolver, name: str, timeout: float | None = None
) -> list[str]:
    """Each TXT record of ``name`` as one string; [] when there is none.

    Raises DNSTempError when the answer could not be had.
    """
    return [_txt_text(rdata) for rdata in query(resolver, name, "TXT", timeout)]


async def txt_records_async(
    resolver: dns.asyncresolver.Resolver, name: str, timeout: float | None = None
) -> list[str]:
    """:func:`txt_records` for asyncio code."""
    return [_txt_text(rdata) for rdata in await query_async(resolver, name, "TXT", timeout)]


def dkim_dnsfunc(resolver: dns.resolver.Resolver) -> DKIMDNSFunc:
    """A ``dnsfunc`` for dkimpy that asks ``resolver``.

    dkimpy calls it with the key's name as bytes and expects the first TXT
    record (strings joined) or None. A temporary failure raises dkimpy's
    DnsTimeoutError, which dkimpy knows how to handle.
    """

    def get_txt(name: bytes, timeout: float = 5.0) -> bytes | None:
        try:
            text = name.decode("ascii")
        except UnicodeDecodeError:
            return None
        try:
            records = query(resolver, text, "TXT", timeout)
        except DNSTempError as exc:
            raise dkim.DnsTimeoutError(str(exc)) from exc
        keys = [b"".join(rdata.strings) for rdata in records]
        # Prefer a DKIM key record when a name also carries unrelated TXT.
        for key in keys:
            if key.lstrip().startswith(b"v=DKIM1"):
                return key
        return keys[0] if keys else None

    return get_txt


__all__ = [
    "DNSTempError",
    "dkim_dnsfunc",
    "make_resolver",
    "make_sync_resolver",
    "query",
    "query_async",
    "txt_records",
    "txt_records_async",
]
