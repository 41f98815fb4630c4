"""The durable outbox: FIFO across restarts, integrity, quarantine, quota, kill -9 safety."""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from device_agent.uplink.outbox import CorruptEntry, Outbox, StorageFull


def test_put_is_fifo_and_survives_reopen(tmp_path: Path) -> None:
    box = Outbox(tmp_path, 10**6)
    for i in range(5):
        box.put(f"cap-{i}", f"payload {i}".encode())
    again = Outbox(tmp_path, 10**6)
    assert [e.capture_id for e in again.pending()] == [f"cap-{i}" for i in range(5)]
    assert [again.read(e) for e in again.pending()] == [f"payload {i}".encode() for i in range(5)]
    assert again.depth() == 5
    assert again.used_bytes() == box.used_bytes() > 0


def test_put_is_idempotent_on_capture_id(tmp_path: Path) -> None:
    box = Outbox(tmp_path, 10**6)
    first = box.put("cap-1", b"one")
    assert box.put("cap-1", b"one") == first
    assert box.depth() == 1


def test_remove_is_durable_and_idempotent(tmp_path: Path) -> None:
    box = Outbox(tmp_path, 10**6)
    box.put("a", b"1")
    box.put("b", b"2")
    box.remove("a")
    box.remove("a")
    assert [e.capture_id for e in Outbox(tmp_path, 10**6).pending()] == ["b"]


def test_fifo_order_continues_after_restart(tmp_path: Path) -> None:
    box = Outbox(tmp_path, 10**6)
    box.put("zz-first", b"1")
    box = Outbox(tmp_path, 10**6)
    box.put("aa-second", b"2")
    assert [e.capture_id for e in box.pending()] == ["zz-first", "aa-second"]


@pytest.mark.parametrize("bad", ["", "a/b", "+", "#", ".hidden", "x" * 200, "a b"])
def test_unsafe_capture_ids_are_refused(tmp_path: Path, bad: str) -> None:
    with pytest.raises(ValueError, match="capture id"):
        Outbox(tmp_path, 10**6).put(bad, b"x")


def test_corrupt_entry_is_quarantined_and_does_not_block_the_next(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    box = Outbox(tmp_path, 10**6)
    bad = box.put("bad", b"A" * 1000)
    box.put("good", b"B" * 1000)
    raw = bytearray(bad.path.read_bytes())
    raw[-10] ^= 0xFF  # one flipped bit of payload: only the SHA-256 can tell
    bad.path.write_bytes(bytes(raw))
    with caplog.at_level(logging.INFO, logger="device_agent.uplink.outbox"), \
            pytest.raises(CorruptEntry):
        box.read(bad)
    events = [r for r in caplog.records if getattr(r, "event", "") == "outbox.quarantined"]
    assert [r.capture_id for r in events] == ["bad"]
    assert [e.capture_id for e in box.pending()] == ["good"]
    assert box.read(box.pending()[0]) == b"B" * 1000
    assert len(box.quarantined()) == 1  # kept for a technician, not deleted


def test_torn_entry_found_at_start_is_quarantined(tmp_path: Path) -> None:
    box = Outbox(tmp_path, 10**6)
    torn = box.put("torn", b"C" * 5000)
    box.put("fine", b"D")
    with torn.path.open("r+b") as f:
        f.truncate(100)
    again = Outbox(tmp_path, 10**6)
    assert [e.capture_id for e in again.pending()] == ["fine"]
    assert len(again.quarantined()) == 1


def test_stray_temp_files_are_cleared_at_start(tmp_path: Path) -> None:
    Outbox(tmp_path, 10**6)
    (tmp_path / "tmp" / "000000000001.x.entry.tmp").write_bytes(b"half")
    box = Outbox(tmp_path, 10**6)
    assert box.depth() == 0
    assert list((tmp_path / "tmp").iterdir()) == []


def test_quota_refuses_new_captures_and_keeps_old_ones(tmp_path: Path) -> None:
    box = Outbox(tmp_path, quota_bytes=3000)
    box.put("a", b"x" * 1000)
    box.put("b", b"x" * 1000)
    with pytest.raises(StorageFull):
        box.put("c", b"x" * 1000)
    assert [e.capture_id for e in box.pending()] == ["a", "b"]
    assert box.used_bytes() <= 3000
    box.remove("a")  # a delivery frees room again
    box.put("c", b"x" * 1000)
    assert [e.capture_id for e in box.pending()] == ["b", "c"]


def test_storage_full_is_an_oserror(tmp_path: Path) -> None:
    with pytest.raises(OSError, match="quota"):  # callers may treat it like ENOSPC
        Outbox(tmp_path, quota_bytes=10).put("a", b"x" * 100)


_WRITER = textwrap.dedent(
    """
    import hashlib, os, sys
    from pathlib import Path
    from device_agent.uplink.outbox import Outbox
    box = Outbox(Path(sys.argv[1]), 10**9)
    i = 0
    while True:
        payload = os.urandom(20000 + (i * 7919) % 200000)
        box.put(f"cap-{i}", payload)
        # Reported written only after put() returned: this is the durability promise.
        print(f"cap-{i} {hashlib.sha256(payload).hexdigest()}", flush=True)
        i += 1
    """
)


@pytest.mark.parametrize("kill_after", [1, 3, 7, 12])
def test_kill_9_at_any_moment_keeps_every_reported_entry_intact(
    tmp_path: Path, kill_after: int
) -> None:
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path)],
                            stdout=subprocess.PIPE, text=True, env={**os.environ})
    reported: dict[str, str] = {}
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            capture_id, sha = line.split()
            reported[capture_id] = sha
            if len(reported) >= kill_after:
                # The writer is already busy with the next put: kill it mid-write.
                os.kill(proc.pid, signal.SIGKILL)
                break
    finally:
        proc.kill()
        proc.wait(timeout=10)
        proc.stdout.close()
    box = Outbox(tmp_path, 10**9)
    stored = {e.capture_id: hashlib.sha256(box.read(e)).hexdigest() for e in box.pending()}
    for capture_id, sha in reported.items():
        assert stored[capture_id] == sha
    # At most the one put that was interrupted after its rename may be there unreported.
    assert len(set(stored) - set(reported)) <= 1
    assert box.quarantined() == []


