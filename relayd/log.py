"""Operator-facing log lines, in Postfix's shape so existing tools carry over.

Every event goes through ``event()``: the text becomes ``QUEUEID: text``
under a Postfix-style program name (``relayd/smtpd``, ``relayd/qmgr``,
``relayd/smtp``, ``relayd/bounce``), and the keyword fields become journald
fields (``QUEUE_ID``, ``RECIPIENT``, ``DSN``, ``STATUS``, ...) when logging
to the journal. On stderr the fields are dropped; the line carries them.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

ROOT = "relayd"

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
        program = record.name.replace(".", "/")
        text = record.getMessage()
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        if self.journal_stream:
            return f"<{SYSLOG_PRIORITY.get(record.levelno, 6)}>{program}: {text}"
        return f"{program}[{self.pid}]: {text}"


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
    if handler is None:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_StderrFormatter(stderr_is_journal()))
    root.addHandler(handler)
    root.propagate = False
    if missing_journal:
        from relayd import systemd

        event("master", f"warning: [logging] target = \"journald\" but "
              f"{systemd.journal_unavailable_reason()}; logging to stderr",
              level=logging.WARNING)


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
    logger = logging.getLogger(f"{ROOT}.{component}")
    if not logger.isEnabledFor(level):
        return
    line = f"{queue_id}: {text}" if queue_id else text
    journal = {k.upper(): v for k, v in fields.items() if v is not None and v != ""}
    if queue_id:
        journal["QUEUE_ID"] = queue_id
    logger.log(level, "%s", line, extra={"journal_fields": journal}, exc_info=exc_info)
