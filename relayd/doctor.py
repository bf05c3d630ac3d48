"""``relayctl doctor``: is the DNS around relayd right? (SPEC §10)

For each domain relayd signs (``[[dkim.key]]``) or serves (``[relay]
domains``), or those named on the command line: MX, SPF (this host's
addresses allowed), each DKIM key's record, DMARC, MTA-STS and TLS-RPT;
then, for the host itself: forward-confirmed reverse DNS of each address,
the TLS certificate, and the DNS blocklists. Each check gives ``ok``,
``warn`` or ``fail``, a detail, and the record to publish when one is
missing or wrong.

``fail`` means one of the SPEC's conditions does not hold (mail from this
host will be refused, junked or unverifiable somewhere); ``warn`` is advice
that does not break anything by itself (a DMARC policy of ``none``, a
blocklist that would not answer). It reads DNS through ``[dns]
nameservers`` and the local key and certificate files; the daemon may be
down.

The checks are plain functions of what DNS said (lists of strings, or a
:class:`Lookup` holding the error); :class:`DNS` is the thin layer that
asks. SPF is the exception: pyspf evaluates the record with its own
lookups, through the same resolver (relayd.policy.spf).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import dns.resolver
import dns.reversename

from relayd import dns as rdns
from relayd.config import Config, DKIMKey

Status = Literal["ok", "warn", "fail"]
CHECKS = ("mx", "spf", "dkim", "dmarc", "ptr", "tls", "mta-sts", "tls-rpt", "dnsbl")
CERT_MIN_DAYS = 14


@dataclass(frozen=True)
class Check:
    """One line of the report. ``record`` is a zone-file line, or None."""

    domain: str
    check: str
    status: Status
    detail: str
    record: str | None = None


def report_json(checks: Sequence[Check]) -> dict[str, Any]:
    """The ``--json`` document: ``{"ok": bool, "checks": [...]}``."""
    return {"ok": all(c.status != "fail" for c in checks), "checks": [asdict(c) for c in checks]}


def report_lines(checks: Sequence[Check]) -> list[str]:
    """One line per check: status, check, domain, detail, and what to publish."""
    width = max([len(c.domain) for c in checks] or [0])
    lines = []
    for c in checks:
        line = f"{c.status:<4}  {c.check:<7}  {c.domain:<{width}}  {c.detail}"
        if c.record:
            line += f"; publish: {c.record}"
        lines.append(_printable(line))
    return lines


def _printable(text: str) -> str:
    """DNS text is anyone's: no control characters reach the terminal."""
    return re.sub(r"[\x00-\x1f\x7f]", "?", text)


# ---- what DNS said ----------------------------------------------------------------


@dataclass(frozen=True)
class Lookup:
    """An answer (possibly empty), or why there is none."""

    values: tuple[str, ...] = ()
    error: str | None = None

    @property
    def failed(self) -> bool:
        return self.error is not None


def _txt_line(name: str, text: str) -> str:
    """A TXT zone-file line; text over 255 octets is cut into strings, as TXT requires."""
    chunks = " ".join(
        '"' + text[i : i + 255].replace("\\", "\\\\").replace('"', '\\"') + '"'
        for i in range(0, len(text), 255)
    )
    return f"{name}. IN TXT {chunks}"


def _tags(text: str) -> dict[str, str]:
    """``k=v; k=v`` → a dict (first one wins), names lower-cased, values stripped."""
    tags: dict[str, str] = {}
    for part in text.split(";"):
        name, sep, value = part.partition("=")
        if sep:
            tags.setdefault(name.strip().lower(), value.strip())
    return tags


def _starts(text: str, version: str) -> bool:
    name, sep, value = text.partition(";")[0].partition("=")
    return bool(sep) and name.strip().lower() == "v" and value.strip() == version


def _lookup_failed(domain: str, check: str, lookup: Lookup) -> Check:
    return Check(domain, check, "fail", f"DNS lookup failed: {lookup.error}")


# ---- MX -------------------------------------------------------------------------


