"""``relayctl``: look at and steer a running relayd, in postqueue/smtpctl habits.

Listings work with the daemon stopped (they read the spool and say
"offline"); changes to the queue go through the daemon's control socket so
its scheduler stays the only writer. Exit statuses: 0 done, 1 the
operation failed, 2 usage error, 3 daemon not reachable.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time
from typing import Any

from relayd import __version__
from relayd.cli import config_path
from relayd.config import Config, ConfigError, load_config
from relayd.spool.model import Envelope
from relayd.units import format_duration, format_size

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3


class Unreachable(Exception):
    """The daemon's control socket did not answer."""


class Failed(Exception):
    """The operation failed; the message says why."""


# ---- talking to the daemon ---------------------------------------------------


def request(config: Config, cmd: str, timeout: float = 30.0, **fields: Any) -> dict[str, Any]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(str(config.control.socket))
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise Unreachable(
                f"relayd is not running (no answer on {config.control.socket})"
            ) from exc
        except PermissionError as exc:
            raise Failed(
                f"cannot use {config.control.socket}: permission denied "
                "(run as root or a member of the relayd group)"
            ) from exc
        sock.sendall(json.dumps({"cmd": cmd, **fields}).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    except TimeoutError as exc:
        raise Unreachable(f"relayd did not answer on {config.control.socket}") from exc
    finally:
        sock.close()
    try:
        reply: dict[str, Any] = json.loads(data)
    except ValueError as exc:
        raise Unreachable("relayd sent a malformed answer") from exc
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
        return True, [Envelope.from_dict(d) for d in reply["messages"]]
    except Unreachable:
        from relayd.spool.store import Spool

        if not config.spool.path.exists():
            return False, []
        return False, Spool(config.spool.path).scan()


def message_json(env: Envelope) -> dict[str, Any]:
    """One message in the shape of Postfix's ``postqueue -j`` where meanings match."""
    return {
        "queue_id": env.queue_id,
        "queue_name": env.state,
        "state": env.state,
        "arrival_time": int(env.arrival_time),
        "message_size": env.size,
        "sender": env.sender,
        "attempts": env.attempts,
        "next_attempt": int(env.next_attempt) if env.next_attempt else None,
        "last_error": env.last_error(),
        "recipients": [
            {"address": r.address, "status": r.status, "delay_reason": r.reply} for r in env.pending
        ],
    }


def queue_table(envelopes: list[Envelope], online: bool, now: float) -> str:
    header = (
        f"{'QUEUE-ID':<17} {'SIZE':>5} {'AGE':>4}  {'STATE':<9} {'TRIES':>5}  {'NEXT':<6} "
        "SENDER / RECIPIENTS"
    )
    lines = [header]
    indent = " " * 59
    for env in envelopes:
        nxt = (
            "-"
            if env.state == "held" or not env.next_attempt
            else ("now" if env.next_attempt <= now else format_duration(env.next_attempt - now))
        )
        lines.append(
            f"{env.queue_id:<17} {format_size(env.size):>5} "
            f"{format_duration(now - env.arrival_time):>4}  {env.state:<9} "
            f"{env.attempts:>5}  {nxt:<6} {env.sender or '<>'}"
        )
        for r in env.pending:
            reason = (
                f"  ({r.reply}{', ' + r.remote_host if r.remote_host else ''})" if r.reply else ""
            )
            lines.append(f"{indent}{r.address}{reason}")
    lines.append(_queue_summary(envelopes, online))
    return "\n".join(lines)


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
    from relayd.spool.store import Spool

    spool = Spool(config.spool.path)
    _online, envelopes = queue_envelopes(config)
    env = next((e for e in envelopes if e.queue_id == args.id), None)
    if env is None:
        raise Failed(f"unknown queue id: {args.id}")
    try:
        data = spool.read_data(env.queue_id)
    except (KeyError, OSError) as exc:
        raise Failed(f"unknown queue id: {args.id}") from exc
    if args.raw:
        sys.stdout.buffer.write(data)
        return EXIT_OK
    if args.json:
        doc = message_json(env) | {
            "history": [a.__dict__ for a in env.history],
            "all_recipients": [r.__dict__ for r in env.recipients],
        }
        print(json.dumps(doc))
        return EXIT_OK
    print(show_text(env, data))
    return EXIT_OK


def show_text(env: Envelope, data: bytes) -> str:
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(env.arrival_time))
    out = [
        f"Queue ID:   {env.queue_id}",
        f"State:      {env.state}",
        f"Arrived:    {when}",
        f"Size:       {env.size} bytes",
        f"Sender:     <{env.sender}>",
        f"Client:     {env.client_ip or '-'} (helo {env.helo or '-'}, listener "
        f"{env.listener or '-'}, user {env.sasl_username or '-'})",
        f"Attempts:   {env.attempts}",
        "",
        "Recipients:",
    ]
    for r in env.recipients:
        detail = f" {r.dsn} {r.reply}" if r.reply else ""
        out.append(f"  {r.address:<40} {r.status}{detail}")
    out += ["", "Attempts:"]
    for a in env.history:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(a.time))
        out.append(
            f"  {stamp}  {a.host}[{a.address}]:{a.port}  tls={a.tls or 'none'}  "
            f"{a.duration:.2f}s  {a.status}: {a.reply}  ({', '.join(a.recipients)})"
        )
    if not env.history:
        out.append("  (none yet)")
    from relayd.smtpd.headers import header_block

    out += ["", "Headers:", header_block(data).decode("utf-8", "replace").rstrip()]
    return "\n".join(out)


