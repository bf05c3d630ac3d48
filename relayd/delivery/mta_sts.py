"""MTA-STS (RFC 8461): which MX hosts of a domain may get its mail, and only over verified TLS.

Without it, anyone on the path can strip STARTTLS from the MX greeting or
answer the MX query: opportunistic TLS then quietly falls back to clear
text. A domain that publishes ``_mta-sts.DOMAIN TXT "v=STSv1; id=..."``
also serves a policy at ``https://mta-sts.DOMAIN/.well-known/mta-sts.txt``
over certificate-verified HTTPS, which a man in the middle cannot forge.

The order of things, as the RFC wants it (section 5.1):

- the TXT id only says whether the cached policy is still current; an id
  that differs from the cached one triggers a fetch;
- a fetched policy is cached for its ``max_age`` on disk (in the spool), so
  a restart, or an attacker who later blocks the TXT lookup or the HTTPS
  fetch, does not make relayd forget it;
- when the fetch fails but a cached policy is still valid, the cached one
  applies; with no valid policy at all, delivery is as without MTA-STS.

The HTTPS fetch uses httpx (a maintained client with TLS verification done
right) against the address relayd's own resolver gives, with SNI and the
certificate check on ``mta-sts.DOMAIN``; redirects are not followed
(RFC 8461 3.3), the body is cut at 64 KiB and the whole fetch at
``FETCH_TIMEOUT``.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import ssl
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import dns.asyncresolver

from relayd import dns as rdns

if TYPE_CHECKING:  # imported at the first fetch: memory at rest without MTA-STS
    import httpx

Mode = Literal["enforce", "testing", "none"]

FETCH_TIMEOUT = 10.0  # seconds for the whole HTTPS fetch
RECHECK = 300.0  # seconds a lookup's outcome is reused before the TXT record is asked again
MAX_REMEMBERED = 10_000  # domains whose recent outcome is kept in memory
MAX_POLICY_BYTES = 64 * 1024  # RFC 8461 3.2: senders may refuse larger bodies
MAX_AGE_LIMIT = 31_557_600  # one year, the RFC's ceiling
POLICY_PATH = "/.well-known/mta-sts.txt"
_ID = re.compile(r"^[A-Za-z0-9]{1,32}$")


class PolicyError(ValueError):
    """A policy (or TXT record) that is not valid MTA-STS: treated as absent."""


@dataclass(frozen=True)
class Policy:
    """A domain's published policy: its mode, allowed MX patterns and lifetime."""

    mode: Mode
    mx: tuple[str, ...]
    max_age: int

    def allows(self, host: str) -> bool:
        """True when ``host`` matches one of the policy's ``mx:`` patterns."""
        return any(mx_matches(pattern, host) for pattern in self.mx)


@dataclass(frozen=True)
class Cached:
    """A policy as kept on disk: with its TXT id and when it was fetched."""

    domain: str
    policy_id: str
    policy: Policy
    fetched_at: float

    def valid(self, now: float) -> bool:
        return now < self.fetched_at + self.policy.max_age


@dataclass(frozen=True)
class Lookup:
    """What delivery needs: the policy in force (or None) and a note for the log."""

    policy: Policy | None
    note: str


# ---- plain functions of plain data ----------------------------------------------------------


def parse_txt(records: list[str]) -> str | None:
    """The policy id from the ``_mta-sts`` TXT records, None when there is no valid record.

    RFC 8461 3.1: records not starting with ``v=STSv1`` are ignored; more than
    one STSv1 record means no policy.
    """
    ids: list[str] = []
    for record in records:
        fields = [f.strip() for f in record.split(";") if f.strip()]
        if not fields or fields[0] != "v=STSv1":
            continue
        values = dict(f.split("=", 1) for f in fields[1:] if "=" in f)
        ids.append(values.get("id", "").strip())
    if len(ids) != 1 or not _ID.match(ids[0]):
        return None
    return ids[0]