def check_mx(
    domain: str, hostname: str, served: bool, mx: Lookup, has_address: Callable[[str], bool]
) -> Check:
    """``mx`` holds "PREF HOST" strings. A served domain should point at this host."""
    hostname = hostname.lower().rstrip(".")
    suggest = f"{domain}. IN MX 10 {hostname}."
    if mx.failed:
        return _lookup_failed(domain, "mx", mx)
    if not mx.values:
        why = "relayd receives its mail" if served else "receivers check it for senders"
        return Check(domain, "mx", "fail", f"no MX record ({why})", suggest)
    records = sorted((int(p), h.lower().rstrip(".")) for p, h in (v.split() for v in mx.values))
    hosts = [host for _, host in records]
    shown = ", ".join(f"{pref} {host}" for pref, host in records)
    if hosts == [""]:
        if served:
            return Check(
                domain,
                "mx",
                "fail",
                "null MX (RFC 7505): the domain takes no mail, yet relayd serves it",
                suggest,
            )
        return Check(domain, "mx", "ok", "null MX (RFC 7505): the domain takes no mail")
    dead = [host for host in hosts if host and not has_address(host)]
    if dead:
        return Check(domain, "mx", "fail", f"{shown}: {', '.join(dead)} has no address")
    if served and hostname not in hosts:
        return Check(domain, "mx", "warn", f"{shown}: none is {hostname}, which serves this domain")
    return Check(domain, "mx", "ok", shown)


# ---- SPF ----------------------------------------------------------------------


def spf_record(txt: Sequence[str]) -> list[str]:
    return [text for text in txt if text.lower() == "v=spf1" or text.lower().startswith("v=spf1 ")]


def spf_suggestion(domain: str, current: str | None, addresses: Sequence[str]) -> str:
    """The SPF record with every address added before the ``all`` term."""
    mechanisms = [
        f"ip6:{a}" if ipaddress.ip_address(a).version == 6 else f"ip4:{a}" for a in addresses
    ]
    terms = (current or "v=spf1 -all").split()[1:]
    ending = [t for t in terms if t.lower().lstrip("+-~?") == "all" or t.startswith("redirect=")]
    middle = [
        t for t in terms if t not in ending and t.lower() not in (m.lower() for m in mechanisms)
    ]
    if not ending:
        ending = ["-all"]
    return _txt_line(domain, " ".join(["v=spf1", *middle, *mechanisms, *ending]))


def check_spf(
    domain: str, txt: Lookup, addresses: Sequence[str], results: dict[str, tuple[str, str]]
) -> Check:
    """``results`` maps each address to pyspf's (result, explanation) for this domain."""
    if txt.failed:
        return _lookup_failed(domain, "spf", txt)
    records = spf_record(txt.values)
    if not records:
        return Check(
            domain, "spf", "fail", "no SPF record", spf_suggestion(domain, None, addresses)
        )
    if len(records) > 1:
        return Check(
            domain,
            "spf",
            "fail",
            f"{len(records)} SPF records (receivers see a permerror): publish one",
            spf_suggestion(domain, records[0], addresses),
        )
    record = records[0]
    if not addresses:
        return Check(
            domain,
            "spf",
            "warn",
            f'"{record}"; no address of this host to check (set [doctor] addresses)',
        )
    bad = {ip: r for ip, r in results.items() if r[0] != "pass"}
    if any(r[0] in ("permerror", "temperror") for r in bad.values()):
        why = "; ".join(f"{ip}: {r[0]} {r[1]}".rstrip() for ip, r in bad.items())
        return Check(
            domain, "spf", "fail", f'"{record}": {why}', spf_suggestion(domain, record, addresses)
        )
    if bad:
        missing = [ip for ip in addresses if ip in bad]
        why = ", ".join(f"{ip} ({bad[ip][0]})" for ip in missing)
        return Check(
            domain,
            "spf",
            "fail",
            f'"{record}" does not allow {why}',
            spf_suggestion(domain, record, addresses),
        )
    if re.search(r"(^|\s)\+?all\b", record.split(" ", 1)[-1]):
        return Check(
            domain,
            "spf",
            "warn",
            f'"{record}" allows every host (+all)',
            spf_suggestion(domain, record, addresses),
        )
    return Check(domain, "spf", "ok", f'"{record}" allows {", ".join(addresses)}')


