"""MTA-STS and DANE through a real relayd: verified TLS or the mail waits (SPEC section 8).

Everything on loopback: the test DNS server answers MX, A, TXT and TLSA
(with the AD bit for zones marked signed, as a validating resolver would),
an HTTPS server on 127.0.0.61:443 serves the MTA-STS policy with a
certificate from the test CA, and MX servers on 127.0.0.2 offer STARTTLS
with certificates that do or do not match. relayd trusts the test CA
through ``[delivery] ca_file``. TLSA records sit at ``_PORT._tcp.HOST`` for the port
relayd connects to: 25 in production, the test MX servers' port here.
"""

from __future__ import annotations

import contextlib
import hashlib
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from support.certs import ca_file, server_cert_files
from support.dnsserver import DNSServer
from support.mxserver import MXServer
from support.ports import free_port
from support.relayd_proc import Relayd, send
from support.stsserver import STSServer

from relayd.spool.model import Attempt
from relayd.spool.store import Spool

MSG = b"From: a@sender.test\r\nSubject: policy\r\n\r\nbody\r\n"
STS_HOST = "127.0.0.61"
ENFORCE = "version: STSv1\nmode: enforce\nmx: mx1.sts.test\nmax_age: 86400\n"


def _can_bind_443() -> bool:
    try:
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((STS_HOST, 443))
        return True
    except OSError:
        return False


needs_443 = pytest.mark.skipif(not _can_bind_443(), reason="cannot listen on port 443 here")


