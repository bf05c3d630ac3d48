"""DKIM signing and verification, keys served by a real DNS server on loopback."""

from __future__ import annotations

import asyncio
import re
import stat
from collections.abc import Iterator
from pathlib import Path

import dkim as dkimpy
import dns.resolver
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from support.dnsserver import DNSServer

from relayd.config import DKIMConfig, DKIMKey, DNSConfig, HostPort
from relayd.dkim import (
    DKIMKeyError,
    DKIMResult,
    Signer,
    from_domain,
    keygen,
    public_record,
    signed_headers,
)
from relayd.dkimverify import verify_content, verify_sync
from relayd.dns import dkim_dnsfunc, make_resolver, make_sync_resolver
from relayd.smtpd.content import Content

MESSAGE = (
    b"From: Alice <alice@example.test>\r\n"
    b"To: bob@remote.test\r\n"
    b"Subject: hello\r\n"
    b"Date: Mon, 01 Jan 2024 00:00:00 +0000\r\n"
    b"Message-ID: <1@example.test>\r\n"
    b"List-Id: <news.example.test>\r\n"
    b"Bcc: hidden@remote.test\r\n"
    b"\r\n"
    b"Hello Bob.\r\n"
)


def zone_line(record: str) -> str:
    """keygen's ``name. IN TXT "a" "b"`` as a DNSServer line with the strings joined."""
    match = re.fullmatch(r'(\S+) IN TXT ((?:"[^"]*" ?)+)', record)
    assert match, record
    text = "".join(re.findall(r'"([^"]*)"', match.group(2)))
    return f'{match.group(1)} TXT "{text}"'


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, str]]:
    """Key files and their published records: rsa (s1), ed25519 (s2), rsa elsewhere."""
    folder = tmp_path_factory.mktemp("keys")
    made = {}
    for name, domain, selector, kind in (
        ("rsa", "example.test", "s1", "rsa"),
        ("ed25519", "example.test", "s2", "ed25519"),
        ("other", "other.test", "s1", "rsa"),
    ):
        path = folder / f"{name}.pem"
        made[name] = (path, keygen(path, domain, selector, kind=kind))  # type: ignore[arg-type]
    return made


@pytest.fixture(scope="module")
def dns_server(keys: dict[str, tuple[Path, str]]) -> Iterator[DNSServer]:
    with DNSServer() as server:
        server.add(*(zone_line(record) for _, record in keys.values()))
        server.fault("s9._domainkey.example.test", "servfail")
        server.add('s8._domainkey.example.test TXT "v=DKIM1; k=rsa; p=bm90IGEga2V5"')
        yield server


@pytest.fixture
def resolver(dns_server: DNSServer) -> dns.resolver.Resolver:
    return make_sync_resolver(DNSConfig((HostPort("127.0.0.1", dns_server.port),), timeout=2.0))


def signer_for(keys: dict[str, tuple[Path, str]], *names: str) -> Signer:
    selectors = {"rsa": "s1", "ed25519": "s2", "other": "s1"}
    domains = {"rsa": "example.test", "ed25519": "example.test", "other": "other.test"}
    return Signer([DKIMKey(domains[n], selectors[n], keys[n][0]) for n in names])


def verify(message: bytes, resolver: dns.resolver.Resolver) -> list[DKIMResult]:
    """relayd's verification of a message in memory."""
    return verify_sync(Content.from_bytes(message), resolver)


def dkimpy_verifies(message: bytes, resolver: dns.resolver.Resolver) -> bool:
    return bool(dkimpy.verify(message, dnsfunc=dkim_dnsfunc(resolver)))


@pytest.mark.parametrize("kind", ["rsa", "ed25519"])
def test_signed_mail_verifies(
    keys: dict[str, tuple[Path, str]], resolver: dns.resolver.Resolver, kind: str
) -> None:
    signed = signer_for(keys, kind).sign(MESSAGE)
    assert signed is not None and signed.endswith(MESSAGE)
    algorithm = b"a=rsa-sha256" if kind == "rsa" else b"a=ed25519-sha256"
    assert algorithm in signed and b"c=relaxed/relaxed" in signed
    assert dkimpy_verifies(signed, resolver)
    selector = "s1" if kind == "rsa" else "s2"
    assert verify(signed, resolver) == [DKIMResult("example.test", selector, "pass")]


