"""The reference gateway, driven message by message the way a third-party device would."""

from __future__ import annotations

import hashlib
import json
import os
import queue
import signal
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from pydicom.filereader import dcmread

from clinic_gateway.dicom_export import DERMOSCOPIC_PHOTOGRAPHY
from clinic_gateway.gateway import EXPORT_ATTEMPTS, Gateway
from dermascope_wire import bundle, seal
from dermascope_wire.protocol import (
    PROTOCOL_VERSION,
    Ack,
    Final,
    Manifest,
    Topics,
    chunk_count_for,
    encode_chunk,
)
from sim.broker import MosquittoBroker
from sim.crash import exporter_command

DEVICE = "dev-gw"
CHUNK = 1024


class RawDevice:
    """A minimal device speaking the protocol by hand, to probe every gateway answer."""

    def __init__(self, broker: MosquittoBroker, device_id: str = DEVICE) -> None:
        self.topics = Topics("derm/v1", device_id)
        self.acks: queue.Queue[Ack] = queue.Queue()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.client.on_message = lambda c, u, msg: self.acks.put(Ack.decode(msg.payload))
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        self.client.subscribe(self.topics.ack_filter, qos=1)
        # A round trip on our own connection proves the subscription is in place.
        self.client.publish("derm/v1/ping", b"", qos=1).wait_for_publish(5)

    def send(self, capture_id: str, kind: str, payload: bytes) -> None:
        info = self.client.publish(self.topics.up(capture_id, kind), payload, qos=1)
        info.wait_for_publish(5)

    def ack(self, timeout: float = 10.0) -> Ack:
        return self.acks.get(timeout=timeout)

    def manifest(self, capture_id: str, data: bytes, req: int = 1) -> Ack:
        m = Manifest(capture_id, len(data), CHUNK, chunk_count_for(len(data), CHUNK),
                     hashlib.sha256(data).hexdigest(), bundle.CONTENT_TYPE, req)
        self.send(capture_id, "manifest", m.encode())
        return self.ack()

    def chunks(self, capture_id: str, data: bytes, indices: list[int] | None = None) -> None:
        sha = hashlib.sha256(data).digest()
        count = chunk_count_for(len(data), CHUNK)
        for i in range(count) if indices is None else indices:
            self.send(capture_id, "chunk",
                      encode_chunk(sha, CHUNK, i, data[i * CHUNK:(i + 1) * CHUNK]))

    def final(self, capture_id: str, data: bytes, req: int = 2) -> Ack:
        f = Final(capture_id, hashlib.sha256(data).hexdigest(),
                  chunk_count_for(len(data), CHUNK), req)
        self.send(capture_id, "final", f.encode())
        return self.ack()

    def transfer(self, capture_id: str, data: bytes) -> Ack:
        self.manifest(capture_id, data)
        self.chunks(capture_id, data)
        return self.final(capture_id, data)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def device(broker: MosquittoBroker) -> Iterator[RawDevice]:
    dev = RawDevice(broker)
    yield dev
    dev.close()


def payload(n: int = 5000) -> tuple[dict, bytes, bytes]:
    meta = {"kind": "dermoscopic", "quality": {"focus": 0.9}}
    image = bytes(i % 251 for i in range(n))
    return meta, image, bundle.pack(meta, image)


def test_full_transfer_stores_image_and_metadata(gateway, device, store, events) -> None:
    meta, image, data = payload()
    first = device.manifest("c1", data)
    assert first.state == "incomplete"
    assert first.missing == tuple(range(chunk_count_for(len(data), CHUNK)))
    device.chunks("c1", data)
    final = device.final("c1", data, req=7)
    assert (final.state, final.req) == ("committed", 7)
    assert final.sha256 == hashlib.sha256(data).hexdigest()
    assert (store / DEVICE / "c1.jpg").read_bytes() == image
    assert json.loads((store / DEVICE / "c1.json").read_text()) == meta
    (stored,) = events.named("capture.stored")
    assert stored["capture_id"] == "c1"
    assert stored["sha256"] == hashlib.sha256(Path(stored["path"]).read_bytes()).hexdigest()


