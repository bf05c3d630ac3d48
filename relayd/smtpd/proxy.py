"""The PROXY protocol (v1 text, v2 binary), as HAProxy sends it before the client's bytes.

Behind a TCP load balancer every client looks like the balancer. On a
listener with ``proxy_protocol = true`` a connection from one of ``[server]
proxy_from`` must start with a PROXY header; the address in it is the
client's everywhere (relay ACL, limits, SPF, ``Received:``, logs). This
module only parses: ``parse(buffer)`` says "need more bytes", "here is the
client and how many bytes the header took", or raises ProxyError. A header
is at most MAX_HEADER bytes; the caller bounds the time it may take.

Written here rather than taken from PyPI: the packages on offer are
synchronous wrappers or unmaintained, and the format is small (v1 is one
line of at most 107 bytes, v2 a 16-byte prefix and the addresses); it is
property-tested in tests/test_proxy_protocol.py.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

V1_PREFIX = b"PROXY "
V1_MAX = 107  # the longest v1 line, CRLF included (spec section 2.1)
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
MAX_HEADER = 16 + 2048  # v2: the prefix, the addresses and TLVs (HAProxy sends a few)
HEADER_TIMEOUT = 5.0  # seconds a connection may take to send its header


class ProxyError(ValueError):
    """Not a valid PROXY header: the connection is closed."""


@dataclass(frozen=True)
class ProxyHeader:
    """What the balancer said: the client's address, or None (a health check: LOCAL)."""

    client: tuple[str, int] | None
    length: int  # bytes the header took; what follows is the client's


def parse(buffer: bytes) -> ProxyHeader | None:
    """The header at the start of ``buffer``; None when more bytes are needed."""
    if not buffer:
        return None
    if buffer[:1] == b"P":
        return _parse_v1(buffer)
    if buffer[:1] == b"\r":
        return _parse_v2(buffer)
    raise ProxyError("no PROXY protocol header")


def _parse_v1(buffer: bytes) -> ProxyHeader | None:
    if not buffer.startswith(V1_PREFIX[: len(buffer)]):
        raise ProxyError("no PROXY protocol header")
    end = buffer.find(b"\r\n", 0, V1_MAX)
    if end < 0:
        if len(buffer) >= V1_MAX:
            raise ProxyError("PROXY v1 line too long")
        return None
    fields = buffer[len(V1_PREFIX) : end].split(b" ")
    if fields[0] == b"UNKNOWN":
        return ProxyHeader(None, end + 2)
    if len(fields) != 5 or fields[0] not in (b"TCP4", b"TCP6"):
        raise ProxyError("PROXY v1: expected TCP4|TCP6 SRC DST SPORT DPORT")
    try:
        source = ipaddress.ip_address(fields[1].decode("ascii"))
        ipaddress.ip_address(fields[2].decode("ascii"))
        port = _port(fields[3])
        _port(fields[4])
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProxyError(f"PROXY v1: {exc}") from exc
    if source.version != (4 if fields[0] == b"TCP4" else 6):
        raise ProxyError("PROXY v1: address family does not match")
    return ProxyHeader((str(source), port), end + 2)


def _port(text: bytes) -> int:
    if not text.isdigit() or len(text) > 5 or (len(text) > 1 and text[:1] == b"0"):
        raise ValueError(f"bad port {text[:8]!r}")
    port = int(text)
    if port > 65535:
        raise ValueError(f"bad port {port}")
    return port


_V2_ADDRESS_SIZES = {0x11: 12, 0x12: 12, 0x21: 36, 0x22: 36, 0x31: 216, 0x32: 216}


def _parse_v2(buffer: bytes) -> ProxyHeader | None:
    if not V2_SIGNATURE.startswith(buffer[:12]):
        raise ProxyError("no PROXY protocol header")
    if len(buffer) < 16:
        return None
    version_command, family, length = buffer[12], buffer[13], struct.unpack("!H", buffer[14:16])[0]
    if version_command >> 4 != 2:
        raise ProxyError(f"PROXY v2: version {version_command >> 4}")
    command = version_command & 0x0F
    if command not in (0, 1):
        raise ProxyError(f"PROXY v2: command {command}")
    if 16 + length > MAX_HEADER:
        raise ProxyError(f"PROXY v2: header of {16 + length} bytes is too long")
    if len(buffer) < 16 + length:
        return None
    total = 16 + length
    if command == 0:  # LOCAL: the balancer's own connection (a health check)
        return ProxyHeader(None, total)
    if family == 0x00:  # UNSPEC
        return ProxyHeader(None, total)
    size = _V2_ADDRESS_SIZES.get(family)
    if size is None:
        raise ProxyError(f"PROXY v2: address family 0x{family:02x}")
    if length < size:
        raise ProxyError("PROXY v2: address block too short")
    block = buffer[16 : 16 + size]
    if family >> 4 == 1:
        ip = str(ipaddress.IPv4Address(block[:4]))
        port = struct.unpack("!H", block[8:10])[0]
    elif family >> 4 == 2:
        ip = str(ipaddress.IPv6Address(block[:16]))
        port = struct.unpack("!H", block[32:34])[0]
    else:  # AF_UNIX: no client address to speak of
        return ProxyHeader(None, total)
    return ProxyHeader((ip, port), total)


def encode_v2(client: tuple[str, int], server: tuple[str, int]) -> bytes:
    """A v2 PROXY header for a TCP connection (what HAProxy's send-proxy-v2 writes)."""
    source, target = ipaddress.ip_address(client[0]), ipaddress.ip_address(server[0])
    if source.version != target.version:
        raise ValueError("client and server must be the same address family")
    family = 0x11 if source.version == 4 else 0x21
    block = source.packed + target.packed + struct.pack("!HH", client[1], server[1])
    return V2_SIGNATURE + bytes([0x21, family]) + struct.pack("!H", len(block)) + block


def encode_v1(client: tuple[str, int], server: tuple[str, int]) -> bytes:
    family = "TCP4" if ipaddress.ip_address(client[0]).version == 4 else "TCP6"
    return f"PROXY {family} {client[0]} {server[0]} {client[1]} {server[1]}\r\n".encode()
