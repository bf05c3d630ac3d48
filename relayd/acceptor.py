"""Extra processes accepting SMTP, so sessions use every core (``[server] processes``).

How this works. The daemon opens the listening sockets and starts N-1
acceptor processes (``python -m relayd.acceptor``), passing them those
sockets and one end of a socketpair. Every process, the daemon included,
accepts on the same sockets; the kernel hands each connection to one of
them. An acceptor runs the whole SMTP session and commits the message to
the spool itself (its own group committer), so the 250 still comes only
after the message is durable; then it writes the queue id on the
socketpair. The daemon reads it, loads the envelope from the spool and
gives it to the one scheduler: delivery, relayctl and the queue stay with
a single owner, as Postfix's smtpd processes feed one qmgr.

Connection counts and rate limits are counted by every process in one
shared segment (relayd.policy.shared_counts), so SPEC §7's limits hold for
relayd as a whole. Each acceptor counts in its own column of it, which the
daemon clears once that acceptor has exited.

With ``processes = "auto"`` (the default) acceptors are started on demand,
as Postfix's master starts smtpd processes: the daemon alone serves a quiet
host, and starts an acceptor (up to one per further core) when its own CPU
stays busy (:func:`wants_acceptor`); an acceptor with no session and
almost no CPU for a minute leaves (:func:`wants_to_leave`). A number
instead of "auto" keeps exactly that many processes running.

If an acceptor dies, the daemon starts another and rescans the spool once,
so a message committed just before the crash but never announced is not
left waiting for a restart. On reload the acceptors are replaced (new
config, new listeners); sessions in flight finish on the old ones.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from relayd import log
from relayd.cluster import wiring as cluster
from relayd.config import Config, ConfigError, load_config
from relayd.eventloop import settle_heap
from relayd.metrics import Metrics
from relayd.policy.shared_counts import COLUMNS, SharedConnectionCounter, SharedCounts
from relayd.smtpd.listener import Listeners
from relayd.smtpd.services import Services
from relayd.spool.model import Envelope
from relayd.spool.store import Spool, Tail, write_all
from relayd.users import UserStore

ENV_FDS = "RELAYD_ACCEPTOR_FDS"  # "name=fd,name=fd": the listening sockets
ENV_MASTER = "RELAYD_ACCEPTOR_MASTER"  # fd of this acceptor's end of the socketpair
ENV_COUNTS = "RELAYD_ACCEPTOR_COUNTS"  # "fd:column": the shared counts and this process's column
ENV_ON_DEMAND = "RELAYD_ACCEPTOR_ON_DEMAND"  # "1": leave when idle (processes = "auto")
ENV_CONFIG = "RELAYD_ACCEPTOR_CONFIG"  # fd of the daemon's config text (not the file as now)
EX_CONFIG = 78
DRAIN_TIMEOUT = 30.0
RESPAWN_DELAY = 1.0
METRICS_PREFIX = b"M "  # a line of session counters, not a queue id
METRICS_EVERY = 1.0  # seconds between an acceptor's counter reports
READY_LINE = b"R\n"  # the acceptor listens: the daemon may tell systemd it is ready
READY_TIMEOUT = 30.0
LEAVING_LINE = b"Q\n"  # an on-demand acceptor leaves, idle: not to be replaced

# On demand ("auto"): the daemon samples its own CPU every LOAD_SAMPLE seconds
# and starts an acceptor once BUSY_SAMPLES samples in a row were at least
# BUSY_CPU busy (all its threads together: one full core is 1.0). 0.3 s: a
# new process needs about twice as long before it accepts, so waiting longer
# loses a short burst, and three samples keep a single busy moment from
# starting a process that would idle for a minute.
LOAD_SAMPLE = 0.1
BUSY_SAMPLES = 3
BUSY_CPU = 0.8
BUSY_SESSIONS = 2  # open SMTP sessions in the daemon: delivery alone is no reason
AUTO_LIMIT = 32  # "auto": at most this many processes, whatever the core count
SPAWN_BACKOFF = 5.0  # seconds after an acceptor could not be started
# An on-demand acceptor leaves after IDLE_SAMPLES samples of IDLE_SAMPLE
# seconds each below IDLE_CPU, with no session open at the last of them.
IDLE_SAMPLE = 5.0
IDLE_SAMPLES = 12
IDLE_CPU = 0.05


def worker_count(config: Config) -> int:
    """Acceptor processes at most besides the daemon itself."""
    wanted = config.server.processes or min(AUTO_LIMIT, _usable_cores())
    return max(0, wanted - 1)


def _usable_cores() -> int:
    """Cores this process may run on (its affinity mask, which containers narrow)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def on_demand(config: Config) -> bool:
    """``processes = "auto"``: acceptors come with load and go with it."""
    return config.server.processes == 0