def parse_policy(text: str) -> Policy:
    """The policy file's ``key: value`` lines (CRLF or LF); PolicyError if it is not STSv1."""
    values: dict[str, list[str]] = {}
    for line in text.replace("\r\n", "\n").split("\n"):
        if not line.strip():
            continue
        key, sep, value = line.partition(":")
        if not sep:
            raise PolicyError(f"line without a colon: {line[:60]!r}")
        values.setdefault(key.strip().lower(), []).append(value.strip())
    if values.get("version") != ["STSv1"]:
        raise PolicyError("version is not STSv1")
    mode = (values.get("mode") or [""])[0]
    if mode not in ("enforce", "testing", "none"):
        raise PolicyError(f"unknown mode {mode[:20]!r}")
    try:
        max_age = int((values.get("max_age") or [""])[0])
    except ValueError as exc:
        raise PolicyError("max_age is not a number") from exc
    if not 0 <= max_age <= MAX_AGE_LIMIT:
        raise PolicyError(f"max_age {max_age} outside 0..{MAX_AGE_LIMIT}")
    mx = tuple(p.lower().rstrip(".") for p in values.get("mx", []) if p)
    if mode != "none" and not mx:
        raise PolicyError(f"mode {mode} without any mx pattern")
    return Policy(mode, mx, max_age)  # type: ignore[arg-type]


def mx_matches(pattern: str, host: str) -> bool:
    """RFC 8461 4.1: exact, or ``*.example.com`` standing for exactly one left-most label."""
    pattern = pattern.lower().rstrip(".")
    host = host.lower().rstrip(".")
    if pattern.startswith("*."):
        label, dot, rest = host.partition(".")
        return bool(label) and bool(dot) and rest == pattern[2:]
    return host == pattern


# ---- the cache on disk ------------------------------------------------------------------------


