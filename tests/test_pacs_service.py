"""PACS delivery end to end: a capture pressed on a simulated device appears in a real Orthanc;
``clinic-gateway run`` with [pacs] delivers every capture of a fleet through a PACS outage, a
worker killed -9 mid-stream and its forwarder killed -9 mid-retry: Orthanc ends with each
instance exactly once, counted through its own API."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import cv2
import numpy as np
import pytest
from pydicom import dcmread
from pydicom.encaps import generate_frames

from clinic_gateway import exporter
from clinic_gateway.forwarder import pending
from clinic_gateway.gateway import Gateway
from dermascope_wire.bundle import pack
from device_agent import __version__
from device_agent.config import UplinkConfig
from device_agent.uplink.client import Uplink
from device_agent.uplink.outbox import Outbox
from sim.broker import MosquittoBroker, free_port
from sim.device import SimDevice, sim_config
from sim.fleet import _sample_image
from sim.orthanc import PrivateOrthanc
from tests.orthanc import (
    Running,
    assert_same_instance,
    capture_metadata,
    forwarder,
    pacs_section,
    read_back,
    running_orthanc,
    toml_table,
)
from tests.test_gateway_service import (
    Service,
    deliver,
    dev_config,
    events,
    metric,
    scrape,
    wait_events,
)


def test_a_capture_pressed_on_a_simulated_device_appears_in_orthanc(tmp_path, broker, events):
    store = tmp_path / "store"
    with running_orthanc(tmp_path / "orthanc") as orthanc:
        gateway = Gateway(broker.host, broker.port, store, allow_unsealed=True)
        gateway.exporter_command = exporter.command(forward=True)
        with gateway, Running(forwarder(store, orthanc, "stow-rs")):
            assert gateway.wait_ready(10)
            with SimDevice(sim_config(tmp_path / "device", broker.port)) as device:
                device.show(None)
                outcome = device.press()
                assert outcome is not None
                assert outcome.verdict == "accept"
                assert device.uplink.wait_idle(timeout=30)
            assert gateway.wait_exported(30)
            events.wait_for("pacs.forwarded", capture_id=outcome.capture_id)
        held = read_back(orthanc)
        (orthanc_id,) = orthanc.instances()
        preview = cv2.imdecode(np.frombuffer(orthanc.instance_preview(orthanc_id), np.uint8),
                               cv2.IMREAD_COLOR)
    dcm = store / device.config.device.id / f"{outcome.capture_id}.dcm"
    uid = str(dcmread(dcm).SOPInstanceUID)
    assert list(held) == [uid]
    assert_same_instance(dcm, held[uid])
    # The PACS shows the very image the device took.
    (frame,) = generate_frames(held[uid].PixelData, number_of_frames=1)
    jpeg = dcm.with_suffix(".jpg").read_bytes()
    assert frame.rstrip(b"\0") == jpeg.rstrip(b"\0")
    assert held[uid].DeviceSerialNumber == device.config.device.id
    # And its viewer renders it: the picture's size, and its colours near the original's.
    original = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    assert preview.shape == original.shape == (held[uid].Rows, held[uid].Columns, 3)
    assert np.abs(preview.astype(int) - original.astype(int)).mean() < 3


def clinic_devices(tmp_path: Path, port: int, count: int, captures: int, image: bytes
                   ) -> tuple[list[Uplink], set[str]]:
    """Simulated devices (the real uplink code) whose captures carry what the DICOM export
    needs (captured_at...)."""
    config = UplinkConfig(host="127.0.0.1", port=port, ack_timeout=20.0, retry_min=0.2,
                          retry_max=3.0, heartbeat_interval=60.0, insecure_dev_mode=True)
    uplinks, accepted = [], set()
    for d in range(count):
        device_id = f"pacs-{d:04d}"
        outbox = Outbox(tmp_path / "devices" / device_id, 1 << 30)
        for minute in range(captures):
            capture_id = uuid.uuid4().hex
            outbox.put(capture_id, pack(capture_metadata(device_id, capture_id, minute), image))
            accepted.add(capture_id)
        uplinks.append(Uplink(config, device_id, outbox, __version__))
    return uplinks, accepted


def queued(tmp_path: Path) -> set[str]:
    return {e["capture_id"] for e in events(tmp_path, "pacs.queued")}


def test_the_service_delivers_every_capture_through_an_outage_and_kill_9(tmp_path):
    image = _sample_image()
    metrics_port = free_port()
    store = tmp_path / "store"
    with running_orthanc(tmp_path / "orthanc") as orthanc, \
            MosquittoBroker(tmp_path / "broker") as broker:
        orthanc.stop()  # the PACS is down while the captures come in
        config = dev_config(tmp_path, broker.port, workers=2, metrics_port=metrics_port)
        with config.open("a") as f:
            f.write(toml_table("pacs", pacs_section(orthanc, "c-store")))
        with Service(config) as service:
            workers = wait_events(tmp_path, "gateway.worker_started", count=2)
            (first,) = wait_events(tmp_path, "pacs.forwarder_process_started")
            wait_events(tmp_path, "gateway.connected", count=2)
            uplinks, accepted = clinic_devices(tmp_path, broker.port, count=4, captures=5,
                                               image=image)
            victim = next(e for e in workers if e["worker"] == 1)

            def kill_worker_mid_stream() -> None:
                wait_events(tmp_path, "capture.stored", count=6, timeout=60)
                os.kill(victim["pid"], signal.SIGKILL)

            killer = threading.Thread(target=kill_worker_mid_stream, daemon=True)
            killer.start()
            deliver(uplinks)
            killer.join(timeout=5)
            wait_events(tmp_path, "gateway.worker_died", worker=1)
            # The forwarder, retrying against the dead PACS, is killed too.
            wait_events(tmp_path, "pacs.retry", count=2)
            os.kill(first["pid"], signal.SIGKILL)
            (died,) = wait_events(tmp_path, "pacs.forwarder_died")
            assert (died["pid"], died["signal"]) == (first["pid"], "SIGKILL")
            wait_events(tmp_path, "pacs.forwarder_process_started", count=2)
            deadline = time.monotonic() + 60
            while queued(tmp_path) != accepted:
                assert time.monotonic() < deadline, "not every capture was queued"
                time.sleep(0.05)
            text = scrape(metrics_port)
            assert metric(text, "clinic_gateway_pacs_queue_depth") == len(accepted)
            orthanc.start()  # the PACS is back
            deadline = time.monotonic() + 90
            while pending(store):
                assert time.monotonic() < deadline, f"{len(pending(store))} never forwarded"
                time.sleep(0.1)
            text = scrape(metrics_port)
            assert metric(text, "clinic_gateway_pacs_queue_depth") == 0
            assert metric(text, "clinic_gateway_pacs_failed_entries") == 0
            assert metric(text, "clinic_gateway_pacs_forwarded_total") >= len(accepted)
            assert service.stop() == 0
        held = read_back(orthanc)
    # Every forwarder is gone with the supervisor; the last one stopped cleanly.
    for e in events(tmp_path, "pacs.forwarder_process_started"):
        with pytest.raises(ProcessLookupError):
            os.kill(e["pid"], 0)
    assert events(tmp_path, "pacs.forwarder_stopped")
    dicom = {p.stem: p for p in store.glob("pacs-*/*.dcm")}
    assert set(dicom) == accepted
    assert set(held) == {str(dcmread(p).SOPInstanceUID) for p in dicom.values()}
    assert len(held) == len(accepted)  # each exactly once (read_back refuses a UID twice)
    for path in dicom.values():
        assert_same_instance(path, held[str(dcmread(path).SOPInstanceUID)])


def test_make_demo_delivers_into_its_own_orthanc_and_says_where_to_look(tmp_path):
    out = tmp_path / "demo"
    result = subprocess.run([sys.executable, "-m", "device_agent", "demo", "--out", str(out),
                             "--captures", "3"], capture_output=True, text=True, timeout=300,
                            check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    dicom = sorted((out / "gateway").glob("*/*.dcm"))
    assert len(dicom) == 2  # the plan's first three scenes: good, defocus, good
    assert "pacs      2 of 2 DICOM objects read back from Orthanc" in result.stdout
    (url,) = re.findall(r"viewer    (http://127\.0\.0\.1:\d+/app/explorer\.html)", result.stdout)
    # Orthanc stopped with the demo; started again as the demo says, it still holds them.
    with PrivateOrthanc(out / "pacs", reopen=True) as orthanc:
        assert orthanc.explorer_url == url
        held = read_back(orthanc)
        assert set(held) == {str(dcmread(p).SOPInstanceUID) for p in dicom}
        for path in dicom:
            assert_same_instance(path, held[str(dcmread(path).SOPInstanceUID)])
