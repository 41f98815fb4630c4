import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from dermascope_wire.seal import (
    KeyFileError,
    SealError,
    generate_keypair,
    load_private_key,
    load_public_key,
    open_sealed,
    private_key_pem,
    public_key_pem,
    seal,
)

PLAIN = b"metadata and image bytes " * 100


def test_round_trip_through_pem_files(tmp_path):
    private, public = generate_keypair()
    (tmp_path / "clinic.pub").write_bytes(public_key_pem(public))
    (tmp_path / "clinic.key").write_bytes(private_key_pem(private))
    sealed = seal(PLAIN, load_public_key(tmp_path / "clinic.pub"), "dev1", "cap1")
    assert PLAIN[:16] not in sealed
    assert open_sealed(sealed, load_private_key(tmp_path / "clinic.key"), "dev1", "cap1") == PLAIN


def test_every_seal_is_fresh():
    _, public = generate_keypair()
    assert seal(PLAIN, public, "d", "c") != seal(PLAIN, public, "d", "c")


@pytest.mark.parametrize("where", [4, 20, 40, -1])
def test_a_flipped_bit_anywhere_is_rejected(where):
    private, public = generate_keypair()
    sealed = bytearray(seal(PLAIN, public, "d", "c"))
    sealed[where] ^= 0x01
    with pytest.raises(SealError):
        open_sealed(bytes(sealed), private, "d", "c")


def test_a_capture_replayed_under_another_id_or_device_does_not_open():
    private, public = generate_keypair()
    sealed = seal(PLAIN, public, "dev1", "cap1")
    with pytest.raises(SealError, match="another key or id"):
        open_sealed(sealed, private, "dev1", "cap2")
    with pytest.raises(SealError):
        open_sealed(sealed, private, "dev2", "cap1")


def test_another_clinic_key_does_not_open_it():
    _, public = generate_keypair()
    other, _ = generate_keypair()
    with pytest.raises(SealError):
        open_sealed(seal(PLAIN, public, "d", "c"), other, "d", "c")


def test_truncated_is_rejected():
    private, public = generate_keypair()
    with pytest.raises(SealError, match="too short"):
        open_sealed(seal(PLAIN, public, "d", "c")[:30], private, "d", "c")


def test_bad_key_files_are_named(tmp_path):
    (tmp_path / "junk.pem").write_text("hello")
    with pytest.raises(KeyFileError, match=r"junk\.pem: not a PEM public key"):
        load_public_key(tmp_path / "junk.pem")
    with pytest.raises(KeyFileError, match="cannot read key"):
        load_public_key(tmp_path / "missing.pem")
    from cryptography.hazmat.primitives import serialization

    ec_pub = ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    (tmp_path / "ec.pem").write_bytes(ec_pub)
    with pytest.raises(KeyFileError, match="must be X25519"):
        load_public_key(tmp_path / "ec.pem")
