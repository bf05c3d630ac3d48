"""The HTTP side of the API: aiohttp on relayd's own event loop.

aiohttp because it is a maintained asyncio HTTP server that runs inside an
existing loop (the daemon's, beside the SMTP listeners) and parses HTTP
itself, with limits on line, header and body sizes; relayd adds the
credentials, a cap on requests in flight and a time limit for each body.

Bounds (docs/security.md): a body is at most 1.4 x max_message_size (the
base64 of attachments) and must arrive within BODY_TIMEOUT; at most
MAX_IN_FLIGHT requests are read and processed at once, the rest wait.
Wrong passwords count against the same per-address and per-account limits
as SMTP AUTH (relayd.policy.authguard).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import ssl
from collections.abc import Awaitable, Callable

from aiohttp import web

from relayd import log
from relayd.api.compose import compose_json, compose_raw
from relayd.api.errors import ApiError
from relayd.api.ledger import Ledger, message_view
from relayd.api.submit import PROGRAM, RecipientCheck, Submission, submit
from relayd.config import HostPort
from relayd.policy.authguard import Outcome
from relayd.smtpd.services import Services
from relayd.spool.model import Envelope
from relayd.users import UserStore

BODY_TIMEOUT = 60.0
MAX_IN_FLIGHT = 32

EnvelopeLookup = Callable[[str], Envelope | None]


class ApiServer:
    """``[api] address``: POST /v1/messages and GET /v1/messages/ID (SPEC section 10)."""

    def __init__(
        self,
        services: Callable[[], Services],
        users: UserStore,
        queued: EnvelopeLookup,
        ledger: Ledger,
        recipient_check: RecipientCheck | None = None,
    ) -> None:
        self.services = services
        self.users = users
        self.queued = queued
        self.ledger = ledger
        self.recipient_check = recipient_check
        self._runner: web.AppRunner | None = None
        self._slots = asyncio.Semaphore(MAX_IN_FLIGHT)

    @property
    def listening(self) -> bool:
        return self._runner is not None

    def _app(self) -> web.Application:
        limit = int(self.services().config.limits.max_message_size * 1.4) + 65536
        app = web.Application(client_max_size=limit, middlewares=[self._errors])
        app.router.add_post("/v1/messages", self._post)
        app.router.add_get("/v1/messages/{id}", self._get)
        return app

    async def start(self, address: HostPort | None, tls: ssl.SSLContext | None) -> None:
        if address is None:
            return
        self._runner = web.AppRunner(self._app(), access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, address.host, address.port, ssl_context=tls)
        await site.start()
        scheme = "https" if tls is not None else "http"
        log.event("master", f"HTTP API listening on {scheme}://{address.host}:{address.port}")

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        self.ledger.close()

    # ---- requests ---------------------------------------------------------------

    @web.middleware
    async def _errors(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        """Every error as SPEC's JSON, whatever raised it."""
        try:
            return await handler(request)
        except ApiError as exc:
            return _error(exc, request)
        except web.HTTPRequestEntityTooLarge:
            return _error(ApiError(413, 552, "5.3.4", "Message size exceeds fixed limit"), request)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            code = 550 if exc.status == 404 else 500
            return _error(ApiError(exc.status, code, "5.0.0", exc.reason), request)
        except Exception:
            log.event(PROGRAM, "error: API request failed", level=logging.ERROR, exc_info=True)
            return _error(ApiError(503, 451, "4.3.0", "local problem, try again later"), request)

    async def _post(self, request: web.Request) -> web.Response:
        async with self._slots:
            who = await self._who(request)
            body = await _body(request)
            services = self.services()
            kind = request.content_type
            if kind == "application/json":
                try:
                    payload = json.loads(body)
                except (ValueError, UnicodeDecodeError) as exc:
                    raise ApiError(400, 501, "5.5.4", f"the body is not JSON: {exc}") from exc
                sender, recipients, message = compose_json(payload, services.config.hostname)
            elif kind == "message/rfc822":
                to = [a.strip() for v in request.query.getall("to", []) for a in v.split(",")]
                sender, recipients, message = compose_raw(
                    body, request.query.get("from"), [a for a in to if a]
                )
            else:
                text = "Content-Type must be application/json or message/rfc822"
                raise ApiError(400, 501, "5.5.4", text)
            qid, accepted = await submit(
                services, who, sender, recipients, message, self.recipient_check
            )
            return web.json_response({"id": qid, "recipients": accepted}, status=202)

    async def _get(self, request: web.Request) -> web.Response:
        who = await self._who(request)
        qid = request.match_info["id"]
        env = self.queued(qid) if qid.isalnum() and len(qid) <= 32 else None
        if env is not None and env.sasl_username == who.user:
            return web.json_response(message_view(env))
        found = await asyncio.to_thread(self.ledger.lookup, qid) if env is None else None
        if found is not None and found[0] == who.user:
            return web.json_response(found[1])
        raise ApiError(404, 550, "5.1.0", f"no message {qid[:40]} of yours")

    # ---- credentials ----------------------------------------------------------------

    async def _who(self, request: web.Request) -> Submission:
        ip = request.remote or "unknown"
        scheme, _, value = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() == "bearer":
            owner = self.users.current().token_owner(value.strip())
            if owner is None:
                raise ApiError(401, 535, "5.7.8", "authentication failed: unknown or revoked token")
            return Submission(owner, ip, "token")
        if scheme.lower() == "basic":
            return await self._basic(ip, value.strip())
        raise ApiError(401, 530, "5.7.0", "Authentication required")

    async def _basic(self, ip: str, value: str) -> Submission:
        try:
            name, sep, password = base64.b64decode(value, validate=True).decode().partition(":")
        except (binascii.Error, ValueError) as exc:
            raise ApiError(401, 535, "5.7.8", "authentication failed: bad Basic value") from exc
        if not sep or not name:
            raise ApiError(401, 535, "5.7.8", "authentication failed: bad Basic value")
        guard = self.services().auth_guard
        ticket = await guard.begin(ip, name)
        if ticket.outcome is not Outcome.CHECK:
            raise ApiError(429, 454, "4.7.0", "too many failed authentications; try again later")
        try:
            ok = await self.users.verify(name, password)
        except BaseException:
            guard.abandon(ticket)
            raise
        await guard.finish(ticket, ok)
        if not ok:
            # The shape fail2ban's Postfix filter reads, as for SMTP AUTH.
            log.event(
                PROGRAM,
                f"warning: unknown[{ip}]: SASL PLAIN authentication failed: authentication failure",
                level=logging.WARNING,
                client_ip=ip,
                sasl_username=name,
            )
            raise ApiError(401, 535, "5.7.8", "authentication failed")
        return Submission(name.lower(), ip, "basic")


async def _body(request: web.Request) -> bytes:
    try:
        return await asyncio.wait_for(request.read(), BODY_TIMEOUT)
    except TimeoutError as exc:
        raise ApiError(400, 451, "4.4.2", f"body not received within {BODY_TIMEOUT:.0f}s") from exc


def _error(exc: ApiError, request: web.Request) -> web.Response:
    headers = {"WWW-Authenticate": 'Basic realm="relayd"'} if exc.status == 401 else None
    if exc.status >= 400 and exc.status != 404:
        log.event(
            PROGRAM,
            f"reject: {request.method} {request.path} from unknown[{request.remote}]: "
            f"{exc.code} {exc.enhanced} {exc.message}",
        )
    return web.json_response(exc.body(), status=exc.status, headers=headers)


__all__ = ["ApiServer"]
