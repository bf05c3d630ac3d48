"""relayd-sendmail as cron, PHP's mail() and Python apps run it, against a real daemon."""

from __future__ import annotations

import json
import os
import pwd
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from support.relayd_proc import HOSTNAME, Relayd

from relayd import sendmail
from relayd.spool.store import Spool


def run_sendmail(
    r: Relayd, args: list[str], stdin: bytes, timeout: float = 30
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "relayd.sendmail", "-C", str(r.config_path), *args],
        input=stdin,
        capture_output=True,
        timeout=timeout,
        check=False,
    )


def queue(r: Relayd) -> list[dict[str, object]]:
    out = r.ctl("--json", "queue")
    assert out.returncode == 0, out.stderr
    messages: list[dict[str, object]] = json.loads(out.stdout)["messages"]
    return messages


def only_message(r: Relayd) -> tuple[dict[str, object], bytes]:
    (entry,) = queue(r)
    return entry, Spool(r.spool).read_data(str(entry["queue_id"]))


def rcpts(entry: dict[str, object]) -> list[str]:
    return sorted(str(x["address"]) for x in entry["recipients"])  # type: ignore[attr-defined]


@pytest.fixture
def relayd(tmp_path: Path) -> Relayd:
    r = Relayd(tmp_path)
    with r:
        r.start()
        yield r


def test_cron_style_t_takes_recipients_from_headers_and_drops_bcc(relayd: Relayd) -> None:
    message = (
        b"From: cron@example.com\n"
        b"To: Root <root@example.org>, ops@example.org\n"
        b"Cc: audit@example.org\n"
        b"Bcc: hidden@example.org,\n secret@example.org\n"
        b"Subject: Cron <root@host> run-parts\n"
        b"\n"
        b"output line\n"
    )
    done = run_sendmail(relayd, ["-t"], message)
    assert done.returncode == 0, done.stderr
    entry, data = only_message(relayd)
    assert rcpts(entry) == [
        "audit@example.org",
        "hidden@example.org",
        "ops@example.org",
        "root@example.org",
        "secret@example.org",
    ]
    assert b"Bcc" not in data and b"secret@" not in data
    assert b"\r\nTo: Root <root@example.org>, ops@example.org\r\n" in data
    assert b"\n" not in data.replace(b"\r\n", b"")  # every line end is CRLF now
    uid = os.getuid()
    assert f"Received: by {HOSTNAME} (relayd, from userid {uid})".encode() in data
    relayd.wait_log(f"uid={uid} from=<")


def test_php_style_t_i_keeps_a_lone_dot_line(relayd: Relayd) -> None:
    message = b"To: a@example.org\r\nSubject: php\r\n\r\nbefore\r\n.\r\nafter\r\n"
    done = run_sendmail(relayd, ["-t", "-i", "-f", "web@example.com"], message)
    assert done.returncode == 0, done.stderr
    entry, data = only_message(relayd)
    assert entry["sender"] == "web@example.com"
    assert data.endswith(b"\r\n\r\nbefore\r\n.\r\nafter\r\n")


def test_without_i_a_lone_dot_ends_the_message(relayd: Relayd) -> None:
    done = run_sendmail(relayd, ["a@example.org"], b"Subject: x\n\nkept\n.\nlost\n")
    assert done.returncode == 0, done.stderr
    _, data = only_message(relayd)
    assert data.endswith(b"\r\n\r\nkept\r\n")


def test_python_subprocess_gets_default_sender_a_from_header_and_a_message_id(
    relayd: Relayd,
) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "relayd.sendmail",
            "-C",
            str(relayd.config_path),
            "-oi",
            "-odb",
            "-F",
            "Backup Job",
            "bob@example.org",
        ],
        input=b"Subject: nightly\n\n" + b"x" * 2500 + b"\n",
        capture_output=True,
        timeout=30,
        check=True,
    )
    assert done.returncode == 0
    entry, data = only_message(relayd)
    user = pwd.getpwuid(os.getuid()).pw_name
    assert entry["sender"] == f"{user}@{HOSTNAME}"
    assert f"From: Backup Job <{user}@{HOSTNAME}>\r\n".encode() in data
    assert b"\r\nMessage-ID: <" in data and b"\r\nDate: " in data
    assert max(len(line) for line in data.split(b"\r\n")) <= 998  # the long line was broken


def test_daemon_down_is_exit_75_and_says_so(tmp_path: Path) -> None:
    r = Relayd(tmp_path)  # never started
    with r:
        done = run_sendmail(r, ["a@example.org"], b"Subject: x\n\nbody\n")
    assert done.returncode == 75
    assert b"not running" in done.stderr


def test_a_refused_message_is_a_data_error_and_nothing_is_queued(relayd: Relayd) -> None:
    done = run_sendmail(relayd, ["a@example.org"], b"Subject: x\n\nnul \0 here\n")
    assert done.returncode == 65
    assert b"554 5.6.0" in done.stderr
    assert queue(relayd) == []


def test_no_recipients_and_bad_flags_are_usage_errors(relayd: Relayd) -> None:
    assert run_sendmail(relayd, [], b"Subject: x\n\nbody\n").returncode == 64
    assert run_sendmail(relayd, ["-bs"], b"").returncode == 64
    assert run_sendmail(relayd, ["-Q"], b"").returncode == 64


def test_bp_lists_the_queue_like_relayctl(relayd: Relayd) -> None:
    assert run_sendmail(relayd, ["a@example.org"], b"Subject: x\n\nbody\n").returncode == 0
    (entry,) = queue(relayd)
    done = run_sendmail(relayd, ["-bp"], b"")
    assert done.returncode == 0, done.stderr
    assert str(entry["queue_id"]).encode() in done.stdout


def test_the_socket_refuses_garbage_and_stays_up(relayd: Relayd) -> None:
    path = str(relayd.root / "sendmail.sock")
    assert oct(os.stat(path).st_mode & 0o777) == "0o666"
    for junk in (b"HELO x\r\n", b"RELAYD-SUBMIT 1\n{not json\n", b"RELAYD-SUBMIT 1\n[]\n"):
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(10)
            s.connect(path)
            s.sendall(junk)
            assert s.recv(4096)[:1] == b"5"
    assert run_sendmail(relayd, ["a@example.org"], b"Subject: x\n\nbody\n").returncode == 0


def test_flags_parse_as_sendmail_does() -> None:
    opts = sendmail.parse_args(["-t", "-oi", "-fapp@example.com", "-F", "App", "-odi", "x@y"])
    assert (opts.extract, opts.dots_end, opts.sender, opts.full_name) == (
        True,
        False,
        "app@example.com",
        "App",
    )
    assert opts.recipients == ["x@y"]
    assert sendmail.parse_args(["-f", "<>"]).sender == ""
    assert sendmail.parse_args(["-N", "never", "--", "-odd@example.org"]).recipients == [
        "-odd@example.org"
    ]
