"""Identities (issue 13, findings 4 and 8): the gateway files a capture under the device the
broker let publish it and under a case only if the clinic opened that case on that device;
names that are not device ids are never provisioned, signed or accepted.

The capture tests run on Mosquitto with the shipped mutual-TLS config and ACL: each device
speaks with its own certificate, as an attacker holding one device's certificate would."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import queue
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from paho.mqtt.enums import CallbackAPIVersion
from pydantic import ValidationError

from clinic_gateway import audit
from clinic_gateway.gateway import CaseError, Gateway
from dermascope_wire import bundle, seal
from dermascope_wire.identity import IdentityError
from dermascope_wire.protocol import (
    Ack,
    Final,
    Manifest,
    ProtocolError,
    Topics,
    chunk_count_for,
    encode_chunk,
    parse_up_topic,
)
from device_agent.config import DeviceConfig, UplinkConfig
from device_agent.provision import ProvisionError, check_device_id
from device_agent.session import SessionError, check_case_token
from device_agent.uplink.outbox import validate_capture_id
from sim.device import SimDevice, sim_config
from sim.pki import SigningRefused, TestCA
from sim.secure_broker import SecureMosquitto

A, B = "derm-a", "derm-b"
CHUNK = 4096
TOKEN = "TD-2026-000123"


@pytest.fixture
def clinic(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """The shipped broker, a gateway holding the clinic key, certificates for A and B."""
    ca = TestCA(tmp_path / "pki")
    private, public = seal.generate_keypair()
    seal_pub = tmp_path / "pki" / "seal.pub.pem"
    seal_pub.write_bytes(seal.public_key_pem(public))
    store = tmp_path / "store"
    with SecureMosquitto(tmp_path / "broker", ca) as broker:
        gw, commander = ca.issue("gateway"), ca.issue("commander")
        tls = {"ca_certs": str(ca.cert_path), "certfile": str(gw.cert), "keyfile": str(gw.key)}
        # Commands under their own certificate: the broker binds a client id to it.
        command_tls = {**tls, "certfile": str(commander.cert), "keyfile": str(commander.key)}
        with Gateway(broker.host, broker.port, store, private_keys=[private],
                     tls=tls, command_tls=command_tls) as gateway:
            assert gateway.wait_ready(10)
            yield {"ca": ca, "broker": broker, "gateway": gateway, "public": public,
                   "store": store, "seal_pub": seal_pub}


def raw_bundle(metadata: dict[str, Any], image: bytes) -> bytes:
    """A bundle as a hostile device may make one: its JSON may hold what ``bundle.pack``
    refuses (a lone surrogate, escaped)."""
    meta = json.dumps(metadata).encode()
    return (bundle.MAGIC + bytes([bundle.VERSION]) + len(meta).to_bytes(4, "big") + meta
            + len(image).to_bytes(8, "big") + image)


class TlsDevice:
    """A device's certificate in a raw client: sends whatever metadata it likes."""

    def __init__(self, clinic: dict[str, Any], device_id: str) -> None:
        issued = clinic["ca"].issue(device_id)
        self.device_id = device_id
        self.public = clinic["public"]
        self.topics = Topics("derm/v1", device_id)
        self.acks: queue.Queue[Ack] = queue.Queue()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"derm-{device_id}",
                                  protocol=mqtt.MQTTv5)
        self.client.tls_set(ca_certs=str(clinic["ca"].cert_path), certfile=str(issued.cert),
                            keyfile=str(issued.key))
        subscribed: queue.Queue[bool] = queue.Queue()
        self.client.on_subscribe = lambda c, u, mid, codes, p: subscribed.put(
            not any(code.is_failure for code in codes))
        self.client.on_message = lambda c, u, msg: self.acks.put(Ack.decode(msg.payload))
        self.client.connect(clinic["broker"].host, clinic["broker"].port)
        self.client.loop_start()
        self.client.subscribe(self.topics.ack_filter, qos=1)
        assert subscribed.get(timeout=10)

    def send(self, capture_id: str, kind: str, payload: bytes) -> None:
        self.client.publish(self.topics.up(capture_id, kind), payload, qos=1).wait_for_publish(5)

    def upload(self, capture_id: str, metadata: dict[str, Any],
               sealed_as: str | None = None) -> Ack:
        """Pack, seal (as ``sealed_as``, this device by default) and transfer a capture."""
        data = seal.seal(raw_bundle({"capture_id": capture_id, **metadata}, b"\xff\xd8 img"),
                         self.public, sealed_as or self.device_id, capture_id)
        sha = hashlib.sha256(data)
        count = chunk_count_for(len(data), CHUNK)
        self.send(capture_id, "manifest", Manifest(
            capture_id, len(data), CHUNK, count, sha.hexdigest(), seal.CONTENT_TYPE, 1).encode())
        ack = self.acks.get(timeout=10)
        if ack.state != "incomplete":
            return ack
        for i in range(count):
            self.send(capture_id, "chunk",
                      encode_chunk(sha.digest(), CHUNK, i, data[i * CHUNK:(i + 1) * CHUNK]))
        self.send(capture_id, "final", Final(capture_id, sha.hexdigest(), count, 2).encode())
        return self.acks.get(timeout=10)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def device_a(clinic: dict[str, Any]) -> Iterator[TlsDevice]:
    dev = TlsDevice(clinic, A)
    yield dev
    dev.close()


