"""The device's MQTT connection: paho's client, reconnects, callbacks, publishing, status.

Why it is built this way:

- One paho client per connection, made by ``uplink-net``, which connects, waits for the
  connection to end and reconnects forever with backoff and jitter. Nothing of a dead
  connection is carried over: paho would otherwise resend its unacknowledged messages after
  a reconnect (stale chunks, even one the broker dropped us for), and the outbox makes them
  redundant anyway. It also decides the MQTT 3.1.1 fallback.
- No broker-side session (clean start): the outbox is the persistence, and each transfer
  re-asks the gateway what it holds.
- Threads: ``uplink-net``, paho's network thread of the current connection and
  ``uplink-heartbeat`` (the retained status); the transfer's sender (``client``) meets them
  on one Condition, :attr:`Connection.cond`. Every wait has a timeout and nobody polls.
- paho callbacks never raise: an exception there would stop its network loop. Each one is
  wrapped (``_guarded``): an unexpected exception is logged with its traceback and the loop
  goes on. paho's own log goes to ours (warnings and errors).
- Acks are handed to the transfer in progress only once ``transfer.verify_ack`` let them
  through (signed by the clinic's gateway key for this device, capture and SHA-256);
  anything else is refused (``uplink.ack_refused``) and ignored.
- Commands from the gateway are not run here: ``on_command`` hands them to the agent's
  thread with a ``reply`` function, so a slow or failing command never holds up paho's loop
  and never races a capture.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import threading
import time
import traceback
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from dermascope_wire import signing, threads
from dermascope_wire.logs import EventName, log_event
from dermascope_wire.protocol import Ack, ProtocolError, Topics, parse_ack_topic, status_payload
from dermascope_wire.sockets import tcp_nodelay
from device_agent.config import UplinkConfig
from device_agent.uplink.transfer import verify_ack

log = logging.getLogger(__name__)
#: paho's own log (client.enable_logger): only what is worth a technician's attention.
paho_log = logging.getLogger(f"{__name__}.paho")
paho_log.setLevel(logging.WARNING)
paho_log.addFilter(EventName("uplink.mqtt_log"))

#: Answers a command: called with the JSON-able answer, from any thread, at most once.
Reply = Callable[[dict[str, Any]], None]
#: Takes a command's payload and its Reply (device_agent.agent.Agent.submit_command).
CommandSink = Callable[[bytes, Reply], None]

#: CONNACK reason "Unsupported Protocol Version" (paho maps a 3.1.1 broker's refusal to it).
_UNSUPPORTED_PROTOCOL_VERSION = 0x84
_PACKET_TOO_LARGE = 0x95
#: A connection that lasted this long (seconds) was healthy: the broker took us, and what
#: ended it (a cut, a NAT, Wi-Fi roaming) is likely over. Shorter ones back off as usual, so
#: a broker that closes us at once is not hammered.
HEALTHY_AFTER = 1.0
#: The first reconnect after a healthy connection comes within this many seconds (random,
#: so a fleet that lost the broker together does not return in one burst).
QUICK_RECONNECT = 0.1


class Aborted(Exception):
    """The current transfer attempt cannot go on (disconnect, stop); it resumes later."""


def backoff_delay(attempt: int, lo: float, hi: float, rng: random.Random) -> float:
    """Exponential backoff with "equal jitter": half fixed, half random, capped at ``hi``.

    The random half spreads a fleet that lost the broker at the same moment; the fixed half
    keeps the delay from collapsing to zero.
    """
    cap = min(hi, lo * (2 ** min(attempt, 30)))
    return cap / 2 + rng.uniform(0, cap / 2)


def reconnect_delay(attempt: int, healthy: bool, lo: float, hi: float,
                    rng: random.Random) -> float:
    """The wait before reconnecting: right after a healthy connection ended (``attempt`` 0),
    a short random one (QUICK_RECONNECT, or less when ``lo`` is smaller): a transfer cut mid-
    way loses little more than the reconnect; after that, ``backoff_delay``."""
    if healthy and attempt == 0:
        return rng.uniform(0, min(lo, QUICK_RECONNECT))
    return backoff_delay(attempt - 1 if healthy else attempt, lo, hi, rng)


class Connection:
    def __init__(self, config: UplinkConfig, device_id: str, software_version: str,
                 health: Callable[[], dict[str, Any]], *, window: int,
                 connect_timeout: float) -> None:
        """``health``: the figures the retained "online" status carries."""
        self.config = config
        self.device_id = device_id
        self.software_version = software_version
        self.health = health
        self.topics = Topics(config.topic_prefix, device_id)
        self.trust: signing.Trust | None = None
        self.on_command: CommandSink | None = None
        self.mqtt5 = config.protocol == "mqtt5"
        self.window_cap = max(1, window)
        self.rng = random.Random()
        #: Where the connection's callbacks and the sender meet.
        self.cond = threading.Condition()
        #: Set to stop sending (the sender and heartbeat end; waits raise Aborted).
        self.stopping = threading.Event()
        self._connected = False  # CONNACK success seen, not yet disconnected
        self._subscribed = False  # ack subscription granted on this connection
        # Asked for on this connection and not refused (yet): the broker takes our packets
        # in order, so a manifest sent now finds the subscription in place for its answer.
        self._sub_pending = False
        self.generation = 0  # bumps on every connect: in-flight state of older ones is void
        self.max_packet: int | None = None
        #: The last connection ended with MQTT 5 "Packet too large" (0x95).
        self.dropped_for_size = False
        self._receive_max = 65535
        self._acks: dict[str, Ack] = {}
        # The transfer in progress (capture id, SHA-256 hex): an ack must name both.
        self._current: tuple[str, str] | None = None
        self._inflight: set[int] = set()
        # PUBACKs that arrived before publish registered their mid (paho's thread can be
        # faster than ours); bounded, since a stale one only costs one window slot.
        self._early: OrderedDict[int, None] = OrderedDict()
        #: Most QoS 1 messages ever awaiting PUBACK at once (the window, checked by tests).
        self.peak_in_flight = 0
        # While the sender waits for the window to drain: the count it waits for. PUBACKs
        # above it wake nobody (a wake-up per PUBACK is a thread switch per chunk).
        self._window_low: int | None = None
        self._close = threading.Event()  # end the connection (after stop's goodbye)
        self._connect_timeout = connect_timeout
        self._client: mqtt.Client | None = None
        self._connack: ReasonCode | None = None  # CONNACK of the current client, once seen
        self._conn_ended = False  # the current client's connection is over
        self._up_since = 0.0  # monotonic time of the current connection's CONNACK
        self.last_error = ""
        self._net: threads.Supervised | None = None
        self._heartbeat: threads.Supervised | None = None

    # ------------------------------------------------------------------------- life cycle

    def start(self) -> None:
        self._close.clear()
        self._net = threads.start(f"uplink-net-{self.device_id}", self._net_main, log)

    def start_heartbeat(self) -> None:
        self._heartbeat = threads.start(f"uplink-heartbeat-{self.device_id}",
                                        self._heartbeat_main, log)

    def supervised(self) -> tuple[threads.Supervised | None, ...]:
        """The connection's threads (``uplink-net``, ``uplink-heartbeat``)."""
        return self._net, self._heartbeat

    def say_offline(self, deadline: float) -> None:
        """Retained "offline" while still online (else the Last Will says it)."""
        if not self.online:
            return
        info = self.publish(self.topics.status,
                            status_payload("offline", self.device_id, reason="stopped",
                                           software_version=self.software_version),
                            retain=True)
        if info is not None and info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS:
            # If the connection went meanwhile, the Last Will says "offline" instead.
            with contextlib.suppress(RuntimeError, ValueError):
                info.wait_for_publish(timeout=max(0.1, min(1.0, deadline - time.monotonic())))

    def close(self, deadline: float) -> None:
        """End the connection and join the threads (after the sender stopped)."""
        if self._heartbeat is not None:
            self._heartbeat.join(max(0.1, deadline - time.monotonic()))
        self.say_offline(deadline)
        self._close.set()
        with self.cond:
            self.cond.notify_all()
        if self._net is not None:
            self._net.join(max(0.1, deadline - time.monotonic()))
        self._net = self._heartbeat = None

    @property
    def online(self) -> bool:
        with self.cond:
            return self._connected and self._subscribed

    def connected_for(self) -> float:
        """Seconds since the current connection's CONNACK (0 when not connected)."""
        with self.cond:
            return time.monotonic() - self._up_since if self._connected else 0.0

    def wait_online(self, timeout: float) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: self._connected and self._subscribed, timeout)

    # ------------------------------------------------------------------------- connections

    def _make_client(self) -> mqtt.Client:
        client_id = f"derm-{self.device_id}"
        # reconnect_on_failure=False: when a connection ends, paho's thread ends with it and
        # uplink-net makes a fresh client (see the module docstring).
        if self.mqtt5:
            client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                                 protocol=mqtt.MQTTv5, reconnect_on_failure=False)
        else:
            client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                                 protocol=mqtt.MQTTv311, clean_session=True,
                                 reconnect_on_failure=False)
        client.connect_timeout = self._connect_timeout
        # paho must never hold more than our window: the outbox is the queue, not paho.
        client.max_inflight_messages_set(self.window_cap + 4)
        client.max_queued_messages_set(self.window_cap * 4 + 16)
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

    def _net_main(self) -> None:
        attempt = 0
        silent = 0
        healthy = False  # the last connection lasted (reconnect_delay)
        while not self._close.is_set():
            outcome = self._one_connection()
            if outcome == "connected":
                attempt = silent = 0
                with self.cond:
                    healthy = time.monotonic() - self._up_since >= HEALTHY_AFTER
            elif self.mqtt5 and outcome in ("unsupported_version", "silent"):
                # "Silent": some 3.1.1-only brokers neither accept nor refuse an MQTT 5
                # CONNECT (amqtt reads it as 3.1.1 and waits for bytes that never come).
                silent += 1
                if outcome == "unsupported_version" or silent >= 2:
                    self.mqtt5 = False
                    log_event(log, "uplink.protocol_fallback", level=logging.WARNING,
                              protocol="mqtt311", host=self.config.host, port=self.config.port)
                    continue  # at once: this is not a failure to back off from
            if self._close.is_set():
                break
            delay = reconnect_delay(attempt, healthy, self.config.retry_min,
                                    self.config.retry_max, self.rng)
            attempt += 1
            log_event(log, "uplink.reconnect_scheduled", level=logging.DEBUG,
                      delay=round(delay, 3), reason=outcome, after_healthy=healthy)
            self._close.wait(delay)

    def _one_connection(self) -> str:
        """Connect once and hold the connection until it ends. Returns what happened:
        connected, failed, refused, unsupported_version or silent (no CONNACK)."""
        client = self._make_client()
        with self.cond:
            self._client = client
            self._connack = None
            self._conn_ended = False
        # No broker-side session (clean start; Session Expiry Interval absent = 0): the outbox
        # is the persistence, and each transfer re-asks the gateway what it holds. No CONNECT
        # properties on purpose: 3.1.1-only brokers then answer "unsupported protocol
        # version" more often than hang.
        kwargs: dict[str, Any] = {"clean_start": True} if self.mqtt5 else {}
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
            with self.cond:
                answered = self.cond.wait_for(
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
            with self.cond:
                while not self.cond.wait_for(
                        lambda: self._conn_ended or self._close.is_set(),
                        timeout=self.config.keepalive):
                    pass  # re-check after each keepalive: the wait itself stays bounded
            return "connected"
        finally:
            client.disconnect()
            # Returns promptly: with reconnect_on_failure=False paho's loop ends with the
            # connection, and disconnect() ends it otherwise.
            client.loop_stop()
            with self.cond:
                self._connected = self._subscribed = self._sub_pending = False
                self._inflight.clear()
                self.cond.notify_all()

    # ------------------------------------------------------------------------- paho callbacks

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any,
                    reason_code: ReasonCode, properties: Properties | None) -> None:
        if reason_code.is_failure:
            self.last_error = f"connect refused: {reason_code}"
            log_event(log, "uplink.connect_refused", level=logging.WARNING,
                      reason=str(reason_code))
            with self.cond:
                self._connack = reason_code
                self.cond.notify_all()
            return
        max_packet = getattr(properties, "MaximumPacketSize", None) if properties else None
        receive_max = getattr(properties, "ReceiveMaximum", None) if properties else None
        with self.cond:
            self._connected = True
            self._subscribed = False
            self.generation += 1
            self.max_packet = max_packet
            self._receive_max = receive_max or 65535
            self._inflight.clear()
            self._early.clear()
            self._connack = reason_code
            self._up_since = time.monotonic()
            self.cond.notify_all()
        # Subscriptions do not survive a clean start: renew them on every connect. One
        # SUBACK for both: its first reason code is the ack topic's, the second the commands'.
        result, _mid = client.subscribe([(self.topics.ack_filter, 1),
                                         (self.topics.command, 1)])
        if result != MQTTErrorCode.MQTT_ERR_SUCCESS:
            log_event(log, "uplink.subscribe_failed", level=logging.WARNING, rc=str(result))
        else:
            with self.cond:
                if client is self._client and self._connected:
                    self._sub_pending = True
                    self.cond.notify_all()
        log_event(log, "uplink.connected", host=self.config.host, port=self.config.port,
                  protocol="mqtt5" if self.mqtt5 else "mqtt311", max_packet=max_packet,
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
            with self.cond:
                self._sub_pending = False
            return
        log_event(log, "uplink.subscribed", level=logging.DEBUG)
        with self.cond:
            self._subscribed = True
            self.cond.notify_all()
        self.publish_status()

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any,
                       reason_code: ReasonCode, properties: Properties | None) -> None:
        with self.cond:
            if client is not self._client:
                return
            was = self._connected
            self.dropped_for_size = reason_code == _PACKET_TOO_LARGE
            self._connected = False
            self._subscribed = self._sub_pending = False
            self._conn_ended = True
            self._inflight.clear()
            self.cond.notify_all()
        if was:
            level = logging.INFO if self.stopping.is_set() else logging.WARNING
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
        with self.cond:
            current = self._current
        if current is None or current[0] != capture_id:
            return  # a late answer, or one about a capture not being sent: nothing to do
        try:
            ack = verify_ack(message.payload, self.trust or signing.Trust(), self.device_id,
                             capture_id, current[1])
        except signing.SignatureError as err:
            self.last_error = f"ack refused: {err.reason}"
            log_event(log, "uplink.ack_refused", level=logging.WARNING, capture_id=capture_id,
                      reason=err.reason, detail=err.detail)
            return
        except ProtocolError as err:
            log_event(log, "uplink.bad_ack", level=logging.WARNING, topic=message.topic,
                      reason=err.reason, detail=err.detail)
            return
        with self.cond:
            self._acks[capture_id] = ack
            self.cond.notify_all()

    def _answer(self, client: mqtt.Client, message: mqtt.MQTTMessage) -> None:
        """Hand a command to the agent with a function that publishes its answer: to the
        MQTT 5 Response Topic with the Correlation Data when the gateway gave one inside our
        subtree, else to our ``resp`` topic (MQTT 3.1.1), where the answer's ``id`` pairs
        it."""
        props = message.properties if self.mqtt5 else None
        topic = getattr(props, "ResponseTopic", None) or self.topics.response
        if not isinstance(topic, str) or not topic.startswith(self.topics.response):
            topic = self.topics.response  # the ACL lets us answer only inside our subtree
        properties = None
        correlation = getattr(props, "CorrelationData", None)
        if self.mqtt5 and isinstance(correlation, bytes):
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
        with self.cond:
            if mid in self._inflight:
                self._inflight.discard(mid)
            else:
                self._early[mid] = None
                while len(self._early) > 1024:
                    self._early.popitem(last=False)
            if self._window_low is None or len(self._inflight) <= self._window_low:
                self.cond.notify_all()

    # ------------------------------------------------------------------------- publishing

    def publish(self, topic: str, payload: bytes, *, retain: bool = False,
                kind: str = "", correlation: bytes | None = None) -> mqtt.MQTTMessageInfo | None:
        props = None
        # Chunks carry no MQTT 5 properties: at ~80 chunks a capture, paho building and
        # parsing them (and copying the payload once per property it strips) was the
        # largest cost per chunk on both sides. They are hints only (docs/protocol.md 3.5),
        # and neither side keeps a broker session that could hold stale chunks.
        if self.mqtt5 and kind != "chunk":
            props = Properties(PacketTypes.PUBLISH)
            if kind:
                props.UserProperty = [("v", "1"), ("kind", kind)]
                # A stale manifest or final is worthless once the device has moved on.
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
        with self.cond:
            if info.mid in self._early:
                del self._early[info.mid]
            else:
                self._inflight.add(info.mid)
                self.peak_in_flight = max(self.peak_in_flight, len(self._inflight))
        return info

    def publish_status(self) -> None:
        self.publish(self.topics.status, status_payload("online", self.device_id,
                                                         **self.health()), retain=True)

    def _heartbeat_main(self) -> None:
        while not self.stopping.wait(self.config.heartbeat_interval):
            if self.online:
                self.publish_status()

    # ------------------------------------------------------------------------- for the sender

    def ready_to_send(self) -> bool:
        """Connected, and the ack subscription granted or asked for and not refused: the
        sender need not wait a round trip for the SUBACK (call under :attr:`cond`)."""
        return self._connected and (self._subscribed or self._sub_pending)

    def wait(self, predicate: Callable[[], bool], timeout: float, generation: int) -> bool:
        """Wait for ``predicate`` (called under the lock); raise Aborted on stop/disconnect."""
        with self.cond:
            ok = self.cond.wait_for(
                lambda: predicate() or self.stopping.is_set() or self.generation != generation
                or not self._connected, timeout)
            if self.stopping.is_set() or self.generation != generation or not self._connected:
                raise Aborted()
            return bool(ok)

    def backoff(self, attempt: int, generation: int) -> None:
        delay = backoff_delay(attempt, self.config.retry_min, self.config.retry_max, self.rng)
        self.wait(lambda: False, delay, generation)

    def wait_window(self, generation: int,
                    interrupt: Callable[[], bool] | None = None) -> bool:
        """Until fewer chunks than the window await their PUBACK, or ``interrupt`` (called
        under the lock) is true; False after ack_timeout. A full window is waited on until
        half of it is acknowledged: the sender then wakes once per half window, not once per
        PUBACK (each wake-up is a thread switch, costly on a busy device), and at least half
        a window stays in flight."""
        window = max(1, min(self.window_cap, self._receive_max - 2))
        with self.cond:
            if len(self._inflight) < window:
                return True
        low = window // 2
        with self.cond:
            self._window_low = low
        try:
            return self.wait(lambda: len(self._inflight) <= low
                             or (interrupt is not None and interrupt()),
                             self.config.ack_timeout, generation)
        finally:
            with self.cond:
                self._window_low = None

    def expect_acks(self, capture_id: str | None, sha256: str = "") -> None:
        """Acks about this transfer (capture id, SHA-256 hex) are taken from now on; None:
        no transfer is in progress."""
        with self.cond:
            self._current = None if capture_id is None else (capture_id, sha256)

    def has_ack(self, capture_id: str, answers: Callable[[Ack], bool]) -> bool:
        """Whether a verified ack of ``capture_id`` that ``answers`` is in (``wait_ack``
        takes it)."""
        with self.cond:
            ack = self._acks.get(capture_id)
            return ack is not None and answers(ack)

    def forget_ack(self, capture_id: str) -> None:
        with self.cond:
            self._acks.pop(capture_id, None)

    def wait_ack(self, capture_id: str, answers: Callable[[Ack], bool],
                 generation: int) -> Ack | None:
        """The verified ack of ``capture_id`` that ``answers``, or None after ack_timeout."""
        def answered() -> bool:
            ack = self._acks.get(capture_id)
            return ack is not None and answers(ack)

        if not self.wait(answered, self.config.ack_timeout, generation):
            return None
        with self.cond:
            return self._acks.pop(capture_id)


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