def test_key_rotation_two_selectors_both_verify(
    keys: dict[str, tuple[Path, str]], resolver: dns.resolver.Resolver
) -> None:
    signed = signer_for(keys, "rsa", "ed25519").sign(MESSAGE)
    assert signed is not None
    assert signed.count(b"DKIM-Signature:") == 2
    assert verify(signed, resolver) == [
        DKIMResult("example.test", "s1", "pass"),
        DKIMResult("example.test", "s2", "pass"),
    ]


def test_reload_reads_a_rotated_key(tmp_path: Path, dns_server: DNSServer) -> None:
    path = tmp_path / "k.pem"
    keygen(path, "rotate.test", "old")
    signer = Signer([DKIMKey("rotate.test", "old", path)])
    new_record = keygen(path, "rotate.test", "old", force=True)
    dns_server.add(zone_line(new_record))
    resolver = make_sync_resolver(DNSConfig((HostPort("127.0.0.1", dns_server.port),), 2.0))
    message = MESSAGE.replace(b"example.test>", b"rotate.test>")
    stale, fresh = signer.sign(message), signer.reload().sign(message)
    assert stale is not None and fresh is not None
    assert verify(stale, resolver)[0].result == "fail"
    assert verify(fresh, resolver)[0].result == "pass"


def test_no_key_for_the_from_domain_leaves_mail_unsigned(
    keys: dict[str, tuple[Path, str]],
) -> None:
    signer = signer_for(keys, "rsa")
    assert signer.sign(MESSAGE.replace(b"alice@example.test", b"alice@else.test")) is None
    # exact domain match: a subdomain has no key
    assert signer.sign(MESSAGE.replace(b"alice@example.test", b"alice@sub.example.test")) is None
    assert signer.sign(b"To: bob@remote.test\r\n\r\nno From\r\n") is None


def test_from_domain_matches_case_insensitively(
    keys: dict[str, tuple[Path, str]], resolver: dns.resolver.Resolver
) -> None:
    signed = signer_for(keys, "rsa").sign(MESSAGE.replace(b"example.test>", b"EXAMPLE.Test>"))
    assert signed is not None
    assert verify(signed, resolver)[0].result == "pass"


def test_each_domain_signs_with_its_own_key(
    keys: dict[str, tuple[Path, str]], resolver: dns.resolver.Resolver
) -> None:
    signer = signer_for(keys, "rsa", "other")
    signed = signer.sign(MESSAGE.replace(b"alice@example.test", b"alice@other.test"))
    assert signed is not None and b"d=other.test" in signed
    assert verify(signed, resolver) == [DKIMResult("other.test", "s1", "pass")]


def test_signed_header_list(keys: dict[str, tuple[Path, str]]) -> None:
    names = signed_headers(MESSAGE)
    assert names[:2] == [b"from", b"from"]
    assert set(names) == {b"from", b"to", b"subject", b"date", b"message-id", b"list-id"}
    assert b"bcc" not in names
    signed = signer_for(keys, "rsa").sign(MESSAGE)
    assert signed is not None
    tag = re.search(rb"h=([^;]+);", signed.replace(b"\r\n", b""))
    assert tag is not None
    listed = [n.strip() for n in tag.group(1).split(b":")]
    assert listed.count(b"from") == 2


def test_added_from_breaks_the_signature(
    keys: dict[str, tuple[Path, str]], resolver: dns.resolver.Resolver
) -> None:
    signed = signer_for(keys, "rsa").sign(MESSAGE)
    assert signed is not None
    head, _, body = signed.partition(b"\r\n\r\n")
    forged = head + b"\r\nFrom: Mallory <ceo@example.test>\r\n\r\n" + body
    assert verify(forged, resolver)[0].result == "fail"
    assert not dkimpy_verifies(forged, resolver)


def test_tampered_body_fails(
    keys: dict[str, tuple[Path, str]], resolver: dns.resolver.Resolver
) -> None:
    signed = signer_for(keys, "ed25519").sign(MESSAGE)
    assert signed is not None
    assert verify(signed.replace(b"Hello Bob", b"Hello Eve"), resolver)[0].result == "fail"


def test_verify_results_for_key_problems(
    keys: dict[str, tuple[Path, str]], resolver: dns.resolver.Resolver, tmp_path: Path
) -> None:
    path = tmp_path / "k.pem"
    keygen(path, "example.test", "unused")
    outcomes = {}
    for selector in ("s7", "s8", "s9"):  # no key, broken key, SERVFAIL
        signed = Signer([DKIMKey("example.test", selector, path)]).sign(MESSAGE)
        assert signed is not None
        outcomes[selector] = verify(signed, resolver)[0].result
    assert outcomes == {"s7": "permerror", "s8": "permerror", "s9": "temperror"}


