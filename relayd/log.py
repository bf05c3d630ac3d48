"""Operator-facing log lines, in Postfix's shape so existing tools carry over.

Every event goes through ``event()``: the text becomes ``QUEUEID: text``
under a Postfix-style program name (``relayd/smtpd``, ``relayd/qmgr``,
``relayd/smtp``, ``relayd/bounce``), and the keyword fields become journald
fields (``QUEUE_ID``, ``RECIPIENT``, ``DSN``, ``STATUS``, ...) when logging
to the journal. On stderr the fields are dropped; the line carries them.

Whatever reaches the handler is made one line of printable ASCII first
(``_OneLine``, see relayd.escape): the message, a traceback appended to it,
and every journald field. Clients and remote servers choose much of what
is logged (HELO names, addresses, replies); escaping here, at the one
boundary, means no caller can forget it and nobody can forge a log line
that fail2ban or pflogsumm would read as relayd's. Records of other
libraries' loggers (aiosmtpd, asyncio) go through the same handler.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
import sys
import threading
from typing import Any

from relayd.escape import printable

ROOT = "relayd"
# Loggers of libraries relayd runs on: whatever of theirs is let through (the
# daemon quiets aiosmtpd's) is written escaped and in relayd's format, never
# raw by Python's last-resort handler (aiosmtpd logs command names as sent).
FOREIGN = ("mail.log", "asyncio")

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}

# syslog priorities for the "<N>" prefix journald reads on a stderr stream.
SYSLOG_PRIORITY = {
    logging.DEBUG: 7,
    logging.INFO: 6,
    logging.WARNING: 4,
    logging.ERROR: 3,
    logging.CRITICAL: 2,
}


class _StderrFormatter(logging.Formatter):
    """``relayd/smtpd[pid]: text``; ``<6>`` prefixed when stderr is the journal."""

    def __init__(self, journal_stream: bool) -> None:
        super().__init__()
        self.journal_stream = journal_stream
        self.pid = os.getpid()

    def format(self, record: logging.LogRecord) -> str:
        program = record.name.replace(".", "/") if _ours(record) else ROOT
        return self.line(program, record.levelno, _message(record, self))

    def line(self, program: str, level: int, text: str) -> str:
        """One log line, ``text`` escaped: the shape of both the handler and _DirectLines."""
        if self.journal_stream:
            return f"<{SYSLOG_PRIORITY.get(level, 6)}>{program}: {printable(text)}"
        return f"{program}[{self.pid}]: {printable(text)}"


def _ours(record: logging.LogRecord) -> bool:
    return record.name == ROOT or record.name.startswith(ROOT + ".")


def _message(record: logging.LogRecord, formatter: logging.Formatter) -> str:
    """The record's text with its traceback, if any, still unescaped."""
    text = record.getMessage()
    if record.exc_info:
        text += "\n" + formatter.formatException(record.exc_info)
    elif record.exc_text:
        text += "\n" + record.exc_text
    if record.stack_info:
        text += "\n" + record.stack_info
    return text


class _OneLine(logging.Filter):
    """Rewrite each record into one escaped line, fields included, before any formatter.

    The traceback is folded into the message (its newlines escaped as
    ``\\n``): a traceback may quote a client's bytes, and one event stays
    one line for the tools that read the log. The journald fields are
    escaped too, for the journal handler (the only one that writes them).
    """

    _formatter = logging.Formatter()

    def __init__(self, fields: bool) -> None:
        super().__init__()
        self.fields = fields

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = printable(_message(record, self._formatter))
        record.args = None
        record.exc_info = None
        record.exc_text = None
        record.stack_info = None
        fields = getattr(record, "journal_fields", None) if self.fields else None
        if fields:
            record.journal_fields = {
                key: printable(value) if isinstance(value, str | bytes) else value
                for key, value in fields.items()
            }
        return True


def stderr_is_journal() -> bool:
    """True when systemd connected our stderr to the journal ($JOURNAL_STREAM)."""
    stream = os.environ.get("JOURNAL_STREAM", "")
    if not stream:
        return False
    try:
        dev, ino = (int(x) for x in stream.split(":"))
        st = os.fstat(sys.stderr.fileno())
    except (ValueError, OSError):
        return False
    return st.st_dev == dev and st.st_ino == ino


