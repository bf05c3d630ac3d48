"""relayctl as an operator uses it (SPEC §1), against a running and a stopped relayd.

relayd runs as a real process and relayctl as a real subprocess, so exit
statuses, stdout and stderr are what a shell or a script sees. One daemon
is shared by the module; every test injects its own messages and looks
only at those. Its single route points at a closed loopback port, so mail
stays queued as deferred and every flush is a quick, real, failed attempt.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shlex
import smtplib
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from support.certs import client_context
from support.relayd_proc import Relayd, send

from relayd import __version__
from relayd.spool.store import Spool
from relayd.units import format_size

PASSWORD = "correct horse battery"
MESSAGE_KEYS = {
    "queue_id",
    "state",
    "queue_name",  # postqueue -j: active, deferred, hold
    "arrival_time",
    "message_size",
    "sender",
    "attempts",
    "next_attempt",
    "recipients",
}
RECIPIENT_KEYS = {"address", "status", "delay_reason"}
UNKNOWN_ID = "01ABCDEFGHJKMNPQ"  # well-formed, never issued
SUMMARY = re.compile(r"^-- (\d+) messages?, \S+; (\d+) active, (\d+) deferred, (\d+) held")


@pytest.fixture(scope="module")
def relayd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Relayd]:
    r = Relayd(tmp_path_factory.mktemp("relayctl"))
    r.add_user("alice@example.com", PASSWORD)
    with r:
        r.start()
        yield r
        assert r.stop() == 0


# ---- helpers ---------------------------------------------------------------------------


def run(
    config: Path,
    *args: str,
    input: bytes | None = None,
    env: dict[str, str] | None = None,
    config_flag: bool = True,
) -> subprocess.CompletedProcess[bytes]:
    """relayctl as a subprocess, bytes in and out, and never a traceback or a colour code."""
    argv = [sys.executable, "-m", "relayd.ctl"]
    if config_flag:
        argv += ["--config", str(config)]
    out = subprocess.run(
        [*argv, *args],
        input=input if input is not None else b"",
        capture_output=True,
        timeout=30,
        check=False,
        env=env,
        start_new_session=True,  # no controlling terminal: a password prompt cannot block
    )
    assert b"Traceback" not in out.stderr, out.stderr.decode()
    assert b"\x1b[" not in out.stdout + out.stderr, "colour codes on a pipe"
    return out


def ctl(r: Relayd, *args: str, input: str | None = None, code: int = 0) -> tuple[str, str]:
    """(stdout, stderr) of relayctl against ``r``; its exit status must be ``code``."""
    out = run(r.config_path, *args, input=input.encode() if input is not None else None)
    stdout, stderr = out.stdout.decode(), out.stderr.decode()
    assert out.returncode == code, (args, out.returncode, stdout, stderr)
    return stdout, stderr


def listing(r: Relayd) -> dict[str, Any]:
    stdout, _ = ctl(r, "--json", "queue")
    doc: dict[str, Any] = json.loads(stdout)
    return doc


def messages(r: Relayd) -> dict[str, dict[str, Any]]:
    return {m["queue_id"]: m for m in listing(r)["messages"]}


def inject(
    r: Relayd, rcpts: list[str], sender: str = "alice@example.com", body: bytes = b"Hello.\r\n"
) -> str:
    """A message from a loopback client (in the default relay networks): its queue id."""
    message = b"From: " + sender.encode() + b"\r\nSubject: relayctl\r\n\r\n" + body
    with r.smtp("inbound") as s:
        s.ehlo("client.test")
        return send(s, sender, rcpts, message)


def wait_for(r: Relayd, qid: str, attempts: int = 1, timeout: float = 10.0) -> dict[str, Any]:
    """The message's listing entry once it has had ``attempts`` attempts.

    Watching the log is cheaper than polling relayctl: every attempt logs a
    ``QUEUE_ID: to=<...>`` line per recipient, and the daemon's state is
    updated by then.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if r.log().count(f"{qid}: to=<") >= attempts:
            entry = messages(r).get(qid)
            if entry is not None and entry["attempts"] >= attempts:
                return entry
        time.sleep(0.05)
    raise TimeoutError(f"{qid}: not {attempts} attempts in {timeout}s: {messages(r).get(qid)}")


