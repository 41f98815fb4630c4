"""The broker's part of issue 13, proven on a real Mosquitto running the shipped files
(deploy/mosquitto/: config, ACL, the dermascope_guard plugin built from its source, a CRL
from the test CA): no device starves the gateways' share group, a certificate's client id
cannot take over another device, retained uploads are not kept, a CN with '/' gets nothing,
only AEAD suites are offered, and a revoked device is refused after a reload that keeps every
other device connected."""

from __future__ import annotations

import queue
import socket
import ssl
import subprocess
import sys
import threading

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from sim.pki import Issued, TestCA
from sim.secure_broker import SecureMosquitto, shipped_directive
from tests.test_security import connect_fully, refused

TIMEOUT = 10.0
SHARE = "$share/gateways/derm/v1/+/up/+/+"


class Client:
    """An MQTT 5 client with one certificate and a chosen client id, recording what happens."""

    def __init__(self, broker: SecureMosquitto, ca: TestCA, issued: Issued,
                 client_id: str = "") -> None:
        self.messages: queue.Queue = queue.Queue()
        self.acks: queue.Queue = queue.Queue()
        self.connected = threading.Event()
        self.disconnected = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                                  protocol=mqtt.MQTTv5)
        self.client.tls_set(ca_certs=str(ca.cert_path), certfile=str(issued.cert),
                            keyfile=str(issued.key))
        self.client.on_connect = lambda c, u, f, rc, p: self.connected.set()
        self.client.on_disconnect = lambda c, u, f, rc, p: self.disconnected.set()
        self.client.on_message = lambda c, u, m: self.messages.put(
            (m.topic, bytes(m.payload), m.retain))
        self.client.on_subscribe = lambda c, u, mid, codes, p: self.acks.put(codes)
        self.client.on_publish = lambda c, u, mid, code, p: self.acks.put(code)
        self.broker = broker

    def connect(self) -> Client:
        self.client.connect(self.broker.host, self.broker.port, keepalive=30)
        self.client.loop_start()
        assert self.connected.wait(TIMEOUT), "no CONNACK"
        return self

    def subscribe(self, topic: str) -> list:
        self.client.subscribe(topic, qos=1)
        return self.acks.get(timeout=TIMEOUT)

    def publish(self, topic: str, payload: bytes = b"x", retain: bool = False):
        self.client.publish(topic, payload, qos=1, retain=retain)
        return self.acks.get(timeout=TIMEOUT)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    ca = TestCA(tmp_path_factory.mktemp("pki") / "clinic")
    names = ("gateway", "dev1", "dev2", "dev3", "dev4", "dev5", "dev6", "dev7", "dev8",
             "dev2/up")
    # "dev2/up" is no device id: only a careless or compromised CA would sign it.
    return {"ca": ca, **{name: ca.issue(name, checked="/" not in name) for name in names}}


@pytest.fixture(scope="module")
def broker(pki, tmp_path_factory):
    with SecureMosquitto(tmp_path_factory.mktemp("broker"), pki["ca"]) as running:
        yield running


@pytest.fixture
def client(broker, pki):
    made: list[Client] = []

    def make(name: str, client_id: str = "") -> Client:
        c = Client(broker, pki["ca"], pki[name], client_id)
        made.append(c)
        return c.connect()

    yield make
    for c in made:
        c.close()


def test_no_device_joins_the_gateway_share_group_and_the_gateway_receives_every_upload(client):
    gateway = client("gateway")
    assert not refused(gateway.subscribe(SHARE))
    # The probe's attack: devices subscribing to the gateways' share group (and to wider
    # filters) so that the broker hands them uploads it then drops.
    hostiles = [client(name) for name in ("dev1", "dev3", "dev4")]
    for hostile in hostiles:
        for topic in (SHARE, "$share/gateways/#", "$share/other/derm/v1/+/up/+/+",
                      "derm/v1/+/up/#", "#"):
            assert refused(hostile.subscribe(topic)), topic
    victim = client("dev2")
    sent = {f"derm/v1/dev2/up/c{i}/manifest" for i in range(40)}
    for topic in sorted(sent):
        assert not victim.publish(topic, b"m").is_failure
    received = {gateway.messages.get(timeout=TIMEOUT)[0] for _ in sent}
    assert received == sent
    for hostile in hostiles:
        assert hostile.messages.empty()


