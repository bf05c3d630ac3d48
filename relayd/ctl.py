"""``relayctl``: look at and steer a running relayd, in postqueue/smtpctl habits.

Listings work with the daemon stopped (they read the spool and say
"offline"); changes to the queue go through the daemon's control socket so
its scheduler stays the only writer. Exit statuses: 0 done, 1 the
operation failed, 2 usage error, 3 daemon not reachable.

relayctl needs only a few paths from the config (the socket, the spool, the
users file). When the file on disk no longer loads, those are still read
from it as written: an operator who broke the config must still be able to
ask the running daemon for its status and queue, and ``relayctl reload``
must reach the daemon so that it, not relayctl, reports what is wrong while
it keeps running on the previous config.
"""

from __future__ import annotations

import argparse
import base64
import getpass
import json
import os
import socket
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from relayd import __version__, ctl_admin, ctl_suppression
from relayd.cli import config_path
from relayd.config import (
    AuthConfig,
    Config,
    ConfigError,
    ControlConfig,
    SpoolConfig,
    load_config,
)
from relayd.escape import printable
from relayd.spool.model import Envelope
from relayd.units import format_duration, format_size

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3

# Ids per request: a `queue --json | jq | relayctl queue delete -` over a big
# queue stays far below the daemon's request size limit.
IDS_PER_REQUEST = 1000
# Unknown ids named in an error message; the rest are counted.
SHOW_UNKNOWN = 10

# The keys of one message in `relayctl --json queue` (SPEC §1): fixed, so jq
# recipes and scripts can rely on them.
MESSAGE_KEYS = (
    "queue_id",
    "state",
    "arrival_time",
    "message_size",
    "sender",
    "attempts",
    "next_attempt",
    "recipients",
)


class Unreachable(Exception):
    """The daemon's control socket did not answer."""

    def __init__(self, message: str, down: bool = True) -> None:
        super().__init__(message)
        self.down = down  # nothing listens, as opposed to a daemon that does not answer


class Failed(Exception):
    """The operation failed; the message says why."""


class UsageError(Exception):
    """The command line asks for something that cannot be done as asked."""


# ---- the config ------------------------------------------------------------------


def load_ctl_config(path: Path, strict: bool) -> tuple[Config, list[str]]:
    """The config, and its problems when relayctl carries on without a valid one.

    ``strict`` commands (DKIM key generation, which needs the ``[[dkim.key]]``
    tables) need a valid config; the others fall back to the socket, spool
    and users file paths as written, so a typo elsewhere in the file does
    not lock the operator out of a running daemon.
    """
    try:
        return load_config(path), []
    except ConfigError as exc:
        fallback = None if strict else _paths_only(path)
        if fallback is None:
            raise
        return fallback, exc.problems


