"""A throwaway certificate authority for tests, the demo and a developer's bench.

A clinic runs its own CA; this stands in for it so the tests can prove mutual TLS and the
broker ACLs against a real Mosquitto. Nothing made here is for a real device.

The CRL functions a clinic CA needs to revoke a certificate are the clinic's, in
``clinic_gateway/crl.py`` (``clinic-gateway revoke`` is the tool clinic IT runs with them);
this CA uses them too.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from clinic_gateway.crl import revoke_in_crl
from dermascope_wire.identity import IdentityError, check_device_id

#: The clinic's own services, whose certificates are signed only when asked for by name.
SERVICE_NAMES = ("gateway", "broker", "admin", "commander", "monitor")


class SigningRefused(ValueError):
    """A CSR the clinic CA must not sign (its CN is no device id, or a reserved name)."""


def check_csr_name(csr: x509.CertificateSigningRequest, role: str) -> str:
    """The CSR's one CN, if a certificate for ``role`` may carry it: a device gets a valid,
    unreserved device id (it becomes the broker user and a topic level); a service
    (``gateway``, ``broker``, ``admin``) gets exactly its own name. SigningRefused otherwise."""
    names = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(names) != 1 or not isinstance(names[0].value, str):
        raise SigningRefused(f"CSR subject {csr.subject.rfc4514_string()!r}: needs exactly "
                             "one CN")
    cn = names[0].value
    if role == "device":
        try:
            return check_device_id(cn)
        except IdentityError as err:
            raise SigningRefused(f"CSR CN: {err}") from None
    if role not in SERVICE_NAMES:
        raise SigningRefused(f"role {role!r}: expected 'device' or one of {SERVICE_NAMES}")
    if cn != role:
        raise SigningRefused(f"CSR CN {cn!r}: a {role} certificate must have CN {role!r}")
    return cn


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Test clinic"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


@dataclass(frozen=True)
class Issued:
    cert: Path
    key: Path


class TestCA:
    """An EC P-256 CA that writes PEM files into ``folder``."""

    __test__ = False  # not a pytest test class, whatever its name

    def __init__(self, folder: Path, name: str = "Test clinic CA") -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(_name(name)).issuer_name(_name(name))
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=730))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False,
                                         False), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        self.cert_path = folder / "ca.crt"
        self.cert_path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))
        self.key_path = folder / "ca.key"
        self.key_path.write_bytes(_key_pem(self.key))
        self.key_path.chmod(0o600)
        self.crl_path = folder / "ca.crl"

    def write_crl(self) -> Path:
        """(Re-)issue this CA's CRL at :attr:`crl_path` (empty until something is revoked)."""
        revoke_in_crl(self.crl_path, self.cert, self.key, [])
        return self.crl_path

    def revoke(self, cert_path: Path) -> Path:
        """Put the certificate at ``cert_path`` on this CA's CRL; returns the CRL's path."""
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        revoke_in_crl(self.crl_path, self.cert, self.key, [cert])
        return self.crl_path

    def sign_csr(self, csr: x509.CertificateSigningRequest, *, server: bool = False,
                 days: float = 365, valid_from: dt.datetime | None = None,
                 role: str | None = "device") -> x509.Certificate:
        """Sign a CSR for a device (``role="device"``, the default: its CN must be a valid
        device id, not a reserved name) or for one of the clinic's services (``role`` names
        it). SigningRefused, before anything is signed, otherwise."""
        if role is not None:
            check_csr_name(csr, role)
        start = valid_from or dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = (
            x509.CertificateBuilder()
            .subject_name(csr.subject).issuer_name(self.cert.subject)
            .public_key(csr.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(start + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        if server:
            builder = builder.add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"),
                x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                x509.IPAddress(ipaddress.ip_address("::1")),
            ]), critical=False)
        return builder.sign(self.key, hashes.SHA256())

    def issue(self, common_name: str, *, server: bool = False, days: float = 365,
              valid_from: dt.datetime | None = None, checked: bool = True) -> Issued:
        """A key and certificate for ``common_name`` (a device id, "gateway", "broker").
        ``checked=False`` signs any name, as a careless or compromised CA would: for tests
        that prove the broker holds even then."""
        key = ec.generate_private_key(ec.SECP256R1())
        csr = (x509.CertificateSigningRequestBuilder().subject_name(_name(common_name))
               .sign(key, hashes.SHA256()))
        role = None if not checked else (common_name if common_name in SERVICE_NAMES
                                         else "device")
        cert = self.sign_csr(csr, server=server, days=days, valid_from=valid_from, role=role)
        # A hostile CN ("dev2/up") is still a file name here, never a path.
        stem = self.folder / re.sub(r"[^A-Za-z0-9._-]", "_", common_name)
        key_path = stem.with_suffix(".key")
        key_path.write_bytes(_key_pem(key))
        key_path.chmod(0o600)
        cert_path = stem.with_suffix(".crt")
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return Issued(cert_path, key_path)

    def sign_csr_file(self, csr_path: Path, out: Path, **kwargs: object) -> Path:
        csr = x509.load_pem_x509_csr(csr_path.read_bytes())
        out.write_bytes(self.sign_csr(csr, **kwargs).public_bytes(serialization.Encoding.PEM))
        return out
