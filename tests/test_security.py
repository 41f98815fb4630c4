"""Mutual TLS and the broker ACL, proven on a real Mosquitto running the shipped config."""

from __future__ import annotations

import datetime as dt
import queue
import ssl
import time

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from sim.pki import Issued, TestCA
from sim.secure_broker import SecureMosquitto

TIMEOUT = 10.0


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pki")
    ca = TestCA(folder / "clinic")
    return {
        "ca": ca,
        "dev1": ca.issue("dev1"),
        "dev2": ca.issue("dev2"),
        "gateway": ca.issue("gateway"),
        "expired": ca.issue("dev3", valid_from=dt.datetime.now(dt.UTC) - dt.timedelta(days=40),
                            days=30),
        "rogue": TestCA(folder / "rogue", "Rogue CA").issue("dev1"),
    }


@pytest.fixture(scope="module")
def secure_broker(pki, tmp_path_factory):
    with SecureMosquitto(tmp_path_factory.mktemp("broker"), pki["ca"]) as broker:
        yield broker


class Peer:
    """A raw MQTT 5 client with one certificate, for probing what the broker allows."""

    def __init__(self, broker: SecureMosquitto, ca: TestCA, issued: Issued | None) -> None:
        self.messages: queue.Queue = queue.Queue()
        self.acks: queue.Queue = queue.Queue()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.client.tls_set(ca_certs=str(ca.cert_path),
                            certfile=str(issued.cert) if issued else None,
                            keyfile=str(issued.key) if issued else None)
        self.client.on_message = lambda c, u, m: self.messages.put((m.topic, m.payload))
        self.client.on_subscribe = lambda c, u, mid, codes, p: self.acks.put(codes)
        self.client.on_publish = lambda c, u, mid, code, p: self.acks.put(code)
        self.broker = broker

    def connect(self) -> None:
        self.client.connect(self.broker.host, self.broker.port, keepalive=10)
        self.client.loop_start()

    def subscribe(self, topic: str) -> list:
        self.client.subscribe(topic, qos=1)
        return self.acks.get(timeout=TIMEOUT)

    def publish(self, topic: str, payload: bytes = b"x"):
        self.client.publish(topic, payload, qos=1)
        return self.acks.get(timeout=TIMEOUT)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def peer(secure_broker, pki):
    made: list[Peer] = []

    def make(name: str) -> Peer:
        p = Peer(secure_broker, pki["ca"], pki[name])
        p.connect()
        made.append(p)
        return p

    yield make
    for p in made:
        p.close()


def connect_fully(client: mqtt.Client, broker: SecureMosquitto) -> None:
    """Connect and step the loop until CONNACK; raise when the broker refuses us."""
    client.connect(broker.host, broker.port, keepalive=5)
    # TLS 1.3 reports a refused client certificate on the first read, not in connect().
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        rc = client.loop(timeout=0.2)
        if rc != mqtt.MQTT_ERR_SUCCESS:
            raise ConnectionError(f"refused: {rc}")
        if client.is_connected():
            pytest.fail("the broker let the client in")
    pytest.fail("neither refused nor connected")


def refused(reason_codes) -> bool:
    return all(code.is_failure for code in reason_codes)


def test_a_device_publishes_its_own_uploads_and_the_gateway_receives_them(peer):
    gateway = peer("gateway")
    assert not refused(gateway.subscribe("$share/gateways/derm/v1/+/up/+/+"))
    device = peer("dev1")
    assert not device.publish("derm/v1/dev1/up/c1/manifest", b"m").is_failure
    topic, payload = gateway.messages.get(timeout=TIMEOUT)
    assert (topic, payload) == ("derm/v1/dev1/up/c1/manifest", b"m")


def test_a_device_cannot_publish_into_another_devices_topics(peer):
    gateway = peer("gateway")
    gateway.subscribe("derm/v1/+/up/#")
    device = peer("dev1")
    code = device.publish("derm/v1/dev2/up/c1/manifest", b"forged")
    assert code.is_failure  # MQTT 5 PUBACK: not authorized
    with pytest.raises(queue.Empty):
        gateway.messages.get(timeout=1.0)


def test_a_device_cannot_read_another_devices_uplink_or_acks(peer):
    spy = peer("dev1")
    # Mosquitto may grant the subscription; what matters is that nothing is delivered.
    for topic in ("derm/v1/dev2/up/#", "derm/v1/dev2/ack/+", "derm/v1/+/up/#", "#"):
        spy.subscribe(topic)
    gateway = peer("gateway")
    gateway.subscribe("derm/v1/+/up/#")
    victim = peer("dev2")
    assert victim.subscribe("derm/v1/dev2/ack/+")
    assert not victim.publish("derm/v1/dev2/up/c9/manifest", b"private").is_failure
    assert not gateway.publish("derm/v1/dev2/ack/c9", b"committed").is_failure
    assert gateway.messages.get(timeout=TIMEOUT)[0] == "derm/v1/dev2/up/c9/manifest"
    assert victim.messages.get(timeout=TIMEOUT)[0] == "derm/v1/dev2/ack/c9"
    with pytest.raises(queue.Empty):
        spy.messages.get(timeout=1.0)


def test_a_device_cannot_forge_acks(peer):
    device = peer("dev1")
    assert device.publish("derm/v1/dev1/ack/c1", b"committed").is_failure


@pytest.mark.parametrize("who", [None, "rogue", "expired"])
def test_no_certificate_a_wrong_ca_or_an_expired_one_cannot_connect(secure_broker, pki, who):
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    issued = pki[who] if who else None
    client.tls_set(ca_certs=str(pki["ca"].cert_path),
                   certfile=str(issued.cert) if issued else None,
                   keyfile=str(issued.key) if issued else None)
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        connect_fully(client, secure_broker)


def test_the_broker_certificate_is_verified_by_the_device(secure_broker, pki, tmp_path):
    other = TestCA(tmp_path / "other", "Another CA")
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.tls_set(ca_certs=str(other.cert_path), certfile=str(pki["dev1"].cert),
                   keyfile=str(pki["dev1"].key))
    with pytest.raises(ssl.SSLCertVerificationError):
        client.connect(secure_broker.host, secure_broker.port, keepalive=5)
