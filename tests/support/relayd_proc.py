"""relayd as a user runs it: a real process, a real config file, real sockets.

The harness writes a config under a temporary directory, starts
``relayd --config`` with a NOTIFY_SOCKET it listens on (so "ready" means
what systemd would take it to mean), and captures stderr for log
assertions. Every process is stopped at the end, SIGKILL as last resort.
"""

from __future__ import annotations

import contextlib
import os
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from support.certs import client_context, server_cert_files
from support.ports import free_port

if TYPE_CHECKING:
    from relayd.users import HashParams

HOSTNAME = "mail.relayd.test"


@dataclass
class ListenerSpec:
    name: str
    mode: str
    tls: str
    port: int = 0
    host: str = "127.0.0.1"


DEFAULT_LISTENERS = (
    ListenerSpec("inbound", "inbound", "starttls"),
    ListenerSpec("submission", "submission", "starttls"),
    ListenerSpec("submissions", "submission", "implicit"),
)


@dataclass
class Relayd:
    root: Path
    extra: str = ""  # more TOML appended to the config
    listeners: tuple[ListenerSpec, ...] = DEFAULT_LISTENERS
    hostname: str = HOSTNAME
    proc: subprocess.Popen[bytes] | None = None
    env: dict[str, str] = field(default_factory=dict)
    dns_address: str | None = None  # a loopback DNS server; None starts an empty one
    hold_delivery: bool = True  # route everything to a closed loopback port: mail stays queued
    fsize_limit: int | None = None  # RLIMIT_FSIZE for the daemon: real write failures
    auth: str = ""  # more keys for the [auth] table
    dns: str = ""  # more keys for the [dns] table
    prefix: tuple[str, ...] = ()  # a command that runs relayd (unshare, setpriv, ...)
    log_target: str = "stderr"  # [logging] target

    def __post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.cert, self.key = server_cert_files(self.root, self.hostname, "localhost", "127.0.0.1")
        self.listeners = tuple(
            ListenerSpec(s.name, s.mode, s.tls, s.port or free_port(s.host), s.host)
            for s in self.listeners
        )
        self._dns = None
        if self.dns_address is None:
            from support.dnsserver import DNSServer

            self._dns = DNSServer().start()
            self.dns_address = self._dns.address
        self.dead_port = free_port("127.0.0.1")
        self.config_path = self.root / "relayd.toml"
        self.log_path = self.root / "relayd.log"
        self.write_config()

    # ---- config ---------------------------------------------------------------

    def port(self, name: str) -> int:
        return next(s.port for s in self.listeners if s.name == name)

    @property
    def spool(self) -> Path:
        return self.root / "spool"

    @property
    def users_file(self) -> Path:
        return self.root / "users"

    def config_text(self) -> str:
        parts = [f'hostname = "{self.hostname}"\n']
        for s in self.listeners:
            parts.append(
                f'[[listener]]\nname = "{s.name}"\naddress = "{_hostport(s.host, s.port)}"\n'
                f'mode = "{s.mode}"\ntls = "{s.tls}"\n'
            )
        parts.append(f'[tls]\ncert = "{self.cert}"\nkey = "{self.key}"\n')
        parts.append(f'[auth]\nusers_file = "{self.users_file}"\n{self.auth}\n')
        parts.append(f'[spool]\npath = "{self.spool}"\nmin_free_space = "1MB"\n')
        parts.append(f'[control]\nsocket = "{self.root / "control.sock"}"\n')
        parts.append(f'[local]\nsocket = "{self.root / "sendmail.sock"}"\n')
        parts.append(f'[logging]\ntarget = "{self.log_target}"\nlevel = "info"\n')
        parts.append(f'[dns]\nnameservers = ["{self.dns_address}"]\ntimeout = "2s"\n{self.dns}\n')
        if self.hold_delivery:
            parts.append(
                f'[[route]]\ndomain = "*"\nvia = "127.0.0.1:{self.dead_port}"\ntls = "none"\n'
            )
        return "\n".join(parts) + "\n" + self.extra

    def write_config(self) -> None:
        self.config_path.write_text(self.config_text())

    def add_user(
        self, name: str, password: str, *allow_from: str, params: HashParams | None = None
    ) -> None:
        """A user with a cheap argon2id hash (tests only), or with ``params`` given."""
        from relayd.users import Argon2Params, cmd_user_add

        chosen = params or Argon2Params(time_cost=1, memory_kib=1024)
        cmd_user_add(self.users_file, name, password, list(allow_from), params=chosen)

    # ---- process ----------------------------------------------------------------

    def start(self, timeout: float = 20.0) -> Relayd:
        notify_path = self.root / "notify.sock"
        with contextlib.suppress(FileNotFoundError):
            notify_path.unlink()
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(str(notify_path))
        env = dict(os.environ, NOTIFY_SOCKET=str(notify_path), PYTHONUNBUFFERED="1", **self.env)
        env.pop("INVOCATION_ID", None)
        env.pop("JOURNAL_STREAM", None)
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [*self.prefix, sys.executable, "-m", "relayd.cli", "--config", str(self.config_path)],
            stdout=log,
            stderr=log,
            env=env,
            start_new_session=True,
            preexec_fn=self._limits if self.fsize_limit else None,
        )
        log.close()
        try:
            self._wait_ready(notify, timeout)
        except BaseException:
            self.kill()
            raise
        finally:
            notify.close()
        return self

    def _limits(self) -> None:
        import resource

        assert self.fsize_limit is not None
        resource.setrlimit(resource.RLIMIT_FSIZE, (self.fsize_limit, self.fsize_limit))

    def _wait_ready(self, notify: socket.socket, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"relayd exited with {self.proc.returncode}:\n{self.log()}")
            notify.settimeout(0.2)
            try:
                data = notify.recv(4096)
            except TimeoutError:
                continue
            if b"READY=1" in data.split(b"\n"):
                return
        raise TimeoutError(f"relayd did not become ready in {timeout}s:\n{self.log()}")

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM and wait: relayd's exit status."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                raise
        code = self.proc.returncode
        self.proc = None
        return code

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_log(self, text: str, timeout: float = 10.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            log = self.log()
            if text in log:
                return log
            time.sleep(0.05)
        raise TimeoutError(f"{text!r} not logged within {timeout}s:\n{self.log()[-3000:]}")

    def ctl(
        self, *args: str, input: bytes | None = None, timeout: float = 30.0
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "relayd.ctl", "--config", str(self.config_path), *args],
            input=input.decode() if input is not None else None,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    # ---- clients -------------------------------------------------------------------

    def smtp(self, name: str = "inbound", timeout: float = 10.0) -> smtplib.SMTP:
        spec = next(s for s in self.listeners if s.name == name)
        if spec.tls == "implicit":
            return smtplib.SMTP_SSL(spec.host, spec.port, timeout=timeout, context=client_context())
        return smtplib.SMTP(spec.host, spec.port, timeout=timeout)

    def submit(
        self,
        user: str,
        password: str,
        sender: str,
        rcpts: list[str],
        message: bytes,
        name: str = "submission",
    ) -> str:
        """STARTTLS, AUTH, send; the queue id from the 250 reply."""
        with self.smtp(name) as s:
            s.ehlo("client.test")
            if name != "submissions":
                s.starttls(context=client_context())
                s.ehlo("client.test")
            s.login(user, password)
            return send(s, sender, rcpts, message)

    def __enter__(self) -> Relayd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()
        if self._dns is not None:
            self._dns.stop()
            self._dns = None


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def send(s: smtplib.SMTP, sender: str, rcpts: list[str], message: bytes) -> str:
    """MAIL, RCPTs, DATA on an open session; the queue id from ``250 2.0.0 Ok: queued as ID``."""
    code, reply = s.mail(sender)
    assert code == 250, (code, reply)
    for r in rcpts:
        code, reply = s.rcpt(r)
        assert code == 250, (code, reply)
    code, reply = s.data(message)
    assert code == 250, (code, reply)
    text = reply.decode()
    assert text.startswith("2.0.0 Ok: queued as "), text
    return text.rsplit(" ", 1)[1]


def raw_session(port: int, host: str = "127.0.0.1", timeout: float = 10.0) -> RawClient:
    return RawClient(socket.create_connection((host, port), timeout=timeout))


class RawClient:
    """Byte-exact client for what smtplib will not send (bare LF, pipelining tricks)."""

    def __init__(self, sock: socket.socket | ssl.SSLSocket) -> None:
        self.sock = sock
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self) -> str:
        """One complete (possibly multi-line) reply."""
        lines: list[str] = []
        while True:
            while b"\r\n" not in self.buf:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise ConnectionError(f"closed; got so far {lines} {self.buf!r}")
                self.buf += chunk
            line, self.buf = self.buf.split(b"\r\n", 1)
            text = line.decode("utf-8", "replace")
            lines.append(text)
            if len(text) < 4 or text[3] != "-":
                return "\n".join(lines)

    def cmd(self, line: str) -> str:
        self.send(line.encode() + b"\r\n")
        return self.reply()

    def starttls(self, hostname: str = HOSTNAME) -> None:
        assert self.cmd("STARTTLS").startswith("220")
        self.sock = client_context().wrap_socket(self.sock, server_hostname=hostname)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