def test_final_lists_exactly_the_missing_chunks(gateway, device) -> None:
    _, _, data = payload(6000)
    device.manifest("c2", data)
    device.chunks("c2", data, [0, 2, 4])
    ack = device.final("c2", data)
    assert ack.state == "incomplete"
    assert ack.missing == tuple(i for i in range(ack.chunk_count) if i not in (0, 2, 4))
    device.chunks("c2", data, list(ack.missing))
    assert device.final("c2", data, req=3).state == "committed"


def test_replay_of_a_whole_transfer_is_stored_once(gateway, device, store, events) -> None:
    _, image, data = payload()
    assert device.transfer("c3", data).state == "committed"
    # Replay: the manifest alone already answers committed; chunks and final change nothing.
    assert device.manifest("c3", data).state == "committed"
    device.chunks("c3", data)
    assert device.final("c3", data).state == "committed"
    assert len(events.named("capture.stored")) == 1
    assert sorted(p.name for p in (store / DEVICE).iterdir()) == ["c3.jpg", "c3.json"]
    assert (store / DEVICE / "c3.jpg").read_bytes() == image


def test_every_message_duplicated_still_stores_once(gateway, device, store, events) -> None:
    _, image, data = payload(5000)
    device.manifest("c12", data)
    device.manifest("c12", data)  # QoS 1 may deliver twice
    device.chunks("c12", data)
    device.chunks("c12", data)
    assert device.final("c12", data).state == "committed"
    assert device.final("c12", data).state == "committed"
    assert len(events.named("capture.stored", capture_id="c12")) == 1
    assert (store / DEVICE / "c12.jpg").read_bytes() == image


def test_same_capture_id_with_other_content_is_rejected(gateway, device, store) -> None:
    _, image, data = payload(3000)
    assert device.transfer("c4", data).state == "committed"
    other = bundle.pack({"other": True}, b"different")
    ack = device.manifest("c4", other)
    assert (ack.state, ack.reason) == ("rejected", "conflict")
    assert (store / DEVICE / "c4.jpg").read_bytes() == image


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"not json", "bad_message"),
        (json.dumps({"v": 99, "type": "manifest", "req": 4}).encode(), "unsupported_version"),
        (json.dumps({"v": PROTOCOL_VERSION, "type": "manifest", "capture_id": "c5",
                     "size": 10, "chunk_size": 4, "chunk_count": 9, "sha256": "0" * 64,
                     "content_type": bundle.CONTENT_TYPE, "req": 4}).encode(), "bad_message"),
    ],
    ids=["not-json", "version", "wrong-count"],
)
def test_bad_manifest_is_rejected_with_a_reason(gateway, device, body, reason) -> None:
    device.send("c5", "manifest", body)
    ack = device.ack()
    assert (ack.state, ack.reason) == ("rejected", reason)


def test_unknown_content_type_is_rejected(gateway, device) -> None:
    m = Manifest("c6", 10, CHUNK, 1, "0" * 64, "image/tiff", 1)
    device.send("c6", "manifest", m.encode())
    ack = device.ack()
    assert (ack.state, ack.reason) == ("rejected", "unsupported_content_type")


def test_payload_that_is_not_a_bundle_is_rejected(gateway, device, store) -> None:
    ack = device.transfer("c7", b"\x00" * 3000)
    assert (ack.state, ack.reason) == ("rejected", "bad_bundle")
    assert not (store / DEVICE / "c7.jpg").exists()
    # The journal entry written as the transfer started goes with it.
    assert not (store / ".gateway" / "pending" / DEVICE / "c7.json").exists()


def test_a_transfer_is_journaled_before_its_commit_and_its_entry_goes_with_its_work(
        gateway, device, store, events) -> None:
    """The after-ack journal entry is written (durably, off paho's thread) as the transfer
    starts and is there when the capture is stored; the exporter removes it."""
    _, _, data = payload(3000)
    entry = store / ".gateway" / "pending" / DEVICE / "j1.json"
    at_store: list[dict] = []
    events.on("capture.stored", lambda _: at_store.append(json.loads(entry.read_text())))
    assert device.transfer("j1", data).state == "committed"
    assert [e["transfer_sha256"] for e in at_store] == [hashlib.sha256(data).hexdigest()]
    assert gateway.wait_exported(20)
    assert not entry.exists()
    ledger = json.loads((store / ".gateway" / "ledger" / DEVICE / "j1.json").read_text())
    assert ledger["transfer_sha256"] == hashlib.sha256(data).hexdigest()
    image = (store / DEVICE / "j1.jpg").read_bytes()
    assert ledger["image_sha256"] == hashlib.sha256(image).hexdigest()


