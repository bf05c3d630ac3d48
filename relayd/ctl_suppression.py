"""``relayctl suppression list|add ADDR|del ADDR`` (SPEC §10).

The list is a file in the spool (relayd.suppression), so these work with
the daemon stopped as well; a running daemon and its acceptor processes
see a change at the next RCPT.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
import time
from typing import Any

from relayd.config import Config
from relayd.escape import printable
from relayd.suppression import DB_NAME, SuppressionList, key, owned_like_spool, when_text

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


class _Failed(Exception):
    def __init__(self, message: str, code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.code = code


def add_parsers(sub: Any, common: argparse.ArgumentParser) -> None:
    s = sub.add_parser(
        "suppression", parents=[common], help="addresses refused after a hard bounce"
    )
    ss = s.add_subparsers(dest="suppression_action", metavar="ACTION")
    ss.add_parser("list", parents=[common], help="the suppressed addresses (default)")
    add = ss.add_parser("add", parents=[common], help="suppress an address")
    add.add_argument("address")
    rm = ss.add_parser("del", parents=[common], help="let mail to an address through again")
    rm.add_argument("address")


def cmd_suppression(args: argparse.Namespace, config: Config) -> int:
    try:
        return _run(args, config)
    except _Failed as exc:
        print(f"relayctl: {exc}", file=sys.stderr)
        return exc.code


def _run(args: argparse.Namespace, config: Config) -> int:
    action = args.suppression_action or "list"
    spool = config.spool.path
    if not spool.is_dir():
        raise _Failed(f"no spool directory {spool}")
    path = spool / DB_NAME
    now = time.time()
    try:
        store = SuppressionList(path)
    except sqlite3.Error as exc:
        raise _Failed(f"cannot open {path}: {exc}") from None
    try:
        if action == "list":
            _print(store.entries(now), args.json)
            return EXIT_OK
        address = key(args.address)
        if "@" not in address or any(c.isspace() or c in "<>" for c in address):
            raise _Failed(f"{args.address!r} is not an address like user@example.com", EXIT_USAGE)
        if action == "add":
            store.add(address, now, config.suppression.expire, source="operator")
            entry = store.lookup(address, now)
            if args.json:
                print(json.dumps({"ok": True, "entry": entry.as_json() if entry else None}))
            else:
                until = when_text(now + config.suppression.expire)
                print(f"relayctl: <{address}> suppressed until {until}")
            return EXIT_OK
        removed = store.remove(address)
        if args.json:
            print(json.dumps({"ok": removed, "address": address}))
        if not removed:
            raise _Failed(f"<{address}> is not suppressed")
        if not args.json:
            print(f"relayctl: <{address}> removed from the suppression list")
        return EXIT_OK
    except sqlite3.Error as exc:
        raise _Failed(f"{path}: {exc}") from None
    finally:
        store.close()
        owned_like_spool(path)


def _print(entries: list[Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps({"suppressed": [e.as_json() for e in entries]}, indent=2))
        return
    if not entries:
        print("relayctl: the suppression list is empty")
        return
    rows = [("ADDRESS", "SINCE", "UNTIL", "DSN", "QUEUE ID", "REASON")]
    for e in entries:
        reason = e.reply if e.source == "bounce" else "added by the operator"
        rows.append(
            (printable(e.address), when_text(e.since), when_text(e.expires), e.dsn or "-",
             e.queue_id or "-", printable(" ".join(reason.split())[:60]))
        )  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        cells = [c.ljust(w) for c, w in zip(row, widths, strict=False)]
        print("  ".join([*cells, row[-1]]).rstrip())
