"""The clinic CA's certificate revocation list: build it, check it, add to it.

What a clinic CA needs to revoke a certificate; ``clinic-gateway revoke`` is the tool clinic IT
runs with these functions (and sim/pki.py's throwaway test CA uses them too).
"""

from __future__ import annotations

import datetime as dt
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec


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
