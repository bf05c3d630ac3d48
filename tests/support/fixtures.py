"""pytest fixtures over the harness, for the project's conftest to import.

In ``tests/conftest.py``::

    from support.fixtures import dns_server, mx_pool, tls_ca  # noqa: F401

Fixtures:

- ``tls_ca`` (session): the trustme CA every test certificate comes from
  (see :mod:`.certs` for PEM files and client contexts).
- ``dns_server``: a started :class:`.DNSServer` on 127.0.0.1 with an empty
  zone (so every name is NXDOMAIN until the test adds it).
- ``mx_pool``: a started :class:`.MXPool` of 4 servers on 127.0.0.2-127.0.0.5
  sharing ``mx_pool.port``, named ``mx1.test`` ... ``mx4.test``, offering
  STARTTLS with one certificate valid for ``mx.test``, ``mx1.test`` ...
  ``mx4.test`` and the four IP addresses. ``mx_pool.mx_records(domain)``
  gives the zone lines that point a domain at it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from . import certs
from .dnsserver import DNSServer
from .mxserver import MXPool

__all__ = ["MX_POOL_SIZE", "dns_server", "mx_pool", "tls_ca"]

MX_POOL_SIZE = 4


@pytest.fixture(scope="session")
def tls_ca() -> trustme.CA:
    """The session-wide test CA."""
    return certs.ca()


@pytest.fixture
def dns_server() -> Iterator[DNSServer]:
    """A running DNS server with an empty zone; stopped after the test."""
    with DNSServer() as server:
        yield server


@pytest.fixture
def mx_pool(tmp_path: Path) -> Iterator[MXPool]:
    """Four STARTTLS-capable MX servers on 127.0.0.2-5 sharing one port."""
    hosts = [f"127.0.0.{2 + i}" for i in range(MX_POOL_SIZE)]
    names = ["mx.test", *(f"mx{i + 1}.test" for i in range(MX_POOL_SIZE))]
    cert_dir = tmp_path / "mx-pool-tls"
    cert_dir.mkdir()
    cert = certs.server_cert_files(cert_dir, *names, *hosts)
    with MXPool(MX_POOL_SIZE, cert=cert) as pool:
        yield pool