def stored(r: Relayd, qid: str) -> bytes:
    return Spool(r.spool).read_data(qid)


def check_json_listing(doc: dict[str, Any], online: bool) -> None:
    assert set(doc) == {"online", "messages"}
    assert doc["online"] is online
    for m in doc["messages"]:
        assert set(m) == MESSAGE_KEYS, m
        assert m["state"] in ("active", "deferred", "held")
        for key in ("arrival_time", "message_size", "attempts", "next_attempt"):
            assert type(m[key]) is int, (key, m)
        assert isinstance(m["sender"], str)
        for rcpt in m["recipients"]:
            assert set(rcpt) == RECIPIENT_KEYS, rcpt
            assert all(isinstance(v, str) for v in rcpt.values())


def check_alignment(table: str) -> list[str]:
    """Every message row lines up under the header; recipients under SENDER. The rows."""
    lines = table.splitlines()
    header = lines[0]
    sender_col = header.index("SENDER / RECIPIENTS")
    left = [header.index(t) for t in ("QUEUE-ID", "STATE", "NEXT")]
    right = [header.index(t) + len(t) for t in ("SIZE", "AGE", "TRIES")]
    rows = []
    for line in lines[1:-1]:
        if not line.startswith(" "):  # a message row
            rows.append(line)
            for col in left:
                assert line[col] != " " and (col == 0 or line[col - 1] == " "), (col, line)
            for end in right:
                assert line[end - 1] != " " and line[end] == " ", (end, line)
            assert line[sender_col - 1] == " " and line[sender_col] != " ", line
        else:  # a pending recipient
            assert line[:sender_col].strip() == "" and line[sender_col] != " ", line
    assert SUMMARY.match(lines[-1]), lines[-1]
    return rows


# ---- the listing -------------------------------------------------------------------------


def test_json_listing_shape_before_and_after_the_command(relayd: Relayd) -> None:
    qid = inject(relayd, ["bob@example.org", "carol@example.net"])
    wait_for(relayd, qid)
    for argv in (
        ("--json", "queue"),
        ("queue", "--json"),
        ("queue", "list", "--json"),
        ("--json", "queue", "list"),
    ):
        stdout, _ = ctl(relayd, *argv)
        doc = json.loads(stdout)  # exactly one document: trailing text would not parse
        check_json_listing(doc, online=True)
        [m] = [m for m in doc["messages"] if m["queue_id"] == qid]
        assert m["state"] == "deferred"
        assert m["sender"] == "alice@example.com"
        assert m["attempts"] >= 1
        assert abs(m["arrival_time"] - time.time()) < 60
        assert m["next_attempt"] > m["arrival_time"]
        assert m["message_size"] == len(stored(relayd, qid))
        assert [r["address"] for r in m["recipients"]] == ["bob@example.org", "carol@example.net"]
        for rcpt in m["recipients"]:
            assert rcpt["status"] == "deferred"
            assert str(relayd.dead_port) in rcpt["delay_reason"]  # the refused connection


def test_table_columns_hold_with_long_addresses(relayd: Relayd) -> None:
    sender = "a.rather.long.sender.address.for.alignment@sender-domain.example.com"
    long_rcpt = "x" * 60 + "@a.very.long.recipient-domain.example.org"
    short = inject(relayd, ["b@example.org"], body=b"x" * 70 + b"\r\n" * 200)
    long = inject(relayd, ["c@example.org", long_rcpt], sender=sender)
    wait_for(relayd, short)
    wait_for(relayd, long)
    sizes = {q: m["message_size"] for q, m in messages(relayd).items()}
    stdout, _ = ctl(relayd, "queue")
    rows = {row.split()[0]: row for row in check_alignment(stdout)}
    assert rows[long].endswith(sender)
    cells = rows[short].split()
    assert cells[1] == format_size(sizes[short])  # a short size: "14K"
    assert re.fullmatch(r"(\d+[smhd]){1,2}", cells[2]), cells[2]  # relative age: "2s"
    assert cells[3] == "deferred"
    assert re.fullmatch(r"(\d+[smhd]){1,2}", cells[5]), cells[5]  # next attempt: "4m58s"
    lines = stdout.splitlines()
    after = lines[lines.index(rows[long]) + 1 : lines.index(rows[long]) + 3]
    assert [line.split()[0] for line in after] == ["c@example.org", long_rcpt]
    assert f":{relayd.dead_port}" in after[1]  # the last error, with the recipient
    total, _active, _deferred, _held = map(int, SUMMARY.match(lines[-1]).groups())  # type: ignore[union-attr]
    assert total == len(sizes)
    assert "offline" not in lines[-1]