class PolicyStore:
    """One JSON file per domain under the spool's ``mta-sts/``; survives restarts.

    Only relayd writes here, and only policies that parsed, so a file that
    does not load is simply ignored (and replaced at the next fetch).
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def _path(self, domain: str) -> Path:
        return self.directory / f"{domain}.json"

    def load(self, domain: str) -> Cached | None:
        try:
            raw = json.loads(self._path(domain).read_text())
            policy = Policy(raw["mode"], tuple(raw["mx"]), int(raw["max_age"]))
            return Cached(domain, str(raw["id"]), policy, float(raw["fetched_at"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def save(self, cached: Cached) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        record = {"id": cached.policy_id, "fetched_at": cached.fetched_at, **asdict(cached.policy)}
        path = self._path(cached.domain)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record))
        os.replace(tmp, path)


# ---- discovery and fetch ----------------------------------------------------------------------


def _domain_ok(domain: str) -> bool:
    """A file name and a host name: letters, digits, hyphens and dots only."""
    return bool(re.fullmatch(r"[a-z0-9-]+(\.[a-z0-9-]+)+", domain))


class MTASTS:
    """The policy in force for a destination domain, fetched, cached and refreshed."""

    def __init__(
        self,
        resolver: dns.asyncresolver.Resolver,
        store: PolicyStore,
        tls: ssl.SSLContext,
        dns_timeout: float = 5.0,
        port: int = 443,
        clock: Callable[[], float] = time.time,
        recheck: float = RECHECK,
    ) -> None:
        self.resolver = resolver
        self.store = store
        self.tls = tls
        self.dns_timeout = dns_timeout
        self.port = port
        self.clock = clock
        self.recheck = recheck
        self._memory: dict[str, Cached] = {}
        self._inflight: dict[str, asyncio.Future[Lookup]] = {}
        # Each domain's last outcome, reused for ``recheck`` seconds so that a
        # burst of mail to one domain costs one TXT query, not one per message.
        self._recent: OrderedDict[str, tuple[float, Lookup]] = OrderedDict()

    async def lookup(self, domain: str) -> Lookup:
        """The policy for ``domain``; concurrent deliveries to one domain share one lookup."""
        domain = domain.lower().rstrip(".")
        if not _domain_ok(domain):
            return Lookup(None, "no policy (domain name not usable)")
        recent = self._recent.get(domain)
        if recent is not None and self.clock() < recent[0]:
            self._recent.move_to_end(domain)
            return recent[1]
        running = self._inflight.get(domain)
        if running is not None:
            return await asyncio.shield(running)
        future: asyncio.Future[Lookup] = asyncio.get_running_loop().create_future()
        self._inflight[domain] = future
        try:
            result = await self._lookup(domain)
            self._remember(domain, result)
            future.set_result(result)
            return result
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: nobody else may be waiting
            raise
        finally:
            del self._inflight[domain]

    def _remember(self, domain: str, result: Lookup) -> None:
        expires = self.clock() + self.recheck
        if result.policy is not None:  # never past the policy's own lifetime
            cached = self._memory.get(domain)
            if cached is not None:
                expires = min(expires, cached.fetched_at + cached.policy.max_age)
        self._recent[domain] = (expires, result)
        self._recent.move_to_end(domain)
        while len(self._recent) > MAX_REMEMBERED:
            self._recent.popitem(last=False)

    def _cached(self, domain: str) -> Cached | None:
        cached = self._memory.get(domain) or self.store.load(domain)
        if cached is not None:
            self._memory[domain] = cached
        return cached

    async def _lookup(self, domain: str) -> Lookup:
        now = self.clock()
        cached = self._cached(domain)
        valid = cached if cached is not None and cached.valid(now) else None
        try:
            records = await rdns.txt_records_async(
                self.resolver, f"_mta-sts.{domain}", self.dns_timeout
            )
        except rdns.DNSTempError as exc:
            if valid is not None:
                return Lookup(valid.policy, f"cached policy (TXT lookup failed: {exc})")
            return Lookup(None, "no policy (TXT lookup failed)")
        policy_id = parse_txt(records)
        if policy_id is None:
            if valid is not None:
                return Lookup(valid.policy, "cached policy (no TXT record now)")
            return Lookup(None, "no policy")
        if valid is not None and valid.policy_id == policy_id:
            return Lookup(valid.policy, "cached policy")
        import httpx

        try:
            policy = await self.fetch(domain)
        except (PolicyError, OSError, httpx.HTTPError, rdns.DNSTempError) as exc:
            reason = str(exc) or type(exc).__name__
            if valid is not None:
                return Lookup(valid.policy, f"cached policy (fetch failed: {reason})")
            return Lookup(None, f"no policy (fetch failed: {reason})")
        fresh = Cached(domain, policy_id, policy, now)
        self._memory[domain] = fresh
        await asyncio.to_thread(self.store.save, fresh)
        return Lookup(policy, "fetched policy")

    async def fetch(self, domain: str) -> Policy:
        """GET the policy over verified HTTPS from the address relayd's resolver gives."""
        host = f"mta-sts.{domain}"
        addresses = await self._addresses(host)
        if not addresses:
            raise PolicyError(f"{host} has no address")
        last: Exception | None = None
        import httpx

        async with httpx.AsyncClient(
            verify=self.tls, follow_redirects=False, timeout=FETCH_TIMEOUT, trust_env=False
        ) as client:
            for address in addresses[:2]:
                try:
                    return await asyncio.wait_for(self._get(client, host, address), FETCH_TIMEOUT)
                except (OSError, httpx.TransportError, TimeoutError) as exc:
                    last = exc
        raise PolicyError(f"{host}: {last or 'unreachable'}")

    async def _get(self, client: httpx.AsyncClient, host: str, address: str) -> Policy:
        literal = f"[{address}]" if ":" in address else address
        url = f"https://{literal}:{self.port}{POLICY_PATH}"
        request = client.build_request(
            "GET", url, headers={"Host": host}, extensions={"sni_hostname": host}
        )
        response = await client.send(request, stream=True)
        try:
            if response.status_code != 200:
                raise PolicyError(f"{host}: HTTP {response.status_code}")
            kind = response.headers.get("content-type", "").split(";")[0].strip().lower()
            if kind != "text/plain":
                raise PolicyError(f"{host}: content type {kind[:40]!r}, not text/plain")
            body = bytearray()
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) > MAX_POLICY_BYTES:
                    raise PolicyError(f"{host}: policy larger than {MAX_POLICY_BYTES} bytes")
        finally:
            await response.aclose()
        return parse_policy(body.decode("utf-8", "replace"))

    async def _addresses(self, host: str) -> list[str]:
        found: list[str] = []
        for rdtype in ("A", "AAAA"):
            try:
                answer = await rdns.query_async(self.resolver, host, rdtype, self.dns_timeout)
            except rdns.DNSTempError:
                if found:
                    break
                raise
            found += [record.address for record in answer]
        return found
