"""The submission users file as relayctl writes it and the daemon reads it."""

from __future__ import annotations

import asyncio
import grp
import io
import logging
import os
import re
import stat
import statistics
import threading
import time
import tomllib
from collections.abc import Callable
from pathlib import Path

import pytest

from relayd.users import (
    DAEMON_GROUP,
    DEFAULT_PARAMS,
    Argon2Params,
    ScryptParams,
    User,
    UserDB,
    UserError,
    UserFileError,
    UserStore,
    check_password,
    cmd_user_add,
    cmd_user_del,
    cmd_user_legacy,
    cmd_user_list,
    cmd_user_passwd,
    cmd_user_upgrade,
    hash_password,
    read_password,
)

# Cheap hashes keep the tests fast; production always uses DEFAULT_PARAMS.
FAST = Argon2Params(time_cost=1, memory_kib=64)
OLD_SCRYPT = ScryptParams(n=16, r=1, p=1)


@pytest.fixture
def users_file(tmp_path: Path) -> Path:
    return tmp_path / "users"


def add(path: Path, name: str, password: str = "s3cret pw", *allow: str) -> None:
    cmd_user_add(path, name, password, list(allow), params=FAST)


# --- relayctl user add / passwd / del / list ---------------------------------


def test_add_list_passwd_del_round_trip_through_the_file(users_file: Path) -> None:
    add(users_file, "alice@example.com", "first", "*@example.com")
    add(users_file, "app1", "token", "noreply@example.org", "alerts-*@example.org")

    assert cmd_user_list(users_file) == [
        User("alice@example.com", ("*@example.com",)),
        User("app1", ("noreply@example.org", "alerts-*@example.org")),
    ]
    assert UserDB.load(users_file).verify("alice@example.com", "first")

    cmd_user_passwd(users_file, "alice@example.com", "second", params=FAST)
    db = UserDB.load(users_file)
    assert db.verify("alice@example.com", "second")
    assert not db.verify("alice@example.com", "first")
    assert db.get("alice@example.com") == User("alice@example.com", ("*@example.com",))

    cmd_user_del(users_file, "alice@example.com")
    assert [u.name for u in cmd_user_list(users_file)] == ["app1"]
    assert UserDB.load(users_file).verify("app1", "token")


def test_the_file_is_readable_toml_without_passwords(users_file: Path) -> None:
    add(users_file, "alice@example.com", "hunter2", "*@example.com")
    text = users_file.read_text()

    assert "hunter2" not in text
    assert text.startswith("# relayd submission users")
    entry = tomllib.loads(text)["users"]["alice@example.com"]
    assert entry["allow_from"] == ["*@example.com"]
    assert entry["hash"].startswith("$argon2id$v=19$m=64,t=1,p=1$")


def test_missing_file_is_an_empty_user_list(users_file: Path) -> None:
    assert cmd_user_list(users_file) == []
    assert not UserDB.load(users_file).verify("alice@example.com", "x")


def test_adding_an_existing_user_is_refused_whatever_the_case(users_file: Path) -> None:
    add(users_file, "Alice@Example.COM", "first")
    with pytest.raises(UserError, match="exists already"):
        add(users_file, "alice@example.com", "other")
    db = UserDB.load(users_file)
    assert db.names() == ["alice@example.com"]
    assert db.verify("ALICE@example.com", "first")


def test_passwd_and_del_of_unknown_user_fail_clearly(users_file: Path) -> None:
    add(users_file, "alice@example.com")
    with pytest.raises(UserError, match=r"no such user: bob@example\.com"):
        cmd_user_passwd(users_file, "bob@example.com", "pw", params=FAST)
    with pytest.raises(UserError, match=r"no such user: bob@example\.com"):
        cmd_user_del(users_file, "bob@example.com")


@pytest.mark.parametrize(
    "name",
    [
        "",
        "alice smith",
        "alice:x",
        "tab\there",
        "nul\x00",
        "new\nline",
        "a@b@c",
        "@example.com",
        "alice@",
        "x" * 255,
        "semi;colon",
        "o'brien@example.com",
    ],
)
def test_bad_names_are_refused(users_file: Path, name: str) -> None:
    with pytest.raises(UserError, match="bad user name"):
        add(users_file, name)
    assert not users_file.exists()


@pytest.mark.parametrize("pattern", ["", "*", "example.com", "*@exa mple.com", "a@b\n", "x\x07@y"])
def test_bad_allow_from_patterns_are_refused(users_file: Path, pattern: str) -> None:
    with pytest.raises(UserError, match="bad --allow-from pattern"):
        add(users_file, "app1", "pw", pattern)
    assert not users_file.exists()