def test_show_online(relayd: Relayd) -> None:
    qid = inject(relayd, ["dave@example.org", "erin@example.net"], body=b"show me\r\n")
    wait_for(relayd, qid)
    stdout, _ = ctl(relayd, "queue", "show", qid)
    assert qid in stdout
    assert "<alice@example.com>" in stdout
    assert re.search(r"dave@example\.org\s+deferred\s+4\.\d\.\d", stdout), stdout
    assert re.search(r"erin@example\.net\s+deferred", stdout), stdout
    hop = f"127.0.0.1[127.0.0.1]:{relayd.dead_port}"
    timeline = stdout.split("Delivery attempts:", 1)[1]
    attempt = next(line for line in timeline.splitlines() if hop in line)
    assert re.match(r"\s+\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", attempt), attempt  # when
    assert "tls=none" in attempt and "deferred" in attempt
    assert "Subject: relayctl" in stdout and "show me" not in stdout  # headers, not the body

    raw = run(relayd.config_path, "queue", "show", qid, "--raw")
    assert raw.returncode == 0
    assert raw.stdout == stored(relayd, qid)  # byte for byte, CRLF and all
    assert raw.stdout.endswith(b"\r\n\r\nshow me\r\n")

    doc = json.loads(ctl(relayd, "queue", "show", qid, "--json")[0])
    assert set(doc) >= MESSAGE_KEYS and doc["queue_id"] == qid and doc["history"]


def test_unknown_ids_fail_with_exit_1(relayd: Relayd) -> None:
    for argv in (
        ("queue", "show", UNKNOWN_ID),
        ("queue", "show", "../../etc/passwd"),
        ("queue", "flush", UNKNOWN_ID),
        ("queue", "hold", UNKNOWN_ID),
        ("queue", "release", UNKNOWN_ID),
        ("queue", "delete", UNKNOWN_ID),
    ):
        _, stderr = ctl(relayd, *argv, code=1)
        assert "unknown queue id" in stderr and argv[2] in stderr, (argv, stderr)


def test_usage_errors_exit_2(relayd: Relayd) -> None:
    for argv in (
        (),
        ("bogus",),
        ("--no-such-flag", "status"),
        ("queue", "show"),
        ("queue", "hold"),
        ("queue", "delete"),
        ("queue", "delete", "--all", UNKNOWN_ID),
        ("user", "add"),
        ("dkim", "keygen", "example.com"),
    ):
        _, stderr = ctl(relayd, *argv, code=2)
        assert stderr.strip(), argv


# ---- changing the queue ------------------------------------------------------------------


def test_hold_release_flush(relayd: Relayd) -> None:
    qid = inject(relayd, ["frank@example.org"])
    tries = wait_for(relayd, qid)["attempts"]

    assert "1 message placed on hold" in ctl(relayd, "queue", "hold", qid)[0]
    assert messages(relayd)[qid]["state"] == "held"
    row = next(r for r in check_alignment(ctl(relayd, "queue")[0]) if r.startswith(qid))
    assert row.split()[3:6] == ["held", str(tries), "-"]
    status = json.loads(ctl(relayd, "--json", "status")[0])
    assert status["queue"]["held"] >= 1

    ctl(relayd, "queue", "flush", qid)  # held messages stay put
    time.sleep(0.5)
    assert messages(relayd)[qid]["attempts"] == tries
    assert messages(relayd)[qid]["state"] == "held"

    assert "1 message released" in ctl(relayd, "queue", "release", qid)[0]
    assert messages(relayd)[qid]["state"] == "deferred"

    ctl(relayd, "queue", "flush", qid)
    assert wait_for(relayd, qid, attempts=tries + 1)["state"] == "deferred"
    ctl(relayd, "queue", "flush")  # everything deferred
    wait_for(relayd, qid, attempts=tries + 2)


