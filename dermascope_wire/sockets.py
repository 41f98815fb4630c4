"""Socket settings both sides' MQTT clients use."""

from __future__ import annotations

import contextlib
import socket
from typing import Any


def tcp_nodelay(client: Any, userdata: Any, sock: Any) -> None:
    """A paho ``on_socket_open`` callback that disables Nagle: small control messages
    (manifest, final, ack) would otherwise wait for the peer's delayed ACK (~40 ms per round
    trip on Linux) and dominate a transfer."""
    with contextlib.suppress(OSError, AttributeError):  # e.g. a websocket or TLS wrapper
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
