"""asyncio's server-side TLS layer, with a read buffer sized for SMTP.

asyncio's SSLProtocol allocates (and zeroes) a 256 KiB read buffer for
every TLS connection as soon as the layer is put on it, before the
handshake. Clients that connect to port 465, or say STARTTLS, and then go
silent made relayd hold that for each of them: 1000 such clients held
320 MB for their 10 s. TLS records are at most 16 KiB, so a 32 KiB buffer
still takes two records per read; silent connections cost 80 kB each.
"""

from __future__ import annotations

import asyncio.sslproto as sslproto
from collections.abc import Callable


class TLSLayer(sslproto.SSLProtocol):
    """SSLProtocol with a 32 KiB read buffer instead of 256 KiB.

    ``on_lost`` runs as soon as the connection is gone, before asyncio tells
    anyone waiting for the handshake, so a connection slot comes back
    before the client can even reconnect.
    """

    max_size = 32 * 1024
    on_lost: Callable[[], None] | None = None

    def connection_lost(self, exc: BaseException | None) -> None:
        if self.on_lost is not None:
            self.on_lost()
        super().connection_lost(exc)


__all__ = ["TLSLayer"]
