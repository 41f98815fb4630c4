"""Provisioning as a technician runs it, against a throwaway clinic CA."""

from __future__ import annotations

import datetime as dt
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509

from dermascope_wire import signing
from dermascope_wire.seal import generate_keypair, public_key_pem
from device_agent.config import load_config
from device_agent.provision import ProvisionError, provision
from sim.pki import TestCA


@pytest.fixture
def clinic(tmp_path):
    ca = TestCA(tmp_path / "clinic")
    _, public = generate_keypair()
    seal_key = tmp_path / "clinic" / "seal.pub.pem"
    seal_key.write_bytes(public_key_pem(public))
    return ca, seal_key, gateway_key(tmp_path / "clinic" / "gateway-sign.pub.pem")


def gateway_key(path: Path) -> Path:
    """A fresh gateway signing key's public half, as clinic IT hands it to the technician."""
    path.write_bytes(signing.public_key_pem(signing.generate_key().public_key()))
    return path


def run(config: Path, clinic, **kwargs):
    ca, seal_key, gateway = clinic
    return provision(config, kwargs.pop("device_id", "derm-0042"),
                     kwargs.pop("broker", "mqtts://broker.clinic.example:8883"),
                     kwargs.pop("ca_path", ca.cert_path), kwargs.pop("clinic_key", seal_key),
                     gateway_keys=kwargs.pop("gateway_keys", [gateway]), **kwargs)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_first_run_makes_a_private_key_and_a_csr_then_the_cert_installs(tmp_path, clinic):
    config = tmp_path / "etc" / "config.toml"
    first = run(config, clinic)
    folder = config.parent
    assert not first.ready
    assert mode(folder / "device.key") == 0o600
    assert mode(config) == 0o600
    csr = x509.load_pem_x509_csr((folder / "device.csr").read_bytes())
    assert csr.subject.rfc4514_string() == "CN=derm-0042"
    assert b"PRIVATE" not in (folder / "device.csr").read_bytes()

    signed = clinic[0].sign_csr_file(folder / "device.csr", tmp_path / "signed.crt")
    second = run(config, clinic, cert_path=signed)
    assert second.ready
    loaded = load_config(config)
    assert loaded.device.id == "derm-0042"
    assert loaded.uplink.host == "broker.clinic.example"
    assert loaded.uplink.port == 8883
    assert loaded.uplink.cert_file == folder / "device.crt"
    assert loaded.security.clinic_public_key == folder / "clinic-seal.pub.pem"
    assert loaded.camera.backend == "picamera2"
    assert 'backend = "picamera2"' in config.read_text()  # written, not left to a default
    assert not loaded.security.insecure_dev_mode


def test_provisioning_a_bench_config_makes_it_a_clinic_device(tmp_path, clinic):
    config = tmp_path / "config.toml"
    config.write_text('[device]\nid = "bench"\n[camera]\nbackend = "sim"\n'
                      '[uplink]\ninsecure_dev_mode = true\n[security]\ninsecure_dev_mode = true\n')
    run(config, clinic)
    loaded = load_config(config)
    assert loaded.camera.backend == "picamera2"
    assert not loaded.security.insecure_dev_mode
    assert not loaded.uplink.insecure_dev_mode
    assert loaded.security.clinic_public_key == tmp_path / "clinic-seal.pub.pem"


def test_repeating_keeps_the_key_and_the_technicians_other_settings(tmp_path, clinic):
    config = tmp_path / "config.toml"
    config.write_text('# site notes\n[device]\nid = "old"\n[camera]\nfps = 12.0  # slow sensor\n')
    run(config, clinic)
    key = (tmp_path / "device.key").read_bytes()
    run(config, clinic)
    assert (tmp_path / "device.key").read_bytes() == key
    text = config.read_text()
    assert "# site notes" in text
    assert "fps = 12.0  # slow sensor" in text
    assert load_config(config).device.id == "derm-0042"


def test_rotate_key_replaces_it_and_retires_the_old_certificate(tmp_path, clinic):
    config = tmp_path / "config.toml"
    run(config, clinic)
    signed = clinic[0].sign_csr_file(tmp_path / "device.csr", tmp_path / "signed.crt")
    run(config, clinic, cert_path=signed)
    old_key = (tmp_path / "device.key").read_bytes()
    report = run(config, clinic, rotate_key=True)
    assert (tmp_path / "device.key").read_bytes() != old_key
    assert not report.ready
    assert (tmp_path / "device.crt.old").exists()
    with pytest.raises(ProvisionError, match="for another key"):
        run(config, clinic, cert_path=signed)  # the old certificate no longer fits


def test_a_loose_key_file_is_tightened(tmp_path, clinic):
    config = tmp_path / "config.toml"
    run(config, clinic)
    (tmp_path / "device.key").chmod(0o644)
    report = run(config, clinic)
    assert mode(tmp_path / "device.key") == 0o600
    assert any("now mode 0600" in line for line in report.lines)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"device_id": "bad id"}, "device id 'bad id'"),
        ({"device_id": "gateway"}, "device id 'gateway' is reserved"),
        ({"broker": "mqtts://host:99999"}, "port must be"),
        ({"broker": "http://x"}, "expected host"),
    ],
)
def test_wrong_inputs_are_named_and_nothing_is_written(tmp_path, clinic, change, message):
    with pytest.raises(ProvisionError, match=message):
        run(tmp_path / "config.toml", clinic, **change)
    assert list(tmp_path.glob("device.*")) == []


