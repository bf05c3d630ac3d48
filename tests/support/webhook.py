"""A webhook receiver on loopback: records every POST, answers the status the test sets.

Usage::

    with WebhookReceiver() as hook:
        hook.status = 500          # refuse for now
        ...
        hook.status = 200
        events = hook.wait_for(lambda got: len(got) >= 3, timeout=30)
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

MAX_BODY = 1 << 20


@dataclass(frozen=True)
class Request:
    path: str
    headers: dict[str, str]
    body: bytes
    status: int  # what the receiver answered
    at: float

    def json(self) -> dict[str, Any]:
        value = json.loads(self.body)
        assert isinstance(value, dict)
        return value


class WebhookReceiver:
    def __init__(self, host: str = "127.0.0.1") -> None:
        self.status = 200
        self.requests: list[Request] = []
        self._cond = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                body = self.rfile.read(min(length, MAX_BODY))
                status = receiver.status
                with receiver._cond:
                    receiver.requests.append(
                        Request(self.path, dict(self.headers.items()), body, status, time.time())
                    )
                    receiver._cond.notify_all()
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer((host, 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        host, port = self._server.server_address[:2]
        self.url = f"http://{host}:{port}/hooks/mail"

    def start(self) -> WebhookReceiver:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)

    def taken(self) -> list[Request]:
        """The requests answered 2xx."""
        with self._cond:
            return [r for r in self.requests if 200 <= r.status < 300]

    def wait_for(
        self, done: Callable[[list[Request]], bool], timeout: float = 30.0
    ) -> list[Request]:
        """Wait until ``done(all requests so far)``; every request, a copy."""
        with self._cond:
            if not self._cond.wait_for(lambda: done(list(self.requests)), timeout):
                raise TimeoutError(
                    f"webhook receiver: condition not met in {timeout}s; got "
                    f"{[(r.status, r.body[:200]) for r in self.requests]}"
                )
            return list(self.requests)

    def __enter__(self) -> WebhookReceiver:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
