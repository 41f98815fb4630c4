"""The uplink's timing-related behaviour, against a real Mosquitto: chunks go out right
behind their manifest, a cut costs only the chunks it lost, and a healthy connection that
ends is followed by a quick reconnect. (How fast is bench/bench_link.py's business.)"""

from __future__ import annotations

import queue
import random
import threading
from collections import Counter
from collections.abc import Iterator

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from dermascope_wire.protocol import decode_chunk
from device_agent.uplink import connection
from device_agent.uplink.client import Uplink
from device_agent.uplink.connection import QUICK_RECONNECT, backoff_delay, reconnect_delay
from sim.netfault import FaultProxy
from tests.test_uplink import DEVICE, assert_each_stored_once, put, uplink_config


class Observer:
    """What the broker got of the device's uploads, seen by a client of its own: each
    message's kind, and a chunk's index."""

    def __init__(self, broker) -> None:
        self.seen: queue.Queue[tuple[str, int | None]] = queue.Queue()
        #: Each message's kind and the MQTT 5 properties it carried (name -> value).
        self.properties: list[tuple[str, dict]] = []
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        subscribed = threading.Event()
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *_: subscribed.set()
        self.client.connect(broker.host, broker.port)
        self.client.subscribe(f"derm/v1/{DEVICE}/up/#", qos=1)
        self.client.loop_start()
        assert subscribed.wait(10)

    def _on_message(self, client: mqtt.Client, userdata: object,
                    message: mqtt.MQTTMessage) -> None:
        kind = message.topic.rsplit("/", 1)[1]
        index = decode_chunk(message.payload).index if kind == "chunk" else None
        props = message.properties.json() if message.properties is not None else {}
        self.properties.append((kind, props))
        self.seen.put((kind, index))

    def take(self, count: int, timeout: float = 20) -> list[tuple[str, int | None]]:
        return [self.seen.get(timeout=timeout) for _ in range(count)]

    def drain(self) -> list[tuple[str, int | None]]:
        got = []
        while not self.seen.empty():
            got.append(self.seen.get_nowait())
        return got

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def observer(broker) -> Iterator[Observer]:
    obs = Observer(broker)
    yield obs
    obs.close()


def test_chunks_go_out_before_the_manifest_is_answered(broker, outbox, observer) -> None:
    """No gateway answers here: a fresh transfer's chunks follow its manifest anyway."""
    put(outbox, 1, size=40_000)
    up = Uplink(uplink_config(broker, chunk_size=8192, ack_timeout=30.0), DEVICE, outbox,
                "test-1.0")
    with up:
        got = observer.take(1 + 5)
    assert got[0] == ("manifest", None)
    assert sorted(got[1:]) == [("chunk", i) for i in range(5)]
    assert outbox.depth() == 1  # and nothing is taken for delivered without an answer


def test_chunks_carry_no_mqtt5_properties_and_manifest_and_final_their_hints(
    broker, gateway, outbox, store, events, observer
) -> None:
    """Properties cost paho a copy of the payload each on the way in: chunks carry none
    (docs/protocol.md 3.5); manifest and final keep their hints and correlation."""
    items = [put(outbox, 1, size=40_000)]
    up = Uplink(uplink_config(broker, chunk_size=8192), DEVICE, outbox, "test-1.0")
    with up:
        assert up.wait_idle(30)
    assert_each_stored_once(store, events, items)
    seen = observer.properties
    # (At least 5 chunks: one taken before the manifest's staging opened goes again.)
    assert [kind for kind, _ in seen].count("chunk") >= 5
    assert all(props == {} for kind, props in seen if kind == "chunk"), seen
    for kind in ("manifest", "final"):
        sent = [props for k, props in seen if k == kind]
        assert sent
        for props in sent:
            pairs = [tuple(pair) for pair in props["UserProperty"]]
            assert pairs == [("v", "1"), ("kind", kind)]
            assert props["MessageExpiryInterval"] >= 60
            # json() gives the correlation data in hex
            assert bytes.fromhex(props["CorrelationData"]).startswith(b"cap-1:")


