"""DKIM signing with the operator's keys, and the header helpers verification shares.

:meth:`Signer.signature_for` returns only the ``DKIM-Signature:`` field(s)
to prepend, or None when no key matches the From: domain. It takes the
header block as the session will store it and the received
:class:`~relayd.smtpd.content.Content`, whose body it reads in bounded
pieces: the body hash is computed by streaming canonicalization
(relayd.bodyhash), and dkimpy only hashes the header block and signs.
:meth:`Signer.sign` (whole message in, signed message out) remains for
tools and tests.

Keys are read once, when a :class:`Signer` is built; a reload builds a new
Signer (:meth:`Signer.reload`) and swaps it in, so a message is signed with
one consistent set of keys. Several keys for one domain (rotation, or RSA
plus Ed25519) each add a signature. Key files are PEM (PKCS#1 or PKCS#8 for
RSA, PKCS#8 for Ed25519); the bare base64 Ed25519 seed that dkimpy's
``dknewkey`` writes is accepted too.

Verification of inbound mail lives in relayd.dkimverify.
"""

from __future__ import annotations

import base64
import contextlib
import importlib.util
import os
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from email.utils import getaddresses
from pathlib import Path
from typing import Literal

import dkim
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from relayd.bodyhash import body_hash
from relayd.config import DKIMConfig, DKIMKey
from relayd.smtpd.content import Content

KeyKind = Literal["rsa", "ed25519"]
DKIMStatus = Literal["pass", "fail", "neutral", "temperror", "permerror", "none"]

MIN_RSA_BITS = 1024

# Signed when present, in this order. From is signed once more than it
# occurs, so a From: added in transit breaks the signature.
SIGNED_HEADERS = (
    "from", "to", "cc", "subject", "date", "message-id", "reply-to", "in-reply-to",
    "references", "mime-version", "content-type", "content-transfer-encoding",
)  # fmt: skip

_HEADER_NAME = re.compile(rb"^([\x21-\x39\x3b-\x7e]+)[ \t]*:")


class DKIMKeyError(Exception):
    """Key files that cannot be used, one line per problem."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class DKIMResult:
    """One signature's outcome; ``domain``/``selector`` are its d= and s=.

    ``comment`` goes into Authentication-Results as an RFC 8601 comment
    (why a signature was not checked, or failed).
    """

    domain: str
    selector: str
    result: DKIMStatus
    comment: str = ""


@dataclass(frozen=True)
class _LoadedKey:
    domain: str
    selector: str
    algorithm: bytes
    private: bytes  # in the form dkimpy wants for ``algorithm``


# -- headers ----------------------------------------------------------------


def header_fields(message: bytes) -> list[tuple[str, str]]:
    """(lower-case name, unfolded value) of each header field, in order."""
    fields: list[tuple[str, str]] = []
    for line in re.split(rb"\r?\n", message):
        if not line:
            break
        if line[:1] in (b" ", b"\t") and fields:
            name, value = fields[-1]
            fields[-1] = (name, value + line.decode("utf-8", "replace"))
            continue
        match = _HEADER_NAME.match(line)
        if match:
            name = match.group(1).decode("ascii").lower()
            fields.append((name, line[match.end() :].decode("utf-8", "replace").strip()))
    return fields


def normalize_domain(domain: str) -> str:
    """Lower case, no trailing dot, A-labels: the form DNS and d= use."""
    domain = domain.strip().rstrip(".").lower()
    with contextlib.suppress(UnicodeError):
        return domain.encode("idna").decode("ascii")
    return domain


def from_domains(message: bytes) -> list[str]:
    """The distinct domains of all addresses in all From: fields."""
    values = [value for name, value in header_fields(message) if name == "from"]
    domains: list[str] = []
    for _, address in getaddresses(values):
        domain = normalize_domain(address.rpartition("@")[2]) if "@" in address else ""
        if domain and domain not in domains:
            domains.append(domain)
    return domains


def from_domain(message: bytes) -> str | None:
    """The From: domain, or None when there is none or more than one."""
    domains = from_domains(message)
    return domains[0] if len(domains) == 1 else None


def signed_headers(message: bytes) -> list[bytes]:
    """The h= list for ``message``: the fields above that are present, From oversigned."""
    counts: dict[str, int] = {}
    for name, _ in header_fields(message):
        counts[name] = counts.get(name, 0) + 1
    names = [name for name in counts if name.startswith("list-")]
    chosen: list[bytes] = []
    for name in (*SIGNED_HEADERS, *names):
        times = counts.get(name, 0) + (1 if name == "from" else 0)
        chosen.extend([name.encode("ascii")] * times)
    return chosen


# -- keys -------------------------------------------------------------------


def _load_private(data: bytes) -> rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey:
    if b"-----BEGIN" not in data:
        seed = base64.b64decode(data.strip(), validate=True)
        return ed25519.Ed25519PrivateKey.from_private_bytes(seed)
    key = serialization.load_pem_private_key(data, password=None)
    if not isinstance(key, rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey):
        raise ValueError(f"unsupported key type {type(key).__name__}; want RSA or Ed25519")
    return key


def _for_dkimpy(key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey) -> tuple[bytes, bytes]:
    """(algorithm, private key bytes) in the shapes dkimpy's signer accepts."""
    if isinstance(key, ed25519.Ed25519PrivateKey):
        if importlib.util.find_spec("nacl") is None:
            raise ValueError("Ed25519 signing needs the PyNaCl package (dkimpy[ed25519])")
        seed = key.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
        return b"ed25519-sha256", base64.b64encode(seed)
    if key.key_size < MIN_RSA_BITS:
        raise ValueError(f"RSA key has {key.key_size} bits; receivers ignore under 1024")
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    return b"rsa-sha256", pem


