"""Regressions found by reviewing relayd against SPEC.md from the outside.

Each test reproduces, black-box, a way relayd once broke the contract:
a reload that ignored settings, a delete that came back, a local error that
re-sent delivered mail, a rate limit that parallel sessions slipped under,
a connection slot leaked by a stalled TLS handshake, and smaller ones.
"""

from __future__ import annotations

import json
import os
import shutil
import smtplib
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from support.certs import ca_file, server_cert_files
from support.dnsserver import DNSServer
from support.mxserver import MXServer
from support.ports import free_port
from support.relayd_proc import Relayd, raw_session, send
from support.waiting import wait_for

MSG = b"From: alice@example.com\r\nSubject: x\r\n\r\nbody\r\n"


def queued(r: Relayd) -> set[str]:
    out = r.ctl("--json", "queue")
    assert out.returncode == 0, out.stderr
    return {m["queue_id"] for m in json.loads(out.stdout)["messages"]}


def test_reload_applies_delivery_settings(tmp_path: Path) -> None:
    port = free_port("127.0.0.2")
    closed = free_port("127.0.0.2")
    with DNSServer() as dns, MXServer("127.0.0.2", port) as mx:
        dns.add("example.org MX 10 mx.example.org", "mx.example.org A 127.0.0.2")
        r = Relayd(tmp_path, dns_address=dns.address, hold_delivery=False)
        r.extra = f'[delivery]\nport = {closed}\nretry = ["1h"]\n'
        r.write_config()
        with r:
            r.start()
            with r.smtp("inbound") as s:
                s.ehlo("client.test")
                qid = send(s, "a@sender.test", ["bob@example.org"], MSG)
            r.wait_log("status=deferred")
            r.extra = f'[delivery]\nport = {port}\nretry = ["1h"]\n'
            r.write_config()
            assert r.ctl("reload").returncode == 0
            assert r.ctl("queue", "flush").returncode == 0
            [got] = mx.wait_for_messages(1)
            assert got.rcpt_tos == ["bob@example.org"]
            wait_for(lambda: qid not in queued(r))
            assert r.stop() == 0


def test_reload_applies_connection_limits_and_users_file(tmp_path: Path) -> None:
    with Relayd(tmp_path) as r:
        r.add_user("alice@example.com", "pw-alice-1")
        r.start()
        other = tmp_path / "users2"
        from relayd.users import ScryptParams, cmd_user_add

        cmd_user_add(other, "bob@example.com", "pw-bob-1", [], params=ScryptParams(n=2**10))
        text = r.config_text().replace(f'users_file = "{r.users_file}"', f'users_file = "{other}"')
        r.config_path.write_text(text + "\n[limits]\nmax_connections_per_ip = 1\n")
        assert r.ctl("reload").returncode == 0
        with r.smtp("submissions") as s:
            s.ehlo("client.test")
            assert s.login("bob@example.com", "pw-bob-1")[0] == 235
            with raw_session(r.port("inbound")) as second:
                assert second.reply().startswith("421 4.7.0")
        with r.smtp("submissions") as s:
            s.ehlo("client.test")
            with pytest.raises(smtplib.SMTPAuthenticationError):
                s.login("alice@example.com", "pw-alice-1")
        assert r.stop() == 0


def test_deleted_messages_stay_deleted(tmp_path: Path) -> None:
    with Relayd(tmp_path, extra='[delivery]\nretry = ["1h"]\n') as r:
        r.start()
        with r.smtp("inbound") as s:
            s.ehlo("client.test")
            ids = [send(s, "a@sender.test", [f"u{i}@relay.test"], MSG) for i in range(30)]
        wait_for(lambda: r.log().count("status=deferred") >= 30)
        for _ in range(3):  # delete while the flushed attempts settle
            assert r.ctl("queue", "flush").returncode == 0
            r.ctl("queue", "delete", "--all")
        assert r.stop() == 0
        r.start()
        assert queued(r).isdisjoint(ids)
        assert not any((r.spool / "queue").iterdir())
        assert r.stop() == 0