def _paths_only(path: Path) -> Config | None:
    """A Config holding only the paths relayctl uses, read leniently; None if unreadable."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return None
    base = path.absolute().parent

    def path_at(section: str, key: str, default: Path) -> Path | None:
        table = data.get(section, {})
        value = table.get(key, default) if isinstance(table, dict) else default
        if isinstance(value, Path):
            return value
        if not isinstance(value, str) or not value or "\0" in value:
            return None
        found = Path(value)
        return found if found.is_absolute() else base / found

    socket_path = path_at("control", "socket", ControlConfig.socket)
    spool = path_at("spool", "path", SpoolConfig.path)
    users = path_at("auth", "users_file", AuthConfig.users_file)
    if socket_path is None or spool is None or users is None:
        return None
    hostname = data.get("hostname")
    return Config(
        hostname=hostname if isinstance(hostname, str) else "",
        control=ControlConfig(socket=socket_path),
        spool=SpoolConfig(path=spool),
        auth=AuthConfig(users_file=users),
        source=path,
    )


# ---- talking to the daemon ---------------------------------------------------


def request(config: Config, cmd: str, timeout: float = 30.0, **fields: Any) -> dict[str, Any]:
    """One request over the control socket and its answer (one JSON line each way)."""
    where = config.control.socket
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(str(where))
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise Unreachable(f"relayd is not running (no answer on {where})") from exc
        except PermissionError as exc:
            raise Failed(
                f"cannot use {where}: permission denied "
                "(run as root or a member of the relayd group)"
            ) from exc
        sock.sendall(json.dumps({"cmd": cmd, **fields}).encode() + b"\n")
        chunks: list[bytes] = []
        while not chunks or not chunks[-1].endswith(b"\n"):
            chunk = sock.recv(1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
    except TimeoutError as exc:
        raise Unreachable(f"relayd did not answer on {where} within {timeout:g}s", False) from exc
    except OSError as exc:
        raise Unreachable(f"cannot reach relayd on {where}: {exc.strerror or exc}", False) from exc
    finally:
        sock.close()
    try:
        reply = json.loads(b"".join(chunks))
    except ValueError:
        reply = None
    if not isinstance(reply, dict):
        raise Unreachable(f"relayd sent no or a malformed answer on {where}", False)
    return reply


def checked(reply: dict[str, Any]) -> dict[str, Any]:
    if not reply.get("ok"):
        raise Failed(str(reply.get("error") or "operation failed"))
    return reply


# ---- the queue ------------------------------------------------------------------


def queue_envelopes(config: Config) -> tuple[bool, list[Envelope]]:
    """(online, envelopes): from the daemon, or read from the spool when it is down."""
    try:
        reply = checked(request(config, "queue"))
    except Unreachable as exc:
        if not exc.down:
            raise
    else:
        return True, [Envelope.from_dict(d) for d in reply["messages"]]
    from relayd.spool.store import Spool

    try:
        return False, Spool(config.spool.path).scan()
    except OSError as exc:
        raise Failed(
            f"relayd is not running and the spool {config.spool.path} cannot be read: "
            f"{exc.strerror or exc}"
        ) from exc


def message_json(env: Envelope) -> dict[str, Any]:
    """One message in the shape of Postfix's ``postqueue -j`` where meanings match.

    ``next_attempt`` is always a Unix time, also for a held message (the
    time it keeps for when it is released) and a new one (due since it
    arrived), so a consumer never meets a second type.
    """
    return {
        "queue_id": env.queue_id,
        "state": env.state,
        "queue_name": _QUEUE_NAME[env.state],  # postqueue -j's own word for it
        "arrival_time": int(env.arrival_time),
        "message_size": env.size,
        "sender": env.sender,
        "attempts": env.attempts,
        "next_attempt": int(env.next_attempt or env.arrival_time),
        "recipients": [
            {"address": r.address, "status": r.status, "delay_reason": r.reply} for r in env.pending
        ],
    }


_QUEUE_NAME = {"active": "active", "deferred": "deferred", "held": "hold"}

_COLUMNS = (
    ("QUEUE-ID", "<"),
    ("SIZE", ">"),
    ("AGE", ">"),
    ("STATE", "<"),
    ("TRIES", ">"),
    ("NEXT", "<"),
)
_GAP = "  "


def queue_table(envelopes: list[Envelope], online: bool, now: float) -> str:
    """The human listing: columns as wide as their widest cell, recipients under the sender.

    The sender/recipients column comes last, so a long address never pushes
    another column out of line.
    """
    rows = [
        (
            env.queue_id,
            format_size(env.size),
            format_duration(max(0.0, now - env.arrival_time)),
            env.state,
            str(env.attempts),
            _next_cell(env, now),
        )
        for env in envelopes
    ]
    widths = [
        max([len(title), *(len(row[i]) for row in rows)]) for i, (title, _) in enumerate(_COLUMNS)
    ]

    def line(cells: tuple[str, ...]) -> str:
        return _GAP.join(
            f"{cell:{align}{width}}"
            for cell, (_, align), width in zip(cells, _COLUMNS, widths, strict=True)
        )

    indent = " " * (sum(widths) + len(_GAP) * len(widths))
    lines = [line(tuple(title for title, _ in _COLUMNS)) + _GAP + "SENDER / RECIPIENTS"]
    for env, row in zip(envelopes, rows, strict=True):
        lines.append(line(row) + _GAP + printable(env.sender or "<>"))
        for r in env.pending:
            reason = ""
            if r.reply:
                where = f", {printable(r.remote_host)}" if r.remote_host else ""
                reason = f"  ({_one_line(r.reply)}{where})"
            lines.append(f"{indent}{printable(r.address)}{reason}")
    lines.append(_queue_summary(envelopes, online))
    return "\n".join(lines)


def _next_cell(env: Envelope, now: float) -> str:
    if env.state == "held":
        return "-"
    if env.next_attempt <= now:
        return "now"
    return format_duration(env.next_attempt - now)


def _one_line(text: str) -> str:
    """A reply on one line: the lines of a multi-line reply joined, the rest escaped.

    A remote server chooses every byte of its reply; an ESC sequence printed
    raw would rewrite the operator's terminal, so anything but printable
    ASCII is shown escaped (relayd.escape), never written.
    """
    lines = text.replace("\r\n", "\n").split("\n")
    return " ".join(printable(line).strip() for line in lines if line.strip())


def _queue_summary(envelopes: list[Envelope], online: bool) -> str:
    states = {s: sum(1 for e in envelopes if e.state == s) for s in ("active", "deferred", "held")}
    total = format_size(sum(e.size for e in envelopes))
    n = len(envelopes)
    tail = "" if online else " (offline: relayd is not running; read from the spool)"
    return (
        f"-- {n} message{'s' if n != 1 else ''}, {total}; {states['active']} active, "
        f"{states['deferred']} deferred, {states['held']} held{tail}"
    )


def cmd_queue_list(args: argparse.Namespace, config: Config) -> int:
    online, envelopes = queue_envelopes(config)
    if args.json:
        print(json.dumps({"online": online, "messages": [message_json(e) for e in envelopes]}))
    else:
        print(queue_table(envelopes, online, time.time()))
    return EXIT_OK


def cmd_queue_show(args: argparse.Namespace, config: Config) -> int:
    online, env, data = _one_message(config, args.id)
    if args.raw:
        sys.stdout.buffer.write(data)
        return EXIT_OK
    if args.json:
        doc = message_json(env) | {
            "online": online,
            "history": [a.__dict__ for a in env.history],
            "all_recipients": [r.__dict__ for r in env.recipients],
        }
        print(json.dumps(doc))
        return EXIT_OK
    print(show_text(env, data, online, time.time()))
    return EXIT_OK


def _one_message(config: Config, qid: str) -> tuple[bool, Envelope, bytes]:
    """(online, envelope, message bytes): from the daemon, or from the spool when it is down."""
    try:
        reply = request(config, "show", ids=[qid])
    except Unreachable as exc:
        if not exc.down:
            raise
    else:
        if reply.get("unknown"):
            raise Failed(f"unknown queue id: {qid}")
        checked(reply)
        return True, Envelope.from_dict(reply["message"]), base64.b64decode(reply["data"])
    from relayd.spool.store import Spool

    spool = Spool(config.spool.path)
    try:
        return False, spool.load(qid), spool.read_data(qid)
    except KeyError:
        raise Failed(f"unknown queue id: {qid}") from None
    except (OSError, ValueError) as exc:
        raise Failed(
            f"relayd is not running and {qid} cannot be read from the spool: {exc}"
        ) from exc


def _when(stamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S %z", time.localtime(stamp))


def show_text(env: Envelope, data: bytes, online: bool, now: float) -> str:
    """``queue show``: envelope, recipients, the attempts in order, the headers."""
    if env.state == "held":
        nxt = "held (relayctl queue release to deliver)"
    elif env.next_attempt <= now:
        nxt = "now"
    else:
        nxt = f"{_when(env.next_attempt)} (in {format_duration(env.next_attempt - now)})"
    out = [
        f"Queue ID:     {printable(env.queue_id)}",
        f"State:        {env.state}" + ("" if online else " (offline: read from the spool)"),
        f"Arrived:      {_when(env.arrival_time)} "
        f"({format_duration(max(0.0, now - env.arrival_time))} ago)",
        f"Size:         {env.size} bytes",
        f"Sender:       <{printable(env.sender)}>",
        f"Client:       {printable(env.client_ip or '-')} (helo {printable(env.helo or '-')}, "
        f"listener {printable(env.listener or '-')}, user {printable(env.sasl_username or '-')})",
        f"Attempts:     {env.attempts}",
        f"Next attempt: {nxt}",
        "",
        "Recipients:",
    ]
    width = max((len(printable(r.address)) for r in env.recipients), default=0)
    status_width = max((len(r.status) for r in env.recipients), default=0)
    for r in env.recipients:
        detail = f"  {printable(r.dsn)} {_one_line(r.reply)}".rstrip() if r.reply or r.dsn else ""
        address = printable(r.address)
        out.append(f"  {address:<{width}}  {r.status:<{status_width}}{detail}".rstrip())
    out += ["", "Delivery attempts:"]
    for a in env.history:
        hop = f"{a.host}[{a.address}]:{a.port}" if a.address else (a.host or "(none)")
        policy = ""
        if a.tls_policy:
            verified = "yes" if a.tls_verified else "no"
            policy = f"  policy={printable(a.tls_policy)} verified={verified}"
        out.append(
            f"  {_when(a.time)}  {printable(hop)}  tls={printable(a.tls or 'none')}{policy}  "
            f"{a.duration:.2f}s  {printable(f'{a.status} {a.dsn}')}: {_one_line(a.reply)}"
        )
        out.append(f"      for {printable(', '.join(a.recipients))}")
    if not env.history:
        out.append("  (none yet)")
    from relayd.smtpd.headers import header_block

    out += ["", "Headers:", *_header_lines(header_block(data))]
    return "\n".join(out)


def _header_lines(block: bytes) -> list[str]:
    """The header block line by line, each escaped: its bytes are the sender's choice."""
    return [printable(line.rstrip(b"\r")) for line in block.rstrip(b"\r\n").split(b"\n")]