def now_iso(offset: float = 0.0) -> str:
    return (dt.datetime.now(dt.UTC) + dt.timedelta(seconds=offset)).isoformat()


def audit_lines(store: Path, gateway: Gateway) -> list[dict[str, Any]]:
    """The audit log's lines, once the gateway has written those of the messages so far."""
    assert gateway.wait_exported(10)
    path = audit.audit_path(store)
    assert audit.verify(path).ok
    return [json.loads(line) for line in path.read_text().splitlines()]


def stored_files(store: Path) -> list[str]:
    return sorted(str(p.relative_to(store)) for p in store.rglob("*")
                  if p.is_file() and ".gateway" not in p.parts)


# ------------------------------------------------------------------------- the device id


def test_metadata_naming_another_device_is_rejected_and_nothing_stored(
        clinic, device_a, events) -> None:
    ack = device_a.upload("c1", {"device_id": B, "kind": "capture",
                                 "captured_at": now_iso()})
    assert (ack.state, ack.reason) == ("rejected", "device_mismatch")
    assert stored_files(clinic["store"]) == []
    (event,) = events.named("gateway.device_mismatch")
    assert (event["device_id"], event["capture_id"]) == (A, "c1")
    assert event["claimed_device_id"] == B
    # Free text in the field is not logged: it could be anything, a name included.
    ack = device_a.upload("c1b", {"device_id": "Jens Hansen", "kind": "capture"})
    assert (ack.state, ack.reason) == ("rejected", "device_mismatch")
    assert events.named("gateway.device_mismatch")[-1]["claimed_device_id"] == (
        "<not a device id: str>")
    lines = audit_lines(clinic["store"], clinic["gateway"])
    assert [(x["event"], x.get("claimed_device_id")) for x in lines] == [
        ("capture.device_mismatch", B), ("ack.sent", None),
        ("capture.device_mismatch", "<not a device id: str>"), ("ack.sent", None)]
    assert lines[1]["reason"] == "device_mismatch"
    assert "Jens" not in audit.audit_path(clinic["store"]).read_text()


def test_a_capture_with_its_own_device_id_is_stored(clinic, device_a) -> None:
    ack = device_a.upload("c2", {"device_id": A, "kind": "other"})
    assert ack.state == "committed"
    assert stored_files(clinic["store"]) == [f"{A}/c2.jpg", f"{A}/c2.json"]


def test_a_capture_sealed_as_another_device_does_not_open(clinic, device_a) -> None:
    # The seal binds the device id: B's capture replayed by A (or sealed as B) fails.
    ack = device_a.upload("c3", {"device_id": B}, sealed_as=B)
    assert (ack.state, ack.reason) == ("rejected", "seal_error")
    assert stored_files(clinic["store"]) == []
    lines = audit_lines(clinic["store"], clinic["gateway"])
    assert [x["event"] for x in lines] == ["seal.error", "ack.sent"]


# -------------------------------------------------------------------------------- cases


def sim_device(tmp_path: Path, clinic: dict[str, Any], device_id: str) -> SimDevice:
    issued = clinic["ca"].issue(device_id)
    return SimDevice(sim_config(
        tmp_path / device_id, clinic["broker"].port, device_id,
        uplink={"insecure_dev_mode": False, "ca_file": str(clinic["ca"].cert_path),
                "cert_file": str(issued.cert), "key_file": str(issued.key),
                "host": "localhost"},
        security={"clinic_public_key": str(clinic["seal_pub"])}))


