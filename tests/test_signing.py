"""Signed acks (issue 13, finding 5): the signature encoding of docs/protocol.md §13, its test
vector, and a device that, on a real Mosquitto, refuses every forged ``committed`` (unsigned,
another key, a broken signature, another transfer's SHA-256, another capture's or another
device's genuine ack) and still delivers the capture once the real gateway answers."""

from __future__ import annotations

import base64
import hashlib
import json
import re
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from paho.mqtt.enums import CallbackAPIVersion

from clinic_gateway.gateway import Gateway
from dermascope_wire import signing
from dermascope_wire.bundle import pack
from dermascope_wire.protocol import Ack, ProtocolError, Topics
from dermascope_wire.seal import generate_keypair, public_key_pem
from device_agent.config import ConfigError, UplinkConfig, parse_config
from device_agent.uplink.client import Uplink
from device_agent.uplink.outbox import Outbox

DEVICE = "dev-sign"
TOPICS = Topics("derm/v1", DEVICE)
PROTOCOL_MD = Path(__file__).resolve().parents[1] / "docs" / "protocol.md"


# --------------------------------------------------------------------------- the test vector


def doc_vector() -> dict[str, str]:
    text = PROTOCOL_MD.read_text(encoding="utf-8")
    block = re.search(r"<!-- test-vector:begin -->\n```text\n(.*?)```\n<!-- test-vector:end -->",
                      text, re.DOTALL)
    assert block, "docs/protocol.md has no test vector block"
    return dict(re.fullmatch(r"([a-zA-Z ]+):\s+(.*)", line).groups()
                for line in block.group(1).splitlines())


def test_the_documented_test_vector_verifies_and_is_reproduced_exactly():
    vector = doc_vector()
    key = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(vector["private key"]))
    public = key.public_key()
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert raw.hex() == vector["public key"]
    assert vector["public PEM"] in signing.public_key_pem(public).decode()
    assert signing.key_id(public) == vector["key id"] == hashlib.sha256(raw).hexdigest()[:16]
    assert hashlib.sha256(b"example").hexdigest() in vector["ack body"]
    trust = signing.Trust.of([public])
    for kind in ("ack", "command"):
        body = vector[f"{kind} body"].encode()
        envelope = vector[f"{kind} envelope"].encode()
        # Ed25519 is deterministic: our signer reproduces the documented bytes...
        assert signing.sign(body, key) == envelope
        # ...and the documented envelope verifies, giving back the body's exact bytes.
        opened = trust.open(envelope, kind)
        assert (opened.body, opened.key_id) == (body, vector["key id"])
        # The signed message is CONTEXT + body, as the document says.
        sig = base64.b64decode(json.loads(envelope)["sig"])
        public.verify(sig, b"dermascope/v1 signed message\n" + body)
    assert Ack.decode(vector["ack body"].encode()).device_id == "derm-0042"


# --------------------------------------------------------------------------- the envelope


@pytest.fixture(scope="module")
def key() -> Ed25519PrivateKey:
    return signing.generate_key()


def body_of(payload: bytes) -> bytes:
    return base64.b64decode(json.loads(payload)["body"])


def with_fields(payload: bytes, **fields: object) -> bytes:
    envelope = json.loads(payload)
    envelope.update(fields)
    return json.dumps(envelope).encode()


def test_the_envelope_refuses_unsigned_unknown_broken_and_malformed(key):
    trust = signing.Trust.of([key.public_key()])
    body = b'{"type":"ack","v":1}'
    good = signing.sign(body, key)
    assert trust.open(good, "ack").body == body
    other_body = base64.b64encode(b'{"type":"ack","v":1,"x":1}').decode()
    cases = {
        "unsigned": body,
        "unknown_key": signing.sign(body, signing.generate_key()),
        "bad_signature": with_fields(good, body=other_body),
        "bad_envelope": with_fields(good, extra=1),
    }
    for reason, payload in cases.items():
        with pytest.raises(signing.SignatureError) as err:
            trust.open(payload, "ack")
        assert err.value.reason == reason, payload
    short_sig = with_fields(good, sig=base64.b64encode(b"x" * 63).decode())
    with pytest.raises(signing.SignatureError, match="bad_signature: signature has 63 bytes"):
        trust.open(short_sig, "ack")
    for bad in ({"sig": "not base64!"}, {"key": "ABC"}, {"v": 2}, {"body": 5}):
        with pytest.raises(signing.SignatureError, match="bad_envelope"):
            trust.open(with_fields(good, **bad), "ack")
    with pytest.raises(ProtocolError):
        trust.open(b"\xff not json", "ack")
    # Development mode without a key: unsigned passes, a signed one still needs a known key.
    dev = signing.Trust(allow_unsigned=True)
    assert dev.open(body, "ack").key_id is None
    with pytest.raises(signing.SignatureError, match="unknown_key"):
        dev.open(good, "ack")