def _ids(args: argparse.Namespace) -> tuple[list[str], bool]:
    """Queue ids from the command line, and whether any came from stdin.

    ``-`` reads whitespace-separated ids from stdin (the postsuper habit), so
    ``relayctl --json queue | jq -r ... | relayctl queue delete -`` works.
    """
    ids: list[str] = []
    from_stdin = False
    for item in args.ids:
        if item == "-":
            if not from_stdin:
                ids += sys.stdin.read().split()
            from_stdin = True
        else:
            ids.append(item)
    return list(dict.fromkeys(ids)), from_stdin


def _batches(ids: list[str]) -> Iterator[list[str]]:
    for start in range(0, len(ids), IDS_PER_REQUEST):
        yield ids[start : start + IDS_PER_REQUEST]


_DONE = {
    "flush": "flushed (retried now)",
    "delete": "deleted",
    "hold": "placed on hold",
    "release": "released from hold",
    "bounce": "returned to the sender",
}


def cmd_queue_change(args: argparse.Namespace, config: Config) -> int:
    action: str = args.action
    everything = bool(getattr(args, "all", False))
    ids, from_stdin = _ids(args)
    domain = getattr(args, "domain", None)
    if everything and ids:
        raise UsageError(f"relayctl queue {action}: give queue ids or --all, not both")
    if domain and ids:
        raise UsageError("relayctl queue flush: give queue ids or --domain, not both")
    if domain:
        reply = request(config, action, ids=[], domain=domain.lower().rstrip("."))
        if not reply.get("ok"):
            raise Failed(str(reply.get("error") or f"{action} failed"))
        done = int(reply.get("done") or 0)
        plural = "s" if done != 1 else ""
        print(
            json.dumps(reply)
            if args.json
            else f"relayd: {done} message{plural} for {domain} {_DONE[action]}"
        )
        return EXIT_OK
    if not ids and not everything:
        if from_stdin:
            # An empty selection from a pipeline: nothing to do, as with postsuper.
            print("relayctl: no queue ids on stdin; nothing done", file=sys.stderr)
            return EXIT_OK
        if action != "flush":
            raise UsageError(
                f"relayctl queue {action}: give one or more queue ids, - to read them from stdin"
                + (", or --all" if action in _TAKES_ALL else "")
            )
    replies: list[dict[str, Any]] = []
    if everything or not ids:  # --all, or flush everything deferred
        replies.append(request(config, action, ids=[], **({"all": True} if everything else {})))
    else:
        for batch in _batches(ids):
            replies.append(request(config, action, ids=batch))
    unknown = [str(q) for reply in replies for q in reply.get("unknown") or []]
    failures = [r for r in replies if not r.get("ok") and not r.get("unknown")]
    if args.json:
        print(
            json.dumps({"ok": not unknown and not failures, "action": action, "unknown": unknown})
        )
    if failures:
        raise Failed(str(failures[0].get("error") or f"{action} failed"))
    if not args.json:
        if ids:
            done = len(ids) - len(unknown)
            if done or not unknown:
                print(f"relayd: {done} message{'s' if done != 1 else ''} {_DONE[action]}")
        elif everything:
            done = sum(int(r.get("done") or 0) for r in replies)
            print(f"relayd: {done} message{'s' if done != 1 else ''} {_DONE[action]}")
        else:
            print("relayd: queue flushed; deferred messages are retried now")
    if unknown:
        shown = ", ".join(unknown[:SHOW_UNKNOWN])
        more = f" and {len(unknown) - SHOW_UNKNOWN} more" if len(unknown) > SHOW_UNKNOWN else ""
        raise Failed(f"unknown queue id{'s' if len(unknown) != 1 else ''}: {shown}{more}")
    return EXIT_OK


