"""The snapshot a session runs on (:class:`Services`), built from one config.

The daemon and every acceptor process build it alike, so it lives apart
from the daemon: an acceptor imports this, the SMTP stack and the spool,
and none of the scheduler, delivery, control or API modules it never runs.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from relayd import dkim, log, workers
from relayd import dns as relayd_dns
from relayd.config import Config
from relayd.delivery.verify import RecipientProber
from relayd.events import Outcomes
from relayd.metrics import Metrics
from relayd.policy import ratelimit, sender
from relayd.policy.authguard import AuthGuard
from relayd.policy.recipients import RecipientChecks, RecipientsFile
from relayd.policy.verdict import Verdict
from relayd.smtpd.content import Content
from relayd.smtpd.inbound import InboundChecks
from relayd.smtpd.services import Connections, Services, server_tls_context
from relayd.spool.model import Envelope
from relayd.spool.store import Tail
from relayd.users import UserStore


def build_services(
    config: Config,
    *,
    users: UserStore,
    connections: Connections,
    auth_guard: AuthGuard,
    rate_limiter: ratelimit.RateLimiter,
    enqueue: Callable[[Envelope, bytes, Tail | None], Awaitable[None]],
    free_space: Callable[[], int],
    spill_dir: str,
    metrics: Metrics,
    prober: RecipientProber | None = None,
    outcomes: Outcomes | None = None,
) -> Services:
    """The snapshot sessions run on; the daemon and acceptor processes build it alike.

    ``prober`` is the daemon's one recipient prober; without one (an
    acceptor process, which builds this once per config) a new one is made.
    """
    tls = None
    if config.tls.cert is not None and config.tls.key is not None:
        tls = server_tls_context(str(config.tls.cert), str(config.tls.key))
    signer = dkim.Signer(config.dkim.keys)
    # Events and suppression (SPEC §10); an acceptor process has its own.
    apps = outcomes or Outcomes(lambda: config, metrics)

    def sender_verdict(user: str, address: str) -> Verdict:
        return sender.login_sender_verdict(users.current(), user, address)

    return Services(
        config=config,
        tls_context=tls,
        users=users,
        connections=connections,
        auth_guard=auth_guard,
        rate_limiter=rate_limiter,
        enqueue=apps.wrap_enqueue(enqueue),
        sender_verdict=sender_verdict,
        suppressed=apps.refusal,
        sign=lambda header, content: _sign(signer, header, content),
        checks=InboundChecks(config),
        recipients=_recipient_checks(config, prober),
        free_space=free_space,
        spill_dir=spill_dir,
        metrics=metrics,
    )


def _recipient_checks(config: Config, prober: RecipientProber | None) -> RecipientChecks:
    relay = config.relay
    listed = RecipientsFile(relay.recipients_file) if relay.recipients_file else None
    probe = None
    if relay.verify_recipients:
        if prober is None:
            prober = RecipientProber(config, relayd_dns.make_resolver(config.dns))
        probe = prober.check
    return RecipientChecks(listed, probe)


async def _sign(signer: dkim.Signer, header: bytes, content: Content) -> bytes:
    """The DKIM-Signature line(s) to prepend, b"" when no key matches.

    Signing runs in its own pool (relayd.workers.SIGN): it never waits
    behind inbound verification, and a password check never waits behind it.
    """
    if not signer.domains or dkim.from_domain(header) not in signer.domains:
        return b""  # no key for it: no thread hop, no body read
    try:
        fields = await workers.SIGN.run(signer.signature_for, header, content)
    except Exception as exc:  # dkimpy raises its own types for bad input
        # A message dkimpy cannot parse is relayed unsigned rather than refused.
        log.event("cleanup", f"warning: not DKIM-signed: {exc}", level=logging.WARNING)
        return b""
    return fields or b""