def test_good_names_and_patterns_are_stored_lower_cased(users_file: Path) -> None:
    add(users_file, "App_1.prod-x+y", "pw", "*@Example.COM", "[ab]-?@x.test")
    assert cmd_user_list(users_file) == [User("app_1.prod-x+y", ("*@example.com", "[ab]-?@x.test"))]


@pytest.mark.parametrize("password", ["", "two\nlines", "nul\x00"])
def test_unusable_passwords_are_refused(users_file: Path, password: str) -> None:
    with pytest.raises(UserError, match="password"):
        add(users_file, "alice@example.com", password)


def test_concurrent_adds_lose_nobody(users_file: Path) -> None:
    names = [f"user{i}@example.com" for i in range(8)]
    threads = [threading.Thread(target=add, args=(users_file, name)) for name in names]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert UserDB.load(users_file).names() == sorted(names)


# --- the file on disk -----------------------------------------------------------


def test_file_mode_is_0640_and_no_temporary_file_is_left(users_file: Path) -> None:
    old_umask = os.umask(0o022)
    try:
        add(users_file, "alice@example.com")
        cmd_user_passwd(users_file, "alice@example.com", "new", params=FAST)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(users_file.stat().st_mode) == 0o640
    assert os.listdir(users_file.parent) == ["users"]


def test_save_replaces_the_file_atomically_keeping_its_group(users_file: Path) -> None:
    add(users_file, "alice@example.com")
    other = [g for g in (os.getgroups() or [os.getgid()]) if g != users_file.stat().st_gid]
    if os.geteuid() == 0:
        other = [4242]
    if not other:
        pytest.skip("needs a second group to chgrp the file to")
    os.chown(users_file, -1, other[0])
    before = users_file.stat()

    add(users_file, "bob@example.com")

    after = users_file.stat()
    assert after.st_gid == other[0]
    assert after.st_ino != before.st_ino  # a new file renamed over, never rewritten in place
    assert stat.S_IMODE(after.st_mode) == 0o640


def _another_group() -> grp.struct_group | None:
    """An existing group other than ours, to stand in for the daemon's group."""
    for group in grp.getgrall():
        if group.gr_gid != os.getegid() and group.gr_name != DAEMON_GROUP:
            return group
    return None


def test_daemon_group_is_the_one_the_service_runs_as() -> None:
    unit = (Path(__file__).parent.parent / "systemd" / "relayd.service").read_text()
    assert f"Group={DAEMON_GROUP}\n" in unit


def test_a_new_file_is_0640_root_and_the_daemons_group(users_file: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("only root can give the file to another group")
    daemon = _another_group()
    if daemon is None:
        pytest.skip("needs a second group")
    note = cmd_user_add(
        users_file, "alice@example.com", "pw", [], params=FAST, group=daemon.gr_name
    )
    st = users_file.stat()
    assert note is None
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, daemon.gr_gid, 0o640)


def test_without_the_daemons_group_the_file_keeps_ours_and_says_so(users_file: Path) -> None:
    note = cmd_user_add(
        users_file, "alice@example.com", "pw", [], params=FAST, group="no-such-group-relayd"
    )
    st = users_file.stat()
    assert st.st_gid == os.getegid()
    assert stat.S_IMODE(st.st_mode) == 0o640
    assert note is not None and "no-such-group-relayd" in note and "does not exist" in note


