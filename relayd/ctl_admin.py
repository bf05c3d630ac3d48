"""relayctl commands Postfix and chasquid operators reach for (SPEC §9).

``delivery pause|resume`` (Postfix: ``defer_transports`` plus a flush),
``queue bounce`` (``postsuper -r`` with a bounce), ``config`` (``postconf``),
``user test`` and ``dkim show``. They live apart from relayctl's core
listing and queue commands; relayctl registers and dispatches them here.
"""

from __future__ import annotations

import argparse
import getpass
import json
import sys
from pathlib import Path
from typing import Any

from relayd.config import Config

EXIT_OK = 0
EXIT_FAILED = 1


def add_parsers(sub: Any, common: argparse.ArgumentParser) -> None:
    d = sub.add_parser("delivery", parents=[common], help="pause or resume outbound delivery")
    d.add_argument("delivery_action", choices=["pause", "resume"], metavar="pause|resume")
    sub.add_parser(
        "config", parents=[common], help="the effective configuration, defaults included, as TOML"
    )


def add_user_parsers(users: Any, common: argparse.ArgumentParser) -> None:
    test = users.add_parser("test", parents=[common], help="check a user's password (exit 0 or 1)")
    test.add_argument("name")
    test.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    token = users.add_parser(
        "token", parents=[common], help="make, list or revoke a user's HTTP API tokens"
    )
    token.add_argument("name")
    which = token.add_mutually_exclusive_group()
    which.add_argument("--list", action="store_true", help="list the user's token ids")
    which.add_argument("--revoke", metavar="ID", help="revoke one token")


def cmd_user_token(args: argparse.Namespace, config: Config) -> int:
    """``relayctl user token NAME [--list | --revoke ID]`` (SPEC §10)."""
    import time

    from relayd import users
    from relayd.ctl import Failed

    path = config.auth.users_file
    try:
        result = users.cmd_user_token(path, args.name, revoke=args.revoke, listing=args.list)
    except users.UserError as exc:
        raise Failed(str(exc)) from exc
    except OSError as exc:
        raise Failed(f"{path}: {exc.strerror or exc}") from exc
    if args.revoke:
        print(json.dumps({"ok": True}) if args.json else f"relayd: token {args.revoke} revoked")
    elif args.list:
        assert isinstance(result, list)
        if args.json:
            print(json.dumps({"tokens": [{"id": i, "created": c} for i, c in result]}))
        for token_id, created in [] if args.json else result:
            stamp = time.strftime("%Y-%m-%d %H:%M", time.gmtime(created))
            print(f"{token_id}  created {stamp} UTC")
    else:
        assert isinstance(result, tuple)
        token_id, secret = result
        if args.json:
            print(json.dumps({"id": token_id, "token": secret}))
        else:
            print(f"id: {token_id}\ntoken: {secret}")
            print("relayctl: the token is shown only this once", file=sys.stderr)
    return 0


def add_dkim_parsers(dkim: Any, common: argparse.ArgumentParser) -> None:
    show = dkim.add_parser("show", parents=[common], help="print the DNS record of an existing key")
    show.add_argument("domain")
    show.add_argument("selector")


def cmd_delivery(args: argparse.Namespace, config: Config) -> int:
    from relayd.ctl import checked, request

    action: str = args.delivery_action
    reply = checked(request(config, action))
    if args.json:
        print(json.dumps({"ok": True, "paused": reply.get("paused")}))
    elif action == "pause":
        print("relayd: delivery paused; mail is still accepted and queued")
    else:
        print("relayd: delivery resumed")
    return EXIT_OK


def cmd_config(args: argparse.Namespace, config: Config) -> int:
    from relayd.config_dump import dump

    sys.stdout.write(dump(config))
    return EXIT_OK


def cmd_user_test(args: argparse.Namespace, config: Config) -> int:
    from relayd import users

    if args.password_stdin:
        password = sys.stdin.readline().removesuffix("\n").removesuffix("\r")
    else:
        password = getpass.getpass("Password: ")
    try:
        db = users.UserDB.load(config.auth.users_file)
    except users.UserError as exc:
        print(f"relayctl: {exc}", file=sys.stderr)
        return EXIT_FAILED
    ok = db.get(args.name) is not None and db.verify(args.name, password)
    if ok and db.legacy_hash(args.name):
        _upgrade(config.auth.users_file, args.name, password)
    if args.json:
        print(json.dumps({"user": args.name, "ok": ok}))
    else:
        print(f"relayd: password for {args.name} {'is correct' if ok else 'does NOT match'}")
    return EXIT_OK if ok else EXIT_FAILED


def _upgrade(path: Path, name: str, password: str) -> None:
    """The password is known good: store the user's old scrypt hash as argon2id."""
    from relayd import users

    try:
        changed = users.cmd_user_upgrade(path, name, password)
    except (users.UserError, OSError) as exc:
        print(
            f"relayctl: {name} still has a scrypt hash; cannot rewrite {path} ({exc}); "
            f"run `relayctl user passwd {name}` as root",
            file=sys.stderr,
        )
        return
    if changed:
        print(f"relayctl: the scrypt hash of {name} is now stored as argon2id", file=sys.stderr)


def cmd_dkim_show(args: argparse.Namespace, config: Config) -> int:
    from relayd import dkim
    from relayd.ctl import dkim_key_path

    domain, selector = args.domain.lower().rstrip("."), args.selector
    path, _ = dkim_key_path(config, domain, selector)
    try:
        record = dkim.public_record(path, domain, selector)
    except OSError as exc:
        print(
            f"relayctl: {path}: {exc.strerror or exc} "
            f"(create it with: relayctl dkim keygen {domain} {selector})",
            file=sys.stderr,
        )
        return EXIT_FAILED
    except ValueError as exc:
        print(f"relayctl: {path}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    if args.json:
        out = {"domain": domain, "selector": selector, "key_file": str(path), "record": record}
        print(json.dumps(out))
    else:
        print(record)
    return EXIT_OK