def test_a_device_still_subscribes_to_its_own_acks_and_commands(client):
    device = client("dev5")
    assert not refused(device.subscribe("derm/v1/dev5/ack/+"))
    assert not refused(device.subscribe("derm/v1/dev5/cmd/#"))
    gateway = client("gateway")
    assert not gateway.publish("derm/v1/dev5/ack/c1", b"committed").is_failure
    assert device.messages.get(timeout=TIMEOUT)[:2] == ("derm/v1/dev5/ack/c1", b"committed")


@pytest.mark.parametrize("claimed", ["derm-dev6", "dev6"])
def test_a_certificate_cannot_take_over_another_devices_client_id(client, claimed):
    victim = client("dev6", client_id="derm-dev6")
    gateway = client("gateway")
    assert not refused(gateway.subscribe("derm/v1/+/up/#"))
    client("dev7", client_id=claimed)  # CONNACK received: any takeover has happened
    # The victim's next round trip shows whether the broker dropped it.
    assert not victim.publish("derm/v1/dev6/up/c1/manifest", b"mine").is_failure
    assert gateway.messages.get(timeout=TIMEOUT)[:2] == ("derm/v1/dev6/up/c1/manifest", b"mine")
    assert not victim.disconnected.is_set()


def test_a_retained_upload_is_not_kept_but_the_devices_status_is(client):
    device = client("dev8")
    assert device.publish("derm/v1/dev8/up/r1/chunk/0", b"\0" * 65536, retain=True).is_failure
    assert device.publish("derm/v1/dev8/cmd/x", b"forged", retain=True).is_failure
    assert not device.publish("derm/v1/dev8/status", b'{"online": true}', retain=True).is_failure
    gateway = client("gateway")
    assert not refused(gateway.subscribe("derm/v1/dev8/up/#"))
    assert not refused(gateway.subscribe("derm/v1/dev8/status"))
    # Retained messages come at subscription time, in order: the status, and only it.
    assert gateway.messages.get(timeout=TIMEOUT) == ("derm/v1/dev8/status", b'{"online": true}',
                                                     True)
    assert gateway.messages.empty()
    # Nor may the gateway retain an ack or a command (a retained command would run again at
    # every subscription).
    assert gateway.publish("derm/v1/dev8/cmd/x", b"{}", retain=True).is_failure


def test_a_cn_with_a_slash_cannot_write_into_another_devices_topics(client):
    gateway = client("gateway")
    assert not refused(gateway.subscribe("derm/v1/dev2/#"))
    # With %u = "dev2/up", the pattern derm/v1/%u/up/# reads derm/v1/dev2/up/up/#: dev2's.
    intruder = client("dev2/up")
    for topic in ("derm/v1/dev2/up/up/manifest", "derm/v1/dev2/up/status"):
        assert intruder.publish(topic, b"forged").is_failure, topic
    assert refused(intruder.subscribe("derm/v1/dev2/up/ack/#"))
    with pytest.raises(queue.Empty):
        gateway.messages.get(timeout=1.0)


def handshake(broker: SecureMosquitto, pki, *, tls13: bool, ciphers: str | None = None) -> tuple:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(pki["ca"].cert_path)
    context.load_cert_chain(pki["dev1"].cert, pki["dev1"].key)
    if tls13:
        context.minimum_version = ssl.TLSVersion.TLSv1_3
    else:
        context.maximum_version = ssl.TLSVersion.TLSv1_2
    if ciphers:
        # @SECLEVEL=0: our side must really offer the weak suite for the broker to refuse.
        context.set_ciphers(f"{ciphers}:@SECLEVEL=0")
    with socket.create_connection((broker.host, broker.port), timeout=TIMEOUT) as raw, \
            context.wrap_socket(raw, server_hostname="localhost") as tls:
        return tls.version(), tls.cipher()[0]


@pytest.mark.parametrize("suite", ["ECDHE-ECDSA-AES128-SHA", "ECDHE-ECDSA-AES256-SHA384"])
def test_cbc_suites_are_refused(broker, pki, suite):
    with pytest.raises(ssl.SSLError):
        handshake(broker, pki, tls13=False, ciphers=suite)


def test_ecdhe_aead_on_tls12_and_tls13_are_accepted(broker, pki):
    assert handshake(broker, pki, tls13=False, ciphers="ECDHE-ECDSA-AES128-GCM-SHA256") == (
        "TLSv1.2", "ECDHE-ECDSA-AES128-GCM-SHA256")
    version, suite = handshake(broker, pki, tls13=True)
    assert version == "TLSv1.3"
    assert suite in shipped_directive("ciphers_tls1.3").split(":")


