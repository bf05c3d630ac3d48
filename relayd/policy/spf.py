"""SPF (RFC 7208): is this client allowed to send for the envelope sender's domain?

pyspf does the evaluation. It does its DNS through the module-level hook
``spf.DNSLookup``, which by default asks the system resolver and so would
ignore ``[dns] nameservers``. Replacing that hook with a fixed resolver
would make every config share one; instead the hook installed here looks
up the resolver of the call in progress in a context variable, so two
checks with different resolvers (e.g. across a reload) can run at once in
different threads. The hook never calls dnspython's deprecated
``dns.resolver.query``, which pyspf's own hook does.

pyspf is synchronous; :func:`check_spf_async` runs it in the dedicated
``relayd.workers.SPF`` pool (never asyncio's default executor) with a
deadline, so a slow DNS server never stalls other sessions or password
checks. The ``Received-SPF:`` field is folded (relayd.fold): a long HELO
or sender cannot make a line over 998 octets.
"""

from __future__ import annotations

import asyncio
import contextvars
import re
from dataclasses import dataclass
from typing import Any

import dns.resolver
import spf

from relayd import dns as rdns
from relayd import workers
from relayd.config import SPFConfig
from relayd.fold import fold
from relayd.policy.verdict import Refuse, Verdict

RESULTS = ("pass", "fail", "softfail", "neutral", "none", "temperror", "permerror")

# RFC 7208 §4.6.4 suggests at least 20 seconds for the whole check.
DEFAULT_TIMEOUT = 20.0

_resolver: contextvars.ContextVar[dns.resolver.Resolver | None] = contextvars.ContextVar(
    "relayd_spf_resolver", default=None
)


@dataclass(frozen=True)
class SPFResult:
    """The outcome of one check.

    ``identity`` is "mailfrom" or "helo" (the latter when MAIL FROM was
    ``<>``); ``domain`` is the domain that identity names, which DMARC
    compares with the From: domain.
    """

    result: str
    explanation: str
    identity: str
    domain: str


def _dns_lookup(name: str, qtype: str, strict: Any = True, timeout: float = 20.0) -> list[Any]:
    """pyspf's DNSLookup contract: [((name, type), value), ...]; TempError on failure."""
    resolver = _resolver.get() or dns.resolver.get_default_resolver()
    try:
        answers = rdns.query(resolver, name, qtype, timeout)
    except rdns.DNSTempError as exc:
        raise spf.TempError(str(exc)) from exc
    return [((name, qtype), _value(qtype, rdata)) for rdata in answers]


def _value(qtype: str, rdata: Any) -> Any:
    """An rdata in the shape pyspf's own dnspython driver gives it."""
    if qtype in ("A", "AAAA"):
        return rdata.address
    if qtype == "MX":
        return (rdata.preference, rdata.exchange.to_text(True))
    if qtype == "PTR":
        return rdata.target.to_text(True)
    return rdata.strings  # TXT (and the obsolete SPF type)


def _install_hook() -> None:
    if spf.DNSLookup is not _dns_lookup:
        spf.DNSLookup = _dns_lookup


_install_hook()


def _bare(mail_from: str) -> str:
    """``<a@b>`` or ``a@b`` → ``a@b``; ``<>`` → ``""``."""
    address = mail_from.strip()
    if address.startswith("<") and address.endswith(">"):
        address = address[1:-1]
    return address


def identity_of(helo: str, mail_from: str) -> tuple[str, str]:
    """(identity, domain) that SPF checks: MAIL FROM's domain, or HELO for ``<>``."""
    sender = _bare(mail_from)
    if not sender:
        return "helo", helo.lower().rstrip(".")
    _, domain = spf.split_email(sender, helo)
    return "mailfrom", str(domain).lower().rstrip(".")


def check_spf(
    ip: str,
    helo: str,
    mail_from: str,
    resolver: dns.resolver.Resolver,
    timeout: float = DEFAULT_TIMEOUT,
) -> SPFResult:
    """Evaluate SPF for one client, blocking; ``timeout`` bounds all its lookups."""
    identity, domain = identity_of(helo, mail_from)
    _install_hook()
    token = _resolver.set(resolver)
    try:
        query = spf.query(i=ip, s=_bare(mail_from), h=helo, timeout=timeout, querytime=timeout)
        result, _code, explanation = query.check()
    except (spf.PermError, ValueError) as exc:
        result, explanation = "permerror", f"SPF Permanent Error: {exc}"
    finally:
        _resolver.reset(token)
    if result not in RESULTS:  # "ambiguous" exists only in pyspf's harsh mode
        result = "permerror"
    return SPFResult(str(result), str(explanation), identity, domain)