# ---- status and reload ----------------------------------------------------------


def cmd_status(args: argparse.Namespace, config: Config) -> int:
    try:
        reply = checked(request(config, "status", timeout=10))
    except Unreachable as exc:
        if args.json:
            print(json.dumps({"running": False, "error": str(exc)}))
        elif exc.down:
            print("relayd: not running")
        else:
            print(f"relayd: not responding ({exc})")
        return EXIT_UNREACHABLE
    if args.json:
        print(json.dumps(reply))
        return EXIT_OK
    queue = reply.get("queue", {})
    print(
        f"relayd {reply.get('version')}: running (pid {reply.get('pid')}), up "
        f"{format_duration(float(reply.get('uptime', 0)))}"
    )
    print(f"config:      {reply.get('config')}")
    for name in reply.get("listeners", []):
        print(f"listener:    {name}")
    print(
        "queue:       "
        + ", ".join(f"{queue.get(s, 0)} {s}" for s in ("active", "deferred", "held"))
    )
    if reply.get("paused"):
        print("delivery:    PAUSED (relayctl delivery resume)")
    print(
        f"since start: {reply.get('accepted', 0)} accepted, {reply.get('delivered', 0)} delivered, "
        f"{reply.get('deferred', 0)} deferred, {reply.get('bounced', 0)} bounced"
    )
    return EXIT_OK