# A pair writer that kills itself with SIGKILL right after its Nth rename: aimed exactly
# between the two entries of a pair (or after both, before the journal is gone).
_PAIR_WRITER = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    from device_agent.uplink.outbox import Outbox
    box = Outbox(Path(sys.argv[1]), 10**9)
    kill_at = int(sys.argv[2])
    renames = 0
    real_rename = os.rename
    def rename(src, dst):
        global renames
        real_rename(src, dst)
        if str(dst).endswith(".entry"):
            renames += 1
            if renames == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
    os.rename = rename
    i = 0
    while True:
        box.put_group([(f"a-{i}", os.urandom(30000)), (f"b-{i}", os.urandom(40000))])
        print(f"pair-{i}", flush=True)
        i += 1
    """
)


@pytest.mark.parametrize("kill_at", [1, 2, 3, 4, 5])
def test_kill_9_between_the_writes_of_a_pair_leaves_both_or_neither(
    tmp_path: Path, kill_at: int
) -> None:
    proc = subprocess.run([sys.executable, "-c", _PAIR_WRITER, str(tmp_path), str(kill_at)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    reported = set(proc.stdout.split())
    box = Outbox(tmp_path, 10**9)
    stored = {e.capture_id for e in box.pending()}
    pairs = {capture_id.split("-")[1] for capture_id in stored}
    for n in pairs:
        assert {f"a-{n}", f"b-{n}"} <= stored, f"half of pair {n} survived: {sorted(stored)}"
    for line in reported:
        n = line.split("-")[1]
        assert {f"a-{n}", f"b-{n}"} <= stored
    # Killed after an odd rename the interrupted pair is gone; after an even one (both
    # renamed, the journal not yet removed) it is kept whole.
    assert len(pairs) == kill_at // 2
    assert list((tmp_path / "groups").iterdir()) == []
    assert box.quarantined() == []


def test_a_failed_group_write_leaves_nothing(tmp_path: Path) -> None:
    box = Outbox(tmp_path, quota_bytes=50_000)
    box.put("old", b"o" * 1000)
    with pytest.raises(StorageFull):
        box.put_group([("a", b"a" * 20_000), ("b", b"b" * 40_000)])
    assert [e.capture_id for e in box.pending()] == ["old"]
    assert sorted(p.name for p in (tmp_path / "tmp").iterdir()) == []


def test_held_entries_wait_until_released_or_are_withdrawn(tmp_path: Path) -> None:
    box = Outbox(tmp_path, 10**9)
    box.put("first", b"1")
    box.put_group([("kept", b"k")], hold=True)
    box.put_group([("taken-back", b"t")], hold=True)
    assert [e.capture_id for e in box.deliverable()] == ["first"]
    assert [e.capture_id for e in box.pending()] == ["first", "kept", "taken-back"]
    box.release(["kept"])
    box.withdraw(["taken-back"])
    box.withdraw(["first"])  # only held entries can be withdrawn
    assert [e.capture_id for e in box.deliverable()] == ["first", "kept"]
    assert [e.capture_id for e in box.pending()] == ["first", "kept"]
    assert [e.capture_id for e in Outbox(tmp_path, 10**9).pending()] == ["first", "kept"]


def test_entries_never_announced_are_found_again_after_a_restart(tmp_path: Path) -> None:
    box = Outbox(tmp_path, 10**9)
    box.put("told", b"1")
    box.put("crashed-before-telling", b"2")
    box.put("self-test", b"3", announced=True)
    box.mark_announced(["told"])
    assert [e.capture_id for e in box.unannounced()] == ["crashed-before-telling"]
    again = Outbox(tmp_path, 10**9)
    assert [e.capture_id for e in again.unannounced()] == ["crashed-before-telling"]
    again.mark_announced(["crashed-before-telling"])
    again.remove("told")
    assert Outbox(tmp_path, 10**9).unannounced() == []
    assert sorted(p.name for p in (tmp_path / "announced").iterdir()) == [
        "crashed-before-telling", "self-test"]