# ---- DKIM -----------------------------------------------------------------------


def _key_part(value: str) -> tuple[str, str]:
    tags = _tags(value)
    return tags.get("k", "rsa").lower(), re.sub(r"\s+", "", tags.get("p", ""))


def check_dkim(
    domain: str, selector: str, expected: str | None, error: str | None, txt: Lookup
) -> Check:
    """``expected`` is the record text derived from the key file (None with ``error``)."""
    name = f"{selector}._domainkey.{domain}"
    if expected is None:
        return Check(domain, "dkim", "fail", f"selector {selector}: {error}")
    suggest = _txt_line(name, expected)
    if txt.failed:
        return Check(domain, "dkim", "fail", f"selector {selector}: DNS lookup failed: {txt.error}")
    keys = [t for t in txt.values if "p=" in t.replace(" ", "")]
    if not keys:
        return Check(domain, "dkim", "fail", f"no DKIM record at {name}", suggest)
    want = _key_part(expected)
    if len(keys) > 1:
        return Check(
            domain, "dkim", "fail", f"{len(keys)} DKIM records at {name}: publish one", suggest
        )
    got = _key_part(keys[0])
    if not got[1]:
        return Check(domain, "dkim", "fail", f"the key at {name} is revoked (empty p=)", suggest)
    if got != want:
        return Check(
            domain,
            "dkim",
            "fail",
            f"the record at {name} does not match the key relayd signs with",
            suggest,
        )
    return Check(domain, "dkim", "ok", f"selector {selector}: {want[0]} key matches {name}")


# ---- DMARC ---------------------------------------------------------------------


def check_dmarc(domain: str, txt: Lookup, org: str, org_txt: Lookup | None) -> Check:
    """The record at ``_dmarc.DOMAIN``, else at the organizational domain's."""
    suggest = _txt_line(
        f"_dmarc.{domain}", f"v=DMARC1; p=quarantine; rua=mailto:postmaster@{domain}"
    )
    where, lookup = f"_dmarc.{domain}", txt
    records = [t for t in txt.values if _starts(t, "DMARC1")]
    if not txt.failed and not records and org_txt is not None:
        where, lookup = f"_dmarc.{org}", org_txt
        records = [t for t in org_txt.values if _starts(t, "DMARC1")]
    if lookup.failed:
        return _lookup_failed(domain, "dmarc", lookup)
    if not records:
        return Check(domain, "dmarc", "fail", f"no DMARC record at _dmarc.{domain}", suggest)
    if len(records) > 1:
        return Check(
            domain,
            "dmarc",
            "fail",
            f"{len(records)} DMARC records at {where} (receivers ignore them all): publish one",
            suggest,
        )
    tags = _tags(records[0])
    policy = tags.get("p", "").lower()
    if policy not in ("none", "quarantine", "reject"):
        return Check(
            domain,
            "dmarc",
            "fail",
            f"{where}: p= is missing or not none, quarantine or reject",
            suggest,
        )
    pct = tags.get("pct", "100")
    also = f", pct={pct}" if pct != "100" else ""
    also += "" if "rua" in tags else ", no rua= (no aggregate reports)"
    if policy == "none":
        raised = re.sub(r"(?i)(^|;)(\s*)p\s*=\s*none", r"\1\2p=quarantine", records[0], count=1)
        suggest = _txt_line(where, raised)
        return Check(
            domain,
            "dmarc",
            "warn",
            f"policy none at {where}{also}: receivers only "
            "report; move to quarantine or reject once reports look clean",
            suggest,
        )
    return Check(domain, "dmarc", "ok", f"policy {policy} at {where}{also}")


# ---- MTA-STS and TLS-RPT --------------------------------------------------------

_STS_ID = re.compile(r"[A-Za-z0-9]{1,32}")
_RUA = re.compile(r"(mailto:[^\s,!]+@[^\s,!]+|https://\S+)")


