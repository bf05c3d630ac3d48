"""docs/install.md, walked as a new VPS owner would, from `make install` to delivered mail.

`make install DESTDIR=...` stages the install (virtualenv, command links,
units, the config from etc/relayd.toml) under a temporary directory and
prints the system changes it skips. Then the steps of docs/install.md in
their order, with the installed tree's own commands: edit the installed
/etc/relayd.toml as step 2 says, put a certificate where step 3's hook
puts it, `relayctl user add` and `relayctl dkim keygen` (step 4),
`relayd --check-config` (step 5, which must pass where it stands), the DNS
records of step 6 (SPF for the common case: the domain's MX is elsewhere,
relayd only sends), and the daemon started as the unit starts it (step 7,
Type=notify: ready means READY=1). An application sends through the
submission port with STARTTLS and AUTH; the message arrives, DKIM-signed,
at a loopback MX.

What differs from a real host, and only that: listeners on loopback ports
above 1024, the paths under the staging directory, the test's DNS server
and the MX port. pip needs the package index (or PIP_ARGS in the
environment, e.g. ``--no-index --find-links WHEELS``, passed through to
install.sh).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import smtplib
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import dkim
import pytest
from support.certs import client_context, server_cert_files
from support.dnsserver import DNSServer
from support.mxserver import MXPool
from support.ports import free_port

from relayd.dns import dkim_dnsfunc
from relayd.policy.spf import check_spf

REPO = Path(__file__).resolve().parent.parent
HOSTNAME = "mail.relayd.test"  # step 2: "replace them with yours"
VENV = "opt/relayd/venv"

pytestmark = pytest.mark.timeout(120)


def _env(**extra: str) -> dict[str, str]:
    """A clean environment: nothing of the source tree's virtualenv leaks in."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env.pop("INVOCATION_ID", None)
    env.pop("JOURNAL_STREAM", None)
    env.pop("NOTIFY_SOCKET", None)
    env.pop("LISTEN_FDS", None)
    env.pop("LISTEN_PID", None)
    env["PATH"] = "/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin"
    env.update(extra)
    return env


class Installed:
    """The staged tree: run its commands as their links would."""

    def __init__(self, destdir: Path) -> None:
        self.destdir = destdir
        self.python = destdir / VENV / "bin" / "python"
        self.config = destdir / "etc" / "relayd.toml"

    def command(self, name: str) -> list[str]:
        # /usr/local/bin/NAME -> /opt/relayd/venv/bin/NAME, whose #! line names
        # /opt/relayd/venv/bin/python: only right once the tree is copied to /.
        link = self.destdir / "usr/local/bin" / name
        target = os.readlink(link)
        assert target == f"/{VENV}/bin/{name}", target
        script = self.destdir / target.lstrip("/")
        assert script.read_text().startswith(f"#!/{VENV}/bin/python")
        return [str(self.python), str(script)]

    def run(
        self, name: str, *args: str, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*self.command(name), *args],
            input=input,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            cwd=self.destdir,
            env=_env(RELAYD_CONFIG=str(self.config)),
        )