def wants_acceptor(busy: Sequence[float], running: int, limit: int, sessions: int) -> bool:
    """Start one more acceptor? ``busy``: the daemon's latest CPU samples (1.0 = a core).

    Only while clients are connected: a daemon busy delivering alone would
    gain nothing from a process that accepts.
    """
    recent = list(busy)[-BUSY_SAMPLES:]
    return (
        running < limit
        and sessions >= BUSY_SESSIONS
        and len(recent) == BUSY_SAMPLES
        and min(recent) >= BUSY_CPU
    )


def wants_to_leave(busy: Sequence[float], sessions: int) -> bool:
    """May an on-demand acceptor go? Only idle, and only with nobody connected."""
    recent = list(busy)[-IDLE_SAMPLES:]
    return sessions == 0 and len(recent) == IDLE_SAMPLES and max(recent) < IDLE_CPU


class CpuSampler:
    """This process's CPU use (all threads) per wall-clock second since the last sample."""

    def __init__(self, keep: int) -> None:
        self.samples: deque[float] = deque(maxlen=keep)
        self._cpu, self._wall = time.process_time(), time.monotonic()

    def sample(self) -> deque[float]:
        cpu, wall = time.process_time(), time.monotonic()
        if wall > self._wall:
            self.samples.append((cpu - self._cpu) / (wall - self._wall))
        self._cpu, self._wall = cpu, wall
        return self.samples

    def clear(self) -> None:
        self.samples.clear()
        self._cpu, self._wall = time.process_time(), time.monotonic()


# ---- the daemon's side -------------------------------------------------------------


@dataclass
class _Worker:
    proc: asyncio.subprocess.Process
    reader_task: asyncio.Task[None]
    ready: asyncio.Event
    column: int
    retiring: bool = False


