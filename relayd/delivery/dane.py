"""DANE for SMTP (RFC 7672): the MX host's certificate pinned in DNSSEC-signed TLSA records.

MTA-STS trusts the web PKI and the first fetch; DANE trusts DNSSEC. With
``[dns] dnssec = "trust-ad"`` relayd asks its resolver (which must be a
validating resolver on the same host, such as unbound) for DNSSEC and
believes the AD bit in its answers. When the MX records and the
``_25._tcp.MX`` TLSA records come back authenticated, delivery to that host
must use STARTTLS and the certificate it presents must match one of the
usable records, else the mail waits (``4.7.5``); never clear text.

Only what RFC 7672 section 3.1 keeps for SMTP is usable: DANE-TA(2) and
DANE-EE(3), selectors Cert(0) and SPKI(1), matching Full(0), SHA2-256(1)
and SHA2-512(2). DANE-EE matches the leaf alone, without names or dates
(3.1.1); DANE-TA needs a chain from the leaf up to the matched certificate,
valid for the MX host name (3.1.2).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime

import dns.asyncresolver
import dns.exception
import dns.flags
import dns.rdatatype
import dns.resolver
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

DANE_TA, DANE_EE = 2, 3
_USAGES = (DANE_TA, DANE_EE)
_SELECTORS = (0, 1)
_MATCHING = (0, 1, 2)


@dataclass(frozen=True)
class TLSA:
    """One TLSA record: certificate usage, selector, matching type and the data."""

    usage: int
    selector: int
    mtype: int
    data: bytes

    def text(self) -> str:
        return f"{self.usage} {self.selector} {self.mtype} {self.data.hex()[:16]}"


@dataclass(frozen=True)
class TLSALookup:
    """TLSA records of one MX host, and whether DANE applies to it.

    ``records`` non-empty means DANE is required for the host. ``error`` is a
    temporary failure of a lookup that had to be secure: the mail waits.
    """

    records: tuple[TLSA, ...] = ()
    error: str | None = None


def usable(records: list[TLSA]) -> tuple[TLSA, ...]:
    """The records SMTP may use (RFC 7672 3.1); the others are ignored."""
    return tuple(
        r
        for r in records
        if r.usage in _USAGES and r.selector in _SELECTORS and r.mtype in _MATCHING
    )


def _selected(cert: x509.Certificate, selector: int) -> bytes:
    if selector == 0:
        return cert.public_bytes(Encoding.DER)
    return cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)


def _digest(data: bytes, mtype: int) -> bytes:
    if mtype == 1:
        return hashlib.sha256(data).digest()
    if mtype == 2:
        return hashlib.sha512(data).digest()
    return data


def record_matches(record: TLSA, cert: x509.Certificate) -> bool:
    return _digest(_selected(cert, record.selector), record.mtype) == record.data


def check_chain(
    records: tuple[TLSA, ...], chain_der: list[bytes], names: list[str], now: datetime | None = None
) -> str | None:
    """None when the presented chain (leaf first) matches a record, else why not."""
    if not chain_der:
        return "no certificate presented"
    try:
        chain = [x509.load_der_x509_certificate(der) for der in chain_der]
    except ValueError as exc:
        return f"unreadable certificate: {exc}"
    leaf = chain[0]
    for record in records:
        if record.usage == DANE_EE and record_matches(record, leaf):
            return None
    for record in records:
        if record.usage != DANE_TA:
            continue
        for anchor in chain:
            if record_matches(record, anchor) and _chain_valid(leaf, chain, anchor, names, now):
                return None
    shown = ", ".join(r.text() for r in records[:4])
    return f"certificate matches no TLSA record ({shown})"


def _chain_valid(
    leaf: x509.Certificate,
    chain: list[x509.Certificate],
    anchor: x509.Certificate,
    names: list[str],
    now: datetime | None,
) -> bool:
    """DANE-TA: the leaf chains up to ``anchor`` by signatures and is valid for one of ``names``.

    Walked by hand rather than with a web-PKI verifier: a DANE trust anchor
    is often a private CA whose certificates need not follow the CA/Browser
    Forum's profile; what RFC 7672 asks is the chain, the dates and the name.
    """
    if anchor is leaf or not _name_ok(leaf, names):
        return False
    moment = now or datetime.now(UTC)
    current, pool = leaf, [c for c in chain[1:] if c is not anchor]
    for _ in range(len(chain)):
        if not _current(current, moment):
            return False
        if _issued_by(current, anchor):
            return _current(anchor, moment)
        issuer = next((c for c in pool if _issued_by(current, c) and _is_ca(c)), None)
        if issuer is None:
            return False
        pool.remove(issuer)
        current = issuer
    return False


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def _current(cert: x509.Certificate, moment: datetime) -> bool:
    return cert.not_valid_before_utc <= moment <= cert.not_valid_after_utc


def _name_ok(cert: x509.Certificate, names: list[str]) -> bool:
    """A DNS name of the certificate's subjectAltName matches one of ``names``."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    presented = [n.lower().rstrip(".") for n in san.get_values_for_type(x509.DNSName)]
    for wanted in (n.lower().rstrip(".") for n in names):
        for name in presented:
            if name == wanted:
                return True
            if name.startswith("*.") and wanted.partition(".")[2] == name[2:]:
                return True
    return False


async def authenticated(
    resolver: dns.asyncresolver.Resolver, name: str, rdtype: str, timeout: float
) -> tuple[list[object], bool]:
    """The answer's records and whether the resolver vouched for them (the AD bit).

    NXDOMAIN or no data come back as ([], ad). Raises dns.exception.DNSException
    for failures (SERVFAIL, as a validating resolver answers a bogus zone).
    """
    try:
        answer = await resolver.resolve(name, rdtype, lifetime=timeout, search=False)
    except dns.resolver.NoAnswer as exc:
        response = exc.kwargs.get("response")
        return [], bool(response is not None and response.flags & dns.flags.AD)
    except dns.resolver.NXDOMAIN as exc:
        responses = exc.kwargs.get("responses") or {}
        response = next(iter(responses.values()), None)
        return [], bool(response is not None and response.flags & dns.flags.AD)
    response = answer.response
    return list(answer), bool(response.flags & dns.flags.AD)


async def tlsa_for(
    resolver: dns.asyncresolver.Resolver, host: str, port: int, timeout: float
) -> TLSALookup:
    """The usable TLSA records of ``host`` when they are authenticated, else none."""
    name = f"_{port}._tcp.{host.rstrip('.')}"
    try:
        rdatas, ad = await authenticated(resolver, name, "TLSA", timeout)
    except dns.exception.DNSException as exc:
        # A validating resolver answers SERVFAIL for a bogus signature: the
        # host may have DANE that an attacker is hiding, so the mail waits.
        return TLSALookup(error=f"TLSA lookup of {name} failed: {type(exc).__name__}")
    if not ad:
        return TLSALookup()
    records = [
        TLSA(int(r.usage), int(r.selector), int(r.mtype), bytes(r.cert))  # type: ignore[attr-defined]
        for r in rdatas
    ]
    return TLSALookup(usable(records))
