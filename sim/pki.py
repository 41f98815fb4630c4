"""A throwaway certificate authority for tests, the demo and a developer's bench.

A clinic runs its own CA; this stands in for it so the tests can prove mutual TLS and the
broker ACLs against a real Mosquitto. Nothing made here is for a real device.

The CRL functions (:func:`build_crl`, :func:`revoke_in_crl`) are what a clinic CA needs to
revoke a certificate; ``python -m sim.revoke`` is the tool clinic IT runs with them.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from device_agent.provision import ProvisionError, check_device_id

#: The clinic's own services, whose certificates are signed only when asked for by name.
SERVICE_NAMES = ("gateway", "broker", "admin", "commander")


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
        except ProvisionError as err:
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


class CRLError(ValueError):
    """A CRL that is not the CA's, or a certificate the CA did not issue."""


def build_crl(ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey,
              revoked: Iterable[tuple[int, dt.datetime]], number: int,
              days: float = 30) -> x509.CertificateRevocationList:
    """The CA's CRL listing ``revoked`` (serial, revocation time), valid for ``days``.

    The broker refuses every client once ``next_update`` has passed (OpenSSL's CRL check),
    so the CRL must be re-issued before then even when nothing new is revoked."""
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(now - dt.timedelta(minutes=5))
        .next_update(now + dt.timedelta(days=days))
        .add_extension(x509.CRLNumber(number), critical=False)
    )
    for serial, when in revoked:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(when).build())
    return builder.sign(ca_key, hashes.SHA256())


def load_crl(path: Path, ca_cert: x509.Certificate) -> x509.CertificateRevocationList:
    """Read a PEM CRL and check that ``ca_cert``'s key signed it."""
    crl = x509.load_pem_x509_crl(path.read_bytes())
    if crl.issuer != ca_cert.subject or not crl.is_signature_valid(ca_cert.public_key()):
        raise CRLError(f"{path} is not a CRL signed by the CA {ca_cert.subject.rfc4514_string()}")
    return crl


def revoke_in_crl(crl_path: Path, ca_cert: x509.Certificate,
                  ca_key: ec.EllipticCurvePrivateKey,
                  certificates: Iterable[x509.Certificate], days: float = 30) -> list[int]:
    """Add ``certificates`` to the CRL at ``crl_path`` (created if missing), re-sign it with a
    higher CRL number and replace the file atomically; returns the serials newly revoked.
    With no certificates it only re-issues the CRL (a refresh before ``next_update``)."""
    entries: dict[int, dt.datetime] = {}
    number = 1
    if crl_path.exists():
        old = load_crl(crl_path, ca_cert)
        entries = {r.serial_number: r.revocation_date_utc for r in old}
        number = old.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number + 1
    added = []
    now = dt.datetime.now(dt.UTC)
    for cert in certificates:
        try:
            cert.verify_directly_issued_by(ca_cert)
        except (ValueError, TypeError, InvalidSignature):
            raise CRLError(f"certificate {cert.serial_number:x} ({cert.subject.rfc4514_string()})"
                           f" was issued by {cert.issuer.rfc4514_string()}, not by this CA"
                           ) from None
        if cert.serial_number not in entries:
            entries[cert.serial_number] = now
            added.append(cert.serial_number)
    crl = build_crl(ca_cert, ca_key, sorted(entries.items()), number, days)
    # Written beside the target and renamed: the broker never reads half a CRL.
    fd, tmp = tempfile.mkstemp(dir=crl_path.parent, prefix=f".{crl_path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(crl.public_bytes(serialization.Encoding.PEM))
        os.chmod(tmp, 0o644)  # the broker, running as its own user, must read it
        os.replace(tmp, crl_path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return added


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