@dataclass
class AcceptorPool:
    """The daemon's acceptor processes, and what they announce."""

    config_path: Path
    on_queued: Callable[[str], None]
    on_lost: Callable[[], None]
    shared: SharedCounts | None = None
    metrics: Metrics | None = None
    config_text: str = ""  # the daemon's current config, as acceptors must run it
    workers: list[_Worker] = field(default_factory=list)
    _stopping: bool = False
    _watchers: set[asyncio.Task[None]] = field(default_factory=set)
    _columns: set[int] = field(default_factory=set)  # in use by a live acceptor
    _on_demand: bool = False
    _limit: int = 0
    _fds: dict[str, int] = field(default_factory=dict)
    _load_task: asyncio.Task[None] | None = None
    _broken: bool = False  # an acceptor could not load the config: none until a reload

    async def start(self, count: int, fds: dict[str, int], on_demand: bool = False) -> None:
        """Start ``count`` acceptors and wait until each listens (or gives up).

        Waiting matters: until then the daemon alone serves every connection,
        so READY=1 would promise systemd (and a load right after start) more
        than is running. An acceptor that dies first is the watcher's job.
        On demand, none is started now: up to ``count`` come with load.
        """
        self._on_demand, self._limit, self._fds = on_demand, count, fds
        self._broken = False
        if self.shared is None:
            return  # limits could not be shared: the daemon stays alone
        if on_demand:
            if self._load_task is None and count:
                self._load_task = asyncio.create_task(self._follow_load(), name="acceptor-load")
            return
        started = [await self._spawn(fds) for _ in range(count)]
        await self._until_ready([w for w in started if w is not None])

    async def _until_ready(self, workers: list[_Worker]) -> None:
        waits = [asyncio.create_task(w.ready.wait()) for w in workers]
        if waits:
            _, pending = await asyncio.wait(waits, timeout=READY_TIMEOUT)
            for task in pending:
                task.cancel()

    async def _follow_load(self) -> None:
        """On demand: one more acceptor whenever the daemon's own CPU stays busy."""
        sampler = CpuSampler(BUSY_SAMPLES)
        while not self._stopping:
            await asyncio.sleep(LOAD_SAMPLE)
            running = sum(1 for w in self.workers if not w.retiring)
            sessions = self.shared.column_total(0) if self.shared is not None else 0
            busy = sampler.sample()
            if self._broken or not wants_acceptor(busy, running, self._limit, sessions):
                continue
            try:
                worker = await self._spawn(self._fds)
            except Exception as exc:  # EMFILE, EAGAIN from fork: try again later
                log.event(
                    "master",
                    f"warning: cannot start an acceptor process: {exc}",
                    level=logging.WARNING,
                )
                await asyncio.sleep(SPAWN_BACKOFF)
                worker = None
            if worker is not None:
                log.event("master", f"busy: started acceptor process {worker.proc.pid} on demand")
                await self._until_ready([worker])
            sampler.clear()

    async def replace(self, count: int, fds: dict[str, int], on_demand: bool = False) -> None:
        """New acceptors for a new config; the old ones drain and exit."""
        old, self.workers = self.workers, []
        if self._load_task is not None and not (on_demand and count):
            self._load_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._load_task  # a spawn it had begun is recorded first
            self._load_task = None
        await self.start(count, fds, on_demand)
        for worker in old:
            worker.retiring = True
            with contextlib.suppress(ProcessLookupError):
                worker.proc.send_signal(signal.SIGTERM)

    async def stop(self, timeout: float) -> None:
        self._stopping = True
        if self._load_task is not None:
            self._load_task.cancel()
        workers = list(self.workers)  # watchers remove them as they exit
        for worker in workers:
            worker.retiring = True
            with contextlib.suppress(ProcessLookupError):
                worker.proc.send_signal(signal.SIGTERM)
        for worker in workers:
            try:
                await asyncio.wait_for(worker.proc.wait(), timeout)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    worker.proc.kill()
                await worker.proc.wait()
        for task in list(self._watchers):
            task.cancel()

    def _take_column(self) -> int | None:
        free = next((c for c in range(1, COLUMNS) if c not in self._columns), None)
        if free is not None:
            self._columns.add(free)
            if self.shared is not None:
                self.shared.alone = False  # before the acceptor can count
        return free

    def _give_back(self, column: int) -> None:
        """The acceptor owning ``column`` has exited: its connections are gone."""
        if self.shared is not None:
            self.shared.forget_column(column)
        self._columns.discard(column)
        if self.shared is not None and not self._columns:
            self.shared.alone = True

    async def _spawn(self, fds: dict[str, int]) -> _Worker | None:
        column = self._take_column()
        if column is None:
            log.event("master", "warning: no column left for another acceptor process")
            return None
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        extra_fds = [self.shared.fd] if self.shared is not None else []
        env = _child_env(fds, theirs.fileno())
        if self.shared is not None:
            env[ENV_COUNTS] = f"{self.shared.fd}:{column}"
        if self._on_demand:
            env[ENV_ON_DEMAND] = "1"
        config_fd = _config_fd(self.config_text) if self.config_text else None
        if config_fd is not None:
            env[ENV_CONFIG] = str(config_fd)
            extra_fds.append(config_fd)
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "relayd.acceptor",
                "--config",
                str(self.config_path),
                pass_fds=[*fds.values(), theirs.fileno(), *extra_fds],
                env=env,
            )
        except BaseException:
            self._give_back(column)
            mine.close()
            raise
        finally:
            theirs.close()
            if config_fd is not None:
                os.close(config_fd)
        try:
            reader, writer = await asyncio.open_unix_connection(sock=mine)
        except BaseException:  # never leave a process nobody watches
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            self._give_back(column)
            raise
        ready = asyncio.Event()
        worker = _Worker(
            proc, asyncio.create_task(self._read(proc.pid, reader, writer, ready)), ready, column
        )
        self.workers.append(worker)
        watcher = asyncio.create_task(self._watch(worker, fds))
        self._watchers.add(watcher)
        watcher.add_done_callback(self._watchers.discard)
        log.event("master", f"started acceptor process {proc.pid}")
        return worker

    async def _read(
        self,
        pid: int,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        ready: asyncio.Event,
    ) -> None:
        """Queue ids, one per line; ``M {json}`` lines are the acceptor's session counters."""
        try:
            while line := await reader.readline():
                if line == READY_LINE:
                    ready.set()
                    log.event("master", f"acceptor process {pid} ready")
                    continue
                if line == LEAVING_LINE:
                    self._leaving(pid)
                    continue
                if line.startswith(METRICS_PREFIX):
                    self._absorb(pid, line[len(METRICS_PREFIX) :])
                    continue
                self.on_queued(line.decode("ascii", "replace").strip())
        finally:
            writer.close()
            if self.metrics is not None:
                self.metrics.retire(pid)

    def _leaving(self, pid: int) -> None:
        for worker in self.workers:
            if worker.proc.pid == pid:
                worker.retiring = True
                log.event("master", f"idle: acceptor process {pid} leaves")

    def _absorb(self, pid: int, payload: bytes) -> None:
        if self.metrics is None:
            return
        with contextlib.suppress(ValueError):
            counts = json.loads(payload)
            if isinstance(counts, dict):
                self.metrics.absorb(pid, counts)

    async def _watch(self, worker: _Worker, fds: dict[str, int]) -> None:
        code = await worker.proc.wait()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(worker.reader_task, 5)  # every announcement read
        self._give_back(worker.column)
        if worker in self.workers:
            self.workers.remove(worker)
        if code != 0 and not self._stopping:
            self.on_lost()  # what it committed but never announced
        if worker.retiring or self._stopping:
            return
        if code == EX_CONFIG:
            self._broken = True
            log.event(
                "master",
                f"error: acceptor process {worker.proc.pid} could not load the "
                "configuration; no acceptor runs until the next reload",
                level=logging.ERROR,
            )
            return
        again = "" if self._on_demand else "; starting another"
        log.event(
            "master",
            f"warning: acceptor process {worker.proc.pid} exited with status {code}{again}",
            level=logging.WARNING,
        )
        if self._on_demand:
            return  # the load decides whether another is needed
        await asyncio.sleep(RESPAWN_DELAY)
        if not self._stopping and not self._broken:
            await self._spawn(fds)


