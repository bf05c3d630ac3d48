"""Checks on mail arriving from the Internet: SPF at MAIL, DKIM and DMARC at DATA.

They run only on inbound listeners and never for clients that may relay
(authenticated, or in ``[relay] networks``): those are our own users,
whose mail is signed rather than judged. Results end up in one
``Authentication-Results:`` header under our hostname (forged ones naming
us are removed first) and a ``Received-SPF:`` header.
"""

from __future__ import annotations

from dataclasses import dataclass

from relayd import dkim
from relayd import dns as relayd_dns
from relayd.address import Address
from relayd.config import Config
from relayd.policy import dmarc, spf
from relayd.policy.verdict import Verdict
from relayd.smtpd import authresults, headers
from relayd.smtpd.content import Content
from relayd.smtpd.services import ClientInfo


@dataclass(frozen=True)
class _State:
    spf: spf.SPFResult | None


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
        # The whole evaluation gets RFC 7208's 20 seconds; each lookup in it
        # is still held to [dns] timeout by the resolver's lifetime.
        result = await spf.check_spf_async(
            client.ip, helo, mail_from, self.sync_resolver, spf.DEFAULT_TIMEOUT
        )
        verdict = spf.spf_verdict(result, cfg.spf)
        value = spf.received_spf_header(result, cfg.hostname, client.ip, helo, mail_from)
        return verdict, [b"Received-SPF: " + value.encode() + b"\r\n"], _State(result)

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
        hostname = self.config.hostname
        spf_result = state.spf if isinstance(state, _State) else None
        if headers.has_header(content.header, "DKIM-Signature"):
            dkim_results = await dkim.verify_async(
                content.read(), self.sync_resolver, self.config.dns.timeout
            )
        else:  # nothing to verify: the body is never read
            dkim_results = [dkim.DKIMResult("", "", "none")]
        result = await dmarc.check_dmarc_async(
            self.async_resolver, dkim.from_domain(content.header), spf_result, dkim_results
        )
        verdict = dmarc.dmarc_verdict(result, self.config.dmarc)
        if spf_result is None:
            # SPF was not evaluated ([spf] enabled = false), so DMARC could only
            # pass on DKIM: a failure found on half the evidence is tagged, not
            # refused, or mail that SPF would have vouched for is lost.
            verdict = None
        value = authresults.authentication_results(hostname, spf_result, dkim_results, result)
        return verdict, b"Authentication-Results: " + value.encode() + b"\r\n"
