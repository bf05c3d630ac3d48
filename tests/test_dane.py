"""DANE matching (RFC 7672) on real certificates, and TLSA lookups that trust the AD bit.

The matching rules are plain functions over DER certificates made by a
test CA. The lookups go to the loopback DNS server, which sets the AD bit
for zones the test marks as signed, as a validating resolver would.
"""

from __future__ import annotations

import asyncio
import hashlib

import dns.asyncresolver
import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from support.dnsserver import DNSServer

from relayd.delivery.dane import TLSA, check_chain, tlsa_for, usable
from relayd.dns import trust_ad


def der(pem: bytes) -> bytes:
    return x509.load_pem_x509_certificate(pem).public_bytes(Encoding.DER)


def spki(der_cert: bytes) -> bytes:
    cert = x509.load_der_x509_certificate(der_cert)
    return cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)


@pytest.fixture(scope="module")
def pki() -> tuple[bytes, bytes, bytes]:
    """(leaf for mx1.dane.test, its issuing CA, a stranger's leaf), DER."""
    ca = trustme.CA()
    leaf = ca.issue_cert("mx1.dane.test")
    other = trustme.CA().issue_cert("mx1.dane.test")
    return (
        der(leaf.cert_chain_pems[0].bytes()),
        der(ca.cert_pem.bytes()),
        der(other.cert_chain_pems[0].bytes()),
    )


def test_dane_ee_matches_the_leaf_by_any_selector_and_hash(pki: tuple[bytes, bytes, bytes]) -> None:
    leaf, _, stranger = pki
    for record in (
        TLSA(3, 1, 1, hashlib.sha256(spki(leaf)).digest()),
        TLSA(3, 0, 1, hashlib.sha256(leaf).digest()),
        TLSA(3, 1, 2, hashlib.sha512(spki(leaf)).digest()),
        TLSA(3, 0, 0, leaf),
    ):
        # DANE-EE checks neither names nor the issuer (RFC 7672 3.1.1).
        assert check_chain((record,), [leaf], ["not-the-name.test"]) is None
        assert check_chain((record,), [stranger], ["mx1.dane.test"]) is not None


def test_dane_ta_needs_the_chain_and_the_name(pki: tuple[bytes, bytes, bytes]) -> None:
    leaf, ca, stranger = pki
    record = TLSA(2, 0, 1, hashlib.sha256(ca).digest())
    assert check_chain((record,), [leaf, ca], ["mx1.dane.test"]) is None
    assert check_chain((record,), [leaf, ca], ["other.dane.test"]) is not None
    assert check_chain((record,), [leaf], ["mx1.dane.test"]) is not None  # anchor not sent
    assert check_chain((record,), [stranger, ca], ["mx1.dane.test"]) is not None
    # A record naming the leaf as its own anchor is not DANE-TA.
    assert check_chain((TLSA(2, 0, 0, leaf),), [leaf], ["mx1.dane.test"]) is not None


def test_only_usages_2_and_3_are_usable_for_smtp(pki: tuple[bytes, bytes, bytes]) -> None:
    leaf = pki[0]
    digest = hashlib.sha256(leaf).digest()
    records = [
        TLSA(0, 0, 1, digest),
        TLSA(1, 0, 1, digest),
        TLSA(3, 0, 1, digest),
        TLSA(3, 2, 1, b""),
    ]
    assert usable(records) == (TLSA(3, 0, 1, digest),)


def resolver(server: DNSServer) -> dns.asyncresolver.Resolver:
    r = server.async_resolver()
    trust_ad(r)
    return r


def test_tlsa_of_a_signed_zone_is_used(
    dns_server: DNSServer, pki: tuple[bytes, bytes, bytes]
) -> None:
    digest = hashlib.sha256(spki(pki[0])).hexdigest()
    dns_server.add(f"_25._tcp.mx1.dane.test TLSA 3 1 1 {digest}")
    dns_server.sign("dane.test")
    found = asyncio.run(tlsa_for(resolver(dns_server), "mx1.dane.test", 25, 2.0))
    assert found.records == (TLSA(3, 1, 1, bytes.fromhex(digest)),)
    assert found.error is None


def test_tlsa_of_an_unsigned_zone_is_ignored(dns_server: DNSServer) -> None:
    dns_server.add(f"_25._tcp.mx1.plain.test TLSA 3 1 1 {'00' * 32}")
    found = asyncio.run(tlsa_for(resolver(dns_server), "mx1.plain.test", 25, 2.0))
    assert found.records == () and found.error is None


def test_bogus_tlsa_answer_makes_the_mail_wait(dns_server: DNSServer) -> None:
    dns_server.sign("dane.test")
    dns_server.fault("_25._tcp.mx1.dane.test", "servfail", "TLSA")
    found = asyncio.run(tlsa_for(resolver(dns_server), "mx1.dane.test", 25, 2.0))
    assert found.records == ()
    assert found.error is not None and "TLSA lookup" in found.error


def test_signed_zone_without_tlsa_means_no_dane(dns_server: DNSServer) -> None:
    dns_server.add("mx1.dane.test A 127.0.0.2")
    dns_server.sign("dane.test")
    found = asyncio.run(tlsa_for(resolver(dns_server), "mx1.dane.test", 25, 2.0))
    assert found.records == () and found.error is None
