"""The spool: what is acknowledged is on disk, survives a kill, and nothing half-written stays.

Everything here uses real files in a temporary directory; the failure tests
use a real kernel-enforced limit (RLIMIT_FSIZE) and a real SIGKILL in a child
process.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import selectors
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relayd.spool import groupcommit, queueid, store
from relayd.spool.model import Attempt, Envelope, Recipient
from relayd.spool.queueid import is_queue_id, new_queue_id, queue_id_time
from relayd.spool.store import (
    CorruptEntry,
    Spool,
    SpoolError,
    decode_header,
    encode_header,
)

pytestmark = pytest.mark.timeout(30)

MESSAGE = (
    b"From: a@example.com\r\nTo: b@example.org\r\nSubject: caf\xc3\xa9\r\n\r\n"
    b"8-bit \xff\xfe\x00 NUL, bare \n and \r inside data, final CRLF\r\n"
)


def envelope(qid: str | None = None, *rcpts: str) -> Envelope:
    return Envelope(
        queue_id=qid or new_queue_id(),
        sender="alice@example.com",
        recipients=[Recipient(r) for r in (rcpts or ("bob@example.org",))],
        arrival_time=1_700_000_000.25,
        size=len(MESSAGE),
        client_ip="10.0.0.7",
        helo="client.example.com",
    )


def tree(root: Path) -> dict[str, tuple[int, int, int]]:
    """Every path under root with (mode, size, mtime_ns): what "unchanged" means."""
    result = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            s = p.lstat()
            result[str(p.relative_to(root))] = (s.st_mode, s.st_size, s.st_mtime_ns)
    return result


def names(d: Path) -> list[str]:
    return sorted(os.listdir(d))


@pytest.fixture
def spool(tmp_path: Path) -> Iterator[Spool]:
    sp = Spool(tmp_path / "spool")
    sp.recover()
    yield sp
    asyncio.run(sp.close())


def commit(sp: Spool, env: Envelope, data: bytes = MESSAGE) -> None:
    asyncio.run(sp.commit(env, data))


# --- queue ids ---------------------------------------------------------------


def test_queue_ids_are_unique_sorted_and_safe_for_log_tools() -> None:
    ids = [new_queue_id() for _ in range(20_000)]
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)
    for qid in ids[:100]:
        assert len(qid) == 16
        assert set(qid) <= set("0123456789ABCDEFGHJKMNPQRSTVWXYZ")
        assert is_queue_id(qid)
    assert abs(queue_id_time(ids[-1]) - time.time()) < 5


def test_queue_ids_keep_increasing_when_the_clock_stands_still_or_steps_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(queueid, "_last", 0)
    clock = iter([2_000_000_000_000_000_000] * 50 + [1_000_000_000_000_000_000] * 50)
    monkeypatch.setattr(queueid, "_clock", lambda: next(clock))
    ids = [new_queue_id() for _ in range(100)]
    assert ids == sorted(ids) and len(set(ids)) == 100


def test_is_queue_id_refuses_paths_and_lowercase() -> None:
    for bad in ["", "../../etc/passwd", "0" * 15, "0" * 17, "0123456789abcdef", "0123456789ABCDEI"]:
        assert not is_queue_id(bad)
    with pytest.raises(ValueError):
        queue_id_time("nope")


def test_queue_id_time_is_the_creation_time(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(queueid, "_last", 0)
    monkeypatch.setattr(queueid, "_clock", lambda: 1_712_345_678_901_234_567)
    assert queue_id_time(new_queue_id()) == 1_712_345_678.901


# --- round trips -------------------------------------------------------------


def test_commit_stores_envelope_and_exact_bytes(spool: Spool) -> None:
    env = envelope()
    commit(spool, env)
    assert spool.load(env.queue_id) == env
    assert spool.read_data(env.queue_id) == MESSAGE
    assert spool.data_size(env.queue_id) == len(MESSAGE)
    assert spool.queue_ids() == [env.queue_id]
    assert names(spool.root / "tmp") == []
    qfile = spool.root / "queue" / env.queue_id
    assert stat.S_IMODE(qfile.stat().st_mode) == 0o600
    assert qfile.read_bytes().startswith(b"RELAYD1 ")
    assert qfile.read_bytes().endswith(MESSAGE)


def test_commit_returns_only_after_data_sync_and_directory_sync(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The file is written and synced where it stays, then queue/ is synced, then 250."""
    events: list[str] = []
    real_fdatasync, real_link, real_sync_dir = os.fdatasync, os.link, groupcommit.sync_dir

    def fdatasync(fd: int) -> None:
        where = Path(os.readlink(f"/proc/self/fd/{fd}"))
        events.append(f"fdatasync {where.parent.name}/{where.name}")
        real_fdatasync(fd)

    def link(src: str, dst: str) -> None:
        events.append(f"link {Path(src).parent.name} -> {Path(dst).parent.name}")
        real_link(src, dst)

    def sync_dir(path: str) -> None:
        events.append("fsync dir " + os.path.basename(path))
        real_sync_dir(path)

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    monkeypatch.setattr(os, "link", link)
    monkeypatch.setattr(groupcommit, "sync_dir", sync_dir)
    env = envelope()
    commit(spool, env)
    events.append("returned")
    assert events == [
        f"fdatasync queue/{env.queue_id}",
        "fsync dir queue",
        "returned",
    ]


