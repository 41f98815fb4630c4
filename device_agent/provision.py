"""``device-agent provision``: give a device its identity, as a technician does once.

Repeatable without harm: a second run keeps the device key (unless told to rotate it),
rewrites the CSR, installs a signed certificate when given one, and updates only the keys
it owns in the config, keeping a technician's other settings and comments.

What it writes (all in the config file's folder, /etc/device-agent on a device):

    device.key   the device's private key (EC P-256), mode 0600; it never leaves the device
    device.csr   the certificate request for the clinic CA (CN = device id)
    device.crt   the signed certificate, once the clinic CA has signed the CSR
    ca.crt       the clinic CA, which the device uses to verify the broker
    clinic-seal.pub.pem   the clinic's X25519 key that every capture is sealed to
    gateway-sign-<key id>.pub.pem   the clinic gateway's Ed25519 key(s) that acks and commands
                 must be signed with (two during a rotation of that key)
    config.toml  mode 0600

The gateway keys given replace the trusted set; given none, a re-run keeps the set the
config already names (e.g. when only installing the certificate).
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import tomlkit
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from dermascope_wire import identity, signing
from dermascope_wire.durable import write_atomic
from dermascope_wire.identity import IdentityError
from dermascope_wire.seal import KeyFileError, load_public_key, public_key_pem
from device_agent.config import load_config


class ProvisionError(ValueError):
    """A wrong input to provisioning; the message says which and why."""


@dataclass
class Report:
    """What provisioning did, for the technician."""

    lines: list[str] = field(default_factory=list)
    ready: bool = False  # the device has everything it needs to connect

    def say(self, line: str) -> None:
        self.lines.append(line)


def check_device_id(device_id: object) -> str:
    """``device_id`` if it may name a device (dermascope_wire.identity, the rule the clinic's
    CA and gateway apply too); ProvisionError naming the problem otherwise."""
    try:
        return identity.check_device_id(device_id)
    except IdentityError as err:
        raise ProvisionError(str(err)) from None


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _load_cert(path: Path, what: str) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except OSError as err:
        raise ProvisionError(f"{what} {path}: cannot read: {err.strerror}") from None
    except ValueError as err:
        raise ProvisionError(f"{what} {path}: not a PEM certificate ({err})") from None


def _check_validity(cert: x509.Certificate, what: str, path: Path) -> None:
    now = _now()
    if cert.not_valid_after_utc < now:
        raise ProvisionError(f"{what} {path}: expired on {cert.not_valid_after_utc:%Y-%m-%d}")
    if cert.not_valid_before_utc > now:
        raise ProvisionError(
            f"{what} {path}: not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC; "
            "is the device clock right?")


def load_ca(path: Path) -> x509.Certificate:
    ca = _load_cert(path, "clinic CA")
    try:
        is_ca = ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:
        raise ProvisionError(f"clinic CA {path}: this certificate is not a CA "
                             "(no BasicConstraints CA:TRUE); give the CA that signs devices")
    _check_validity(ca, "clinic CA", path)
    return ca


def _load_key(path: Path) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as err:
        raise ProvisionError(f"device key {path}: unreadable ({err}); "
                             "provision again with --rotate-key to replace it") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ProvisionError(f"device key {path}: not an EC key")
    return key


def ensure_key(path: Path, rotate: bool, report: Report) -> ec.EllipticCurvePrivateKey:
    if path.exists() and not rotate:
        if path.stat().st_mode & 0o077:
            path.chmod(0o600)
            report.say(f"fixed     {path} was readable by others; now mode 0600")
        report.say(f"kept      device key {path} (use --rotate-key to replace it)")
        return _load_key(path)
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    write_atomic(path, pem)
    report.say(f"{'rotated' if rotate else 'created'}   device key {path} (mode 0600)")
    return key


def write_csr(key: ec.EllipticCurvePrivateKey, device_id: str, path: Path) -> None:
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
           .sign(key, hashes.SHA256()))
    write_atomic(path, csr.public_bytes(serialization.Encoding.PEM), mode=0o644)


def check_device_cert(cert_path: Path, key: ec.EllipticCurvePrivateKey, ca: x509.Certificate,
                      device_id: str) -> x509.Certificate:
    cert = _load_cert(cert_path, "device certificate")
    der = serialization.PublicFormat.SubjectPublicKeyInfo
    if (cert.public_key().public_bytes(serialization.Encoding.DER, der)
            != key.public_key().public_bytes(serialization.Encoding.DER, der)):
        raise ProvisionError(f"device certificate {cert_path}: it is for another key, not "
                             "this device's; have the CA sign this device's device.csr")
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        raise ProvisionError(f"device certificate {cert_path}: not signed by the clinic CA "
                             f"({ca.subject.rfc4514_string()})") from None
    _check_validity(cert, "device certificate", cert_path)
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not names or names[0].value != device_id:
        got = names[0].value if names else "none"
        raise ProvisionError(f"device certificate {cert_path}: its CN is {got!r}, but the "
                             f"device id is {device_id!r}; the broker ACL needs them equal")
    return cert


def parse_broker(text: str) -> tuple[str, int]:
    """``host``, ``host:port`` or ``mqtts://host:port``; TLS port 8883 by default."""
    match = re.fullmatch(r"(?:mqtts://)?(\[[0-9a-fA-F:]+\]|[A-Za-z0-9.-]+)(?::(\d{1,5}))?", text)
    if not match:
        raise ProvisionError(f"broker {text!r}: expected host, host:port or mqtts://host:port")
    host, port = match.group(1).strip("[]"), int(match.group(2) or 8883)
    if not 1 <= port <= 65535:
        raise ProvisionError(f"broker {text!r}: port must be 1..65535")
    return host, port


