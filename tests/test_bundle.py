"""Wire formats: the bundle (one capture's metadata and image) and the transfer protocol's
messages, all strict on anything malformed."""

from __future__ import annotations

import json
import struct

import pytest

from dermascope_wire.bundle import BundleError, pack, unpack
from dermascope_wire.protocol import (
    CHUNK_HEADER_SIZE,
    Ack,
    Final,
    Manifest,
    ProtocolError,
    Topics,
    decode_bitmap,
    decode_chunk,
    encode_bitmap,
    encode_chunk,
    max_chunk_size,
    parse_ack_topic,
    parse_up_topic,
)


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


# ------------------------------------------------------------------------------ protocol


@pytest.mark.parametrize("count", [1, 7, 8, 9, 81, 65536])
def test_missing_bitmap_round_trips(count: int) -> None:
    missing = tuple(i for i in range(count) if i % 3 == 0 or i == count - 1)
    assert decode_bitmap(encode_bitmap(missing, count), count) == missing


def test_bitmap_layout_is_lsb_first() -> None:
    assert encode_bitmap([0, 9], 10) == bytes([0b00000001, 0b00000010])


def test_ack_round_trip_carries_the_missing_chunks() -> None:
    ack = Ack("c1", "incomplete", req=5, missing=(0, 3, 80), chunk_count=81)
    assert Ack.decode(ack.encode()) == ack
    done = Ack("c1", "committed", req=6, sha256="a" * 64)
    assert Ack.decode(done.encode()) == done


def test_manifest_and_final_round_trip() -> None:
    m = Manifest("c-1", 100_000, 4096, 25, "0" * 64, "application/x", 3)
    assert Manifest.decode(m.encode()) == m
    f = Final("c-1", "0" * 64, 25, 4)
    assert Final.decode(f.encode()) == f


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"v": 2}, "unsupported_version"),
        ({"type": "final"}, "bad_message"),
        ({"chunk_count": 24}, "bad_message"),
        ({"size": -1}, "bad_message"),
        ({"sha256": "XYZ"}, "bad_message"),
        ({"capture_id": "a/b"}, "bad_message"),
        ({"chunk_size": True}, "bad_message"),
    ],
)
def test_bad_manifests_name_the_reason(change: dict, reason: str) -> None:
    obj = json.loads(Manifest("c-1", 100_000, 4096, 25, "0" * 64, "x", 3).encode())
    obj.update(change)
    with pytest.raises(ProtocolError) as err:
        Manifest.decode(json.dumps(obj).encode())
    assert err.value.reason == reason


def test_chunk_round_trip_and_crc() -> None:
    sha = bytes(range(32))
    wire = encode_chunk(sha, 4096, 7, b"data" * 10)
    chunk = decode_chunk(wire)
    assert (chunk.sha256, chunk.chunk_size, chunk.index, chunk.data) == (sha, 4096, 7,
                                                                         b"data" * 10)
    flipped = bytearray(wire)
    flipped[CHUNK_HEADER_SIZE] ^= 1
    with pytest.raises(ProtocolError, match="CRC"):
        decode_chunk(bytes(flipped))
    with pytest.raises(ProtocolError):
        decode_chunk(wire[:-1])
    with pytest.raises(ProtocolError):
        decode_chunk(b"XXXX" + wire[4:])


def test_chunk_size_is_capped_by_the_brokers_packet_size() -> None:
    assert max_chunk_size(65536, None, 40) == 65536
    capped = max_chunk_size(65536, 65536, 40)
    assert capped + CHUNK_HEADER_SIZE + 40 < 65536
    with pytest.raises(ProtocolError):
        max_chunk_size(65536, 600, 40)


def test_topics_carry_only_device_and_capture_ids() -> None:
    t = Topics("derm/v1", "dev-1")
    assert t.up("cap-1", "chunk") == "derm/v1/dev-1/up/cap-1/chunk"
    assert parse_up_topic("derm/v1", t.up("cap-1", "final")) == ("dev-1", "cap-1", "final")
    assert parse_ack_topic("derm/v1", "dev-1", t.ack("cap-1")) == "cap-1"
    for bad in ("derm/v1/dev-1/up/cap-1", "derm/v1/dev-1/up/cap-1/other", "x/dev/up/c/chunk"):
        with pytest.raises(ProtocolError):
            parse_up_topic("derm/v1", bad)


def test_deeply_nested_metadata_is_a_bundle_error_not_a_crash() -> None:
    from dermascope_wire.bundle import _HEAD, _IMAGE_LEN, MAGIC, VERSION

    meta = b"[" * 5000 + b"]" * 5000  # deeper than any JSON parser recurses
    forged = _HEAD.pack(MAGIC, VERSION, len(meta)) + meta + _IMAGE_LEN.pack(3) + b"img"
    with pytest.raises(BundleError, match="metadata"):
        unpack(forged)
