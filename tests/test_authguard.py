"""Wrong-password limits (SPEC §7) as plain logic: an explicit clock, no sockets."""

from __future__ import annotations

import asyncio
import multiprocessing
from pathlib import Path

import pytest

from relayd.config import AuthConfig
from relayd.policy.authguard import (
    AuthGuard,
    AuthLedger,
    Limits,
    Outcome,
    delay_for,
)

T0 = 1_800_000_000.0


@pytest.fixture
def ledger(tmp_path: Path) -> AuthLedger:
    return AuthLedger(tmp_path / "auth.db")


def fail(ledger: AuthLedger, now: float, ip: str, name: str = "alice@example.com") -> Outcome:
    ticket = ledger.begin(now, ip, name)
    if ticket.outcome is Outcome.CHECK:
        ledger.finish(now, ticket, ok=False)
    return ticket.outcome


def test_defaults_are_five_per_fifteen_minutes() -> None:
    assert Limits.from_config(AuthConfig()) == Limits()
    assert (Limits().max_failures, Limits().failure_window) == (5, 900.0)
    assert (Limits().account_max_failures, Limits().account_window) == (20, 3600.0)


def test_address_gets_five_checks_then_blocked_until_the_window_passes(
    ledger: AuthLedger,
) -> None:
    outcomes = [fail(ledger, T0 + i, "192.0.2.5") for i in range(7)]
    assert outcomes == [Outcome.CHECK] * 5 + [Outcome.ADDRESS_BLOCKED] * 2
    blocked = ledger.begin(T0 + 10, "192.0.2.5", "bob")
    assert blocked.outcome is Outcome.ADDRESS_BLOCKED
    assert blocked.retry_after == pytest.approx(890.0)
    assert ledger.begin(T0 + 10, "192.0.2.6", "bob").outcome is Outcome.CHECK
    assert fail(ledger, T0 + 899, "192.0.2.5") is Outcome.ADDRESS_BLOCKED
    assert fail(ledger, T0 + 900.5, "192.0.2.5") is Outcome.CHECK  # the first one left


def test_parallel_attempts_count_from_the_start(ledger: AuthLedger) -> None:
    lim = Limits(max_concurrent=100)
    ledger.limits = lim
    tickets = [ledger.begin(T0, "192.0.2.5", "alice") for _ in range(20)]
    assert [t.outcome for t in tickets].count(Outcome.CHECK) == 5
    assert [t.outcome for t in tickets].count(Outcome.ADDRESS_BLOCKED) == 15


def test_concurrency_cap_then_slot_frees(ledger: AuthLedger) -> None:
    running = [ledger.begin(T0, "192.0.2.5", "alice") for _ in range(3)]
    assert all(t.outcome is Outcome.CHECK for t in running)
    assert ledger.begin(T0, "192.0.2.5", "alice").outcome is Outcome.BUSY
    ledger.finish(T0 + 0.1, running[0], ok=True)  # a right password gives its slot back
    assert ledger.begin(T0 + 0.1, "192.0.2.5", "alice").outcome is Outcome.CHECK


def test_ipv6_counts_per_64(ledger: AuthLedger) -> None:
    for i in range(5):
        assert fail(ledger, T0 + i, f"2001:db8:1:2::{i + 1}") is Outcome.CHECK
    assert fail(ledger, T0 + 6, "2001:db8:1:2:ffff::9") is Outcome.ADDRESS_BLOCKED
    assert fail(ledger, T0 + 6, "2001:db8:1:3::1") is Outcome.CHECK


def test_success_does_not_clear_the_address_or_other_accounts(ledger: AuthLedger) -> None:
    for i in range(4):
        fail(ledger, T0 + i, "192.0.2.5", "bob")
    ok = ledger.begin(T0 + 5, "192.0.2.5", "alice")
    assert ok.outcome is Outcome.CHECK
    ledger.finish(T0 + 5, ok, ok=True)
    assert ledger.address_failures(T0 + 6, "192.0.2.5") == 4
    assert ledger.account_failures(T0 + 6, "bob") == 4
    assert fail(ledger, T0 + 7, "192.0.2.5", "bob") is Outcome.CHECK
    assert fail(ledger, T0 + 8, "192.0.2.5", "alice") is Outcome.ADDRESS_BLOCKED


def test_account_locked_after_twenty_but_known_addresses_get_in(ledger: AuthLedger) -> None:
    alice = "alice@example.com"
    known = ledger.begin(T0, "198.51.100.1", alice)
    ledger.finish(T0, known, ok=True)
    outcomes = [fail(ledger, T0 + 1 + i, f"203.0.113.{i // 4 + 1}", alice) for i in range(24)]
    assert outcomes == [Outcome.CHECK] * 20 + [Outcome.ACCOUNT_LOCKED] * 4
    assert ledger.account_failures(T0 + 30, "ALICE@example.com") == 20  # names ignore case
    assert ledger.account_failures(T0 + 30, "bob@example.com") == 0
    # A fresh address: refused without a check; the known one: checked.
    assert ledger.begin(T0 + 30, "203.0.113.200", "Alice@Example.com").outcome is (
        Outcome.ACCOUNT_LOCKED
    )
    again = ledger.begin(T0 + 30, "198.51.100.1", alice)
    assert again.outcome is Outcome.CHECK
    ledger.finish(T0 + 30, again, ok=True)
    # Other accounts are not affected.
    assert ledger.begin(T0 + 30, "203.0.113.201", "bob@example.com").outcome is Outcome.CHECK
    # An hour after the failures the account opens again.
    assert ledger.begin(T0 + 3700, "203.0.113.200", alice).outcome is Outcome.CHECK


