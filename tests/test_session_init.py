"""A session's set-up matches what aiosmtpd's own ``SMTP.__init__`` builds.

relayd sets up its sessions without aiosmtpd's per-connection method
discovery (``Session._smtp_init``); this keeps the two in step should
aiosmtpd change.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP

from relayd.smtpd.session import Session


def _stand_ins() -> tuple[Any, Any]:
    config = SimpleNamespace(
        hostname="mx.example.test",
        limits=SimpleNamespace(max_message_size=1000, idle_timeout=30.0),
    )
    services = SimpleNamespace(config=config, tls_context=None)
    listener = SimpleNamespace(name="smtp", mode="inbound", tls="none")
    return services, listener


def _attributes(session: Session) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in vars(session).items():
        if key in ("_stream_reader", "_strong_reader", "_closed", "_smtp_methods", "loop"):
            out[key] = type(value).__name__
        elif key in ("_auth_methods", "_handle_hooks"):
            out[key] = {k: (getattr(v, "is_builtin", None), _name(v)) for k, v in value.items()}
        elif key == "event_handler":
            out[key] = type(value).__name__
        elif callable(value):
            out[key] = _name(value)
        else:
            out[key] = value
    return out


def _name(value: Any) -> str:
    func = getattr(value, "method", value)
    return getattr(func, "__qualname__", repr(func))


def _attributes_of_tables(session: Session) -> dict[str, Any]:
    """The AUTH mechanisms and the command methods, by name, as HELP and AUTH see them."""
    return {
        "auth": {k: (v.is_builtin, _name(v)) for k, v in session._auth_methods.items()},
        "smtp": {k: _name(v) for k, v in session._smtp_methods.items()},
    }


def test_same_attributes_as_aiosmtpd(monkeypatch: pytest.MonkeyPatch) -> None:
    services, listener = _stand_ins()

    async def build() -> tuple[Any, ...]:
        ours = Session(services, listener)

        def via_aiosmtpd(self: Session, handler: Any, **kw: Any) -> None:
            SMTP.__init__(self, handler, **kw)

        monkeypatch.setattr(Session, "_smtp_init", via_aiosmtpd)
        theirs = Session(services, listener)
        return (
            _attributes(ours),
            _attributes(theirs),
            set(ours._smtp_methods),
            set(theirs._smtp_methods),
            _attributes_of_tables(ours),
            _attributes_of_tables(theirs),
        )

    ours, theirs, our_commands, their_commands, our_tables, their_tables = asyncio.run(build())
    ours.pop("_stream_reader_wr", None)
    theirs.pop("_stream_reader_wr", None)
    # Built on demand in relayd (cached_property), in __init__ by aiosmtpd.
    for key in ("_smtp_methods", "_auth_methods", "command_size_limits"):
        ours.pop(key, None)
        theirs.pop(key, None)
    assert set(ours) == set(theirs)
    for key in ours:
        assert ours[key] == theirs[key], key
    assert our_commands == their_commands
    assert our_tables == their_tables
    assert {"EHLO", "MAIL", "RCPT", "DATA", "QUIT", "AUTH", "STARTTLS"} <= our_commands