def check_sts_and_rpt(domain: str, sts: Lookup, rpt: Lookup) -> list[Check]:
    """Well-formed records, and both or neither (RFC 8461 §3.1, RFC 8460 §3)."""
    sts_name, rpt_name = f"_mta-sts.{domain}", f"_smtp._tls.{domain}"
    rpt_suggest = _txt_line(rpt_name, f"v=TLSRPTv1; rua=mailto:tlsrpt@{domain}")
    out: list[Check] = []
    sts_records = [t for t in sts.values if _starts(t, "STSv1")]
    rpt_records = [t for t in rpt.values if _starts(t, "TLSRPTv1")]
    if sts.failed:
        out.append(_lookup_failed(domain, "mta-sts", sts))
    elif len(sts_records) > 1:
        out.append(
            Check(
                domain,
                "mta-sts",
                "fail",
                f"{len(sts_records)} records at {sts_name} (senders ignore them all): publish one",
            )
        )
    elif sts_records:
        sts_id = _tags(sts_records[0]).get("id", "")
        if _STS_ID.fullmatch(sts_id) and not rpt.failed and not rpt_records:
            out.append(
                Check(
                    domain,
                    "mta-sts",
                    "warn",
                    f"{sts_name} id={sts_id}, but no TLS-RPT record at {rpt_name}",
                    rpt_suggest,
                )
            )
        elif _STS_ID.fullmatch(sts_id):
            out.append(Check(domain, "mta-sts", "ok", f"{sts_name} id={sts_id}"))
        else:
            out.append(
                Check(
                    domain,
                    "mta-sts",
                    "fail",
                    f"{sts_name}: id= must be 1-32 letters and digits",
                    _txt_line(sts_name, "v=STSv1; id=20260101T000000"),
                )
            )
    elif rpt_records:
        out.append(
            Check(
                domain,
                "mta-sts",
                "warn",
                f"TLS-RPT but no MTA-STS record at {sts_name} (fine with DANE alone)",
            )
        )
    else:
        out.append(Check(domain, "mta-sts", "ok", "neither MTA-STS nor TLS-RPT published"))
    if rpt.failed:
        out.append(_lookup_failed(domain, "tls-rpt", rpt))
    elif len(rpt_records) > 1:
        out.append(
            Check(
                domain,
                "tls-rpt",
                "fail",
                f"{len(rpt_records)} records at {rpt_name}: publish one",
                rpt_suggest,
            )
        )
    elif rpt_records:
        rua = _tags(rpt_records[0]).get("rua", "")
        targets = [t.strip() for t in rua.split(",")] if rua else []
        if targets and all(_RUA.fullmatch(t) for t in targets):
            out.append(Check(domain, "tls-rpt", "ok", f"{rpt_name} rua={rua}"))
        else:
            out.append(
                Check(
                    domain,
                    "tls-rpt",
                    "fail",
                    f"{rpt_name}: rua= must be mailto: or https: addresses",
                    rpt_suggest,
                )
            )
    elif sts_records:
        out.append(
            Check(
                domain,
                "tls-rpt",
                "fail",
                f"MTA-STS is published but no TLS-RPT record "
                f"at {rpt_name}: failures would go unreported",
                rpt_suggest,
            )
        )
    else:
        out.append(Check(domain, "tls-rpt", "ok", "neither MTA-STS nor TLS-RPT published"))
    return out


# ---- reverse DNS, certificate, blocklists: the host ----------------------------


def reverse_name(address: str) -> str:
    return dns.reversename.from_address(address).to_text(omit_final_dot=True)


