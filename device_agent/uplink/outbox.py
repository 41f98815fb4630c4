"""Durable store-and-forward outbox: one file per capture, crash-safe at every instant.

An accepted capture is promised to the clinician, so it must survive a crash at any moment,
a power cut, a reboot and a broker outage of days. Each entry is written to a temp file,
fsynced, renamed into place and the directory fsynced; a crash therefore leaves either a
complete entry or a stray temp file (removed at the next start, it was never reported
written). Every entry carries its own length and SHA-256 so a torn or bit-rotten file is
detected on read, moved to ``quarantine/`` and reported, and never blocks the entries behind
it. An entry leaves only through :meth:`Outbox.remove`, which the uplink calls after the
gateway's application-level acknowledgement.

On-disk layout under ``root``::

    <seq:012d>.<capture_id>.entry   the entries; seq gives FIFO order across restarts
    tmp/                            writes in progress (cleared at start)
    groups/<capture_id>.group       a group (the two images of a pair) being committed
    announced/<capture_id>          the agent has told the clinician (capture.accepted)
    quarantine/                     corrupt entries and captures the gateway rejected

A group is all or nothing: its entries are written to ``tmp/``, then a journal naming them
is made durable, then they are renamed into place and the journal removed. A journal found
at start means a crash during the renames: if any of its entries is missing, the others are
removed too (the clinician was never told; half a pair never reaches the clinic).

An entry without an ``announced/`` marker at start was stored but the crash came before the
agent said "accepted": the agent announces it then (``recovered``), so the device's count of
accepted captures and the clinic's agree.

Entry file format (all integers big-endian)::

    magic     4  b"DOB1"
    created   8  float64, wall-clock UTC epoch seconds of the put
    size      8  u64, payload length
    sha256   32  SHA-256 of the payload
    id_len    2  u16, length of the UTF-8 capture id
    id        id_len
    payload   size
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
import struct
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from dermascope_wire import threads
from dermascope_wire.durable import fsync_dir, write_atomic
from dermascope_wire.logs import log_event

log = logging.getLogger(__name__)

MAGIC = b"DOB1"
_HEAD = struct.Struct(">4sdQ32sH")
_SUFFIX = ".entry"
_NAME_RE = re.compile(r"^(\d{12})\.(.+)\.entry\Z")
#: Capture ids travel in topic names and file names: no "/", "+", "#", no leading dot.
CAPTURE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}\Z")


class StorageFull(OSError):
    """A new capture was refused: the outbox quota (or the disk) is full. Nothing was dropped."""


class CorruptEntry(ValueError):
    """An outbox entry failed its integrity check and was moved to quarantine."""


@dataclass(frozen=True)
class OutboxEntry:
    """One pending capture. ``size`` is the payload length; ``created`` a UTC epoch."""

    capture_id: str
    path: Path
    size: int
    created: float


def validate_capture_id(capture_id: str) -> str:
    if not isinstance(capture_id, str) or not CAPTURE_ID_RE.match(capture_id):
        raise ValueError(
            f"capture id {capture_id!r}: expected 1-128 characters of A-Z a-z 0-9 _ . -, "
            "starting with a letter or digit"
        )
    return capture_id


class Outbox:
    """FIFO of captures on disk, bounded by ``quota_bytes`` (file sizes, headers included).

    The quota counts pending entries only; quarantined ones wait for a technician outside it
    (a truly full disk still surfaces as StorageFull). Thread-safe: the agent puts from its
    capture thread while the uplink reads and removes.
    """

    def __init__(self, root: Path, quota_bytes: int) -> None:
        if quota_bytes <= 0:
            raise ValueError(f"quota_bytes must be positive (got {quota_bytes})")
        self.root = Path(root)
        self.quota_bytes = int(quota_bytes)
        self._tmp = self.root / "tmp"
        self._groups = self.root / "groups"
        self._announced = self.root / "announced"
        self._quarantine = self.root / "quarantine"
        self._lock = threading.RLock()
        self._entries: dict[str, OutboxEntry] = {}
        self._seq: dict[str, int] = {}
        self._disk: dict[str, int] = {}
        # Stored but not yet announced, and held back from delivery (see put's ``hold``).
        self._unannounced: set[str] = set()
        self._held: set[str] = set()
        self._next_seq = 1
        # Files of delivered entries still to be freed (``remove``), by one thread that
        # lives while there is work: a thread started per removal waits to be scheduled
        # in Thread.start, which on a busy device held up the next transfer by milliseconds.
        self._to_unlink: list[tuple[Path, str]] = []
        self._unlinked = threading.Condition(self._lock)
        self._unlinker: threading.Thread | None = None
        for d in (self.root, self._tmp, self._groups, self._announced, self._quarantine):
            d.mkdir(parents=True, exist_ok=True)
        self._recover()

    # ----------------------------------------------------------------------------- start

    def _recover(self) -> None:
        # A temp file is a write that never returned: the capture was never reported written.
        for stray in self._tmp.iterdir():
            stray.unlink(missing_ok=True)
        for journal in sorted(self._groups.iterdir()):
            self._finish_group(journal)
        found: list[tuple[int, str, Path]] = []
        for path in self.root.iterdir():
            m = _NAME_RE.match(path.name)
            if not m or not path.is_file():
                continue
            found.append((int(m.group(1)), m.group(2), path))
        found.sort()
        for seq, capture_id, path in found:
            self._next_seq = max(self._next_seq, seq + 1)
            try:
                entry = self._read_header(path, capture_id)
            except CorruptEntry as err:
                self._move_to_quarantine(path, capture_id, str(err))
                continue
            if capture_id in self._entries:
                # Only possible if two puts raced across a crash; the older one wins.
                self._move_to_quarantine(path, capture_id, "duplicate capture id")
                continue
            self._register(entry, seq, path.stat().st_size)
        for marker in self._announced.iterdir():
            if marker.name not in self._entries:
                marker.unlink(missing_ok=True)  # its entry left; the removal was cut short
        self._unannounced = {c for c in self._entries
                             if not (self._announced / c).exists()}

    def _finish_group(self, journal: Path) -> None:
        """A crash came while a group's entries were renamed into place: keep the group if
        every entry made it, else remove the ones that did."""
        try:
            names = json.loads(journal.read_text(encoding="utf-8"))["entries"]
            paths = [self.root / name for name in names if _NAME_RE.match(name)]
        except (OSError, ValueError, KeyError, TypeError) as err:
            # Unreadable journal: written before any rename (write_atomic), so nothing of
            # its group was renamed into place.
            log_event(log, "outbox.group_journal_unreadable", level=logging.WARNING,
                      journal=journal.name, error=str(err))
            paths = []
        else:
            if len(paths) != len(names):
                paths = []
        present = [p for p in paths if p.exists()]
        if paths and len(present) < len(paths):
            for path in present:
                path.unlink(missing_ok=True)
            log_event(log, "outbox.partial_group_discarded", level=logging.WARNING,
                      group=journal.stem, stored=len(present), expected=len(paths))
        journal.unlink(missing_ok=True)
        fsync_dir(self.root)
        fsync_dir(self._groups)

    def _register(self, entry: OutboxEntry, seq: int, disk_size: int) -> None:
        self._entries[entry.capture_id] = entry
        self._seq[entry.capture_id] = seq
        self._disk[entry.capture_id] = disk_size

    @staticmethod
    def _read_header(path: Path, capture_id: str) -> OutboxEntry:
        try:
            with path.open("rb") as f:
                head = f.read(_HEAD.size)
                if len(head) < _HEAD.size:
                    raise CorruptEntry(f"{path.name}: truncated header")
                magic, created, size, _digest, id_len = _HEAD.unpack(head)
                raw_id = f.read(id_len)
            total = path.stat().st_size
        except OSError as err:
            raise CorruptEntry(f"{path.name}: unreadable: {err.strerror}") from None
        if magic != MAGIC:
            raise CorruptEntry(f"{path.name}: bad magic")
        if raw_id != capture_id.encode():
            raise CorruptEntry(f"{path.name}: capture id does not match the file name")
        if total != _HEAD.size + id_len + size:
            expected = _HEAD.size + id_len + size
            raise CorruptEntry(f"{path.name}: length {total} != header's {expected}")
        return OutboxEntry(capture_id, path, size, created)

    # ----------------------------------------------------------------------------- API

    def put(self, capture_id: str, payload: bytes, *, announced: bool = False) -> OutboxEntry:
        """Store one capture durably; return only once it survives a crash.

        Idempotent: a capture id already pending returns the stored entry unchanged.
        Raises StorageFull when the quota or the disk is full (old entries are kept).
        ``announced``: nobody is to be told about it later (e.g. a self-test picture).
        """
        return self.put_group([(capture_id, payload)], announced=announced)[0]

    def put_group(self, items: Sequence[tuple[str, bytes]], *, announced: bool = False,
                  hold: bool = False) -> list[OutboxEntry]:
        """Store several captures (the images of a pair) as one: after a crash at any
        instant, either all of them are in the outbox or none is.

        ``hold``: keep them out of :meth:`deliverable` (so out of delivery) until
        :meth:`release`, or take them back with :meth:`withdraw`; the agent holds a press's
        capture while the press may still turn out to be half a double press.
        """
        if not items:
            raise ValueError("put_group needs at least one capture")
        ids = [validate_capture_id(capture_id) for capture_id, _ in items]
        if len(set(ids)) != len(ids):
            raise ValueError(f"capture ids of a group must differ (got {ids})")
        with self._lock:
            existing = [self._entries.get(capture_id) for capture_id in ids]
            if all(e is not None for e in existing):
                return [e for e in existing if e is not None]
            if any(e is not None for e in existing):
                raise ValueError(f"some of {ids} are stored already, some not")
            heads = [self._header(capture_id, payload) for capture_id, payload in items]
            needed = sum(len(head) + len(payload) for head, (_, payload) in zip(heads, items,
                                                                                 strict=True))
            used = sum(self._disk.values())
            if used + needed > self.quota_bytes:
                log_event(log, "outbox.full", level=logging.WARNING, capture_id=ids[0],
                          used_bytes=used, quota_bytes=self.quota_bytes, needed_bytes=needed)
                raise StorageFull(errno.ENOSPC, f"outbox quota reached ({used} of "
                                  f"{self.quota_bytes} bytes used, {needed} needed)")
            finals = [self.root / f"{self._next_seq + i:012d}.{capture_id}{_SUFFIX}"
                      for i, capture_id in enumerate(ids)]
            journal = self._groups / f"{ids[0]}.group" if len(ids) > 1 else None
            try:
                self._write_group(heads, [p for _, p in items], finals, journal)
            except OSError as err:
                if err.errno in (errno.ENOSPC, errno.EDQUOT):
                    log_event(log, "outbox.full", level=logging.WARNING, capture_id=ids[0],
                              error=err.strerror)
                    raise StorageFull(err.errno, f"disk full: {err.strerror}") from None
                raise
            entries = []
            for head, final, (capture_id, payload) in zip(heads, finals, items, strict=True):
                entry = OutboxEntry(capture_id, final, len(payload), _HEAD.unpack_from(head)[1])
                self._register(entry, self._next_seq, len(head) + len(payload))
                self._next_seq += 1
                entries.append(entry)
            if announced:
                self._mark(ids)
            else:
                self._unannounced.update(ids)
            if hold:
                self._held.update(ids)
            return entries

    @staticmethod
    def _header(capture_id: str, payload: bytes) -> bytes:
        raw_id = capture_id.encode()
        return _HEAD.pack(MAGIC, time.time(), len(payload), hashlib.sha256(payload).digest(),
                          len(raw_id)) + raw_id

    def _write_group(self, heads: list[bytes], payloads: list[bytes], finals: list[Path],
                     journal: Path | None) -> None:
        """Temp files (fsynced), then the journal, then the renames, then no journal."""
        tmps = [self._tmp / (final.name + ".tmp") for final in finals]
        try:
            for head, payload, tmp in zip(heads, payloads, tmps, strict=True):
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                try:
                    view = memoryview(head + payload)
                    while view:
                        view = view[os.write(fd, view):]
                    os.fsync(fd)
                finally:
                    os.close(fd)
            if journal is not None:
                write_atomic(journal, json.dumps({"entries": [f.name for f in finals]})
                             .encode())
            for tmp, final in zip(tmps, finals, strict=True):
                os.rename(tmp, final)
            fsync_dir(self.root)
        except OSError:
            for tmp in tmps:
                tmp.unlink(missing_ok=True)
            if journal is not None and journal.exists():
                # Some renames may have happened: undo them the way recovery would.
                self._finish_group(journal)
            raise
        if journal is not None:
            journal.unlink()
            fsync_dir(self._groups)

    # -- announcement and holding ---------------------------------------------------------

    def _mark(self, capture_ids: Iterable[str]) -> None:
        for capture_id in capture_ids:
            (self._announced / capture_id).touch()
            self._unannounced.discard(capture_id)
        fsync_dir(self._announced)

    def mark_announced(self, capture_ids: Iterable[str]) -> None:
        """The clinician was told: a restart must not announce these again."""
        with self._lock:
            self._mark([c for c in capture_ids if c in self._entries])

    def unannounced(self) -> list[OutboxEntry]:
        """Entries stored but never announced (a crash came in between), oldest first."""
        with self._lock:
            return [e for e in self._sorted() if e.capture_id in self._unannounced]

    def release(self, capture_ids: Iterable[str]) -> None:
        """Held entries may now be delivered."""
        with self._lock:
            self._held.difference_update(capture_ids)

    def withdraw(self, capture_ids: Iterable[str]) -> None:
        """Take held entries back (never delivered, never announced)."""
        with self._lock:
            for capture_id in capture_ids:
                if capture_id in self._held:
                    self.remove(capture_id)

    def has_room(self, size: int) -> bool:
        """Would a capture of ``size`` bytes fit now, in the quota and on the disk?"""
        with self._lock:
            if sum(self._disk.values()) + size > self.quota_bytes:
                return False
        try:
            return shutil.disk_usage(self.root).free >= size
        except OSError:
            return False

    def pending(self) -> list[OutboxEntry]:
        """Every stored entry, oldest first."""
        with self._lock:
            return self._sorted()

    def deliverable(self) -> list[OutboxEntry]:
        """The entries the uplink may send now, oldest first: not the held ones."""
        with self._lock:
            return [e for e in self._sorted() if e.capture_id not in self._held]

    def has_deliverable(self) -> bool:
        with self._lock:
            return len(self._entries) > len(self._held)

    def _sorted(self) -> list[OutboxEntry]:
        return sorted(self._entries.values(), key=lambda e: self._seq[e.capture_id])

    def get(self, capture_id: str) -> OutboxEntry | None:
        with self._lock:
            return self._entries.get(capture_id)

    def read(self, entry: OutboxEntry) -> bytes:
        """Return the payload after checking length and SHA-256.

        A corrupt entry is quarantined (event ``outbox.quarantined``) and CorruptEntry raised;
        FileNotFoundError if the entry was removed meanwhile.
        """
        return self.read_verified(entry)[0]

    def read_verified(self, entry: OutboxEntry) -> tuple[bytes, bytes]:
        """Like :meth:`read`, and also the payload's (just verified) SHA-256 digest, so the
        uplink need not hash a large capture a second time."""
        data, start, digest = self._read_checked(entry, hashed=True)
        return data[start:], digest

    def read_for_sending(self, entry: OutboxEntry) -> tuple[memoryview, bytes]:
        """The payload (a view: no copy) and the SHA-256 its header recorded, with the
        header and the length checked but not the hash: the uplink checks the hash as the
        chunks go out (``transfer.Transfer.chunk``), one pass over a large capture instead
        of two. A bad header quarantines the entry and raises CorruptEntry, as ``read``."""
        data, start, digest = self._read_checked(entry, hashed=False)
        return memoryview(data)[start:], digest

    def _read_checked(self, entry: OutboxEntry, hashed: bool) -> tuple[bytes, int, bytes]:
        """The entry's bytes, where its payload starts and its recorded SHA-256, checked
        (the hash too if ``hashed``); a bad entry is quarantined and raises CorruptEntry."""
        try:
            data = entry.path.read_bytes()
        except FileNotFoundError:
            raise
        except OSError as err:
            self._quarantine_entry(entry.capture_id, f"unreadable: {err.strerror}")
            raise CorruptEntry(f"{entry.capture_id}: unreadable: {err.strerror}") from None
        problem = self._check(data, entry.capture_id, hashed=hashed)
        if problem:
            self._quarantine_entry(entry.capture_id, problem)
            raise CorruptEntry(f"{entry.capture_id}: {problem}")
        _magic, _created, _size, digest, id_len = _HEAD.unpack_from(data)
        return data, _HEAD.size + id_len, digest

    @staticmethod
    def _check(data: bytes, capture_id: str, hashed: bool = True) -> str | None:
        if len(data) < _HEAD.size:
            return "truncated header"
        magic, _created, size, digest, id_len = _HEAD.unpack_from(data)
        if magic != MAGIC:
            return "bad magic"
        if data[_HEAD.size:_HEAD.size + id_len] != capture_id.encode():
            return "capture id mismatch"
        payload = memoryview(data)[_HEAD.size + id_len:]
        if len(payload) != size:
            return f"payload length {len(payload)} != {size}"
        if hashed and hashlib.sha256(payload).digest() != digest:
            return "sha256 mismatch"
        return None

    def remove(self, capture_id: str, *, durable: bool = True) -> None:
        """Delete an entry (durably unless told otherwise). Unknown ids are ignored
        (idempotent).

        ``durable=False``, for a capture the gateway committed: gone from the queue at once,
        its file unlinked on a thread of its own (freeing a large file's blocks takes
        milliseconds the next transfer need not wait for) and no directory fsync; the next
        entry stored (its fsync of this same directory) makes the removal durable. A crash
        before that brings the entry back, it is sent again and the gateway answers
        ``committed`` from its ledger (``settle`` waits for the unlinks)."""
        with self._lock:
            entry = self._forget(capture_id)
            if entry is None:
                return
            (self._announced / capture_id).unlink(missing_ok=True)
            if durable:
                entry.path.unlink(missing_ok=True)
                fsync_dir(self.root)
                return
            self._to_unlink.append((entry.path, capture_id))
            if self._unlinker is None or not self._unlinker.is_alive():
                self._unlinker = threads.start("outbox-unlink", self._unlink_loop, log)
            self._unlinked.notify_all()

    def _unlink_loop(self) -> None:
        """Free the files of delivered entries; ends after a while with nothing to do
        (``remove`` starts it again), so an idle outbox holds no thread."""
        while True:
            with self._lock:
                if not self._unlinked.wait_for(lambda: self._to_unlink, _UNLINKER_IDLE_S):
                    self._unlinker = None
                    return
                path, capture_id = self._to_unlink[0]
            _unlink(path, capture_id)
            with self._lock:
                self._to_unlink.pop(0)
                self._unlinked.notify_all()

    def settle(self, timeout: float) -> bool:
        """Wait (bounded) until the files of removed entries are unlinked; False if some
        still are not after ``timeout`` seconds."""
        with self._lock:
            return self._unlinked.wait_for(lambda: not self._to_unlink, timeout)

    def _forget(self, capture_id: str) -> OutboxEntry | None:
        self._seq.pop(capture_id, None)
        self._disk.pop(capture_id, None)
        self._unannounced.discard(capture_id)
        self._held.discard(capture_id)
        return self._entries.pop(capture_id, None)

    def quarantine(self, capture_id: str, reason: str) -> None:
        """Move an entry aside (kept on disk, out of the queue), e.g. rejected by the gateway."""
        self._quarantine_entry(capture_id, reason)

    def depth(self) -> int:
        with self._lock:
            return len(self._entries)

    def used_bytes(self) -> int:
        with self._lock:
            return sum(self._disk.values())

    def oldest_created(self) -> float | None:
        """Wall-clock time of the oldest pending entry (for the heartbeat's age figure)."""
        with self._lock:
            return min((e.created for e in self._entries.values()), default=None)

    def quarantined(self) -> list[Path]:
        return sorted(p for p in self._quarantine.iterdir() if p.is_file())

    # ----------------------------------------------------------------------------- quarantine

    def _quarantine_entry(self, capture_id: str, reason: str) -> None:
        with self._lock:
            entry = self._forget(capture_id)
            if entry is not None:
                self._move_to_quarantine(entry.path, capture_id, reason)
                (self._announced / capture_id).unlink(missing_ok=True)

    def _move_to_quarantine(self, path: Path, capture_id: str, reason: str) -> None:
        target = self._quarantine / path.name
        n = 1
        while target.exists():
            target = self._quarantine / f"{path.name}.{n}"
            n += 1
        try:
            os.rename(path, target)
            fsync_dir(self.root)
            fsync_dir(self._quarantine)
        except OSError as err:
            # Cannot move it: leave it where it is; it is already out of the queue in memory.
            log_event(log, "outbox.quarantine_failed", level=logging.ERROR,
                      capture_id=capture_id, reason=reason, error=err.strerror)
            return
        log_event(log, "outbox.quarantined", level=logging.ERROR, capture_id=capture_id,
                  reason=reason, path=str(target))


#: How long the unlinking thread waits for more work before it ends.
_UNLINKER_IDLE_S = 10.0


def _unlink(path: Path, capture_id: str) -> None:
    """A delivered entry's file goes (``Outbox.remove``); one that stays is sent again."""
    try:
        path.unlink(missing_ok=True)
    except OSError as err:
        # Its capture is delivered: a leftover file is only delivered again (the gateway
        # answers "committed") after the next start.
        log_event(log, "outbox.unlink_failed", level=logging.WARNING, capture_id=capture_id,
                  error=err.strerror)
