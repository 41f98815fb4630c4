"""The device's MQTT uplink: drains the outbox to the clinic gateway (docs/protocol.md).

Why it is built this way:

- paho persists nothing, and a broker PUBACK only means the broker has the message. The
  outbox is the persistence; an entry is removed only when the gateway answers ``committed``
  (it verified and stored the whole capture). A crash anywhere simply means the capture is
  sent again, and the gateway's idempotency on capture id turns that into one capture.
- Resume: each transfer starts with a manifest; the gateway answers with the chunks it lacks
  (a bitmap), so after a reconnect or a restart only those are sent.
- One paho client per connection, made by ``uplink-net``, which connects, waits for the
  connection to end and reconnects forever with backoff and jitter. Nothing of a dead
  connection is carried over: paho would otherwise resend its unacknowledged messages after
  a reconnect (stale chunks, even one the broker dropped us for), and the outbox makes them
  redundant anyway. It also decides the MQTT 3.1.1 fallback.
- Threads: ``uplink-net``, paho's network thread of the current connection, ``uplink-sender``
  (one transfer at a time, FIFO) and ``uplink-heartbeat``. They meet on one Condition; every
  wait has a timeout and nobody polls.
- paho callbacks never raise: an exception there would stop its network loop. Each one is
  wrapped (``_guarded``): an unexpected exception is logged with its traceback and the loop
  goes on. paho's own log goes to ours (warnings and errors).
- Commands from the gateway are not run here: ``on_command`` hands them to the agent's
  thread with a ``reply`` function, so a slow or failing command never holds up paho's loop
  and never races a capture.
- Acks are authenticated (``signing``): the device acts on an ack only when the clinic's
  gateway key signed it for this device, this capture and this transfer's SHA-256, so
  neither a compromised broker nor a stolen gateway certificate can make it delete a capture
  that was never stored. Anything else is refused (``uplink.ack_refused``) and ignored: the
  capture stays and its transfer times out and starts again.
- The three threads are supervised (dermascope_wire.threads): ``healthy`` turns false when one
  died, and the service then stops with a failure for systemd to restart it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import random
import shutil
import threading
import time
import traceback
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from dermascope_wire import bundle, seal, signing, threads
from dermascope_wire.logs import EventName, log_event
from dermascope_wire.protocol import (
    MAX_CHUNKS,
    Ack,
    Final,
    Manifest,
    ProtocolError,
    Topics,
    chunk_count_for,
    chunk_slice,
    encode_chunk,
    max_chunk_size,
    parse_ack_topic,
    status_payload,
)
from dermascope_wire.sockets import tcp_nodelay
from device_agent.config import UplinkConfig
from device_agent.uplink.outbox import CorruptEntry, Outbox, OutboxEntry

log = logging.getLogger(__name__)
#: paho's own log (client.enable_logger): only what is worth a technician's attention.
paho_log = logging.getLogger(f"{__name__}.paho")
paho_log.setLevel(logging.WARNING)
paho_log.addFilter(EventName("uplink.mqtt_log"))

#: Answers a command: called with the JSON-able answer, from any thread, at most once.
Reply = Callable[[dict[str, Any]], None]
#: Takes a command's payload and its Reply (device_agent.agent.Agent.submit_command).
CommandSink = Callable[[bytes, Reply], None]

#: Our own cap on chunks in flight; the broker's Receive Maximum can lower it.
DEFAULT_WINDOW = 16
#: Rounds of "final -> still incomplete" without progress before we back off.
MAX_STALLED_ROUNDS = 3
#: CONNACK reason "Unsupported Protocol Version" (paho maps a 3.1.1 broker's refusal to it).
_UNSUPPORTED_PROTOCOL_VERSION = 0x84
_PACKET_TOO_LARGE = 0x95
_THERMAL = Path("/sys/class/thermal/thermal_zone0/temp")


class _Aborted(Exception):
    """The current transfer attempt cannot go on (disconnect, stop); it resumes later."""


@dataclass
class _Transfer:
    entry: OutboxEntry
    data: bytes
    sha256: bytes
    chunk_size: int
    chunk_count: int
    # Chunks went out on this connection and no ack came back since: a connection lost now
    # may be the broker refusing our packet size.
    exposed: bool = False

    @property
    def manifest(self) -> Manifest:
        return Manifest(capture_id=self.entry.capture_id, size=len(self.data),
                        chunk_size=self.chunk_size, chunk_count=self.chunk_count,
                        sha256=self.sha256.hex(), content_type=content_type_of(self.data))


def content_type_of(payload: bytes) -> str:
    """What an outbox entry holds, told by its magic: a sealed bundle or a plain one."""
    if payload.startswith(seal.MAGIC):
        return seal.CONTENT_TYPE
    if payload.startswith(bundle.MAGIC):
        return bundle.CONTENT_TYPE
    return "application/octet-stream"  # the gateway refuses it: quarantined, never lost


def backoff_delay(attempt: int, lo: float, hi: float, rng: random.Random) -> float:
    """Exponential backoff with "equal jitter": half fixed, half random, capped at ``hi``.

    The random half spreads a fleet that lost the broker at the same moment; the fixed half
    keeps the delay from collapsing to zero.
    """
    cap = min(hi, lo * (2 ** min(attempt, 30)))
    return cap / 2 + rng.uniform(0, cap / 2)


class Uplink:
    def __init__(self, config: UplinkConfig, device_id: str, outbox: Outbox,
                 software_version: str, *, window: int = DEFAULT_WINDOW,
                 connect_timeout: float = 5.0,
                 on_command: CommandSink | None = None,
                 trust: signing.Trust | None = None) -> None:
        """``trust``: the gateway signing keys acks must be signed with (the agent sets it
        from ``security.gateway_public_key``). Without one, unsigned acks are accepted over
        plain MQTT only (a developer's bench); with TLS every ack is refused until a key
        is given, so nothing is ever deleted on an unauthenticated word."""
        self.config = config
        self.trust = trust
        # Takes each command from the gateway, and a function to answer it with.
        self.on_command = on_command
        self.device_id = device_id
        self.outbox = outbox
        self.software_version = software_version
        self.topics = Topics(config.topic_prefix, device_id)
        self._mqtt5 = config.protocol == "mqtt5"
        self._window_cap = max(1, window)
        self._rng = random.Random()

        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._connected = False  # CONNACK success seen, not yet disconnected
        self._subscribed = False  # ack subscription granted on this connection
        self._generation = 0  # bumps on every connect: in-flight state of older ones is void
        self._max_packet: int | None = None
        # Learnt chunk-size cap for brokers that state no Maximum Packet Size (MQTT 3.1.1)
        # but drop the connection on a too large packet: halved after repeated drops.
        self._learnt_cap: int | None = None
        self._drops_while_chunking = 0
        # The last connection ended with MQTT 5 "Packet too large" (0x95).
        self._dropped_for_size = False
        self._receive_max = 65535
        self._acks: dict[str, Ack] = {}
        # The transfer in progress (capture id, SHA-256 hex): an ack must name both.
        self._current: tuple[str, str] | None = None
        self._inflight: set[int] = set()
        # PUBACKs that arrived before _publish registered their mid (paho's thread can be
        # faster than ours); bounded, since a stale one only costs one window slot.
        self._early: OrderedDict[int, None] = OrderedDict()
        self._busy = False
        #: Most QoS 1 messages ever awaiting PUBACK at once (the window, checked by tests).
        self.peak_in_flight = 0
        self._req = 0
        self._close = threading.Event()  # end the connection (after stop's goodbye)
        self._connect_timeout = connect_timeout
        self._client: mqtt.Client | None = None
        self._connack: ReasonCode | None = None  # CONNACK of the current client, once seen
        self._conn_ended = False  # the current client's connection is over
        self.last_error = ""

        self._net: threads.Supervised | None = None
        self._sender: threads.Supervised | None = None
        self._heartbeat: threads.Supervised | None = None

    # ------------------------------------------------------------------------- set-up

    def _make_client(self) -> mqtt.Client:
        client_id = f"derm-{self.device_id}"
        # reconnect_on_failure=False: when a connection ends, paho's thread ends with it and
        # uplink-net makes a fresh client (see the module docstring).
        if self._mqtt5:
            client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                                 protocol=mqtt.MQTTv5, reconnect_on_failure=False)
        else:
            client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                                 protocol=mqtt.MQTTv311, clean_session=True,
                                 reconnect_on_failure=False)
        client.connect_timeout = self._connect_timeout
        # paho must never hold more than our window: the outbox is the queue, not paho.
        client.max_inflight_messages_set(self._window_cap + 4)
        client.max_queued_messages_set(self._window_cap * 4 + 16)
        # No Will properties: some 3.1.1-only brokers (amqtt) misparse a v5 CONNECT that
        # has them and hang instead of refusing it, which would defeat our fallback.
        client.will_set(self.topics.status,
                        status_payload("offline", self.device_id, reason="connection lost",
                                       software_version=self.software_version),
                        qos=1, retain=True)
        if self.config.tls:
            # Mutual TLS: our certificate for the broker, the clinic CA to check the
            # broker's certificate and host name (paho's defaults: CERT_REQUIRED, hostname
            # checked).
            client.tls_set(ca_certs=str(self.config.ca_file),
                           certfile=str(self.config.cert_file),
                           keyfile=str(self.config.key_file))
        client.enable_logger(paho_log)
        client.on_socket_open = _guarded(tcp_nodelay)
        client.on_connect = _guarded(self._on_connect)
        client.on_disconnect = _guarded(self._on_disconnect)
        client.on_subscribe = _guarded(self._on_subscribe)
        client.on_message = _guarded(self._on_message)
        client.on_publish = _guarded(self._on_publish)
        return client

    def start(self) -> None:
        """Connect in the background; reconnects forever. A broker down now is fine."""
        if self._net is not None:
            return
        self._stop.clear()  # start() after stop() works again
        if self.trust is None:
            self.trust = signing.Trust(allow_unsigned=not self.config.tls)
        if self.trust.allow_unsigned:
            log_event(log, "security.unsigned_acks", level=logging.WARNING,
                      reason="no gateway signing key: unsigned acks are accepted; "
                             "development only")
        elif not self.trust.keys:
            self.last_error = "no gateway signing key: acks cannot be verified"
            log_event(log, "security.no_gateway_key", level=logging.ERROR,
                      reason="no gateway signing key: every ack is refused and nothing is "
                             "delivered; set security.gateway_public_key")
        self._close.clear()
        self._net = threads.start(f"uplink-net-{self.device_id}", self._net_main, log)
        self._sender = threads.start(f"uplink-sender-{self.device_id}", self._sender_main, log)
        self._heartbeat = threads.start(f"uplink-heartbeat-{self.device_id}",
                                        self._heartbeat_main, log)
        log_event(log, "uplink.started", host=self.config.host, port=self.config.port,
                  protocol=self.config.protocol, device_id=self.device_id)

    # ------------------------------------------------------------------------- connections

    def _net_main(self) -> None:
        attempt = 0
        silent = 0
        while not self._close.is_set():
            outcome = self._one_connection()
            if outcome == "connected":
                attempt = silent = 0
            elif self._mqtt5 and outcome in ("unsupported_version", "silent"):
                # "Silent": some 3.1.1-only brokers neither accept nor refuse an MQTT 5
                # CONNECT (amqtt reads it as 3.1.1 and waits for bytes that never come).
                silent += 1
                if outcome == "unsupported_version" or silent >= 2:
                    self._mqtt5 = False
                    log_event(log, "uplink.protocol_fallback", level=logging.WARNING,
                              protocol="mqtt311", host=self.config.host, port=self.config.port)
                    continue  # at once: this is not a failure to back off from
            if self._close.is_set():
                break
            delay = backoff_delay(attempt, self.config.retry_min, self.config.retry_max,
                                  self._rng)
            attempt += 1
            log_event(log, "uplink.reconnect_scheduled", level=logging.DEBUG,
                      delay=round(delay, 3), reason=outcome)
            self._close.wait(delay)

    def _one_connection(self) -> str:
        """Connect once and hold the connection until it ends. Returns what happened:
        connected, failed, refused, unsupported_version or silent (no CONNACK)."""
        client = self._make_client()
        with self._cond:
            self._client = client
            self._connack = None
            self._conn_ended = False
        # No broker-side session (clean start; Session Expiry Interval absent = 0): the outbox
        # is the persistence, and each transfer re-asks the gateway what it holds. No CONNECT
        # properties on purpose: 3.1.1-only brokers then answer "unsupported protocol
        # version" more often than hang.
        kwargs: dict[str, Any] = {"clean_start": True} if self._mqtt5 else {}
        try:
            # Bounded by connect_timeout (DNS, TCP, TLS); sends CONNECT.
            client.connect(self.config.host, self.config.port,
                           keepalive=self.config.keepalive, **kwargs)
        except OSError as err:
            self.last_error = f"cannot connect: {err}"
            log_event(log, "uplink.connect_failed", level=logging.DEBUG, error=str(err))
            return "failed"
        client.loop_start()
        try:
            with self._cond:
                answered = self._cond.wait_for(
                    lambda: self._connack is not None or self._conn_ended
                    or self._close.is_set(), self._connect_timeout)
                connack = self._connack
            if self._close.is_set():
                return "connected" if connack is not None and not connack.is_failure else "failed"
            if not answered:
                log_event(log, "uplink.no_connack", level=logging.WARNING,
                          host=self.config.host, port=self.config.port,
                          timeout=self._connect_timeout)
                return "silent"
            if connack is None:
                return "failed"  # closed before any CONNACK
            if connack.is_failure:
                if connack.value == _UNSUPPORTED_PROTOCOL_VERSION:
                    return "unsupported_version"
                return "refused"
            with self._cond:
                while not self._cond.wait_for(
                        lambda: self._conn_ended or self._close.is_set(),
                        timeout=self.config.keepalive):
                    pass  # re-check after each keepalive: the wait itself stays bounded
            return "connected"
        finally:
            client.disconnect()
            # Returns promptly: with reconnect_on_failure=False paho's loop ends with the
            # connection, and disconnect() ends it otherwise.
            client.loop_stop()
            with self._cond:
                self._connected = self._subscribed = False
                self._inflight.clear()
                self._cond.notify_all()

    def notify(self) -> None:
        """A new entry is in the outbox."""
        with self._cond:
            self._cond.notify_all()

    def __enter__(self) -> Uplink:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop sending, say "offline" (retained), disconnect, join the threads."""
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        deadline = time.monotonic() + timeout
        for thread in (self._sender, self._heartbeat):
            if thread is not None:
                thread.join(max(0.1, deadline - time.monotonic()))
        if self.online:
            info = self._publish(self.topics.status,
                                 status_payload("offline", self.device_id, reason="stopped",
                                                software_version=self.software_version),
                                 retain=True)
            if info is not None and info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS:
                # If the connection went meanwhile, the Last Will says "offline" instead.
                with contextlib.suppress(RuntimeError, ValueError):
                    info.wait_for_publish(timeout=max(0.1, min(1.0, deadline - time.monotonic())))
        self._close.set()
        with self._cond:
            self._cond.notify_all()
        if self._net is not None:
            self._net.join(max(0.1, deadline - time.monotonic()))
        self._net = self._sender = self._heartbeat = None
        log_event(log, "uplink.stopped", device_id=self.device_id)

    def healthy(self) -> bool:
        """False once one of the uplink's threads died (it was logged as thread.crashed)."""
        return self._net is None or threads.all_alive((self._net, self._sender,
                                                        self._heartbeat))

    @property
    def online(self) -> bool:
        with self._cond:
            return self._connected and self._subscribed

    def wait_online(self, timeout: float) -> bool:
        """True once connected and subscribed (commands and acks can reach us)."""
        with self._cond:
            return self._cond.wait_for(lambda: self._connected and self._subscribed, timeout)

    def wait_idle(self, timeout: float) -> bool:
        """True once the outbox is empty and nothing is in flight."""
        with self._cond:
            return self._cond.wait_for(lambda: self.outbox.depth() == 0 and not self._busy,
                                       timeout)

    # ------------------------------------------------------------------------- paho callbacks

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any,
                    reason_code: ReasonCode, properties: Properties | None) -> None:
        if reason_code.is_failure:
            self.last_error = f"connect refused: {reason_code}"
            log_event(log, "uplink.connect_refused", level=logging.WARNING,
                      reason=str(reason_code))
            with self._cond:
                self._connack = reason_code
                self._cond.notify_all()
            return
        max_packet = getattr(properties, "MaximumPacketSize", None) if properties else None
        receive_max = getattr(properties, "ReceiveMaximum", None) if properties else None
        with self._cond:
            self._connected = True
            self._subscribed = False
            self._generation += 1
            self._max_packet = max_packet
            self._receive_max = receive_max or 65535
            self._inflight.clear()
            self._early.clear()
            self._connack = reason_code
            self._cond.notify_all()
        # Subscriptions do not survive a clean start: renew them on every connect. One
        # SUBACK for both: its first reason code is the ack topic's, the second the commands'.
        result, _mid = client.subscribe([(self.topics.ack_filter, 1),
                                         (self.topics.command, 1)])
        if result != MQTTErrorCode.MQTT_ERR_SUCCESS:
            log_event(log, "uplink.subscribe_failed", level=logging.WARNING, rc=str(result))
        log_event(log, "uplink.connected", host=self.config.host, port=self.config.port,
                  protocol="mqtt5" if self._mqtt5 else "mqtt311", max_packet=max_packet,
                  receive_max=receive_max)

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int,
                      reason_codes: list[ReasonCode], properties: Properties | None) -> None:
        if len(reason_codes) > 1 and reason_codes[1].is_failure:
            log_event(log, "uplink.commands_refused", level=logging.WARNING,
                      reason=str(reason_codes[1]))
        if reason_codes and reason_codes[0].is_failure:
            # E.g. an ACL denies our ack topic: without acks nothing can ever be delivered.
            self.last_error = f"ack subscription refused: {reason_codes[0]}"
            log_event(log, "uplink.subscribe_refused", level=logging.ERROR,
                      reasons=[str(reason_codes[0])])
            return
        with self._cond:
            self._subscribed = True
            self._cond.notify_all()
        self._publish_status()

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any,
                       reason_code: ReasonCode, properties: Properties | None) -> None:
        with self._cond:
            if client is not self._client:
                return
            was = self._connected
            self._dropped_for_size = reason_code == _PACKET_TOO_LARGE
            self._connected = False
            self._subscribed = False
            self._conn_ended = True
            self._inflight.clear()
            self._cond.notify_all()
        if was:
            level = logging.INFO if self._stop.is_set() else logging.WARNING
            log_event(log, "uplink.disconnected", level=level, reason=str(reason_code))

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        if message.topic == self.topics.command:
            self._answer(client, message)
            return
        try:
            capture_id = parse_ack_topic(self.config.topic_prefix, self.device_id, message.topic)
        except ProtocolError as err:
            log_event(log, "uplink.bad_ack", level=logging.WARNING, topic=message.topic,
                      reason=err.reason, detail=err.detail)
            return
        with self._cond:
            current = self._current
        if current is None or current[0] != capture_id:
            return  # a late answer, or one about a capture not being sent: nothing to do
        try:
            ack = self._authentic_ack(capture_id, current[1], message.payload)
        except signing.SignatureError as err:
            self.last_error = f"ack refused: {err.reason}"
            log_event(log, "uplink.ack_refused", level=logging.WARNING, capture_id=capture_id,
                      reason=err.reason, detail=err.detail)
            return
        except ProtocolError as err:
            log_event(log, "uplink.bad_ack", level=logging.WARNING, topic=message.topic,
                      reason=err.reason, detail=err.detail)
            return
        with self._cond:
            self._acks[capture_id] = ack
            self._cond.notify_all()

    def _authentic_ack(self, capture_id: str, sha256: str, payload: bytes) -> Ack:
        """The ack in ``payload`` if the device may act on it: signed by a trusted key (or
        unsigned in development mode), for this device and capture, and for a
        ``committed`` or ``incomplete`` one, about this very transfer (its SHA-256), so a
        signed ack of another transfer replayed here means nothing."""
        trust = self.trust or signing.Trust()
        opened = trust.open(payload, "ack")
        ack = Ack.decode(opened.body)
        if ack.capture_id != capture_id:
            raise signing.SignatureError("wrong_capture", "the ack names another capture "
                                         "than its topic")
        if ack.device_id != self.device_id and (opened.key_id is not None or ack.device_id):
            raise signing.SignatureError("wrong_device", f"the ack is for device "
                                         f"{ack.device_id or '(none)'!r:.70}")
        if ack.state in ("committed", "incomplete") and ack.sha256 != sha256:
            raise signing.SignatureError("sha256_mismatch", f"a {ack.state} ack for another "
                                         "transfer of this capture (SHA-256 differs)")
        return ack

    def _answer(self, client: mqtt.Client, message: mqtt.MQTTMessage) -> None:
        """Hand a command to the agent with a function that publishes its answer: to the
        MQTT 5 Response Topic with the Correlation Data when the gateway gave one inside our
        subtree, else to our ``resp`` topic (MQTT 3.1.1), where the answer's ``id`` pairs
        it."""
        props = message.properties if self._mqtt5 else None
        topic = getattr(props, "ResponseTopic", None) or self.topics.response
        if not isinstance(topic, str) or not topic.startswith(self.topics.response):
            topic = self.topics.response  # the ACL lets us answer only inside our subtree
        properties = None
        correlation = getattr(props, "CorrelationData", None)
        if self._mqtt5 and isinstance(correlation, bytes):
            properties = Properties(PacketTypes.PUBLISH)
            properties.CorrelationData = correlation

        def reply(answer: dict[str, Any]) -> None:
            client.publish(topic, json.dumps(answer).encode(), qos=1, properties=properties)

        if self.on_command is None:
            reply({"id": None, "ok": False, "error": {
                "code": "unavailable", "message": "this device takes no commands"}})
            return
        self.on_command(message.payload, reply)

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int,
                    reason_code: ReasonCode, properties: Properties | None) -> None:
        if reason_code.is_failure:
            # E.g. not authorised, quota exceeded, packet too large: the broker dropped it.
            # Nothing else to do here: a dropped chunk shows up in the gateway's missing
            # bitmap, an unanswered manifest or final in the ack timeout.
            self.last_error = f"broker refused a publish: {reason_code}"
            log_event(log, "uplink.publish_refused", level=logging.WARNING, mid=mid,
                      reason=str(reason_code))
        with self._cond:
            if mid in self._inflight:
                self._inflight.discard(mid)
            else:
                self._early[mid] = None
                while len(self._early) > 1024:
                    self._early.popitem(last=False)
            self._cond.notify_all()

    # ------------------------------------------------------------------------- publishing

    def _publish(self, topic: str, payload: bytes, *, retain: bool = False,
                 kind: str = "", correlation: bytes | None = None) -> mqtt.MQTTMessageInfo | None:
        props = None
        if self._mqtt5:
            props = Properties(PacketTypes.PUBLISH)
            if kind:
                props.UserProperty = [("v", "1"), ("kind", kind)]
                # Stale chunks are worthless once the device has moved on; let the broker
                # drop them rather than flood a gateway that comes back after days.
                props.MessageExpiryInterval = int(max(60, self.config.ack_timeout * 10))
            if correlation is not None:
                props.CorrelationData = correlation
        client = self._client
        if client is None:
            return None
        info = client.publish(topic, payload, qos=1, retain=retain, properties=props)
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            log_event(log, "uplink.publish_failed", level=logging.WARNING, rc=str(info.rc))
            return None
        with self._cond:
            if info.mid in self._early:
                del self._early[info.mid]
            else:
                self._inflight.add(info.mid)
                self.peak_in_flight = max(self.peak_in_flight, len(self._inflight))
        return info

    def _publish_status(self) -> None:
        self._publish(self.topics.status, status_payload("online", self.device_id,
                                                          **self.health()), retain=True)

    def health(self) -> dict[str, Any]:
        """The heartbeat's figures: no patient data, only counts and device health."""
        oldest = self.outbox.oldest_created()
        try:
            disk_free = shutil.disk_usage(self.outbox.root).free
        except OSError:
            disk_free = None
        try:
            temperature = int(_THERMAL.read_text().strip()) / 1000.0
        except (OSError, ValueError):
            temperature = None
        return {
            "ts": datetime.now(UTC).isoformat(timespec="seconds"),
            "software_version": self.software_version,
            "protocol": "mqtt5" if self._mqtt5 else "mqtt311",
            "outbox_depth": self.outbox.depth(),
            "outbox_bytes": self.outbox.used_bytes(),
            "oldest_pending_age_s": round(time.time() - oldest, 1) if oldest else None,
            "disk_free_bytes": disk_free,
            "temperature_c": temperature,
            "last_error": self.last_error,
        }

    # ------------------------------------------------------------------------- threads

    def _heartbeat_main(self) -> None:
        while not self._stop.wait(self.config.heartbeat_interval):
            if self.online:
                self._publish_status()

    def _sender_main(self) -> None:
        while not self._stop.is_set():
            with self._cond:
                ready = self._cond.wait_for(
                    lambda: self._stop.is_set()
                    or (self._connected and self._subscribed and self.outbox.has_deliverable()),
                    timeout=self.config.heartbeat_interval)
                go = ready and not self._stop.is_set()
                self._busy = go
            if not go:
                continue
            try:
                pending = self.outbox.deliverable()
                if pending:
                    self._send_entry(pending[0])
            except OSError as err:
                # The device's own disk (removing or quarantining an entry): keep the thread
                # alive, say so in the status, try again later.
                self.last_error = f"outbox: {err}"
                log_event(log, "uplink.outbox_error", level=logging.ERROR, error=str(err))
                self._stop.wait(self.config.retry_max)
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _wait(self, predicate: Any, timeout: float, generation: int) -> bool:
        """Wait for ``predicate`` (called under the lock); raise _Aborted on stop/disconnect."""
        with self._cond:
            ok = self._cond.wait_for(
                lambda: predicate() or self._stop.is_set() or self._generation != generation
                or not self._connected, timeout)
            if self._stop.is_set() or self._generation != generation or not self._connected:
                raise _Aborted()
            return bool(ok)

    def _backoff(self, attempt: int, generation: int) -> None:
        delay = backoff_delay(attempt, self.config.retry_min, self.config.retry_max, self._rng)
        self._wait(lambda: False, delay, generation)

    def _next_req(self) -> int:
        self._req += 1
        return self._req

    # ------------------------------------------------------------------------- one transfer

    def _send_entry(self, entry: OutboxEntry) -> None:
        try:
            data, digest = self.outbox.read_verified(entry)
        except CorruptEntry as err:
            # The outbox already quarantined it and logged; the next entry goes next.
            self.last_error = f"corrupt outbox entry {entry.capture_id}"
            log_event(log, "uplink.skipped_corrupt", level=logging.WARNING,
                      capture_id=entry.capture_id, detail=str(err))
            return
        except FileNotFoundError:
            return
        with self._cond:
            generation = self._generation
            max_packet = self._max_packet
        try:
            chunk_size = max_chunk_size(min(self.config.chunk_size,
                                            self._learnt_cap or self.config.chunk_size),
                                        max_packet,
                                        len(self.topics.up(entry.capture_id, "chunk")))
        except ProtocolError as err:
            self.last_error = err.detail
            log_event(log, "uplink.packet_too_small", level=logging.ERROR, detail=err.detail)
            with contextlib.suppress(_Aborted):
                self._wait(lambda: False, self.config.retry_max, generation)
            return
        if chunk_count_for(len(data), chunk_size) > MAX_CHUNKS:
            # Too large for this chunk size: bigger chunks if the broker allows, else refuse.
            chunk_size = -(-len(data) // MAX_CHUNKS)
            if max_packet and chunk_size > max_chunk_size(10**12, max_packet, 0):
                self.outbox.quarantine(entry.capture_id, "too large for the broker's packet cap")
                return
        transfer = _Transfer(entry, data, digest, chunk_size,
                             chunk_count_for(len(data), chunk_size))
        try:
            self._run_transfer(transfer, generation)
        except _Aborted:
            if transfer.exposed and not self._stop.is_set():
                self._note_drop_after_chunks(transfer)
            return  # disconnected or stopping: the sender loop resumes after reconnect

    def _run_transfer(self, t: _Transfer, generation: int) -> None:
        with self._cond:
            self._current = (t.entry.capture_id, t.sha256.hex())
        try:
            self._transfer_rounds(t, generation)
        finally:
            with self._cond:
                self._current = None

    def _transfer_rounds(self, t: _Transfer, generation: int) -> None:
        capture_id = t.entry.capture_id
        attempt = 0
        while True:
            req = self._next_req()
            with self._cond:
                self._acks.pop(capture_id, None)
            manifest = dataclasses.replace(t.manifest, req=req)
            self._publish(self.topics.up(capture_id, "manifest"), manifest.encode(),
                          kind="manifest", correlation=f"{capture_id}:{req}".encode())
            log_event(log, "uplink.manifest_sent", level=logging.DEBUG, capture_id=capture_id,
                      req=req, size=len(t.data), chunk_size=t.chunk_size, chunks=t.chunk_count)
            ack = self._wait_ack(capture_id, req, generation)
            stalled = 0
            best = t.chunk_count + 1
            while ack is not None and ack.state == "incomplete":
                if ack.chunk_count != t.chunk_count:
                    ack = None  # answers a different transfer of this capture: start over
                    break
                if len(ack.missing) >= best:
                    stalled += 1
                    if stalled >= MAX_STALLED_ROUNDS:
                        ack = None
                        break
                best = min(best, len(ack.missing))
                self._send_chunks(t, ack.missing, generation)
                req = self._next_req()
                final = Final(capture_id, t.sha256.hex(), t.chunk_count, req)
                self._publish(self.topics.up(capture_id, "final"), final.encode(), kind="final",
                              correlation=f"{capture_id}:{req}".encode())
                log_event(log, "uplink.final_sent", level=logging.DEBUG, capture_id=capture_id,
                          req=req, resent=len(ack.missing))
                ack = self._wait_ack(capture_id, req, generation)
                if ack is not None:
                    # The connection carried our chunks: their size is fine.
                    t.exposed = False
                    self._drops_while_chunking = 0
            if ack is not None and ack.state == "committed":
                # _authentic_ack let it through: signed for this transfer's SHA-256.
                self.outbox.remove(capture_id)
                log_event(log, "capture.delivered", capture_id=capture_id, size=len(t.data),
                          chunk_size=t.chunk_size, chunks=t.chunk_count)
                return
            if ack is not None and ack.state == "rejected":
                self.last_error = f"gateway rejected {capture_id}: {ack.reason}"
                log_event(log, "uplink.rejected", level=logging.ERROR, capture_id=capture_id,
                          reason=ack.reason)
                self.outbox.quarantine(capture_id, f"rejected by gateway: {ack.reason}")
                return
            # No answer, a transient "retry" or no progress: back off, then start again.
            why = "ack timeout" if ack is None else f"gateway: {ack.state} {ack.reason}"
            log_event(log, "uplink.retry", level=logging.INFO, capture_id=capture_id,
                      attempt=attempt, reason=why)
            self._backoff(attempt, generation)
            attempt += 1

    def _wait_ack(self, capture_id: str, req: int, generation: int) -> Ack | None:
        def answered() -> bool:
            ack = self._acks.get(capture_id)
            # A verdict (committed/rejected) holds whenever it comes; the others only answer
            # the request they name.
            return ack is not None and (ack.state in ("committed", "rejected") or ack.req == req)

        if not self._wait(answered, self.config.ack_timeout, generation):
            return None
        with self._cond:
            ack = self._acks.pop(capture_id)
        log_event(log, "uplink.ack", level=logging.DEBUG, capture_id=capture_id, state=ack.state,
                  req=ack.req, missing=len(ack.missing), reason=ack.reason)
        return ack

    def _note_drop_after_chunks(self, t: _Transfer) -> None:
        """Brokers without a stated packet cap (3.1.1) close the connection on a too large
        PUBLISH. Two drops in a row between sending chunks and the next ack: halve the chunk
        size (not below 1 KiB) for the next attempts. If the cause was something else, this
        only costs some efficiency.

        Over MQTT 5 only a drop the broker explains as "Packet too large" counts: a broker
        states its cap in the CONNACK (the chunks fit under it) and must say so when a packet
        is over it, so any other drop is the link, and halving would only restart the
        transfer from zero (another chunk size) for nothing."""
        if self._mqtt5 and not self._dropped_for_size:
            return
        self._drops_while_chunking += 1
        if self._drops_while_chunking < 2 or t.chunk_size <= 1024:
            return
        self._drops_while_chunking = 0
        self._learnt_cap = max(1024, t.chunk_size // 2)
        log_event(log, "uplink.chunk_size_reduced", level=logging.WARNING,
                  capture_id=t.entry.capture_id, chunk_size=self._learnt_cap)

    def _send_chunks(self, t: _Transfer, missing: tuple[int, ...], generation: int) -> None:
        if missing:
            t.exposed = True
        topic = self.topics.up(t.entry.capture_id, "chunk")
        window = max(1, min(self._window_cap, self._receive_max - 2))
        for index in missing:
            if not self._wait(lambda: len(self._inflight) < window, self.config.ack_timeout,
                              generation):
                raise _Aborted()  # no PUBACK for a whole ack_timeout: the link is stuck
            payload = encode_chunk(t.sha256, t.chunk_size, index,
                                   chunk_slice(t.data, t.chunk_size, index))
            self._publish(topic, payload, kind="chunk")


def _guarded(callback: Callable[..., None]) -> Callable[..., None]:
    """A paho callback that never raises: paho's network loop dies with an exception from a
    callback, and with it every ack and command of the device."""

    def guarded(*args: Any) -> None:
        try:
            callback(*args)
        except Exception as err:  # noqa: BLE001 - the callback's supervisor, logs the traceback
            log_event(log, "uplink.callback_failed", level=logging.ERROR,
                      callback=getattr(callback, "__name__", "?"),
                      error=f"{type(err).__name__}: {err}", traceback=traceback.format_exc())

    return guarded