@pytest.fixture(scope="module")
def staged(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Installed, str]]:
    """`make install DESTDIR=...` once for the module: (the tree, what it printed)."""
    if shutil.which("make") is None:
        pytest.fail("make is not installed (docs/install.md step 1 installs it)")
    destdir = tmp_path_factory.mktemp("install") / "stage"
    done = subprocess.run(
        ["make", "--no-print-directory", "install", f"DESTDIR={destdir}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
        env=_env(**({"PIP_ARGS": os.environ["PIP_ARGS"]} if "PIP_ARGS" in os.environ else {})),
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    yield Installed(destdir), done.stdout


def test_make_install_stages_everything_and_changes_nothing_outside(
    staged: tuple[Installed, str],
) -> None:
    tree, out = staged
    d = tree.destdir
    for path in (
        f"{VENV}/bin/relayd",
        "etc/systemd/system/relayd.service",
        "etc/systemd/system/relayd.socket",
        "usr/lib/sysusers.d/relayd.conf",
        "usr/lib/tmpfiles.d/relayd.conf",
        "etc/relayd.toml",
    ):
        assert (d / path).is_file(), path
    for name in ("relayd", "relayctl", "relayd-sendmail"):
        assert os.readlink(d / "usr/local/bin" / name) == f"/{VENV}/bin/{name}"
    assert (d / "etc/relayd.toml").stat().st_mode & 0o777 == 0o640
    for directory in ("var/spool/relayd", "etc/relayd", "etc/relayd/tls", "etc/relayd/dkim"):
        assert (d / directory).stat().st_mode & 0o777 == 0o750, directory
    # The system changes are printed, not made.
    assert "staging into DESTDIR=" in out
    assert "would run: systemd-sysusers /usr/lib/sysusers.d/relayd.conf" in out
    assert "would run: chown relayd:relayd /var/spool/relayd" in out
    assert "would run: systemctl daemon-reload" in out
    # The staged venv runs relayd from itself, not from this checkout.
    where = subprocess.run(
        [str(tree.python), "-c", "import relayd; print(relayd.__file__)"],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=d,
        env=_env(),
        check=True,
    )
    assert where.stdout.startswith(str(d / VENV)), where.stdout


# ---- docs/install.md, step by step ---------------------------------------------


def step2_configure(text: str) -> str:
    """Step 2's three edits of the installed /etc/relayd.toml."""
    text = text.replace('hostname = "mail.example.com"', f'hostname = "{HOSTNAME}"', 1)
    # Only sending: the port 25 listener goes.
    smtp = re.search(r"\[\[listener\]\]\n(?:#.*\n)*name = \"smtp\"\n(?:.*\n)*?(?=\n)", text)
    assert smtp is not None, "the installed config has no smtp listener to delete"
    text = text.replace(smtp.group(0), "", 1)
    dkim_block = (
        "# [[dkim.key]]\n",
        '# domain = "example.com"\n',
        '# selector = "mail2024"\n',
        '# key_file = "/etc/relayd/dkim/example.com.mail2024.key"\n',
    )
    wanted = (
        "[[dkim.key]]\n",
        'domain = "example.com"\n',
        'selector = "s1"\n',
        'key_file = "/etc/relayd/dkim/example.com.s1.key"\n',
    )
    for old, new in zip(dkim_block, wanted, strict=True):
        assert old in text, old
        text = text.replace(old, new, 1)
    return text


def on_this_machine(
    text: str, destdir: Path | None, ports: dict[str, int], dns: str, mx: int
) -> str:
    """What the test host needs instead: loopback ports, staged paths, test DNS and MX port."""
    text = text.replace('"0.0.0.0:587"', f'"127.0.0.1:{ports["submission"]}"')
    text = text.replace('"0.0.0.0:465"', f'"127.0.0.1:{ports["submissions"]}"')
    for root in ("/etc/relayd", "/var/spool/relayd", "/run/relayd"):
        if destdir is not None:
            text = text.replace(f'"{root}', f'"{destdir}{root}')
    text = text.replace('# nameservers = ["127.0.0.1", "[::1]:53"]', f'nameservers = ["{dns}"]')
    text = text.replace("\nport = 25\n", f"\nport = {mx}\n", 1)
    text = text.replace('min_free_space = "100MB"', 'min_free_space = "1MB"')
    return text


def wait_ready(proc: subprocess.Popen[bytes], notify: socket.socket, log: Path) -> None:
    deadline = time.monotonic() + 20
    notify.settimeout(0.2)
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"relayd exited {proc.returncode}:\n{log.read_text()}")
        with contextlib.suppress(TimeoutError):
            if b"READY=1" in notify.recv(4096).split(b"\n"):
                return
    raise AssertionError(f"relayd not ready within 20 s:\n{log.read_text()}")


def test_install_md_walk_sends_dkim_signed_mail(
    staged: tuple[Installed, str], tmp_path: Path, dns_server: DNSServer, mx_pool: MXPool
) -> None:
    tree, _ = staged
    d = tree.destdir
    ports = {"submission": free_port(), "submissions": free_port()}

    # Step 2: configure (the installed file, edited as the doc says).
    config = step2_configure(tree.config.read_text())
    assert 'name = "smtp"' not in config
    tree.config.write_text(on_this_machine(config, d, ports, dns_server.address, mx_pool.port))

    # Too early for the check, as step 2 says: it names both missing files in one run.
    early = tree.run("relayd", "--check-config")
    assert early.returncode == 1
    assert "fullchain.pem" in early.stderr and "example.com.s1.key" in early.stderr, early.stderr
    assert "relayctl dkim keygen example.com s1" in early.stderr, early.stderr

    # Step 3: the certificate, where the certbot deploy hook installs it.
    cert, key = server_cert_files(tmp_path, HOSTNAME, "127.0.0.1")
    for src, name in ((cert, "fullchain.pem"), (key, "privkey.pem")):
        dst = d / "etc/relayd/tls" / name
        shutil.copyfile(src, dst)
        dst.chmod(0o640)

    # Step 4: a user for the application, and the DKIM key.
    added = tree.run(
        "relayctl",
        "user",
        "add",
        "app1",
        "--allow-from",
        "*@example.com",
        "--password-stdin",
        input="app1-long-password\n",
    )
    assert added.returncode == 0, added.stderr
    keygen = tree.run("relayctl", "dkim", "keygen", "example.com", "s1")
    assert keygen.returncode == 0, keygen.stderr
    assert (d / "etc/relayd/dkim/example.com.s1.key").stat().st_mode & 0o777 == 0o600
    record = keygen.stdout.split("; publish this DNS record:\n", 1)[1].strip()
    assert record.startswith("s1._domainkey.example.com"), record

    # Step 5: the check passes where it stands.
    check = tree.run("relayd", "--check-config")
    assert check.returncode == 0, check.stdout + check.stderr

    # Step 6: DNS. The domain's MX is elsewhere; relayd only sends, and SPF
    # names its host next to the MX: "v=spf1 mx a:mail.example.com ~all".
    name, _, value = record.partition(" IN TXT ")
    dns_server.add(
        f"{name.rstrip('.')} TXT {value}",
        "example.com MX 10 mx.mailbox-provider.test",
        "mx.mailbox-provider.test A 192.0.2.25",
        f'example.com TXT "v=spf1 mx a:{HOSTNAME} ~all"',
        f"{HOSTNAME} A 127.0.0.1",
        *mx_pool.mx_records("example.org"),
    )
    resolver = dns_server.resolver()
    assert check_spf("127.0.0.1", HOSTNAME, "app@example.com", resolver).result == "pass"
    assert check_spf("198.51.100.7", "x.test", "app@example.com", resolver).result == "softfail"

    # Step 7: start it, as the unit does (Type=notify).
    (d / "run/relayd").mkdir(parents=True, exist_ok=True)  # the unit's RuntimeDirectory
    notify_path = tmp_path / "notify.sock"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_path))
    log = tmp_path / "relayd.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            tree.command("relayd"),  # ExecStart (with RELAYD_CONFIG for --config)
            stdout=out,
            stderr=out,
            cwd=d,
            env=_env(RELAYD_CONFIG=str(tree.config), NOTIFY_SOCKET=str(notify_path)),
            start_new_session=True,
        )
    try:
        with notify:
            wait_ready(proc, notify, log)
        status = tree.run("relayctl", "status")
        assert status.returncode == 0, status.stderr

        # An application sends through 587 with STARTTLS and AUTH.
        message = (
            b"From: App <app@example.com>\r\nTo: bob@example.org\r\n"
            b"Subject: installed\r\nMessage-ID: <walk-1@example.com>\r\n\r\nIt works.\r\n"
        )
        with smtplib.SMTP("127.0.0.1", ports["submission"], timeout=10) as s:
            s.ehlo("app.test")
            s.starttls(context=client_context())
            s.ehlo("app.test")
            s.login("app1", "app1-long-password")
            s.sendmail("app@example.com", ["bob@example.org"], message)

        got = [m for server in mx_pool for m in server.messages]
        deadline = time.monotonic() + 15
        while not got and time.monotonic() < deadline:
            time.sleep(0.1)
            got = [m for server in mx_pool for m in server.messages]
        assert got, log.read_text()[-3000:]
        [arrived] = got
        assert arrived.rcpt_tos == ["bob@example.org"]
        assert arrived.helo == HOSTNAME
        assert arrived.tls
        header = arrived.data.split(b"\r\n\r\n", 1)[0]
        assert b"\r\nDKIM-Signature: " in header, header
        assert b"d=example.com;" in header and b"s=s1;" in header
        assert dkim.verify(arrived.data, dnsfunc=dkim_dnsfunc(resolver))
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
        try:
            code = proc.wait(15)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)
            raise
    assert code == 0, log.read_text()[-3000:]
