"""An HTTPS server standing in for ``mta-sts.DOMAIN``: serves one policy file on 127.0.0.x:443.

The test chooses the body, status and content type, and reads how many
requests arrived. Real TLS with a certificate from the test CA (or a wrong
one), real HTTP/1.1 from the standard library's server.
"""

from __future__ import annotations

import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from .certs import server_context

POLICY_PATH = "/.well-known/mta-sts.txt"


class STSServer:
    """``with STSServer(host, cert, body) as s:`` serves ``body`` at the policy path."""

    def __init__(
        self,
        host: str,
        cert: tuple[Path, Path],
        body: str,
        port: int = 443,
        status: int = 200,
        content_type: str = "text/plain",
    ) -> None:
        self.body = body
        self.status = status
        self.content_type = content_type
        self.requests: list[tuple[str, str]] = []  # (path, Host header)
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.requests.append((self.path, self.headers.get("Host", "")))
                payload = server.body.encode() if self.path == POLICY_PATH else b"not here"
                self.send_response(server.status if self.path == POLICY_PATH else 404)
                self.send_header("Content-Type", server.content_type)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args: object) -> None:
                pass

        self._httpd = ThreadingHTTPServer((host, port), Handler)
        self._httpd.daemon_threads = True
        context: ssl.SSLContext = server_context(cert)
        self._httpd.socket = context.wrap_socket(self._httpd.socket, server_side=True)
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def __enter__(self) -> STSServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)