def test_ids_from_stdin_in_a_pipeline(relayd: Relayd) -> None:
    doomed = [inject(relayd, [f"p{i}@example.org"], sender="pipe@example.com") for i in range(3)]
    kept = inject(relayd, ["q@example.org"], sender="keep@example.com")
    relayctl = f"{shlex.quote(sys.executable)} -m relayd.ctl --config "
    relayctl += shlex.quote(str(relayd.config_path))
    select = (
        "import json, sys\n"
        "for m in json.load(sys.stdin)['messages']:\n"
        "    if m['sender'] == 'pipe@example.com': print(m['queue_id'])\n"
    )
    pipeline = (
        f"{relayctl} --json queue | {shlex.quote(sys.executable)} -c {shlex.quote(select)}"
        f" | {relayctl} queue delete -"
    )
    out = subprocess.run(
        pipeline, shell=True, capture_output=True, text=True, timeout=30, check=False
    )
    assert out.returncode == 0, out.stderr
    assert "3 messages deleted" in out.stdout
    left = messages(relayd)
    assert not set(doomed) & set(left)
    assert kept in left

    ctl(relayd, "queue", "hold", "-", input=f"{kept}\n")
    assert messages(relayd)[kept]["state"] == "held"
    ctl(relayd, "queue", "release", "-", input=f"  {kept}  \n")
    assert messages(relayd)[kept]["state"] != "held"
    # An empty selection does nothing, and is not an error (postsuper -d - alike).
    ctl(relayd, "queue", "delete", "-", input="")
    assert kept in messages(relayd)
    # Thousands of ids (a big queue through jq) get an answer, not a dropped connection.
    many = "\n".join(f"01ABCDEFGH{i:06d}" for i in range(2500))
    _, stderr = ctl(relayd, "queue", "hold", "-", input=many, code=1)
    assert "unknown queue ids" in stderr and "more" in stderr and len(stderr) < 1000


def test_delete_all(relayd: Relayd) -> None:
    inject(relayd, ["g@example.org"])
    inject(relayd, ["h@example.org"])
    assert len(messages(relayd)) >= 2
    stdout, _ = ctl(relayd, "queue", "delete", "--all")
    assert "deleted" in stdout
    assert messages(relayd) == {}
    assert SUMMARY.match(ctl(relayd, "queue")[0].splitlines()[-1])


# ---- status and reload -------------------------------------------------------------------


def test_status_running(relayd: Relayd) -> None:
    inject(relayd, ["status@example.org"])
    stdout, _ = ctl(relayd, "status")
    assert f"relayd {__version__}: running" in stdout
    assert re.search(r"\bup \d+[smhd]", stdout), stdout
    for name in ("inbound", "submission", "submissions"):
        assert f"{name} 127.0.0.1:{relayd.port(name)}" in stdout
    assert re.search(r"queue:\s+\d+ active, \d+ deferred, \d+ held", stdout), stdout
    assert re.search(r"\d+ accepted, \d+ delivered, \d+ deferred, \d+ bounced", stdout), stdout

    doc = json.loads(ctl(relayd, "status", "--json")[0])
    assert doc["running"] is True and doc["version"] == __version__
    assert isinstance(doc["uptime"], int | float) and doc["uptime"] >= 0
    assert len(doc["listeners"]) == 3
    assert set(doc["queue"]) == {"active", "deferred", "held"}
    assert doc["accepted"] >= 1
    for key in ("delivered", "deferred", "bounced"):
        assert isinstance(doc[key], int)


def test_reload_keeps_running_on_a_bad_config(relayd: Relayd) -> None:
    assert "reloaded" in ctl(relayd, "reload")[0]
    good = relayd.config_path.read_text()
    try:
        bad = good + '\n[limits]\nmax_message_size = "lots"\n'
        relayd.config_path.write_text(bad)
        line = bad.splitlines().index('max_message_size = "lots"') + 1
        _, stderr = ctl(relayd, "reload", code=1)
        assert f"{relayd.config_path}:{line}:" in stderr and "max_message_size" in stderr
        relayd.wait_log("reload failed")
        assert relayd.proc is not None and relayd.proc.poll() is None
        # Still up on the old config, and still answering relayctl.
        assert "running" in ctl(relayd, "status")[0]
        inject(relayd, ["after-bad-reload@example.org"])

        broken = good + "\n[limits\n"
        relayd.config_path.write_text(broken)
        _, stderr = ctl(relayd, "reload", code=1)
        assert f"{relayd.config_path}:{len(broken.splitlines())}:" in stderr
        assert relayd.proc.poll() is None
    finally:
        relayd.config_path.write_text(good)
    ctl(relayd, "reload")


