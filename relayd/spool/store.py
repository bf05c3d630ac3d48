"""The durable spool: where a message lives from ``250 queued as`` to removal.

How this works
--------------
Under the spool root (directories mode 0700, files 0600)::

    tmp/      state files being written, spilled DATA; garbage at start
    lock      held shared by every process that writes, exclusive for recovery
    queue/    ID        one immutable file per message
    state/    ID.json   the envelope as changed since accept (attempts, hold)
    corrupt/  files recovery could not read, kept for the operator

A queue file is a header line ``RELAYD1 <json-length> <data-length>\\n``, the
envelope JSON as accepted, ``\\n``, then the message bytes exactly as received.
The data length is there so that a file torn by a crashed file system is
recognised (its size does not add up) instead of being delivered truncated.
One file per message means one data fsync per message on the accept path.

Accept (``commit``): a worker thread creates queue/ID (``O_EXCL``: a queue id
collision fails that one commit instead of overwriting an acknowledged
message), writes it and fdatasyncs it; then the group committer fsyncs queue/
once for the whole batch, and only then wakes the callers. That directory
fsync is the commit point: after it the message survives any crash and the
session may answer 250. On ext4 and xfs the file's fdatasync already commits
its directory entry (the journal commits in order), so the directory fsync
finds nothing left to wait for; on other file systems it is what makes the
entry durable. The file is written under its final name for that reason:
a tmp/ file linked into queue/ afterwards cost a second journal commit per
batch. Before the 250 the file may be torn or whole: recovery moves a torn
one (its size does not add up) to corrupt/ and delivers a whole one, at worst
a duplicate of the client's retry, never a loss; the daemon's rescan after an
acceptor's death leaves young files alone (relayd.daemon). A failure anywhere
(EFBIG, ENOSPC, EIO) unlinks what this caller wrote and raises SpoolError;
if the directory fsync itself fails, every message of that batch is unlinked
from queue/ again before the callers see SpoolError, so a message answered
with 451 is never delivered.

Later changes (``update``) go to state/ID.json by tmp + fdatasync + rename +
fsync of state/; a crash leaves the old or the new state, never a mix, and
the state file, when present, overrides the envelope in the queue file.
``remove`` unlinks queue/ID and then state/ID.json, without a directory
fsync (as Postfix): a crash right after may bring the message back, to be
delivered again (at least once, never lost). The journal of ext4 or xfs
keeps the two unlinks in order, so a crash in between leaves at worst a
state file without its message, which recovery deletes; the opposite order
could leave the message with its as-accepted envelope and deliver again to
recipients already sent.

At start ``recover`` empties tmp/, deletes empty queue files (a process
killed between creating one and its first write; never acknowledged),
moves unreadable queue files (bad header,
size that does not add up) to corrupt/ with a warning, deletes state files
whose message is gone, moves an unreadable state file to corrupt/ and falls
back to the accepted envelope (at least once, never lost), and returns every
entry by queue id, i.e. by arrival.

Group commit, measured
----------------------
Every durable step is fsync-bound, so concurrent sessions share the cost:
each message's data fdatasync runs in its own worker thread (concurrent
fsyncs join the same journal commit) and one directory fsync covers a batch,
i.e. 1 + 1/batch fsyncs per message. 2 KB messages, ext4 on a 2-core VM
with a virtio disk shared with other busy jobs, 2-3 s runs (ranges over
repeated, interleaved runs; the disk's flush latency dominates):

    20 committers, fdatasync in 20 parallel threads (kept)  550-870 msg/s,
                   ~7 messages per directory fsync          (best run 2150)
    20 committers, fdatasync sequential in the batch thread 130-700 msg/s
    20 committers, 4 writer threads                         240-510 msg/s
    1 committer (2 fsyncs per message, ~2.5 ms)             360-420 msg/s
                   (70-170 msg/s while other jobs flushed the same disk)

Sequential syncing gets 20 messages per batch but pays 20 journal commits
in a row; parallel threads let the file system merge them. fsync instead of
fdatasync made no measurable difference (a new file's size must be synced
either way); fdatasync is kept as it never does more work. Directories are
flat: ext4 and xfs index large directories, and hashed subdirectories
would add a directory fsync per subdirectory a batch touches.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import functools
import itertools
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from relayd.spool.groupcommit import GroupCommitter, Op
from relayd.spool.handoff import Workers
from relayd.spool.model import Envelope
from relayd.spool.queueid import is_queue_id

log = logging.getLogger("relayd.qmgr")

Tail = tuple[str, int]  # a file holding the rest of a message, and where that rest starts

MAGIC = b"RELAYD1"
_HEADER_MAX = 64  # "RELAYD1 " + two decimal lengths + "\n" always fits
_WRITE_THREADS = 20
_DIR_MODE = 0o700
_FILE_MODE = 0o600
LOCK_PATIENCE = 60.0  # seconds: an earlier daemon's acceptors drain for at most 30
# Unique temporary names without a getrandom() call per state write.
_TMP_SEQ = itertools.count()
_STATE_SUFFIX = ".json"


class SpoolError(Exception):
    """A write to the spool failed and nothing of it was left behind (answer 451 4.3.0)."""


class CorruptEntry(ValueError):
    """A queue file exists but cannot be read back; recover() moves it to corrupt/."""


@dataclass
class SpoolStats:
    """Counters that show whether group commit is working (dir_syncs << commits)."""

    commits: int = 0
    updates: int = 0
    removes: int = 0
    batches: int = 0  # rounds of the group committer
    file_syncs: int = 0
    dir_syncs: int = 0


# --- the file format -------------------------------------------------------


def encode_header(envelope: Envelope, data_size: int) -> bytes:
    """Header line, envelope JSON and separator: everything before the data.

    ASCII-only JSON so that any str the session produced (even lone
    surrogates from undecodable bytes) round-trips exactly.
    """
    body = json.dumps(envelope.to_dict(), separators=(",", ":")).encode("ascii")
    return b"%s %d %d\n%s\n" % (MAGIC, len(body), data_size, body)


def _parse_first_line(head: bytes) -> tuple[int, int, int]:
    """(header length, JSON length, data length) from the start of a queue file."""
    end = head.find(b"\n", 0, _HEADER_MAX)
    if end < 0:
        raise CorruptEntry("no header line")
    fields = head[:end].split(b" ")
    if len(fields) != 3 or fields[0] != MAGIC or not all(f.isdigit() for f in fields[1:]):
        raise CorruptEntry(f"bad header line {head[:end]!r}")
    return end + 1, int(fields[1]), int(fields[2])


def _parse_envelope(body: bytes) -> Envelope:
    try:
        value: Any = json.loads(body)
        if not isinstance(value, dict):
            raise ValueError("envelope is not a JSON object")
        return Envelope.from_dict(value)
    except (ValueError, TypeError) as e:
        raise CorruptEntry(f"bad envelope: {e}") from e


def decode_header(blob: bytes, file_size: int) -> tuple[Envelope, int]:
    """(envelope, offset of the data) from a queue file's first bytes.

    ``blob`` must hold at least the header and the JSON; ``file_size`` is the
    whole file's size, checked against the lengths the header announces.
    """
    start, json_len, data_len = _parse_first_line(blob)
    offset = start + json_len + 1
    if file_size != offset + data_len:
        raise CorruptEntry(f"size {file_size} does not match header ({offset + data_len})")
    if len(blob) < offset or blob[offset - 1 : offset] != b"\n":
        raise CorruptEntry("envelope not terminated")
    return _parse_envelope(blob[start : offset - 1]), offset


# --- blocking helpers (always run in a worker thread) ------------------------


def write_all(fd: int, data: bytes | bytearray | memoryview) -> int:
    """All of ``data`` to ``fd``, however many writes it takes; its length."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
    return len(data)


