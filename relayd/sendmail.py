"""relayd-sendmail: the ``/usr/sbin/sendmail`` that cron, PHP and friends expect (SPEC §9).

Reads one message on standard input and hands it to the running daemon over
the ``[local] socket``; exits 0 only once the daemon answers that the
message is durably queued, 75 (EX_TEMPFAIL) when the daemon is not running
or asks to try later, so the caller keeps the message and nothing is lost.
Invoked as ``mailq`` (or with ``-bp``) it lists the queue like relayctl.

Line ends are made CRLF here, and lines over 998 octets are broken, so that
the daemon's strict checks (which refuse such input from the network) never
refuse an ordinary script's output.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import tomllib
from dataclasses import dataclass, field
from email.utils import getaddresses
from pathlib import Path

from relayd.local.server import MAGIC

EX_OK = 0
EX_USAGE = 64
EX_DATAERR = 65
EX_SOFTWARE = 70
EX_TEMPFAIL = 75
EX_NOPERM = 77
DEFAULT_CONFIG = "/etc/relayd.toml"
DEFAULT_SOCKET = "/run/relayd/sendmail.sock"
MAX_INPUT = 1 << 30  # what is read from stdin at most; the daemon's size limit is lower
MAX_LINE = 998
REPLY_TIMEOUT = 600.0
# Flags taken and ignored, as Postfix's sendmail does (delivery mode, error mode, verbosity).
_IGNORED = {"-v", "-n", "-U", "-m", "-Am", "-Ac", "-G", "-bm"}
_IGNORED_WITH_VALUE = {"-N", "-R", "-V", "-B", "-L", "-X", "-h", "-O"}


class UsageError(Exception):
    pass


@dataclass
class Options:
    extract: bool = False  # -t
    sender: str | None = None  # -f
    full_name: str | None = None  # -F
    dots_end: bool = True  # without -i/-oi a lone "." ends the message
    list_queue: bool = False  # -bp, or invoked as mailq
    config: str | None = None  # -C
    recipients: list[str] = field(default_factory=list)


def parse_args(argv: list[str]) -> Options:
    """sendmail's flags: single letters, values attached (-fADDR) or separate (-f ADDR)."""
    opts = Options()
    args = iter(argv)
    for arg in args:
        if arg == "--":
            opts.recipients.extend(args)
            break
        if not arg.startswith("-") or arg == "-":
            opts.recipients.append(arg)
        elif arg == "-t":
            opts.extract = True
        elif arg in ("-i", "-oi"):
            opts.dots_end = False
        elif arg == "-bp":
            opts.list_queue = True
        elif arg[:2] in ("-f", "-r", "-F", "-C"):
            value = arg[2:] or next(args, None)
            if value is None:
                raise UsageError(f"option {arg} needs a value")
            _set(opts, arg[1], value)
        elif arg in _IGNORED or arg.startswith(("-o", "-d")):
            continue
        elif arg[:2] in _IGNORED_WITH_VALUE:
            if len(arg) == 2:
                next(args, None)
        elif arg.startswith("-b"):
            raise UsageError(f"mode {arg} is not supported (only -bm and -bp)")
        else:
            raise UsageError(f"unknown option {arg}")
    return opts


def _set(opts: Options, letter: str, value: str) -> None:
    if letter in "fr":
        opts.sender = "" if value == "<>" else value.strip("<>")
    elif letter == "F":
        opts.full_name = value
    else:
        opts.config = value


def normalize(raw: bytes, dots_end: bool) -> bytes:
    """CRLF line ends, the message cut at a lone "." unless -i, no line over 998 octets."""
    out: list[bytes] = []
    for line in raw.splitlines():
        if dots_end and line == b".":
            break
        while len(line) > MAX_LINE:
            out.append(line[:MAX_LINE])
            line = line[MAX_LINE:]
        out.append(line)
    return b"".join(line + b"\r\n" for line in out)