def _load_key(spec: DKIMKey) -> _LoadedKey:
    algorithm, private = _for_dkimpy(_load_private(spec.key_file.read_bytes()))
    return _LoadedKey(normalize_domain(spec.domain), spec.selector, algorithm, private)


class Signer:
    """Signs messages whose From: domain has a configured key."""

    def __init__(self, keys: Iterable[DKIMKey]) -> None:
        self._specs = tuple(keys)
        self._keys: dict[str, list[_LoadedKey]] = {}
        problems: list[str] = []
        for spec in self._specs:
            try:
                loaded = _load_key(spec)
            except (OSError, ValueError, TypeError) as exc:
                problems.append(f"{spec.key_file}: DKIM key for {spec.domain}: {exc}")
                continue
            self._keys.setdefault(loaded.domain, []).append(loaded)
        if problems:
            raise DKIMKeyError(problems)

    @classmethod
    def from_config(cls, cfg: DKIMConfig) -> Signer:
        return cls(cfg.keys)

    def reload(self) -> Signer:
        """A new Signer from the same key files, read again (after a rotation)."""
        return Signer(self._specs)

    @property
    def domains(self) -> frozenset[str]:
        return frozenset(self._keys)

    def signature_for(
        self, header: bytes, content: Content, linesep: bytes = b"\r\n"
    ) -> bytes | None:
        """The DKIM-Signature field(s) for ``header`` + the body of ``content``.

        ``header`` is the header block as it will be stored (whole lines, no
        blank line); the body is read from ``content`` in bounded pieces.
        None when the From: domain (exactly one, compared case-insensitively)
        has no key. Raises dkim.DKIMException for a header dkimpy cannot parse.
        """
        domain = from_domain(header)
        keys = self._keys.get(domain, []) if domain else []
        if not keys:
            return None
        start = min(content.body_offset + 2, content.size)
        bodyhash = body_hash(content.chunks(start), relaxed=True)
        include = signed_headers(header)
        return b"".join(_sign_one(header, key, include, bodyhash, linesep) for key in keys)

    def signature(self, message: bytes, linesep: bytes = b"\r\n") -> bytes | None:
        """:meth:`signature_for` for a whole message in memory."""
        content = Content.from_bytes(message)
        return self.signature_for(content.header, content, linesep)

    def sign(self, message: bytes, linesep: bytes = b"\r\n") -> bytes | None:
        """The signed message (signature fields on top), or None when no key matches."""
        fields = self.signature(message, linesep)
        return None if fields is None else fields + message


class _HeaderSigner(dkim.DKIM):  # type: ignore[misc]
    """dkimpy's signer given the body hash instead of the body.

    dkimpy's ``sign`` canonicalizes and hashes a body it holds in memory;
    this mirrors its field list and hands the header hash and signature to
    dkimpy's own ``gen_header``, so only the body handling differs.
    """

    def sign_with_bodyhash(self, key: _LoadedKey, include: list[bytes], bodyhash: bytes) -> bytes:
        self.signature_algorithm = key.algorithm
        self.hasher = dkim.HASH_ALGORITHMS[key.algorithm]
        policy = dkim.CanonicalizationPolicy.from_c_value(b"relaxed/relaxed")
        domain, selector = key.domain.encode("ascii"), key.selector.encode("ascii")
        if b"from" not in include:
            raise dkim.ParameterError("The From header field MUST be signed")
        fields = [
            (b"v", b"1"),
            (b"a", key.algorithm),
            (b"c", policy.to_c_value()),
            (b"d", domain),
            (b"i", b"@" + domain),
            (b"q", b"dns/txt"),
            (b"s", selector),
            (b"t", str(int(time.time())).encode("ascii")),
            (b"h", b" : ".join(include)),
            (b"bh", base64.b64encode(bodyhash)),
            (b"b", b"0" * 60),  # placeholder; dkimpy folds b= onto its own line
        ]
        value: bytes = self.gen_header(fields, include, policy, b"DKIM-Signature", _pk(key))
        return b"DKIM-Signature: " + value


