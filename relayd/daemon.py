"""Where the parts of relayd are built and wired together; nowhere else.

Start: recover the spool, hand its entries to the scheduler, open the
listeners and the control socket, tell systemd we are ready. SIGHUP (or
``relayctl reload``) builds a new config snapshot and swaps it in; if the
new config is bad the old one stays. SIGTERM stops accepting, lets
sessions and deliveries in flight finish up to a timeout, and exits 0 with
the spool consistent.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import signal
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from relayd import __version__, log, porthold, systemd
from relayd import dns as relayd_dns
from relayd.acceptor import AcceptorPool, on_demand, worker_count
from relayd.api.ledger import Ledger
from relayd.cluster import wiring as cluster
from relayd.config import Config, ConfigError, check_files, load_config
from relayd.control.server import ControlServer
from relayd.delivery.agent import DeliveryAgent
from relayd.delivery.router import Router
from relayd.delivery.verify import RecipientProber
from relayd.eventloop import event_loop_name, event_loop_runner, settle_heap
from relayd.events import Outcomes
from relayd.events.webhook import WebhookSender
from relayd.local.server import LocalSubmission
from relayd.metrics import Metrics, MetricsServer
from relayd.policy import ratelimit
from relayd.policy.shared_counts import SharedConnectionCounter, SharedCounts
from relayd.scheduler import Scheduler
from relayd.smtpd.listener import Listeners
from relayd.smtpd.services import Services
from relayd.smtpd.snapshot import build_services
from relayd.spool.model import Envelope
from relayd.spool.store import LOCK_PATIENCE, Spool, Tail
from relayd.users import UserStore

if TYPE_CHECKING:
    from relayd.api.server import ApiServer

DRAIN_TIMEOUT = 30.0  # for clients in the middle of sending a message
DELIVERY_GRACE = 0.5  # deliveries that finish this quickly are not cut
STATUS_INTERVAL = 15.0


RESCAN_SETTLE = 60.0  # seconds: far longer than a commit takes on a working disk


@dataclass
class Counters:
    started: float = field(default_factory=time.time)
    accepted: int = 0


class Daemon:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.counters = Counters()
        self.metrics = Metrics()
        self.spool = Spool(config.spool.path)
        self.agent = _agent(config)
        self.webhooks = WebhookSender(lambda: self.config, self.metrics)
        self.outcomes = Outcomes(lambda: self.config, self.metrics, written=self.webhooks.wake)
        self.scheduler = Scheduler(
            config, self.spool, self.agent, metrics=self.metrics, outcomes=self.outcomes
        )
        self.metrics.queue = self.scheduler.counts
        self.metrics.oldest = self.scheduler.oldest_arrival
        self.metrics_server = MetricsServer(self.metrics.render)
        self.users = UserStore(config.auth.users_file)
        # Counted by every process of this host alike (relayd.policy.shared_counts).
        self.shared = _shared_counts(config)
        self.rate_limiter, self.auth_guard = cluster.counters(config, self.shared)
        self.connections: ratelimit.ConnectionCounter | SharedConnectionCounter = (
            ratelimit.ConnectionCounter.from_config(config.limits)
            if self.shared is None
            else SharedConnectionCounter(
                self.shared, 0, config.limits.max_connections, config.limits.max_connections_per_ip
            )
        )
        # One for the daemon's life, so its caps on probes hold across snapshots
        # (a reload empties its cache: the routes may have changed).
        self.prober = RecipientProber(config, relayd_dns.make_resolver(config.dns))
        self.services = self._services(config)
        self.listeners = Listeners(lambda: self.services)
        self.control = ControlServer(self)
        self.local = LocalSubmission(lambda: self.services)
        self.ledger = Ledger(config.spool.path)
        self.api: ApiServer | None = None  # made at start if [api] address is set
        self.scheduler.on_removed = self._left_queue
        self.acceptors = AcceptorPool(
            config.source,
            self._announced,
            self._rescan,
            shared=self.shared,
            metrics=self.metrics,
            config_text=config.text,
        )
        self._stop = asyncio.Event()
        self._ledger_writes: set[asyncio.Future[None]] = set()
        self._reload_lock = asyncio.Lock()
        self._closing: asyncio.Future[None] | None = None
        self._second_look: asyncio.TimerHandle | None = None  # see _rescan

    # ---- building the snapshot -------------------------------------------

    def _services(self, config: Config, users: UserStore | None = None) -> Services:
        return build_services(
            config,
            users=users or self.users,
            connections=self.connections,
            auth_guard=self.auth_guard,
            rate_limiter=self.rate_limiter,
            enqueue=self._enqueue,
            free_space=self.spool.free_space,
            spill_dir=self.spool.tmp_dir,
            metrics=self.metrics,
            prober=self.prober,
            outcomes=self.outcomes,
        )

    async def _enqueue(self, envelope: Envelope, message: bytes, tail: Tail | None) -> None:
        await self.spool.commit(envelope, message, tail)
        self.counters.accepted += 1
        self.scheduler.add(envelope)

    def _left_queue(self, env: Envelope) -> None:
        """An API message left the queue: keep its outcome for GET /v1/messages/ID."""
        if env.listener != "api":
            return
        task = asyncio.ensure_future(asyncio.to_thread(self.ledger.record, env))
        self._ledger_writes.add(task)
        task.add_done_callback(self._ledger_writes.discard)

    def _announced(self, queue_id: str) -> None:
        """An acceptor process committed this message: schedule it."""
        try:
            envelope = self.spool.load(queue_id)
        except (KeyError, ValueError) as exc:
            log.event(
                "master",
                f"warning: announced message {queue_id!r} not loadable: {exc}",
                level=logging.WARNING,
            )
            return
        self.counters.accepted += 1
        self.scheduler.add(envelope)

    async def _lock_spool(self, exclusive: bool) -> None:
        """The spool's lock; acceptors of an earlier daemon may hold it while they drain."""
        if self.spool.lock(exclusive):
            return
        log.event("master", "waiting for the acceptor processes of an earlier relayd to finish")
        if not await self.spool.hold_lock(exclusive):
            log.event(
                "master",
                f"warning: {self.spool.root}/lock still held after "
                f"{LOCK_PATIENCE:.0f} s; going on without it",
                level=logging.WARNING,
            )

    def _acceptors_wanted(self, config: Config) -> int:
        """Without a shared segment the limits could not hold across processes: none."""
        return 0 if self.shared is None else worker_count(config)

    def _rescan(self) -> None:
        """After an acceptor died: pick up what it committed but never announced.

        A queue file younger than RESCAN_SETTLE may be one a live acceptor is
        still writing (the spool writes under the final name); those are
        looked at again, once, when they are that old, by when their writer
        has announced them or given up on them.
        """
        young = self._adopt(self.spool.queue_ids())
        if young and self._second_look is None:
            self._second_look = asyncio.get_running_loop().call_later(
                RESCAN_SETTLE, self._look_again, young
            )

    def _look_again(self, queue_ids: list[str]) -> None:
        self._second_look = None
        self._adopt(queue_ids, settle=0.0)

    def _adopt(self, queue_ids: list[str], settle: float = RESCAN_SETTLE) -> list[str]:
        """Announce the unknown ones at least ``settle`` seconds old; the younger ones."""
        young = []
        for queue_id in queue_ids:
            if self.scheduler.knows(queue_id):
                continue
            age = self.spool.age(queue_id)
            if age is None:
                continue
            if age < settle:
                young.append(queue_id)
                continue
            self._announced(queue_id)
        return young

    # ---- running --------------------------------------------------------------

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        await self._lock_spool(exclusive=True)
        self.scheduler.load(self.spool.recover())
        await self._lock_spool(exclusive=False)  # acceptors share it
        await self.listeners.apply(self.config.listeners, systemd.listen_fds())
        await self.acceptors.start(
            self._acceptors_wanted(self.config), self.listeners.fds(), on_demand(self.config)
        )
        await self.control.start(self.config.control)
        await self.local.start(self.config.local.socket)
        await self.metrics_server.start(self.config.metrics.address)  # read at start only
        await self._start_api()  # read at start only
        for sig, handler in (
            (signal.SIGTERM, self._stop.set),
            (signal.SIGINT, self._stop.set),
            (signal.SIGHUP, lambda: asyncio.ensure_future(self.reload())),
        ):
            loop.add_signal_handler(sig, handler)
        tasks = [
            asyncio.create_task(self.scheduler.run(), name="scheduler"),
            asyncio.create_task(systemd.watchdog_task(), name="watchdog"),
            asyncio.create_task(self._report_status(), name="status"),
            asyncio.create_task(self.webhooks.run(), name="webhooks"),
        ]
        systemd.ready(self.status_line())
        settle_heap()
        log.event(
            "master", f"daemon started -- version {__version__}, configuration {self.config.source}"
        )
        log.event("master", f"event loop: {event_loop_name(loop)}")
        await self._stop.wait()
        await self._shutdown(tasks)
        return 0

    async def _start_api(self) -> None:
        """The HTTP API, if configured; aiohttp (about 20 MB) is loaded only then."""
        if self.config.api.address is None:
            return
        from relayd.api.server import ApiServer

        self.api = ApiServer(
            lambda: self.services, self.users, self.scheduler.envelope, self.ledger
        )
        api_tls = self.services.tls_context if self.config.api.tls else None
        await self.api.start(self.config.api.address, api_tls)

    async def _shutdown(self, tasks: list[asyncio.Task[Any]]) -> None:
        systemd.stopping()
        log.event("master", "terminating on signal 15")
        self.listeners.close()
        # Every queued message is durable: deliveries in flight are abandoned
        # at once and retried after the restart, rather than keeping the
        # operator waiting on a slow next hop. Only a message being received
        # is waited for (DRAIN_TIMEOUT), since its client has no 250 yet.
        in_flight = self.scheduler.in_flight()
        cut, *_ = await asyncio.gather(
            self.listeners.drain(DRAIN_TIMEOUT),
            self.acceptors.stop(DRAIN_TIMEOUT + 5),
            self.scheduler.stop(DELIVERY_GRACE),
        )
        if in_flight or cut:
            log.event(
                "master",
                f"stopped {in_flight} deliver{'ies' if in_flight != 1 else 'y'} in flight "
                f"(retried after the restart) and {cut} session{'s' if cut != 1 else ''} "
                "in DATA",
            )
        await self.agent.close()
        await self.prober.close()
        await self.control.stop()
        await self.local.stop()
        await self.metrics_server.stop()
        if self.api is not None:
            await self.api.stop()
        await asyncio.gather(*self._ledger_writes, return_exceptions=True)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def reload(self) -> str | None:
        """Swap in a new config snapshot; on any problem keep the running one.

        Returns None on success, else the problems as one text.
        """
        async with self._reload_lock:
            systemd.reloading()
            try:
                problem = await self._reload()
            finally:
                systemd.ready(self.status_line())
            return problem

    async def _reload(self) -> str | None:
        config = self.config  # until the new one has loaded
        try:
            config = load_config(self.config.source)
            errors, _ = check_files(config)
            if errors:
                raise ConfigError(errors)
            users = self.users
            if config.auth.users_file != self.config.auth.users_file:
                users = UserStore(config.auth.users_file)
            services = self._services(config, users)
            await self.listeners.apply(config.listeners)
        except ConfigError as exc:
            return self._reload_failed("\n".join(exc.problems))
        except (OSError, ValueError) as exc:
            await self.listeners.apply(self.config.listeners)
            text = _bind_problem(exc, config) if isinstance(exc, OSError) else str(exc)
            return self._reload_failed(text)
        self._warn_restart_only(config)
        self._warn_counts_size(config)
        self.config, self.services, self.users = config, services, users
        self.rate_limiter.reconfigure(config.rate_limits)
        self.connections.reconfigure(config.limits)
        self.auth_guard.reconfigure(config.auth)
        self.prober.reconfigure(config, relayd_dns.make_resolver(config.dns))
        old_agent = self.agent
        self.agent = _agent(config)
        self.scheduler.reconfigure(config, self.agent)
        self.acceptors.config_text = config.text
        await self.acceptors.replace(
            self._acceptors_wanted(config), self.listeners.fds(), on_demand(config)
        )
        # Close the old agent's idle sessions; attempts in flight finish with it.
        self._closing = asyncio.ensure_future(old_agent.close())
        log.set_level(config.logging.level)
        log.event("master", f"reload -- version {__version__}, configuration {config.source}")
        return None

    def _warn_restart_only(self, config: Config) -> None:
        """Keys read only at start: say so rather than pretend they were applied."""
        old = self.config
        for key, before, after in (
            ("[spool] path", old.spool.path, config.spool.path),
            ("[control] socket", old.control.socket, config.control.socket),
            ("[control] group", old.control.group, config.control.group),
            ("[local] socket", old.local.socket, config.local.socket),
            ("[metrics] address", old.metrics.address, config.metrics.address),
            ("[api] address", old.api.address, config.api.address),
            ("[cluster] redis", old.cluster.redis, config.cluster.redis),
        ):
            if before != after:
                log.event(
                    "master",
                    f"warning: {config.source}: {key} changed; it takes effect "
                    "at the next restart (systemctl restart relayd)",
                    level=logging.WARNING,
                )

    def _warn_counts_size(self, config: Config) -> None:
        """The shared counts were sized at start; far more clients need a restart."""
        if self.shared is not None and config.limits.max_connections > self.shared.capacity:
            log.event(
                "master",
                f"warning: {config.source}: [limits] max_connections = "
                f"{config.limits.max_connections} is above what the connection counts were "
                f"made for at start ({self.shared.capacity}); until a restart "
                "(systemctl restart relayd) some connections may be refused with 421 early",
                level=logging.WARNING,
            )

    def _reload_failed(self, text: str) -> str:
        log.event(
            "master",
            f"warning: reload failed, keeping the running configuration: {text}",
            level=logging.WARNING,
        )
        return text

    async def _report_status(self) -> None:
        """Keep ``systemctl status relayd`` showing current queue counts."""
        while True:
            await asyncio.sleep(STATUS_INTERVAL)
            systemd.status(self.status_line())

    def status_line(self) -> str:
        counts = self.scheduler.counts()
        queued = ", ".join(f"{v} {k}" for k, v in counts.items())
        stats = self.scheduler.stats
        return (
            f"queue: {queued or 'empty'}; since start: {self.counters.accepted} accepted, "
            f"{stats.delivered} delivered, {stats.bounced} bounced"
        )