def test_a_case_opened_through_the_gateway_files_the_devices_captures(
        tmp_path, clinic, events) -> None:
    gateway, store = clinic["gateway"], clinic["store"]
    with sim_device(tmp_path, clinic, A) as device:
        device.show(None)
        device.wait_online()
        answer = gateway.open_case(A, TOKEN, anatomic_site="upper extremity")
        assert answer["ok"] is True
        inside = device.press()
        gateway.close_case(A)
        device.show(None, seed=2)
        after = device.press()
        assert device.uplink.wait_idle(timeout=30)
    filed = json.loads((store / A / f"{inside.capture_id}.json").read_text())
    assert filed["case"] == {"token": TOKEN, "assigned": True}
    assert json.loads((store / A / f"{after.capture_id}.json").read_text())["case"] == {
        "token": None, "assigned": False}
    assert events.named("gateway.case_unverified") == []
    # The token is on no disk of the gateway's but in the capture it belongs to.
    for path in (store / ".gateway").rglob("*"):
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), path
    ref = gateway.cases.ref(TOKEN)
    commands = [(x["event"], x["command"], x.get("case_ref"))
                for x in audit_lines(store, gateway) if x["event"].startswith("command.")]
    assert commands == [("command.sent", "open_case", ref), ("command.answered", "open_case", ref),
                        ("command.sent", "close_case", None),
                        ("command.answered", "close_case", None)]


def test_a_claimed_case_the_clinic_did_not_open_on_that_device_is_filed_unassigned(
        clinic, device_a, events) -> None:
    gateway, store = clinic["gateway"], clinic["store"]
    # The clinic opens the token on B (no device B is listening: the command times out,
    # the case stays recorded) and another one on A.
    with pytest.raises(TimeoutError):
        gateway.open_case(B, TOKEN, timeout=1.0)
    gateway.cases.opened(A, "TD-2026-000999")
    claims = {
        "b-case": {"token": TOKEN, "assigned": True},               # B's case, claimed by A
        "never": {"token": "TD-2026-000555", "assigned": True},     # never opened anywhere
        "earlier": {"token": "TD-2026-000999", "assigned": True},   # before it was opened
        "odd": "TD-2026-000999",                                    # not even an object
        "surrogate": {"token": "\ud800", "assigned": True},         # not even text
        "list": {"token": ["TD-2026-000999"], "assigned": True},
    }
    for capture_id, case in claims.items():
        taken = now_iso(-3600) if capture_id == "earlier" else now_iso()
        ack = device_a.upload(capture_id, {"device_id": A, "kind": "other", "case": case,
                                           "captured_at": taken})
        assert ack.state == "committed"
        filed = json.loads((store / A / f"{capture_id}.json").read_text())
        assert filed["case"] == {"token": None, "assigned": False, "case_unverified": True}
    ok = device_a.upload("ok", {"device_id": A, "kind": "other", "captured_at": now_iso(),
                                "case": {"token": "TD-2026-000999", "assigned": True}})
    assert ok.state == "committed"
    assert json.loads((store / A / "ok.json").read_text())["case"]["token"] == "TD-2026-000999"
    unverified = events.named("gateway.case_unverified")
    assert sorted(e["capture_id"] for e in unverified) == [
        "b-case", "earlier", "list", "never", "odd", "surrogate"]
    assert {e["case_ref"] for e in unverified if e["capture_id"] == "b-case"} == {
        gateway.cases.ref(TOKEN)}
    lines = audit_lines(store, gateway)
    assert len([x for x in lines if x["event"] == "capture.case_unverified"]) == 6


def test_the_gateway_refuses_to_open_a_cpr_number_as_a_case(clinic) -> None:
    with pytest.raises(IdentityError, match="CPR"):
        clinic["gateway"].open_case(A, "010190:1234")
    with pytest.raises(IdentityError, match="reserved"):
        clinic["gateway"].open_case("gateway", TOKEN)
    assert not (clinic["store"] / ".gateway" / "cases").exists()


def test_a_device_refusing_a_case_closes_it_in_the_registry(tmp_path, clinic) -> None:
    gateway = clinic["gateway"]
    with sim_device(tmp_path, clinic, A) as device:
        device.wait_online()
        with pytest.raises(CaseError, match="refused open_case"):
            gateway.open_case(A, TOKEN, anatomic_site="elbow")  # not an ISIC site
    assert gateway.cases.open_case(A) is None


# ------------------------------------------------------------------------------- names


def csr_for(common_name: str) -> x509.CertificateSigningRequest:
    key = ec.generate_private_key(ec.SECP256R1())
    return (x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .sign(key, hashes.SHA256()))


BAD_NAMES = ["derm-B/up", "gateway", "Gateway", "admin", "broker", "$SYS", "a+b", "a#",
             "derm-1\n", "derm 1", " derm-1", "derm-1\t", "-derm", "x" * 65, "", "dérm"]


# (A CN of 0 or 65+ characters cannot even be put in a CSR.)
@pytest.mark.parametrize("name", [n for n in BAD_NAMES if 0 < len(n) <= 64])
def test_the_clinic_ca_refuses_to_sign_a_device_csr_that_is_no_device_id(
        tmp_path, name) -> None:
    ca = TestCA(tmp_path / "ca")
    with pytest.raises(SigningRefused, match="CN"):
        ca.sign_csr(csr_for(name))
    csr_path = tmp_path / "device.csr"
    from cryptography.hazmat.primitives.serialization import Encoding
    csr_path.write_bytes(csr_for(name).public_bytes(Encoding.PEM))
    with pytest.raises(SigningRefused):
        ca.sign_csr_file(csr_path, tmp_path / "device.crt")
    assert not (tmp_path / "device.crt").exists()