def test_a_revoked_device_is_refused_after_a_reload_that_keeps_the_others(tmp_path):
    ca = TestCA(tmp_path / "clinic")
    certs = {name: ca.issue(name) for name in ("gateway", "dev1", "dev2")}
    with SecureMosquitto(tmp_path / "broker", ca) as broker:
        def connect(name: str) -> Client:
            return Client(broker, ca, certs[name]).connect()

        gateway, staying, leaving = connect("gateway"), connect("dev1"), connect("dev2")
        try:
            assert not refused(gateway.subscribe(SHARE))
            assert not leaving.publish("derm/v1/dev2/up/c0/manifest").is_failure
            assert gateway.messages.get(timeout=TIMEOUT)[0] == "derm/v1/dev2/up/c0/manifest"

            # Clinic IT's workflow (docs/provisioning.md): revoke, then reload the broker.
            result = subprocess.run(
                [sys.executable, "-m", "clinic_gateway", "revoke", "--ca-cert", str(ca.cert_path),
                 "--ca-key", str(ca.key_path), "--crl", str(ca.crl_path), str(certs["dev2"].cert)],
                capture_output=True, text=True, timeout=60)
            assert result.returncode == 0, result.stderr
            assert '"ca.revoked"' in result.stderr
            broker.reload()

            again = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
            again.tls_set(ca_certs=str(ca.cert_path), certfile=str(certs["dev2"].cert),
                          keyfile=str(certs["dev2"].key))
            with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
                connect_fully(again, broker)
            again.socket() and again.socket().close()

            # Connected during the reload, the revoked device is cut off at its next message.
            leaving.client.publish("derm/v1/dev2/up/c1/manifest", b"after", qos=1)
            assert leaving.disconnected.wait(TIMEOUT)

            # The others stayed connected through the reload and keep delivering.
            for i in range(5):
                assert not staying.publish(f"derm/v1/dev1/up/c{i}/manifest").is_failure
                assert gateway.messages.get(timeout=TIMEOUT)[0] == f"derm/v1/dev1/up/c{i}/manifest"
            assert not staying.disconnected.is_set()
            assert not gateway.disconnected.is_set()
            assert "derm/v1/dev2/up/c1/manifest" not in {
                gateway.messages.get_nowait()[0] for _ in range(gateway.messages.qsize())}
            fresh = connect("dev1")  # a good certificate still connects after the reload
            fresh.close()
        finally:
            for c in (gateway, staying, leaving):
                c.close()


def test_a_client_that_does_not_read_holds_at_most_its_queue_limit_at_the_broker(broker, pki):
    # A gateway that stops reading (hung, or slow) must not make the broker hold every upload
    # for it: beyond max_queued_bytes (plus what is in flight) the broker drops messages, and
    # devices resend after their ack timeout.
    size = 1_000_000  # one chunk near max_packet_size
    queued = int(shipped_directive("max_queued_bytes"))
    in_flight = int(shipped_directive("max_inflight_bytes"))
    sent = queued // size + in_flight // size + 20
    stalled = Client(broker, pki["ca"], pki["gateway"])
    stalled.client.connect(broker.host, broker.port, keepalive=60)
    stalled.client.subscribe("derm/v1/dev3/up/#", qos=1)
    while stalled.acks.empty():  # run the network loop by hand until the SUBACK, then stop
        assert stalled.client.loop(timeout=1.0) == mqtt.MQTT_ERR_SUCCESS
    assert not refused(stalled.acks.get_nowait())
    device = Client(broker, pki["ca"], pki["dev3"]).connect()
    try:
        for i in range(sent):
            assert not device.publish(f"derm/v1/dev3/up/q{i}/chunk", bytes(size)).is_failure
        stalled.client.loop_start()  # reading again
        # Past the first in-flight window, a message came out of the queue: it has room
        # now, so the marker is queued behind whatever the broker kept, and arrives last.
        topics = [stalled.messages.get(timeout=TIMEOUT)[0]
                  for _ in range(in_flight // size + 2)]
        assert not device.publish("derm/v1/dev3/up/marker/manifest", b"m").is_failure
        topics.append(stalled.messages.get(timeout=TIMEOUT)[0])
        while topics[-1] != "derm/v1/dev3/up/marker/manifest":
            topics.append(stalled.messages.get(timeout=TIMEOUT)[0])
        kept = len(topics) - 1
        assert queued // size <= kept <= (queued + in_flight) // size + 2 < sent
    finally:
        device.close()
        stalled.close()