def cmd_reload(args: argparse.Namespace, config: Config) -> int:
    reply = request(config, "reload", timeout=60)
    if args.json:
        print(json.dumps(reply))
    if not reply.get("ok"):
        problems = reply.get("problems") or str(reply.get("error") or "reload failed").splitlines()
        print(
            "relayctl: reload failed; relayd keeps running on its previous configuration:",
            file=sys.stderr,
        )
        for line in problems:
            print(line, file=sys.stderr)
        return EXIT_FAILED
    if not args.json:
        print("relayd: configuration reloaded")
    return EXIT_OK


# ---- users and DKIM -----------------------------------------------------------------


def _prompt(text: str) -> str:
    """getpass on the terminal; without one, say how to pass the password instead.

    getpass would otherwise fall back to reading stdin with a warning, or
    block on a terminal the caller cannot see.
    """
    try:
        fd = os.open("/dev/tty", os.O_RDWR | os.O_NOCTTY)
    except OSError:
        raise UsageError(
            "no terminal to ask for the password on; pipe it in with --password-stdin"
        ) from None
    os.close(fd)
    try:
        return getpass.getpass(text)
    except EOFError:
        raise Failed("no password given") from None


def cmd_user(args: argparse.Namespace, config: Config) -> int:
    from relayd import users

    path = config.auth.users_file
    try:
        if args.user_action == "add":
            password = users.read_password(args.password_stdin, prompt=_prompt)
            _warn_if_short(password)
            note = users.cmd_user_add(path, args.name, password, args.allow_from or [])
            print(f"relayd: user {args.name} added to {path}")
            if note:
                print(f"relayctl: warning: {note}", file=sys.stderr)
        elif args.user_action == "passwd":
            password = users.read_password(args.password_stdin, prompt=_prompt)
            _warn_if_short(password)
            users.cmd_user_passwd(path, args.name, password)
            print(f"relayd: password changed for {args.name}")
        elif args.user_action == "del":
            users.cmd_user_del(path, args.name)
            print(f"relayd: user {args.name} deleted")
        else:
            _print_users(users.cmd_user_list(path), args.json, set(users.cmd_user_legacy(path)))
    except users.UserError as exc:
        raise Failed(str(exc)) from exc
    except OSError as exc:
        raise Failed(f"{path}: {exc.strerror or exc}") from exc
    return EXIT_OK