def test_unsigned_mail_is_none(resolver: dns.resolver.Resolver) -> None:
    assert verify(MESSAGE, resolver) == [DKIMResult("", "", "none")]


def test_garbled_signature_is_permerror(resolver: dns.resolver.Resolver) -> None:
    message = b"DKIM-Signature: v=1; d=example.test; s=s1; nonsense\r\n" + MESSAGE
    result = verify(message, resolver)[0]
    assert (result.domain, result.selector, result.result) == ("example.test", "s1", "permerror")


def test_async_verify_of_streamed_content(
    keys: dict[str, tuple[Path, str]], dns_server: DNSServer
) -> None:
    signed = signer_for(keys, "rsa").sign(MESSAGE)
    assert signed is not None
    cfg = DNSConfig((HostPort("127.0.0.1", dns_server.port),), timeout=2.0)

    async def run() -> list[DKIMResult]:
        deadline = asyncio.get_running_loop().time() + 4.0
        return await verify_content(Content.from_bytes(signed), make_resolver(cfg), deadline)

    assert asyncio.run(run()) == [DKIMResult("example.test", "s1", "pass")]


def test_signature_alone_can_be_prepended(keys: dict[str, tuple[Path, str]]) -> None:
    signer = signer_for(keys, "rsa")
    fields = signer.signature(MESSAGE)
    assert fields is not None
    assert fields.startswith(b"DKIM-Signature:") and fields.endswith(b"\r\n")


@pytest.mark.parametrize("kind", ["rsa", "ed25519"])
def test_keygen_file_and_record(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "new.pem"
    record = keygen(path, "Example.COM", "sel", kind=kind)  # type: ignore[arg-type]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_bytes().startswith(b"-----BEGIN")
    assert record.startswith("sel._domainkey.example.com. IN TXT ")
    strings = re.findall(r'"([^"]*)"', record)
    assert all(len(s) <= 255 for s in strings)
    text = "".join(strings)
    assert text.startswith(f"v=DKIM1; k={kind}; p=")
    assert public_record(path, "example.com", "sel") == record
    assert [p.name for p in tmp_path.iterdir()] == ["new.pem"]  # no temporary left


def test_keygen_rsa_record_is_split_and_key_is_2048_bits(tmp_path: Path) -> None:
    path = tmp_path / "new.pem"
    record = keygen(path, "example.com", "sel")
    assert len(re.findall(r'"([^"]*)"', record)) == 2
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    assert isinstance(key, rsa.RSAPrivateKey) and key.key_size == 2048


def test_keygen_refuses_to_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "key.pem"
    keygen(path, "example.com", "sel", kind="ed25519")
    before = path.read_bytes()
    with pytest.raises(FileExistsError):
        keygen(path, "example.com", "sel")
    assert path.read_bytes() == before
    keygen(path, "example.com", "sel", kind="ed25519", force=True)
    assert path.read_bytes() != before
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_keygen_rejects_weak_or_unknown(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        keygen(tmp_path / "a.pem", "example.com", "sel", bits=512)
    with pytest.raises(ValueError):
        keygen(tmp_path / "b.pem", "example.com", "sel", kind="dsa")  # type: ignore[arg-type]
    assert not list(tmp_path.iterdir())


def test_bad_key_files_are_reported_together(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a key\n")
    small = tmp_path / "ec.pem"  # a key type DKIM does not use
    other = ec.generate_private_key(ec.SECP256R1())
    small.write_bytes(
        other.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    with pytest.raises(DKIMKeyError) as caught:
        Signer.from_config(
            DKIMConfig(
                (
                    DKIMKey("a.test", "s", garbage),
                    DKIMKey("b.test", "s", small),
                    DKIMKey("c.test", "s", tmp_path / "missing.pem"),
                )
            )
        )
    assert len(caught.value.problems) == 3


def test_from_domain_parsing() -> None:
    assert from_domain(b'From: "x@evil.test" <a@Good.Test>\r\n\r\n') == "good.test"
    assert from_domain(b"From: a@one.test, b@two.test\r\n\r\n") is None
    assert from_domain(b"From: a@one.test\r\nFrom: b@one.test\r\n\r\n") == "one.test"
    assert from_domain(b"From:\r\n a@folded.test\r\n\r\n") == "folded.test"
    assert from_domain(b"Subject: x\r\n\r\nFrom: a@body.test\r\n") is None
