"""The bundle format: one capture's metadata and image, strict on anything malformed."""

from __future__ import annotations

import struct

import pytest

from device_agent.uplink.bundle import BundleError, pack, unpack


def test_round_trip_keeps_metadata_and_image_bytes() -> None:
    meta = {"capture_id": "c1", "quality": {"focus": 0.9}, "note": "é"}
    image = bytes(range(256)) * 10
    assert unpack(pack(meta, image)) == (meta, image)


def test_empty_image_and_metadata_round_trip() -> None:
    assert unpack(pack({}, b"")) == ({}, b"")


@pytest.mark.parametrize(
    "mangle",
    [
        lambda b: b[:3],  # shorter than the header
        lambda b: b"XXXX" + b[4:],  # bad magic
        lambda b: b[:4] + b"\x02" + b[5:],  # unknown version
        lambda b: b[:-1],  # truncated image
        lambda b: b + b"\x00",  # trailing garbage
        lambda b: b[:5] + struct.pack(">I", 2**31) + b[9:],  # absurd metadata length
    ],
    ids=["short", "magic", "version", "truncated", "trailing", "meta-length"],
)
def test_malformed_bundles_raise_bundle_error(mangle) -> None:
    with pytest.raises(BundleError):
        unpack(mangle(pack({"a": 1}, b"image-bytes")))


def test_metadata_must_be_a_json_object() -> None:
    body = b"[1,2]"
    data = b"DRMB\x01" + struct.pack(">I", len(body)) + body + struct.pack(">Q", 0)
    with pytest.raises(BundleError, match="object"):
        unpack(data)


def test_unserialisable_metadata_is_refused_at_pack() -> None:
    with pytest.raises(BundleError):
        pack({"x": object()}, b"")
    with pytest.raises(BundleError):
        pack({"x": float("nan")}, b"")