def _config_fd(text: str) -> int:
    """A readable fd holding ``text``, for a child to inherit."""
    fd = os.memfd_create("relayd-config", os.MFD_CLOEXEC)
    write_all(fd, text.encode())
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def _read_config_fd(fd: int) -> str:
    with os.fdopen(fd, "rb") as f:
        return f.read().decode()


def _child_env(fds: dict[str, int], master_fd: int) -> dict[str, str]:
    env = dict(os.environ)
    for name in (
        "NOTIFY_SOCKET",
        "WATCHDOG_USEC",
        "WATCHDOG_PID",
        "LISTEN_FDS",
        "LISTEN_PID",
        "LISTEN_FDNAMES",
    ):
        env.pop(name, None)  # only the daemon talks to systemd
    env[ENV_FDS] = ",".join(f"{name}={fd}" for name, fd in fds.items())
    env[ENV_MASTER] = str(master_fd)
    return env


# ---- the acceptor's side -----------------------------------------------------------


class Acceptor:
    """One extra process: SMTP sessions and spool commits; scheduling is the daemon's."""

    def __init__(
        self,
        config: Config,
        master: socket.socket,
        shared: SharedCounts,
        column: int,
        leave_when_idle: bool = False,
    ) -> None:
        from relayd.smtpd.snapshot import build_services

        self.config = config
        self.master = master
        self.spool = Spool(config.spool.path)
        self.spool.ensure()
        limiter, guard = cluster.counters(config, shared)
        self.connections = SharedConnectionCounter(
            shared, column, config.limits.max_connections, config.limits.max_connections_per_ip
        )
        self.leave_when_idle = leave_when_idle
        self.services: Services = build_services(
            config,
            users=UserStore(config.auth.users_file),
            connections=self.connections,
            auth_guard=guard,
            rate_limiter=limiter,
            enqueue=self._enqueue,
            free_space=self.spool.free_space,
            spill_dir=self.spool.tmp_dir,
            metrics=Metrics(),
        )
        self.listeners = Listeners(lambda: self.services)
        self._writer: asyncio.StreamWriter | None = None
        self._stop = asyncio.Event()
        self._reported: dict[str, list[list[object]]] = {}

    async def _enqueue(self, envelope: Envelope, message: bytes, tail: Tail | None) -> None:
        await self.spool.commit(envelope, message, tail)
        assert self._writer is not None
        self._writer.write(envelope.queue_id.encode("ascii") + b"\n")

    async def run(self, inherited: dict[str, list[socket.socket]]) -> int:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self._stop.set)
        loop.add_signal_handler(signal.SIGINT, lambda: None)  # the daemon decides
        loop.add_signal_handler(signal.SIGHUP, lambda: None)  # reload replaces us
        # Held for this process's life, so that a later daemon's recovery waits
        # until nothing it accepted can still be half-written (Spool.lock).
        if not await self.spool.hold_lock(exclusive=False):
            log.event(
                "master",
                f"warning: {self.spool.root}/lock held exclusive (a daemon recovering the "
                "spool) for too long; accepting without it",
                level=logging.WARNING,
            )
        reader, self._writer = await asyncio.open_unix_connection(sock=self.master)
        await self.listeners.apply(self.config.listeners, inherited)
        self._writer.write(READY_LINE)
        settle_heap()
        orphaned = asyncio.create_task(reader.read())  # EOF: the daemon is gone
        stop = asyncio.create_task(self._stop.wait())
        reporter = asyncio.create_task(self._report_metrics())
        idle = asyncio.create_task(self._leave_when_idle())
        await asyncio.wait({orphaned, stop, idle}, return_when=asyncio.FIRST_COMPLETED)
        self.listeners.close()
        await self.listeners.drain(DRAIN_TIMEOUT)
        reporter.cancel()
        idle.cancel()
        self._send_metrics()
        with contextlib.suppress(Exception):
            await self._writer.drain()
        await self.spool.close()
        for task in (orphaned, stop):
            task.cancel()
        return 0

    async def _leave_when_idle(self) -> None:
        """On demand: tell the daemon, then end, once idle (see :func:`wants_to_leave`)."""
        if not self.leave_when_idle:
            await asyncio.Event().wait()  # never
        sampler = CpuSampler(IDLE_SAMPLES)
        while True:
            await asyncio.sleep(IDLE_SAMPLE)
            sessions = self.connections.shared.column_total(self.connections.column)
            if wants_to_leave(sampler.sample(), sessions):
                assert self._writer is not None
                self._writer.write(LEAVING_LINE)
                return

    async def _report_metrics(self) -> None:
        """Tell the daemon this process's session counters whenever they changed."""
        while True:
            await asyncio.sleep(METRICS_EVERY)
            self._send_metrics()

    def _send_metrics(self) -> None:
        counts = self.services.metrics.shared_counts()
        if counts == self._reported or self._writer is None or self._writer.is_closing():
            return
        self._reported = counts
        self._writer.write(METRICS_PREFIX + json.dumps(counts).encode("ascii") + b"\n")