def test_empty_message_and_big_message(spool: Spool) -> None:
    small, big = envelope(), envelope()
    data = os.urandom(3_000_000)
    commit(spool, small, b"")
    commit(spool, big, data)
    assert spool.read_data(small.queue_id) == b""
    assert spool.read_data(big.queue_id) == data


def test_directories_are_private_and_created_on_demand(tmp_path: Path) -> None:
    root = tmp_path / "var" / "spool"
    sp = Spool(root)
    assert not root.exists()  # constructing touches nothing
    assert sp.scan() == [] and sp.queue_ids() == []
    assert not root.exists()  # neither does reading
    sp.ensure()
    for d in ("", "tmp", "queue", "state", "corrupt"):
        assert stat.S_IMODE((root / d).stat().st_mode) & 0o077 == 0


def test_a_restarted_daemon_sees_the_same_queue(spool: Spool) -> None:
    envs = [envelope() for _ in range(3)]
    for env in envs:
        commit(spool, env)
    again = Spool(spool.root)
    assert again.recover() == envs
    assert [again.read_data(e.queue_id) for e in envs] == [MESSAGE] * 3


def test_update_overrides_the_accepted_envelope(spool: Spool) -> None:
    env = envelope(None, "bob@example.org", "carol@example.net")
    commit(spool, env)
    env.recipients[0].status = "sent"
    env.recipients[1].status = "deferred"
    env.recipients[1].reply = "451 4.7.1 greylisted"
    env.attempts = 1
    env.history.append(
        Attempt(
            time.time(),
            ["bob@example.org"],
            "mx.example.org",
            "203.0.113.5",
            25,
            "TLSv1.3",
            "250 2.0.0 Ok",
            "2.0.0",
            "sent",
            0.42,
        )
    )
    asyncio.run(spool.update(env))
    env.held = True
    asyncio.run(spool.update(env))
    assert spool.load(env.queue_id) == env
    assert Spool(spool.root).recover() == [env]
    assert spool.read_data(env.queue_id) == MESSAGE
    assert names(spool.root / "state") == [env.queue_id + ".json"]
    assert names(spool.root / "tmp") == []


def test_remove_deletes_message_and_state(spool: Spool) -> None:
    keep, gone = envelope(), envelope()
    commit(spool, keep)
    commit(spool, gone)
    asyncio.run(spool.update(gone))
    asyncio.run(spool.remove(gone.queue_id))
    assert spool.queue_ids() == [keep.queue_id]
    assert names(spool.root / "state") == []
    with pytest.raises(KeyError):
        spool.load(gone.queue_id)
    with pytest.raises(KeyError):
        spool.read_data(gone.queue_id)
    with pytest.raises(KeyError):
        asyncio.run(spool.remove(gone.queue_id))
    assert spool.stats.removes == 1


def test_unknown_or_malformed_ids_are_key_errors(spool: Spool) -> None:
    for qid in (new_queue_id(), "../queue", ""):
        with pytest.raises(KeyError):
            spool.load(qid)
        with pytest.raises(KeyError):
            spool.data_size(qid)
    with pytest.raises(ValueError):
        commit(spool, envelope("../../etc/x"))