@dataclass
class World:
    r: Relayd
    dns: DNSServer
    tmp: Path
    port: int

    def mx(self, *names: str, starttls: bool = True) -> MXServer:
        cert = server_cert_files(self.tmp, *(names or ("mx1.sts.test",)))
        return MXServer("127.0.0.2", self.port, cert=cert, starttls=starttls)

    def submit(self, rcpt: str) -> str:
        with self.r.smtp("inbound") as s:
            s.ehlo("client.test")
            return send(s, "a@sender.test", [rcpt], MSG)

    def wait_attempt(self, qid: str, timeout: float = 15.0) -> Attempt:
        """The latest delivery attempt of ``qid``, as stored in the spool."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(KeyError, OSError, ValueError):
                history = Spool(self.r.spool).load(qid).history
                if history:
                    return history[-1]
            time.sleep(0.1)
        raise TimeoutError(f"no attempt for {qid}:\n{self.r.log()[-2000:]}")


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    port = free_port("127.0.0.2")
    with DNSServer() as dns:
        dns.add(
            "sts.test MX 10 mx1.sts.test",
            "mx1.sts.test A 127.0.0.2",
            "dane.test MX 10 mx1.dane.test",
            "mx1.dane.test A 127.0.0.2",
        )
        r = Relayd(
            tmp_path,
            dns_address=dns.address,
            hold_delivery=False,
            extra=(f'[delivery]\nport = {port}\nretry = ["1h"]\nca_file = "{ca_file(tmp_path)}"\n'),
        )
        with r:
            yield World(r, dns, tmp_path, port)
            r.kill()


def publish(dns: DNSServer, policy_id: str = "one") -> None:
    dns.remove("_mta-sts.sts.test")
    dns.add(f'_mta-sts.sts.test TXT "v=STSv1; id={policy_id}"', f"mta-sts.sts.test A {STS_HOST}")


def sts_server(world: World, body: str = ENFORCE) -> STSServer:
    return STSServer(STS_HOST, server_cert_files(world.tmp, "mta-sts.sts.test"), body)


# ---- MTA-STS ---------------------------------------------------------------------------------


@needs_443
def test_enforce_delivers_over_verified_tls(world: World) -> None:
    publish(world.dns)
    world.r.start()
    with sts_server(world), world.mx() as mx:
        world.submit("bob@sts.test")
        [got] = mx.wait_for_messages(1, timeout=15)
    assert got.tls
    line = world.r.wait_log("status=sent")
    assert "tls=mta-sts verified=yes" in line


@needs_443
@pytest.mark.parametrize(
    ("names", "starttls", "policy", "why"),
    [
        (("wrong.sts.test",), True, ENFORCE, "certificate verification failed"),
        (("mx1.sts.test",), False, ENFORCE, "TLS is required, but was not offered"),
        (("mx1.sts.test",), True, ENFORCE.replace("mx1.sts.test", "mx9.sts.test"), "not an MX"),
    ],
    ids=["wrong-certificate-name", "no-starttls", "mx-not-in-policy"],
)
def test_enforce_defers_rather_than_deliver_insecurely(
    world: World, names: tuple[str, ...], starttls: bool, policy: str, why: str
) -> None:
    publish(world.dns)
    world.r.start()
    with sts_server(world, policy), world.mx(*names, starttls=starttls) as mx:
        qid = world.submit("bob@sts.test")
        attempt = world.wait_attempt(qid)
        assert mx.messages == []
    assert attempt.dsn == "4.7.5", attempt
    assert why in str(attempt.reply)
    assert attempt.status == "deferred"


@needs_443
def test_testing_mode_delivers_and_logs_what_enforce_would_refuse(world: World) -> None:
    publish(world.dns)
    world.r.start()
    with (
        sts_server(world, ENFORCE.replace("enforce", "testing")),
        world.mx("wrong.sts.test") as mx,
    ):
        qid = world.submit("bob@sts.test")
        [got] = mx.wait_for_messages(1, timeout=15)
    assert got.tls  # delivered as usual: TLS, certificate not checked
    log = world.r.wait_log("would refuse")
    assert f"{qid}: warning: MTA-STS policy of sts.test (mode testing) would refuse" in log
    assert "certificate not valid" in log


@needs_443
def test_cached_policy_holds_when_the_policy_server_is_down(world: World) -> None:
    publish(world.dns)
    world.r.start()
    with sts_server(world), world.mx() as mx:
        world.submit("first@sts.test")
        mx.wait_for_messages(1, timeout=15)
    # Policy server gone, TXT id changed: the cached enforce policy applies, across a restart.
    publish(world.dns, "two")
    assert world.r.stop() == 0
    world.r.start()
    with world.mx("wrong.sts.test") as mx:
        qid = world.submit("second@sts.test")
        attempt = world.wait_attempt(qid)
        assert mx.messages == []
    assert attempt.dsn == "4.7.5"


def test_no_policy_and_no_server_means_delivery_as_usual(world: World) -> None:
    publish(world.dns)  # a TXT record, but nothing serves the policy
    world.r.start()
    with world.mx("wrong.sts.test") as mx:
        world.submit("bob@sts.test")
        [got] = mx.wait_for_messages(1, timeout=20)
    assert got.tls
    assert "tls=opportunistic verified=no" in world.r.wait_log("status=sent")


# ---- DANE ------------------------------------------------------------------------------------


def tlsa_of(cert_path: Path) -> str:
    leaf = x509.load_pem_x509_certificate(cert_path.read_bytes())
    spki = leaf.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(spki).hexdigest()


@pytest.fixture
def dane_world(world: World) -> World:
    """The same world, with relayd trusting the AD bit of its resolver."""
    world.r.dns = 'dnssec = "trust-ad"\n'
    world.r.write_config()
    return world


def test_dane_match_delivers_verified(dane_world: World) -> None:
    w = dane_world
    mx_cert = server_cert_files(w.tmp, "mx1.dane.test")
    w.dns.add(f"_{w.port}._tcp.mx1.dane.test TLSA 3 1 1 {tlsa_of(mx_cert[0])}")
    w.dns.sign("dane.test")
    w.r.start()
    with MXServer("127.0.0.2", w.port, cert=mx_cert) as mx:
        w.submit("bob@dane.test")
        [got] = mx.wait_for_messages(1, timeout=15)
    assert got.tls
    assert "tls=dane verified=yes" in w.r.wait_log("status=sent")


def test_dane_mismatch_defers_and_never_sends_in_clear(dane_world: World) -> None:
    w = dane_world
    w.dns.add(f"_{w.port}._tcp.mx1.dane.test TLSA 3 1 1 {'ab' * 32}")
    w.dns.sign("dane.test")
    w.r.start()
    with w.mx("mx1.dane.test") as mx:
        qid = w.submit("bob@dane.test")
        attempt = w.wait_attempt(qid)
        assert mx.messages == []
    assert attempt.dsn == "4.7.5"
    assert "DANE: certificate matches no TLSA record" in str(attempt.reply)


def test_dane_records_of_an_unsigned_zone_are_ignored(dane_world: World) -> None:
    w = dane_world
    w.dns.add(f"_{w.port}._tcp.mx1.dane.test TLSA 3 1 1 {'ab' * 32}")  # not signed: no AD bit
    w.r.start()
    with w.mx("mx1.dane.test") as mx:
        w.submit("bob@dane.test")
        mx.wait_for_messages(1, timeout=15)
    assert "tls=opportunistic verified=no" in w.r.wait_log("status=sent")
