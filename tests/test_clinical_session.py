"""A whole clinical session on the simulator, driven as a clinic would: the gateway opens a
case, the clinician takes images in both light modes, gets a retake, overrides it, takes a
pair, and the case is closed. Checked at the gateway, DICOM files read back."""

from __future__ import annotations

import json

from pydicom.filereader import dcmread

from clinic_gateway.commander import Commander
from clinic_gateway.gateway import Gateway
from sim.device import SimDevice, sim_config

DEVICE = "sim-0001"


def test_a_clinical_session_end_to_end(tmp_path, broker):
    store = tmp_path / "store"
    config = sim_config(tmp_path / "device", broker.port, DEVICE, button={"hold_time": 0.5})
    with Gateway(broker.host, broker.port, store, allow_unsealed=True) as gateway, \
            SimDevice(config) as device:
        device.wait_online()
        commander = Commander(broker.host, broker.port)
        try:
            # The case through the gateway, which records it and so files its captures.
            assert gateway.open_case(DEVICE, "TD-2026-42", anatomic_site="lower extremity")["ok"]
            device.show(None, seed=1)
            polarised = device.press()
            assert commander.send(DEVICE, "set_illumination", mode="non_polarised")["ok"]
            device.show(None, seed=2)
            non_polarised = device.press()
            device.show("defocus", severity=2.0, seed=3)
            retake = device.press()
            overridden = device.hold()
            assert commander.send(DEVICE, "set_illumination", mode="pair")["ok"]
            device.show(None, seed=4)
            pair = device.press()
            assert gateway.close_case(DEVICE)["ok"]
            device.show(None, seed=5)
            after = device.press()
            assert device.uplink.wait_idle(timeout=60)
        finally:
            commander.close()

    for outcome in (polarised, non_polarised, pair, after):
        assert (outcome.verdict, outcome.reasons) == ("accept", ()), outcome
    assert retake.verdict == "retake"
    assert retake.reasons == ("focus",)
    assert overridden.overridden
    assert overridden.capture_id == retake.capture_id
    assert len(pair.linked) == 2

    def sidecar(capture_id: str) -> dict:
        return json.loads((store / DEVICE / f"{capture_id}.json").read_text())

    stored = {p.stem for p in (store / DEVICE).glob("*.jpg")}
    expected = {polarised.capture_id, non_polarised.capture_id, retake.capture_id,
                *pair.linked, *after.linked}  # still in pair mode after the case
    assert stored == expected

    for capture_id in expected - set(after.linked):
        meta = sidecar(capture_id)
        assert meta["case"] == {"token": "TD-2026-42", "assigned": True}
        assert meta["isic"]["anatom_site_general"] == "lower extremity"
    assert sidecar(after.capture_id)["case"]["assigned"] is False
    assert sidecar(polarised.capture_id)["dicom"]["LightSourcePolarization"] == "POLARIZED"
    assert sidecar(non_polarised.capture_id)["dicom"]["LightSourcePolarization"] == \
        "NON_POLARIZED"
    kept = sidecar(retake.capture_id)
    assert kept["overridden"] is True
    assert kept["quality"]["reasons"] == ["focus"]
    first, second = (sidecar(c) for c in pair.linked)
    assert first["pair"]["pair_id"] == second["pair"]["pair_id"]

    ds = dcmread(store / DEVICE / f"{non_polarised.capture_id}.dcm")
    assert ds.SOPClassUID.name == "Dermoscopic Photography Image Storage"
    assert ds.LightSourcePolarization == "NON_POLARIZED"
    assert ds.AccessionNumber == "TD-2026-42"
    assert ds.DeviceSerialNumber == DEVICE


def test_a_self_test_requested_by_the_gateway_arrives_as_a_picture(tmp_path, broker):
    import cv2

    store = tmp_path / "store"
    config = sim_config(tmp_path / "device", broker.port, DEVICE)
    with Gateway(broker.host, broker.port, store, allow_unsealed=True), SimDevice(config) as device:
        device.wait_online()
        commander = Commander(broker.host, broker.port)
        try:
            # The self-test judges what the lens sees: a sound scene, then a blurred one.
            device.show(None, seed=6)
            sound = commander.send(DEVICE, "self_test")["result"]
            device.show("defocus", severity=2.0, seed=6)
            blurred = commander.send(DEVICE, "self_test")["result"]
        finally:
            commander.close()
        assert device.uplink.wait_idle(timeout=30)
    assert (sound["camera"], sound["verdict"], sound["reasons"]) == ("streaming", "accept", [])
    assert (blurred["verdict"], blurred["reasons"]) == ("retake", ["focus"])
    for result in (sound, blurred):
        picture = store / DEVICE / f"{result['report_capture_id']}.jpg"
        assert cv2.imread(str(picture)).shape == (860, 1400, 3)
        sidecar = json.loads(picture.with_suffix(".json").read_text())
        assert sidecar["kind"] == "self_test"
        assert (sidecar["quality"]["verdict"], sidecar["quality"]["reasons"]) == \
            (result["verdict"], result["reasons"])
        assert not picture.with_suffix(".dcm").exists()  # not a dermoscopic image
