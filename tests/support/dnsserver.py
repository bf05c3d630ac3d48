"""An authoritative DNS server on loopback, with zones as lines and per-name faults.

relayd's MX lookups, SPF and DKIM checks must be tested against real DNS
packets (truncation, TCP fallback, SERVFAIL, timeouts), not a mocked resolver,
and must never reach the real DNS. This server answers from an in-memory zone
built with dnspython's wire format; every name it does not know is NXDOMAIN.

Usage::

    with DNSServer() as dns_server:
        dns_server.add(
            "example.test MX 10 mx1.example.test",
            "mx1.example.test A 127.0.0.2",
            'example.test TXT "v=spf1 ip4:127.0.0.1 -all"',
        )
        dns_server.fault("broken.test", "servfail")
        # relayd config: [dns] nameservers = [dns_server.address]

UDP and TCP share one port. Answers carry the AA bit. A name that exists
(or has descendants) but lacks the asked type gets NOERROR with no data.
CNAMEs are followed inside the zone, as an authoritative server does.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import threading
from typing import cast

import dns.asyncresolver
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdataset
import dns.rdatatype
import dns.rdtypes.ANY.TXT
import dns.resolver
import dns.reversename
import dns.rrset
import dns.tokenizer

from . import LoopThread, ThreadedServer

__all__ = ["FAULT_KINDS", "DNSServer"]

FAULT_KINDS = ("nxdomain", "servfail", "timeout", "truncate")
"""Fault kinds accepted by :meth:`DNSServer.fault`."""

DEFAULT_TTL = 300
_MAX_CNAME_CHAIN = 8
_UDP_DEFAULT_PAYLOAD = 512  # RFC 1035 limit for a query without EDNS
_TCP_IDLE_TIMEOUT = 10.0
_BIND_ATTEMPTS = 20

_Zone = dict[dns.name.Name, dict[dns.rdatatype.RdataType, dns.rdataset.Rdataset]]


def _parse_name(text: str, rdtype: dns.rdatatype.RdataType | None = None) -> dns.name.Name:
    """Parse an owner name; a bare IP address for a PTR record means its reverse name.

    Names without a trailing dot are taken as absolute: test zones have no origin.
    """
    if rdtype == dns.rdatatype.PTR:
        with contextlib.suppress(ValueError):
            return dns.reversename.from_address(str(ipaddress.ip_address(text)))
    return dns.name.from_text(text, origin=dns.name.root)


def _parse_rdtype(text: str) -> dns.rdatatype.RdataType:
    """Parse a record type name such as ``MX`` (case-insensitive)."""
    try:
        return dns.rdatatype.from_text(text.upper())
    except dns.rdatatype.UnknownRdatatype:
        raise ValueError(f"unknown record type {text!r}") from None


def _txt_rdata(text: str) -> dns.rdata.Rdata:
    """Build a TXT rdata, splitting each string longer than 255 bytes into chunks.

    DKIM keys are longer than one character-string; zone files (and DNS
    operators) split them, and verifiers concatenate the pieces. Writing the
    whole key as one string in a test is clearer, so the split happens here.
    """
    tokenizer = dns.tokenizer.Tokenizer(text)
    chunks: list[bytes] = []
    for _ in range(len(text) + 1):
        token = tokenizer.get()
        if token.is_eol_or_eof():
            break
        value = token.unescape_to_bytes().value
        assert isinstance(value, bytes)
        if not value:
            chunks.append(b"")
        for start in range(0, len(value), 255):
            chunks.append(value[start : start + 255])
    if not chunks:
        raise ValueError("TXT record needs at least one string")
    return dns.rdtypes.ANY.TXT.TXT(dns.rdataclass.IN, dns.rdatatype.TXT, chunks)


def parse_record(
    line: str,
) -> tuple[dns.name.Name, int, dns.rdatatype.RdataType, dns.rdata.Rdata]:
    """Parse ``NAME [TTL] [IN] TYPE RDATA`` into (name, ttl, rdtype, rdata)."""
    fields = line.split(None, 1)
    if len(fields) != 2:
        raise ValueError(f"bad zone line {line!r}: want 'NAME [TTL] TYPE DATA'")
    owner, rest = fields
    ttl = DEFAULT_TTL
    parts = rest.split(None, 1)
    if parts and parts[0].isdigit():
        ttl = int(parts[0])
        parts = parts[1].split(None, 1) if len(parts) == 2 else []
    if parts and parts[0].upper() == "IN":
        parts = parts[1].split(None, 1) if len(parts) == 2 else []
    if len(parts) != 2:
        raise ValueError(f"bad zone line {line!r}: want 'NAME [TTL] TYPE DATA'")
    rdtype = _parse_rdtype(parts[0])
    data = parts[1].strip()
    name = _parse_name(owner, rdtype)
    if rdtype == dns.rdatatype.TXT:
        rdata = _txt_rdata(data)
    else:
        rdata = dns.rdata.from_text(
            dns.rdataclass.IN, rdtype, data, origin=dns.name.root, relativize=False
        )
    return name, ttl, rdtype, rdata


def _rrset(name: dns.name.Name, rdataset: dns.rdataset.Rdataset) -> dns.rrset.RRset:
    """The records of ``rdataset`` as an RRset owned by ``name`` (for a message section)."""
    return dns.rrset.from_rdata_list(name, rdataset.ttl, list(rdataset))


class _UDPProtocol(asyncio.DatagramProtocol):
    """Hands each datagram to the server and sends back its answer, if any."""

    def __init__(self, server: DNSServer) -> None:
        self.server = server
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        reply = self.server._respond(data, "udp")
        if reply is not None and self.transport is not None:
            self.transport.sendto(reply, addr)


class DNSServer(ThreadedServer):
    """Authoritative DNS server on loopback for tests (UDP and TCP on one port).

    Thread-safe: records and faults may be changed while the server runs; the
    next query sees the change.

    ``queries`` lists every question received as ``(name, type)``, the name in
    lower case without the trailing dot and the type as text (``"MX"``), in
    arrival order; a query retried over TCP after truncation appears twice.
    ``query_log`` has the same entries plus the transport (``"udp"``/``"tcp"``).
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        ip = ipaddress.ip_address(host)
        if not ip.is_loopback:
            raise ValueError(f"DNSServer only listens on loopback, not {host}")
        self.host = host
        self.port = port
        self.queries: list[tuple[str, str]] = []
        self.query_log: list[tuple[str, str, str]] = []
        self._family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
        self._zone: _Zone = {}
        self._faults: dict[tuple[dns.name.Name, dns.rdatatype.RdataType | None], str] = {}
        self._signed: set[dns.name.Name] = set()
        self._lock = threading.Lock()
        self._loop = LoopThread(f"DNSServer-{host}")
        self._udp_transport: asyncio.DatagramTransport | None = None
        self._tcp_server: asyncio.Server | None = None
        self._tcp_writers: set[asyncio.StreamWriter] = set()

    # -- lifecycle ---------------------------------------------------------

    @property
    def address(self) -> str:
        """``host:port`` (``[::1]:port`` for IPv6), as relayd's ``[dns] nameservers`` takes."""
        if self._family == socket.AF_INET6:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"

    def _bind(self) -> tuple[socket.socket, socket.socket]:
        """Bind UDP and TCP sockets on the same port (retrying when port 0 collides)."""
        last_error: OSError | None = None
        for _ in range(_BIND_ATTEMPTS):
            udp = socket.socket(self._family, socket.SOCK_DGRAM)
            tcp = socket.socket(self._family, socket.SOCK_STREAM)
            try:
                udp.bind((self.host, self.port))
                port = udp.getsockname()[1]
                tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                tcp.bind((self.host, port))
                tcp.listen(16)
            except OSError as exc:
                udp.close()
                tcp.close()
                last_error = exc
                if self.port != 0:
                    raise
                continue
            udp.setblocking(False)
            tcp.setblocking(False)
            return udp, tcp
        raise OSError(f"no port free for both UDP and TCP on {self.host}") from last_error

    def start(self) -> DNSServer:
        """Bind the sockets and start answering; returns self for chaining."""
        udp, tcp = self._bind()
        self.port = udp.getsockname()[1]
        self._loop.start()
        try:
            self._loop.call(self._open(udp, tcp))
        except BaseException:
            udp.close()
            tcp.close()
            self._loop.stop()
            raise
        return self

    async def _open(self, udp: socket.socket, tcp: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(lambda: _UDPProtocol(self), sock=udp)
        self._udp_transport = transport
        self._tcp_server = await asyncio.start_server(self._handle_tcp, sock=tcp)

    async def _close(self) -> None:
        if self._udp_transport is not None:
            self._udp_transport.close()
            self._udp_transport = None
        if self._tcp_server is not None:
            self._tcp_server.close()
            for writer in list(self._tcp_writers):
                writer.close()
            await asyncio.wait_for(self._tcp_server.wait_closed(), 5.0)
            self._tcp_server = None
        await asyncio.sleep(0)  # let transports run their close callbacks

    # -- zone --------------------------------------------------------------

    def add(self, *lines: str) -> None:
        """Add records given as zone lines: ``NAME [TTL] TYPE DATA``.

        Examples: ``"example.test MX 10 mx1.example.test"``,
        ``"example.test 60 A 127.0.0.2"``, ``'example.test TXT "v=spf1 -all"'``,
        ``"127.0.0.2 PTR mx1.example.test"`` (an IP owner for PTR means its
        reverse name). Names are case-insensitive; a trailing dot is optional.
        All lines are parsed before any is added, so a typo adds nothing.
        """
        parsed = [parse_record(line) for line in lines]
        with self._lock:
            for name, ttl, rdtype, rdata in parsed:
                node = self._zone.setdefault(name, {})
                rdataset = node.get(rdtype)
                if rdataset is None:
                    rdataset = dns.rdataset.Rdataset(dns.rdataclass.IN, rdtype)
                    node[rdtype] = rdataset
                rdataset.add(rdata, ttl)

    def remove(self, name: str, rdtype: str | None = None) -> None:
        """Remove all records of ``name`` (or only those of type ``rdtype``)."""
        rtype = _parse_rdtype(rdtype) if rdtype is not None else None
        owner = _parse_name(name, rtype)
        with self._lock:
            node = self._zone.get(owner)
            if node is None:
                return
            if rtype is None:
                del self._zone[owner]
            else:
                node.pop(rtype, None)
                if not node:
                    del self._zone[owner]

    def clear(self) -> None:
        """Remove every record and every fault (``queries`` is kept)."""
        with self._lock:
            self._zone.clear()
            self._faults.clear()
            self._signed.clear()

    def sign(self, *zones: str) -> None:
        """Answer as a validating resolver would for DNSSEC-signed ``zones``.

        Every answer (records, no data or NXDOMAIN) for a name at or under one
        of them carries the AD bit when the query asked for it (AD or DO set),
        as unbound does for a zone that validated; other names never get it.
        """
        with self._lock:
            self._signed.update(_parse_name(zone) for zone in zones)

    def _authenticated(self, query: dns.message.Message, qname: dns.name.Name) -> bool:
        asked = bool(query.flags & dns.flags.AD) or bool(query.ednsflags & dns.flags.DO)
        return asked and any(qname.is_subdomain(zone) for zone in self._signed)

    def fault(self, name: str, kind: str, rdtype: str | None = None) -> None:
        """Make queries for ``name`` (optionally only of type ``rdtype``) fail.

        Kinds: ``nxdomain``; ``servfail``; ``timeout`` (no answer at all, on
        UDP and TCP); ``truncate`` (over UDP an empty answer with the TC bit
        set, over TCP the full answer, so resolvers must retry over TCP).
        A fault for a specific type wins over one for the whole name.
        """
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault {kind!r}; want one of {', '.join(FAULT_KINDS)}")
        rtype = _parse_rdtype(rdtype) if rdtype is not None else None
        with self._lock:
            self._faults[(_parse_name(name, rtype), rtype)] = kind

    def unfault(self, name: str, rdtype: str | None = None) -> None:
        """Remove a fault set by :meth:`fault` with the same name and type."""
        rtype = _parse_rdtype(rdtype) if rdtype is not None else None
        with self._lock:
            self._faults.pop((_parse_name(name, rtype), rtype), None)

    # -- resolvers pointed at this server --------------------------------------

    def resolver(self, lifetime: float = 2.0) -> dns.resolver.Resolver:
        """A dnspython resolver that asks only this server (no system config read)."""
        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers = [self.host]
        resolver.port = self.port
        resolver.lifetime = lifetime
        resolver.timeout = lifetime
        return resolver

    def async_resolver(self, lifetime: float = 2.0) -> dns.asyncresolver.Resolver:
        """Like :meth:`resolver`, for asyncio code."""
        resolver = dns.asyncresolver.Resolver(configure=False)
        resolver.nameservers = [self.host]
        resolver.port = self.port
        resolver.lifetime = lifetime
        resolver.timeout = lifetime
        return resolver

    # -- answering ---------------------------------------------------------

    def _exists(self, name: dns.name.Name) -> bool:
        """True if ``name`` owns records or is an empty non-terminal above some."""
        return name in self._zone or any(owner.is_subdomain(name) for owner in self._zone)

    def _fault_for(self, name: dns.name.Name, rdtype: dns.rdatatype.RdataType) -> str | None:
        return self._faults.get((name, rdtype)) or self._faults.get((name, None))

    def _fill(
        self,
        response: dns.message.Message,
        qname: dns.name.Name,
        qtype: dns.rdatatype.RdataType,
    ) -> None:
        """Put the zone's answer for (qname, qtype) into ``response``."""
        current = qname
        for _ in range(_MAX_CNAME_CHAIN):
            node = self._zone.get(current)
            if node is None:
                if not self._exists(current):
                    response.set_rcode(dns.rcode.NXDOMAIN)
                return
            wanted = list(node.values()) if qtype == dns.rdatatype.ANY else []
            if qtype in node:
                wanted = [node[qtype]]
            if wanted:
                for rdataset in wanted:
                    response.answer.append(_rrset(current, rdataset))
                return
            cname = node.get(dns.rdatatype.CNAME)
            if cname is None:
                return  # the name exists, the type does not: NOERROR, no data
            response.answer.append(_rrset(current, cname))
            target = next(iter(cname)).target
            assert isinstance(target, dns.name.Name)
            current = target

    def _respond(self, wire: bytes, transport: str) -> bytes | None:
        """Answer one query in wire format; None means send nothing."""
        try:
            query = dns.message.from_wire(wire)
        except dns.exception.DNSException:
            return None  # not worth answering; the client will time out
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        if len(query.question) != 1:
            response.set_rcode(dns.rcode.FORMERR)
            return response.to_wire()
        question = query.question[0]
        qname, qtype = question.name, question.rdtype
        entry = (qname.to_text(omit_final_dot=True).lower(), dns.rdatatype.to_text(qtype))
        self.queries.append(entry)
        self.query_log.append((*entry, transport))
        if question.rdclass != dns.rdataclass.IN:
            response.set_rcode(dns.rcode.REFUSED)
            return response.to_wire()
        with self._lock:
            fault = self._fault_for(qname, qtype)
            if fault == "timeout":
                return None
            if fault == "nxdomain":
                response.set_rcode(dns.rcode.NXDOMAIN)
            elif fault == "servfail":
                response.set_rcode(dns.rcode.SERVFAIL)
            elif fault == "truncate" and transport == "udp":
                response.flags |= dns.flags.TC
            else:
                self._fill(response, qname, qtype)
            if fault is None and self._authenticated(query, qname):
                response.flags |= dns.flags.AD
        if transport == "tcp":
            return response.to_wire(max_size=65535)
        limit = max(query.payload, _UDP_DEFAULT_PAYLOAD) if query.edns >= 0 else 512
        try:
            return response.to_wire(max_size=limit)
        except dns.exception.TooBig:
            # A real server does the same: drop the records and set TC, so the
            # resolver repeats the question over TCP.
            response.answer.clear()
            response.authority.clear()
            response.additional.clear()
            response.flags |= dns.flags.TC
            return response.to_wire(max_size=limit)

    async def _handle_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Serve length-prefixed queries on one TCP connection until EOF or idle timeout."""
        self._tcp_writers.add(writer)
        try:
            for _ in range(1000):
                try:
                    header = await asyncio.wait_for(reader.readexactly(2), _TCP_IDLE_TIMEOUT)
                    length = int.from_bytes(header, "big")
                    wire = await asyncio.wait_for(reader.readexactly(length), _TCP_IDLE_TIMEOUT)
                except (asyncio.IncompleteReadError, TimeoutError, ConnectionError):
                    return
                reply = self._respond(wire, "tcp")
                if reply is None:
                    continue  # "timeout" fault: keep the connection open, say nothing
                writer.write(len(reply).to_bytes(2, "big") + reply)
                await writer.drain()
        except ConnectionError:
            return
        finally:
            self._tcp_writers.discard(writer)
            writer.close()