def _write_parts(fd: int, parts: Sequence[bytes]) -> None:
    """All of ``parts`` with one writev as a rule (each call is a GIL hand-off in a thread)."""
    views = [memoryview(p) for p in parts if p]
    while views:
        done = os.writev(fd, views)
        while views and done >= len(views[0]):
            done -= len(views[0])
            views.pop(0)
        if views and done:
            views[0] = views[0][done:]


def _copy_tail(fd: int, tail: Tail) -> None:
    """Append the file ``tail`` names, from its offset on, in the kernel where it can."""
    path, offset = tail
    src = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(src).st_size
        while offset < size:
            try:
                done = os.copy_file_range(src, fd, size - offset, offset)
            except OSError:  # another file system, or a kernel without it
                done = write_all(fd, os.pread(src, min(size - offset, 1 << 20), offset))
            if done == 0:
                raise OSError(errno.EIO, f"{path} shrank while being spooled")
            offset += done
    finally:
        os.close(src)


def _write_file(path: str, parts: Sequence[bytes], tail: Tail | None = None) -> None:
    """Create ``path``, write ``parts`` (then ``tail``), fdatasync; on any error unlink it."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, _FILE_MODE)
    try:
        try:
            _write_parts(fd, parts)
            if tail is not None:
                _copy_tail(fd, tail)
            os.fdatasync(fd)
        finally:
            os.close(fd)
    except BaseException:
        _unlink_quiet(path)
        raise


class _NotWritten(Exception):
    """The file could not be written and synced (it is unlinked again)."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(error)
        self.error = error