def check_ptr(hostname: str, address: str, ptr: Lookup, forward: Lookup | None) -> Check:
    """PTR names ``hostname``, and ``hostname`` resolves back to ``address`` (FCrDNS)."""
    host = hostname.lower().rstrip(".")
    suggest = f"{reverse_name(address)}. IN PTR {host}."
    if ptr.failed:
        return Check(host, "ptr", "fail", f"{address}: DNS lookup failed: {ptr.error}")
    names = [n.lower().rstrip(".") for n in ptr.values]
    if not names:
        return Check(
            host,
            "ptr",
            "fail",
            f"{address} has no PTR record (ask whoever runs the address block)",
            suggest,
        )
    if host not in names:
        return Check(
            host, "ptr", "fail", f"{address} points to {', '.join(names)}, not {host}", suggest
        )
    if forward is None or forward.failed:
        why = forward.error if forward is not None else "not looked up"
        return Check(host, "ptr", "fail", f"{address} -> {host}, whose lookup failed: {why}")
    if ipaddress.ip_address(address) not in {ipaddress.ip_address(a) for a in forward.values}:
        rtype = "AAAA" if ipaddress.ip_address(address).version == 6 else "A"
        return Check(
            host,
            "ptr",
            "fail",
            f"{address} -> {host}, but {host} does not resolve to {address}",
            f"{host}. IN {rtype} {address}",
        )
    return Check(host, "ptr", "ok", f"{address} -> {host} -> {address}")


def _os_error(exc: OSError) -> str:
    text = str(exc.strerror or exc)
    if isinstance(exc, PermissionError):
        text += " (run relayctl doctor as root or as the user relayd runs as)"
    return text


def _name_matches(pattern: str, host: str) -> bool:
    pattern, host = pattern.lower().rstrip("."), host.lower().rstrip(".")
    if pattern.startswith("*."):
        first, _, rest = host.partition(".")
        return bool(first) and rest == pattern[2:]
    return pattern == host


def check_certificate(hostname: str, path: Path | None, now: datetime | None = None) -> Check:
    """The first certificate of ``path`` names ``hostname`` and is valid for 14 more days."""
    from cryptography import x509  # here: relayctl's other commands start faster

    host = hostname.lower().rstrip(".")
    if path is None:
        return Check(
            host,
            "tls",
            "warn",
            "no [tls] cert: relayd offers no TLS, and many "
            "receivers and submission clients want it",
        )
    try:
        certificate = x509.load_pem_x509_certificates(path.read_bytes())[0]
    except OSError as exc:
        return Check(host, "tls", "fail", f"{path}: {_os_error(exc)}")
    except ValueError:
        return Check(host, "tls", "fail", f"{path}: no PEM certificate in it")
    try:
        ext = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        names = ext.value.get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        names = [
            str(a.value)
            for a in certificate.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
        ]
    now = now or datetime.now(UTC)
    start, end = certificate.not_valid_before_utc, certificate.not_valid_after_utc
    if not any(_name_matches(name, host) for name in names):
        return Check(
            host, "tls", "fail", f"{path} is for {', '.join(names) or 'no name'}, not {host}"
        )
    if end <= now:
        return Check(host, "tls", "fail", f"{path} expired on {end:%Y-%m-%d %H:%M} UTC")
    if start > now:
        return Check(host, "tls", "fail", f"{path} is not valid before {start:%Y-%m-%d %H:%M} UTC")
    left = end - now
    if left < timedelta(days=CERT_MIN_DAYS):
        return Check(
            host,
            "tls",
            "fail",
            f"{path} expires in {left.days} days, on {end:%Y-%m-%d}: renew it (docs/install.md)",
        )
    return Check(
        host, "tls", "ok", f"{path} valid for {host} until {end:%Y-%m-%d} ({left.days} days)"
    )


def dnsbl_name(address: str, zone: str) -> str:
    """The name to ask: reversed octets (IPv4) or nibbles (IPv6) under ``zone``."""
    reverse = dns.reversename.from_address(address).to_text(omit_final_dot=True)
    base = reverse.removesuffix(".in-addr.arpa").removesuffix(".ip6.arpa")
    return f"{base}.{zone.rstrip('.')}"