def test_a_journal_entry_replaced_after_the_manifest_is_written_again_at_the_final(
        gateway, device, store, events) -> None:
    """The final trusts the entry its manifest wrote only while it is that very file (the
    same inode): one another receiver wrote over meanwhile, for another transfer of the
    same id, is written again for this one before the commit. (Guards the final's shortcut
    past reading the entry; the read it replaces checked the same.)"""
    _, _, data = payload(3000)
    entry = store / ".gateway" / "pending" / DEVICE / "j2.json"
    at_store: list[dict] = []
    events.on("capture.stored", lambda _: at_store.append(json.loads(entry.read_text())))
    assert device.manifest("j2", data).state == "incomplete"
    deadline = time.monotonic() + 10
    while not entry.exists():
        assert time.monotonic() < deadline, "the manifest's journal entry was not written"
        time.sleep(0.01)
    other = {**json.loads(entry.read_text()), "transfer_sha256": "0" * 64}
    replacement = entry.with_name(".j2.json.other.tmp")
    replacement.write_text(json.dumps(other))
    replacement.replace(entry)  # another receiver's atomic write: a new inode
    device.chunks("j2", data)
    assert device.final("j2", data).state == "committed"
    assert [e["transfer_sha256"] for e in at_store] == [hashlib.sha256(data).hexdigest()]


def test_bundle_naming_another_capture_is_rejected(gateway, device, store) -> None:
    data = bundle.pack({"capture_id": "someone-else"}, b"jpeg")
    ack = device.transfer("c11", data)
    assert (ack.state, ack.reason) == ("rejected", "bad_bundle")
    assert not (store / DEVICE / "c11.jpg").exists()


def test_corrupt_chunk_is_dropped_and_asked_for_again(gateway, device) -> None:
    _, _, data = payload(3000)
    device.manifest("c8", data)
    device.chunks("c8", data, [1, 2])
    sha = hashlib.sha256(data).digest()
    bad = bytearray(encode_chunk(sha, CHUNK, 0, data[:CHUNK]))
    bad[-1] ^= 0xFF  # the CRC catches it
    device.send("c8", "chunk", bytes(bad))
    ack = device.final("c8", data)
    assert (ack.state, ack.missing) == ("incomplete", (0,))


def test_final_without_manifest_asks_to_start_over(gateway, device) -> None:
    _, _, data = payload(2000)
    ack = device.final("c9", data)
    assert (ack.state, ack.reason) == ("retry", "no_manifest")


