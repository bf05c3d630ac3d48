"""The daemon started as relayd.service and its socket units start it, without systemd.

A launcher does what systemd does between fork and exec: the listening
sockets at fds 3, 4, ..., LISTEN_FDS, LISTEN_FDNAMES and LISTEN_PID (its own
pid, which exec keeps), WATCHDOG_USEC, and NOTIFY_SOCKET naming a datagram
socket this test reads as the service manager would. test_systemd.py covers
the pieces one by one; here the real daemon serves SMTP on the inherited
sockets and reports READY, RELOADING, WATCHDOG and STOPPING.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from support.ports import free_port
from support.relayd_proc import ListenerSpec, Relayd

WAIT = 20.0

# Run in the child: the inherited sockets to fds 3, 4, ..., LISTEN_PID to
# this pid, then exec relayd (same pid, same fds).
_LAUNCHER = """
import fcntl, os, sys
fds = [int(fd) for fd in sys.argv[1].split(",")]
high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 100) for fd in fds]
for fd in fds:
    os.close(fd)
for index, fd in enumerate(high):
    os.dup2(fd, 3 + index)  # dup2 leaves the copy inheritable
    os.close(fd)
os.environ["LISTEN_PID"] = str(os.getpid())
os.execv(sys.executable, [sys.executable, "-m", "relayd.cli", "--config", sys.argv[2]])
"""


class Manager:
    """The service manager's end of NOTIFY_SOCKET: every datagram, in order."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.received: list[list[str]] = []

    def wait_for(self, assignment: str, timeout: float = WAIT) -> list[str]:
        """The next datagram holding ``assignment`` (e.g. "READY=1")."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            lines = data.decode().split("\n")
            self.received.append(lines)
            if assignment in lines:
                return lines
        raise TimeoutError(f"no {assignment} within {timeout}s; got {self.received}")

    def close(self) -> None:
        self.sock.close()


def _listening(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(16)
    return sock


def _greeting(port: int) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.settimeout(10)
        data = b""
        while b"\r\n" not in data:
            chunk = conn.recv(1024)
            if not chunk:
                break
            data += chunk
        with contextlib.suppress(OSError):
            conn.sendall(b"QUIT\r\n")
        return data.decode(errors="replace")


def test_socket_activated_notify_service(tmp_path: Path) -> None:
    # The config's inbound address is held by another listener: relayd must
    # serve inbound on the socket it inherits (named "inbound"), not bind.
    blocker = _listening(free_port())
    specs = (
        ListenerSpec("inbound", "inbound", "starttls", port=blocker.getsockname()[1]),
        ListenerSpec("submission", "submission", "starttls"),
        ListenerSpec("submissions", "submission", "implicit"),
    )
    manager = Manager(tmp_path / "notify.sock")
    inbound_port = free_port()
    # inbound: matched by its FileDescriptorName. submission: named after
    # the unit (systemd's default when FileDescriptorName= is not set), so
    # matched by its address. submissions: not passed, relayd binds it.
    socks = [_listening(inbound_port)]
    proc: subprocess.Popen[bytes] | None = None
    with Relayd(tmp_path / "relayd", listeners=specs) as r:
        try:
            socks.append(_listening(r.port("submission")))
            fds = [s.fileno() for s in socks]
            env = {
                k: v for k, v in os.environ.items() if not k.startswith(("LISTEN_", "WATCHDOG_"))
            }
            env.pop("INVOCATION_ID", None)
            env.pop("JOURNAL_STREAM", None)
            env.update(
                LISTEN_FDS="2",
                LISTEN_FDNAMES="inbound:relayd-submission.socket",
                NOTIFY_SOCKET=str(tmp_path / "notify.sock"),
                WATCHDOG_USEC="2000000",  # WatchdogSec=2: a ping every second
                PYTHONUNBUFFERED="1",
            )
            with r.log_path.open("ab") as log:
                proc = subprocess.Popen(
                    [sys.executable, "-c", _LAUNCHER, ",".join(map(str, fds)), str(r.config_path)],
                    pass_fds=fds,
                    env=env,
                    stdout=log,
                    stderr=log,
                    start_new_session=True,
                )
            ready = manager.wait_for("READY=1")
            assert any(line.startswith("STATUS=") for line in ready), ready
            # The daemon holds the sockets now; the test's copies can go.
            for s in socks:
                s.close()

            assert _greeting(inbound_port).startswith("220 "), r.log()
            assert _greeting(r.port("submission")).startswith("220 "), r.log()
            log_text = r.log()
            assert "cannot bind" not in log_text
            assert "as inbound (inbound" in log_text and "as submission (" in log_text
            with r.smtp("submissions") as s:  # bound by relayd itself
                assert s.noop()[0] == 250

            manager.wait_for("WATCHDOG=1", timeout=5)

            # SIGHUP (relayctl reload): RELOADING=1 with MONOTONIC_USEC, then READY=1;
            # the inherited sockets stay open.
            os.kill(proc.pid, signal.SIGHUP)
            reloading = manager.wait_for("RELOADING=1")
            assert any(line.startswith("MONOTONIC_USEC=") for line in reloading), reloading
            manager.wait_for("READY=1")
            assert _greeting(inbound_port).startswith("220 ")
            assert _greeting(r.port("submission")).startswith("220 ")

            os.kill(proc.pid, signal.SIGTERM)
            manager.wait_for("STOPPING=1")
            assert proc.wait(WAIT) == 0, r.log()[-3000:]
            # Gone with it: nothing listens on the inherited port any more.
            try:
                probe = socket.create_connection(("127.0.0.1", inbound_port), timeout=2)
            except ConnectionRefusedError:
                pass
            else:
                probe.close()
                raise AssertionError("the inherited socket outlived relayd")
        finally:
            if proc is not None and proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(10)
            for s in socks:
                s.close()
            blocker.close()
            manager.close()
