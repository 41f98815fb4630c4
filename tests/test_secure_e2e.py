"""The whole secure path: a provisioned device (mutual TLS, sealing to the clinic key,
trusting the gateway's signing key) through Mosquitto running the shipped config and ACL, to
a gateway holding the clinic key and signing its acks. An administrator subscribed to
everything sees no image and no capture metadata; a client holding the gateway's own
certificate cannot make the device delete a capture."""

from __future__ import annotations

import base64
import hashlib
import json
import queue
from contextlib import contextmanager

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from clinic_gateway.gateway import Gateway
from dermascope_wire import bundle, signing
from dermascope_wire.protocol import Ack, Topics
from dermascope_wire.seal import generate_keypair, private_key_pem, public_key_pem, seal
from device_agent.uplink.outbox import Outbox
from sim.device import SimDevice, sim_config
from sim.pki import TestCA
from sim.secure_broker import SecureMosquitto

DEVICE = "sim-0001"


@contextmanager
def secure_broker(tmp_path):
    """The clinic without its gateway: CA, sealing and signing keys, the shipped broker."""
    ca = TestCA(tmp_path / "pki")
    private, public = generate_keypair()
    (tmp_path / "pki" / "seal.pub.pem").write_bytes(public_key_pem(public))
    (tmp_path / "pki" / "seal.key.pem").write_bytes(private_key_pem(private))
    signing_key = signing.generate_key()
    (tmp_path / "pki" / "gateway-sign.pub.pem").write_bytes(
        signing.public_key_pem(signing_key.public_key()))
    with SecureMosquitto(tmp_path / "broker", ca,
                         extra_acl="\nuser admin\ntopic read #\n") as broker:
        gw, commander = ca.issue("gateway"), ca.issue("commander")
        tls = {"ca_certs": str(ca.cert_path), "certfile": str(gw.cert), "keyfile": str(gw.key)}
        # The gateway's commands go out under their own certificate: the broker binds the
        # client id to it, so one certificate cannot hold two connections.
        command_tls = {**tls, "certfile": str(commander.cert), "keyfile": str(commander.key)}
        yield {"ca": ca, "broker": broker, "public": public, "private": private, "tls": tls,
               "command_tls": command_tls,
               "signing_key": signing_key, "store": tmp_path / "store",
               "seal_pub": tmp_path / "pki" / "seal.pub.pem",
               "sign_pub": tmp_path / "pki" / "gateway-sign.pub.pem"}


def start_gateway(clinic) -> Gateway:
    return Gateway(clinic["broker"].host, clinic["broker"].port, clinic["store"],
                   private_keys=[clinic["private"]], tls=clinic["tls"],
                   signing_key=clinic["signing_key"], command_tls=clinic["command_tls"])


@pytest.fixture
def clinic(tmp_path):
    with secure_broker(tmp_path) as clinic, start_gateway(clinic) as gateway:
        yield {**clinic, "gateway": gateway}


def device_config(tmp_path, clinic):
    issued = clinic["ca"].issue(DEVICE)
    return sim_config(
        tmp_path / "device", clinic["broker"].port, DEVICE,
        uplink={"insecure_dev_mode": False, "ca_file": str(clinic["ca"].cert_path),
                "cert_file": str(issued.cert), "key_file": str(issued.key),
                "host": "localhost"},
        security={"clinic_public_key": str(clinic["seal_pub"]),
                  "gateway_public_key": [str(clinic["sign_pub"])]})


def spy(clinic) -> tuple[mqtt.Client, queue.Queue]:
    seen: queue.Queue = queue.Queue()
    admin = clinic["ca"].issue("admin")
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.tls_set(ca_certs=str(clinic["ca"].cert_path), certfile=str(admin.cert),
                   keyfile=str(admin.key))
    client.on_message = lambda c, u, m: seen.put((m.topic, bytes(m.payload)))
    subscribed: queue.Queue = queue.Queue()
    client.on_subscribe = lambda c, u, mid, codes, p: subscribed.put(codes)
    client.connect(clinic["broker"].host, clinic["broker"].port)
    client.loop_start()
    client.subscribe("#", qos=1)
    assert not subscribed.get(timeout=10)[0].is_failure
    return client, seen


