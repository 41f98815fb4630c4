"""Reading key files (PEM) for sealing and signing: one way to say what is wrong with them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization


class KeyFileError(ValueError):
    """A key file that is missing, not PEM, or not the expected kind of key."""


def _read(path: Path, error: type[KeyFileError]) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as err:
        raise error(f"{path}: cannot read key: {err.strerror or err}") from None


def _expect(key: Any, path: Path, kind: type, what: str, error: type[KeyFileError]) -> Any:
    if not isinstance(key, kind):
        algorithm = kind.__name__.removesuffix("PublicKey").removesuffix("PrivateKey")
        raise error(f"{path}: {what} must be {algorithm}, got {type(key).__name__}")
    return key


def load_public(path: Path, kind: type, what: str,
                error: type[KeyFileError] = KeyFileError) -> Any:
    """The public key in ``path`` (PEM SubjectPublicKeyInfo), of type ``kind``."""
    data = _read(path, error)  # its own message: a missing file is not "not PEM"
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError as err:
        raise error(f"{path}: not a PEM public key ({err})") from None
    return _expect(key, path, kind, what, error)


def load_private(path: Path, kind: type, what: str,
                 error: type[KeyFileError] = KeyFileError) -> Any:
    """The private key in ``path`` (unencrypted PEM PKCS#8), of type ``kind``."""
    data = _read(path, error)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as err:
        raise error(f"{path}: not an unencrypted PEM private key ({err})") from None
    return _expect(key, path, kind, what, error)


def public_pem(key: Any) -> bytes:
    return key.public_bytes(serialization.Encoding.PEM,
                            serialization.PublicFormat.SubjectPublicKeyInfo)


def private_pem(key: Any) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
