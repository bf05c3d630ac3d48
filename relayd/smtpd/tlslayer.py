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


class TLSLayer(sslproto.SSLProtocol):
    """SSLProtocol with a 32 KiB read buffer instead of 256 KiB."""

    max_size = 32 * 1024


__all__ = ["TLSLayer"]
