"""What both sides' MQTT clients share: socket settings, and the probe their health checks
(`device-agent doctor`, `clinic-gateway check`) connect with."""

from __future__ import annotations

import contextlib
import socket
import ssl
import time
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion


def tcp_nodelay(client: Any, userdata: Any, sock: Any) -> None:
    """A paho ``on_socket_open`` callback that disables Nagle: small control messages
    (manifest, final, ack) would otherwise wait for the peer's delayed ACK (~40 ms per round
    trip on Linux) and dominate a transfer."""
    with contextlib.suppress(OSError, AttributeError):  # e.g. a websocket or TLS wrapper
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def mqtt_connects(host: str, port: int, *, client_id: str, mqtt5: bool,
                  tls: dict[str, str] | None, timeout: float = 5.0) -> str | None:
    """Connect (over mutual TLS when ``tls`` holds paho's ``tls_set`` arguments) and
    disconnect; None when the broker accepted the connection, else what went wrong."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                         protocol=mqtt.MQTTv5 if mqtt5 else mqtt.MQTTv311)
    try:
        if tls is not None:
            client.tls_set(**tls)
        client.connect(host, port, keepalive=10)
        deadline = time.monotonic() + timeout
        while not client.is_connected() and time.monotonic() < deadline:
            if client.loop(timeout=0.2) != mqtt.MQTT_ERR_SUCCESS:
                break
        connected = client.is_connected()
        client.disconnect()
    except (OSError, ssl.SSLError, ValueError) as err:
        return f"connection failed: {err}"
    return None if connected else "the broker did not accept the connection"
