"""``relayctl doctor`` (SPEC §10) against the loopback DNS server.

A zone where everything is right gives nine ``ok`` lines and exit 0; then
one record (or the certificate) at a time is made wrong, and exactly that
check turns ``warn`` or ``fail``, with the record to publish. relayctl runs
as a subprocess with ``[dns] nameservers`` pointing at the test server and
no daemon running.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from support.certs import ca
from support.dnsserver import DNSServer

from relayd import dkim, doctor
from relayd.config import load_config

HOST = "mail.example.test"
DOMAIN = "example.test"
ADDRESS = "192.0.2.25"
BLOCKLIST = "bl.example.test"
CHECK_KEYS = {"domain", "check", "status", "detail", "record"}


def write_cert(directory: Path, *names: str, days: float = 90) -> tuple[Path, Path]:
    leaf = ca().issue_cert(*names, not_after=datetime.now(UTC) + timedelta(days=days))
    cert, key = directory / "cert.pem", directory / "key.pem"
    cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    key.write_bytes(leaf.private_key_pem.bytes())
    return cert, key


class Site:
    """A config, its files and a zone that is right, for one test to spoil."""

    def __init__(self, tmp_path: Path, dns_server: DNSServer) -> None:
        self.dir, self.dns = tmp_path, dns_server
        self.key = tmp_path / "dkim" / "example.test.s1.key"
        self.key.parent.mkdir()
        dkim.keygen(self.key, DOMAIN, "s1")
        self.dkim_value = dkim.public_value(self.key)
        self.cert, self.cert_key = write_cert(tmp_path, HOST)
        self.extra = ""
        self.dns.add(
            f"{DOMAIN} MX 10 {HOST}",
            f"{HOST} A {ADDRESS}",
            f'{DOMAIN} TXT "v=spf1 ip4:{ADDRESS} -all"',
            f'{DOMAIN} TXT "google-site-verification=abc"',
            f's1._domainkey.{DOMAIN} TXT "{self.dkim_value}"',
            f'_dmarc.{DOMAIN} TXT "v=DMARC1; p=reject; rua=mailto:dmarc@{DOMAIN}"',
            f"{ADDRESS} PTR {HOST}",
            f'_mta-sts.{DOMAIN} TXT "v=STSv1; id=20260101T000000"',
            f'_smtp._tls.{DOMAIN} TXT "v=TLSRPTv1; rua=mailto:tlsrpt@{DOMAIN}"',
        )

    def config(self, addresses: bool = True) -> Path:
        path = self.dir / "relayd.toml"
        doctor_table = f'addresses = ["{ADDRESS}"]\n' if addresses else ""
        path.write_text(
            f'hostname = "{HOST}"\n'
            f'[tls]\ncert = "{self.cert}"\nkey = "{self.cert_key}"\n'
            f'[relay]\ndomains = ["{DOMAIN}"]\n'
            f'[[dkim.key]]\ndomain = "{DOMAIN}"\nselector = "s1"\nkey_file = "{self.key}"\n'
            f'[dns]\nnameservers = ["{self.dns.address}"]\ntimeout = "2s"\n'
            f'[doctor]\n{doctor_table}dnsbl = ["{BLOCKLIST}"]\n'
            f'[spool]\npath = "{self.dir / "spool"}"\n'
            f'[control]\nsocket = "{self.dir / "control.sock"}"\n'
            f'[auth]\nusers_file = "{self.dir / "users"}"\n' + self.extra,
            encoding="utf-8",
        )
        return path

    def doctor(self, *args: str, **config: Any) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "relayd.ctl",
                "--config",
                str(self.config(**config)),
                "doctor",
                *args,
            ],
            capture_output=True,
            text=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
        )

    def report(self, *args: str, **config: Any) -> tuple[int, dict[str, Any]]:
        out = self.doctor("--json", *args, **config)
        assert out.stderr == ""
        return out.returncode, json.loads(out.stdout)


@pytest.fixture
def site(tmp_path: Path, dns_server: DNSServer) -> Site:
    return Site(tmp_path, dns_server)


def by_check(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["check"]: c for c in report["checks"]}


def test_a_right_zone_gives_every_check_ok_and_exit_0(site: Site) -> None:
    code, report = site.report()
    assert code == 0, report
    assert report["ok"] is True
    assert [c["check"] for c in report["checks"]] == [
        "mx", "spf", "dkim", "dmarc", "mta-sts", "tls-rpt", "ptr", "tls", "dnsbl",
    ]  # fmt: skip
    for check in report["checks"]:
        assert set(check) == CHECK_KEYS
        assert check["status"] == "ok", check
        assert check["record"] is None
    assert {c["domain"] for c in report["checks"][:6]} == {DOMAIN}
    assert {c["domain"] for c in report["checks"][6:]} == {HOST}


def test_the_human_report_is_one_line_per_check(site: Site) -> None:
    out = site.doctor()
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == 9
    assert all(line.split()[0] == "ok" for line in lines)
    assert lines[0].split()[1:3] == ["mx", DOMAIN]
    assert "10 mail.example.test" in lines[0]


def test_without_doctor_addresses_the_hostname_addresses_are_checked(site: Site) -> None:
    code, report = site.report(addresses=False)
    assert code == 0, report
    assert ADDRESS in by_check(report)["ptr"]["detail"]


def _mx_missing(s: Site) -> None:
    s.dns.remove(DOMAIN, "MX")


def _spf_without_us(s: Site) -> None:
    s.dns.remove(DOMAIN, "TXT")
    s.dns.add(f'{DOMAIN} TXT "v=spf1 ip4:198.51.100.7 ~all"')


def _spf_missing(s: Site) -> None:
    s.dns.remove(DOMAIN, "TXT")


def _dkim_other_key(s: Site) -> None:
    other = s.dir / "other.key"
    dkim.keygen(other, DOMAIN, "s1")
    s.dns.remove(f"s1._domainkey.{DOMAIN}", "TXT")
    s.dns.add(f's1._domainkey.{DOMAIN} TXT "{dkim.public_value(other)}"')


def _dkim_missing(s: Site) -> None:
    s.dns.remove(f"s1._domainkey.{DOMAIN}", "TXT")


def _dmarc_missing(s: Site) -> None:
    s.dns.remove(f"_dmarc.{DOMAIN}")


def _ptr_elsewhere(s: Site) -> None:
    s.dns.remove(ADDRESS, "PTR")
    s.dns.add(f"{ADDRESS} PTR host-25.isp.example.net")


def _ptr_missing(s: Site) -> None:
    s.dns.remove(ADDRESS, "PTR")


def _cert_other_name(s: Site) -> None:
    s.cert, s.cert_key = write_cert(s.dir, "other.example.test")


def _cert_expiring(s: Site) -> None:
    s.cert, s.cert_key = write_cert(s.dir, HOST, days=5)


def _sts_without_rpt(s: Site) -> None:
    s.dns.remove(f"_smtp._tls.{DOMAIN}")


def _sts_bad_id(s: Site) -> None:
    s.dns.remove(f"_mta-sts.{DOMAIN}")
    s.dns.add(f'_mta-sts.{DOMAIN} TXT "v=STSv1; id=not-valid!"')


def _listed(s: Site) -> None:
    s.dns.add(f"25.2.0.192.{BLOCKLIST} A 127.0.0.2")


def _dmarc_none(s: Site) -> None:
    s.dns.remove(f"_dmarc.{DOMAIN}")
    s.dns.add(f'_dmarc.{DOMAIN} TXT "v=DMARC1; p=none; rua=mailto:dmarc@{DOMAIN}"')


def _rpt_without_sts(s: Site) -> None:
    s.dns.remove(f"_mta-sts.{DOMAIN}")


def _blocklist_refuses(s: Site) -> None:
    s.dns.add(f"25.2.0.192.{BLOCKLIST} A 127.255.255.254")


SPF_FIXED = f'{DOMAIN}. IN TXT "v=spf1 ip4:198.51.100.7 ip4:{ADDRESS} ~all"'
PTR_RECORD = f"25.2.0.192.in-addr.arpa. IN PTR {HOST}."
RPT_RECORD = f'_smtp._tls.{DOMAIN}. IN TXT "v=TLSRPTv1; rua=mailto:tlsrpt@{DOMAIN}"'

WRONG: list[tuple[str, Callable[[Site], None], str, str, str | None]] = [
    # (case, what to spoil, check, status, record it suggests, or a part of it)
    ("mx-missing", _mx_missing, "mx", "fail", f"{DOMAIN}. IN MX 10 {HOST}."),
    ("spf-without-us", _spf_without_us, "spf", "fail", SPF_FIXED),
    ("spf-missing", _spf_missing, "spf", "fail", f'{DOMAIN}. IN TXT "v=spf1 ip4:{ADDRESS} -all"'),
    ("dkim-other-key", _dkim_other_key, "dkim", "fail", f"s1._domainkey.{DOMAIN}. IN TXT"),
    ("dkim-missing", _dkim_missing, "dkim", "fail", f"s1._domainkey.{DOMAIN}. IN TXT"),
    ("dmarc-missing", _dmarc_missing, "dmarc", "fail", f'_dmarc.{DOMAIN}. IN TXT "v=DMARC1; p='),
    ("dmarc-none", _dmarc_none, "dmarc", "warn", f'_dmarc.{DOMAIN}. IN TXT "v=DMARC1; p='),
    ("ptr-elsewhere", _ptr_elsewhere, "ptr", "fail", PTR_RECORD),
    ("ptr-missing", _ptr_missing, "ptr", "fail", PTR_RECORD),
    ("cert-other-name", _cert_other_name, "tls", "fail", None),
    ("cert-expiring", _cert_expiring, "tls", "fail", None),
    ("sts-without-rpt", _sts_without_rpt, "tls-rpt", "fail", RPT_RECORD),
    ("rpt-without-sts", _rpt_without_sts, "mta-sts", "warn", None),
    ("sts-bad-id", _sts_bad_id, "mta-sts", "fail", f'_mta-sts.{DOMAIN}. IN TXT "v=STSv1; id='),
    ("listed", _listed, "dnsbl", "fail", None),
    ("blocklist-refuses", _blocklist_refuses, "dnsbl", "warn", None),
]


@pytest.mark.parametrize(
    ("spoil", "check", "status", "record"),
    [case[1:] for case in WRONG],
    ids=[case[0] for case in WRONG],
)
def test_one_wrong_thing_is_reported_by_its_check_alone(
    site: Site,
    spoil: Callable[[Site], None],
    check: str,
    status: str,
    record: str | None,
) -> None:
    spoil(site)
    code, report = site.report()
    checks = by_check(report)
    assert checks[check]["status"] == status, checks[check]
    others = {name: c["status"] for name, c in checks.items() if name != check}
    if check == "tls-rpt":  # the MTA-STS line names the inconsistency too
        assert others.pop("mta-sts") == "warn"
    assert set(others.values()) == {"ok"}, others
    assert report["ok"] is (status != "fail")
    assert code == (1 if status == "fail" else 0)
    if record is not None:
        assert checks[check]["record"] is not None
        assert checks[check]["record"].startswith(record), checks[check]["record"]
    human = site.doctor()
    assert human.returncode == code
    line = next(x for x in human.stdout.splitlines() if x.split()[1] == check)
    assert line.split()[0] == status
    if record is not None:
        assert record in line


def test_the_dkim_record_suggested_is_the_key_relayd_signs_with(site: Site) -> None:
    _dkim_other_key(site)
    _, report = site.report()
    suggested = by_check(report)["dkim"]["record"]
    assert suggested == dkim.public_record(site.key, DOMAIN, "s1")


def test_the_certificate_detail_says_when_it_expires(site: Site) -> None:
    _cert_expiring(site)
    _, report = site.report()
    assert "expires in 4 days" in by_check(report)["tls"]["detail"] or (
        "expires in 5 days" in by_check(report)["tls"]["detail"]
    )


def test_domains_named_on_the_command_line_replace_the_configured_ones(site: Site) -> None:
    site.dns.add(
        "other.test MX 10 mail.example.test",
        f'other.test TXT "v=spf1 ip4:{ADDRESS} -all"',
        '_dmarc.other.test TXT "v=DMARC1; p=quarantine; rua=mailto:d@other.test"',
    )
    code, report = site.report("other.test")
    assert code == 0, report
    domains = [c["domain"] for c in report["checks"] if c["check"] in ("mx", "spf", "dmarc")]
    assert domains == ["other.test"] * 3
    # no key configured for it: a warning, not a failure
    assert by_check(report)["dkim"]["status"] == "warn"
    # served by the MX but not in [relay] domains: the MX need not be relayd
    assert by_check(report)["mx"]["status"] == "ok"


def test_a_dns_server_that_fails_makes_the_lookup_fail(site: Site) -> None:
    site.dns.fault(f"_dmarc.{DOMAIN}", "servfail")
    code, report = site.report()
    assert code == 1
    assert by_check(report)["dmarc"]["status"] == "fail"
    assert "DNS lookup failed" in by_check(report)["dmarc"]["detail"]


def test_no_domain_to_check_is_a_usage_error(site: Site) -> None:
    path = site.dir / "bare.toml"
    path.write_text(
        f'hostname = "{HOST}"\n[dns]\nnameservers = ["{site.dns.address}"]\n', encoding="utf-8"
    )
    assert load_config(path).dkim.keys == ()
    out = subprocess.run(
        [sys.executable, "-m", "relayd.ctl", "--config", str(path), "doctor"],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert out.returncode == 2
    assert "no domain to check" in out.stderr


# ---- the check functions on their own ----------------------------------------------


def test_dnsbl_names_reverse_octets_and_nibbles() -> None:
    assert doctor.dnsbl_name("192.0.2.25", "zen.spamhaus.org") == "25.2.0.192.zen.spamhaus.org"
    name = doctor.dnsbl_name("2001:db8::25", "bl.example")
    assert name.startswith("5.2.0.0.") and name.endswith(".8.b.d.0.1.0.0.2.bl.example")
    assert len(name.split(".")) == 32 + 2


def test_spf_suggestion_keeps_the_other_terms_and_the_ending() -> None:
    record = doctor.spf_suggestion(
        "example.test", "v=spf1 mx include:_spf.example.net ~all", ["192.0.2.25", "2001:db8::25"]
    )
    assert record == (
        'example.test. IN TXT "v=spf1 mx include:_spf.example.net ip4:192.0.2.25 '
        'ip6:2001:db8::25 ~all"'
    )


def test_a_certificate_for_a_wildcard_is_valid_for_the_hostname(tmp_path: Path) -> None:
    cert, _ = write_cert(tmp_path, "*.example.test")
    assert doctor.check_certificate(HOST, cert).status == "ok"
    assert doctor.check_certificate("a.b.example.test", cert).status == "fail"


def test_an_expired_certificate_fails(tmp_path: Path) -> None:
    cert, _ = write_cert(tmp_path, HOST, days=1)
    later = datetime.now(UTC) + timedelta(days=2)
    result = doctor.check_certificate(HOST, cert, now=later)
    assert result.status == "fail" and "expired" in result.detail


def test_a_long_dkim_record_is_cut_into_strings() -> None:
    check = doctor.check_dkim(DOMAIN, "s1", "v=DKIM1; k=rsa; p=" + "A" * 400, None, doctor.Lookup())
    assert check.record is not None
    assert check.record.count('"') == 4  # two character-strings


def test_a_private_address_is_checked_and_named_as_such(site: Site) -> None:
    site.dns.remove(HOST, "A")
    site.dns.add(f"{HOST} A 10.1.2.3", f"10.1.2.3 PTR {HOST}")
    code, report = site.report(addresses=False)
    checks = by_check(report)
    assert checks["ptr"]["status"] == checks["dnsbl"]["status"] == "ok"
    assert "private address" in checks["ptr"]["detail"]
    assert "[doctor] addresses" in checks["dnsbl"]["detail"]
    assert checks["spf"]["status"] == "fail"  # the SPF record names the public address only
    assert code == 1
    assert doctor.is_local("127.0.0.1") and doctor.is_local("fd00::1")
    assert not doctor.is_local(ADDRESS) and not doctor.is_local("2001:db8::25")


def test_a_listing_says_why_when_the_list_does(site: Site) -> None:
    _listed(site)
    site.dns.add(f'25.2.0.192.{BLOCKLIST} TXT "Listed: see https://bl.example.test/q/192.0.2.25"')
    _, report = site.report()
    detail = by_check(report)["dnsbl"]["detail"]
    assert f"{BLOCKLIST} (127.0.0.2: Listed: see https://bl.example.test/q/192.0.2.25)" in detail


def test_a_null_mx_is_right_for_a_domain_that_only_sends() -> None:
    null = doctor.Lookup(("0 .",))
    assert doctor.check_mx(DOMAIN, HOST, False, null, lambda _: True).status == "ok"
    assert doctor.check_mx(DOMAIN, HOST, True, null, lambda _: True).status == "fail"


def test_an_mx_host_without_an_address_fails() -> None:
    mx = doctor.Lookup(("10 gone.example.test",))
    check = doctor.check_mx(DOMAIN, HOST, False, mx, lambda _: False)
    assert check.status == "fail" and "gone.example.test has no address" in check.detail


def test_an_unreadable_key_file_fails_the_dkim_check(site: Site) -> None:
    site.key.unlink()
    code, report = site.report()
    assert code == 1
    assert by_check(report)["dkim"]["status"] == "fail"
    assert str(site.key) in by_check(report)["dkim"]["detail"]


def test_a_loopback_address_is_still_looked_up(site: Site) -> None:
    """A test bed (or a host whose name resolves to loopback) gets real answers, not guesses."""
    site.dns.remove(HOST, "A")
    site.dns.add(
        f"{HOST} A 127.0.0.2",
        "127.0.0.2 PTR elsewhere.example.test",
        f"2.0.0.127.{BLOCKLIST} A 127.0.0.2",
    )
    code, report = site.report(addresses=False)
    checks = by_check(report)
    assert checks["ptr"]["status"] == checks["dnsbl"]["status"] == "fail"
    assert checks["ptr"]["record"] == f"2.0.0.127.in-addr.arpa. IN PTR {HOST}."
    assert code == 1
