"""`device-agent wipe`: a decommissioned device keeps no key, no identity and no capture,
and never destroys an undelivered capture unless the technician says so."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import tomlkit

from dermascope_wire import signing
from dermascope_wire.seal import generate_keypair, public_key_pem
from device_agent.config import load_config
from device_agent.provision import provision
from device_agent.status import status_path, write_status
from device_agent.uplink.outbox import Outbox
from sim.pki import TestCA


@pytest.fixture
def device(tmp_path: Path) -> Path:
    """A provisioned device (certificate installed) with some state: its config path."""
    ca = TestCA(tmp_path / "clinic")
    _, public = generate_keypair()
    seal = tmp_path / "clinic" / "seal.pub.pem"
    seal.write_bytes(public_key_pem(public))
    gateway = tmp_path / "clinic" / "gateway-sign.pub.pem"
    gateway.write_bytes(signing.public_key_pem(signing.generate_key().public_key()))
    config = tmp_path / "etc" / "config.toml"
    provision(config, "derm-0042", "broker.clinic.example", ca.cert_path, seal,
              gateway_keys=[gateway])
    signed = ca.sign_csr_file(config.parent / "device.csr", tmp_path / "signed.crt")
    assert provision(config, "derm-0042", "broker.clinic.example", ca.cert_path, seal,
                     cert_path=signed).ready
    state = tmp_path / "state"
    doc = tomlkit.parse(config.read_text())
    doc["device"]["state_dir"] = str(state)
    config.write_text(tomlkit.dumps(doc))
    state.mkdir()
    (state / "calibration.json").write_text("{}")
    (state / "command-sequence.json").write_text('{"seq": 7}')
    return config


def wipe(config: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "device_agent", "wipe", "--config",
                           str(config), *extra], capture_output=True, text=True, timeout=60,
                          check=False)


def test_wipe_removes_keys_identity_and_state(device: Path) -> None:
    folder, state = device.parent, load_config(device).device.state_dir
    key = (folder / "device.key").read_bytes()
    result = wipe(device)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in folder.iterdir()) == []
    assert not state.exists()
    assert "revoke" in result.stdout
    # Nothing of the key is left under another name either.
    assert not any(key in p.read_bytes() for p in device.parent.parent.rglob("*")
                   if p.is_file() and "clinic" not in p.parts)


def test_wipe_refuses_while_captures_wait_then_discards_on_request(device: Path) -> None:
    config = load_config(device)
    Outbox(config.outbox_dir, 10**7).put("cap-1", b"an accepted capture")
    refused = wipe(device)
    assert refused.returncode == 1
    assert "1 accepted capture(s) are not yet delivered" in refused.stderr
    assert (device.parent / "device.key").exists()
    assert Outbox(config.outbox_dir, 10**7).depth() == 1
    done = wipe(device, "--discard-undelivered")
    assert done.returncode == 0, done.stderr
    assert "discarded 1 undelivered capture(s)" in done.stdout
    assert not config.device.state_dir.exists()
    assert not (device.parent / "device.key").exists()


def test_wipe_refuses_while_the_agent_runs(device: Path) -> None:
    state = load_config(device).device.state_dir
    write_status(status_path(state), {"updated_at": time.time(), "device_id": "derm-0042"})
    refused = wipe(device)
    assert refused.returncode == 1
    assert "the agent is running" in refused.stderr
    assert (device.parent / "device.key").exists()


def test_wipe_leaves_what_is_not_the_agents(device: Path) -> None:
    state = load_config(device).device.state_dir
    (state / "someone-elses.txt").write_text("keep me")
    result = wipe(device)
    assert result.returncode == 0, result.stderr
    assert (state / "someone-elses.txt").read_text() == "keep me"
    assert "left" in result.stdout
    assert not (state / "calibration.json").exists()
