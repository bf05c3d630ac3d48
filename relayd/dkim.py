"""DKIM: sign outgoing mail with the operator's keys, verify incoming signatures.

:meth:`Signer.sign` returns the signed message (the ``DKIM-Signature:``
field(s) on top), or None when no key matches, so the caller keeps the
message as it was; :meth:`Signer.signature` returns only the fields, for a
caller that would rather prepend them while writing.

Keys are read once, when a :class:`Signer` is built; a reload builds a new
Signer (:meth:`Signer.reload`) and swaps it in, so a message is signed with
one consistent set of keys. Several keys for one domain (rotation, or RSA
plus Ed25519) each add a signature. Key files are PEM (PKCS#1 or PKCS#8 for
RSA, PKCS#8 for Ed25519); the bare base64 Ed25519 seed that dkimpy's
``dknewkey`` writes is accepted too.

RSA signing is CPU-bound: :meth:`Signer.sign_async` runs it in a thread.

dkimpy reports every verification problem as "not valid"; :func:`verify`
watches the key lookup itself so it can tell a DNS outage (temperror,
worth a retry) from a missing or broken key (permerror) and from a
signature that does not match (fail).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import importlib.util
import os
import re
from collections.abc import Iterable
from concurrent.futures import Executor
from dataclasses import dataclass
from email.utils import getaddresses
from pathlib import Path
from typing import Literal

import dkim
import dns.resolver
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from relayd import dns as rdns
from relayd.config import DKIMConfig, DKIMKey

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
    """One signature's outcome; ``domain``/``selector`` are its d= and s=."""

    domain: str
    selector: str
    result: DKIMStatus


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

    def signature(self, message: bytes, linesep: bytes = b"\r\n") -> bytes | None:
        """Only the DKIM-Signature field(s) for ``message``, each ending in ``linesep``.

        None when the From: domain (exactly one, compared case-insensitively)
        has no key. Raises dkim.DKIMException for a message dkimpy cannot parse.
        """
        domain = from_domain(message)
        keys = self._keys.get(domain, []) if domain else []
        if not keys:
            return None
        include = signed_headers(message)
        return b"".join(_sign_one(message, key, include, linesep) for key in keys)

    def sign(self, message: bytes, linesep: bytes = b"\r\n") -> bytes | None:
        """The signed message (signature fields on top), or None when no key matches."""
        fields = self.signature(message, linesep)
        return None if fields is None else fields + message

    async def signature_async(
        self, message: bytes, linesep: bytes = b"\r\n", executor: Executor | None = None
    ) -> bytes | None:
        """:meth:`signature` in a thread, so RSA arithmetic does not stall the event loop."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(executor, self.signature, message, linesep)

    async def sign_async(
        self, message: bytes, linesep: bytes = b"\r\n", executor: Executor | None = None
    ) -> bytes | None:
        """:meth:`sign` in a thread, so RSA arithmetic does not stall the event loop."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(executor, self.sign, message, linesep)


def _sign_one(message: bytes, key: _LoadedKey, include: list[bytes], linesep: bytes) -> bytes:
    signer = dkim.DKIM(message, signature_algorithm=key.algorithm, linesep=linesep)
    signature: bytes = signer.sign(
        key.selector.encode("ascii"),
        key.domain.encode("ascii"),
        key.private,
        canonicalize=(b"relaxed", b"relaxed"),
        include_headers=include,
    )
    return signature


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


def public_record(path: Path, domain: str, selector: str) -> str:
    """The record line to publish for an existing key file."""
    return record_line(domain, selector, record_value(_load_private(path.read_bytes())))


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


# -- verify -----------------------------------------------------------------


class _KeyWatch:
    """Wraps the DNS lookup of one signature's key and remembers what went wrong."""

    def __init__(self, resolver: dns.resolver.Resolver) -> None:
        self._lookup = rdns.dkim_dnsfunc(resolver)
        self.temporary = False
        self.unusable = False

    def __call__(self, name: bytes, timeout: float = 5.0) -> bytes | None:
        try:
            record = self._lookup(name, timeout=timeout)
        except dkim.DnsTimeoutError:
            self.temporary = True
            raise
        try:
            dkim.evaluate_pk(name, record)
        except (dkim.DKIMException, ValueError, TypeError, KeyError):
            self.unusable = True
        return record


def _tag(signature: bytes, tag: bytes) -> str:
    match = re.search(rb"(?:^|;)\s*" + tag + rb"\s*=\s*([^;\s]*)", signature)
    return match.group(1).decode("ascii", "replace") if match else ""


def _verify_one(
    checker: dkim.DKIM, idx: int, header: bytes, resolver: dns.resolver.Resolver
) -> DKIMResult:
    domain, selector = _tag(header, b"d").lower(), _tag(header, b"s")
    try:
        prepared = checker.verify_headerprep(idx)
    except dkim.DKIMException:  # malformed or expired signature field
        prepared = False
    if not prepared:
        return DKIMResult(domain, selector, "permerror")
    sig, include, sigheaders = prepared
    watch = _KeyWatch(resolver)
    try:
        valid = checker.verify_sig(sig, include, sigheaders[idx], watch)
    except dkim.ValidationError:  # body hash mismatch
        return DKIMResult(domain, selector, "fail")
    except dkim.DKIMException:
        return DKIMResult(domain, selector, "permerror")
    if valid:
        return DKIMResult(domain, selector, "pass")
    if watch.temporary:
        return DKIMResult(domain, selector, "temperror")
    return DKIMResult(domain, selector, "permerror" if watch.unusable else "fail")


def verify(
    message: bytes, resolver: dns.resolver.Resolver, timeout: float = 5.0
) -> list[DKIMResult]:
    """Check every DKIM-Signature, top first; ``[none]`` when there is no signature."""
    try:
        checker = dkim.DKIM(message, timeout=timeout)
    except dkim.DKIMException:
        return [DKIMResult("", "", "permerror")]
    headers = [value for name, value in checker.headers if name.lower() == b"dkim-signature"]
    if not headers:
        return [DKIMResult("", "", "none")]
    return [_verify_one(checker, idx, value, resolver) for idx, value in enumerate(headers)]


async def verify_async(
    message: bytes,
    resolver: dns.resolver.Resolver,
    timeout: float = 5.0,
    executor: Executor | None = None,
) -> list[DKIMResult]:
    """:func:`verify` in a thread (its DNS lookups and RSA checks block)."""
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(executor, verify, message, resolver, timeout)


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
    "record_line",
    "record_value",
    "signed_headers",
    "verify",
    "verify_async",
]