def header_recipients(message: bytes) -> tuple[list[str], bytes]:
    """-t: the To/Cc/Bcc addresses, and the message with its Bcc: fields removed."""
    end = message.find(b"\r\n\r\n")
    head, rest = (message[: end + 2], message[end + 2 :]) if end >= 0 else (message, b"")
    values: list[str] = []
    kept: list[bytes] = []
    current: str | None = None
    for line in head.split(b"\r\n")[:-1] if head else []:
        if line[:1] in (b" ", b"\t") and current is not None:
            if current in ("to", "cc", "bcc"):
                values[-1] += " " + line.strip().decode("utf-8", "replace")
            if current != "bcc":
                kept.append(line)
            continue
        name, colon, value = line.partition(b":")
        current = name.strip().lower().decode("ascii", "replace") if colon else None
        if current in ("to", "cc", "bcc"):
            values.append(value.strip().decode("utf-8", "replace"))
        if current != "bcc":
            kept.append(line)
    addresses = [addr for _, addr in getaddresses(values) if addr]
    new_head = b"".join(line + b"\r\n" for line in kept)
    return addresses, new_head + rest


def socket_path(config: str | None) -> str:
    """``[local] socket`` from the config when it can be read (-C, $RELAYD_CONFIG, /etc)."""
    path = config or os.environ.get("RELAYD_CONFIG") or DEFAULT_CONFIG
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError):
        if config is not None:
            raise UsageError(f"cannot read the config file {config}") from None
        return DEFAULT_SOCKET  # /etc/relayd.toml is not for every user to read
    local = data.get("local", {})
    value = local.get("socket", DEFAULT_SOCKET) if isinstance(local, dict) else DEFAULT_SOCKET
    if not value:
        raise UsageError(f"{path}: [local] socket is off: the daemon takes no local mail")
    return str(Path(path).parent / value) if not os.path.isabs(value) else str(value)


def submit(path: str, opts: Options, recipients: list[str], message: bytes) -> tuple[int, str]:
    """Hand the message to the daemon: (exit status, what to tell the user)."""
    request = {
        "sender": opts.sender,
        "recipients": recipients,
        "full_name": opts.full_name,
        "size": len(message),
    }
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(REPLY_TIMEOUT)
    try:
        try:
            sock.connect(path)
        except (FileNotFoundError, ConnectionRefusedError):
            return EX_TEMPFAIL, f"relayd is not running (no {path}); the message was not sent"
        except PermissionError:
            return EX_NOPERM, f"permission denied on {path}"
        sock.sendall(MAGIC + json.dumps(request).encode() + b"\n")
        sock.sendall(message)
        reply = _read_line(sock)
    except OSError as exc:
        return EX_TEMPFAIL, f"relayd did not answer ({exc}); the message was not sent"
    finally:
        sock.close()
    return _status(reply), reply


def _read_line(sock: socket.socket) -> str:
    data = b""
    while not data.endswith(b"\r\n") and len(data) < 4096:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data.decode("utf-8", "replace").strip()


def _status(reply: str) -> int:
    if reply.startswith("2"):
        return EX_OK
    if reply.startswith("4") or not reply:
        return EX_TEMPFAIL
    if reply[:3] in ("501", "552", "554"):
        return EX_DATAERR
    return EX_SOFTWARE


def _list_queue(opts: Options) -> int:
    from relayd import ctl

    return ctl.main([*(["--config", opts.config] if opts.config else []), "queue"])


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    try:
        opts = parse_args(args)
        if opts.list_queue or os.path.basename(sys.argv[0]) == "mailq":
            return _list_queue(opts)
        path = socket_path(opts.config)
    except UsageError as exc:
        print(f"sendmail: {exc}", file=sys.stderr)
        return EX_USAGE
    raw = sys.stdin.buffer.read(MAX_INPUT + 1)
    if len(raw) > MAX_INPUT:
        print("sendmail: message too large", file=sys.stderr)
        return EX_DATAERR
    message = normalize(raw, opts.dots_end)
    recipients = list(opts.recipients)
    if opts.extract:
        found, message = header_recipients(message)
        recipients += found
    if not recipients:
        print("sendmail: no recipients (give addresses, or -t)", file=sys.stderr)
        return EX_USAGE
    status, text = submit(path, opts, recipients, message)
    if status != EX_OK:
        print(f"sendmail: {text}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
