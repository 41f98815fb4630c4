"""The clinic side of remote commands: send one to a device and wait for its answer.

MQTT 5: the command carries a Response Topic inside the device's ``resp`` subtree and
Correlation Data; the answer comes back there with the same Correlation Data. MQTT 3.1.1:
the answer comes on the device's ``resp`` topic and is paired by the request ``id``.
Used by the tests and the demo; a clinic's own systems do the same (docs/protocol.md).

With the clinic's signing key (the gateway's, ``signing_key``) every command is signed for
its device, with an expiry and a sequence number: microseconds since 1970, raised above the
last one used (kept in ``sequence_file``), so several clinic tools sharing the key need not
share a counter, and a clock stepped back never makes a sequence go down.
"""

from __future__ import annotations

import json
import queue
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from dermascope_wire import signing
from dermascope_wire.durable import write_atomic
from dermascope_wire.protocol import Topics


class CommandTimeout(TimeoutError):
    """The device did not answer in time (offline, or the command was lost)."""


class Commander:
    def __init__(self, host: str, port: int, prefix: str = "derm/v1", *,
                 protocol: str = "mqtt5", tls: dict[str, str] | None = None,
                 signing_key: signing.Ed25519PrivateKey | Path | None = None,
                 sequence_file: Path | None = None,
                 lifetime: int = signing.DEFAULT_COMMAND_LIFETIME) -> None:
        """``signing_key``: sign every command (a provisioned device refuses unsigned ones);
        ``sequence_file``: where the last sequence number is kept; ``lifetime``: seconds
        until a command expires."""
        self.prefix = prefix
        self.signing_key = (signing.load_private_key(signing_key)
                            if isinstance(signing_key, (str, Path)) else signing_key)
        self.sequence_file = sequence_file
        self.lifetime = lifetime
        self._seq_lock = threading.Lock()
        self._last_seq = self._read_sequence()
        self._mqtt5 = protocol == "mqtt5"
        self._answers: queue.Queue[tuple[str, bytes, bytes | None]] = queue.Queue()
        self._subscribed: queue.Queue[bool] = queue.Queue()
        self._client = mqtt.Client(CallbackAPIVersion.VERSION2,
                                   client_id=f"commander-{uuid.uuid4().hex[:8]}",
                                   protocol=mqtt.MQTTv5 if self._mqtt5 else mqtt.MQTTv311)
        if tls:
            self._client.tls_set(**tls)
        self._client.on_message = lambda c, u, m: self._answers.put(
            (m.topic, m.payload, getattr(m.properties, "CorrelationData", None)))
        self._client.on_subscribe = lambda c, u, mid, codes, p: self._subscribed.put(
            not any(code.is_failure for code in codes))
        self._client.connect(host, port, keepalive=30)
        self._client.loop_start()

    def send(self, device_id: str, command: str, timeout: float = 10.0,
             **args: Any) -> dict[str, Any]:
        topics = Topics(self.prefix, device_id)
        request_id = uuid.uuid4().hex
        reply_topic = f"{topics.response}/{request_id}" if self._mqtt5 else topics.response
        self._client.subscribe(reply_topic, qos=1)
        if not self._subscribed.get(timeout=timeout):
            raise PermissionError(f"the broker refused us {reply_topic}")
        props = None
        if self._mqtt5:
            props = Properties(PacketTypes.PUBLISH)
            props.ResponseTopic = reply_topic
            props.CorrelationData = request_id.encode()
        payload = self.payload(device_id, {"id": request_id, "command": command, "args": args})
        self._publish(device_id, payload, props)
        try:
            while True:
                topic, body, correlation = self._answers.get(timeout=timeout)
                answer = json.loads(body)
                mine = (correlation == request_id.encode() if correlation is not None
                        else answer.get("id") == request_id)
                if topic == reply_topic and mine:
                    return answer
        except queue.Empty:
            raise CommandTimeout(f"{device_id} did not answer {command} within "
                                 f"{timeout} s") from None
        finally:
            self._client.unsubscribe(reply_topic)

    def payload(self, device_id: str, request: dict[str, Any]) -> bytes:
        """What goes on the wire for ``request`` (``id``, ``command``, ``args``): signed
        with a fresh sequence and an expiry when we hold the signing key."""
        if self.signing_key is None:
            return json.dumps(request).encode()
        body = signing.command_body(device_id, self.next_sequence(),
                                    int(time.time()) + self.lifetime, request)
        return signing.sign(body, self.signing_key)

    def next_sequence(self) -> int:
        with self._seq_lock:
            seq = max(self._last_seq + 1, time.time_ns() // 1000)
            if self.sequence_file is not None:
                write_atomic(self.sequence_file, json.dumps({"last_seq": seq}).encode())
            self._last_seq = seq
            return seq

    def _read_sequence(self) -> int:
        if self.sequence_file is None:
            return 0
        try:
            return int(json.loads(self.sequence_file.read_bytes())["last_seq"])
        except FileNotFoundError:
            return 0
        except (ValueError, KeyError, TypeError) as err:
            # Starting again from 0 is safe (time-based sequences), but a damaged file is a
            # problem to look at, not to paper over.
            raise ValueError(f"{self.sequence_file}: not a command sequence file "
                             f"({type(err).__name__}: {err})") from None

    def _publish(self, device_id: str, payload: bytes, properties: Properties | None) -> None:
        self._client.publish(Topics(self.prefix, device_id).command, payload, qos=1,
                             properties=properties)

    def send_raw(self, device_id: str, payload: bytes, timeout: float = 10.0) -> dict[str, Any]:
        """Publish any payload (tests send malformed ones) and return the answer that comes
        on the device's plain ``resp`` topic."""
        topic = Topics(self.prefix, device_id).response
        self._client.subscribe(topic, qos=1)
        self._subscribed.get(timeout=timeout)  # listening before the device can answer
        self._publish(device_id, payload, None)
        try:
            while True:
                answer_topic, body, _ = self._answers.get(timeout=timeout)
                if answer_topic == topic:
                    return json.loads(body)
        except queue.Empty:
            raise CommandTimeout(f"{device_id} did not answer within {timeout} s") from None
        finally:
            self._client.unsubscribe(topic)

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()