def test_restarted_gateway_resumes_from_its_staged_chunks(broker, device, store) -> None:
    _, image, data = payload(8000)
    count = chunk_count_for(len(data), CHUNK)
    with Gateway(broker.host, broker.port, store, allow_unsealed=True) as gw:
        assert gw.wait_ready(10)
        device.manifest("c10", data)
        device.chunks("c10", data, list(range(count // 2)))
        ack = device.final("c10", data)  # a round trip: all chunks before it are staged
        assert len(ack.missing) == count - count // 2
    with Gateway(broker.host, broker.port, store, allow_unsealed=True) as gw:
        assert gw.wait_ready(10)
        ack = device.manifest("c10", data)
        assert ack.missing == tuple(range(count // 2, count))
        device.chunks("c10", data, list(ack.missing))
        assert device.final("c10", data).state == "committed"
    assert (store / DEVICE / "c10.jpg").read_bytes() == image


def test_two_gateways_sharing_the_load_store_each_capture_once(broker, store, events) -> None:
    with Gateway(broker.host, broker.port, store, allow_unsealed=True) as a, \
            Gateway(broker.host, broker.port, store, allow_unsealed=True) as b:
        assert a.wait_ready(10)
        assert b.wait_ready(10)
        dev = RawDevice(broker)
        try:
            for n in range(4):
                _, _, data = payload(3000 + n)
                ack = dev.transfer(f"s{n}", data)
                # A shared subscription may deal the final to the receiver that has not yet
                # written the last chunk: it answers incomplete, the device sends again.
                for _ in range(5):
                    if ack.state == "committed":
                        break
                    dev.chunks(f"s{n}", data, list(ack.missing))
                    ack = dev.final(f"s{n}", data, req=10)
                assert ack.state == "committed"
        finally:
            dev.close()
    assert sorted(e["capture_id"] for e in events.named("capture.stored")) == [
        "s0", "s1", "s2", "s3"]


# ------------------------------------------------------------------------------ sealed captures


def sealed_payload(public_key, capture_id: str, device_id: str = DEVICE) -> tuple[bytes, bytes]:
    image = bytes(range(256)) * 20
    return image, seal.seal(bundle.pack({"capture_id": capture_id}, image), public_key,
                            device_id, capture_id)


def send_sealed(device: RawDevice, capture_id: str, data: bytes) -> Ack:
    m = Manifest(capture_id, len(data), CHUNK, chunk_count_for(len(data), CHUNK),
                 hashlib.sha256(data).hexdigest(), seal.CONTENT_TYPE, 1)
    device.send(capture_id, "manifest", m.encode())
    ack = device.ack()
    if ack.state != "incomplete":
        return ack
    device.chunks(capture_id, data)
    return device.final(capture_id, data)


def test_sealed_capture_is_opened_with_the_clinic_key(broker, device, store) -> None:
    private, public = seal.generate_keypair()
    _old_private, _ = seal.generate_keypair()
    image, data = sealed_payload(public, "s1")
    with Gateway(broker.host, broker.port, store, private_keys=[_old_private, private]) as gw:
        assert gw.wait_ready(10)
        assert send_sealed(device, "s1", data).state == "committed"
    assert (store / DEVICE / "s1.jpg").read_bytes() == image


def test_sealed_capture_waits_while_the_gateway_has_no_key(gateway, device, store) -> None:
    _, public = seal.generate_keypair()
    _, data = sealed_payload(public, "s2")
    ack = send_sealed(device, "s2", data)
    assert (ack.state, ack.reason) == ("retry", "no_key")  # the device keeps it
    assert not (store / DEVICE / "s2.jpg").exists()


def test_capture_sealed_for_another_key_or_id_is_rejected(broker, device, store) -> None:
    private, public = seal.generate_keypair()
    _, other_public = seal.generate_keypair()
    _, wrong_key = sealed_payload(other_public, "s3")
    _, wrong_id = sealed_payload(public, "s-other")  # replayed under another capture id
    with Gateway(broker.host, broker.port, store, private_keys=[private]) as gw:
        assert gw.wait_ready(10)
        for capture_id, data in (("s3", wrong_key), ("s4", wrong_id)):
            ack = send_sealed(device, capture_id, data)
            assert (ack.state, ack.reason) == ("rejected", "seal_error")
    assert not list(store.rglob("*.jpg"))


def test_abandoned_staging_expires_at_start_and_fresh_staging_stays(broker, device, store,
                                                                       events) -> None:
    _, _, data = payload(4000)
    with Gateway(broker.host, broker.port, store, allow_unsealed=True) as gw:
        assert gw.wait_ready(10)
        device.manifest("old", data)
        device.manifest("new", data)
        device.final("new", data)  # a round trip: both manifests are staged
    old = store / ".gateway" / "staging" / DEVICE / "old"
    for p in [old, *old.iterdir()]:
        os.utime(p, (1, 1))  # untouched since 1970
    with Gateway(broker.host, broker.port, store, allow_unsealed=True) as gw:
        assert gw.wait_ready(10)
        assert not old.exists()
        assert (store / ".gateway" / "staging" / DEVICE / "new").exists()
    assert [e["capture_id"] for e in events.named("gateway.staging_expired")] == ["old"]


def test_capture_moved_away_by_clinic_it_is_not_stored_again(gateway, device, store) -> None:
    _, _, data = payload(3000)
    assert device.transfer("m1", data).state == "committed"
    for p in (store / DEVICE).iterdir():
        p.unlink()  # archived elsewhere
    assert device.transfer("m1", data).state == "committed"
    assert list((store / DEVICE).iterdir()) == []


def test_gateway_disk_trouble_answers_retry_and_keeps_the_staging(gateway, device, store,
                                                                   monkeypatch) -> None:
    _, image, data = payload(3000)

    def disk_full(*args: object) -> None:
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(gateway, "_store", disk_full)
        ack = device.transfer("d1", data)
        assert (ack.state, ack.reason) == ("retry", "storage_error")
    # Disk freed: the device's next attempt finds every chunk still staged.
    again = device.manifest("d1", data)
    assert (again.state, again.missing) == ("incomplete", ())
    assert device.final("d1", data).state == "committed"
    assert (store / DEVICE / "d1.jpg").read_bytes() == image


# ------------------------------------------------------------------ unsealed uploads (issue 12)


def test_unsealed_capture_is_rejected_unless_in_development_mode(broker, device, store,
                                                                 events) -> None:
    _, _, data = payload(3000)
    with Gateway(broker.host, broker.port, store) as gw:
        assert gw.wait_ready(10)
        ack = device.manifest("u1", data)
        assert (ack.state, ack.reason) == ("rejected", "unsealed")
        assert events.named("gateway.unsealed_rejected", capture_id="u1")
    assert not (store / DEVICE / "u1.jpg").exists()
    assert not (store / ".gateway" / "staging" / DEVICE / "u1").exists()
    assert events.named("gateway.insecure_dev_mode") == []


def test_unsealed_transfer_staged_in_development_mode_is_refused_at_its_final(
        broker, device, store) -> None:
    _, _, data = payload(3000)
    with Gateway(broker.host, broker.port, store, allow_unsealed=True) as gw:
        assert gw.wait_ready(10)
        device.manifest("u2", data)
        device.chunks("u2", data)
        device.manifest("u2", data)  # a round trip: every chunk is staged
    with Gateway(broker.host, broker.port, store) as gw:
        assert gw.wait_ready(10)
        ack = device.final("u2", data)
        assert (ack.state, ack.reason) == ("rejected", "unsealed")
    assert not (store / DEVICE / "u2.jpg").exists()


def test_development_mode_is_logged_loudly_at_start(broker, store, events) -> None:
    with Gateway(broker.host, broker.port, store, allow_unsealed=True) as gw:
        assert gw.wait_ready(10)
    (warning,) = events.named("gateway.insecure_dev_mode")
    assert warning["levelname"] == "WARNING"


# ------------------------------------------------------------------ supervision (issue 12)


def jpeg_capture(capture_id: str, **metadata: object) -> tuple[bytes, bytes]:
    """A real JPEG and its bundle, with metadata the DICOM export can use (or overrides)."""
    import cv2

    from sim.scene import SceneSpec, render

    _ok, jpeg = cv2.imencode(".jpg", render(SceneSpec(seed=5)), [cv2.IMWRITE_JPEG_QUALITY, 80])
    meta = {"capture_id": capture_id, "device_id": DEVICE, "kind": "capture",
            "captured_at": "2026-11-25T12:30:00+00:00", **metadata}
    return jpeg.tobytes(), bundle.pack(meta, jpeg.tobytes())


def test_odd_metadata_fails_its_dicom_export_and_the_next_capture_is_exported(
        gateway, device, store, events) -> None:
    _, odd = jpeg_capture("odd", dicom=["not", "an", "object"], case="TD-1", camera=7,
                          software_version={"x": "\\"})
    _, good = jpeg_capture("good")
    assert device.transfer("odd", odd).state == "committed"
    assert device.transfer("good", good).state == "committed"
    assert gateway.wait_exported(20)
    (failed,) = events.named("gateway.dicom_failed")
    assert (failed["capture_id"], failed["error"]) == ("odd", "metadata dicom is not an object")
    assert not (store / DEVICE / "odd.dcm").exists()
    assert (store / DEVICE / "good.dcm").exists()
    assert events.named("thread.crashed") == []
    assert not list((store / ".gateway" / "pending").rglob("*.json"))  # both done


def _dicom_temp_files(store: Path) -> list[Path]:
    return sorted((store / DEVICE).glob(".*"))


def test_a_fault_in_after_ack_work_is_logged_and_the_next_capture_is_exported(
        gateway, device, store, events, tmp_path) -> None:
    """The exporter process (clinic_gateway/exporter.py) raises in the middle of an export:
    logged with its traceback, the job consumed, its journal entry kept for the next start,
    and the next capture exported by the same exporter."""
    gateway.exporter_command = exporter_command("--kill-at", "dicom", "--raise",
                                                "--once", str(tmp_path / "raised"))
    for capture_id in ("x1", "x2"):
        _, data = jpeg_capture(capture_id)
        assert device.transfer(capture_id, data).state == "committed"
    assert gateway.wait_exported(20)
    (failed,) = events.named("exporter.job_failed")
    assert "RuntimeError: a fault nobody foresaw" in failed["traceback"]
    assert len(events.named("gateway.exporter_started")) == 1
    assert not (store / DEVICE / "x1.dcm").exists()
    assert (store / DEVICE / "x2.dcm").exists()
    # The interrupted work stays journaled: the next start does it again.
    assert (store / ".gateway" / "pending" / DEVICE / "x1.json").exists()
    assert not (store / ".gateway" / "pending" / DEVICE / "x2.json").exists()
    assert _dicom_temp_files(store) == []


def test_an_exporter_killed_mid_export_is_started_again_and_redoes_the_capture(
        gateway, device, store, events, tmp_path) -> None:
    """SIGKILL of the exporter process with a DICOM temp file half done: the gateway starts
    another, hands it the same capture, and nothing is left behind."""
    gateway.exporter_command = exporter_command("--kill-at", "dicom",
                                                "--once", str(tmp_path / "killed"))
    for capture_id in ("x1", "x2"):
        _, data = jpeg_capture(capture_id)
        assert device.transfer(capture_id, data).state == "committed"
    assert gateway.wait_exported(30)
    (died,) = events.named("gateway.exporter_died")
    assert (died["capture_id"], died["returncode"]) == ("x1", -signal.SIGKILL)
    assert len(events.named("gateway.exporter_started")) == 2
    for capture_id in ("x1", "x2"):
        assert dcmread(store / DEVICE / f"{capture_id}.dcm").SOPClassUID == \
            DERMOSCOPIC_PHOTOGRAPHY
    assert list((store / ".gateway" / "pending").rglob("*.json")) == []
    assert list((store / ".gateway" / "staging").glob("*/*")) == []
    assert _dicom_temp_files(store) == []


def test_a_capture_that_kills_every_exporter_is_left_to_the_next_start(
        broker, store, events, tmp_path) -> None:
    """An exporter that dies on the same capture EXPORT_ATTEMPTS times: the gateway gives
    that capture up for this run (the journal keeps it) instead of looping; a gateway
    started afterwards exports it."""
    with Gateway(broker.host, broker.port, store, allow_unsealed=True) as gw:
        assert gw.wait_ready(10)
        gw.exporter_command = exporter_command("--kill-at", "dicom")
        dev = RawDevice(broker)
        try:
            _, data = jpeg_capture("x1")
            assert dev.transfer("x1", data).state == "committed"
        finally:
            dev.close()
        assert gw.wait_exported(60)
    assert len(events.named("gateway.exporter_died")) == EXPORT_ATTEMPTS
    (abandoned,) = events.named("gateway.export_abandoned")
    assert abandoned["capture_id"] == "x1"
    assert (store / ".gateway" / "pending" / DEVICE / "x1.json").exists()
    assert _dicom_temp_files(store) == []
    with Gateway(broker.host, broker.port, store, allow_unsealed=True) as gw:
        assert gw.wait_ready(10)
        assert gw.wait_exported(30)
    assert (store / DEVICE / "x1.dcm").exists()
    assert list((store / ".gateway" / "pending").rglob("*.json")) == []


def test_a_thread_dying_unsupervised_in_the_gateway_process_is_logged_and_ends_it(
        events, monkeypatch) -> None:
    import threading

    from clinic_gateway.gateway import exit_on_thread_death

    done = threading.Event()
    crashed: list[str] = []
    monkeypatch.setattr(threading, "excepthook", exit_on_thread_death(done, crashed))

    def doomed() -> None:
        raise RecursionError("as paho's network loop would die")

    thread = threading.Thread(target=doomed, name="paho-loop")
    thread.start()
    thread.join(10)
    assert done.is_set()
    assert crashed == ["paho-loop"]
    (event,) = events.named("thread.crashed", thread_name="paho-loop")
    assert event["levelname"] == "CRITICAL"
    assert "RecursionError: as paho's network loop would die" in event["traceback"]


def test_paho_logs_into_the_gateway_json_log(gateway, events) -> None:
    from paho.mqtt.client import MQTT_LOG_ERR

    from clinic_gateway.gateway import paho_log

    gateway._client._easy_log(MQTT_LOG_ERR, "Caught exception in %s", "on_test")
    (line,) = events.named("gateway.mqtt_log")
    assert line["name"] == paho_log.name
    assert line["msg"] % line["args"] == "Caught exception in on_test"


@pytest.mark.parametrize("meta", [
    b'{"note":"\\ud800"}',  # a lone surrogate: valid JSON, not storable as UTF-8
    b'{"exposure":NaN}',
    b'{"a":' * 40 + b"1" + b"}" * 40,
    b"[" * 3000 + b"]" * 3000,
], ids=["surrogate", "nan", "nested", "deeper-than-the-parser"])
def test_bundle_metadata_that_cannot_be_stored_is_rejected_and_the_gateway_goes_on(
        gateway, device, store, events, meta) -> None:
    import struct

    image = b"\xff\xd8jpeg"
    data = (b"DRMB\x01" + struct.pack(">I", len(meta)) + meta + struct.pack(">Q", len(image))
            + image)
    ack = device.transfer("odd-meta", data)
    assert (ack.state, ack.reason) == ("rejected", "bad_bundle")
    assert not (store / DEVICE / "odd-meta.jpg").exists()
    assert events.named("gateway.callback_failed") == []
    _, good_image, good = payload()
    assert device.transfer("after", good).state == "committed"
    assert (store / DEVICE / "after.jpg").read_bytes() == good_image


# ------------------------------------------------------------ file modes (issue 13, finding 8)


def loose_modes(root: Path) -> list[str]:
    """Files readable by others or writable by the group, folders open to others, under
    ``root`` (0640 and 0750 or stricter are what the store must have)."""
    loose = []
    for path in [root, *root.rglob("*")]:
        try:
            mode = stat.S_IMODE(path.lstat().st_mode)
        except FileNotFoundError:
            continue  # a temporary file renamed meanwhile
        if mode & 0o027:
            loose.append(f"{path.relative_to(root.parent)} {mode:o}")
    return loose


def test_every_file_and_folder_the_gateway_writes_is_closed_to_others(
        broker, tmp_path, events) -> None:
    store = tmp_path / "fresh" / "store"
    old_umask = os.umask(0o022)  # the usual umask, which gives 0644 and 0755 by default
    try:
        seen: list[str] = []
        journal: list[bool] = []

        def at_store(_: object) -> None:
            # The moment the capture is stored, its journal entry and staging still exist.
            journal.append((store / ".gateway" / "pending" / DEVICE / "m1.json").exists())
            seen.extend(loose_modes(store))

        events.on("capture.stored", at_store)
        with Gateway(broker.host, broker.port, store, allow_unsealed=True) as gw:
            assert gw.wait_ready(10)
            dev = RawDevice(broker)
            try:
                _, data = jpeg_capture("m1")
                assert dev.transfer("m1", data).state == "committed"
                _, _, other = payload(3000)
                dev.manifest("m2", other)  # a transfer in flight: staged chunks
                dev.chunks("m2", other, [0])
                assert dev.final("m2", other).state == "incomplete"
            finally:
                dev.close()
            assert gw.wait_exported(20)
            gw.cases.opened(DEVICE, "TD-2026-000001")
        assert journal == [True]
        assert seen == []
        written = {p.relative_to(store).as_posix() for p in store.rglob("*") if p.is_file()}
        assert {f"{DEVICE}/m1.jpg", f"{DEVICE}/m1.json", f"{DEVICE}/m1.dcm",
                f".gateway/ledger/{DEVICE}/m1.json", f".gateway/staging/{DEVICE}/m2/data",
                f".gateway/staging/{DEVICE}/m2/manifest.json", ".gateway/audit.jsonl",
                f".gateway/cases/{DEVICE}.jsonl", ".gateway/case-key"} <= written
        assert loose_modes(store) == []
        assert stat.S_IMODE((store / ".gateway" / "case-key").stat().st_mode) == 0o600
    finally:
        os.umask(old_umask)
