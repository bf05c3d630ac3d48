"""``python -m relayd.dev DIR``: a safe local relayd to try things with.

Writes, under DIR, a self-signed certificate, a config listening on
unprivileged loopback ports (2525 inbound, 2587 submission with STARTTLS,
2465 submission with implicit TLS), a spool, and a user ``dev`` whose
password is printed. Existing files are kept, so the password stays the
same from one ``make run`` to the next.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import secrets
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

HOSTNAME = "localhost"
DEFAULT_PORT_BASE = 2500

CONFIG = """\
# relayd development config, written by `make run`. See etc/relayd.toml for every key.
hostname = "{hostname}"

[[listener]]
name = "inbound"
address = "127.0.0.1:{inbound}"
mode = "inbound"
tls = "starttls"

[[listener]]
name = "submission"
address = "127.0.0.1:{submission}"
mode = "submission"
tls = "starttls"

[[listener]]
name = "submissions"
address = "127.0.0.1:{submissions}"
mode = "submission"
tls = "implicit"

[tls]
cert = "tls/cert.pem"
key = "tls/key.pem"

[auth]
users_file = "users"

[spool]
path = "spool"

[control]
socket = "run/control.sock"

[local]
socket = "run/sendmail.sock"

[logging]
target = "stderr"

# Safe by default: nothing leaves this machine. All outbound mail is
# delivered into the Maildir outbox/ next to this file, one file per message
# in outbox/new/, exactly as it would have been sent (what MailHog or Mailpit
# are otherwise run for). To see mail wait in the queue instead, use
#   via = "127.0.0.1:{outbound}"   (nothing listens there; or run smtp-sink)
# and delete this route to deliver by MX for real.
[[route]]
domain = "*"
via = "maildir:outbox"
"""


def self_signed(cert_path: Path, key_path: Path, hostname: str) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=825))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName(hostname), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def ports(base: int) -> dict[str, int]:
    """The dev ports from a base: 2500 gives 2525, 2587, 2465 and 2526 (outbound)."""
    return {
        "inbound": base + 25,
        "submission": base + 87,
        "submissions": base - 35,
        "outbound": base + 26,
    }


def setup(root: Path, base: int = DEFAULT_PORT_BASE) -> str:
    """Create what is missing under ``root``; return the dev user's password."""
    from relayd import users

    (root / "tls").mkdir(parents=True, exist_ok=True)
    (root / "run").mkdir(exist_ok=True)
    cert, key = root / "tls" / "cert.pem", root / "tls" / "key.pem"
    if not cert.exists() or not key.exists():
        self_signed(cert, key, HOSTNAME)
    config = root / "relayd.toml"
    if not config.exists():
        config.write_text(CONFIG.format(hostname=HOSTNAME, **ports(base)))
    elif f"127.0.0.1:{ports(base)['inbound']}" not in config.read_text():
        print(
            f"note: {config} exists with other ports; remove it to use PORT_BASE={base}",
            file=sys.stderr,
        )
    secret = root / "dev-password"
    if not secret.exists():
        password = secrets.token_urlsafe(12)
        users.cmd_user_add(root / "users", "dev", password, ["*@*"])
        secret.write_text(password + "\n")
        secret.chmod(0o600)
    return secret.read_text().strip()


def main() -> int:
    rel = Path(sys.argv[1] if len(sys.argv) > 1 else "var")
    root = rel.resolve()
    base = int(os.environ.get("PORT_BASE") or DEFAULT_PORT_BASE)
    password = setup(root, base)
    p = ports(base)
    print(
        f"""relayd development instance ({rel}/relayd.toml)
  inbound     127.0.0.1:{p["inbound"]}  (STARTTLS optional)
  submission  127.0.0.1:{p["submission"]}  (STARTTLS, then AUTH)
  submissions 127.0.0.1:{p["submissions"]}  (implicit TLS, AUTH)
  user dev, password {password}   (may send as any address)
  outbound mail goes into the Maildir {rel}/outbox/new/ (see the [[route]] in relayd.toml)
Try: swaks --server 127.0.0.1:{p["submission"]} --tls --auth-user dev \\
       --auth-password {password} --from you@localhost --to someone@example.org
     .venv/bin/relayctl queue      (from this directory it finds {rel}/relayd.toml)
Elsewhere: export RELAYD_CONFIG={root}/relayd.toml
(swaks needs libnet-ssleay-perl for --tls)
""",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