def test_an_existing_file_keeps_its_owner_group_and_mode(users_file: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("only root can set another owner")
    add(users_file, "alice@example.com")
    os.chown(users_file, 4243, 4244)
    os.chmod(users_file, 0o600)

    assert cmd_user_add(users_file, "bob@example.com", "pw", [], params=FAST) is None
    cmd_user_passwd(users_file, "alice@example.com", "new", params=FAST)

    st = users_file.stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (4243, 4244, 0o600)


def test_save_into_a_missing_directory_says_so(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no-such-dir"):
        add(tmp_path / "no-such-dir" / "users", "alice@example.com")


def test_default_hash_is_argon2id_and_not_weakened() -> None:
    assert hash_password("pw").startswith("$argon2id$v=19$m=32768,t=3,p=1$")
    assert Argon2Params(time_cost=3, memory_kib=32768, parallelism=1) == DEFAULT_PARAMS


def test_default_argon2id_verify_stays_under_a_quarter_second() -> None:
    encoded = hash_password("pw")
    assert _median_seconds(lambda: check_password("pw", encoded), runs=3) < 0.25


def test_old_scrypt_hashes_still_verify_and_relayctl_test_upgrades_them(
    users_file: Path,
) -> None:
    cmd_user_add(users_file, "alice@example.com", "pw", [], params=OLD_SCRYPT)
    assert tomllib.loads(users_file.read_text())["users"]["alice@example.com"]["hash"].startswith(
        "scrypt$"
    )
    db = UserDB.load(users_file)
    assert db.verify("alice@example.com", "pw")
    assert not db.verify("alice@example.com", "wrong")
    assert cmd_user_legacy(users_file) == ["alice@example.com"]
    assert not cmd_user_upgrade(users_file, "alice@example.com", "wrong")
    assert cmd_user_legacy(users_file) == ["alice@example.com"]
    assert cmd_user_upgrade(users_file, "alice@example.com", "pw")
    stored = tomllib.loads(users_file.read_text())["users"]["alice@example.com"]["hash"]
    assert stored.startswith("$argon2id$")
    assert cmd_user_legacy(users_file) == []
    assert UserDB.load(users_file).verify("alice@example.com", "pw")


def test_passwd_moves_a_scrypt_user_to_argon2id(users_file: Path) -> None:
    cmd_user_add(users_file, "alice@example.com", "pw", [], params=OLD_SCRYPT)
    cmd_user_passwd(users_file, "alice@example.com", "new pw", params=Argon2Params(1, 1024, 1))
    assert cmd_user_legacy(users_file) == []
    assert UserDB.load(users_file).verify("alice@example.com", "new pw")


def test_unknown_user_is_checked_against_an_argon2id_dummy(users_file: Path) -> None:
    cmd_user_add(users_file, "alice@example.com", "pw", [])
    db = UserDB.load(users_file)
    known = _median_seconds(lambda: db.verify("alice@example.com", "wrong"), runs=3)
    unknown = _median_seconds(lambda: db.verify("mallory@example.com", "wrong"), runs=3)
    assert 0.5 < unknown / known < 2


def test_hashes_keep_their_own_parameters(users_file: Path) -> None:
    # Raising the default later must not lock out users hashed before.
    add(users_file, "alice@example.com", "pw")
    db = UserDB.load(users_file, ScryptParams(n=2**15, r=8, p=1))
    start = time.perf_counter()
    assert db.verify("alice@example.com", "pw")
    assert time.perf_counter() - start < 0.05


def test_same_password_gets_a_different_salt(users_file: Path) -> None:
    add(users_file, "a@example.com", "same")
    add(users_file, "b@example.com", "same")
    users = tomllib.loads(users_file.read_text())["users"]
    assert users["a@example.com"]["hash"] != users["b@example.com"]["hash"]


# --- bad files ------------------------------------------------------------------

GOOD_HASH = hash_password("pw", FAST)


def test_toml_syntax_error_names_file_and_line(users_file: Path) -> None:
    users_file.write_text('[users."alice@example.com"]\nhash = "x\n')
    with pytest.raises(
        UserFileError, match=rf"^{re.escape(str(users_file))}:2: .*fix the TOML syntax"
    ):
        UserDB.load(users_file)


def test_bad_hash_names_file_line_user_and_key(users_file: Path) -> None:
    users_file.write_text(
        f'[users.app1]\nhash = "{GOOD_HASH}"\n\n'
        '[users."alice@example.com"]\nhash = "md5$abc"\nallow_from = []\n'
    )
    with pytest.raises(UserFileError) as info:
        UserDB.load(users_file)
    message = str(info.value)
    assert message.startswith(f'{users_file}:4: [users."alice@example.com"] hash: expected')
    assert "relayctl user add" in message


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (f'[users.app1]\nhash = "{GOOD_HASH}"\ncolour = "red"\n', "unknown key 'colour'"),
        ('[users.app1]\nallow_from = ["*@x.test"]\n', "hash: missing"),
        (f'[users.app1]\nhash = "{GOOD_HASH}"\nallow_from = "*@x.test"\n', "allow_from: expected"),
        (f'[users.app1]\nhash = "{GOOD_HASH}"\nallow_from = ["nope"]\n', "bad --allow-from"),
        (f'[users."bad name"]\nhash = "{GOOD_HASH}"\n', "bad user name"),
        (f'[users.A]\nhash = "{GOOD_HASH}"\n[users.a]\nhash = "{GOOD_HASH}"\n', "listed twice"),
        ('[users.app1]\nhash = "scrypt$1073741824$8$1$AAAA$AAAA"\n', "more than 1 GiB"),
        ("version = 2\n", "unknown key 'version'"),
    ],
)
def test_bad_entries_are_reported_with_the_file(users_file: Path, body: str, expected: str) -> None:
    users_file.write_text(body)
    with pytest.raises(UserFileError, match=re.escape(str(users_file))) as info:
        UserDB.load(users_file)
    assert expected in str(info.value)


def test_commands_refuse_to_rewrite_a_broken_file(users_file: Path) -> None:
    users_file.write_text("this is not toml\n")
    with pytest.raises(UserFileError, match=re.escape(f"{users_file}:1:")):
        add(users_file, "alice@example.com")
    assert users_file.read_text() == "this is not toml\n"


