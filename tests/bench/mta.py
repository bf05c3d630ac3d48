"""The two MTAs under test: a relayd process and a private Postfix instance.

Both listen on an unprivileged port on 127.0.0.1, queue durably, and send
everything to one next hop on 127.0.0.1: an smtp-sink ("relay"), or for
"accept" a closed port with delivery held, so mail stays queued and
nothing is tried (relayd: ``relayctl delivery pause``; Postfix: the access
table action ``HOLD``). Settings are kept equivalent
where the two have a counterpart:

- next hop: relayd ``[[route]] domain = "*"``; Postfix ``relayhost = [127.0.0.1]:N``
- concurrency to it: ``per_domain_concurrency = 20``;
  ``default_destination_concurrency_limit = 20`` (Postfix's default)
- relaying from loopback: ``[relay] networks`` (default); ``mynetworks = 127.0.0.0/8``
- reverse DNS of the client: never; ``smtpd_peername_lookup = no``
- max message size: 25 MB; ``message_size_limit = 25000000``
- TLS: none on the listener and the hop; none
- sessions at once: ``max_connections[_per_ip] = 2000``; smtpd ``maxproc`` in master.cf
- log: stderr to a file at level info; ``maillog_file`` through postlogd

The Postfix instance has its own config_directory, queue_directory and
data_directory under the benchmark's work directory, runs no chroot, and is
started with ``postfix -c DIR start-fg`` and stopped with ``postfix -c DIR
stop``: the system's own Postfix (if any) is never touched.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from support.ports import free_port

from bench import procs

LOOPBACK = "127.0.0.1"
SENDER = "sender@bench.test"
RECIPIENT = "rcpt@example.net"
HOP_CONCURRENCY = 20
POSTFIX_DEFAULT_PROCESS_LIMIT = 100


class StartError(RuntimeError):
    pass


def wait_greeting(port: int, timeout: float) -> None:
    """Until a client connecting to ``port`` hears a 220 (then QUIT)."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((LOOPBACK, port), timeout=2) as s:
                if s.recv(512).startswith(b"220"):
                    s.sendall(b"QUIT\r\n")
                    return
        except OSError as e:
            last = e
        time.sleep(0.1)
    raise StartError(f"no SMTP greeting on port {port} within {timeout}s ({last})")


