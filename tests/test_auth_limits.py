"""Password guessing against a real relayd on loopback (SPEC §7 "wrong passwords").

Clients bind to their own loopback source addresses (all of 127.0.0.0/8
reaches the listener on 127.0.0.1), so one test plays many attackers.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import re
import socket
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from support.certs import client_context
from support.relayd_proc import HOSTNAME, RawClient, Relayd, raw_session

from relayd.users import ScryptParams

ALICE, ALICE_PW = "alice@example.com", "correct horse 1"
BOB, BOB_PW = "bob@example.com", "battery staple 2"
CHECKED = "authentication failed: authentication failure"


def plain(login: str, password: str, authzid: str = "") -> str:
    blob = f"{authzid}\0{login}\0{password}".encode()
    return base64.b64encode(blob).decode()


def auth_from(
    r: Relayd, source: str, login: str, password: str, *, authzid: str = "", timeout: float = 40.0
) -> str:
    """Implicit TLS from ``source``, EHLO, AUTH PLAIN: the AUTH reply ("" if closed before)."""
    port = r.port("submissions")
    sock = socket.create_connection(("127.0.0.1", port), timeout, source_address=(source, 0))
    tls = client_context().wrap_socket(sock, server_hostname=HOSTNAME)
    client = RawClient(tls)
    try:
        banner = client.reply()
        if not banner.startswith("220"):
            return banner
        client.cmd("EHLO client.test")
        reply = client.cmd(f"AUTH PLAIN {plain(login, password, authzid)}")
        if not reply.startswith("421"):
            with contextlib.suppress(OSError, ConnectionError):
                client.cmd("QUIT")
        return reply
    except ConnectionError as exc:
        return f"closed: {exc}"
    finally:
        client.close()


def checks_from(log: str, source: str) -> int:
    return sum(1 for line in log.splitlines() if f"[{source}]" in line and CHECKED in line)


def parallel(n: int, job: Callable[[int], str]) -> list[str]:
    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(job, range(n)))


def codes(replies: list[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for reply in replies:
        key = reply[:9] if reply[:1].isdigit() else "closed"
        out[key] = out.get(key, 0) + 1
    return out


def start(tmp_path: Path, extra: str = "") -> Relayd:
    r = Relayd(tmp_path, extra=extra)
    r.add_user(ALICE, ALICE_PW)
    r.add_user(BOB, BOB_PW)
    return r


def test_twenty_parallel_wrong_passwords_from_one_address_get_five_checks(
    tmp_path: Path,
) -> None:
    with start(tmp_path) as r:
        r.start()
        began = time.monotonic()
        replies = parallel(20, lambda _: auth_from(r, "127.0.0.9", ALICE, "wrong"))
        took = time.monotonic() - began
        counted = codes(replies)
        assert counted.get("535 5.7.8", 0) <= 5, replies
        assert counted.get("535 5.7.8", 0) + counted.get("421 4.7.0", 0) == 20, replies
        assert checks_from(r.log(), "127.0.0.9") == counted["535 5.7.8"] == 5
        print(f"20 parallel from 127.0.0.9: {counted} in {took:.1f}s")

        # Another address logging in does not reset the first one's count.
        assert auth_from(r, "127.0.0.10", ALICE, ALICE_PW).startswith("235 2.7.0")
        assert auth_from(r, "127.0.0.9", ALICE, ALICE_PW).startswith("421 4.7.0")
        assert auth_from(r, "127.0.0.9", BOB, BOB_PW).startswith("421 4.7.0")
        assert checks_from(r.log(), "127.0.0.9") == 5
        assert "authentication refused without a password check: too many failed" in r.log()


def test_a_success_from_the_same_address_clears_nothing(tmp_path: Path) -> None:
    with start(tmp_path) as r:
        r.start()
        for _ in range(4):
            assert auth_from(r, "127.0.0.11", BOB, "wrong").startswith("535 5.7.8")
        assert auth_from(r, "127.0.0.11", ALICE, ALICE_PW).startswith("235 2.7.0")
        assert auth_from(r, "127.0.0.11", BOB, "wrong").startswith("535 5.7.8")  # the 5th
        assert auth_from(r, "127.0.0.11", ALICE, ALICE_PW).startswith("421 4.7.0")


def account_attack(r: Relayd) -> tuple[list[str], str, str]:
    """alice logs in from 127.0.0.2; 24 addresses guess; then a fresh and the known one try."""
    assert auth_from(r, "127.0.0.2", ALICE, ALICE_PW).startswith("235 2.7.0")
    sources = [f"127.0.0.{n}" for n in range(40, 64)]
    with ThreadPoolExecutor(6) as pool:
        replies = list(pool.map(lambda src: auth_from(r, src, ALICE, "guess"), sources))
    fresh = auth_from(r, "127.0.0.70", ALICE, ALICE_PW)
    known = auth_from(r, "127.0.0.2", ALICE, ALICE_PW)
    return replies, fresh, known


def test_account_gets_twenty_checks_per_hour_but_known_addresses_get_in(
    tmp_path: Path,
) -> None:
    with start(tmp_path) as r:
        r.start()
        replies, fresh, known = account_attack(r)
        counted = codes(replies)
        assert counted == {"535 5.7.8": 20, "454 4.7.0": 4}, replies
        assert fresh.startswith("454 4.7.0"), fresh
        assert known.startswith("235 2.7.0"), known
        log = r.log()
        assert sum(1 for line in log.splitlines() if CHECKED in line) == 20
        assert "too many failed authentications for this account" in log
        # Other accounts are untouched.
        assert auth_from(r, "127.0.0.31", BOB, BOB_PW).startswith("235 2.7.0")


def guess(r: Relayd, source: str, _: int) -> str:
    return auth_from(r, source, BOB, "wrong")


def pids_answering(log: str, source: str) -> set[str]:
    """The processes that answered AUTH for ``source`` (checked or refused)."""
    pattern = rf"smtpd\[(\d+)\]: warning: unknown\[{re.escape(source)}\]: SASL"
    return set(re.findall(pattern, log))


def test_counts_hold_across_processes(tmp_path: Path) -> None:
    with start(tmp_path, extra="[server]\nprocesses = 2\n") as r:
        r.start()
        # The kernel hands each connection to one of the two processes; repeat
        # the burst from new addresses until one address was answered by both.
        seen: list[tuple[str, dict[str, int], int]] = []
        for n in range(100, 106):
            source = f"127.0.0.{n}"
            replies = parallel(20, functools.partial(guess, r, source))
            counted = codes(replies)
            log = r.log()
            assert checks_from(log, source) == counted.get("535 5.7.8") == 5, replies
            assert counted.get("421 4.7.0") == 15, replies
            seen.append((source, counted, len(pids_answering(log, source))))
            if seen[-1][2] == 2:
                break
        print(f"processes = 2, 20 parallel per address: {seen}")
        assert seen[-1][2] == 2, seen

        account_replies, fresh, known = account_attack(r)
        assert codes(account_replies) == {"535 5.7.8": 20, "454 4.7.0": 4}, account_replies
        assert fresh.startswith("454 4.7.0") and known.startswith("235 2.7.0")
        answering = set().union(*(pids_answering(r.log(), f"127.0.0.{n}") for n in range(40, 64)))
        print(f"account attack answered by processes {sorted(answering)}")
        assert len(answering) == 2


def test_plain_with_another_authorization_identity_is_refused(tmp_path: Path) -> None:
    with start(tmp_path) as r:
        r.start()
        assert auth_from(r, "127.0.0.12", ALICE, ALICE_PW, authzid=BOB).startswith("535 5.7.8")
        assert auth_from(r, "127.0.0.12", ALICE, ALICE_PW, authzid=ALICE).startswith("235")
        assert auth_from(r, "127.0.0.12", ALICE, ALICE_PW).startswith("235")
        assert "authorization identity differs from the login" in r.log()
        assert checks_from(r.log(), "127.0.0.12") == 0


def test_an_old_scrypt_hash_still_logs_in_and_is_reported(tmp_path: Path) -> None:
    with Relayd(tmp_path) as r:
        r.add_user("old@example.com", "legacy pw 12", params=ScryptParams(n=2**10, r=8, p=1))
        r.start()
        assert auth_from(r, "127.0.0.13", "old@example.com", "legacy pw 12").startswith("235")
        r.wait_log("user old@example.com still has a scrypt password hash")
        listing = r.ctl("user", "list").stdout
        assert "old scrypt hash" in listing
        test = r.ctl("user", "test", "old@example.com", "--password-stdin", input=b"legacy pw 12\n")
        assert test.returncode == 0, test
        assert "old scrypt hash" not in r.ctl("user", "list").stdout
        assert r.users_file.read_text().count('"$argon2id$') == 1
        assert auth_from(r, "127.0.0.14", "old@example.com", "legacy pw 12").startswith("235")


def test_auth_before_tls_is_still_530(tmp_path: Path) -> None:
    with start(tmp_path) as r:
        r.start()
        with raw_session(r.port("submission")) as c:
            c.reply()
            c.cmd("EHLO client.test")
            assert c.cmd(f"AUTH PLAIN {plain(ALICE, ALICE_PW)}").startswith("530 5.7.0")