def setup(level: str = "info", target: str = "auto") -> None:
    """Route relayd's loggers to stderr (or the journal; see relayd.systemd)."""
    root = logging.getLogger(ROOT)
    root.setLevel(_LEVELS.get(level, logging.INFO))
    for old in list(root.handlers):
        root.removeHandler(old)
    handler: logging.Handler | None = None
    if target in ("auto", "journald"):
        from relayd import systemd

        handler = systemd.journal_handler(required=target == "journald")
    missing_journal = handler is None and target == "journald"
    fields = handler is not None
    global _direct
    _flush_direct()
    _direct = None
    if handler is None:
        handler = _StreamHandler(sys.stderr)
        formatter = _StderrFormatter(stderr_is_journal())
        handler.setFormatter(formatter)
        _direct = _DirectLines(handler, formatter)
    handler.addFilter(_OneLine(fields))
    root.addHandler(handler)
    root.propagate = False
    _adopt_foreign(handler)
    if missing_journal:
        from relayd import systemd

        event(
            "master",
            f'warning: [logging] target = "journald" but '
            f"{systemd.journal_unavailable_reason()}; logging to stderr",
            level=logging.WARNING,
        )


_foreign_handler: logging.Handler | None = None


def _adopt_foreign(handler: logging.Handler) -> None:
    """Send library loggers' warnings through relayd's (escaping) handler, not raw stderr."""
    global _foreign_handler
    for name in FOREIGN:
        logger = logging.getLogger(name)
        if _foreign_handler is not None:
            logger.removeHandler(_foreign_handler)
        logger.addHandler(handler)
        logger.propagate = False
    _foreign_handler = handler


class _DirectLines:
    """relayd's own events straight onto the stderr stream, in the formatter's shape.

    A LogRecord, a filter pass and a format call cost more than the line
    itself; an event of relayd's own (no traceback) carries nothing the
    stream handler would use but its text, so it is escaped and written
    here. Anything with a traceback, and every other library's record,
    still goes through the handler.

    On the event loop the lines of one loop iteration leave in one write,
    at the end of that iteration (a write and flush per line was a tenth
    of a small message's CPU); elsewhere (threads, start-up, shutdown)
    each line is written at once. A line is therefore never held for
    longer than the loop takes to come round, and what the daemon logged
    before it stopped is written at exit.
    """

    # Lines held at most before they are written even within one iteration.
    MAX_PENDING = 256

    def __init__(self, handler: logging.StreamHandler[Any], formatter: _StderrFormatter) -> None:
        self.handler = handler
        self.stream = handler.stream
        self.formatter = formatter
        self.root = logging.getLogger(ROOT)
        self._pending: list[str] = []
        # Threads log too (the spool's, through the handler, which flushes
        # first): taking and writing what is held happens under one lock, so
        # no line is lost between the two and the order stays.
        self._lock = threading.Lock()

    def usable(self, logger: logging.Logger) -> bool:
        """Only while this handler is the sole one (a test may add its own)."""
        return not logger.handlers and self.root.handlers == [self.handler]

    def write(self, component: str, level: int, line: str) -> None:
        program = f"{ROOT}/{component.replace('.', '/')}"
        text = self.formatter.line(program, level, line) + "\n"
        loop = asyncio._get_running_loop()
        with self._lock:
            self._pending.append(text)
            held = len(self._pending)
        if loop is None or held >= self.MAX_PENDING:
            self.flush()
        elif held == 1:
            loop.call_soon(self.flush)

    def flush(self) -> None:
        """Write what is held, in order (before any line that takes another way)."""
        with self._lock:
            if not self._pending:
                return
            text = "".join(self._pending)
            self._pending.clear()
            try:
                self.stream.write(text)
                self.stream.flush()
            except (OSError, ValueError):  # as the handler would: never break the caller
                pass


class _StreamHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The stderr handler; lines _DirectLines holds for the loop are written before a record."""

    def emit(self, record: logging.LogRecord) -> None:
        _flush_direct()
        super().emit(record)


def _flush_direct() -> None:
    if _direct is not None:
        _direct.flush()


atexit.register(_flush_direct)


_direct: _DirectLines | None = None
_loggers: dict[str, logging.Logger] = {}


def set_level(level: str) -> None:
    logging.getLogger(ROOT).setLevel(_LEVELS.get(level, logging.INFO))


def event(
    component: str,
    text: str,
    *,
    queue_id: str | None = None,
    level: int = logging.INFO,
    exc_info: bool = False,
    **fields: Any,
) -> None:
    """Log one operator event: ``queue_id: text`` with journald ``fields``.

    ``component`` is the Postfix-style program (``smtpd``, ``qmgr``, ...);
    field names are upper-cased journald names (``recipient`` -> RECIPIENT).
    """
    logger = _loggers.get(component)
    if logger is None:  # logging.getLogger takes the module's lock on every call
        logger = _loggers[component] = logging.getLogger(f"{ROOT}.{component}")
    if not logger.isEnabledFor(level):
        return
    line = f"{queue_id}: {text}" if queue_id else text
    direct = _direct
    if direct is not None and not exc_info and direct.usable(logger):
        direct.write(component, level, line)
        return
    journal = {k.upper(): v for k, v in fields.items() if v is not None and v != ""}
    if queue_id:
        journal["QUEUE_ID"] = queue_id
    logger.log(level, "%s", line, extra={"journal_fields": journal}, exc_info=exc_info)