def test_chunks_sent_before_the_answer_are_stored_by_the_gateway(
    broker, gateway, outbox, store, events
) -> None:
    items = [put(outbox, n, size=100_000) for n in range(2)]
    up = Uplink(uplink_config(broker, chunk_size=8192), DEVICE, outbox, "test-1.0")
    with up:
        assert up.wait_idle(30)
    assert_each_stored_once(store, events, items)
    for capture_id, _meta, _image in items:
        # One round: every chunk went before the manifest's answer, and the gateway kept
        # them (all but a few at most: a chunk it takes before the manifest's staging is
        # open is dropped and asked for again, seen once in a full run on 2 cores).
        (final,) = events.named("uplink.final_sent", capture_id=capture_id)
        (answer,) = events.named("gateway.manifest", capture_id=capture_id)
        assert answer["missing"] == answer["chunks"]
        assert final["resent"] < answer["chunks"]


def test_after_a_cut_only_the_chunks_it_lost_are_sent_again(
    broker, gateway, outbox, store, events, observer
) -> None:
    items = [put(outbox, 1, size=400_000)]
    with FaultProxy(broker.host, broker.port) as proxy:
        proxy.throttle(400_000)  # about a second for the capture: the cut lands mid-way
        proxy.cut(after_bytes=200_000)
        up = Uplink(uplink_config(broker, host=proxy.host, port=proxy.port, chunk_size=8192,
                                  ack_timeout=10.0), DEVICE, outbox, "test-1.0")
        with up:
            assert up.wait_idle(30)
        assert proxy.resets == 1
    assert_each_stored_once(store, events, items)
    chunks = Counter(index for kind, index in observer.drain() if kind == "chunk")
    (delivered,) = events.named("capture.delivered")
    assert set(chunks) == set(range(delivered["chunks"]))
    # Every chunk reached the broker (so the gateway) once: what got through before the cut
    # was not sent again.
    assert max(chunks.values()) == 1
    assert len(events.named("uplink.manifest_sent", capture_id="cap-1")) == 2


def test_a_healthy_connection_that_ends_is_followed_by_a_quick_reconnect() -> None:
    rng = random.Random(3)
    quick = [reconnect_delay(0, True, 0.5, 60.0, rng) for _ in range(50)]
    assert all(0 <= d <= QUICK_RECONNECT for d in quick)
    assert len(set(quick)) > 1  # jittered: a fleet does not come back in one burst
    # If that fails, the usual backoff from its first step; short-lived connections never
    # get the quick one (a broker that closes us at once is not hammered).
    assert 0.25 <= reconnect_delay(1, True, 0.5, 60.0, rng) <= 0.5
    assert 0.5 <= reconnect_delay(2, True, 0.5, 60.0, rng) <= 1.0
    assert 0.25 <= reconnect_delay(0, False, 0.5, 60.0, rng) <= 0.5
    # A retry_min below the quick window bounds it too.
    assert reconnect_delay(0, True, 0.02, 60.0, rng) <= 0.02
    assert backoff_delay(0, 0.5, 60.0, rng) >= 0.25  # unchanged for transfers' rounds


def test_a_cut_after_a_healthy_connection_reconnects_quickly(
    broker, outbox, events, monkeypatch
) -> None:
    monkeypatch.setattr(connection, "HEALTHY_AFTER", 0.0)  # every connection counts
    with FaultProxy(broker.host, broker.port) as proxy:
        up = Uplink(uplink_config(broker, host=proxy.host, port=proxy.port, retry_min=2.0,
                                  retry_max=4.0), DEVICE, outbox, "test-1.0")
        with up:
            assert up.wait_online(10)
            proxy.cut()
            (scheduled,) = events.wait_for("uplink.reconnect_scheduled")
            assert scheduled["after_healthy"] is True
            assert scheduled["delay"] <= QUICK_RECONNECT  # not retry_min's 1-2 s
            events.wait_for("uplink.connected", count=2, timeout=10)


def test_the_first_manifest_does_not_wait_for_the_suback(broker, outbox, events) -> None:
    """The broker takes a connection's packets in order, so a manifest sent right after the
    SUBSCRIBE finds the ack subscription in place: no round trip waits for the SUBACK. With
    the way back delayed, the SUBACK comes that delay after the CONNACK, and the manifest
    has gone out before it."""
    put(outbox, 1, size=1000)
    with FaultProxy(broker.host, broker.port) as proxy:
        proxy.delay(to_client=0.5)
        up = Uplink(uplink_config(broker, host=proxy.host, port=proxy.port, ack_timeout=30.0),
                    DEVICE, outbox, "test-1.0")
        with up:
            events.wait_for("uplink.subscribed")
            events.wait_for("uplink.manifest_sent")
    order = [r["event"] for r in events.records
             if r["event"] in ("uplink.subscribed", "uplink.manifest_sent")]
    assert order[:2] == ["uplink.manifest_sent", "uplink.subscribed"]