def test_bad_pem_and_a_leaf_certificate_as_ca_are_refused(tmp_path, clinic):
    junk = tmp_path / "junk.pem"
    junk.write_text("-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n")
    with pytest.raises(ProvisionError, match="not a PEM certificate"):
        run(tmp_path / "c.toml", clinic, ca_path=junk)
    leaf = clinic[0].issue("someone")
    with pytest.raises(ProvisionError, match="not a CA"):
        run(tmp_path / "c.toml", clinic, ca_path=leaf.cert)
    with pytest.raises(ProvisionError, match="clinic key"):
        run(tmp_path / "c.toml", clinic, clinic_key=junk)


def test_certificates_from_a_wrong_ca_expired_or_for_another_id_are_refused(tmp_path, clinic):
    config = tmp_path / "config.toml"
    run(config, clinic)
    csr = tmp_path / "device.csr"
    rogue = TestCA(tmp_path / "rogue", "Rogue CA")
    wrong_ca = rogue.sign_csr_file(csr, tmp_path / "rogue.crt")
    with pytest.raises(ProvisionError, match="not signed by the clinic CA"):
        run(config, clinic, cert_path=wrong_ca)
    expired = clinic[0].sign_csr_file(
        csr, tmp_path / "expired.crt",
        valid_from=dt.datetime.now(dt.UTC) - dt.timedelta(days=60), days=30)
    with pytest.raises(ProvisionError, match="expired on"):
        run(config, clinic, cert_path=expired)
    with pytest.raises(ProvisionError, match="its CN is 'derm-0042'"):
        run(config, clinic, device_id="derm-0043",
            cert_path=clinic[0].sign_csr_file(csr, tmp_path / "ok.crt"))
    assert not (tmp_path / "device.crt").exists()


def test_the_command_line(tmp_path, clinic):
    ca, seal_key, gateway = clinic
    config = tmp_path / "config.toml"
    result = subprocess.run(
        [sys.executable, "-m", "device_agent", "provision", "--device-id", "derm-7",
         "--broker", "broker.local", "--ca", str(ca.cert_path), "--clinic-key", str(seal_key),
         "--gateway-key", str(gateway), "--config", str(config)],
        capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert "sign device.csr" in result.stdout
    assert "PRIVATE KEY" not in result.stdout + result.stderr
    bad = subprocess.run(
        [sys.executable, "-m", "device_agent", "provision", "--device-id", "derm-7",
         "--broker", "broker.local", "--ca", str(tmp_path / "nope.pem"), "--clinic-key",
         str(seal_key), "--gateway-key", str(gateway), "--config", str(config)],
        capture_output=True, text=True, timeout=60, check=False)
    assert bad.returncode == 2
    assert "nope.pem: cannot read" in bad.stderr
    assert len(load_config(config).security.gateway_public_key) == 1


def test_the_gateway_signing_key_is_installed_required_and_kept(tmp_path, clinic):
    config = tmp_path / "config.toml"
    run(config, clinic)
    loaded = load_config(config)
    expected = signing.key_id(signing.load_public_key(clinic[2]))
    assert loaded.security.gateway_public_key == [tmp_path / f"gateway-sign-{expected}.pub.pem"]
    # A re-run without --gateway-key (e.g. installing the certificate) keeps the trusted set.
    run(config, clinic, gateway_keys=[])
    assert load_config(config).security.gateway_public_key == loaded.security.gateway_public_key
    # A fresh device must be given one: its acks and commands could not be authenticated.
    with pytest.raises(ProvisionError, match="--gateway-key: give the clinic gateway's"):
        run(tmp_path / "other" / "config.toml", clinic, gateway_keys=[])
    assert not (tmp_path / "other" / "device.key").exists()
    # Not an Ed25519 key: named, nothing written.
    with pytest.raises(ProvisionError, match="must be Ed25519, got X25519PublicKey"):
        run(tmp_path / "other" / "config.toml", clinic, gateway_keys=[clinic[1]])
    assert not (tmp_path / "other" / "device.key").exists()


def test_a_gateway_key_rotation_trusts_old_and_new_then_only_the_new(tmp_path, clinic):
    config = tmp_path / "config.toml"
    old = clinic[2]
    new = gateway_key(tmp_path / "new-gateway-sign.pub.pem")
    run(config, clinic, gateway_keys=[old])
    run(config, clinic, gateway_keys=[old, new])  # the overlap: both trusted
    trust = signing.Trust.from_files(load_config(config).security.gateway_public_key)
    assert set(trust.keys) == {signing.key_id(signing.load_public_key(p)) for p in (old, new)}
    run(config, clinic, gateway_keys=[new])  # the gateway switched: the old key goes
    trust = signing.Trust.from_files(load_config(config).security.gateway_public_key)
    assert set(trust.keys) == {signing.key_id(signing.load_public_key(new))}


@pytest.mark.parametrize("reserved", ["gateway", "commander", "monitor", "admin", "gateway-2"])
def test_names_the_broker_gives_other_rights_are_refused(tmp_path, clinic, reserved):
    with pytest.raises(ProvisionError, match="device id"):
        run(tmp_path / "etc" / "config.toml", clinic, device_id=reserved)
    assert not (tmp_path / "etc" / "device.key").exists()


@pytest.mark.parametrize("device_id", ["derm-B/up", "derm-1\n", "Gateway", "broker", "$SYS",
                                       "a+b", "a#", " derm-1", "derm\t1", "-derm", "x" * 65])
def test_a_device_id_that_could_name_something_else_is_refused(tmp_path, clinic,
                                                              device_id) -> None:
    config = tmp_path / "etc" / "config.toml"
    with pytest.raises(ProvisionError, match="device id"):
        run(config, clinic, device_id=device_id)
    assert not config.parent.exists()  # nothing written, no CSR to sign