def test_trust_expires_after_a_day(ledger: AuthLedger) -> None:
    known = ledger.begin(T0, "198.51.100.1", "alice@example.com")
    ledger.finish(T0, known, ok=True)
    later = T0 + 86400 + 10
    for i in range(20):
        fail(ledger, later + i, f"203.0.113.{i // 4 + 1}")
    assert ledger.begin(later + 30, "198.51.100.1", "alice@example.com").outcome is (
        Outcome.ACCOUNT_LOCKED
    )


def test_a_reservation_of_a_dead_process_expires(ledger: AuthLedger) -> None:
    for _ in range(3):
        ledger.begin(T0, "192.0.2.5", "alice")  # never finished
    assert ledger.begin(T0 + 1, "192.0.2.5", "alice").outcome is Outcome.BUSY
    assert ledger.begin(T0 + 200, "192.0.2.5", "alice").outcome is Outcome.CHECK


def test_rows_are_bounded(tmp_path: Path) -> None:
    ledger = AuthLedger(tmp_path / "auth.db", Limits(max_rows=50))
    for i in range(500):
        fail(ledger, T0 + i * 0.01, f"10.0.{i // 256}.{i % 256}", f"user{i}")
    assert ledger.rows() <= 51
    # Old rows expire outright once their windows pass.
    fail(ledger, T0 + 4000, "192.0.2.1")
    assert ledger.rows() == 1


def test_counts_are_shared_through_the_file(tmp_path: Path) -> None:
    a, b = AuthLedger(tmp_path / "auth.db"), AuthLedger(tmp_path / "auth.db")
    for i in range(3):
        fail(a, T0 + i, "192.0.2.5")
    for i in range(2):
        fail(b, T0 + 3 + i, "192.0.2.5")
    assert fail(a, T0 + 6, "192.0.2.5") is Outcome.ADDRESS_BLOCKED


def _reserve_many(path: str, start: multiprocessing.synchronize.Event, out: object) -> None:
    ledger = AuthLedger(path, Limits(max_concurrent=100))
    start.wait(10)
    n = sum(ledger.begin(T0, "192.0.2.5", "alice").outcome is Outcome.CHECK for _ in range(10))
    out.put(n)  # type: ignore[attr-defined]


def test_reservations_are_atomic_across_processes(tmp_path: Path) -> None:
    path = str(tmp_path / "auth.db")
    AuthLedger(path)  # create the schema first
    ctx = multiprocessing.get_context("spawn")
    start, out = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_reserve_many, args=(path, start, out)) for _ in range(4)]
    for p in procs:
        p.start()
    start.set()
    granted = sum(out.get(timeout=30) for _ in procs)
    for p in procs:
        p.join(10)
    assert granted == 5


def test_delay_doubles_and_is_capped() -> None:
    assert [delay_for(n) for n in range(7)] == [0.0, 0.5, 1.0, 2.0, 4.0, 8.0, 8.0]


def test_guard_waits_for_a_slot_then_says_busy(tmp_path: Path) -> None:
    async def main() -> list[Outcome]:
        guard = AuthGuard(tmp_path / "auth.db", busy_wait=0.3)
        held = [await guard.begin("192.0.2.5", "alice") for _ in range(3)]
        busy = await guard.begin("192.0.2.5", "alice")
        waiter = asyncio.create_task(guard.begin("192.0.2.5", "alice"))
        await asyncio.sleep(0.05)
        await guard.finish(held[0], ok=True)
        freed = await waiter
        return [busy.outcome, freed.outcome]

    assert asyncio.run(main()) == [Outcome.BUSY, Outcome.CHECK]


def test_guard_reconfigure_keeps_counts(tmp_path: Path) -> None:
    async def main() -> Outcome:
        guard = AuthGuard.in_spool(tmp_path, AuthConfig())
        for _ in range(3):
            ticket = await guard.begin("192.0.2.5", "alice")
            await guard.finish(ticket, ok=False)
        guard.reconfigure(AuthConfig(max_failures=3, failure_window=900.0))
        return (await guard.begin("192.0.2.5", "alice")).outcome

    assert asyncio.run(main()) is Outcome.ADDRESS_BLOCKED


def test_an_unusable_database_refuses_rather_than_fails_open(tmp_path: Path) -> None:
    async def main() -> Outcome:
        guard = AuthGuard(tmp_path / "missing-dir" / "auth.db")
        return (await guard.begin("192.0.2.5", "alice")).outcome

    assert asyncio.run(main()) is Outcome.UNAVAILABLE