def test_free_space_is_what_statvfs_reports(spool: Spool) -> None:
    st_ = os.statvfs(spool.root)
    assert 0 < spool.free_space() <= st_.f_blocks * st_.f_frsize


# --- recovery and read-only listing -----------------------------------------


def make_mess(sp: Spool) -> tuple[list[Envelope], str, str]:
    """A spool after a crash: good entries plus every kind of leftover."""
    good = [envelope() for _ in range(3)]
    for env in good:
        commit(sp, env)
    good[1].attempts = 2
    asyncio.run(sp.update(good[1]))
    (sp.root / "tmp" / new_queue_id()).write_bytes(b"RELAYD1 12 0\n{half")
    (sp.root / "tmp" / "x.7.json").write_bytes(b"{")
    orphan = new_queue_id()
    (sp.root / "state" / f"{orphan}.json").write_text(json.dumps(envelope(orphan).to_dict()))
    torn = envelope()
    commit(sp, torn, b"x" * 5000)
    path = sp.root / "queue" / torn.queue_id
    path.write_bytes(path.read_bytes()[:-100])  # what a crashed file system may leave
    return good, orphan, torn.queue_id


def test_recover_cleans_leftovers_and_returns_complete_entries(spool: Spool) -> None:
    good, orphan, torn = make_mess(spool)
    assert Spool(spool.root).recover() == good
    assert not (spool.root / "state" / f"{orphan}.json").exists()
    assert names(spool.root / "tmp") == []
    assert names(spool.root / "state") == [good[1].queue_id + ".json"]
    assert names(spool.root / "queue") == [e.queue_id for e in good]
    assert names(spool.root / "corrupt") == [torn]
    assert Spool(spool.root).recover() == good  # idempotent


def test_recover_moves_garbage_headers_and_bad_state_aside(spool: Spool) -> None:
    env = envelope()
    commit(spool, env)
    (spool.root / "state" / f"{env.queue_id}.json").write_bytes(b'{"queue_id": tru')
    junk = new_queue_id()
    (spool.root / "queue" / junk).write_bytes(b"\x00" * 4096)
    (spool.root / "queue" / "README").write_bytes(b"not ours")
    assert Spool(spool.root).recover() == [env]  # the accepted envelope: deliver, not lose
    assert names(spool.root / "corrupt") == sorted([junk, "README", f"{env.queue_id}.json"])


def test_recover_deletes_an_empty_queue_file(spool: Spool) -> None:
    """A process killed between creating a queue file and writing it left it empty:
    never answered 250 and nothing in it, so it goes, and not to corrupt/."""
    env = envelope()
    commit(spool, env)
    empty = new_queue_id()
    (spool.root / "queue" / empty).touch()
    assert Spool(spool.root).recover() == [env]
    assert names(spool.root / "queue") == [env.queue_id]
    assert names(spool.root / "corrupt") == []


def test_scan_never_modifies_the_spool(spool: Spool) -> None:
    good, _, torn = make_mess(spool)
    before = tree(spool.root)
    assert spool.scan() == good
    assert tree(spool.root) == before
    with pytest.raises(CorruptEntry):
        spool.load(torn)


def test_scan_tolerates_messages_vanishing(spool: Spool) -> None:
    envs = [envelope() for _ in range(60)]

    async def fill() -> None:
        await asyncio.gather(*(spool.commit(e, MESSAGE) for e in envs))

    asyncio.run(fill())
    stop = threading.Event()

    def remover() -> None:
        loop = asyncio.new_event_loop()
        try:
            for env in envs:
                loop.run_until_complete(spool.remove(env.queue_id))
        finally:
            loop.close()
            stop.set()

    t = threading.Thread(target=remover)
    t.start()
    seen = 0
    while not stop.is_set() or seen == 0:
        listing = spool.scan()
        assert [e.queue_id for e in listing] == sorted(e.queue_id for e in listing)
        seen += 1
    t.join(timeout=10)
    assert spool.scan() == []


# --- group commit ------------------------------------------------------------


