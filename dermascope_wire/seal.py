"""End-to-end sealing of a capture to the clinic's public key.

HPKE (RFC 9180), base mode, with the suite DHKEM(X25519, HKDF-SHA256) / HKDF-SHA256 /
AES-256-GCM, as the ``cryptography`` library implements it: each capture gets a fresh
ephemeral key, so a stolen device holds nothing that opens what it already sent, and the
broker only ever carries ciphertext. The HPKE ``info`` binds the ciphertext to its device
and capture id: a sealed capture replayed under another id does not open.

Sealed form: ``b"DMS1"`` then HPKE's single-shot output (the 32-byte encapsulated key, then
the AES-GCM ciphertext and its 16-byte tag).
"""

from __future__ import annotations

from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from dermascope_wire import keyfiles

# Where callers have always found it (the base of every key file error).
from dermascope_wire.keyfiles import KeyFileError as KeyFileError

CONTENT_TYPE = "application/vnd.dermascope.bundle+hpke"
MAGIC = b"DMS1"
SUITE = hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)
_MIN_SIZE = len(MAGIC) + 32 + 16


class SealError(ValueError):
    """A sealed capture that does not open: tampered, truncated, or for another key or id."""




def _info(device_id: str, capture_id: str) -> bytes:
    return f"dermascope/v1 capture {device_id}/{capture_id}".encode()


def seal(plaintext: bytes, public_key: X25519PublicKey, device_id: str, capture_id: str) -> bytes:
    return MAGIC + SUITE.encrypt(plaintext, public_key, info=_info(device_id, capture_id))


def open_sealed(
    sealed: bytes, private_key: X25519PrivateKey, device_id: str, capture_id: str
) -> bytes:
    if len(sealed) < _MIN_SIZE or not sealed.startswith(MAGIC):
        raise SealError(f"capture {capture_id}: not a sealed capture (bad header or too short)")
    try:
        return SUITE.decrypt(sealed[len(MAGIC):], private_key, info=_info(device_id, capture_id))
    except InvalidTag:
        raise SealError(
            f"capture {capture_id}: does not open: tampered, or sealed for another key or id"
        ) from None


def generate_keypair() -> tuple[X25519PrivateKey, X25519PublicKey]:
    private = X25519PrivateKey.generate()
    return private, private.public_key()


def public_key_pem(key: X25519PublicKey) -> bytes:
    return keyfiles.public_pem(key)


def private_key_pem(key: X25519PrivateKey) -> bytes:
    return keyfiles.private_pem(key)


def load_public_key(path: Path) -> X25519PublicKey:
    return keyfiles.load_public(path, X25519PublicKey, "the clinic key")


def load_private_key(path: Path) -> X25519PrivateKey:
    return keyfiles.load_private(path, X25519PrivateKey, "the clinic key")
