"""Delivery into a Maildir: the simplest local delivery, and `make run`'s outbox.

The Maildir convention makes a delivery atomic without locks: the file is
written under ``tmp/``, fsynced, then renamed into ``new/``, and ``new/``
is fsynced, so a reader never sees half a message and a crash never loses
one that was reported delivered. One copy per message and Maildir, with a
``Return-Path:`` and one ``Delivered-To:`` per recipient on top.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import socket
import time
from pathlib import Path

from relayd.delivery.reply import Outcome

_SEQ = itertools.count()


def _unique_name(queue_id: str) -> str:
    now = time.time()
    seconds, micros = int(now), int((now % 1) * 1_000_000)
    host = socket.gethostname().replace("/", "\\057").replace(":", "\\072")
    return f"{seconds}.M{micros}P{os.getpid()}Q{next(_SEQ)}_{queue_id}.{host}"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def store(maildir: Path, queue_id: str, head: bytes, data: bytes) -> Path:
    """Write one message into ``maildir`` (created if missing); its path under new/."""
    for sub in ("tmp", "new", "cur"):
        (maildir / sub).mkdir(mode=0o700, parents=True, exist_ok=True)
    name = _unique_name(queue_id)
    tmp, new = maildir / "tmp" / name, maildir / "new" / name
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        try:
            view = memoryview(head + data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, new)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(maildir / "new")
    return new


def trace_head(sender: str, recipients: list[str]) -> bytes:
    lines = [f"Return-Path: <{sender}>"] + [f"Delivered-To: {r}" for r in recipients]
    return ("\r\n".join(lines) + "\r\n").encode("utf-8", "surrogateescape")


async def deliver(
    maildir: Path, queue_id: str, sender: str, recipients: list[str], data: bytes
) -> Outcome:
    """One attempt: 250 for all recipients, or a deferral that says what the OS said."""
    try:
        path = await asyncio.to_thread(
            store, maildir, queue_id, trace_head(sender, recipients), data
        )
    except OSError as exc:
        return Outcome("deferred", "4.3.0", f"cannot write to Maildir {maildir}: {exc.strerror}")
    return Outcome("sent", "2.0.0", f"delivered to Maildir as {path.name}")
