"""Start, reload and stop as systemd and an operator drive them.

Readiness is read from a real NOTIFY_SOCKET (the harness waits for
READY=1); reloads are real SIGHUPs with good and broken config files;
stops are real SIGTERMs with a client or a delivery in flight.
"""

from __future__ import annotations

import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support.certs import client_context, server_cert_files
from support.dnsserver import DNSServer
from support.mxserver import MXServer
from support.ports import free_port
from support.relayd_proc import HOSTNAME, ListenerSpec, Relayd, raw_session, send

MSG = b"Subject: lifecycle\r\n\r\nbody\r\n"


def connectable(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
        return True
    except OSError:
        return False


def reload_and_wait(r: Relayd, marker: str) -> str:
    before = r.log().count(marker)
    r.signal(signal.SIGHUP)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        log = r.log()
        if log.count(marker) > before:
            return log
        time.sleep(0.05)
    raise TimeoutError(f"no {marker!r} after SIGHUP:\n{r.log()[-2000:]}")


def test_check_config_and_exit_78(tmp_path: Path) -> None:
    with Relayd(tmp_path) as r:
        _check_and_78(r)


def _check_and_78(r: Relayd) -> None:
    ok = subprocess.run(
        [sys.executable, "-m", "relayd.cli", "--config", str(r.config_path), "--check-config"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert ok.returncode == 0, ok.stderr
    r.config_path.write_text(
        r.config_text().replace("[limits]", "[limitz]") + '\n[limits]\nmax_message_size = "lots"\n'
    )
    bad = subprocess.run(
        [sys.executable, "-m", "relayd.cli", "--config", str(r.config_path), "--check-config"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert bad.returncode == 1
    line = next(ln for ln in bad.stderr.splitlines() if "max_message_size" in ln)
    assert line.startswith(f"relayd: {r.config_path}:")
    assert '[limits] max_message_size: expected a size like "25MB", got "lots"' in line
    run = subprocess.run(
        [sys.executable, "-m", "relayd.cli", "--config", str(r.config_path)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert run.returncode == 78


def test_config_from_environment(tmp_path: Path) -> None:
    with Relayd(tmp_path) as r:
        _from_env(r)


def _from_env(r: Relayd) -> None:
    env_run = subprocess.run(
        [sys.executable, "-m", "relayd.cli", "--check-config"],
        capture_output=True,
        text=True,
        timeout=30,
        env={"RELAYD_CONFIG": str(r.config_path), "PATH": "/usr/bin:/bin"},
    )
    assert env_run.returncode == 0, env_run.stderr
    assert str(r.config_path) in env_run.stdout


def test_reload_adds_and_removes_listeners_without_dropping_sessions(tmp_path: Path) -> None:
    extra_port = free_port("127.0.0.1")
    with Relayd(tmp_path) as r:
        r.start()
        inbound = r.port("inbound")
        with r.smtp("inbound") as s:
            s.ehlo("client.test")
            s.mail("a@sender.test")
            s.rcpt("bob@relay.test")
            r.listeners = (
                ListenerSpec("extra", "inbound", "none", extra_port),
                *[spec for spec in r.listeners if spec.name != "inbound"],
            )
            r.write_config()
            reload_and_wait(r, "reload -- version")
            assert connectable(extra_port)
            assert not connectable(inbound)
            # The session that began before the reload finishes on its old listener.
            code, reply = s.data(MSG)
            assert code == 250 and b"queued as" in reply
        with raw_session(extra_port) as c:
            assert c.reply().startswith(f"220 {HOSTNAME}")
        assert r.stop() == 0


def test_bad_config_on_reload_keeps_the_running_one(tmp_path: Path) -> None:
    with Relayd(tmp_path) as r:
        r.start()
        r.config_path.write_text(r.config_text() + '\n[limits]\nmax_recipients = "many"\n')
        log = reload_and_wait(r, "reload failed")
        assert "max_recipients" in log.split("reload failed")[-1]
        assert r.proc is not None and r.proc.poll() is None
        with r.smtp("inbound") as s:
            s.ehlo("client.test")
            send(s, "a@sender.test", ["bob@relay.test"], MSG)
        assert r.stop() == 0


def peer_serial(port: int, implicit: bool) -> int:
    ctx = client_context()
    if implicit:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
            ctx.wrap_socket(raw, server_hostname=HOSTNAME) as tls,
        ):
            return _serial(tls)
    with raw_session(port) as c:
        c.reply()
        c.cmd("EHLO client.test")
        c.starttls()
        assert isinstance(c.sock, ssl.SSLSocket)
        return _serial(c.sock)


def _serial(tls: ssl.SSLSocket) -> int:
    from cryptography import x509

    der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def test_reload_picks_up_a_renewed_certificate(tmp_path: Path) -> None:
    with Relayd(tmp_path) as r:
        r.start()
        old = (peer_serial(r.port("inbound"), False), peer_serial(r.port("submissions"), True))
        renewed = tmp_path / "renewed"
        renewed.mkdir()
        cert, key = server_cert_files(renewed, HOSTNAME, "localhost", "127.0.0.1")
        r.cert.write_bytes(cert.read_bytes())
        r.key.write_bytes(key.read_bytes())
        reload_and_wait(r, "reload -- version")
        new = (peer_serial(r.port("inbound"), False), peer_serial(r.port("submissions"), True))
        assert new[0] != old[0] and new[1] != old[1]
        assert new[0] == new[1]
        assert r.stop() == 0


def test_sigterm_lets_a_session_in_flight_finish(tmp_path: Path) -> None:
    with Relayd(tmp_path) as r:
        r.start()
        with r.smtp("inbound") as s:
            s.ehlo("client.test")
            s.mail("a@sender.test")
            s.rcpt("bob@relay.test")
            r.signal(signal.SIGTERM)
            r.wait_log("terminating")
            assert not connectable(r.port("submission"))  # no new clients
            code, reply = s.data(MSG)
            assert code == 250
            qid = reply.decode().rsplit(" ", 1)[1]
        assert r.proc is not None
        assert r.proc.wait(20) == 0
        assert (r.spool / "queue" / qid).exists()


def test_sigterm_during_delivery_keeps_the_message(tmp_path: Path) -> None:
    port = free_port("127.0.0.2")
    with DNSServer() as dns, MXServer("127.0.0.2", port) as mx:
        mx.behaviour = "hang_at_data_end"
        dns.add("example.org MX 10 mx.example.org", "mx.example.org A 127.0.0.2")
        r = Relayd(
            tmp_path,
            dns_address=dns.address,
            hold_delivery=False,
            extra=f'[delivery]\nport = {port}\ncommand_timeout = "60s"\n',
        )
        with r:
            r.start()
            with r.smtp("inbound") as s:
                s.ehlo("client.test")
                qid = send(s, "a@sender.test", ["bob@example.org"], MSG)
            mx.wait_for_attempts(1)
            started = time.monotonic()
            assert r.stop(timeout=60) == 0
            assert time.monotonic() - started < 45
            listing = r.ctl("--json", "queue")  # offline: read from the spool
            assert qid in listing.stdout


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_stop_signals_exit_0(tmp_path: Path, sig: int) -> None:
    with Relayd(tmp_path) as r:
        r.start()
        r.signal(sig)
        assert r.proc is not None and r.proc.wait(20) == 0
        assert not (tmp_path / "control.sock").exists()