async def check_spf_async(
    ip: str,
    helo: str,
    mail_from: str,
    resolver: dns.resolver.Resolver,
    timeout: float = DEFAULT_TIMEOUT,
) -> SPFResult:
    """:func:`check_spf` in the SPF pool; past ``timeout`` the answer is temperror.

    ``timeout`` covers the wait for a free thread too. The thread is not
    killed at the deadline, but its own lookups are bounded by the same
    timeout, so it ends soon after.
    """
    try:
        async with asyncio.timeout(timeout):
            return await workers.SPF.run(check_spf, ip, helo, mail_from, resolver, timeout)
    except TimeoutError:
        identity, domain = identity_of(helo, mail_from)
        return SPFResult("temperror", "SPF check timed out", identity, domain)


_UNSAFE = re.compile(r"[^\x20-\x7e]")


def _printable(text: str, limit: int = 200) -> str:
    """DNS-supplied text made safe for one SMTP reply line."""
    return _UNSAFE.sub("?", text)[:limit]


def spf_verdict(result: SPFResult, cfg: SPFConfig) -> Verdict:
    """Refuse on fail (and softfail) when configured to; ask for a retry on temperror.

    Every other result is accepted and only recorded in the headers: RFC 7208
    leaves neutral, none and permerror to local policy, and rejecting on a
    sender's broken record would lose mail over a typo.
    """
    if not cfg.enabled:
        return None
    if result.result == "fail" and cfg.on_fail == "reject":
        return _reject(result)
    if result.result == "softfail" and cfg.on_softfail == "reject":
        return _reject(result)
    if result.result == "temperror":
        return Refuse(
            451, "4.7.24", f"SPF temporary error for {_printable(result.domain)}, try again later"
        )
    return None


def _reject(result: SPFResult) -> Refuse:
    why = _printable(result.explanation) or "not authorized"
    return Refuse(550, "5.7.23", f"SPF {result.result} for {_printable(result.domain)}: {why}")


_DOT_ATOM = re.compile(r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _quote(value: str) -> str:
    """A key-value pair's value: a dot-atom as is, anything else quoted."""
    value = _CONTROL.sub("", value)
    if _DOT_ATOM.match(value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _comment_text(text: str) -> str:
    """Text that cannot end or nest a header comment."""
    return re.sub(r"[()\\]", "", _CONTROL.sub("", text))


def _comment(result: SPFResult, ip: str) -> str:
    domain = result.domain
    texts = {
        "pass": f"domain of {domain} designates {ip} as permitted sender",
        "fail": f"domain of {domain} does not designate {ip} as permitted sender",
        "softfail": f"transitioning domain of {domain} does not designate {ip} as permitted sender",
        "neutral": f"{ip} is neither permitted nor denied by domain of {domain}",
        "none": f"domain of {domain} does not designate permitted sender hosts",
        "temperror": f"temporary error in processing during lookup of {domain}",
        "permerror": f"permanent error in processing domain of {domain}",
    }
    return texts.get(result.result, f"SPF {result.result} for {domain}")


def received_spf_header(
    result: SPFResult, hostname: str, ip: str, helo: str, mail_from: str
) -> str:
    """The value of a ``Received-SPF:`` field (RFC 7208 §9.1), without the name.

    Every piece a client chose (HELO, MAIL FROM) is quoted or stripped so it
    cannot end the field or smuggle in another header.
    """
    comment = _comment_text(f"{hostname}: {_comment(result, ip)}")
    pairs = [
        f"client-ip={_quote(ip)}",
        f"envelope-from={_quote(_bare(mail_from))}",
        f"helo={_quote(helo)}",
        f"receiver={_quote(hostname)}",
        f"identity={result.identity}",
    ]
    return f"{result.result} ({comment}) " + "; ".join(pairs)


def received_spf_field(
    result: SPFResult, hostname: str, ip: str, helo: str, mail_from: str
) -> bytes:
    """The whole ``Received-SPF:`` field, folded, ending in CRLF."""
    return fold("Received-SPF", received_spf_header(result, hostname, ip, helo, mail_from))


__all__ = [
    "DEFAULT_TIMEOUT",
    "RESULTS",
    "SPFResult",
    "check_spf",
    "check_spf_async",
    "identity_of",
    "received_spf_field",
    "received_spf_header",
    "spf_verdict",
]