def _write_and_join(
    path: str,
    parts: Sequence[bytes],
    tail: Tail | None,
    committer: GroupCommitter,
    then: Op,
) -> None:
    """In a writer thread: write and sync ``path``, then hand ``then`` to the group committer.

    The thread leads the batch if nobody does and is free otherwise; the
    event loop hears once, from ``then.done``, when it is all durable (or
    failed, the error in ``then.error``).
    """
    try:
        _write_file(path, parts, tail)
    except BaseException as e:
        then.error = _NotWritten(e)
        then.done()
        return
    try:
        committer.join(then)
    except BaseException as e:  # a bug: the awaiter must not wait for ever (a second
        then.error = then.error or e  # settling, should the op be led after all, is ignored)
        then.done()
        raise


def _unlink_quiet(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


def _rename(src: str, dst: str) -> bool:
    os.rename(src, dst)
    return True


def _in_place() -> bool:
    """A new queue file is written where it stays: only its directory needs syncing."""
    return True


def _remove_files(message: str, state: str) -> bool:
    """Unlink a message, then its state file (in this order: see the module doc)."""
    found = _unlink_if_present(message)
    _unlink_quiet(state)
    return found


def _is_empty(path: str) -> bool:
    try:
        return os.stat(path).st_size == 0
    except OSError:
        return False


def _unlink_if_present(path: str) -> bool:
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    return True


# --- the spool ---------------------------------------------------------------


class Spool:
    """The queue on disk. Construction touches nothing; ``ensure``/``recover`` create.

    The daemon calls ``recover()`` once at start, before the first write.

    ``commit``, ``update`` and ``remove`` are coroutines whose disk work runs
    in threads; the read methods are plain functions that never modify the
    spool, so relayctl may call them on a running daemon's or a stopped one's
    spool.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._stats = SpoolStats()
        self._tmp = str(self.root / "tmp")
        self._queue = str(self.root / "queue")
        self._state = str(self.root / "state")
        self._corrupt = str(self.root / "corrupt")
        self._committer = GroupCommitter()
        self._writers: Workers | None = None
        self._background: set[asyncio.Future[None]] = set()
        self._lock_fd: int | None = None

    # -- setup and recovery

    def ensure(self) -> None:
        """Create the root and its subdirectories (mode 0700) where missing."""
        for d in (str(self.root), self._tmp, self._queue, self._state, self._corrupt):
            os.makedirs(d, mode=_DIR_MODE, exist_ok=True)

    async def hold_lock(self, exclusive: bool, patience: float = LOCK_PATIENCE) -> bool:
        """:meth:`lock`, waiting up to ``patience`` seconds; False if it never came."""
        deadline = time.monotonic() + patience
        while not self.lock(exclusive):
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.1)
        return True

    def lock(self, exclusive: bool) -> bool:
        """Take the spool's lock (``lock`` in its root): False if it is held the other way.

        Every writing process holds it shared for its life; the daemon takes
        it exclusive for ``recover`` and then shares it. Queue files are
        written under their final name, so recovery must not run while an
        acceptor of an earlier daemon may still be committing one: it would
        move the unfinished file to corrupt/ (or delete it, still empty), and
        that acceptor would then answer 250 for it.
        """
        if self._lock_fd is None:
            self.ensure()
            self._lock_fd = os.open(
                os.path.join(self.root, "lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, _FILE_MODE
            )
        try:
            fcntl.flock(
                self._lock_fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB
            )
        except BlockingIOError:
            return False
        return True

    def recover(self) -> list[Envelope]:
        """Make the spool consistent after a stop or crash; every entry by arrival.

        Only the daemon calls this, at start, before anything else writes
        (it holds :meth:`lock` exclusive meanwhile).
        """
        self.ensure()
        for name in os.listdir(self._tmp):
            _unlink_quiet(os.path.join(self._tmp, name))
        entries: dict[str, Envelope] = {}
        for name in sorted(os.listdir(self._queue)):
            env = self._recover_queue_file(name)
            if env is not None:
                entries[name] = env
        for name in os.listdir(self._state):
            qid = name.removesuffix(_STATE_SUFFIX)
            if qid in entries:
                entries[qid] = self._recover_state_file(qid, entries[qid])
            else:
                log.info("%s: removing state file without message", qid)
                _unlink_quiet(os.path.join(self._state, name))
        return [entries[qid] for qid in sorted(entries)]

    def _recover_queue_file(self, name: str) -> Envelope | None:
        path = os.path.join(self._queue, name)
        if is_queue_id(name) and _is_empty(path):
            # Created, then the process died before its first write: never
            # answered 250 (that needs the whole file synced), and nothing to keep.
            log.info("%s: removing empty queue file (its write was interrupted)", name)
            _unlink_quiet(path)
            return None
        try:
            if not is_queue_id(name):
                raise CorruptEntry("file name is not a queue id")
            env, _, _ = self._read_head(name)
            if env.queue_id != name:
                raise CorruptEntry(f"envelope says queue id {env.queue_id!r}")
            return env
        except (CorruptEntry, KeyError, OSError) as e:
            log.warning("%s: unreadable queue file moved to corrupt/: %s", name, e)
            self._move_to_corrupt(os.path.join(self._queue, name), name)
            return None

    def _recover_state_file(self, qid: str, accepted: Envelope) -> Envelope:
        try:
            state = self._read_state(qid)
        except CorruptEntry as e:
            log.warning(
                "%s: unreadable state moved to corrupt/, using the accepted envelope: %s", qid, e
            )
            self._move_to_corrupt(self._state_path(qid), qid + _STATE_SUFFIX)
            return accepted
        return state if state is not None else accepted

    def _move_to_corrupt(self, path: str, name: str) -> None:
        """Keep what we cannot read for the operator, out of the queue's way."""
        target = os.path.join(self._corrupt, name)
        if os.path.lexists(target):
            target += f".{time.time_ns()}"
        try:
            os.rename(path, target)
        except OSError as e:
            log.error("%s: cannot move to corrupt/: %s", name, e)

    # -- reading (never modifies anything)

    def _queue_path(self, qid: str) -> str:
        return os.path.join(self._queue, qid)

    def _state_path(self, qid: str) -> str:
        return os.path.join(self._state, qid + _STATE_SUFFIX)

    def _read_head(self, qid: str) -> tuple[Envelope, int, int]:
        """(accepted envelope, data offset, data size); KeyError if there is no such file."""
        try:
            with open(self._queue_path(qid), "rb") as f:
                size = os.fstat(f.fileno()).st_size
                head = f.read(_HEADER_MAX)
                start, json_len, _ = _parse_first_line(head)
                need = start + json_len + 1
                if len(head) < need:
                    head += f.read(need - len(head))
        except FileNotFoundError:
            raise KeyError(qid) from None
        env, offset = decode_header(head, size)
        return env, offset, size - offset

    def _read_state(self, qid: str) -> Envelope | None:
        try:
            with open(self._state_path(qid), "rb") as f:
                body = f.read()
        except FileNotFoundError:
            return None
        env = _parse_envelope(body)
        if env.queue_id != qid:
            raise CorruptEntry(f"state file says queue id {env.queue_id!r}")
        return env

    def _check(self, queue_id: str) -> None:
        if not is_queue_id(queue_id):
            raise KeyError(queue_id)

    def load(self, queue_id: str) -> Envelope:
        """The current envelope: the state file if any, else the accepted one.

        KeyError if there is no such message; CorruptEntry if its queue file is
        unreadable. An unreadable state file is logged and the accepted
        envelope returned, so a listing still shows the message.
        """
        self._check(queue_id)
        accepted, _, _ = self._read_head(queue_id)
        try:
            state = self._read_state(queue_id)
        except CorruptEntry as e:
            log.warning("%s: unreadable state file: %s", queue_id, e)
            return accepted
        return state if state is not None else accepted

    def read_data(self, queue_id: str) -> bytes:
        """The message bytes exactly as accepted (KeyError if absent)."""
        self._check(queue_id)
        try:
            with open(self._queue_path(queue_id), "rb") as f:
                size = os.fstat(f.fileno()).st_size
                head = f.read(_HEADER_MAX)
                start, json_len, data_len = _parse_first_line(head)
                offset = start + json_len + 1
                if size != offset + data_len:
                    raise CorruptEntry(f"size {size} does not match header")
                f.seek(offset)
                data = f.read(data_len)
        except FileNotFoundError:
            raise KeyError(queue_id) from None
        if len(data) != data_len:
            raise CorruptEntry("message data truncated")
        return data

    def data_size(self, queue_id: str) -> int:
        """Size in bytes of the message data (KeyError if absent)."""
        self._check(queue_id)
        return self._read_head(queue_id)[2]

    def age(self, queue_id: str) -> float | None:
        """Seconds since queue/ID was last written; None if it is not there."""
        try:
            return time.time() - os.stat(self._queue_path(queue_id)).st_mtime
        except OSError:
            return None

    def queue_ids(self) -> list[str]:
        """Ids of all queued messages, oldest first; [] if the spool does not exist."""
        try:
            names = os.listdir(self._queue)
        except FileNotFoundError:
            return []
        return sorted(n for n in names if is_queue_id(n))

    def scan(self) -> list[Envelope]:
        """Every readable entry, oldest first; entries vanishing meanwhile are skipped."""
        result = []
        for qid in self.queue_ids():
            try:
                result.append(self.load(qid))
            except KeyError:
                continue
            except CorruptEntry as e:
                log.warning("%s: unreadable queue file: %s", qid, e)
        return result

    @property
    def tmp_dir(self) -> str:
        """Where files not yet committed live; recovery empties it at start."""
        return self._tmp

    def free_space(self) -> int:
        """Bytes an unprivileged writer may still use on the spool's file system."""
        st = os.statvfs(self.root)
        return st.f_bavail * st.f_frsize

    # -- writing

    async def commit(self, envelope: Envelope, data: bytes, tail: Tail | None = None) -> None:
        """Store a new message; durable on return, else SpoolError and nothing left.

        The message is ``data``, followed by the bytes of the file ``tail``
        names from its offset on: a large message arrives in a file under
        tmp/ and is copied in the kernel rather than read into memory.

        If the caller is cancelled meanwhile (its session died before it could
        answer 250), a message that got committed anyway is removed again so
        that it is not delivered next to the client's retry.
        """
        qid = envelope.queue_id
        if not is_queue_id(qid):
            raise ValueError(f"not a queue id: {qid!r}")
        task = asyncio.ensure_future(self._commit(qid, envelope, data, tail))
        self._track(task)
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            task.add_done_callback(functools.partial(self._discard_if_committed, qid))
            raise

    async def _commit(self, qid: str, envelope: Envelope, data: bytes, tail: Tail | None) -> None:
        size = len(data)
        if tail is not None:
            size += os.stat(tail[0]).st_size - tail[1]
        head = encode_header(envelope, size)
        dst = self._queue_path(qid)
        # Under its final name (see above); then queue/ is synced with the batch.
        link = Op(apply=_in_place, dirs=(self._queue,), undo=functools.partial(_unlink_quiet, dst))
        await self._write(dst, (head, data), qid, link, tail)
        self.stats.commits += 1

    async def update(self, envelope: Envelope) -> None:
        """Durably replace the message's state (SpoolError, old state kept, on failure)."""
        qid = envelope.queue_id
        if not is_queue_id(qid):
            raise ValueError(f"not a queue id: {qid!r}")
        body = json.dumps(envelope.to_dict(), separators=(",", ":")).encode("ascii")
        tmp = os.path.join(self._tmp, f"{qid}.{os.getpid()}-{next(_TMP_SEQ)}{_STATE_SUFFIX}")
        rename = Op(
            apply=functools.partial(_rename, tmp, self._state_path(qid)),
            dirs=(self._state,),
            on_fail=functools.partial(_unlink_quiet, tmp),
        )
        await self._write(tmp, (body, b"\n"), qid, rename)
        self.stats.updates += 1

    async def remove(self, queue_id: str) -> None:
        """Delete a message for good (KeyError if it was not there)."""
        self._check(queue_id)
        # No directory fsync (Postfix syncs no removal either): the two
        # unlinks ride with the group committer's next batch, so many
        # removals share one trip to its thread and the event loop never
        # waits on the filesystem journal (an unlink took about 0.2 ms on
        # the loop while the writer threads fsynced). A crash just after may
        # bring the message back, and it is delivered again (at least once).
        op = Op(
            apply=functools.partial(
                _remove_files, self._queue_path(queue_id), self._state_path(queue_id)
            ),
            dirs=(),
        )
        settled = _settled_on_loop(op)
        try:
            self._committer.submit(op)
            found = await settled
        except Exception as e:  # the unlink, or a bug: the scheduler keeps the message
            raise SpoolError(f"{queue_id}: cannot remove from the spool: {_why(e)}") from e
        if not found:
            raise KeyError(queue_id)
        self.stats.removes += 1

    async def close(self) -> None:
        """Wait for commits in flight and their clean-ups, then stop the worker threads."""
        while self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        if self._writers is not None:
            self._writers.shutdown()
        self._writers = None
        self._committer.close()

    @property
    def stats(self) -> SpoolStats:
        self._stats.batches = self._committer.batches
        self._stats.dir_syncs = self._committer.dir_syncs
        return self._stats

    # -- machinery

    def _writers_pool(self) -> Workers:
        if self._writers is None:
            self._writers = Workers(_WRITE_THREADS, "relayd-spool-write")
        return self._writers

    async def _write(
        self,
        path: str,
        parts: Sequence[bytes],
        qid: str,
        then: Op,
        tail: Tail | None = None,
    ) -> None:
        """``path`` written and synced, and ``then`` applied by the group committer."""
        settled = _settled_on_loop(then)
        try:
            self._writers_pool().post(_write_and_join, path, parts, tail, self._committer, then)
            await settled
        except _NotWritten as e:
            raise SpoolError(f"{qid}: cannot write to the spool: {_why(e.error)}") from e.error
        except Exception as e:  # the directory fsync, or a bug: answered 451 all the same
            raise SpoolError(f"{qid}: cannot commit to the spool: {_why(e)}") from e
        self.stats.file_syncs += 1

    def _discard_if_committed(self, qid: str, task: asyncio.Future[None]) -> None:
        if task.cancelled() or task.exception() is not None:
            return
        log.info("%s: session gone before the reply; removing the message", qid)
        self._track(asyncio.ensure_future(self._remove_quietly(qid)))

    def _track(self, task: asyncio.Future[None]) -> None:
        """Keep a reference until done, so close() can wait for it."""
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _remove_quietly(self, qid: str) -> None:
        try:
            await self.remove(qid)
        except (KeyError, SpoolError) as e:
            log.warning("%s: could not remove: %s", qid, e)


def _why(error: BaseException) -> str:
    return (error.strerror if isinstance(error, OSError) else None) or str(error)


def _settled_on_loop(op: Op) -> asyncio.Future[bool]:
    """A future of the running loop that ``op``'s settling, in whatever thread, resolves."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[bool] = loop.create_future()
    op.done = functools.partial(_tell_loop, loop, future, op)
    return future


def _tell_loop(loop: asyncio.AbstractEventLoop, future: asyncio.Future[bool], op: Op) -> None:
    """In whichever thread ran the batch (or failed the write): settle ``future`` on its loop.

    Nothing happens if that loop has closed meanwhile.
    """
    with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits any more
        loop.call_soon_threadsafe(_settle, future, op)


def _settle(future: asyncio.Future[bool], op: Op) -> None:
    if future.done():  # the awaiter was cancelled meanwhile; the change was made anyway
        return
    if op.error is not None:
        future.set_exception(op.error)
    else:
        future.set_result(op.changed)