def _configured_gateway_keys(path: Path) -> list[Path]:
    """The gateway keys a config already names (a re-run without --gateway-key keeps them)."""
    if not path.exists():
        return []
    try:
        security = tomlkit.parse(path.read_text(encoding="utf-8")).get("security", {})
    except (OSError, UnicodeDecodeError, tomlkit.exceptions.ParseError) as err:
        raise ProvisionError(f"{path}: cannot read the existing config ({err})") from None
    value = security.get("gateway_public_key", [])
    return [Path(str(p)) for p in ([value] if isinstance(value, str) else value)]


def _load_gateway_keys(paths: Sequence[Path]) -> list[signing.Ed25519PublicKey]:
    keys = []
    for path in paths:
        try:
            keys.append(signing.load_public_key(path))
        except signing.SigningKeyError as err:
            raise ProvisionError(f"gateway key: {err}") from None
    if not keys:
        raise ProvisionError("--gateway-key: give the clinic gateway's signing key (Ed25519, "
                             "PEM); without it the device could not tell the gateway's acks "
                             "and commands from forged ones")
    return keys


def _update_config(path: Path, device_id: str, host: str, port: int, folder: Path,
                   gateway_keys: list[Path]) -> None:
    doc = tomlkit.parse(path.read_text(encoding="utf-8")) if path.exists() else tomlkit.document()
    values = {
        "device": {"id": device_id},
        "uplink": {"host": host, "port": port, "ca_file": str(folder / "ca.crt"),
                   "cert_file": str(folder / "device.crt"), "key_file": str(folder / "device.key"),
                   "insecure_dev_mode": False},
        "security": {"clinic_public_key": str(folder / "clinic-seal.pub.pem"),
                     "gateway_public_key": [str(p) for p in gateway_keys],
                     "insecure_dev_mode": False},
        # The real camera: a provisioned device must never stream the simulator's frames.
        "camera": {"backend": "picamera2"},
    }
    for section, keys in values.items():
        table = doc.setdefault(section, tomlkit.table())
        for key, value in keys.items():
            table[key] = value
    write_atomic(path, tomlkit.dumps(doc).encode("utf-8"))


def provision(
    config_path: Path,
    device_id: str,
    broker: str,
    ca_path: Path,
    clinic_key_path: Path,
    cert_path: Path | None = None,
    rotate_key: bool = False,
    gateway_keys: Sequence[Path] = (),
) -> Report:
    """Provision (or re-provision) the device; raise ProvisionError for any wrong input
    before anything is written."""
    report = Report()
    check_device_id(device_id)
    host, port = parse_broker(broker)
    ca = load_ca(ca_path)
    try:
        clinic_key = load_public_key(clinic_key_path)
    except KeyFileError as err:
        raise ProvisionError(f"clinic key: {err}") from None
    signing_keys = _load_gateway_keys(gateway_keys or _configured_gateway_keys(config_path))

    folder = config_path.parent
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    key_path, csr_path = folder / "device.key", folder / "device.csr"
    crt_path = folder / "device.crt"
    if cert_path is not None and rotate_key:
        raise ProvisionError("--cert with --rotate-key: a new key needs a new certificate; "
                             "rotate first, have device.csr signed, then install it with --cert")
    if cert_path is not None:
        if not key_path.exists():
            raise ProvisionError("--cert: this device has no key yet; provision without "
                                 "--cert first and have the clinic CA sign device.csr")
        # Check the certificate against the key we keep before touching anything.
        check_device_cert(cert_path, _load_key(key_path), ca, device_id)

    key = ensure_key(key_path, rotate_key, report)
    write_csr(key, device_id, csr_path)
    report.say(f"wrote     {csr_path}: have the clinic CA sign it (CN={device_id})")
    write_atomic(folder / "ca.crt", ca.public_bytes(serialization.Encoding.PEM), mode=0o644)
    write_atomic(folder / "clinic-seal.pub.pem", public_key_pem(clinic_key), mode=0o644)
    report.say(f"installed clinic CA and clinic sealing key in {folder}")
    installed = []
    trusted = {signing.key_id(k): k for k in signing_keys}  # a key given twice counts once
    for kid, public in trusted.items():
        public_path = folder / f"gateway-sign-{kid}.pub.pem"
        write_atomic(public_path, signing.public_key_pem(public), mode=0o644)
        installed.append(public_path)
    report.say(f"trusted   gateway signing key(s) {', '.join(trusted)} (key ids)")

    if rotate_key and crt_path.exists():
        crt_path.replace(folder / "device.crt.old")
        report.say("retired   device.crt (it belongs to the old key)")
    if cert_path is not None:
        cert = check_device_cert(cert_path, key, ca, device_id)
        write_atomic(crt_path, cert.public_bytes(serialization.Encoding.PEM), mode=0o644)
        report.say(f"installed {crt_path}, valid until {cert.not_valid_after_utc:%Y-%m-%d}")

    _update_config(config_path, device_id, host, port, folder, installed)
    load_config(config_path)  # the written config must itself be valid
    report.say(f"wrote     {config_path} (mode 0600) for broker {host}:{port}")
    report.ready = crt_path.exists()
    if not report.ready:
        report.say("next      sign device.csr with the clinic CA, then run provision again "
                   "with --cert device.crt")
    return report
