"""The outbox as the uplink reads and clears it: one read of a large entry (its hash is
checked as the chunks go out, tests/test_transfer.py), and a delivered entry's removal that
waits neither for a directory fsync nor for a thread to start."""

from __future__ import annotations

import hashlib
import threading
import time
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


def test_delivered_entries_are_freed_by_one_thread_that_ends_when_idle(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One thread frees the files of delivered entries, however many there are: a thread
    started per removal made the next transfer wait until it was scheduled. It ends once
    idle, and the next removal starts it again."""
    from device_agent.uplink import outbox as outbox_module

    release = threading.Event()
    real_unlink = outbox_module._unlink

    def slow_unlink(path: Path, capture_id: str) -> None:
        assert release.wait(10)
        real_unlink(path, capture_id)

    monkeypatch.setattr(outbox_module, "_unlink", slow_unlink)
    monkeypatch.setattr(outbox_module, "_UNLINKER_IDLE_S", 0.05, raising=False)
    others = set(threading.enumerate())  # other tests' outboxes may still have theirs

    def unlinkers() -> list[threading.Thread]:
        return [t for t in threading.enumerate()
                if t.name == "outbox-unlink" and t not in others]

    box = Outbox(tmp_path, 10**6)
    entries = [box.put(f"cap-{n}", b"x" * 100) for n in range(6)]
    for entry in entries:
        box.remove(entry.capture_id, durable=False)
    assert box.pending() == []  # gone from the queue at once
    assert not box.settle(0.05)  # the files are still there, waiting for the one thread
    assert len(unlinkers()) == 1
    release.set()
    assert box.settle(10)
    assert not any(e.path.exists() for e in entries)
    deadline = time.monotonic() + 10
    while unlinkers():
        assert time.monotonic() < deadline, "the idle unlinking thread did not end"
        time.sleep(0.01)
    later = box.put("cap-later", b"y")
    box.remove("cap-later", durable=False)
    assert box.settle(10)
    assert not later.path.exists()