MIN_PASSWORD = 12


def _warn_if_short(password: str) -> None:
    """Accepted, but said: app passwords are typed once, so there is no excuse for short ones."""
    if len(password) < MIN_PASSWORD:
        print(
            f"relayctl: warning: the password is shorter than {MIN_PASSWORD} characters; "
            "a random one resists guessing (e.g. openssl rand -base64 18)",
            file=sys.stderr,
        )


def _print_users(listing: list[Any], as_json: bool, legacy: set[str] | None = None) -> None:
    """Users and their senders; ``legacy`` names those still on a scrypt hash."""
    legacy = legacy or set()
    if as_json:
        print(
            json.dumps(
                {
                    "users": [
                        {
                            "name": u.name,
                            "allow_from": list(u.allow_from),
                            "hash": "scrypt" if u.name in legacy else "argon2id",
                        }
                        for u in listing
                    ]
                }
            )
        )
        return
    width = max([len("USER"), *(len(printable(u.name)) for u in listing)])
    print(f"{'USER':<{width}}  ALLOWED SENDERS")
    for u in listing:
        owned = [u.name] if "@" in u.name else []
        senders = printable(", ".join(owned + list(u.allow_from)) or "-")
        note = "  (old scrypt hash: run relayctl user passwd)" if u.name in legacy else ""
        print(f"{printable(u.name):<{width}}  {senders}{note}")


def dkim_key_path(config: Config, domain: str, selector: str) -> tuple[Path, bool]:
    """Where the key for ``domain``/``selector`` is: as configured, else keygen's default."""
    for key in config.dkim.keys:
        if key.domain == domain and key.selector == selector:
            return key.key_file, True
    return config.auth.users_file.parent / "dkim" / f"{domain}.{selector}.key", False