# ---- users and keys ----------------------------------------------------------------------


def login(relayd: Relayd, user: str, password: str, source: str = "127.0.0.1") -> int:
    """AUTH PLAIN over implicit TLS: the reply code (one attempt, no LOGIN fallback)."""
    port = relayd.port("submissions")
    with smtplib.SMTP_SSL(
        "127.0.0.1", port, timeout=10, context=client_context(), source_address=(source, 0)
    ) as s:
        s.ehlo("client.test")
        token = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
        code, _ = s.docmd("AUTH", f"PLAIN {token}")
        return code


def test_users_take_effect_without_restart(relayd: Relayd) -> None:
    ctl(relayd, "user", "add", "bob@example.com", "--password-stdin", input="s3cret bob\n")
    assert login(relayd, "bob@example.com", "s3cret bob") == 235
    qid = relayd.submit(
        "bob@example.com",
        "s3cret bob",
        "bob@example.com",
        ["x@example.org"],
        b"Subject: from bob\r\n\r\nhi\r\n",
        name="submissions",
    )
    assert qid in messages(relayd)

    ctl(
        relayd,
        *("user", "add", "app1", "--allow-from", "*@app.test", "--allow-from", "*@app2.test"),
        "--password-stdin",
        input="app secret\n",
    )
    users = {u["name"]: u for u in json.loads(ctl(relayd, "user", "list", "--json")[0])["users"]}
    assert {"alice@example.com", "bob@example.com", "app1"} <= set(users)
    assert users["app1"]["allow_from"] == ["*@app.test", "*@app2.test"]
    table = ctl(relayd, "user", "list")[0].splitlines()
    assert table[0].split() == ["USER", "ALLOWED", "SENDERS"]
    assert any(line.startswith("app1 ") and "*@app.test" in line for line in table)

    ctl(relayd, "user", "passwd", "bob@example.com", "--password-stdin", input="new bob\n")
    assert login(relayd, "bob@example.com", "new bob") == 235
    assert login(relayd, "bob@example.com", "s3cret bob", source="127.0.0.21") == 535
    ctl(relayd, "user", "del", "bob@example.com")
    assert login(relayd, "bob@example.com", "new bob", source="127.0.0.22") == 535
    assert "bob@example.com" not in ctl(relayd, "user", "list")[0]

    assert "no such user" in ctl(relayd, "user", "del", "nobody", code=1)[1]
    ctl(relayd, "user", "passwd", "nobody", "--password-stdin", input="x y z\n", code=1)
    ctl(relayd, "user", "add", "app1", "--password-stdin", input="again\n", code=1)
    ctl(relayd, "user", "add", "carol", "--password-stdin", input="", code=1)  # empty password
    _, stderr = ctl(relayd, "user", "add", "carol", code=2)  # no terminal to prompt on
    assert "--password-stdin" in stderr


def _public_key_b64(pem: bytes) -> str:
    key = serialization.load_pem_private_key(pem, password=None)
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(der).decode()


def _txt_value(stdout: str) -> str:
    record = next(line for line in stdout.splitlines() if "IN TXT" in line)
    return "".join(re.findall(r'"([^"]*)"', record))


def test_dkim_keygen(tmp_path: Path) -> None:
    config = tmp_path / "relayd.toml"
    config.write_text(
        'hostname = "mail.relayd.test"\n'
        '[auth]\nusers_file = "etc/users"\n'
        '[spool]\npath = "spool"\n'
        '[control]\nsocket = "control.sock"\n'
        '[[dkim.key]]\ndomain = "example.com"\nselector = "s1"\n'
        'key_file = "keys/example.com.s1.pem"\n'
    )
    key = tmp_path / "keys" / "example.com.s1.pem"

    out = run(config, "dkim", "keygen", "example.com", "s1")
    assert out.returncode == 0, out.stderr
    stdout = out.stdout.decode()
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert "s1._domainkey.example.com. IN TXT" in stdout
    value = _txt_value(stdout)
    assert value.startswith("v=DKIM1; k=rsa; p=")
    assert value.split("p=", 1)[1] == _public_key_b64(key.read_bytes())

    first = key.read_bytes()
    again = run(config, "dkim", "keygen", "example.com", "s1")
    assert again.returncode == 1 and b"exists" in again.stderr
    assert key.read_bytes() == first
    forced = run(config, "dkim", "keygen", "example.com", "s1", "--force")
    assert forced.returncode == 0 and key.read_bytes() != first
    assert stat.S_IMODE(key.stat().st_mode) == 0o600

    # No [[dkim.key]] for it: a default place next to the users file, and the table to add.
    other = run(config, "dkim", "keygen", "other.test", "s2", "--type", "ed25519")
    assert other.returncode == 0, other.stderr
    default = tmp_path / "etc" / "dkim" / "other.test.s2.key"
    assert stat.S_IMODE(default.stat().st_mode) == 0o600
    assert str(default) in other.stdout.decode() and b"[[dkim.key]]" in other.stdout