def test_a_local_error_on_one_route_does_not_resend_the_others(tmp_path: Path) -> None:
    mx_port = free_port("127.0.0.2", "127.0.0.3")
    cert = server_cert_files(tmp_path, "smarthost.test")
    ca = ca_file(tmp_path)
    with (
        DNSServer() as dns,
        MXServer("127.0.0.2", mx_port) as mx,
        MXServer("127.0.0.3", mx_port, cert=cert, hostname="smarthost.test"),
    ):
        dns.add("b.test MX 10 mx.b.test", "mx.b.test A 127.0.0.2", "smarthost.test A 127.0.0.3")
        route = (
            f'[[route]]\ndomain = "a.test"\nvia = "smarthost.test:{mx_port}"\nca_file = "{ca}"\n'
        )
        r = Relayd(
            tmp_path / "r",
            dns_address=dns.address,
            hold_delivery=False,
            extra=f'{route}\n[delivery]\nport = {mx_port}\nretry = ["1s"]\n',
        )
        with r:
            r.start()
            ca.unlink()  # the route's CA file disappears after start
            with r.smtp("inbound") as s:
                s.ehlo("client.test")
                send(s, "a@sender.test", ["x@a.test", "y@b.test"], MSG)
            mx.wait_for_messages(1)
            time.sleep(3.5)  # several retries of x@a.test
            assert [m.rcpt_tos for m in mx.messages] == [["y@b.test"]]
            assert "x@a.test" in r.log() and "local error" in r.log()
            assert r.stop() == 0


def test_unsignable_message_is_relayed_and_the_session_goes_on(tmp_path: Path) -> None:
    key = tmp_path / "example.com.s1.key"
    from relayd import dkim

    dkim.keygen(key, "example.com", "s1")
    extra = f'[[dkim.key]]\ndomain = "example.com"\nselector = "s1"\nkey_file = "{key}"\n'
    with Relayd(tmp_path / "r", extra=extra) as r:
        r.start()
        with r.smtp("inbound") as s:
            s.ehlo("client.test")
            broken = b"From: a@example.com\r\nthis is not a header\r\n\r\nbody\r\n"
            code, _ = s.mail("a@example.com")[0], s.rcpt("bob@relay.test")
            assert code == 250
            code, reply = s.data(broken)
            assert code in (250, 451), reply
            assert s.mail("a@example.com")[0] == 250  # not "nested MAIL"
        assert r.stop() == 0


def test_parallel_sessions_cannot_slip_under_a_rate_limit(tmp_path: Path) -> None:
    with Relayd(tmp_path, extra='[rate_limits]\nper_ip = "2/hour"\n') as r:
        r.start()
        sessions = []
        for _ in range(5):
            s = r.smtp("inbound")
            s.ehlo("client.test")
            assert s.mail("a@sender.test")[0] == 250
            assert s.rcpt("bob@relay.test")[0] == 250
            sessions.append(s)
        codes = [s.data(MSG)[0] for s in sessions]
        for s in sessions:
            s.close()
        assert sorted(codes) == [250, 250, 450, 450, 450]
        assert r.stop() == 0


def test_stalled_starttls_handshake_frees_its_slot(tmp_path: Path) -> None:
    extra = '[limits]\nidle_timeout = "1s"\nmax_connections_per_ip = 1\n'
    with Relayd(tmp_path, extra=extra) as r:
        r.start()
        with raw_session(r.port("inbound")) as c:
            c.reply()
            c.cmd("EHLO client.test")
            assert c.cmd("STARTTLS").startswith("220")
            time.sleep(2.5)  # no handshake: the idle timeout must end it

        def fresh_greeting() -> bool:
            with raw_session(r.port("inbound")) as again:
                return again.reply().startswith("220")

        wait_for(fresh_greeting, timeout=5)
        assert r.stop() == 0


def test_unknown_control_group_is_a_config_error(tmp_path: Path) -> None:
    with Relayd(tmp_path) as r:
        _unknown_group(r)


