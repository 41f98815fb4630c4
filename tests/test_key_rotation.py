"""Rotating the clinic's sealing key (issue 13, finding 10): captures sealed to the old key
while the new one reaches the devices still open during the overlap, and only then."""

from __future__ import annotations

from pathlib import Path

from clinic_gateway.gateway import Gateway
from dermascope_wire.seal import generate_keypair, public_key_pem
from sim.device import SimDevice, sim_config

DEVICE = "sim-0001"


def key_file(folder: Path, name: str):
    private, public = generate_keypair()
    path = folder / f"{name}.pub.pem"
    path.write_bytes(public_key_pem(public))
    return private, path


def press_offline(state: Path, port: int, key: Path, seed: int) -> str:
    """A capture sealed to ``key``, left waiting in the outbox (the broker is not there)."""
    with SimDevice(sim_config(state, port, security={"clinic_public_key": str(key)}),
                   with_uplink=False) as device:
        device.show(None, seed=seed)
        outcome = device.press()
        assert outcome.verdict == "accept"
        return outcome.capture_id


def test_captures_sealed_to_the_old_key_open_during_the_overlap(tmp_path, broker, events):
    old_private, old_key = key_file(tmp_path, "old")
    new_private, new_key = key_file(tmp_path, "new")
    state = tmp_path / "device"
    # Sealed to the old key, then the device is re-provisioned with the new one (provision
    # rewrites the key file the config names; here the config names the new file).
    before = press_offline(state, broker.port, old_key, seed=1)
    after = press_offline(state, broker.port, new_key, seed=2)
    store = tmp_path / "store"
    config = sim_config(state, broker.port, security={"clinic_public_key": str(new_key)})
    with Gateway(broker.host, broker.port, store, private_keys=[new_private, old_private]), \
            SimDevice(config) as device:
        assert device.uplink.wait_idle(timeout=60)
    assert {p.stem for p in (store / DEVICE).glob("*.jpg")} == {before, after}


def test_after_the_overlap_an_old_capture_is_refused_and_kept_on_the_device(tmp_path, broker,
                                                                            events):
    _, old_key = key_file(tmp_path, "old")
    new_private, new_key = key_file(tmp_path, "new")
    state = tmp_path / "device"
    stale = press_offline(state, broker.port, old_key, seed=1)
    store = tmp_path / "store"
    config = sim_config(state, broker.port, security={"clinic_public_key": str(new_key)})
    with Gateway(broker.host, broker.port, store, private_keys=[new_private]), \
            SimDevice(config) as device:
        events.wait_for("uplink.rejected", timeout=30, capture_id=stale)
        # Never lost: moved aside on the device for a technician, not deleted.
        assert any(stale in p.name for p in device.outbox.quarantined())
    assert not list(store.rglob(f"{stale}.jpg"))
