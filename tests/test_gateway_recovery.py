"""Work a crash interrupted is finished when the gateway starts again (issue 12, finding 10).

A real gateway process (``python -m sim.crash gateway``) is SIGKILLed at an exact moment of
a store; a new gateway on the same store must leave every committed capture with its DICOM
file, no staging of a committed capture, no journal entry and no temp file, and answer the
device as if nothing had happened."""

from __future__ import annotations

import hashlib
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import pytest
from pydicom.filereader import dcmread

from clinic_gateway.dicom_export import DERMOSCOPIC_PHOTOGRAPHY
from clinic_gateway.gateway import Gateway
from dermascope_wire import bundle
from dermascope_wire.protocol import Final, Manifest, chunk_count_for, encode_chunk
from sim.scene import SceneSpec, render
from tests.test_gateway_hostile import _Probe

DEVICE = "dev-hostile"  # the probe's device
CHUNK = 4096


def _capture(capture_id: str) -> tuple[bytes, bytes]:
    ok, jpeg = cv2.imencode(".jpg", render(SceneSpec(seed=3)), [cv2.IMWRITE_JPEG_QUALITY, 80])
    assert ok
    image = jpeg.tobytes()
    metadata = {"capture_id": capture_id, "device_id": DEVICE, "kind": "capture",
                "captured_at": "2026-11-25T12:30:00.123+00:00",
                "dicom": {"LightSourcePolarization": "POLARIZED", "ContactMethod": "CONTACT"}}
    return image, bundle.pack(metadata, image)


def _send(probe: _Probe, capture_id: str, data: bytes, final_req: int) -> None:
    """Manifest, every chunk, final (the final's ack is the caller's business)."""
    sha = hashlib.sha256(data).hexdigest()
    count = chunk_count_for(len(data), CHUNK)
    probe.publish(capture_id, "manifest", Manifest(capture_id, len(data), CHUNK, count, sha,
                                                   bundle.CONTENT_TYPE, final_req - 1).encode())
    assert probe.ack(capture_id).state == "incomplete"
    for i in range(count):
        probe.publish(capture_id, "chunk", encode_chunk(bytes.fromhex(sha), CHUNK, i,
                                                        data[i * CHUNK:(i + 1) * CHUNK]))
    probe.publish(capture_id, "final", Final(capture_id, sha, count, final_req).encode())


def _crashing_gateway(broker, store: Path, moment: str) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-m", "sim.crash", "gateway", "--store", str(store),
         "--port", str(broker.port), "--kill-at", moment],
        stdout=subprocess.PIPE, text=True)
    ready, _, _ = select.select([proc.stdout], [], [], 30)
    assert ready, "the crashing gateway did not start within 30 s"
    assert proc.stdout.readline().strip() == "ready"
    return proc


def _leftovers(store: Path) -> list[str]:
    """Everything a finished store must not leave behind."""
    left = [p for p in store.rglob(".*") if p.is_file()]  # temp files, anywhere
    left += list((store / ".gateway" / "staging").glob("*/*"))
    left += [p for p in (store / ".gateway" / "pending").rglob("*") if p.is_file()]
    return sorted(str(p.relative_to(store)) for p in left)


@pytest.mark.parametrize("moment", ["commit", "linked", "stored", "dicom"])
def test_a_gateway_killed_mid_store_finishes_the_work_when_it_starts_again(
        broker, store, events, moment) -> None:
    capture_id = f"k-{moment}"
    image, data = _capture(capture_id)
    with _Probe(broker) as probe:
        proc = _crashing_gateway(broker, store, moment)
        try:
            _send(probe, capture_id, data, final_req=2)
            assert proc.wait(timeout=30) == -signal.SIGKILL
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
        # At "dicom" the ack was handed to paho before the export began; whether it left the
        # process before the kill is a matter of microseconds, and the retry below must be
        # answered "committed" either way.
        # What the kill left: the journal entry, and (but at "commit") the stored image.
        pending = store / ".gateway" / "pending" / DEVICE / f"{capture_id}.json"
        assert pending.exists()
        assert (store / DEVICE / f"{capture_id}.jpg").exists() == (moment != "commit")
        assert not (store / DEVICE / f"{capture_id}.dcm").exists()
        assert _leftovers(store) != []

        with Gateway(broker.host, broker.port, store, allow_unsealed=True) as gw:
            assert gw.wait_ready(10)
            assert gw.wait_exported(30)
            if moment == "commit":
                # Nothing was committed: the device's next attempt finds every chunk staged.
                sha = hashlib.sha256(data).hexdigest()
                count = chunk_count_for(len(data), CHUNK)
                probe.publish(capture_id, "manifest", Manifest(
                    capture_id, len(data), CHUNK, count, sha, bundle.CONTENT_TYPE, 3).encode())
                again = probe.ack(capture_id)
                assert (again.state, again.missing) == ("incomplete", ())
                probe.publish(capture_id, "final", Final(capture_id, sha, count, 4).encode())
                assert probe.ack(capture_id).state == "committed"
                assert gw.wait_exported(30)
            else:
                # Committed before the kill: the device's retry is answered from the ledger.
                probe.publish(capture_id, "final", Final(
                    capture_id, hashlib.sha256(data).hexdigest(),
                    chunk_count_for(len(data), CHUNK), 5).encode())
                ack = probe.ack(capture_id)
                while ack.req != 5 and ack.state == "committed":
                    ack = probe.ack(capture_id)  # the killed gateway's own ack, if it got out
                assert (ack.state, ack.req) == ("committed", 5)

    assert (store / DEVICE / f"{capture_id}.jpg").read_bytes() == image
    ledger = json.loads((store / ".gateway" / "ledger" / DEVICE / f"{capture_id}.json")
                        .read_text())
    assert ledger["image_sha256"] == hashlib.sha256(image).hexdigest()
    dicom = dcmread(store / DEVICE / f"{capture_id}.dcm")
    assert dicom.SOPClassUID == DERMOSCOPIC_PHOTOGRAPHY
    assert _leftovers(store) == []
    assert [e["capture_id"] for e in events.named("gateway.recovering")] == [capture_id]
    # Every stored capture has its capture.stored event: logged here (by the device's retry,
    # or by recovery when the kill may have cut it off) unless the killed gateway logged it
    # and wrote its ledger.
    stored = events.named("capture.stored")
    if moment == "dicom":
        assert stored == []
    else:
        assert [(e["capture_id"], e["sha256"], e.get("recovered", False)) for e in stored] \
            == [(capture_id, hashlib.sha256(image).hexdigest(), moment != "commit")]
        assert Path(stored[0]["path"]) == store / DEVICE / f"{capture_id}.jpg"


