"""`make run`'s development instance, and the README's commands working from the checkout."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from relayd.cli import DEFAULT_PATH


def run(
    args: list[str], cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_dev_instance_takes_a_port_base_and_passes_check_config(tmp_path: Path) -> None:
    done = run(["-m", "relayd.dev", "var"], tmp_path, {"PORT_BASE": "3500"})
    assert done.returncode == 0, done.stderr
    assert "127.0.0.1:3587" in done.stdout and "export RELAYD_CONFIG=" in done.stdout
    text = (tmp_path / "var" / "relayd.toml").read_text()
    for port in (3525, 3587, 3465, 3526):
        assert f"127.0.0.1:{port}" in text
    check = run(["-m", "relayd.cli", "--config", "var/relayd.toml", "--check-config"], tmp_path)
    assert check.returncode == 0, check.stderr
    again = run(["-m", "relayd.dev", "var"], tmp_path, {"PORT_BASE": "4500"})
    assert "exists with other ports" in again.stderr


@pytest.mark.skipif(DEFAULT_PATH.exists(), reason="this machine has a real /etc/relayd.toml")
def test_relayctl_finds_the_dev_config_in_a_checkout(tmp_path: Path) -> None:
    assert run(["-m", "relayd.dev", "var"], tmp_path).returncode == 0
    env = {k: v for k, v in os.environ.items() if k != "RELAYD_CONFIG"}
    done = subprocess.run(
        [sys.executable, "-m", "relayd.ctl", "queue"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "offline" in done.stdout + done.stderr  # read from var/spool: the daemon is not up
