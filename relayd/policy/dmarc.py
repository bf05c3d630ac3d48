"""DMARC (RFC 7489): does the From: domain's owner vouch for this message?

A message passes when SPF passed for a domain aligned with the From:
domain, or a DKIM signature verified for one. "Aligned" is exact equality
in strict mode and "same organizational domain" in relaxed mode (the
default).

The organizational domain should come from the Public Suffix List. relayd
does not ship that list; it takes the last two labels of a name, or the
last three when the last two are one of a few well-known registry suffixes
such as ``co.uk`` (:data:`TWO_LABEL_SUFFIXES`). Under other multi-label
public suffixes relaxed alignment is therefore looser than it should be,
and a policy published only at such a domain's organizational level may be
missed; strict alignment (``adkim=s; aspf=s``) is unaffected.

Policy records are fetched at ``_dmarc.<From domain>`` and, when there is
none, at ``_dmarc.<organizational domain>``, where ``sp=`` (if given)
applies to subdomains. ``pct=`` below 100 is honoured without dice: the
sender is still testing, so a failure is never treated as ``reject``.

The lookup does DNS (through relayd.dns); :func:`evaluate` is a plain
function of its results, so it is tested without a network.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import dns.asyncresolver
import dns.resolver

from relayd import dns as rdns
from relayd.config import DMARCConfig
from relayd.dkim import DKIMResult, normalize_domain
from relayd.policy.spf import SPFResult
from relayd.policy.verdict import Refuse, Verdict

DMARCStatus = Literal["pass", "fail", "none", "temperror", "permerror"]
LookupStatus = Literal["found", "none", "temperror", "permerror"]

POLICIES = ("none", "quarantine", "reject")

TWO_LABEL_SUFFIXES = frozenset(
    {
        "co.uk", "org.uk", "ac.uk", "gov.uk", "me.uk", "ltd.uk", "plc.uk",
        "com.au", "net.au", "org.au", "edu.au", "gov.au",
        "co.nz", "org.nz", "net.nz", "co.jp", "ne.jp", "or.jp", "ac.jp",
        "com.br", "net.br", "org.br", "co.za", "org.za", "com.cn", "net.cn",
        "org.cn", "co.in", "net.in", "org.in", "com.mx", "com.tr", "co.kr",
        "com.tw", "com.sg", "com.hk", "co.il", "com.ar", "co.id", "com.my",
    }
)  # fmt: skip


@dataclass(frozen=True)
class DMARCRecord:
    """A parsed policy record; ``sp`` is None when the record has none."""

    p: str
    sp: str | None = None
    adkim: str = "r"
    aspf: str = "r"
    pct: int = 100


@dataclass(frozen=True)
class PolicyLookup:
    """What DNS said: a record (and whether it came from the organizational domain)."""

    status: LookupStatus
    record: DMARCRecord | None = None
    from_org: bool = False


@dataclass(frozen=True)
class DMARCResult:
    """``policy`` is the one that applies to this message ("" when there is none)."""

    result: DMARCStatus
    policy: str
    domain: str


def org_domain(domain: str) -> str:
    """The organizational domain by the heuristic in the module docstring."""
    labels = normalize_domain(domain).split(".")
    keep = 3 if ".".join(labels[-2:]) in TWO_LABEL_SUFFIXES else 2
    return ".".join(labels[-keep:])


def _tags(text: str) -> dict[str, str]:
    tags: dict[str, str] = {}
    for part in text.split(";"):
        name, sep, value = part.partition("=")
        if sep:
            tags.setdefault(name.strip().lower(), value.strip())
    return tags


def is_dmarc(text: str) -> bool:
    """A TXT record is a DMARC record when it starts with ``v=DMARC1``."""
    name, sep, value = text.partition(";")[0].partition("=")
    return bool(sep) and name.strip() == "v" and value.strip() == "DMARC1"


def parse_record(text: str) -> DMARCRecord | None:
    """Parse a ``v=DMARC1`` record; None when it is unusable (RFC 7489 §6.6.3).

    A record without a valid p= but with a rua= is read as p=none, as the
    RFC asks, since its owner at least wants reports.
    """
    tags = _tags(text)
    p, sp = tags.get("p", "").lower(), tags.get("sp", "").lower() or None
    if p not in POLICIES or (sp is not None and sp not in POLICIES):
        return DMARCRecord("none") if tags.get("rua") else None
    adkim, aspf = tags.get("adkim", "r").lower(), tags.get("aspf", "r").lower()
    pct = tags.get("pct", "100")
    return DMARCRecord(
        p=p,
        sp=sp,
        adkim=adkim if adkim in ("r", "s") else "r",
        aspf=aspf if aspf in ("r", "s") else "r",
        pct=min(100, max(0, int(pct))) if pct.isdigit() else 100,
    )


def _pick(records: list[str]) -> tuple[LookupStatus, DMARCRecord | None]:
    """One name's TXT records → a status; several DMARC records count as none."""
    candidates = [text for text in records if is_dmarc(text)]
    if len(candidates) != 1:
        return "none", None
    record = parse_record(candidates[0])
    return ("found", record) if record else ("permerror", None)


