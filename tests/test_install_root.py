"""docs/install.md as root, for real, inside a throwaway overlay of this host's /.

Opt-in: ``RELAYD_ROOT_WALK=1``. It needs root, ``unshare`` and overlayfs,
and takes some 20 s (a real pip install into /opt/relayd/venv). Nothing
outside the overlay changes: a private mount namespace stacks an empty
upper layer on /, and everything runs chrooted there; the network is the
host's, so the test's DNS server and MX on loopback answer.

Unlike test_install_walk.py (DESTDIR, as an ordinary user), this takes
the paths that only root takes: ``make install`` creating the ``relayd``
user and chowning the spool and /etc/relayd, the certbot deploy hook of
step 3 installing the certificate ``root:relayd``, ``relayctl user add``
and ``dkim keygen`` run as root, and the daemon running as user
``relayd`` with the unit's ``UMask=0077`` and RuntimeDirectory, so a file
the daemon cannot read fails the walk the way it fails on a server.
"""

from __future__ import annotations

import os
import shutil
import signal
import smtplib
import socket
import subprocess
import time
from pathlib import Path

import dkim
import pytest
from support.certs import client_context, server_cert_files
from support.dnsserver import DNSServer
from support.mxserver import MXPool
from support.ports import free_port
from test_install_walk import HOSTNAME, REPO, on_this_machine, step2_configure, wait_ready

from relayd.dns import dkim_dnsfunc

pytestmark = [
    pytest.mark.timeout(240),
    pytest.mark.skipif(
        os.environ.get("RELAYD_ROOT_WALK") != "1",
        reason="opt-in: RELAYD_ROOT_WALK=1 (as root, with unshare and overlayfs)",
    ),
]

# Phase 1, inside the chroot: docs/install.md step 1.
INSTALL = """\
set -eu
cp -a /walk/src /usr/local/src/relayd
cd /usr/local/src/relayd
make install
"""

# Phase 2: steps 3 to 5, then step 7 as relayd.service runs it. The exec
# chain keeps the pid, so the test's process is the daemon.
START = """\
set -eu
mkdir -p /etc/letsencrypt/renewal-hooks/deploy
cp /walk/hook /etc/letsencrypt/renewal-hooks/deploy/relayd
chmod 0755 /etc/letsencrypt/renewal-hooks/deploy/relayd
RENEWED_DOMAINS={hostname} RENEWED_LINEAGE=/walk/lineage \\
    /etc/letsencrypt/renewal-hooks/deploy/relayd 2>/dev/null
echo "app1-long-password" | relayctl user add app1 --allow-from '*@example.com' --password-stdin
relayctl dkim keygen example.com s1 > /walk/dkim.txt
stat -c '%n %U:%G %a' /etc/relayd/tls/fullchain.pem /etc/relayd/tls/privkey.pem \\
    /etc/relayd/users /etc/relayd/dkim/example.com.s1.key /var/spool/relayd > /walk/modes.txt
relayd --check-config
install -d -m 0755 -o relayd -g relayd /run/relayd
umask 077
exec setpriv --reuid=relayd --regid=relayd --init-groups --inh-caps=-all \\
    env NOTIFY_SOCKET=/walk/notify.sock /opt/relayd/venv/bin/relayd --config /etc/relayd.toml
"""


def _chroot(tmp: Path, script: str) -> list[str]:
    """`unshare -m sh -c ...`: the overlay mounted, then `script` run chrooted."""
    root = tmp / "root"
    (tmp / "walk" / "phase.sh").write_text(script)
    mounts = f"""\
set -e
mount --make-rprivate /
mount -t overlay overlay -o lowerdir=/,upperdir={root}/up,workdir={root}/work {root}/merged
mount -t proc proc {root}/merged/proc
mount --rbind /dev {root}/merged/dev
mount --rbind /sys {root}/merged/sys
mount -t tmpfs tmpfs {root}/merged/run
mount -t tmpfs tmpfs {root}/merged/tmp
mkdir -p {root}/merged/walk
mount --bind {tmp}/walk {root}/merged/walk
exec chroot {root}/merged /bin/sh /walk/phase.sh
"""
    return ["unshare", "-m", "sh", "-c", mounts]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    for name in ("NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID", "INVOCATION_ID", "JOURNAL_STREAM"):
        env.pop(name, None)
    env["PATH"] = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    return env