def test_recovery_reads_only_the_journal_not_the_store(broker, store, events) -> None:
    """A start with an empty journal looks at no stored capture: a store of thousands of
    captures starts as fast as an empty one."""
    device_dir = store / DEVICE
    device_dir.mkdir(parents=True)
    for n in range(50):  # stored captures without a DICOM file (e.g. export_dicom was off)
        (device_dir / f"old-{n}.jpg").write_bytes(b"\xff\xd8")
        (device_dir / f"old-{n}.json").write_text("{}")
    (device_dir / ".stray-by-someone-else.tmp").write_bytes(b"")
    with Gateway(broker.host, broker.port, store, allow_unsealed=True) as gw:
        assert gw.wait_ready(10)
        assert gw.wait_exported(10)
    assert events.named("gateway.recovering") == []
    assert not list(device_dir.glob("*.dcm"))
    assert (device_dir / ".stray-by-someone-else.tmp").exists()  # not ours to judge


def test_an_interrupted_journal_write_is_dropped(broker, store) -> None:
    pending = store / ".gateway" / "pending" / DEVICE
    pending.mkdir(parents=True)
    stray = pending / ".c9.json.abcd1234.tmp"  # write_atomic's temp, cut short
    stray.write_bytes(b'{"capt')
    with Gateway(broker.host, broker.port, store, allow_unsealed=True) as gw:
        assert gw.wait_ready(10)
    assert not stray.exists()
    assert os.listdir(pending) == []


def _in_flight(store: Path, capture_id: str, pid: int) -> tuple[Path, Path]:
    """A store in the middle of a transfer by the process ``pid`` of this host: its journal
    entry (written at the manifest) and its image's temp file, not committed yet."""
    pending = store / ".gateway" / "pending" / DEVICE
    pending.mkdir(parents=True, exist_ok=True)
    entry = pending / f"{capture_id}.json"
    entry.write_text(json.dumps({"capture_id": capture_id, "device_id": DEVICE,
                                 "transfer_sha256": "ab" * 32, "size": 10,
                                 "image": f"{capture_id}.jpg", "host": os.uname().nodename,
                                 "pid": pid}))
    device_dir = store / DEVICE
    device_dir.mkdir(parents=True, exist_ok=True)
    temp = device_dir / f".{capture_id}.jpg.{pid}.tmp"
    temp.write_bytes(b"\xff\xd8 half an image")
    return entry, temp


def test_a_worker_starting_leaves_a_live_peers_transfer_alone(broker, store, events) -> None:
    """Workers share the store: one that (re)starts while another is mid-store must not take
    the other's journal entry and temp file for a crash's leftovers (if it did, the peer's
    commit would fail, or its after-ack work would have no entry if the peer then died)."""
    peer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live_entry, live_temp = _in_flight(store, "live1", peer.pid)
        # Journaled by the peer at its manifest, committed by a worker since killed (on a
        # shared subscription the final may reach another worker): finished here.
        _in_flight(store, "live2", peer.pid)
        (store / DEVICE / f".live2.jpg.{peer.pid}.tmp").rename(store / DEVICE / "live2.jpg")
        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait(timeout=30)
        dead_entry, dead_temp = _in_flight(store, "dead1", dead.pid)
        with Gateway(broker.host, broker.port, store, allow_unsealed=True) as gw:
            assert gw.wait_ready(10)
        assert live_entry.exists()
        assert live_temp.exists()
        assert not dead_entry.exists()
        assert not dead_temp.exists()
        assert [e["capture_id"] for e in events.named("gateway.recovery_skipped")] == ["live1"]
        recovered = {e["capture_id"]: e["committed"] for e in events.named("gateway.recovering")}
        assert recovered == {"dead1": False, "live2": True}
    finally:
        peer.kill()
        peer.wait(timeout=30)


def test_the_journal_names_the_process_that_writes_it(broker, store) -> None:
    with _Probe(broker) as probe, \
            Gateway(broker.host, broker.port, store, allow_unsealed=True) as gw:
        assert gw.wait_ready(10)
        _image, data = _capture("named1")
        sha = hashlib.sha256(data).hexdigest()
        probe.publish("named1", "manifest", Manifest(
            "named1", len(data), CHUNK, chunk_count_for(len(data), CHUNK), sha,
            bundle.CONTENT_TYPE, 1).encode())
        assert probe.ack("named1").state == "incomplete"
        entry = store / ".gateway" / "pending" / DEVICE / "named1.json"
        # Written on a store thread as the transfer starts: bounded wait for it.
        deadline = time.monotonic() + 10
        while not entry.exists() and time.monotonic() < deadline:
            threading.Event().wait(0.02)
        record = json.loads(entry.read_text())
    assert record["pid"] == os.getpid()
    assert record["host"] == os.uname().nodename