def _combine(
    first: tuple[LookupStatus, DMARCRecord | None],
    org: tuple[LookupStatus, DMARCRecord | None] | None,
) -> PolicyLookup:
    if first[0] != "none" or org is None:
        return PolicyLookup(first[0], first[1])
    return PolicyLookup(org[0], org[1], from_org=True)


def fetch_policy(resolver: dns.resolver.Resolver, from_domain: str) -> PolicyLookup:
    """Find the policy record for ``from_domain`` (blocking)."""
    domain, org = normalize_domain(from_domain), org_domain(from_domain)
    try:
        first = _pick(rdns.txt_records(resolver, f"_dmarc.{domain}"))
        fallback = None
        if first[0] == "none" and org != domain:
            fallback = _pick(rdns.txt_records(resolver, f"_dmarc.{org}"))
    except rdns.DNSTempError:
        return PolicyLookup("temperror")
    return _combine(first, fallback)


async def fetch_policy_async(
    resolver: dns.asyncresolver.Resolver, from_domain: str
) -> PolicyLookup:
    """:func:`fetch_policy` for asyncio code."""
    domain, org = normalize_domain(from_domain), org_domain(from_domain)
    try:
        first = _pick(await rdns.txt_records_async(resolver, f"_dmarc.{domain}"))
        fallback = None
        if first[0] == "none" and org != domain:
            fallback = _pick(await rdns.txt_records_async(resolver, f"_dmarc.{org}"))
    except rdns.DNSTempError:
        return PolicyLookup("temperror")
    return _combine(first, fallback)


def aligned(domain: str, from_domain: str, mode: str) -> bool:
    """Identifier alignment: strict = same name, relaxed = same organizational domain."""
    if not domain:
        return False
    a, b = normalize_domain(domain), normalize_domain(from_domain)
    return a == b if mode == "s" else org_domain(a) == org_domain(b)


def _applied_policy(lookup: PolicyLookup) -> str:
    record = lookup.record
    assert record is not None
    policy = record.sp if lookup.from_org and record.sp else record.p
    if policy == "reject" and record.pct < 100:
        return "quarantine"  # the owner is still rolling the policy out
    return policy


def evaluate(
    from_domain: str | None,
    spf: SPFResult | None,
    dkim: list[DKIMResult],
    lookup: PolicyLookup,
) -> DMARCResult:
    """The DMARC result for a message, from what SPF, DKIM and DNS said.

    ``from_domain`` is None when the message has no usable From: (none, or
    several domains); RFC 7489 leaves that to local policy, and it is
    reported as permerror so it is visible without refusing the mail.
    """
    if from_domain is None:
        return DMARCResult("permerror", "", "")
    domain = normalize_domain(from_domain)
    if lookup.status != "found" or lookup.record is None:
        status: DMARCStatus = "none" if lookup.status == "found" else lookup.status
        return DMARCResult(status, "", domain)
    record = lookup.record
    spf_ok = spf is not None and spf.result == "pass" and aligned(spf.domain, domain, record.aspf)
    dkim_ok = any(r.result == "pass" and aligned(r.domain, domain, record.adkim) for r in dkim)
    result: DMARCStatus = "pass" if spf_ok or dkim_ok else "fail"
    return DMARCResult(result, _applied_policy(lookup), domain)


def check_dmarc(
    resolver: dns.resolver.Resolver,
    from_domain: str | None,
    spf: SPFResult | None,
    dkim: list[DKIMResult],
) -> DMARCResult:
    """Fetch the policy and evaluate (blocking)."""
    if from_domain is None:
        return evaluate(None, spf, dkim, PolicyLookup("none"))
    return evaluate(from_domain, spf, dkim, fetch_policy(resolver, from_domain))


async def check_dmarc_async(
    resolver: dns.asyncresolver.Resolver,
    from_domain: str | None,
    spf: SPFResult | None,
    dkim: list[DKIMResult],
) -> DMARCResult:
    """:func:`check_dmarc` for asyncio code."""
    if from_domain is None:
        return evaluate(None, spf, dkim, PolicyLookup("none"))
    return evaluate(from_domain, spf, dkim, await fetch_policy_async(resolver, from_domain))


def dmarc_verdict(result: DMARCResult, cfg: DMARCConfig) -> Verdict:
    """Refuse only a failure under ``p=reject``, and only when the operator asked to."""
    if result.result == "fail" and result.policy == "reject" and cfg.on_reject == "reject":
        return Refuse(550, "5.7.1", f"message rejected by the DMARC policy of {result.domain}")
    return None


__all__ = [
    "POLICIES",
    "TWO_LABEL_SUFFIXES",
    "DMARCRecord",
    "DMARCResult",
    "PolicyLookup",
    "aligned",
    "check_dmarc",
    "check_dmarc_async",
    "dmarc_verdict",
    "evaluate",
    "fetch_policy",
    "fetch_policy_async",
    "is_dmarc",
    "org_domain",
    "parse_record",
]