def cmd_dkim_keygen(args: argparse.Namespace, config: Config) -> int:
    from relayd import dkim

    domain, selector = args.domain.lower().rstrip("."), args.selector
    path, configured = dkim_key_path(config, domain, selector)
    try:
        path.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
        record = dkim.keygen(
            path, domain, selector, kind=args.type, bits=args.bits, force=args.force
        )
    except FileExistsError as exc:
        raise Failed(f"{exc} (use --force to replace it)") from exc
    except ValueError as exc:
        raise Failed(str(exc)) from exc
    except OSError as exc:
        raise Failed(f"{path}: cannot write the key: {exc.strerror or exc}") from exc
    if args.json:
        print(
            json.dumps(
                {"domain": domain, "selector": selector, "key_file": str(path), "record": record}
            )
        )
        return EXIT_OK
    print(f"; private key written to {path} (mode 0600)")
    if not configured:
        print(
            f'; add to {config.source}:\n;   [[dkim.key]]\n;   domain = "{domain}"\n'
            f';   selector = "{selector}"\n;   key_file = "{path}"'
        )
    print("; publish this DNS record:")
    print(record)
    return EXIT_OK


def cmd_doctor(args: argparse.Namespace, config: Config) -> int:
    from relayd import doctor

    if not doctor.plan(config, args.domains).domains:
        raise UsageError(
            "no domain to check: name one (relayctl doctor example.com), or configure "
            "[relay] domains or [[dkim.key]]"
        )
    checks = doctor.run(config, args.domains)
    if args.json:
        print(json.dumps(doctor.report_json(checks)))
    else:
        print("\n".join(doctor.report_lines(checks)))
    return EXIT_OK if all(c.status != "fail" for c in checks) else EXIT_FAILED