# ---- without a daemon, without a config --------------------------------------------------


def test_stopped_daemon(relayd: Relayd) -> None:
    qid = inject(relayd, ["offline@example.org"], body=b"kept while stopped\r\n")
    wait_for(relayd, qid)
    ctl(relayd, "queue", "hold", qid)
    before = messages(relayd)
    assert relayd.stop() == 0
    try:
        stdout, _ = ctl(relayd, "queue")
        assert "offline" in stdout.splitlines()[-1]
        rows = {row.split()[0]: row for row in check_alignment(stdout)}
        assert rows[qid].split()[3] == "held"  # the hold reached the spool
        doc = json.loads(ctl(relayd, "queue", "--json")[0])
        check_json_listing(doc, online=False)
        assert {m["queue_id"] for m in doc["messages"]} == set(before)

        shown, _ = ctl(relayd, "queue", "show", qid)
        assert qid in shown and "offline" in shown and "Subject: relayctl" in shown
        raw = run(relayd.config_path, "queue", "show", qid, "--raw")
        assert raw.returncode == 0 and raw.stdout == stored(relayd, qid)
        ctl(relayd, "queue", "show", UNKNOWN_ID, code=1)

        stdout, _ = ctl(relayd, "status", code=3)
        assert "not running" in stdout
        assert json.loads(ctl(relayd, "status", "--json", code=3)[0])["running"] is False
        for argv in (
            ("queue", "flush"),
            ("queue", "hold", qid),
            ("queue", "delete", "--all"),
            ("reload",),
        ):
            _, stderr = ctl(relayd, *argv, code=3)
            assert "not running" in stderr, argv
        ctl(relayd, "user", "list")  # the users file needs no daemon

        # Killed, not stopped: the socket file is left behind, nobody listens on it.
        relayd.start()
        relayd.kill()
        assert "not running" in ctl(relayd, "status", code=3)[0]
        assert json.loads(ctl(relayd, "--json", "queue")[0])["online"] is False
    finally:
        if relayd.proc is None:
            relayd.start()
    assert messages(relayd)[qid]["state"] == "held"
    ctl(relayd, "queue", "delete", qid)


def test_config_file_problems(relayd: Relayd, tmp_path: Path) -> None:
    missing = tmp_path / "missing.toml"
    for argv in (("queue",), ("user", "list")):
        out = run(missing, *argv)
        assert out.returncode == 1, out
        [line] = out.stderr.decode().splitlines()  # one clear line
        assert str(missing) in line and "cannot read" in line
    # status still answers the question it is for: not running, exit 3.
    out = run(missing, "status")
    assert out.returncode == 3 and b"not running" in out.stdout
    assert "cannot read" in out.stderr.decode()

    # $RELAYD_CONFIG names the config when --config does not.
    env = dict(os.environ, RELAYD_CONFIG=str(relayd.config_path))
    out = run(missing, "status", env=env, config_flag=False)
    assert out.returncode == 0 and b"running" in out.stdout

    # A config broken on disk still lets the operator reach the running daemon.
    good = relayd.config_path.read_text()
    try:
        relayd.config_path.write_text(good + "\nno_such_key = 1\n")
        stdout, stderr = ctl(relayd, "status")
        assert "running" in stdout and "does not load" in stderr
        assert json.loads(ctl(relayd, "--json", "queue")[0])["online"] is True
    finally:
        relayd.config_path.write_text(good)