def check_dnsbl(
    host: str, address: str, answers: dict[str, Lookup], reasons: dict[str, Lookup] | None = None
) -> Check:
    """``answers``: for each zone, the A records of the address's name there;
    ``reasons``: the TXT records there, which say why (and where to ask for removal).

    An answer in 127.0.0.0/8 means listed, except 127.255.255.x, which the
    Spamhaus lists give when they refuse the query (a public resolver).
    """
    listed, refused, unknown, clean = [], [], [], []
    for zone, lookup in answers.items():
        codes = [a for a in lookup.values if a.startswith("127.")]
        if lookup.failed:
            unknown.append(f"{zone} ({lookup.error})")
        elif any(c.startswith("127.255.255.") for c in codes):
            refused.append(zone)
        elif codes:
            why = (reasons or {}).get(zone, Lookup()).values
            listed.append(f"{zone} ({', '.join(codes)}{': ' + why[0][:200] if why else ''})")
        else:
            clean.append(zone)
    if listed:
        return Check(
            host,
            "dnsbl",
            "fail",
            f"{address} is listed on {'; '.join(listed)}: find "
            "out why and ask for delisting on the list's web site",
        )
    if refused or unknown:
        parts = []
        if refused:
            parts.append(
                f"refused by {', '.join(refused)} (use a resolver of your own, not a public one)"
            )
        if unknown:
            parts.append(f"no answer from {', '.join(unknown)}")
        return Check(host, "dnsbl", "warn", f"{address}: " + "; ".join(parts))
    if not answers:
        return Check(host, "dnsbl", "ok", f"{address}: no blocklists configured")
    return Check(host, "dnsbl", "ok", f"{address} is not listed on {', '.join(clean)}")


# ---- asking DNS -------------------------------------------------------------------


class DNS:
    """The thin layer: every lookup through ``[dns] nameservers``, errors kept as text."""

    def __init__(self, resolver: dns.resolver.Resolver) -> None:
        self.resolver = resolver

    def _ask(self, name: str, rdtype: str, show: Callable[[Any], str]) -> Lookup:
        try:
            return Lookup(tuple(show(r) for r in rdns.query(self.resolver, name, rdtype)))
        except rdns.DNSTempError as exc:
            return Lookup(error=str(exc))

    def txt(self, name: str) -> Lookup:
        return self._ask(name, "TXT", lambda r: b"".join(r.strings).decode("utf-8", "replace"))

    def mx(self, name: str) -> Lookup:
        return self._ask(
            name, "MX", lambda r: f"{r.preference} {r.exchange.to_text(omit_final_dot=True)}"
        )

    def addresses(self, name: str) -> Lookup:
        four, six = self._ask(name, "A", str), self._ask(name, "AAAA", str)
        if four.failed or six.failed:
            return Lookup(error=four.error or six.error)
        return Lookup(four.values + six.values)

    def a(self, name: str) -> Lookup:
        return self._ask(name, "A", str)

    def ptr(self, address: str) -> Lookup:
        return self._ask(reverse_name(address), "PTR", lambda r: r.target.to_text(True))


def _spf_results(
    resolver: dns.resolver.Resolver, domain: str, hostname: str, addresses: Iterable[str]
) -> dict[str, tuple[str, str]]:
    from relayd.policy import spf

    out = {}
    for address in addresses:
        result = spf.check_spf(address, hostname, f"postmaster@{domain}", resolver)
        out[address] = (result.result, result.explanation)
    return out


@dataclass
class Plan:
    """What to check: the domains, the keys of each, and this host."""

    domains: list[str]
    served: set[str] = field(default_factory=set)
    keys: dict[str, list[DKIMKey]] = field(default_factory=dict)


def plan(config: Config, named: Sequence[str] = ()) -> Plan:
    """The domains to check: those named, else every signed or served domain."""
    served = set(config.relay.domains)
    keys: dict[str, list[DKIMKey]] = {}
    for key in config.dkim.keys:
        keys.setdefault(key.domain, []).append(key)
    if named:
        domains = [d.strip().lower().rstrip(".") for d in named]
    else:
        domains = [*keys, *config.relay.domains]
    return Plan(list(dict.fromkeys(d for d in domains if d)), served, keys)