def test_a_rotation_trusts_both_keys(key):
    new = signing.generate_key()
    trust = signing.Trust.of([key.public_key(), new.public_key()])
    for k in (key, new):
        assert trust.open(signing.sign(b"{}", k), "ack").key_id == signing.key_id(k.public_key())


# --------------------------------------------------------------------------- the config


def bench(tmp_path: Path, **security: object) -> dict:
    clinic = tmp_path / "clinic-seal.pub.pem"
    clinic.write_bytes(public_key_pem(generate_keypair()[1]))
    return {"device": {"id": "derm-1"},
            "uplink": {"insecure_dev_mode": True},
            "security": {"clinic_public_key": str(clinic), **security}}


def test_the_config_requires_a_gateway_key_beside_the_clinic_key(tmp_path, key):
    with pytest.raises(ConfigError, match=r"security\.gateway_public_key: no gateway signing key"):
        parse_config(bench(tmp_path))
    pub = tmp_path / "gateway-sign.pub.pem"
    pub.write_bytes(signing.public_key_pem(key.public_key()))
    one = parse_config(bench(tmp_path, gateway_public_key=str(pub)))
    assert one.security.gateway_public_key == [pub]
    two = parse_config(bench(tmp_path, gateway_public_key=[str(pub), str(pub)]))
    assert two.security.gateway_public_key == [pub, pub]
    with pytest.raises(ConfigError, match="gateway signing key must be Ed25519"):
        parse_config(bench(tmp_path, gateway_public_key=str(tmp_path / "clinic-seal.pub.pem")))
    with pytest.raises(ConfigError, match=r"missing\.pem: cannot read key"):
        parse_config(bench(tmp_path, gateway_public_key=str(tmp_path / "missing.pem")))
    # The development opt-out needs none, and may still have one (a bench testing signing).
    dev = {"device": {"id": "derm-1"}, "uplink": {"insecure_dev_mode": True},
           "security": {"insecure_dev_mode": True}}
    assert parse_config(dev).security.gateway_public_key == []
    dev["security"]["gateway_public_key"] = str(pub)
    assert parse_config(dev).security.gateway_public_key == [pub]


# --------------------------------------------------------------------------- on a real broker


class Forger:
    """Someone who can publish on the device's ack topic: a compromised broker, or a client
    holding the gateway's certificate."""

    def __init__(self, port: int) -> None:
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="forger",
                                  protocol=mqtt.MQTTv5)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def publish(self, topic: str, payload: bytes) -> None:
        self.client.publish(topic, payload, qos=1).wait_for_publish(timeout=5)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def forged_commits(key: Ed25519PrivateKey, capture_id: str, sha256: str) -> dict[str, bytes]:
    """By the reason the device must refuse them for: every way to say ``committed``
    without the gateway having stored this transfer."""
    genuine = Ack(capture_id, "committed", req=1, sha256=sha256, device_id=DEVICE).encode()
    signed = signing.sign(genuine, key)
    tampered = Ack(capture_id, "committed", req=2, sha256=sha256, device_id=DEVICE).encode()
    other = hashlib.sha256(b"another capture").hexdigest()
    return {
        "unsigned": genuine,
        "unknown_key": signing.sign(genuine, signing.generate_key()),
        "bad_signature": with_fields(signed, body=base64.b64encode(tampered).decode()),
        # The gateway's own key, but a committed for other content under this capture id.
        "sha256_mismatch": signing.sign(
            Ack(capture_id, "committed", sha256="0" * 64, device_id=DEVICE).encode(), key),
        # A genuine committed of another capture, replayed on this capture's topic.
        "wrong_capture": signing.sign(
            Ack("another-capture", "committed", sha256=other, device_id=DEVICE).encode(), key),
        # A genuine committed of this capture id at another device.
        "wrong_device": signing.sign(
            Ack(capture_id, "committed", sha256=sha256, device_id="other-dev").encode(), key),
    }