class Relayd:
    name = "relayd"

    def __init__(
        self,
        root: Path,
        next_hop: int,
        max_connections: int = 2000,
        command: list[str] | None = None,
        env: dict[str, str] | None = None,
        processes: str | None = None,
        hold: bool = False,
    ) -> None:
        self.root = root
        self.next_hop = next_hop
        self.hold = hold  # delivery paused (relayctl delivery pause) once started
        self.max_connections = max_connections
        # How to run the daemon (for experiments: a launcher that patches first).
        self.command = command or [sys.executable, "-m", "relayd.cli"]
        self.extra_env = env or {}
        self.processes = processes  # [server] processes; None: relayd's default
        self.port = free_port(LOOPBACK)
        self.proc: subprocess.Popen[bytes] | None = None
        self.spool = root / "spool"
        self.log_path = root / "relayd.log"
        self.config_path = root / "relayd.toml"
        root.mkdir(parents=True, exist_ok=True)

    def config_text(self) -> str:
        r = self.root
        return f"""\
hostname = "bench-relayd.test"

[[listener]]
name = "bench"
address = "{LOOPBACK}:{self.port}"
mode = "inbound"
tls = "none"

[auth]
users_file = "{r / "users"}"

[spool]
path = "{self.spool}"

[control]
socket = "{r / "control.sock"}"

[logging]
target = "stderr"
level = "info"

[limits]
max_connections = {self.max_connections}
max_connections_per_ip = {self.max_connections}

[delivery]
per_domain_concurrency = {HOP_CONCURRENCY}

[[route]]
domain = "*"
via = "{LOOPBACK}:{self.next_hop}"
tls = "none"
""" + (f"\n[server]\nprocesses = {self._processes_toml()}\n" if self.processes else "")

    def _processes_toml(self) -> str:
        p = str(self.processes)
        return p if p.isdigit() else f'"{p}"'

    def start(self, timeout: float = 30.0) -> None:
        self.config_path.write_text(self.config_text())
        users = self.root / "users"
        if not users.exists():
            users.touch(mode=0o600)
        notify_path = self.root / "notify.sock"
        with contextlib.suppress(FileNotFoundError):
            notify_path.unlink()
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(str(notify_path))
        env = dict(
            os.environ, NOTIFY_SOCKET=str(notify_path), PYTHONUNBUFFERED="1", **self.extra_env
        )
        for key in ("INVOCATION_ID", "JOURNAL_STREAM", "WATCHDOG_USEC", "LISTEN_FDS"):
            env.pop(key, None)
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [*self.command, "--config", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=env,
                cwd=self.root,
                start_new_session=True,
            )
        try:
            self._wait_ready(notify, timeout)
            if self.hold:
                self.pause()
        except BaseException:
            self.kill()
            raise
        finally:
            notify.close()

    def pause(self) -> None:
        """``relayctl delivery pause``: queued mail stays queued, nothing is tried."""
        subprocess.run(
            [sys.executable, "-m", "relayd.ctl", "--config", str(self.config_path),
             "delivery", "pause"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=30,
            check=True,
        )  # fmt: skip

    def _wait_ready(self, notify: socket.socket, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        notify.settimeout(0.2)
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise StartError(f"relayd exited with {self.proc.returncode}: {self.log_tail()}")
            try:
                data = notify.recv(4096)
            except TimeoutError:
                continue
            if b"READY=1" in data.split(b"\n"):
                return
        raise StartError(f"relayd not ready within {timeout}s: {self.log_tail()}")

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def pids(self) -> list[int]:
        return procs.tree(self.proc.pid) if self.proc is not None else []

    def cpu(self) -> float:
        return procs.cpu_seconds(self.pids())

    def queued(self) -> int:
        try:
            return len(os.listdir(self.spool / "queue"))
        except FileNotFoundError:
            return 0

    def kill(self) -> None:
        """SIGKILL, as a crash would (the spool is left as it is)."""
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGKILL)
            procs.kill_group(self.proc, grace=5)
            self.proc = None

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(40)
        procs.kill_group(self.proc, grace=2)
        self.proc = None


def _master_cf(port: int, smtpd_maxproc: int | None) -> str:
    maxproc = "-" if smtpd_maxproc is None else str(smtpd_maxproc)
    # The stock services a relay needs, none chrooted; one smtpd on our port.
    services = [
        f"{LOOPBACK}:{port} inet n - n - {maxproc} smtpd",
        "pickup    unix  n - n 60    1 pickup",
        "cleanup   unix  n - n -     0 cleanup",
        "qmgr      unix  n - n 300   1 qmgr",
        "rewrite   unix  - - n -     - trivial-rewrite",
        "bounce    unix  - - n -     0 bounce",
        "defer     unix  - - n -     0 bounce",
        "trace     unix  - - n -     0 bounce",
        "verify    unix  - - n -     1 verify",
        "flush     unix  n - n 1000? 0 flush",
        "proxymap  unix  - - n -     - proxymap",
        "smtp      unix  - - n -     - smtp",
        "relay     unix  - - n -     - smtp",
        "showq     unix  n - n -     - showq",
        "error     unix  - - n -     - error",
        "retry     unix  - - n -     - error",
        "discard   unix  - - n -     - discard",
        "anvil     unix  - - n -     1 anvil",
        "scache    unix  - - n -     1 scache",
        "postlog   unix-dgram n - n - 1 postlogd",
    ]
    return "\n".join(services) + "\n"


class Postfix:
    name = "postfix"
    QUEUES = ("maildrop", "incoming", "active", "deferred", "hold")

    def __init__(
        self, root: Path, next_hop: int, smtpd_maxproc: int | None = 2000, hold: bool = False
    ) -> None:
        self.root = root
        self.next_hop = next_hop
        self.hold = hold  # every message to the hold queue (access table action HOLD)
        self.smtpd_maxproc = smtpd_maxproc  # None: Postfix's default_process_limit (100)
        self.port = free_port(LOOPBACK)
        self.etc = root / "etc"
        self.queue = root / "queue"
        self.data = root / "data"
        self.logdir = root / "log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._master: int | None = None

    def main_cf(self) -> str:
        return f"""\
compatibility_level = 3.6
queue_directory = {self.queue}
data_directory = {self.data}
maillog_file = {self.logdir / "maillog"}
maillog_file_prefixes = {self.root}
myhostname = bench-postfix.test
mydomain = bench-postfix.test
myorigin = $myhostname
mydestination =
inet_interfaces = {LOOPBACK}
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
relayhost = [{LOOPBACK}]:{self.next_hop}
default_destination_concurrency_limit = {HOP_CONCURRENCY}
smtpd_peername_lookup = no
smtp_tls_security_level = none
smtpd_tls_security_level = none
message_size_limit = 25000000
alias_maps =
alias_database =
local_recipient_maps =
biff = no
""" + (
            "smtpd_recipient_restrictions = check_client_access static:HOLD, "
            "permit_mynetworks, reject_unauth_destination\n"
            if self.hold
            else ""
        )

    def _prepare(self) -> None:
        for d in (self.root, self.etc, self.queue, self.data, self.logdir):
            d.mkdir(parents=True, exist_ok=True)
            d.chmod(0o755)
        # Every directory above the queue must be searchable by the postfix user.
        for parent in self.root.parents:
            mode = parent.stat().st_mode
            if not mode & 0o001:
                raise StartError(
                    f"{parent} is not searchable by other users; "
                    "set TMPDIR or --workdir to a directory that is"
                )
        owner = pwd.getpwnam("postfix")
        os.chown(self.data, owner.pw_uid, owner.pw_gid)
        (self.etc / "main.cf").write_text(self.main_cf())
        (self.etc / "master.cf").write_text(_master_cf(self.port, self.smtpd_maxproc))
        # Postfix will not read a config file modified within the last second
        # (it could be half written) and polls until it is older: backdate it.
        past = time.time() - 60
        for name in ("main.cf", "master.cf"):
            os.utime(self.etc / name, (past, past))
        self._queue_skeleton()

    def _queue_skeleton(self) -> None:
        """The queue's directories, owners and modes, as ``postfix check`` makes them.

        ``postfix check`` takes about a second; it runs once per work directory
        and later instances copy its result and skip it (``quick-start``).
        """
        template = self.root.parent / ".postfix-queue-template"
        postfix = tool("postfix") or "postfix"
        if not template.exists():
            subprocess.run(
                [postfix, "-c", str(self.etc), "check"],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=60,
                check=True,
            )
            shutil.rmtree(template, ignore_errors=True)
            subprocess.run(["cp", "-a", str(self.queue), str(template)], check=True)
        else:
            self.queue.rmdir()
            subprocess.run(["cp", "-a", str(template), str(self.queue)], check=True)
        (self.queue / "quick-start").touch()

    def start(self, timeout: float = 30.0) -> None:
        self._prepare()
        out = (self.logdir / "start-fg.out").open("ab")
        try:
            self.proc = subprocess.Popen(
                [tool("postfix") or "postfix", "-c", str(self.etc), "start-fg"],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                cwd=self.root,
                start_new_session=True,
            )
        finally:
            out.close()
        try:
            deadline = time.monotonic() + timeout
            while self.master_pid() is None:
                if self.proc.poll() is not None:
                    raise StartError(
                        f"postfix exited with {self.proc.returncode}: {self.log_tail()}"
                    )
                if time.monotonic() > deadline:
                    raise StartError(f"postfix master not up within {timeout}s: {self.log_tail()}")
                time.sleep(0.05)
            wait_greeting(self.port, max(1.0, deadline - time.monotonic()))
        except BaseException:
            self.stop()
            raise

    def master_pid(self) -> int | None:
        if self._master is not None:
            return self._master
        try:
            pid = int((self.queue / "pid" / "master.pid").read_text().strip())
        except (OSError, ValueError):
            return None
        if not procs.tree(pid):
            return None
        self._master = pid
        return pid

    def log_tail(self, chars: int = 2000) -> str:
        text = ""
        for name in ("start-fg.out", "maillog"):
            with contextlib.suppress(OSError):
                text += (self.logdir / name).read_text(errors="replace")[-chars:]
        return text

    def pids(self) -> list[int]:
        master = self.master_pid()
        return procs.tree(master) if master is not None else []

    def cpu(self) -> float:
        return procs.cpu_seconds(self.pids(), with_reaped_children_of=self.master_pid())

    def queued(self) -> int:
        """Queue files in all queues (by name: the qmgr may move one while we look)."""
        names: set[str] = set()
        for q in self.QUEUES:
            for _, _, files in os.walk(self.queue / q):
                names.update(files)
        return len(names)

    def stop(self) -> None:
        pids = self.pids()
        if pids:
            with contextlib.suppress(subprocess.TimeoutExpired, OSError):
                subprocess.run(
                    [tool("postfix") or "postfix", "-c", str(self.etc), "stop"],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    timeout=30,
                    check=False,
                )
            if not procs.wait_gone(pids, 15):
                procs.kill_pids(pids)
                procs.wait_gone(pids, 5)
        if self.proc is not None:
            procs.kill_group(self.proc, grace=10)
            self.proc = None
        if self._master is not None:
            procs.kill_pids(procs.tree(self._master))
        self._master = None
        procs.reap_orphans()


def tool(name: str) -> str | None:
    """Full path of a Postfix program (they live in /usr/sbin, often not on a user's PATH)."""
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")


def ensure_postfix(log: object = print) -> None:
    """Install Debian's postfix package (for smtp-source and smtp-sink too) if missing.

    The package is installed with debconf's "No configuration", which
    starts nothing; a system service is disabled again should the
    package have enabled or started one.
    """
    if all(tool(t) for t in ("postfix", "smtp-source", "smtp-sink")):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise SystemExit(
            "bench: Postfix (smtp-source, smtp-sink) is missing; install Debian's "
            "postfix package as root, or run with --relayd-only"
        )
    assert callable(log)
    log("bench: installing postfix (debconf: No configuration) ...")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(
        ["debconf-set-selections"],
        input=b"postfix postfix/main_mailer_type select No configuration\n",
        check=True,
        env=env,
    )
    install = ["apt-get", "install", "-y", "-q", "postfix"]
    if subprocess.run(install, env=env, check=False).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, check=True)
        subprocess.run(install, env=env, check=True)
    if shutil.which("systemctl"):  # works without a running systemd too
        subprocess.run(["systemctl", "disable", "postfix.service"], env=env, check=False)
        if Path("/run/systemd/system").is_dir():
            subprocess.run(["systemctl", "stop", "postfix.service"], env=env, check=False)
    elif shutil.which("update-rc.d"):
        subprocess.run(["update-rc.d", "postfix", "disable"], env=env, check=False)
    if not all(tool(t) for t in ("postfix", "smtp-source", "smtp-sink")):
        raise SystemExit("bench: postfix installed, but smtp-source/smtp-sink not found")