def run(config: Config, named: Sequence[str] = (), now: datetime | None = None) -> list[Check]:
    """Every check, in report order: each domain's, then the host's."""
    from relayd import dkim
    from relayd.policy.dmarc import org_domain

    resolver = rdns.make_sync_resolver(config.dns)
    ask = DNS(resolver)
    todo = plan(config, named)
    hostname = config.hostname.lower().rstrip(".")
    host_addresses = ask.addresses(hostname)
    addresses = list(config.doctor.addresses) or list(host_addresses.values)

    checks: list[Check] = []

    def has_address(name: str) -> bool:
        found = ask.addresses(name)
        return found.failed or bool(found.values)

    for domain in todo.domains:
        served = domain in todo.served
        checks.append(check_mx(domain, hostname, served, ask.mx(domain), has_address))
        txt = ask.txt(domain)
        results = {}
        if not txt.failed and len(spf_record(txt.values)) == 1:
            results = _spf_results(resolver, domain, hostname, addresses)
        checks.append(check_spf(domain, txt, addresses, results))
        keys = todo.keys.get(domain, [])
        if not keys:
            checks.append(
                Check(
                    domain,
                    "dkim",
                    "warn",
                    "no [[dkim.key]] for this domain: mail "
                    f"from it leaves unsigned (relayctl dkim keygen {domain} "
                    "SELECTOR)",
                )
            )
        for key in keys:
            try:
                expected, error = dkim.public_value(key.key_file), None
            except OSError as exc:
                expected, error = None, f"{key.key_file}: {_os_error(exc)}"
            except ValueError as exc:
                expected, error = None, f"{key.key_file}: not a usable key: {exc}"
            name = f"{key.selector}._domainkey.{domain}"
            checks.append(check_dkim(domain, key.selector, expected, error, ask.txt(name)))
        org = org_domain(domain)
        org_txt = ask.txt(f"_dmarc.{org}") if org != domain else None
        checks.append(check_dmarc(domain, ask.txt(f"_dmarc.{domain}"), org, org_txt))
        checks += check_sts_and_rpt(
            domain, ask.txt(f"_mta-sts.{domain}"), ask.txt(f"_smtp._tls.{domain}")
        )

    if not addresses:
        why = host_addresses.error or f"{hostname} has no A or AAAA record"
        checks.append(
            Check(hostname, "ptr", "fail", f"no address to check: {why}; set [doctor] addresses")
        )
    for address in addresses:
        ptr = ask.ptr(address)
        forward = host_addresses if hostname in ptr_names(ptr) else None
        checks.append(_noted(check_ptr(hostname, address, ptr, forward), address))
    checks.append(check_certificate(hostname, config.tls.cert, now))
    for address in addresses:
        names = {zone: dnsbl_name(address, zone) for zone in config.doctor.dnsbl}
        answers = {zone: ask.a(name) for zone, name in names.items()}
        reasons = {
            zone: ask.txt(names[zone])
            for zone, found in answers.items()
            if any(a.startswith("127.") for a in found.values)
        }
        checks.append(_noted(check_dnsbl(hostname, address, answers, reasons), address))
    return checks


# Addresses no receiver ever sees mail from: loopback, link-local, RFC 1918,
# shared address space (carrier NAT) and IPv6 unique local.
_LOCAL_NETWORKS = tuple(
    ipaddress.ip_network(n)
    for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "fc00::/7")
)


def is_local(address: str) -> bool:
    """An address of this host that no other mail server sees (behind NAT, or loopback)."""
    ip = ipaddress.ip_address(address)
    return ip.is_loopback or ip.is_link_local or any(ip in n for n in _LOCAL_NETWORKS)


def _noted(check: Check, address: str) -> Check:
    """``check`` with a note when ``address`` is one receivers never see."""
    if not is_local(address):
        return check
    note = (
        f" (note: {address} is a private address, not the one receivers see; behind NAT, "
        "set [doctor] addresses to the public one)"
    )
    return replace(check, detail=check.detail + note)


def ptr_names(ptr: Lookup) -> list[str]:
    return [n.lower().rstrip(".") for n in ptr.values]


__all__ = [
    "CHECKS",
    "DNS",
    "Check",
    "Lookup",
    "check_certificate",
    "check_dkim",
    "check_dmarc",
    "check_dnsbl",
    "check_mx",
    "check_ptr",
    "check_spf",
    "check_sts_and_rpt",
    "dnsbl_name",
    "is_local",
    "plan",
    "report_json",
    "report_lines",
    "run",
]