def test_forged_committed_acks_never_remove_the_capture_which_is_then_delivered(
        tmp_path, broker, store, events, key):
    outbox = Outbox(tmp_path / "outbox", 1 << 26)
    capture_id = "cap-signed-1"
    data = pack({"capture_id": capture_id, "device_id": DEVICE}, b"\xff\xd8 image " * 500)
    outbox.put(capture_id, data)
    sha256 = hashlib.sha256(data).hexdigest()
    config = UplinkConfig(host=broker.host, port=broker.port, ack_timeout=1.0, retry_min=0.1,
                          retry_max=0.3, keepalive=5, insecure_dev_mode=True)
    uplink = Uplink(config, DEVICE, outbox, "test", trust=signing.Trust.of([key.public_key()]))
    forger = Forger(broker.port)
    forgeries = forged_commits(key, capture_id, sha256)
    try:
        with uplink:
            # No gateway yet: the device is mid-transfer, waiting for an answer.
            events.wait_for("uplink.manifest_sent", capture_id=capture_id)
            for payload in forgeries.values():
                forger.publish(TOPICS.ack(capture_id), payload)
            for reason in forgeries:
                events.wait_for("uplink.ack_refused", capture_id=capture_id, reason=reason)
            assert outbox.get(capture_id) is not None
            assert not events.named("capture.delivered")
            # The real gateway, signing with the key the device trusts, gets it through.
            with Gateway(broker.host, broker.port, store, allow_unsealed=True,
                         signing_key=key) as gateway:
                assert gateway.wait_ready(10)
                assert uplink.wait_idle(timeout=30)
    finally:
        forger.close()
    assert outbox.get(capture_id) is None
    assert (store / DEVICE / f"{capture_id}.jpg").exists()
    assert len(events.named("capture.delivered", capture_id=capture_id)) == 1
    assert not events.named("outbox.quarantined")


def test_a_gateway_without_the_devices_key_delivers_nothing_and_deletes_nothing(
        tmp_path, broker, store, events, key):
    outbox = Outbox(tmp_path / "outbox", 1 << 26)
    data = pack({"capture_id": "cap-2", "device_id": DEVICE}, b"\xff\xd8 image")
    outbox.put("cap-2", data)
    config = UplinkConfig(host=broker.host, port=broker.port, ack_timeout=1.0, retry_min=0.1,
                          retry_max=0.3, keepalive=5, insecure_dev_mode=True)
    uplink = Uplink(config, DEVICE, outbox, "test", trust=signing.Trust.of([key.public_key()]))
    # A gateway signing with another key (e.g. switched before the devices trust it).
    with Gateway(broker.host, broker.port, store, allow_unsealed=True,
                 signing_key=signing.generate_key()) as gateway, uplink:
        assert gateway.wait_ready(10)
        events.wait_for("uplink.ack_refused", capture_id="cap-2", reason="unknown_key")
        events.wait_for("uplink.retry", capture_id="cap-2")
        assert outbox.get("cap-2") is not None
    assert not events.named("capture.delivered")


def test_the_gateway_signs_its_acks_from_a_pem_file(tmp_path, key):
    path = tmp_path / "gateway-sign.key.pem"
    path.write_bytes(signing.private_key_pem(key))
    gateway = Gateway("127.0.0.1", 1, tmp_path / "store", signing_key=path)
    assert signing.key_id(gateway.signing_key.public_key()) == signing.key_id(key.public_key())
    path.write_bytes(public_key_pem(generate_keypair()[1]))
    with pytest.raises(signing.SigningKeyError, match="not an unencrypted PEM private key"):
        Gateway("127.0.0.1", 1, tmp_path / "store", signing_key=path)


def test_the_gateway_command_line_names_a_bad_signing_key(tmp_path):
    import subprocess
    import sys

    bad = tmp_path / "not-a-key.pem"
    bad.write_text("nothing")
    result = subprocess.run(
        [sys.executable, "-m", "clinic_gateway", "run", "--store", str(tmp_path / "store"),
         "--signing-key", str(bad)], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2
    assert "not-a-key.pem: not an unencrypted PEM private key" in result.stderr
