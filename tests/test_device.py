"""The whole simulated device against a real Mosquitto and the reference gateway."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from clinic_gateway.gateway import Gateway
from device_agent.uplink.outbox import Outbox
from sim.broker import MosquittoBroker, free_port
from sim.device import SimDevice, sim_config

DEVICE = "sim-0001"


def stored_images(store: Path) -> dict[str, Path]:
    return {p.stem: p for p in (store / DEVICE).glob("*.jpg")}


def assert_verified(store: Path, capture_id: str) -> dict:
    """The gateway holds the capture, and its image is the one the device described."""
    image = store / DEVICE / f"{capture_id}.jpg"
    metadata = json.loads((store / DEVICE / f"{capture_id}.json").read_text())
    assert metadata["capture_id"] == capture_id
    assert metadata["device_id"] == DEVICE
    assert hashlib.sha256(image.read_bytes()).hexdigest() == metadata["image"]["sha256"]
    return metadata


def test_the_simulator_config_declares_a_developers_bench(tmp_path):
    bench = sim_config(tmp_path, 1)
    assert bench.camera.backend == "sim"
    assert bench.uplink.insecure_dev_mode
    assert bench.security.insecure_dev_mode
    assert bench.security.clinic_public_key is None
    from dermascope_wire import signing
    from dermascope_wire.seal import generate_keypair, public_key_pem

    key = tmp_path / "seal.pub.pem"
    key.write_bytes(public_key_pem(generate_keypair()[1]))
    gateway_key = tmp_path / "gateway-sign.pub.pem"
    gateway_key.write_bytes(signing.public_key_pem(signing.generate_key().public_key()))
    # One key alone is still a bench (the other is not required)...
    assert sim_config(tmp_path, 1, security={"clinic_public_key": str(key)}
                      ).security.insecure_dev_mode
    # ... both keys make a clinic device's security section.
    sealed = sim_config(tmp_path, 1, security={"clinic_public_key": str(key),
                                               "gateway_public_key": [str(gateway_key)]})
    assert sealed.security.clinic_public_key == key
    assert not sealed.security.insecure_dev_mode


def test_a_good_press_is_stored_and_a_defective_one_never_leaves(tmp_path, broker):
    store = tmp_path / "store"
    config = sim_config(tmp_path / "device", broker.port)
    with Gateway(broker.host, broker.port, store, allow_unsealed=True), SimDevice(config) as device:
        device.show(None)
        good = device.press()
        device.show("defocus", severity=2.0)
        bad = device.press()
        assert device.uplink.wait_idle(timeout=30)
        assert device.outbox.depth() == 0

    assert good.verdict == "accept"
    assert bad.verdict == "retake"
    assert "focus" in bad.reasons
    assert set(stored_images(store)) == {good.capture_id}
    metadata = assert_verified(store, good.capture_id)
    assert metadata["quality"]["verdict"] == "accept"
    assert metadata["overridden"] is False
    assert metadata["isic"]["dermoscopic_type"] == "contact polarized"
    assert metadata["dicom"]["LightSourcePolarization"] == "POLARIZED"
    assert metadata["case"] == {"token": None, "assigned": False}
    # The press shook the device: the chosen frame came from around the press, not later.
    offset = metadata["quality"]["frame_offset_s"]
    assert -config.camera.window_before <= offset <= config.camera.window_after


def test_hold_keeps_the_last_retake_flagged_overridden(tmp_path, broker):
    store = tmp_path / "store"
    config = sim_config(tmp_path / "device", broker.port, button={"hold_time": 0.5})
    with Gateway(broker.host, broker.port, store, allow_unsealed=True), SimDevice(config) as device:
        device.show("underexposed")
        retake = device.press()
        kept = device.hold()
        assert device.uplink.wait_idle(timeout=30)
    assert retake.verdict == "retake"
    assert kept.verdict == "accept"
    assert kept.overridden
    assert kept.capture_id == retake.capture_id
    metadata = assert_verified(store, kept.capture_id)
    assert metadata["overridden"] is True
    assert "underexposed" in metadata["quality"]["reasons"]


def test_capture_waits_in_the_outbox_while_the_broker_is_down(tmp_path):
    port = free_port()
    store = tmp_path / "store"
    config = sim_config(tmp_path / "device", port)
    with SimDevice(config) as device:
        device.show(None)
        outcome = device.press()
        assert outcome.verdict == "accept"
        assert device.outbox.depth() == 1
        assert not device.uplink.online
        with MosquittoBroker(tmp_path / "broker", port=port) as broker, \
                Gateway(broker.host, broker.port, store, allow_unsealed=True):
            assert device.uplink.wait_idle(timeout=60)
    assert set(stored_images(store)) == {outcome.capture_id}
    assert_verified(store, outcome.capture_id)


def test_an_accepted_capture_survives_kill_9_and_arrives_once(tmp_path, broker):
    store = tmp_path / "store"
    state = tmp_path / "device"
    with Gateway(broker.host, broker.port, store, allow_unsealed=True):
        crash = subprocess.run(
            [sys.executable, "-m", "sim.crash", "--state", str(state), "--port",
             str(broker.port)],
            capture_output=True, text=True, timeout=120, check=False,
        )
        assert crash.returncode == -signal.SIGKILL, crash.stderr
        capture_id = crash.stdout.strip()
        assert capture_id
        with SimDevice(sim_config(state, broker.port)) as device:
            assert device.uplink.wait_idle(timeout=60)
            assert device.outbox.depth() == 0
    assert set(stored_images(store)) == {capture_id}
    assert_verified(store, capture_id)


def test_a_torn_outbox_entry_is_quarantined_and_the_rest_still_delivered(tmp_path, broker):
    store = tmp_path / "store"
    config = sim_config(tmp_path / "device", broker.port)
    outbox = Outbox(config.outbox_dir, 10 * 1024 * 1024)
    torn = outbox.put("torn0000", b"x" * 4096)
    with open(torn.path, "r+b") as f:  # a write cut short by a power loss
        f.truncate(torn.path.stat().st_size // 2)
    with Gateway(broker.host, broker.port, store, allow_unsealed=True), SimDevice(config) as device:
        device.show(None)
        good = device.press()
        assert device.uplink.wait_idle(timeout=30)
    assert set(stored_images(store)) == {good.capture_id}
    quarantined = list((config.outbox_dir).rglob("*torn0000*"))
    assert quarantined
    assert all("quarantine" in str(p) for p in quarantined)


def test_storage_full_refuses_new_captures_and_keeps_old_ones(tmp_path):
    port = free_port()  # no broker: nothing leaves, the outbox fills up
    config = sim_config(tmp_path / "device", port, outbox={"quota_mb": 0.5})
    with SimDevice(config) as device:
        outcomes = []
        for seed in range(6):
            device.show(None, seed=seed)
            outcomes.append(device.press())
        kept = {o.capture_id for o in outcomes if o.verdict == "accept"}
        refused = [o for o in outcomes if o.verdict == "refused"]
        assert kept, outcomes
        assert refused, outcomes
        assert all(o.reasons == ("storage_full",) for o in refused)
        assert {e.capture_id for e in device.outbox.pending()} == kept


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_the_service_stops_cleanly_on_sigterm(tmp_path, signum):
    config = tmp_path / "config.toml"
    config.write_text(
        f'[device]\nid = "{DEVICE}"\nstate_dir = "{tmp_path / "state"}"\n'
        f'[camera]\nbackend = "sim"\n[pins]\npin_factory = "mock"\n'
        f'[uplink]\nport = {free_port()}\ninsecure_dev_mode = true\n'
        '[security]\ninsecure_dev_mode = true\n'
    )
    proc = subprocess.Popen([sys.executable, "-m", "device_agent", "run", "--config",
                             str(config)], stdout=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:
            if json.loads(line)["event"] == "agent.started":
                break
        proc.send_signal(signum)
        rest, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0
    events = [json.loads(line)["event"] for line in rest.splitlines()]
    assert "agent.stopped" in events


def test_status_tells_a_person_what_the_device_is_doing(tmp_path):
    port = free_port()
    config_path = tmp_path / "config.toml"
    config_path.write_text(
        f'[device]\nid = "{DEVICE}"\nstate_dir = "{tmp_path / "state"}"\n'
        f'[camera]\nbackend = "sim"\n[pins]\npin_factory = "mock"\n'
        f'[uplink]\nport = {port}\ninsecure_dev_mode = true\n'
        '[security]\ninsecure_dev_mode = true\n'
    )
    status = [sys.executable, "-m", "device_agent", "status", "--config", str(config_path)]
    before = subprocess.run(status, capture_output=True, text=True, timeout=60, check=False)
    assert before.returncode == 1
    assert "not running" in before.stdout

    with SimDevice(sim_config(tmp_path / "state", port)) as device:
        device.show(None)
        outcome = device.press()
        device.agent.publish_status()  # now, rather than within the second
        now = subprocess.run(status, capture_output=True, text=True, timeout=60, check=False)
        as_json = subprocess.run([*status, "--json"], capture_output=True, text=True,
                                 timeout=60, check=False)
    assert now.returncode == 0, now.stdout
    assert "streaming at" in now.stdout
    assert f"[{outcome.capture_id[:8]}]" in now.stdout
    assert "1 waiting" in now.stdout
    assert "OFFLINE" in now.stdout
    record = json.loads(as_json.stdout)
    assert record["running"] is True
    assert record["status"]["outbox"]["depth"] == 1
    assert record["status"]["last_capture"]["verdict"] == "accept"


def test_an_idle_device_sleeps_and_the_next_press_only_wakes_it(tmp_path, events):
    config = sim_config(tmp_path / "device", free_port(), camera={"sleep_after_s": 1.5})
    with SimDevice(config, with_uplink=False) as device:
        agent, board = device.agent, device.board
        events.wait_for("camera.asleep", timeout=10)  # waiting out the idle time is tested
        assert agent.asleep
        assert board.wait_for(board.pins.ring_polarised, lambda t: bool(t) and t[-1].value == 0, 5)
        assert agent.status()["camera"]["asleep"] is True
        count = agent.outcome_count
        board.press()
        events.wait_for("camera.awake", timeout=10)
        assert not agent.asleep
        assert agent.outcome_count == count  # waking is not a capture
        assert agent.ring.wait_until(time.monotonic(), timeout=5)
        assert board.pin(board.pins.ring_polarised).state > 0
        device.show(None)
        assert device.press().verdict == "accept"


def test_the_simulated_device_opens_the_camera_its_config_describes(tmp_path: Path) -> None:
    """SimDevice opens its camera as `device-agent run` does, so a test or the demo that
    sets [camera] or [sim] (streams, format, start delay) gets that camera."""
    config = sim_config(tmp_path / "state", 1, camera={"lores_width": 320,
                                                       "main_format": "YUV420"},
                        sim={"start_delay_s": 0.2})
    device = SimDevice(config, with_uplink=False)
    camera = device.camera
    assert camera.lores_size is not None
    assert camera.lores_size[0] == 320
    assert camera.main_format == "YUV420"
    assert camera.start_delay == 0.2