def _hook() -> str:
    """Step 3's deploy hook, as docs/install.md prints it, for this test's host name."""
    doc = (REPO / "docs/install.md").read_text()
    marker = "Create `/etc/letsencrypt/renewal-hooks/deploy/relayd` (mode 0755):\n\n```sh\n"
    return doc.split(marker, 1)[1].split("```", 1)[0].replace("mail.example.com", HOSTNAME)


def test_install_md_as_root_in_an_overlay(
    tmp_path: Path, dns_server: DNSServer, mx_pool: MXPool
) -> None:
    if os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("setpriv") is None:
        pytest.fail("RELAYD_ROOT_WALK=1 needs root, unshare and setpriv")
    walk = tmp_path / "walk"
    for sub in ("walk", "root/up", "root/work", "root/merged"):
        (tmp_path / sub).mkdir(parents=True, exist_ok=True)
    # A checkout's files, as `git clone` gives them (uncommitted edits included).
    files = (
        subprocess.run(
            ["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True, timeout=30
        )
        .stdout.decode()
        .split("\0")
    )
    for name in filter(None, files):
        if (REPO / name).is_file():
            (walk / "src" / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, walk / "src" / name)
    lineage = walk / "lineage"
    lineage.mkdir()
    cert, key = server_cert_files(tmp_path, HOSTNAME, "127.0.0.1")
    shutil.copyfile(cert, lineage / "fullchain.pem")
    shutil.copyfile(key, lineage / "privkey.pem")
    (walk / "hook").write_text(_hook())
    walk.chmod(0o755)

    # Step 1.
    done = subprocess.run(
        _chroot(tmp_path, INSTALL), capture_output=True, text=True, timeout=180, env=_env()
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "running: systemd-sysusers" in done.stdout or "running: useradd" in done.stdout
    assert "running: chown relayd:relayd /var/spool/relayd" in done.stdout

    # Step 2, on the installed file (in the overlay's upper layer).
    config = tmp_path / "root/up/etc/relayd.toml"
    ports = {"submission": free_port(), "submissions": free_port()}
    config.write_text(
        on_this_machine(
            step2_configure(config.read_text()), None, ports, dns_server.address, mx_pool.port
        )
    )

    # Steps 3, 4, 5 and 7.
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(walk / "notify.sock"))
    (walk / "notify.sock").chmod(0o777)  # the daemon runs as relayd
    log = tmp_path / "relayd.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            _chroot(tmp_path, START.format(hostname=HOSTNAME)),
            stdout=out,
            stderr=out,
            env=_env(),
            start_new_session=True,
        )
    try:
        with notify:
            wait_ready(proc, notify, log)
        modes = (walk / "modes.txt").read_text().splitlines()
        assert modes == [
            "/etc/relayd/tls/fullchain.pem root:relayd 640",
            "/etc/relayd/tls/privkey.pem root:relayd 640",
            "/etc/relayd/users root:relayd 640",
            "/etc/relayd/dkim/example.com.s1.key relayd:relayd 600",
            "/var/spool/relayd relayd:relayd 750",
        ], modes
        record = (walk / "dkim.txt").read_text().split("; publish this DNS record:\n")[1].strip()
        name, _, value = record.partition(" IN TXT ")
        dns_server.add(f"{name.rstrip('.')} TXT {value}", *mx_pool.mx_records("example.org"))

        message = (
            b"From: app@example.com\r\nTo: bob@example.org\r\nSubject: root walk\r\n\r\nHi\r\n"
        )
        with smtplib.SMTP("127.0.0.1", ports["submission"], timeout=10) as s:
            s.ehlo("app.test")
            s.starttls(context=client_context())
            s.ehlo("app.test")
            s.login("app1", "app1-long-password")
            s.sendmail("app@example.com", ["bob@example.org"], message)
        deadline = time.monotonic() + 15
        got = []
        while not got and time.monotonic() < deadline:
            time.sleep(0.1)
            got = [m for server in mx_pool for m in server.messages]
        assert got, log.read_text()[-3000:]
        assert dkim.verify(got[0].data, dnsfunc=dkim_dnsfunc(dns_server.resolver()))
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