def _inherited() -> tuple[dict[str, list[socket.socket]], socket.socket, SharedCounts, int]:
    sockets: dict[str, list[socket.socket]] = {}
    for item in filter(None, os.environ.get(ENV_FDS, "").split(",")):
        name, _, fd = item.rpartition("=")
        sock = socket.socket(fileno=int(fd))
        sockets.setdefault(name, []).append(sock)
    master = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM, fileno=int(os.environ[ENV_MASTER]))
    counts_fd, _, column = os.environ[ENV_COUNTS].partition(":")
    return sockets, master, SharedCounts.inherited(int(counts_fd)), int(column)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="relayd-acceptor", description=__doc__)
    parser.add_argument("--config", required=True)
    args = parser.parse_args(argv)
    given = os.environ.get(ENV_CONFIG)
    try:
        text = _read_config_fd(int(given)) if given else None
        config = load_config(Path(args.config), text)
    except ConfigError as exc:
        for line in exc.problems:
            print(line, file=sys.stderr)
        return EX_CONFIG
    log.setup(config.logging.level, config.logging.target)
    logging.getLogger("mail.log").setLevel(logging.CRITICAL)
    inherited, master, shared, column = _inherited()
    leave = os.environ.get(ENV_ON_DEMAND) == "1"

    async def serve() -> int:
        return await Acceptor(config, master, shared, column, leave).run(inherited)

    from relayd.eventloop import event_loop_runner

    return int(event_loop_runner()(serve()))


if __name__ == "__main__":
    sys.exit(main())