def test_the_clinic_ca_signs_devices_and_its_services_by_name(tmp_path) -> None:
    ca = TestCA(tmp_path / "ca")
    assert ca.sign_csr(csr_for("derm-0042")).subject.rfc4514_string() == "CN=derm-0042"
    assert ca.sign_csr(csr_for("gateway"), role="gateway")
    with pytest.raises(SigningRefused, match="must have CN 'gateway'"):
        ca.sign_csr(csr_for("derm-0042"), role="gateway")


@pytest.mark.parametrize("name", BAD_NAMES)
def test_provisioning_refuses_a_device_id_that_is_no_device_id(name) -> None:
    with pytest.raises(ProvisionError, match="device id"):
        check_device_id(name)


def test_id_patterns_refuse_a_trailing_newline() -> None:
    with pytest.raises(ValueError, match="capture id"):
        validate_capture_id("cap-1\n")
    with pytest.raises(SessionError):
        check_case_token("case-1\n")
    with pytest.raises(ProtocolError):
        parse_up_topic("derm/v1", "derm/v1/dev\n/up/cap/final")
    manifest = json.loads(Manifest("cap", 1, 1024, 1, "0" * 64, seal.CONTENT_TYPE, 1).encode())
    for field, value in (("capture_id", "cap\n"), ("sha256", "0" * 64 + "\n"),
                         ("content_type", seal.CONTENT_TYPE + "\n")):
        with pytest.raises(ProtocolError):
            Manifest.decode(json.dumps({**manifest, field: value}).encode())
    # pydantic's patterns run on Rust's regex engine, where "$" is the end of the text.
    with pytest.raises(ValidationError, match="pattern"):
        DeviceConfig(id="derm-1\n")
    with pytest.raises(ValidationError, match="pattern"):
        UplinkConfig(topic_prefix="derm/v1\n")
    assert DeviceConfig(id="derm-1").id == "derm-1"


def test_a_command_never_reaches_another_device_by_a_crafted_id(clinic) -> None:
    # The broker ACL is the gate; the gateway's own check refuses first, by name.
    with pytest.raises(IdentityError):
        clinic["gateway"].close_case(f"{A}/cmd/x")
    assert not (clinic["store"] / ".gateway" / "cases").exists()


# ------------------------------------------------------------------ the registry itself


def test_the_registry_knows_when_each_case_was_open(tmp_path) -> None:
    from clinic_gateway.cases import CaseRegistry

    reg = CaseRegistry(tmp_path / ".gateway", skew=10)
    t0 = 1_800_000_000.0
    reg.opened(A, "TD-1", at=t0)
    reg.opened(A, "TD-2", timeout_s=600, at=t0 + 1000)  # replaces TD-1 on the device
    reg.closed(A, at=t0 + 1200)
    reg.opened(B, "TD-1", at=t0 + 5000)
    again = CaseRegistry(tmp_path / ".gateway", skew=10)  # another gateway of the store
    assert again.ref("TD-1") == reg.ref("TD-1") != reg.ref("TD-2")
    assert again.was_open(A, "TD-1", t0 + 500)
    assert again.was_open(A, "TD-1", t0 - 5)           # within the clocks' skew
    assert not again.was_open(A, "TD-1", t0 - 60)
    assert not again.was_open(A, "TD-1", t0 + 1100)     # TD-2 was open by then
    assert again.was_open(A, "TD-2", t0 + 1100)
    assert not again.was_open(A, "TD-2", t0 + 1300)     # closed at +1200
    assert not again.was_open(A, "TD-1", t0 + 6000)     # open then, but on B
    assert again.was_open(B, "TD-1", t0 + 6000)
    assert again.open_case(A, t0 + 1100).ref == reg.ref("TD-2")
    assert again.open_case(A, t0 + 1300) is None
    text = b"".join(p.read_bytes() for p in (tmp_path / ".gateway" / "cases").iterdir())
    assert b"TD-1" not in text
    assert b"TD-2" not in text


def test_the_registry_refuses_a_corrupted_file_by_name(tmp_path) -> None:
    from clinic_gateway.cases import CaseRegistry, CaseRegistryError

    reg = CaseRegistry(tmp_path / ".gateway")
    reg.opened(A, "TD-1")
    with (tmp_path / ".gateway" / "cases" / f"{A}.jsonl").open("a") as f:
        f.write("garbage\n")
    with pytest.raises(CaseRegistryError, match=rf"{A}\.jsonl: line 2"):
        reg.was_open(A, "TD-1", 0.0)