def _unknown_group(r: Relayd) -> None:
    text = r.config_text().replace("[control]\n", '[control]\ngroup = "no-such-group-here"\n')
    r.config_path.write_text(text)
    check = subprocess.run(
        [sys.executable, "-m", "relayd.cli", "--config", str(r.config_path), "--check-config"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert check.returncode == 1
    assert '[control] group: there is no group "no-such-group-here"' in check.stderr
    run = subprocess.run(
        [sys.executable, "-m", "relayd.cli", "--config", str(r.config_path)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert run.returncode == 78


def test_busy_port_exits_75_naming_its_holder(tmp_path: Path) -> None:
    with Relayd(tmp_path) as r:
        _blocked(r)


def _blocked(r: Relayd) -> None:
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", r.port("inbound")))
    blocker.listen(1)
    try:
        run = subprocess.run(
            [sys.executable, "-m", "relayd.cli", "--config", str(r.config_path)],
            capture_output=True,
            text=True,
            timeout=30,
        )
    finally:
        blocker.close()
    assert run.returncode == 75  # EX_TEMPFAIL: not a config error, systemd retries
    assert "cannot bind" in run.stderr
    # The port, and who holds it (this test process), with the way out.
    port = r.port("inbound")
    assert f"127.0.0.1:{port} is in use by " in run.stderr
    assert f"(pid {os.getpid()}); stop it or change [[listener]] address" in run.stderr


def test_privileged_port_without_the_capability_says_how_to_fix_it(tmp_path: Path) -> None:
    """Port 25 as an ordinary process: the log names the capability and the unit."""
    with Relayd(tmp_path) as r:
        port = r.port("inbound")
        r.config_path.write_text(
            r.config_text().replace(f'address = "127.0.0.1:{port}"', 'address = "127.0.0.1:25"')
        )
        if os.geteuid() == 0:
            if shutil.which("setpriv") is None:
                pytest.skip("running as root without setpriv to drop CAP_NET_BIND_SERVICE")
            prefix = ["setpriv", "--inh-caps=-all", "--bounding-set=-net_bind_service"]
        else:
            prefix = []
        start = Path("/proc/sys/net/ipv4/ip_unprivileged_port_start")
        if start.exists() and int(start.read_text()) <= 25:
            pytest.skip("this kernel lets every process bind port 25")
        run = subprocess.run(
            [*prefix, sys.executable, "-m", "relayd.cli", "--config", str(r.config_path)],
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert run.returncode == 78, run.stderr
    assert "cannot bind 127.0.0.1:25" in run.stderr
    assert "port 25 is below" in run.stderr
    assert "CAP_NET_BIND_SERVICE" in run.stderr
    assert "relayd.service" in run.stderr


def test_sasl_method_is_logged_as_used(tmp_path: Path) -> None:
    with Relayd(tmp_path) as r:
        r.add_user("app1", "secret-pw", "*@app.example")
        r.start()
        with r.smtp("submissions") as s:
            s.ehlo("client.test")
            s.user, s.password = "app1", "secret-pw"
            code, _ = s.auth("LOGIN", s.auth_login)
            assert code == 235
            assert s.mail("x@app.example")[0] == 250
        assert "sasl_method=LOGIN, sasl_username=app1" in r.wait_log("sasl_method=LOGIN")
        assert "Session.login_data" not in r.log()
        assert r.stop() == 0


def test_non_ascii_digits_in_size_are_a_syntax_error(tmp_path: Path) -> None:
    with Relayd(tmp_path) as r:
        r.start()
        with raw_session(r.port("inbound")) as c:
            c.reply()
            c.cmd("EHLO client.test")
            assert c.cmd("MAIL FROM:<a@sender.test> SIZE=\u00b2").startswith("501 5.5.4")
            assert c.cmd("NOOP").startswith("250")
        assert "Traceback" not in r.log()
        assert r.stop() == 0


def test_mail_loop_is_refused(tmp_path: Path) -> None:
    with Relayd(tmp_path) as r:
        r.start()
        looped = b"".join(b"Received: from hop%d by hop%d\r\n" % (i, i) for i in range(51)) + MSG
        with r.smtp("inbound") as s:
            s.ehlo("client.test")
            s.mail("a@sender.test")
            s.rcpt("bob@relay.test")
            code, reply = s.data(looped)
            assert code == 554 and reply.startswith(b"5.4.6")
        assert r.stop() == 0


def test_no_thread_left_behind() -> None:
    """The harness itself: every server started above was stopped."""
    names = [t.name for t in threading.enumerate() if t.name.startswith(("MXServer", "DNS"))]
    assert names == []


def test_status_without_a_config_file_says_not_running(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.toml"
    out = subprocess.run(
        [sys.executable, "-m", "relayd.ctl", "--config", str(missing), "status"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 3
    assert "not running" in out.stdout
    assert "cannot read config" in out.stderr
