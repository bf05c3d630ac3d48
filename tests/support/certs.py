"""A session-wide test CA (trustme) and helpers that write PEM files for servers.

relayd reads its certificate and key from files (``[tls] cert``/``key``) and
trusts extra CAs from a file (``[[route]] ca_file``), so the helpers write
real PEM files; clients in tests get an ``ssl.SSLContext`` trusting the CA.
One CA serves the whole session: issuing leaf certificates is cheap, creating
CA keys is not, and one trust anchor keeps fixtures interchangeable.
"""

from __future__ import annotations

import itertools
import re
import ssl
import threading
from pathlib import Path

import trustme

__all__ = ["ca", "ca_file", "client_context", "server_cert_files", "server_context"]

_lock = threading.Lock()
_ca: trustme.CA | None = None
_counter = itertools.count()


def ca() -> trustme.CA:
    """The session's CA, created on first use."""
    global _ca
    with _lock:
        if _ca is None:
            _ca = trustme.CA(organization_name="relayd test CA")
        return _ca


def _slug(hostnames: tuple[str, ...]) -> str:
    return re.sub(r"[^A-Za-z0-9.-]+", "_", hostnames[0])[:40] if hostnames else "localhost"


def server_cert_files(tmp_path: Path, *hostnames: str) -> tuple[Path, Path]:
    """Issue a certificate for ``hostnames`` and write ``(cert_path, key_path)`` under tmp_path.

    Hostnames may include IP addresses and wildcards (``*.example.test``);
    with none given the certificate is for ``localhost`` and ``127.0.0.1``.
    The cert file holds the full chain (leaf first), like a certbot
    ``fullchain.pem``. Each call writes new, uniquely named files.
    """
    names = hostnames or ("localhost", "127.0.0.1")
    leaf = ca().issue_cert(*names)
    stem = f"{_slug(names)}-{next(_counter)}"
    cert_path = tmp_path / f"{stem}.fullchain.pem"
    key_path = tmp_path / f"{stem}.key.pem"
    cert_path.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    key_path.write_bytes(leaf.private_key_pem.bytes())
    key_path.chmod(0o600)
    return cert_path, key_path


def ca_file(tmp_path: Path) -> Path:
    """Write the CA certificate (PEM) under tmp_path and return its path."""
    path = tmp_path / "test-ca.pem"
    path.write_bytes(ca().cert_pem.bytes())
    return path


def client_context() -> ssl.SSLContext:
    """A client context that verifies certificates and hostnames against the test CA only."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED, check_hostname
    context.load_verify_locations(cadata=ca().cert_pem.bytes().decode("ascii"))
    return context


def server_context(cert: tuple[Path, Path]) -> ssl.SSLContext:
    """A server-side context loading ``(cert_path, key_path)`` as written above."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(str(cert[0]), str(cert[1]))
    return context
