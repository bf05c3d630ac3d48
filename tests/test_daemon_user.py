"""`relayd --check-config` run as root asks whether the daemon's user can read each file."""

from __future__ import annotations

import os
import pwd
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from relayd import daemon_user
from relayd.config import check_files, load_config

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="only root's check asks this")

USER = "nobody"


@pytest.fixture
def base() -> Iterator[Path]:
    """A directory every user can traverse (pytest's own are 0700)."""
    with tempfile.TemporaryDirectory(prefix="relayd-access-") as d:
        os.chmod(d, 0o755)
        yield Path(d)


@pytest.fixture
def who() -> daemon_user.DaemonUser:
    try:
        pwd.getpwnam(USER)
    except KeyError:
        pytest.skip(f"no user {USER}")
    found = daemon_user.daemon_user(USER)
    assert found is not None
    return found


def test_root_only_file_is_reported_with_the_fix(base: Path, who: daemon_user.DaemonUser) -> None:
    users = base / "users"
    users.write_text("")
    users.chmod(0o640)
    os.chown(users, 0, 0)
    problem = who.cannot_read(users)
    assert problem is not None
    assert f"cannot read '{users}' (0640 root:" in problem
    assert f"fix: chgrp {USER} {users} && chmod g+r {users}" in problem
    os.chown(users, 0, who.gid)  # what `relayctl user add` is to do: 0640 root:<daemon group>
    assert who.cannot_read(users) is None


def test_own_file_and_world_readable_file(base: Path, who: daemon_user.DaemonUser) -> None:
    key = base / "key"
    key.write_text("")
    key.chmod(0o600)
    os.chown(key, who.uid, who.gid)
    assert who.cannot_read(key) is None
    public = base / "public"
    public.write_text("")
    public.chmod(0o644)
    assert who.cannot_read(public) is None


def test_a_closed_directory_on_the_way(base: Path, who: daemon_user.DaemonUser) -> None:
    closed = base / "tls"
    closed.mkdir(mode=0o750)
    os.chown(closed, 0, 0)
    cert = closed / "fullchain.pem"
    cert.write_text("")
    cert.chmod(0o644)
    problem = who.cannot_read(cert)
    assert problem is not None
    assert f"the directory '{closed}' is 0750 root:" in problem
    assert f"chgrp {USER} {closed} && chmod g+x {closed}" in problem


def test_missing_file_is_left_to_the_other_checks(base: Path, who: daemon_user.DaemonUser) -> None:
    assert who.cannot_read(base / "missing") is None


def test_no_such_user_means_no_check() -> None:
    assert daemon_user.daemon_user("no-such-user-for-relayd") is None


def test_check_config_names_the_key(
    base: Path, who: daemon_user.DaemonUser, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(daemon_user, "DAEMON_USER", USER)
    users = base / "users"
    users.write_text("")
    users.chmod(0o640)
    os.chown(users, 0, 0)
    config_path = base / "relayd.toml"
    config_path.write_text(
        'hostname = "mail.relayd.test"\n'
        '[[listener]]\nname = "submission"\naddress = "127.0.0.1:2587"\ntls = "none"\n'
        f'[auth]\nusers_file = "{users}"\n'
    )
    errors, _ = check_files(load_config(config_path))
    assert any("[auth] users_file: the daemon's user nobody cannot read" in e for e in errors), (
        errors
    )
    os.chown(users, 0, who.gid)
    errors, _ = check_files(load_config(config_path))
    assert not any("daemon's user" in e for e in errors), errors
