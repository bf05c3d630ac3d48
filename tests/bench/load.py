"""Postfix's load tools: smtp-source drives an MTA, smtp-sink is the relay's next hop."""

from __future__ import annotations

import os
import re
import subprocess
import threading
import time
from dataclasses import dataclass

from support.ports import free_port

from bench import procs
from bench.mta import LOOPBACK, RECIPIENT, SENDER, tool, wait_greeting


@dataclass
class SourceRun:
    count: int
    sessions: int
    size: int
    elapsed: float
    returncode: int
    output: str
    capped: bool = False  # stopped at the time cap before sending everything


def smtp_source(
    port: int, sessions: int, count: int, size: int, cap: float, keep: bool = False
) -> SourceRun:
    """``count`` messages with ``size`` octets of body over ``sessions`` sessions.

    By default a new connection per message, as applications do; ``keep``
    (``-d``) keeps each session open for its next message. smtp-source
    exits once every message got its reply. After ``cap`` seconds it is
    stopped wherever it is (``capped``): the caller then counts what the
    MTA accepted.
    """
    cmd = [
        tool("smtp-source") or "smtp-source",
        *(["-d"] if keep else []),
        "-s", str(sessions),
        "-m", str(count),
        "-l", str(size),
        "-f", SENDER,
        "-t", RECIPIENT,
        "-M", "client.bench.test",
        f"{LOOPBACK}:{port}",
    ]  # fmt: skip
    start = time.perf_counter()
    proc = subprocess.Popen(
        cmd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    capped = False
    try:
        out, _ = proc.communicate(timeout=cap)
        code = proc.returncode
    except subprocess.TimeoutExpired:
        capped = True
        procs.kill_group(proc, grace=0.2)
        out, code = b"", 0
    finally:
        if proc.poll() is None:
            procs.kill_group(proc, grace=1)
    elapsed = time.perf_counter() - start
    text = out.decode(errors="replace")[-500:]
    return SourceRun(count, sessions, size, elapsed, code, text, capped)


_MESG = re.compile(rb"mesg=(\d+)")


class Sink:
    """smtp-sink on a loopback port, exiting once it has received ``count`` messages."""

    def __init__(self, count: int, port: int | None = None) -> None:
        self.count = count
        self.port = port or free_port(LOOPBACK)
        self.received = 0
        self.last: float | None = None  # perf_counter() when the count last went up
        self.finished: float | None = None  # perf_counter() when the last message arrived
        self.proc: subprocess.Popen[bytes] | None = None
        self._reader: threading.Thread | None = None

    def start(self) -> Sink:
        cmd = [tool("smtp-sink") or "smtp-sink", "-c", "-M", str(self.count)]
        if os.geteuid() == 0:
            cmd += ["-u", "nobody"]  # smtp-sink refuses to keep root privileges
        cmd += [f"{LOOPBACK}:{self.port}", "256"]
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        try:
            wait_greeting(self.port, 10)
        except BaseException:
            self.stop()
            raise
        return self

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        tail = b""
        while True:
            chunk = self.proc.stdout.read1(65536)
            if not chunk:
                break
            tail = (tail + chunk)[-200:]
            found = _MESG.findall(tail)
            if found and int(found[-1]) > self.received:
                self.received = int(found[-1])
                self.last = time.perf_counter()
                if self.received >= self.count and self.finished is None:
                    self.finished = time.perf_counter()
        if self.finished is None and self.received >= self.count:
            self.finished = time.perf_counter()

    def wait(self, timeout: float) -> bool:
        """True once every message arrived (the sink then exits by itself)."""
        assert self.proc is not None
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return False
        if self._reader is not None:
            self._reader.join(5)
        if self.finished is None:
            self.finished = time.perf_counter()
        return self.received >= self.count

    def stop(self) -> None:
        if self.proc is not None:
            procs.kill_group(self.proc, grace=1)
            if self._reader is not None:
                self._reader.join(5)
            self.proc = None
