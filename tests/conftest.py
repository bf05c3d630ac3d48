"""Shared fixtures: a loopback DNS server, MX servers on 127.0.0.2-5, a test CA."""

from support.fixtures import dns_server, mx_pool, tls_ca  # noqa: F401