def _ids(args: argparse.Namespace) -> list[str]:
    """Queue ids from the command line; ``-`` reads them from stdin (postsuper habit)."""
    ids: list[str] = []
    for item in args.ids:
        if item == "-":
            ids += sys.stdin.read().split()
        else:
            ids.append(item)
    return ids


def cmd_queue_change(args: argparse.Namespace, config: Config) -> int:
    fields: dict[str, Any] = {"ids": _ids(args)}
    if getattr(args, "all", False):
        fields["all"] = True
    elif args.action != "flush" and not fields["ids"]:
        raise UsageError(
            f"relayctl queue {args.action}: give one or more queue ids"
            + (" or --all" if args.action == "delete" else "")
        )
    reply = request(config, args.action, **fields)
    if args.json:
        print(json.dumps(reply))
    checked(reply)
    return EXIT_OK


# ---- status and reload ----------------------------------------------------------


def cmd_status(args: argparse.Namespace, config: Config) -> int:
    try:
        reply = checked(request(config, "status", timeout=10))
    except Unreachable:
        if args.json:
            print(json.dumps({"running": False}))
        else:
            print("relayd: not running")
        return EXIT_UNREACHABLE
    if args.json:
        print(json.dumps(reply))
        return EXIT_OK
    queue = reply.get("queue", {})
    print(
        f"relayd {reply['version']}: running (pid {reply['pid']}), up "
        f"{format_duration(reply['uptime'])}"
    )
    print(f"config:     {reply.get('config')}")
    for name in reply.get("listeners", []):
        print(f"listener:   {name}")
    print(
        "queue:      " + ", ".join(f"{queue.get(s, 0)} {s}" for s in ("active", "deferred", "held"))
    )
    print(
        f"since start: {reply.get('accepted', 0)} accepted, {reply.get('delivered', 0)} delivered, "
        f"{reply.get('deferred', 0)} deferred, {reply.get('bounced', 0)} bounced"
    )
    return EXIT_OK


def cmd_reload(args: argparse.Namespace, config: Config) -> int:
    checked(request(config, "reload", timeout=60))
    if not args.json:
        print("relayd: configuration reloaded")
    else:
        print(json.dumps({"ok": True}))
    return EXIT_OK


# ---- users and DKIM -----------------------------------------------------------------


def cmd_user(args: argparse.Namespace, config: Config) -> int:
    from relayd import users

    path = config.auth.users_file
    try:
        if args.user_action == "add":
            users.cmd_user_add(
                path, args.name, users.read_password(args.password_stdin), args.allow_from or []
            )
            print(f"relayd: user {args.name} added to {path}")
        elif args.user_action == "passwd":
            users.cmd_user_passwd(path, args.name, users.read_password(args.password_stdin))
            print(f"relayd: password changed for {args.name}")
        elif args.user_action == "del":
            users.cmd_user_del(path, args.name)
            print(f"relayd: user {args.name} deleted")
        else:
            _print_users(users.cmd_user_list(path), args.json)
    except users.UserError as exc:
        raise Failed(str(exc)) from exc
    return EXIT_OK


def _print_users(listing: list[Any], as_json: bool) -> None:
    if as_json:
        print(
            json.dumps(
                {"users": [{"name": u.name, "allow_from": list(u.allow_from)} for u in listing]}
            )
        )
        return
    print(f"{'USER':<32} ALLOWED SENDERS")
    for u in listing:
        owned = [u.name] if "@" in u.name else []
        print(f"{u.name:<32} {', '.join(owned + list(u.allow_from)) or '-'}")


def cmd_dkim_keygen(args: argparse.Namespace, config: Config) -> int:
    from relayd import dkim

    domain, selector = args.domain.lower(), args.selector
    configured = [k for k in config.dkim.keys if k.domain == domain and k.selector == selector]
    path = (
        configured[0].key_file
        if configured
        else (config.auth.users_file.parent / "dkim" / f"{domain}.{selector}.key")
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        record = dkim.keygen(
            path, domain, selector, kind=args.type, bits=args.bits, force=args.force
        )
    except (FileExistsError, ValueError) as exc:
        raise Failed(str(exc)) from exc
    print(f"; private key written to {path} (mode 0600)")
    if not configured:
        print(
            f'; add to {config.source}:\n;   [[dkim.key]]\n;   domain = "{domain}"\n'
            f';   selector = "{selector}"\n;   key_file = "{path}"'
        )
    print("; publish this DNS record:")
    print(record)
    return EXIT_OK


# ---- argument parsing ---------------------------------------------------------------


class UsageError(Exception):
    pass


def build_parser() -> argparse.ArgumentParser:
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
    return p


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
    ):
        a = qs.add_parser(action, parents=[common], help=text)
        a.add_argument("ids", nargs="*", metavar="ID", help="queue ids; - reads them from stdin")
        if action == "delete":
            a.add_argument("--all", action="store_true", help="every queued message")


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
        return cmd_user(args, config)
    return cmd_dkim_keygen(args, config)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.json = getattr(args, "json", False)
    path = config_path(getattr(args, "config", None))
    try:
        config = load_config(path)
    except ConfigError as exc:
        for line in exc.problems:
            print(line, file=sys.stderr)
        return EXIT_FAILED
    try:
        return dispatch(args, config)
    except UsageError as exc:
        print(f"relayctl: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except Unreachable as exc:
        print(f"relayctl: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except Failed as exc:
        print(f"relayctl: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
