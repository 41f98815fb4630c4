"""Clinic IT's revocation tool (clinic-gateway revoke) and the CA's CRL functions
(clinic_gateway/crl.py).
The broker's side of revocation is proven in tests/test_broker_hardening.py."""

from __future__ import annotations

import json

import pytest
from cryptography import x509

from clinic_gateway.revoke import main
from sim.pki import TestCA


@pytest.fixture
def ca(tmp_path):
    return TestCA(tmp_path / "clinic")


def run(ca: TestCA, *certs, key=None, days: float = 30) -> int:
    return main(["--ca-cert", str(ca.cert_path), "--ca-key", str(key or ca.key_path),
                 "--crl", str(ca.crl_path), "--days", str(days), *map(str, certs)])


def crl_of(ca: TestCA) -> x509.CertificateRevocationList:
    return x509.load_pem_x509_crl(ca.crl_path.read_bytes())


def test_revoking_adds_the_serial_once_and_every_issue_has_a_higher_number(ca, capsys):
    device = ca.issue("dev1")
    serial = x509.load_pem_x509_certificate(device.cert.read_bytes()).serial_number
    assert run(ca) == 0  # the first CRL, empty
    first = crl_of(ca)
    assert len(first) == 0
    assert first.is_signature_valid(ca.cert.public_key())
    capsys.readouterr()
    assert run(ca, device.cert) == 0
    assert json.loads(capsys.readouterr().out)["revoked"] == [f"{serial:x}"]
    assert run(ca, device.cert) == 0  # again: nothing new
    assert json.loads(capsys.readouterr().out)["revoked"] == []
    assert run(ca, days=60) == 0  # a refresh keeps the entries and extends the validity
    last = crl_of(ca)
    assert [r.serial_number for r in last] == [serial]
    numbers = [c.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
               for c in (first, last)]
    assert numbers == [1, 4]
    assert last.next_update_utc > first.next_update_utc


def test_a_certificate_of_another_ca_is_refused_and_the_crl_is_unchanged(ca, tmp_path, capsys):
    ca.write_crl()
    before = ca.crl_path.read_bytes()
    stranger = TestCA(tmp_path / "other", "Other CA").issue("dev1")
    # Same issuer name, another key: only the signature tells them apart.
    impostor = TestCA(tmp_path / "impostor", "Test clinic CA").issue("dev1")
    for cert in (stranger.cert, impostor.cert):
        assert run(ca, cert) == 2
        assert "not by this CA" in capsys.readouterr().err
    assert ca.crl_path.read_bytes() == before


def test_a_crl_of_another_ca_or_a_key_that_is_not_the_cas_is_refused(ca, tmp_path, capsys):
    other = TestCA(tmp_path / "other", "Other CA")
    other.write_crl()
    ca.crl_path.write_bytes(other.crl_path.read_bytes())
    assert run(ca) == 2
    assert "is not a CRL signed by the CA" in capsys.readouterr().err
    ca.crl_path.unlink()
    assert run(ca, key=other.key_path) == 2
    assert "is not the EC private key of" in capsys.readouterr().err
    assert not ca.crl_path.exists()


def test_the_test_ca_revokes_through_the_same_functions(ca):
    device = ca.issue("dev1")
    ca.revoke(device.cert)
    serial = x509.load_pem_x509_certificate(device.cert.read_bytes()).serial_number
    assert [r.serial_number for r in crl_of(ca)] == [serial]


def test_a_revocation_is_recorded_in_the_gateways_audit_log(ca, tmp_path):
    from clinic_gateway.audit import main as audit_main

    store = tmp_path / "store"
    device = ca.issue("dev1")
    assert main(["--ca-cert", str(ca.cert_path), "--ca-key", str(ca.key_path),
                 "--crl", str(ca.crl_path), "--audit", str(store), str(device.cert)]) == 0
    serial = f"{x509.load_pem_x509_certificate(device.cert.read_bytes()).serial_number:x}"
    lines = [json.loads(line) for line in
             (store / ".gateway" / "audit.jsonl").read_text().splitlines()]
    assert [(r["event"], r["device_id"], r["serial"]) for r in lines] == [
        ("certificate.revoked", "dev1", serial)]
    assert audit_main(["verify", str(store)]) == 0
