"""Inbound DKIM verification that one message cannot turn into a denial of service.

Three bounds, each against an attack seen in the wild:

- at most :data:`MAX_SIGNATURES` signatures are verified, the first in
  header order; the rest are reported together as ``dkim=neutral (not
  checked ...)``. Each signature may cost a DNS lookup, so a header block of
  fifty signatures would otherwise buy fifty lookups;
- everything happens before one deadline (the caller's share of
  ``2 x [dns] timeout``): the key lookups run in parallel on the event
  loop's asyncio resolver, never in a thread, and whatever has no answer at
  the deadline is ``temperror``;
- the body is read through :meth:`Content.chunks` and canonicalized as a
  stream (relayd.bodyhash): memory stays at one read buffer whatever the
  message size. dkimpy is given only the header block and checks the header
  hash and the signature; the body hash it would compute over the whole
  body is compared here instead, and its ``bh=`` removed before dkimpy
  sees the signature.

The CPU work (body hash, RSA/Ed25519) runs in the dedicated
``relayd.workers.VERIFY`` pool, never in asyncio's default executor.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import dkim
import dns.asyncresolver
import dns.resolver
from dkim.canonicalization import CanonicalizationPolicy

from relayd import dns as rdns
from relayd import workers
from relayd.bodyhash import BodyHashes, BodySpec
from relayd.dkim import DKIMResult
from relayd.smtpd.content import Content

MAX_SIGNATURES = 5

_TEMP = object()  # a key lookup that got no answer in time
KeyRecord = bytes | None | object


@dataclass(frozen=True)
class Signature:
    """One DKIM-Signature field, parsed far enough to plan its checks."""

    index: int  # among the message's DKIM-Signature fields, top first
    domain: str
    selector: str
    fields: dict[bytes, bytes] | None  # None: unusable field (permerror)
    include: tuple[bytes, ...] = ()
    body: BodySpec | None = None
    key_name: str = ""


@dataclass(frozen=True)
class Plan:
    """What the header block says: the signatures to verify and how many were skipped."""

    checker: dkim.DKIM | None  # None: dkimpy cannot parse the header block
    signatures: tuple[Signature, ...]
    skipped: int


def _tag(signature: bytes, tag: bytes) -> str:
    match = re.search(rb"(?:^|;)\s*" + tag + rb"\s*=\s*([^;\s]*)", signature)
    return match.group(1).decode("ascii", "replace") if match else ""


def _hash_name(algorithm: bytes) -> str:
    return str(dkim.HASH_ALGORITHMS[algorithm]().name)


def _signature(checker: dkim.DKIM, index: int, value: bytes) -> Signature:
    domain, selector = _tag(value, b"d").lower(), _tag(value, b"s")
    try:
        prepared = checker.verify_headerprep(index)
        fields = prepared[0]
        policy = CanonicalizationPolicy.from_c_value(fields.get(b"c", b"simple/simple"))
        limit = int(fields[b"l"]) if b"l" in fields else None
        body: BodySpec = (policy.body_algorithm.name.decode(), _hash_name(fields[b"a"]), limit)
        name = (fields[b"s"] + b"._domainkey." + fields[b"d"] + b".").decode("ascii")
    except Exception:  # any malformed field (dkimpy raises several types): permerror
        return Signature(index, domain, selector, None)
    return Signature(index, domain, selector, fields, tuple(prepared[1]), body, name)


def plan(header: bytes, limit: int = MAX_SIGNATURES) -> Plan:
    """Parse the header block and pick the first ``limit`` signatures."""
    try:
        checker = dkim.DKIM(header + b"\r\n")
    except dkim.DKIMException:
        return Plan(None, (), 0)
    values = [value for name, value in checker.headers if name.lower() == b"dkim-signature"]
    chosen = tuple(_signature(checker, i, v) for i, v in enumerate(values[:limit]))
    return Plan(checker, chosen, max(0, len(values) - limit))


def _body_start(content: Content) -> int:
    """The body starts after the blank line that ends the header block, if there is one."""
    return min(content.body_offset + 2, content.size)


def body_digests(
    content: Content, specs: list[BodySpec], deadline: float
) -> dict[BodySpec, bytes] | None:
    """Stream the body once for every spec; None when ``deadline`` (monotonic) passes first."""
    hashes = BodyHashes(specs)
    for piece in content.chunks(_body_start(content)):
        if time.monotonic() > deadline:
            return None
        hashes.feed(piece)
    return hashes.digests()


def _prefetched(record: bytes | None, watch: dict[str, bool]) -> Callable[..., bytes | None]:
    """A dkimpy ``dnsfunc`` answering with the key fetched beforehand."""

    def dnsfunc(name: bytes, timeout: float = 5.0) -> bytes | None:
        try:
            dkim.evaluate_pk(name, record)
        except (dkim.DKIMException, ValueError, TypeError, KeyError, binascii.Error):
            watch["unusable"] = True
        return record

    return dnsfunc


def check(
    checker: dkim.DKIM, sig: Signature, record: KeyRecord, digest: bytes | None
) -> DKIMResult:
    """One signature's verdict from its key record and the streamed body hash."""
    domain, selector = sig.domain, sig.selector
    if sig.fields is None:
        return DKIMResult(domain, selector, "permerror")
    try:
        expected = base64.b64decode(re.sub(rb"\s+", b"", sig.fields[b"bh"]))
    except (binascii.Error, ValueError):
        return DKIMResult(domain, selector, "permerror")
    if digest is not None and digest != expected:
        return DKIMResult(domain, selector, "fail", "body hash mismatch")
    if record is _TEMP or digest is None:
        return DKIMResult(domain, selector, "temperror")
    assert record is None or isinstance(record, bytes)
    fields = {tag: value for tag, value in sig.fields.items() if tag != b"bh"}
    watch = {"unusable": False}
    try:
        valid = checker.verify_sig(
            fields, list(sig.include), _sig_header(checker, sig), _prefetched(record, watch)
        )
    except dkim.ValidationError:
        return DKIMResult(domain, selector, "fail")
    except Exception:  # hostile input deep in dkimpy: this signature is unusable
        return DKIMResult(domain, selector, "permerror")
    if valid:
        return DKIMResult(domain, selector, "pass")
    return DKIMResult(domain, selector, "permerror" if watch["unusable"] else "fail")


