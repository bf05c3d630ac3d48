"""The daemon's side of relayctl: JSON lines over a Unix socket.

One request per connection: ``{"cmd": "flush", "ids": [...]}`` in, one
JSON object out (``{"ok": true, ...}`` or ``{"ok": false, "error": ...}``).
Queue changes go through the scheduler, so it stays the single writer of
queue state while relayctl can still read the spool directly when the
daemon is down. Mutating commands are allowed only to root, the daemon's
own user, and members of ``[control] group`` (checked with SO_PEERCRED).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import grp
import json
import logging
import os
import socket
import struct
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from relayd import __version__, log
from relayd.config import ControlConfig

if TYPE_CHECKING:
    from relayd.daemon import Daemon

MUTATING = {"flush", "delete", "hold", "release", "bounce", "reload", "pause", "resume"}
# Commands that need the same rights as changes: "show" hands out message contents.
PRIVILEGED = MUTATING | {"show"}
SHOW_TIMEOUT = 60.0  # reading one message from the spool
MAX_REQUEST = 1 << 20


class ControlServer:
    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.server: asyncio.AbstractServer | None = None
        self.path: Path | None = None
        self.gid: int | None = None

    async def start(self, cfg: ControlConfig) -> None:
        path = cfg.socket
        path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        # The limit is the longest request line: the default (64 KiB) would
        # cut off a long list of ids and leave relayctl without an answer.
        self.server = await asyncio.start_unix_server(
            self._serve, path=str(path), limit=MAX_REQUEST
        )
        self.gid = grp.getgrnam(cfg.group).gr_gid if cfg.group else None
        if self.gid is not None:
            os.chown(path, -1, self.gid)
        os.chmod(path, 0o660 if self.gid is not None else 0o600)
        self.path = path

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
        if self.path is not None:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Answer one request; whatever goes wrong, relayctl gets an answer that says so."""
        try:
            try:
                line = await asyncio.wait_for(reader.readline(), timeout=10)
            except ValueError:  # over MAX_REQUEST
                reply: dict[str, Any] = {"ok": False, "error": "request too long"}
            else:
                reply = await self._answer(line, writer.get_extra_info("socket"))
        except (TimeoutError, ConnectionError):
            reply = {"ok": False, "error": "request not received"}
        except Exception as exc:
            log.event(
                "master",
                f"warning: control: request failed: {exc!r}",
                level=logging.ERROR,
            )
            reply = {"ok": False, "error": f"internal error in relayd: {exc}"}
        try:
            writer.write(json.dumps(reply).encode() + b"\n")
            await writer.drain()
        except ConnectionError:
            pass  # relayctl went away (interrupted); nothing to tell it
        finally:
            writer.close()

    async def _answer(self, line: bytes, sock: socket.socket | None) -> dict[str, Any]:
        try:
            request = json.loads(line[:MAX_REQUEST])
            cmd = str(request["cmd"])
            ids = [str(i) for i in request.get("ids") or []]
        except (ValueError, KeyError, TypeError, AttributeError):
            return {"ok": False, "error": "malformed request"}
        if cmd in PRIVILEGED and not self._allowed(sock):
            log_denied(cmd)
            return {
                "ok": False,
                "error": "permission denied: run as root or a member of the relayd control group",
            }
        handler = getattr(self, f"_cmd_{cmd}", None)
        if handler is None:
            return {"ok": False, "error": f"unknown command {cmd!r}"}
        result: dict[str, Any] = await handler(ids, request)
        return result

    def _allowed(self, sock: socket.socket | None) -> bool:
        if sock is None:
            return False
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        _pid, uid, gid = struct.unpack("3i", creds)
        if uid in (0, os.getuid()):
            return True
        return self.gid is not None and (gid == self.gid or _in_group(uid, self.gid))

    # ---- commands ----------------------------------------------------------

    async def _cmd_queue(self, ids: list[str], request: dict[str, Any]) -> dict[str, Any]:
        envelopes = self.daemon.scheduler.snapshot()
        return {"ok": True, "messages": [e.to_dict() for e in envelopes]}

    async def _cmd_show(self, ids: list[str], request: dict[str, Any]) -> dict[str, Any]:
        """One message with its bytes, for ``relayctl queue show``.

        Through the daemon, so that members of the control group can look at
        a message although the spool (0700) belongs to the daemon's user.
        """
        if len(ids) != 1:
            return {"ok": False, "error": "show takes exactly one queue id"}
        qid = ids[0]
        found = [e for e in self.daemon.scheduler.snapshot() if e.queue_id == qid]
        if not found:
            return _unknown_reply([qid])
        try:
            data = await asyncio.wait_for(
                asyncio.to_thread(self.daemon.spool.read_data, qid), SHOW_TIMEOUT
            )
        except KeyError:
            return _unknown_reply([qid])  # delivered or deleted meanwhile
        except (OSError, ValueError, TimeoutError) as exc:
            return {"ok": False, "error": f"{qid}: cannot read the queued message: {exc}"}
        return {
            "ok": True,
            "message": found[0].to_dict(),
            "data": base64.b64encode(data).decode("ascii"),
        }

    async def _cmd_flush(self, ids: list[str], request: dict[str, Any]) -> dict[str, Any]:
        # An operator who flushes has usually just fixed the next hop: try it for real.
        self.daemon.agent.revive_hops()
        domain = request.get("domain")
        if isinstance(domain, str) and domain:
            return {"ok": True, "done": self.daemon.scheduler.flush_domain(domain)}
        unknown = self.daemon.scheduler.flush(ids or None)
        return _unknown_reply(unknown)

    async def _cmd_bounce(self, ids: list[str], request: dict[str, Any]) -> dict[str, Any]:
        return _unknown_reply(self.daemon.scheduler.bounce(ids), done=len(ids))

    async def _cmd_pause(self, ids: list[str], request: dict[str, Any]) -> dict[str, Any]:
        self.daemon.scheduler.pause()
        return {"ok": True, "paused": True}

    async def _cmd_resume(self, ids: list[str], request: dict[str, Any]) -> dict[str, Any]:
        self.daemon.scheduler.resume()
        return {"ok": True, "paused": False}

    def _all_or(self, ids: list[str], request: dict[str, Any]) -> list[str]:
        if request.get("all"):
            return [e.queue_id for e in self.daemon.scheduler.snapshot()]
        return ids

    async def _cmd_delete(self, ids: list[str], request: dict[str, Any]) -> dict[str, Any]:
        ids = self._all_or(ids, request)
        unknown = await _maybe_await(self.daemon.scheduler.delete(ids))
        return _unknown_reply(unknown, done=len(ids) - len(unknown))

    async def _cmd_hold(self, ids: list[str], request: dict[str, Any]) -> dict[str, Any]:
        ids = self._all_or(ids, request)
        unknown = await _maybe_await(self.daemon.scheduler.hold(ids))
        return _unknown_reply(unknown, done=len(ids) - len(unknown))

    async def _cmd_release(self, ids: list[str], request: dict[str, Any]) -> dict[str, Any]:
        ids = self._all_or(ids, request)
        unknown = await _maybe_await(self.daemon.scheduler.release(ids))
        return _unknown_reply(unknown, done=len(ids) - len(unknown))

    async def _cmd_reload(self, ids: list[str], request: dict[str, Any]) -> dict[str, Any]:
        problem = await self.daemon.reload()
        if problem is None:
            return {"ok": True}
        # One line per problem (file:line: key: what is wrong), for relayctl to print as is.
        return {"ok": False, "error": problem, "problems": problem.splitlines()}

    async def _cmd_status(self, ids: list[str], request: dict[str, Any]) -> dict[str, Any]:
        d = self.daemon
        stats = d.scheduler.stats
        return {
            "ok": True,
            "running": True,
            "version": __version__,
            "pid": os.getpid(),
            "uptime": time.time() - d.counters.started,
            "listeners": d.listeners.names(),
            "queue": d.scheduler.counts(),
            "accepted": d.counters.accepted,
            "delivered": getattr(stats, "delivered", 0),
            "bounced": getattr(stats, "bounced", 0),
            "deferred": getattr(stats, "deferred", 0),
            "sessions": d.listeners.active_sessions,
            "paused": d.scheduler.paused,
            "config": str(d.config.source),
        }


async def _maybe_await(value: Any) -> Any:
    if asyncio.iscoroutine(value):
        return await value
    return value


def _unknown_reply(unknown: list[str], done: int | None = None) -> dict[str, Any]:
    reply: dict[str, Any] = {"ok": not unknown, "unknown": unknown}
    if unknown:
        reply["error"] = "unknown queue id: " + ", ".join(unknown)
    if done is not None:
        reply["done"] = done
    return reply


def _in_group(uid: int, gid: int) -> bool:
    try:
        import pwd

        name = pwd.getpwuid(uid).pw_name
        return name in grp.getgrgid(gid).gr_mem
    except KeyError:
        return False


def log_denied(cmd: str) -> None:
    """A refused command is worth a line: someone without the rights tried to change state."""
    log.event("master", f"warning: control: {cmd} refused", level=logging.WARNING)