def test_a_sealed_capture_crosses_the_broker_as_ciphertext_only(tmp_path, clinic):
    client, seen = spy(clinic)
    try:
        with SimDevice(device_config(tmp_path, clinic)) as device:
            device.show(None)
            outcome = device.press()
            assert outcome.verdict == "accept"
            assert device.uplink.wait_idle(timeout=30)
            assert device.outbox.depth() == 0
    finally:
        client.disconnect()
        client.loop_stop()

    stored = clinic["store"] / DEVICE / f"{outcome.capture_id}.jpg"
    image = stored.read_bytes()
    metadata = json.loads(stored.with_suffix(".json").read_text())
    assert metadata["image"]["sha256"] == hashlib.sha256(image).hexdigest()
    assert clinic["gateway"].wait_exported(30)  # the DICOM export follows the ack
    assert stored.with_suffix(".dcm").exists()

    payloads = []
    while not seen.empty():
        payloads.append(seen.get_nowait())
    uploads = [p for t, p in payloads if "/up/" in t]
    assert uploads, "the spy saw the transfer"
    everything = b"".join(p for _, p in payloads)
    # No 64-byte run of the image, anywhere in any message.
    for offset in range(0, len(image) - 64, max(1, len(image) // 50)):
        assert image[offset:offset + 64] not in everything
    for marker in (b"LightSourcePolarization", b"dermoscopic_type", b"frame_offset_s",
                   b"calibration_id", b"\xff\xd8\xff"):
        assert marker not in everything, marker


def test_tampered_ciphertext_is_rejected_reported_and_not_stored(tmp_path, clinic, caplog):
    config = device_config(tmp_path, clinic)
    outbox = Outbox(config.outbox_dir, 1 << 30)
    sealed = bytearray(seal(bundle.pack({"capture_id": "tampered1"}, b"\xff\xd8 image"),
                            clinic["public"], DEVICE, "tampered1"))
    sealed[len(sealed) // 2] ^= 0x40  # changed after sealing, as an attacker on disk would
    outbox.put("tampered1", bytes(sealed))
    with SimDevice(config) as device:
        assert device.uplink.wait_idle(timeout=30)
        device.show(None)
        good = device.press()
        assert device.uplink.wait_idle(timeout=30)
        quarantined = [p.name for p in device.outbox.quarantined()]
    assert "gateway.seal_error" in caplog.messages
    assert "uplink.rejected" in caplog.messages
    assert not (clinic["store"] / DEVICE / "tampered1.jpg").exists()
    assert any("tampered1" in name for name in quarantined)
    assert (clinic["store"] / DEVICE / f"{good.capture_id}.jpg").exists()


def test_the_case_token_is_in_no_topic_no_upload_and_no_log(tmp_path, clinic, events):
    # The clinic's system knows the patient; the device holds only an opaque case token.
    # It reaches the clinic inside the sealed capture, and nowhere else: not in a topic, not
    # in any upload or status message an administrator of the broker could read, not in a log.
    token, site = "TD-2026-004711", "posterior torso"
    client, seen = spy(clinic)
    gateway = clinic["gateway"]  # it opens the case, so it files the capture under it
    try:
        with SimDevice(device_config(tmp_path, clinic)) as device:
            device.wait_online()
            assert gateway.open_case(DEVICE, token, anatomic_site=site)["ok"]
            device.show(None)
            outcome = device.press()
            assert outcome.verdict == "accept"
            assert gateway.close_case(DEVICE)["ok"]
            assert device.uplink.wait_idle(timeout=30)
    finally:
        client.disconnect()
        client.loop_stop()

    sidecar = json.loads((clinic["store"] / DEVICE / f"{outcome.capture_id}.json").read_text())
    assert sidecar["case"]["token"] == token  # it did travel, sealed
    messages = []
    while not seen.empty():
        messages.append(seen.get_nowait())
    assert any("/up/" in topic for topic, _ in messages)
    for topic, payload in messages:
        assert token not in topic, topic
        assert site not in topic, topic
        if topic.split("/")[3] != "cmd":  # the clinic's own command to the device has it
            assert token.encode() not in payload, topic
            assert site.encode() not in payload, topic
    assert events.records, "the agent and the gateway logged nothing"
    for record in events.records:
        text = json.dumps(record, default=str)
        assert token not in text, record["event"]


def test_the_gateways_certificate_alone_cannot_make_the_device_drop_a_capture(tmp_path, events):
    # Finding 5: a client holding the gateway's TLS certificate (or a compromised broker)
    # answers "committed" before the real gateway has stored anything.
    with secure_broker(tmp_path) as clinic:
        # A client id of the gateway's form: the broker may bind client ids to identities.
        forger = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="gateway-forger-1",
                             protocol=mqtt.MQTTv5)
        forger.tls_set(**clinic["tls"])
        forger.connect(clinic["broker"].host, clinic["broker"].port)
        forger.loop_start()
        try:
            with SimDevice(device_config(tmp_path, clinic)) as device:
                device.show(None)
                outcome = device.press()
                assert outcome.verdict == "accept"
                capture_id = outcome.capture_id
                events.wait_for("uplink.manifest_sent", capture_id=capture_id)
                digest = hashlib.sha256(device.outbox.read(device.outbox.get(capture_id)))
                commit = Ack(capture_id, "committed", sha256=digest.hexdigest(),
                             device_id=DEVICE).encode()
                stolen = signing.sign(commit, signing.generate_key())  # not the clinic's key
                resigned = json.loads(signing.sign(commit, clinic["signing_key"]))
                resigned["body"] = base64.b64encode(commit.replace(b'"req":0', b'"req":1')
                                                    ).decode()
                topic = Topics("derm/v1", DEVICE).ack(capture_id)
                for payload in (commit, stolen, json.dumps(resigned).encode()):
                    forger.publish(topic, payload, qos=1).wait_for_publish(timeout=10)
                for reason in ("unsigned", "unknown_key", "bad_signature"):
                    events.wait_for("uplink.ack_refused", capture_id=capture_id, reason=reason)
                assert device.outbox.get(capture_id) is not None
                assert not events.named("capture.delivered")
                # The real gateway comes: the capture is delivered, sealed and signed for.
                with start_gateway(clinic) as gateway:
                    assert gateway.wait_ready(10)
                    assert device.uplink.wait_idle(timeout=30)
        finally:
            forger.disconnect()
            forger.loop_stop()
    assert (clinic["store"] / DEVICE / f"{capture_id}.jpg").exists()
    assert len(events.named("capture.delivered", capture_id=capture_id)) == 1