def _sig_header(checker: dkim.DKIM, sig: Signature) -> tuple[bytes, bytes]:
    headers = [(n, v) for n, v in checker.headers if n.lower() == b"dkim-signature"]
    name, value = headers[sig.index]
    return (name, value)


def check_all(
    the_plan: Plan, records: list[KeyRecord], digests: dict[BodySpec, bytes] | None
) -> list[DKIMResult]:
    assert the_plan.checker is not None
    out: list[DKIMResult] = []
    for sig, record in zip(the_plan.signatures, records, strict=True):
        digest = digests.get(sig.body) if digests is not None and sig.body else None
        out.append(check(the_plan.checker, sig, record, digest))
    return out


def _pick_key(records: list[Any]) -> bytes | None:
    """The first TXT record (strings joined), preferring one that says v=DKIM1."""
    keys = [b"".join(rdata.strings) for rdata in records]
    for key in keys:
        if key.lstrip().startswith(b"v=DKIM1"):
            return key
    return keys[0] if keys else None


async def fetch_key(resolver: dns.asyncresolver.Resolver, name: str, deadline: float) -> KeyRecord:
    """The key record at ``name``; :data:`_TEMP` on a DNS failure or past ``deadline``."""
    if not name:
        return None
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout_at(deadline):
            remaining = max(0.01, deadline - loop.time())
            return _pick_key(await rdns.query_async(resolver, name, "TXT", remaining))
    except (TimeoutError, rdns.DNSTempError):
        return _TEMP


def fetch_key_sync(resolver: dns.resolver.Resolver, name: str, deadline: float) -> KeyRecord:
    """:func:`fetch_key` for callers outside asyncio."""
    if not name:
        return None
    try:
        remaining = max(0.01, deadline - time.monotonic())
        return _pick_key(rdns.query(resolver, name, "TXT", remaining))
    except rdns.DNSTempError:
        return _TEMP


def not_checked(skipped: int) -> DKIMResult:
    """The one result that stands for every signature past the first five."""
    return DKIMResult(
        "",
        "",
        "neutral",
        f"not checked: {skipped} more signature{'s' if skipped != 1 else ''}, "
        f"only the first {MAX_SIGNATURES} are verified",
    )


def _finish(the_plan: Plan, results: list[DKIMResult]) -> list[DKIMResult]:
    if the_plan.skipped:
        results.append(not_checked(the_plan.skipped))
    return results


async def verify_content(
    content: Content, resolver: dns.asyncresolver.Resolver, deadline: float
) -> list[DKIMResult]:
    """Verify ``content``'s signatures before ``deadline`` (event loop time).

    Never raises for a slow DNS server or a busy pool: what did not finish
    in time is ``temperror``.
    """
    try:
        async with asyncio.timeout_at(deadline):
            the_plan = await workers.VERIFY.run(plan, content.header)
    except TimeoutError:
        return [DKIMResult("", "", "temperror")]
    if the_plan.checker is None:
        return [DKIMResult("", "", "permerror")]
    if not the_plan.signatures:
        return [DKIMResult("", "", "none")]
    specs = [sig.body for sig in the_plan.signatures if sig.body is not None]
    keys = asyncio.gather(*(fetch_key(resolver, s.key_name, deadline) for s in the_plan.signatures))
    records, digests = await asyncio.gather(keys, _digests(content, specs, deadline))
    try:
        async with asyncio.timeout_at(deadline):
            results = await workers.VERIFY.run(check_all, the_plan, records, digests)
    except TimeoutError:
        results = [DKIMResult(s.domain, s.selector, "temperror") for s in the_plan.signatures]
    return _finish(the_plan, results)


async def _digests(
    content: Content, specs: list[BodySpec], deadline: float
) -> dict[BodySpec, bytes] | None:
    if not specs:
        return {}
    # Thread code sees time.monotonic(), the clock asyncio's loop.time() reads.
    loop = asyncio.get_running_loop()
    thread_deadline = time.monotonic() + (deadline - loop.time())
    try:
        async with asyncio.timeout_at(deadline):
            return await workers.VERIFY.run(body_digests, content, specs, thread_deadline)
    except TimeoutError:
        return None


def verify_sync(
    content: Content, resolver: dns.resolver.Resolver, timeout: float = 5.0
) -> list[DKIMResult]:
    """The same checks, blocking, one after another (tools and tests)."""
    deadline = time.monotonic() + timeout
    the_plan = plan(content.header)
    if the_plan.checker is None:
        return [DKIMResult("", "", "permerror")]
    if not the_plan.signatures:
        return [DKIMResult("", "", "none")]
    records = [fetch_key_sync(resolver, s.key_name, deadline) for s in the_plan.signatures]
    specs = [sig.body for sig in the_plan.signatures if sig.body is not None]
    digests = body_digests(content, specs, deadline + timeout) if specs else {}
    return _finish(the_plan, check_all(the_plan, records, digests))


__all__ = [
    "MAX_SIGNATURES",
    "Plan",
    "Signature",
    "body_digests",
    "check",
    "fetch_key",
    "not_checked",
    "plan",
    "verify_content",
    "verify_sync",
]