def _pk(key: _LoadedKey) -> object:
    """The private key object dkimpy's ``gen_header`` signs with."""
    if key.algorithm == b"ed25519-sha256":
        import nacl.encoding
        import nacl.signing

        return nacl.signing.SigningKey(key.private, encoder=nacl.encoding.Base64Encoder)
    from dkim.crypto import parse_pem_private_key

    return parse_pem_private_key(key.private)


def _sign_one(
    header: bytes, key: _LoadedKey, include: list[bytes], bodyhash: bytes, linesep: bytes
) -> bytes:
    signer = _HeaderSigner(header + b"\r\n", signature_algorithm=key.algorithm, linesep=linesep)
    return signer.sign_with_bodyhash(key, include, bodyhash)


# -- keygen -----------------------------------------------------------------


def _new_key(kind: KeyKind, bits: int) -> rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey:
    if kind == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    if kind != "rsa":
        raise ValueError(f"unknown key kind {kind!r}; want rsa or ed25519")
    if bits < MIN_RSA_BITS:
        raise ValueError(f"RSA keys need at least {MIN_RSA_BITS} bits")
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def _pem(key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey) -> bytes:
    # PKCS#1 for RSA, as opendkim-genkey writes it; Ed25519 only has PKCS#8.
    fmt = (
        serialization.PrivateFormat.PKCS8
        if isinstance(key, ed25519.Ed25519PrivateKey)
        else serialization.PrivateFormat.TraditionalOpenSSL
    )
    return key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption())


def record_value(key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey) -> str:
    """The TXT record text for ``key``'s public half: ``v=DKIM1; k=...; p=...``."""
    public = key.public_key()
    if isinstance(public, ed25519.Ed25519PublicKey):
        raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return f"v=DKIM1; k=ed25519; p={base64.b64encode(raw).decode('ascii')}"
    der = public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return f"v=DKIM1; k=rsa; p={base64.b64encode(der).decode('ascii')}"


def record_line(domain: str, selector: str, value: str) -> str:
    """A zone-file line; the text is cut into 255-octet strings, as TXT requires."""
    chunks = " ".join(f'"{value[i : i + 255]}"' for i in range(0, len(value), 255))
    return f"{selector}._domainkey.{normalize_domain(domain)}. IN TXT {chunks}"


def public_value(path: Path) -> str:
    """The TXT record text for an existing key file; OSError or ValueError when unusable."""
    return record_value(_load_private(path.read_bytes()))


def public_record(path: Path, domain: str, selector: str) -> str:
    """The record line to publish for an existing key file."""
    return record_line(domain, selector, public_value(path))


def _write_private(path: Path, data: bytes, force: bool) -> None:
    """Write ``data`` as a 0600 file in one step; no half-written or world-readable key."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.fchmod(fd, 0o600)
        _give_to_daemon(fd)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        if force:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)  # fails if path exists, unlike rename
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _give_to_daemon(fd: int) -> None:
    """Run as root (relayctl usually is), hand the key to the ``relayd`` user.

    The key stays 0600, yet the daemon, which runs as ``relayd``, can read it.
    """
    if os.geteuid() != 0:
        return
    import pwd

    try:
        owner = pwd.getpwnam("relayd")
    except KeyError:
        return
    os.fchown(fd, owner.pw_uid, owner.pw_gid)


def keygen(
    path: Path,
    domain: str,
    selector: str,
    kind: KeyKind = "rsa",
    bits: int = 2048,
    force: bool = False,
) -> str:
    """Write a new private key to ``path`` (mode 0600) and return the TXT record line.

    Refuses (FileExistsError) to replace an existing key unless ``force``:
    losing a published key breaks every message signed with it.
    """
    if path.exists() and not force:
        raise FileExistsError(f"{path} exists; refusing to overwrite a key")
    key = _new_key(kind, bits)
    _write_private(path, _pem(key), force)
    return record_line(domain, selector, record_value(key))


__all__ = [
    "DKIMKeyError",
    "DKIMResult",
    "Signer",
    "from_domain",
    "from_domains",
    "header_fields",
    "keygen",
    "normalize_domain",
    "public_record",
    "public_value",
    "record_line",
    "record_value",
    "signed_headers",
]
