"""The outbox as the uplink reads and clears it: one read of a large entry (its hash is
checked as the chunks go out, tests/test_transfer.py), and a delivered entry's removal that
does not wait for a directory fsync."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from device_agent.uplink.outbox import CorruptEntry, Outbox


def test_read_for_sending_gives_the_payload_and_its_recorded_sha256(tmp_path: Path) -> None:
    box = Outbox(tmp_path, 10**6)
    payload = bytes(range(256)) * 100
    entry = box.put("cap-1", payload)
    data, digest = box.read_for_sending(entry)
    assert bytes(data) == payload
    assert digest == hashlib.sha256(payload).digest()


def test_read_for_sending_leaves_the_hash_to_the_sender_but_checks_the_header(
        tmp_path: Path) -> None:
    box = Outbox(tmp_path, 10**6)
    flipped = box.put("cap-1", b"a" * 1000)
    raw = bytearray(flipped.path.read_bytes())
    raw[-1] ^= 1
    flipped.path.write_bytes(bytes(raw))
    data, digest = box.read_for_sending(flipped)  # the sender's in-order pass catches it
    assert hashlib.sha256(data).digest() != digest
    short = box.put("cap-2", b"b" * 1000)
    short.path.write_bytes(short.path.read_bytes()[:-10])
    with pytest.raises(CorruptEntry, match="length"):
        box.read_for_sending(short)
    assert [p.name.split(".")[1] for p in box.quarantined()] == ["cap-2"]
    assert [e.capture_id for e in box.pending()] == ["cap-1"]


def test_a_delivered_entry_is_removed_without_waiting_for_durability(tmp_path: Path) -> None:
    box = Outbox(tmp_path, 10**6)
    entry = box.put("cap-1", b"1")
    box.put("cap-2", b"2")
    box.remove("cap-1", durable=False)
    assert [e.capture_id for e in box.pending()] == ["cap-2"]  # at once
    assert box.settle(10)
    assert not entry.path.exists()
    box.put("cap-3", b"3")  # its directory fsync makes the removal durable too
    assert [e.capture_id for e in Outbox(tmp_path, 10**6).pending()] == ["cap-2", "cap-3"]
