"""The devices as their status messages show them (docs/protocol.md section 5).

Every device publishes a retained status on ``<p>/<device>/status`` (online with its outbox
depth and health, offline on a clean stop, or its Last Will): one subscription to
``<p>/+/status`` gives every device's latest word the moment it connects, and each change
after. A status that is not what section 5 describes is logged and ignored.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import threading
import uuid
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from dermascope_wire.identity import DEVICE_ID
from dermascope_wire.logs import log_event

log = logging.getLogger("clinic_gateway.web.board")

#: A status is a few hundred bytes; anything far bigger is not one.
MAX_STATUS_BYTES = 16 * 1024
#: Devices remembered (a clinic has tens; bounds what a misbehaving client can make us hold).
MAX_DEVICES = 10_000


@dataclass(frozen=True)
class DeviceStatus:
    """A device's latest status: ``state`` online/offline, ``ts`` when it said so (its own
    clock: the last time we heard of it), ``calibrated_at`` when its calibration was made
    (None: the device does not say)."""

    device_id: str
    state: str
    ts: dt.datetime | None
    outbox_depth: int | None
    calibrated_at: dt.datetime | None
    software_version: str | None
    last_error: str | None


def _time(value: object) -> dt.datetime | None:
    if not isinstance(value, str) or len(value) > 64:
        return None
    try:
        t = dt.datetime.fromisoformat(value)
    except ValueError:
        return None
    return t if t.tzinfo is not None else t.replace(tzinfo=dt.UTC)


def parse_status(device_id: str, payload: bytes) -> DeviceStatus:
    """A status message as a DeviceStatus; ValueError naming what is wrong."""
    if len(payload) > MAX_STATUS_BYTES:
        raise ValueError(f"{len(payload)} bytes, more than {MAX_STATUS_BYTES}")
    data: Any = json.loads(payload)
    if not isinstance(data, dict) or data.get("type") != "status":
        raise ValueError("not a status object")
    state = data.get("state")
    if state not in ("online", "offline"):
        raise ValueError(f"state {state!r:.40} is neither online nor offline")
    depth = data.get("outbox_depth")
    version = data.get("software_version")
    error = data.get("last_error")
    return DeviceStatus(
        device_id, state, _time(data.get("ts")),
        depth if isinstance(depth, int) and not isinstance(depth, bool) and depth >= 0
        else None,
        _time(data.get("calibrated_at")),
        version[:64] if isinstance(version, str) else None,
        error[:200] if isinstance(error, str) else None)


class StatusBoard:
    """Subscribes to every device's status and keeps the latest of each."""

    def __init__(self, host: str, port: int, prefix: str = "derm/v1", *,
                 protocol: str = "mqtt5", tls: dict[str, str] | None = None) -> None:
        self.host = host
        self.port = port
        self.prefix = prefix
        self._devices: dict[str, DeviceStatus] = {}
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        mqtt5 = protocol == "mqtt5"
        self._client = mqtt.Client(CallbackAPIVersion.VERSION2,
                                   client_id=f"monitor-{uuid.uuid4().hex[:8]}",
                                   protocol=mqtt.MQTTv5 if mqtt5 else mqtt.MQTTv311)
        if tls:
            self._client.tls_set(**tls)
        self._client.reconnect_delay_set(0.2, 5.0)
        self._client.suppress_exceptions = True
        self._client.on_connect = self._on_connect
        self._client.on_subscribe = self._on_subscribe
        self._client.on_disconnect = lambda *_: self._subscribed.clear()
        self._client.on_message = self._on_message

    def start(self) -> None:
        """Connect in the background (and keep reconnecting)."""
        self._client.connect_async(self.host, self.port, keepalive=30)
        self._client.loop_start()

    def wait_ready(self, timeout: float) -> bool:
        return self._subscribed.wait(timeout)

    def stop(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def devices(self) -> dict[str, DeviceStatus]:
        with self._lock:
            return dict(self._devices)

    def get(self, device_id: str) -> DeviceStatus | None:
        with self._lock:
            return self._devices.get(device_id)

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any,
                    properties: Any) -> None:
        if reason.is_failure:
            log_event(log, "web.status_connect_refused", level=logging.WARNING,
                      reason=str(reason))
            return
        client.subscribe(f"{self.prefix}/+/status", qos=1)

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, codes: list,
                      properties: Any) -> None:
        if any(code.is_failure for code in codes):
            log_event(log, "web.status_subscribe_refused", level=logging.ERROR,
                      reasons=[str(c) for c in codes])
            return
        self._subscribed.set()

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        try:
            parts = message.topic.split("/")
        except UnicodeDecodeError:
            return  # not a topic any device of ours can publish
        device_id = parts[-2] if len(parts) >= 2 else ""
        if not DEVICE_ID.match(device_id):
            return
        try:
            status = parse_status(device_id, message.payload)
        except ValueError as err:  # json's errors are ValueErrors too
            log_event(log, "web.bad_status", level=logging.WARNING, device_id=device_id,
                      detail=str(err)[:200])
            return
        with self._lock:
            if device_id not in self._devices and len(self._devices) >= MAX_DEVICES:
                return
            self._devices[device_id] = status