def _shared_counts(config: Config) -> SharedCounts | None:
    try:
        return SharedCounts.create(config.limits.max_connections)
    except (OSError, AttributeError) as exc:  # RLIMIT_FSIZE below its size; no memfd
        log.event(
            "master",
            f"warning: cannot create the counts shared between processes ({exc}); "
            "relayd runs as one process, whatever [server] processes says "
            "(LimitFSIZE in the unit must allow 16 MB)",
            level=logging.WARNING,
        )
        return None


def _agent(config: Config) -> Router:
    """Delivery: local routes (LMTP, Maildir) and SMTP for the rest."""
    return Router(config, DeliveryAgent(config, relayd_dns.make_resolver(config.dns)))


def run(config: Config) -> int:
    """Run the daemon in the foreground until SIGTERM; the process exit status."""
    log.setup(config.logging.level, config.logging.target)
    # aiosmtpd's own logger writes lines in its own shape (and tracebacks for
    # every failed TLS handshake); relayd logs what matters itself.
    aiosmtpd_log = logging.getLogger("mail.log")
    aiosmtpd_log.setLevel(logging.CRITICAL)
    aiosmtpd_log.propagate = False
    runner = event_loop_runner()

    async def main() -> int:
        daemon = Daemon(config)
        return await daemon.run()

    try:
        return int(runner(main()))
    except OSError as exc:
        log.event("master", f"fatal: {_bind_problem(exc, config)}", level=logging.CRITICAL)
        return _exit_status(exc)


EX_TEMPFAIL = 75


def _exit_status(exc: OSError) -> int:
    """75 (EX_TEMPFAIL) for a port another process holds, else 78 (EX_CONFIG).

    A busy port is not a mistake in the config: the other MTA may be
    stopping, and systemd's Restart=on-failure tries again in 5 s. An
    address this host does not have, a port below 1024 without the
    capability, a spool that cannot be made: those need the operator, and
    RestartPreventExitStatus=78 stops a restart loop.
    """
    cause = exc.__cause__ if isinstance(exc.__cause__, OSError) else exc
    return EX_TEMPFAIL if cause.errno == errno.EADDRINUSE else 78


def _bind_problem(exc: OSError, config: Config) -> str:
    """The fatal start error, with who holds a busy port or what permission is missing."""
    text = exc.strerror or str(exc)
    for listener in config.listeners:
        if f"listener {listener.name}: cannot bind " not in text:
            continue
        cause = exc.__cause__ if isinstance(exc.__cause__, OSError) else exc
        hint = porthold.explain(cause.errno, listener.address.host, listener.address.port)
        if hint:
            return f"{text}: {hint}"
    return str(exc)
