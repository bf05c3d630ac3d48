"""SPF, DKIM verification and DMARC for mail arriving on inbound listeners.

Nothing here runs for clients that may relay (authenticated, or in
``[relay] networks``): those are our own users, whose mail is signed rather
than judged. Results end up in one ``Authentication-Results:`` field under
our hostname and a ``Received-SPF:`` field, both folded.

One message's checks together get ``2 x [dns] timeout`` (:func:`budget`):
SPF at MAIL takes what it needs of it, DKIM and DMARC at end of DATA run in
parallel on what is left. What has not finished by then is ``temperror``.
Consequences, by design:

- SPF ``temperror`` (no answer in time) defers the message with
  ``451 4.7.24``, as SPEC §3 says for any SPF temperror;
- DKIM or DMARC ``temperror`` never refuses: the message is accepted and
  the results say ``temperror``. DMARC can only refuse on a ``fail``, and
  a check that did not finish is not a failure.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import dns.asyncresolver

from relayd import dkim, dkimverify
from relayd import dns as relayd_dns
from relayd.address import Address
from relayd.config import Config
from relayd.policy import dmarc, spf
from relayd.policy.verdict import Verdict
from relayd.smtpd import authresults
from relayd.smtpd.content import Content
from relayd.smtpd.services import ClientInfo


@dataclass(frozen=True)
class _State:
    spf: spf.SPFResult | None
    spent: float = 0.0  # seconds of the message's budget SPF used


def budget(config: Config) -> float:
    """Seconds DKIM + SPF + DMARC of one message may take in all."""
    return 2 * config.dns.timeout


class InboundChecks:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.sync_resolver = relayd_dns.make_sync_resolver(config.dns)
        self.async_resolver = relayd_dns.make_resolver(config.dns)

    def _applies(self, client: ClientInfo, trusted: bool) -> bool:
        return client.inbound and not trusted

    async def at_mail(
        self, client: ClientInfo, helo: str, sender: Address | None, trusted: bool
    ) -> tuple[Verdict, list[bytes], object]:
        cfg = self.config
        if not self._applies(client, trusted) or not cfg.spf.enabled:
            return None, [], _State(None)
        mail_from = str(sender) if sender else ""
        started = time.monotonic()
        # RFC 7208 suggests 20 s for a whole evaluation; relayd's budget for
        # all checks of a message is shorter, and each lookup is still held
        # to [dns] timeout by the resolver's lifetime.
        timeout = min(spf.DEFAULT_TIMEOUT, budget(cfg))
        result = await spf.check_spf_async(client.ip, helo, mail_from, self.sync_resolver, timeout)
        verdict = spf.spf_verdict(result, cfg.spf)
        trace = spf.received_spf_field(result, cfg.hostname, client.ip, helo, mail_from)
        return verdict, [trace], _State(result, time.monotonic() - started)

    async def at_data(
        self,
        client: ClientInfo,
        helo: str,
        sender: Address | None,
        trusted: bool,
        content: Content,
        state: object,
    ) -> tuple[Verdict, bytes]:
        if not self._applies(client, trusted):
            return None, b""
        state = state if isinstance(state, _State) else _State(None)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.0, budget(self.config) - state.spent)
        from_domain = dkim.from_domain(content.header)
        dkim_results, lookup = await asyncio.gather(
            dkimverify.verify_content(content, self.async_resolver, deadline),
            _policy(self.async_resolver, from_domain, deadline),
        )
        result = dmarc.evaluate(from_domain, state.spf, dkim_results, lookup)
        verdict = dmarc.dmarc_verdict(result, self.config.dmarc)
        if state.spf is None:
            # SPF was not evaluated ([spf] enabled = false), so DMARC could only
            # pass on DKIM: a failure found on half the evidence is tagged, not
            # refused, or mail that SPF would have vouched for is lost.
            verdict = None
        hostname = self.config.hostname
        return verdict, authresults.field(hostname, state.spf, dkim_results, result)


async def _policy(
    resolver: dns.asyncresolver.Resolver, from_domain: str | None, deadline: float
) -> dmarc.PolicyLookup:
    """The DMARC policy lookup, ``temperror`` when it has no answer by ``deadline``."""
    if from_domain is None:
        return dmarc.PolicyLookup("none")
    try:
        async with asyncio.timeout_at(deadline):
            return await dmarc.fetch_policy_async(resolver, from_domain)
    except TimeoutError:
        return dmarc.PolicyLookup("temperror")
