"""DKIM signing and verification, keys served by a real DNS server on loopback."""

from __future__ import annotations

import asyncio
import re
import stat
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import dkim as dkimpy
import dns.resolver
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from dkim.canonicalization import Relaxed, Simple
from hypothesis import given, settings
from hypothesis import strategies as st
from support.dnsserver import DNSServer

from relayd.bodyhash import Canonicalizer, canonical_body
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
from relayd.dkimverify import body_digests, check_all, plan, verify_content, verify_sync
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


# ---- streamed body hash against dkimpy ---------------------------------------------------

# Bodies as SMTP delivers them: lines without CR or LF, joined by CRLF.
LINE = st.lists(
    st.sampled_from([b"a", b"b", b" ", b"\t", b"  ", b"\xc3\xa9", b"x" * 50]), max_size=12
)
BODY = st.tuples(st.lists(LINE.map(b"".join), max_size=25), st.booleans()).map(
    lambda t: b"\r\n".join(t[0]) + (b"\r\n" if t[1] else b"")
)


@settings(max_examples=400, deadline=None)
@given(BODY, st.lists(st.integers(1, 9), min_size=1, max_size=40))
def test_streamed_canonicalization_equals_dkimpys(body: bytes, cuts: list[int]) -> None:
    """Any split of the body into pieces gives dkimpy's canonical body, octet for octet."""
    for relaxed, reference in ((False, Simple), (True, Relaxed)):
        out: list[bytes] = []
        canon = Canonicalizer(relaxed, out.append)
        i = 0
        for n in cuts * (len(body) // sum(cuts) + 1):
            if i >= len(body):
                break
            canon.feed(body[i : i + n])
            i += n
        canon.end()
        assert b"".join(out) == reference.canonicalize_body(body)


def test_blank_runs_cost_linear_time() -> None:
    """A megabyte of blanks with no line end: no quadratic regex backtracking."""
    started = time.monotonic()
    body = b" " * (1 << 20) + b"x" + b"\t" * (1 << 20) + b"\r\n"
    for relaxed in (False, True):
        assert len(canonical_body(body, relaxed)) >= 4
    assert time.monotonic() - started < 5.0


@pytest.fixture(scope="module")
def fixed_key(keys: dict[str, tuple[Path, str]]) -> tuple[bytes, bytes]:
    """(PEM private key, TXT record) of example.test s1, for checks without DNS."""
    path, record = keys["rsa"]
    return path.read_bytes(), zone_line(record).split(" TXT ", 1)[1].strip('"').encode()


def relayd_verdicts(message: bytes, record: bytes) -> list[str]:
    """relayd's results with ``record`` as every key: streamed body, dkimpy for the rest."""
    content = Content.from_bytes(message)
    the_plan = plan(content.header)
    specs = [s.body for s in the_plan.signatures if s.body is not None]
    digests = body_digests(content, specs, time.monotonic() + 60)
    records: list[object] = [record] * len(the_plan.signatures)
    return [r.result for r in check_all(the_plan, records, digests)]


@settings(max_examples=60, deadline=None)
@given(
    BODY,
    st.sampled_from([b"simple", b"relaxed"]),
    st.sampled_from([b"simple", b"relaxed"]),
    st.booleans(),
    st.sampled_from([b"", b"tampered\r\n", b" \r\n", b"\r\n"]),
)
def test_verification_agrees_with_dkimpy(
    fixed_key: tuple[bytes, bytes],
    body: bytes,
    canon_header: bytes,
    canon_body: bytes,
    length: bool,
    appended: bytes,
) -> None:
    """Signed by dkimpy (any c=, with and without l=), maybe changed after: same verdict."""
    key, record = fixed_key
    message = b"From: a@example.test\r\nSubject: s\r\n\r\n" + body
    signature = dkimpy.sign(
        message, b"s1", b"example.test", key,
        canonicalize=(canon_header, canon_body), include_headers=[b"from", b"subject"],
        length=length,
    )  # fmt: skip
    received = signature + message + appended
    try:
        expected = dkimpy.DKIM(received).verify(dnsfunc=lambda name, timeout=5: record)
    except dkimpy.ValidationError:  # dkimpy's way of saying "body hash mismatch"
        expected = False
    assert relayd_verdicts(received, record) == ["pass" if expected else "fail"]


@settings(max_examples=40, deadline=None)
@given(BODY)
def test_streamed_signature_verifies_with_dkimpy(
    keys: dict[str, tuple[Path, str]], fixed_key: tuple[bytes, bytes], body: bytes
) -> None:
    """relayd signs with a streamed body hash; dkimpy, holding the whole message, agrees."""
    _, record = fixed_key
    message = b"From: Alice <alice@example.test>\r\nTo: b@remote.test\r\n\r\n" + body
    content = Content.from_bytes(message)
    fields = signer_for(keys, "rsa").signature_for(content.header, content)
    assert fields is not None
    assert dkimpy.DKIM(fields + message).verify(dnsfunc=lambda name, timeout=5: record)


def test_only_the_first_five_signatures_are_checked(
    keys: dict[str, tuple[Path, str]], resolver: dns.resolver.Resolver
) -> None:
    signed = signer_for(keys, "rsa").sign(MESSAGE)
    assert signed is not None
    # Five broken signatures on top: the valid one is the sixth, not checked.
    broken = b"".join(
        b"DKIM-Signature: v=1; a=rsa-sha256; d=example.test; s=s7; h=from; bh=AAAA; b=AAAA\r\n"
        for _ in range(5)
    )
    results = verify(broken + signed, resolver)
    assert [r.result for r in results] == ["fail"] * 5 + ["neutral"]  # bh= does not match
    assert results[-1].comment.startswith("not checked: 1 more signature")
    # Among the first five it verifies.
    results = verify(broken[: len(broken) * 4 // 5] + signed, resolver)
    assert [r.result for r in results] == ["fail"] * 4 + ["pass"]


def test_twenty_megabytes_from_a_file_verify_in_bounded_memory(
    keys: dict[str, tuple[Path, str]], fixed_key: tuple[bytes, bytes], tmp_path: Path
) -> None:
    """The body is read in chunks: memory stays far below the message's size."""
    _, record = fixed_key
    head = b"From: Alice <alice@example.test>\r\nTo: b@remote.test\r\nSubject: big\r\n"
    path = tmp_path / "big.eml"
    with path.open("wb") as f:
        f.write(head + b"\r\n")
        for _ in range(20):
            f.write(b"ab\r\n" * (1 << 18))  # 20 MB of 2-octet lines
    size = path.stat().st_size
    body = Content(header=head, size=size, path=str(path))
    tracemalloc.start()
    try:
        fields = signer_for(keys, "rsa").signature_for(head, body)
        assert fields is not None
        signed = Content(header=fields + head, size=size + len(fields), path=None)
        # The signed message is the file with the signature on top; verify that.
        signed_path = tmp_path / "signed.eml"
        with signed_path.open("wb") as out, path.open("rb") as src:
            out.write(fields)
            while piece := src.read(1 << 20):
                out.write(piece)
        signed.path = str(signed_path)
        tracemalloc.reset_peak()
        the_plan = plan(signed.header)
        specs = [s.body for s in the_plan.signatures if s.body is not None]
        digests = body_digests(signed, specs, time.monotonic() + 60)
        results = check_all(the_plan, [record], digests)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert [r.result for r in results] == ["pass"]
    print(f"verification of {size} octets: peak {peak / 1e6:.1f} MB traced")
    assert peak < 16e6, peak


TAG_VALUE = st.sampled_from(
    [b"v=1", b"a=rsa-sha256", b"a=rsa-sha1", b"a=x", b"c=relaxed/simple", b"c=bogus",
     b"d=example.test", b"d=\xff\xfe", b"d=" + b"x" * 300, b"s=s1", b"s=", b"h=from",
     b"h=", b"bh=AAAA", b"bh=!!", b"b=AAAA", b"b=", b"l=3", b"l=-1", b"l=99999999999",
     b"x=1", b"t=9999999999", b"i=@other.test", b"=", b";", b"q=dns/txt"]
)  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(st.lists(st.lists(TAG_VALUE, max_size=12).map(b"; ".join), max_size=8), st.booleans())
def test_hostile_signature_fields_never_raise(fields: list[bytes], has_key: bool) -> None:
    """Whatever the tags, every checked signature gets a result and nothing escapes."""
    header = b"".join(b"DKIM-Signature: " + f + b"\r\n" for f in fields) + b"From: a@b.test\r\n"
    content = Content.from_bytes(header + b"\r\nbody\r\n")
    the_plan = plan(content.header)
    specs = [s.body for s in the_plan.signatures if s.body is not None]
    digests = body_digests(content, specs, time.monotonic() + 60)
    record = b"v=DKIM1; k=rsa; p=bm90IGEga2V5" if has_key else None
    results = check_all(the_plan, [record] * len(the_plan.signatures), digests)
    assert len(results) == min(len(fields), 5)
    assert all(r.result in ("fail", "permerror", "temperror") for r in results)