# ---- argument parsing ---------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    # --config and --json are accepted before and after the command
    # (`relayctl --json queue` and `relayctl queue --json`); SUPPRESS keeps a
    # subcommand's parser from resetting what the main parser already set.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config",
        metavar="PATH",
        default=argparse.SUPPRESS,
        help="config file (default /etc/relayd.toml or $RELAYD_CONFIG)",
    )
    common.add_argument(
        "--json",
        action="store_true",
        default=argparse.SUPPRESS,
        help="one JSON document instead of a table",
    )
    p = argparse.ArgumentParser(
        prog="relayctl", parents=[common], description="operate a relayd mail relay"
    )
    p.add_argument("--version", action="version", version=f"relayctl {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _queue_parser(sub, common)
    sub.add_parser("status", parents=[common], help="is relayd up, its listeners and queue")
    sub.add_parser("reload", parents=[common], help="reload config, certificates, users, keys")
    _user_parser(sub, common)
    dk = sub.add_parser("dkim", parents=[common], help="DKIM keys")
    dks = dk.add_subparsers(dest="dkim_action", required=True, metavar="ACTION")
    kg = dks.add_parser("keygen", parents=[common], help="write a new key, print its DNS record")
    kg.add_argument("domain")
    kg.add_argument("selector")
    kg.add_argument("--type", choices=["rsa", "ed25519"], default="rsa")
    kg.add_argument("--bits", type=int, default=2048)
    kg.add_argument("--force", action="store_true", help="overwrite an existing key")
    ctl_admin.add_dkim_parsers(dks, common)
    ctl_admin.add_parsers(sub, common)
    doc = sub.add_parser(
        "doctor", parents=[common], help="check DNS, certificate and blocklists (no daemon needed)"
    )
    doc.add_argument(
        "domains",
        nargs="*",
        metavar="DOMAIN",
        help="domains to check (default: those relayd signs for or serves)",
    )
    ctl_suppression.add_parsers(sub, common)
    return p


_TAKES_ALL = ("delete", "hold", "release")


def _queue_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    q = sub.add_parser("queue", parents=[common], help="list and manage the queue")
    qs = q.add_subparsers(dest="action", metavar="ACTION")
    qs.add_parser("list", parents=[common], help="one row per queued message (default)")
    show = qs.add_parser("show", parents=[common], help="one message in detail")
    show.add_argument("id")
    show.add_argument("--raw", action="store_true", help="print the stored message")
    for action, text in (
        ("flush", "retry now (all deferred, or the given ids)"),
        ("delete", "remove from the queue without a bounce"),
        ("hold", "keep from delivery"),
        ("release", "put held messages back"),
        ("bounce", "fail now, with a bounce to the sender"),
    ):
        a = qs.add_parser(action, parents=[common], help=text)
        a.add_argument("ids", nargs="*", metavar="ID", help="queue ids; - reads them from stdin")
        if action in _TAKES_ALL:
            a.add_argument("--all", action="store_true", help="every queued message")
        if action == "flush":
            a.add_argument("--domain", help="only messages with recipients at this domain")


def _user_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    u = sub.add_parser("user", parents=[common], help="manage submission users")
    us = u.add_subparsers(dest="user_action", required=True, metavar="ACTION")
    add = us.add_parser("add", parents=[common], help="add a user")
    add.add_argument("name")
    add.add_argument(
        "--allow-from",
        action="append",
        metavar="PATTERN",
        help="sender addresses this user may use, e.g. '*@example.com' (repeatable)",
    )
    add.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    pw = us.add_parser("passwd", parents=[common], help="change a user's password")
    pw.add_argument("name")
    pw.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    rm = us.add_parser("del", parents=[common], help="delete a user")
    rm.add_argument("name")
    us.add_parser("list", parents=[common], help="list users")
    ctl_admin.add_user_parsers(us, common)


def dispatch(args: argparse.Namespace, config: Config) -> int:
    if args.command == "queue":
        action = args.action or "list"
        if action == "list":
            return cmd_queue_list(args, config)
        if action == "show":
            return cmd_queue_show(args, config)
        args.action = action
        return cmd_queue_change(args, config)
    if args.command == "status":
        return cmd_status(args, config)
    if args.command == "reload":
        return cmd_reload(args, config)
    if args.command == "user":
        if args.user_action == "test":
            return ctl_admin.cmd_user_test(args, config)
        if args.user_action == "token":
            return ctl_admin.cmd_user_token(args, config)
        return cmd_user(args, config)
    if args.command == "delivery":
        return ctl_admin.cmd_delivery(args, config)
    if args.command == "config":
        return ctl_admin.cmd_config(args, config)
    if args.command == "doctor":
        return cmd_doctor(args, config)
    if args.command == "suppression":
        return ctl_suppression.cmd_suppression(args, config)
    if args.dkim_action == "show":
        return ctl_admin.cmd_dkim_show(args, config)
    return cmd_dkim_keygen(args, config)


def _local_problem(line: str) -> str:
    """A config problem found by relayctl itself, named as relayctl's."""
    return "relayctl: " + line.removeprefix("relayd: ")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.json = getattr(args, "json", False)
    path = config_path(getattr(args, "config", None))
    try:
        config, problems = load_ctl_config(path, strict=args.command in ("dkim", "doctor"))
    except ConfigError as exc:
        for line in exc.problems:
            print(_local_problem(line), file=sys.stderr)
        if args.command != "status":
            return EXIT_FAILED
        # status still answers "not running" (exit 3) when there is no config
        # to read: it looks for the daemon at the default socket.
        config, problems = Config(hostname="localhost", source=path), []
    if problems and args.command != "reload":  # reload: the daemon reports them itself
        print(
            f"relayctl: warning: {path} does not load ({len(problems)} problem"
            f"{'s' if len(problems) != 1 else ''}; `relayd --check-config` lists them); "
            "using the socket, spool and users file it names",
            file=sys.stderr,
        )
    try:
        code = dispatch(args, config)
        sys.stdout.flush()
        return code
    except UsageError as exc:
        print(f"relayctl: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except Unreachable as exc:
        print(f"relayctl: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except Failed as exc:
        print(f"relayctl: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except BrokenPipeError:
        # The reader went away (`relayctl queue | head`): not worth a traceback.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_FAILED
    except KeyboardInterrupt:
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
