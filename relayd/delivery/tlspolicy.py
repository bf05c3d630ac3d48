"""Which TLS a hop gets: DANE, then MTA-STS, then ``[delivery] tls`` (SPEC section 8).

A destination domain's security comes from DNS, not from the next hop:
DNSSEC-signed TLSA records (DANE, RFC 7672) or a policy fetched over
verified HTTPS (MTA-STS, RFC 8461). Either one turns "STARTTLS if offered,
any certificate" into "verified TLS or the mail waits", which is what
defeats a man in the middle who strips STARTTLS or answers with his own
certificate. DANE beats MTA-STS when both exist (RFC 8461 section 2).

``DomainSecurity`` is looked up once per domain and delivery attempt; the
per-hop decision, ``hop_policy``, is a plain function of plain data.
Routes (``[[route]]``) are the operator's own choice and keep their settings.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import dns.exception

from relayd.config import Config
from relayd.delivery import dane
from relayd.delivery.client import TLSPolicy
from relayd.delivery.mta_sts import MTASTS, Policy, PolicyStore
from relayd.delivery.nexthop import Hop, Resolver
from relayd.delivery.reply import Outcome


@dataclass(frozen=True)
class DomainSecurity:
    """What DNS and MTA-STS say about one destination domain."""

    domain: str
    sts: Policy | None = None
    sts_note: str = ""
    dane: Mapping[str, dane.TLSALookup] = field(default_factory=dict)  # by MX host, lower case

    def key(self) -> tuple[object, ...]:
        """For grouping domains that share hops: same hops and same security."""
        return (self.sts, tuple(sorted((h, v.records, v.error) for h, v in self.dane.items())))


def hop_policy(
    base: TLSPolicy, security: DomainSecurity, hop: Hop, ca_file: Path | None
) -> TLSPolicy | Outcome:
    """The policy for one MX hop, or why that hop may not be used (a 4.7.5 deferral)."""
    if hop.route is not None:
        return base
    host = hop.host.lower().rstrip(".")
    tlsa = security.dane.get(host)
    if tlsa is not None and tlsa.error is not None:
        return Outcome.temp("4.7.5", f"{hop.host}: {tlsa.error}")
    if tlsa is not None and tlsa.records:
        return TLSPolicy("required", verify=False, name="dane", dane=tlsa.records)
    if security.dane:
        return base  # DNSSEC-signed domain, but this host has no TLSA records
    sts = security.sts
    if sts is None or sts.mode == "none":
        return base
    if sts.mode == "enforce":
        if not sts.allows(host):
            text = f"{hop.host} is not an MX host of the MTA-STS policy of {security.domain}"
            return Outcome.temp("4.7.5", text)
        return TLSPolicy("required", verify=True, ca_file=ca_file, name="mta-sts")
    # testing: deliver as usual, and find out what enforce would have refused.
    if base.mode == "none":
        return base
    return replace(base, verify=True, ca_file=ca_file, sts_testing=True)


def testing_mismatch(security: DomainSecurity, hop: Hop) -> str | None:
    """In MTA-STS testing mode, why enforce would refuse this hop's MX name (None: it would not)."""
    sts = security.sts
    if hop.route is not None or sts is None or sts.mode != "testing" or sts.allows(hop.host):
        return None
    return f"{hop.host} is not an MX host of the policy"


class SecurityLookup:
    """Looks up DANE and MTA-STS for destination domains (one per delivery agent)."""

    def __init__(
        self,
        config: Config,
        resolver: Resolver,
        clock: Callable[[], float] = time.time,
        sts_port: int = 443,
    ) -> None:
        self._config = config
        self._resolver = resolver
        self._dnssec = config.dns.dnssec == "trust-ad"
        self._timeout = config.dns.timeout
        self._sts: MTASTS | None = None
        if config.delivery.mta_sts:
            self._sts = MTASTS(
                resolver,
                PolicyStore(config.spool.path / "mta-sts"),
                _web_trust(config.delivery.ca_file),
                dns_timeout=config.dns.timeout,
                port=sts_port,
                clock=clock,
            )

    async def for_domain(self, domain: str, hops: list[Hop]) -> DomainSecurity:
        """DANE when the MX records are signed and some host has TLSA; else MTA-STS."""
        mx_hosts = [h.host for h in hops if h.route is None]
        if not mx_hosts:
            return DomainSecurity(domain)
        if self._dnssec and await self._signed_mx(domain):
            lookups = await asyncio.gather(
                *(dane.tlsa_for(self._resolver, h, hops[0].port, self._timeout) for h in mx_hosts)
            )
            found = {h.lower().rstrip("."): v for h, v in zip(mx_hosts, lookups, strict=True)}
            if any(v.records or v.error for v in found.values()):
                return DomainSecurity(domain, dane=found)
        if self._sts is None:
            return DomainSecurity(domain)
        result = await self._sts.lookup(domain)
        return DomainSecurity(domain, sts=result.policy, sts_note=result.note)

    async def _signed_mx(self, domain: str) -> bool:
        try:
            records, ad = await dane.authenticated(self._resolver, domain, "MX", self._timeout)
        except dns.exception.DNSException:
            return False
        return ad and bool(records)


def _web_trust(ca_file: Path | None) -> ssl.SSLContext:
    """The system trust store plus ``[delivery] ca_file``, for MTA-STS policy servers."""
    context = ssl.create_default_context()
    if ca_file is not None:
        context.load_verify_locations(cafile=str(ca_file))
    return context