# --- verifying ------------------------------------------------------------------


def test_verify_right_wrong_and_unknown(users_file: Path) -> None:
    add(users_file, "alice@example.com", "correct horse")
    db = UserDB.load(users_file, FAST)
    assert db.verify("alice@example.com", "correct horse")
    assert db.verify("Alice@EXAMPLE.com", "correct horse")
    assert not db.verify("alice@example.com", "correct horse ")
    assert not db.verify("alice@example.com", "")
    assert not db.verify("bob@example.com", "correct horse")
    assert not db.verify("", "")


def _median_seconds(check: Callable[[], bool], runs: int = 5) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        check()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def test_unknown_user_costs_a_hash_too(users_file: Path) -> None:
    params = ScryptParams(n=2**13, r=8, p=1)
    cmd_user_add(users_file, "alice@example.com", "pw", [], params=params)
    db = UserDB.load(users_file, params)
    known = _median_seconds(lambda: db.verify("alice@example.com", "wrong"))
    unknown = _median_seconds(lambda: db.verify("mallory@example.com", "wrong"))
    assert unknown > known / 2


# --- the daemon's store ---------------------------------------------------------


def test_store_picks_up_relayctl_changes_without_restart(users_file: Path) -> None:
    store = UserStore(users_file, FAST)
    assert store.current().names() == []

    add(users_file, "alice@example.com", "pw")
    assert store.current().names() == ["alice@example.com"]
    assert asyncio.run(store.verify("alice@example.com", "pw"))

    cmd_user_del(users_file, "alice@example.com")
    assert not asyncio.run(store.verify("alice@example.com", "pw"))


def test_store_picks_up_an_in_place_edit(users_file: Path) -> None:
    add(users_file, "alice@example.com", "pw")
    store = UserStore(users_file, FAST)
    assert store.current().get("app1") is None

    # Another writer rewrites the same inode (an editor, config management).
    text = users_file.read_text() + f'\n[users.app1]\nhash = "{GOOD_HASH}"\n'
    with users_file.open("r+") as handle:
        handle.write(text)
    mtime = users_file.stat().st_mtime_ns
    os.utime(users_file, ns=(mtime + 1_000_000, mtime + 1_000_000))

    assert store.current().get("app1") == User("app1", ())
    assert asyncio.run(store.verify("app1", "pw"))


def test_corrupt_file_keeps_the_previous_users_and_warns_once(
    users_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    add(users_file, "alice@example.com", "pw")
    store = UserStore(users_file, FAST)
    assert store.current().names() == ["alice@example.com"]

    users_file.write_text("[users.\n")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="relayd"):
        for _ in range(3):
            assert asyncio.run(store.verify("alice@example.com", "pw"))
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert str(users_file) in warnings[0].getMessage()
    assert "keeping the 1 users loaded before" in warnings[0].getMessage()

    users_file.unlink()
    add(users_file, "bob@example.com", "pw2")
    assert store.current().names() == ["bob@example.com"]


def test_store_verify_does_not_block_the_event_loop(users_file: Path) -> None:
    params = ScryptParams(n=2**13, r=8, p=1)
    cmd_user_add(users_file, "alice@example.com", "pw", [], params=params)
    store = UserStore(users_file, params)

    async def main() -> tuple[bool, int]:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0)

        task = asyncio.create_task(ticker())
        ok = await store.verify("alice@example.com", "pw")
        task.cancel()
        return ok, ticks

    ok, ticks = asyncio.run(main())
    assert ok
    assert ticks > 1


# --- reading the password -------------------------------------------------------


def test_password_stdin_reads_one_line_keeping_spaces() -> None:
    stream = io.StringIO(" pass phrase \r\nnext line\n")
    assert read_password(True, stream=stream) == " pass phrase "


@pytest.mark.parametrize("text", ["", "\n"])
def test_password_stdin_refuses_empty(text: str) -> None:
    with pytest.raises(UserError, match="empty password"):
        read_password(True, stream=io.StringIO(text))


def test_prompt_asks_twice() -> None:
    answers = iter(["pw", "pw"])
    prompts: list[str] = []

    def prompt(text: str) -> str:
        prompts.append(text)
        return next(answers)

    assert read_password(False, prompt=prompt) == "pw"
    assert prompts == ["Password: ", "Retype password: "]


def test_prompt_refuses_mismatch_and_empty() -> None:
    answers = iter(["pw", "pW"])
    with pytest.raises(UserError, match="do not match"):
        read_password(False, prompt=lambda _: next(answers))
    with pytest.raises(UserError, match="empty password"):
        read_password(False, prompt=lambda _: "")