def test_concurrent_commits_are_all_durable_and_share_fsyncs(spool: Spool) -> None:
    envs = [envelope() for _ in range(200)]

    async def many() -> None:
        await asyncio.gather(*(spool.commit(e, MESSAGE + e.queue_id.encode()) for e in envs))

    asyncio.run(many())
    assert spool.stats.commits == 200
    assert spool.stats.batches < 200
    assert spool.stats.dir_syncs < 200
    recovered = Spool(spool.root).recover()
    assert recovered == sorted(envs, key=lambda e: e.queue_id)
    for env in envs:
        assert spool.read_data(env.queue_id) == MESSAGE + env.queue_id.encode()


def test_failed_directory_fsync_fails_the_whole_batch_and_leaves_nothing(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = groupcommit.sync_dir

    def broken(path: str) -> None:
        if path.endswith("queue"):
            raise OSError(errno.EIO, "Input/output error")
        real(path)

    monkeypatch.setattr(groupcommit, "sync_dir", broken)

    async def batch() -> list[BaseException | None]:
        return await asyncio.gather(
            *(spool.commit(envelope(), MESSAGE) for _ in range(20)), return_exceptions=True
        )

    results = asyncio.run(batch())
    assert all(isinstance(r, SpoolError) for r in results)
    assert names(spool.root / "queue") == [] and names(spool.root / "tmp") == []


def test_one_failed_write_fails_only_its_own_commit(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    envs = [envelope() for _ in range(10)]
    unlucky = envs[4].queue_id
    real = os.fdatasync

    def fdatasync(fd: int) -> None:
        if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")) == unlucky:
            raise OSError(errno.EIO, "Input/output error")
        real(fd)

    monkeypatch.setattr(os, "fdatasync", fdatasync)

    async def batch() -> list[BaseException | None]:
        return await asyncio.gather(
            *(spool.commit(e, MESSAGE) for e in envs), return_exceptions=True
        )

    results = asyncio.run(batch())
    assert [type(r).__name__ for r in results] == ["NoneType"] * 4 + ["SpoolError"] + [
        "NoneType"
    ] * 5
    assert spool.queue_ids() == [e.queue_id for e in envs if e.queue_id != unlucky]
    assert names(spool.root / "tmp") == []


def test_cancelled_commit_leaves_no_message(spool: Spool) -> None:
    async def cancel_midway() -> None:
        task = asyncio.create_task(spool.commit(envelope(), MESSAGE))
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await spool.close()

    asyncio.run(cancel_midway())
    assert spool.queue_ids() == [] and names(spool.root / "tmp") == []


# --- real failures in a child process ----------------------------------------

EFBIG_CHILD = """
import asyncio, json, resource, signal, sys
from pathlib import Path
from relayd.spool.model import Envelope, Recipient
from relayd.spool.queueid import new_queue_id
from relayd.spool.store import Spool, SpoolError

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
sp = Spool(Path(sys.argv[1]))
sp.recover()
resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))

def env():
    return Envelope(new_queue_id(), "a@example.com", [Recipient("b@example.org")], 0.0)

async def main():
    small = [env() for _ in range(5)]
    big = env()
    coros = [sp.commit(e, b"ok\\r\\n") for e in small] + [sp.commit(big, b"x" * 1_000_000)]
    results = await asyncio.gather(*coros, return_exceptions=True)
    await sp.close()
    print(json.dumps({
        "ok": [e.queue_id for e, r in zip(small, results) if r is None],
        "big": big.queue_id,
        "big_error": type(results[-1]).__name__,
        "cause": str(results[-1].__cause__),
    }))

asyncio.run(main())
"""


def test_disk_full_style_failure_raises_spool_error_and_leaves_nothing(tmp_path: Path) -> None:
    root = tmp_path / "spool"
    proc = subprocess.run(
        [sys.executable, "-c", EFBIG_CHILD, str(root)], capture_output=True, timeout=20, check=True
    )
    out = json.loads(proc.stdout)
    assert out["big_error"] == "SpoolError"
    assert "too large" in out["cause"].lower()  # EFBIG from the kernel
    assert len(out["ok"]) == 5  # the others in the batch are unaffected
    assert names(root / "tmp") == []
    assert names(root / "queue") == sorted(out["ok"])
    assert out["big"] not in Spool(root).queue_ids()


CRASH_CHILD = """
import asyncio, sys, time
from pathlib import Path
from relayd.spool.model import Envelope, Recipient
from relayd.spool.queueid import new_queue_id
from relayd.spool.store import Spool

sp = Spool(Path(sys.argv[1]))
sp.recover()

async def committer():
    for _ in range(2000):
        env = Envelope(new_queue_id(), "a@example.com", [Recipient("b@example.org")], time.time())
        await sp.commit(env, b"Subject: crash\\r\\n\\r\\n" + env.queue_id.encode() + b"\\r\\n")
        sys.stdout.write(env.queue_id + "\\n")
        sys.stdout.flush()

async def main():
    await asyncio.gather(*(committer() for _ in range(8)))

asyncio.run(main())
"""


def read_ids(proc: subprocess.Popen[bytes], want: int, timeout: float) -> list[str]:
    """Lines the child printed, until ``want`` of them or the deadline."""
    assert proc.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    buf = b""
    deadline = time.monotonic() + timeout
    try:
        while buf.count(b"\n") < want and time.monotonic() < deadline:
            if sel.select(timeout=max(0.0, deadline - time.monotonic())):
                chunk = os.read(proc.stdout.fileno(), 65536)
                if not chunk:
                    break
                buf += chunk
    finally:
        sel.close()
    return buf.decode().splitlines()[: buf.count(b"\n")]


def test_sigkill_loses_no_acknowledged_message(tmp_path: Path) -> None:
    root = tmp_path / "spool"
    proc = subprocess.Popen(
        [sys.executable, "-c", CRASH_CHILD, str(root)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        acknowledged = read_ids(proc, 300, timeout=20)
        proc.send_signal(signal.SIGKILL)
        # Whatever was in the pipe was acknowledged before the kill, too.
        assert proc.wait(timeout=10) == -signal.SIGKILL  # killed mid-run, not finished
        assert proc.stdout is not None
        acknowledged += proc.stdout.read().decode().splitlines()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()
    acknowledged = [i for i in acknowledged if is_queue_id(i)]
    assert len(acknowledged) >= 300
    sp = Spool(root)
    recovered = {e.queue_id: e for e in sp.recover()}
    for qid in acknowledged:
        assert qid in recovered
        assert sp.read_data(qid).endswith(qid.encode() + b"\r\n")
    assert names(root / "tmp") == []
    assert names(root / "corrupt") == []


# --- the header format, for any envelope -----------------------------------

texts = st.text(max_size=30)
floats = st.floats(allow_nan=False, allow_infinity=False)
attempts = st.builds(
    Attempt,
    time=floats,
    recipients=st.lists(texts, max_size=3),
    host=texts,
    address=texts,
    port=st.integers(0, 65535),
    tls=st.none() | texts,
    reply=texts,
    dsn=texts,
    status=st.sampled_from(["sent", "deferred", "failed"]),
    duration=floats,
)
recipients = st.builds(
    Recipient,
    address=texts,
    status=st.sampled_from(["pending", "deferred", "sent", "failed"]),
    dsn=texts,
    reply=texts,
    remote_host=texts,
    delay_warned=st.booleans(),
)
envelopes = st.builds(
    Envelope,
    queue_id=st.builds(lambda: new_queue_id()),
    sender=texts,
    recipients=st.lists(recipients, max_size=4),
    arrival_time=floats,
    size=st.integers(0, 2**40),
    client_ip=texts,
    client_name=texts,
    helo=texts,
    listener=texts,
    sasl_username=texts,
    smtputf8=st.booleans(),
    body_8bit=st.booleans(),
    is_bounce=st.booleans(),
    held=st.booleans(),
    attempts=st.integers(0, 1000),
    next_attempt=floats,
    history=st.lists(attempts, max_size=3),
)


@given(envelopes, st.integers(0, 10**9))
def test_header_round_trips_any_envelope(env: Envelope, data_size: int) -> None:
    head = encode_header(env, data_size)
    assert head.startswith(b"RELAYD1 ") and head.endswith(b"\n")
    assert decode_header(head, len(head) + data_size) == (env, len(head))
    with pytest.raises(CorruptEntry):
        decode_header(head, len(head) + data_size - 1)
    with pytest.raises(CorruptEntry):
        decode_header(head[: len(head) // 2], len(head) + data_size)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(envelopes, st.binary(max_size=2000))
def test_store_round_trips_any_envelope_and_data(env: Envelope, data: bytes) -> None:
    with tempfile.TemporaryDirectory() as d:
        sp = Spool(Path(d))
        sp.recover()
        asyncio.run(sp.commit(env, data))
        assert Spool(Path(d)).recover() == [env]
        assert sp.read_data(env.queue_id) == data
        env.attempts += 1
        asyncio.run(sp.update(env))
        assert sp.load(env.queue_id) == env
        asyncio.run(sp.close())


def test_a_colliding_queue_id_never_replaces_a_queued_message(tmp_path: Path) -> None:
    """Same id twice (a clock stepped back across a restart): the second commit fails."""
    spool = store.Spool(tmp_path / "spool")
    spool.ensure()
    first = Envelope(
        queue_id=queueid.new_queue_id(),
        sender="a@x.test",
        recipients=[Recipient("b@y.test")],
        arrival_time=1.0,
    )
    asyncio.run(spool.commit(first, b"Subject: first\r\n\r\none\r\n"))
    second = Envelope(
        queue_id=first.queue_id,
        sender="c@x.test",
        recipients=[Recipient("d@y.test")],
        arrival_time=2.0,
    )
    with pytest.raises(store.SpoolError):
        asyncio.run(spool.commit(second, b"Subject: second\r\n\r\ntwo\r\n"))
    assert spool.read_data(first.queue_id) == b"Subject: first\r\n\r\none\r\n"
    assert spool.load(first.queue_id).sender == "a@x.test"
    assert not any((tmp_path / "spool" / "tmp").iterdir())


def test_recovery_waits_for_a_process_still_holding_the_spool(tmp_path: Path) -> None:
    """An acceptor of an earlier daemon holds the lock shared; the exclusive one waits for it."""
    root = tmp_path / "spool"
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; from relayd.spool.store import Spool; "
            f"s = Spool(Path({str(root)!r})); assert s.lock(False); print('held', flush=True); "
            "time.sleep(30)",
        ],
        stdout=subprocess.PIPE,
    )
    try:
        assert child.stdout is not None and child.stdout.readline() == b"held\n"
        daemon = Spool(root)
        assert not daemon.lock(True)
        assert not asyncio.run(daemon.hold_lock(True, patience=0.3))
        assert daemon.lock(False)  # sharing is fine: acceptors of one daemon
        child.kill()
        child.wait(timeout=10)
        assert asyncio.run(daemon.hold_lock(True, patience=5.0))
    finally:
        child.kill()
        child.wait(timeout=10)


# --- the group committer ---------------------------------------------------------


def _settled(op: groupcommit.Op) -> threading.Event:
    event = threading.Event()
    op.done = event.set
    return event


@contextlib.contextmanager
def _leader_busy(committer: groupcommit.GroupCommitter, tmp_path: Path) -> Iterator[groupcommit.Op]:
    """A thread leads a batch whose one op is held until the block ends: whatever
    is queued meanwhile forms the next batch."""
    started, release = threading.Event(), threading.Event()

    def slow_first() -> bool:
        started.set()
        release.wait(10)
        return True

    first = groupcommit.Op(apply=slow_first, dirs=(str(tmp_path),))
    done = _settled(first)
    leader = threading.Thread(target=committer.join, args=(first,))
    leader.start()
    assert started.wait(10)
    try:
        yield first
    finally:
        release.set()
        leader.join(10)
    assert done.wait(10) and first.outcome() is True


def test_committer_batches_what_arrives_during_a_sync(tmp_path: Path) -> None:
    """Ops queued while one batch's fsync runs form the next batch: one fsync for them all.

    The thread that leads does the work; a writer joining meanwhile is free
    at once, and an op from the loop (submit) waits for no thread either.
    """
    committer = groupcommit.GroupCommitter()
    later = [groupcommit.Op(apply=lambda: True, dirs=(str(tmp_path),)) for _ in range(10)]
    done = [_settled(op) for op in later]
    with _leader_busy(committer, tmp_path):
        for op in later[:5]:
            committer.submit(op)
        joiners = [threading.Thread(target=committer.join, args=(op,)) for op in later[5:]]
        for joiner in joiners:
            joiner.start()
        for joiner in joiners:
            joiner.join(10)
            assert not joiner.is_alive()  # left its op to the leader
        assert not any(event.is_set() for event in done)  # nothing durable before the fsync
    assert all(event.wait(10) for event in done)
    assert committer.batches == 2 and committer.dir_syncs == 2
    assert all(op.outcome() is True for op in later)
    committer.close()


def test_committer_thread_leads_what_the_loop_submits(tmp_path: Path) -> None:
    """submit() never blocks its caller: with nobody leading, the committer's own thread does."""
    committer = groupcommit.GroupCommitter()
    ops = [groupcommit.Op(apply=lambda: True, dirs=(str(tmp_path),)) for _ in range(3)]
    for op in ops:
        event = _settled(op)
        committer.submit(op)
        assert event.wait(10) and op.outcome() is True
    assert committer.dir_syncs == 3
    committer.close()


def test_committer_hands_a_crash_to_every_waiter_of_the_batch(tmp_path: Path) -> None:
    """A bug in one op's code must not leave its batch's waiters blocked for ever."""
    committer = groupcommit.GroupCommitter()

    def boom() -> bool:
        raise RuntimeError("bug")

    broken = groupcommit.Op(apply=boom, dirs=(str(tmp_path),))
    event = _settled(broken)
    committer.join(broken)
    assert event.wait(10)
    with pytest.raises(RuntimeError):
        broken.outcome()
    fine = groupcommit.Op(apply=lambda: True, dirs=(str(tmp_path),))
    event = _settled(fine)
    committer.join(fine)  # the crash left nobody stuck leading
    assert event.wait(10) and fine.outcome() is True
    committer.close()


def test_committer_undoes_what_a_crashed_batch_applied(tmp_path: Path) -> None:
    """A bug in one op fails its whole batch, and the ops applied before it are undone:
    a client told 451 must not find its message delivered."""
    committer = groupcommit.GroupCommitter()

    def boom() -> bool:
        raise RuntimeError("bug")

    undone = threading.Event()
    applied = groupcommit.Op(apply=lambda: True, dirs=(str(tmp_path),), undo=undone.set)
    broken = groupcommit.Op(apply=boom, dirs=(str(tmp_path),))
    events = [_settled(op) for op in (applied, broken)]
    with _leader_busy(committer, tmp_path):
        committer.join(applied)  # both wait for the next batch, together
        committer.join(broken)
    assert all(event.wait(10) for event in events)
    for op in (applied, broken):
        with pytest.raises(RuntimeError):
            op.outcome()
    assert undone.is_set()
    committer.close()


def test_committer_thread_that_cannot_start_leaves_nobody_waiting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No thread for submit(): the caller hears it, and the op is led by the next joiner."""
    committer = groupcommit.GroupCommitter()

    def refuse(self: threading.Thread) -> None:
        raise RuntimeError("can't start new thread")

    op = groupcommit.Op(apply=lambda: True, dirs=(str(tmp_path),))
    event = _settled(op)
    with monkeypatch.context() as patch:
        patch.setattr(threading.Thread, "start", refuse)
        with pytest.raises(RuntimeError):
            committer.submit(op)
    later = groupcommit.Op(apply=lambda: True, dirs=(str(tmp_path),))
    later_event = _settled(later)
    committer.join(later)
    assert event.wait(10) and later_event.wait(10)
    assert op.outcome() is True and later.outcome() is True
    committer.close()


def test_a_commit_whose_hand_over_breaks_is_refused_not_left_waiting(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug between the file's sync and the group commit reaches the session as
    SpoolError (451) within the test's deadline, and a removal's as SpoolError too."""

    def broken(self: groupcommit.GroupCommitter, op: groupcommit.Op) -> None:
        raise RuntimeError("bug")

    monkeypatch.setattr(groupcommit.GroupCommitter, "join", broken)
    with pytest.raises(SpoolError, match="bug"):
        asyncio.run(asyncio.wait_for(spool.commit(envelope(), MESSAGE), 10))
    monkeypatch.setattr(groupcommit.GroupCommitter, "submit", broken)
    (spool.root / "queue" / (qid := new_queue_id())).write_bytes(b"x")
    with pytest.raises(SpoolError, match="bug"):
        asyncio.run(asyncio.wait_for(spool.remove(qid), 10))
