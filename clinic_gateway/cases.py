"""The gateway's case registry: which case the clinic opened on which device, and when
(docs/security.md, "Cases").

A device files a capture under whatever case token its metadata claims; the gateway files
it there only if the clinic opened that case on that very device and the capture was taken
while it was open (``was_open``). The registry is what the gateway itself sent: it records
every ``open_case`` and ``close_case`` it publishes (``Gateway.open_case``/``close_case``).

The token never lies on disk in clear here: cases are known by ``ref(token)``, an
HMAC-SHA256 under a random key kept beside the registry (``.gateway/case-key``, mode 0600).
A plain hash would not do: clinic case numbers such as ``TD-2026-000123`` are few enough to
hash them all and look them up. The same reference names a case in the audit log and in log
events, so they can be matched against each other without the token.

Layout: ``<store>/.gateway/cases/<device>.jsonl``, append-only JSON lines (mode 0640), each
``{"op": "open"|"close", "case": ref, "at": unix time, "ends": unix time|null, "site": ...}``.
A device holds one case at a time, so an ``open`` also ends the case open before it. Appends
take an exclusive ``flock`` and are fsynced: several gateway processes may share the store.
"""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import json
import os
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from dermascope_wire.durable import fsync_dir, make_dirs

#: How far a device's clock may be off the gateway's when a capture's time is compared with
#: a case's opening and end (the device's clock is NTP-synchronised; doctor checks it).
CLOCK_SKEW = 120.0
FILE_MODE = 0o640
_KEY_BYTES = 32


class CaseRegistryError(OSError):
    """The registry cannot be read or written (the message names the file). An OSError: to
    a device it is the gateway's storage trouble (ack ``retry``), not the device's fault."""


@dataclass(frozen=True)
class CaseRecord:
    """One case as the clinic opened it on a device: from ``opened_at`` until ``ends_at``
    (closed, replaced by another case, or timed out on the device; None: still open)."""

    device_id: str
    ref: str
    opened_at: float
    ends_at: float | None
    anatomic_site: str | None


class CaseRegistry:
    def __init__(self, folder: Path, skew: float = CLOCK_SKEW) -> None:
        """``folder``: ``<store>/.gateway``, shared by every gateway of the store."""
        self.folder = Path(folder)
        self.skew = skew
        self._key: bytes | None = None
        self._lock = threading.Lock()
        # Parsed files by device, with the size they had: the files only grow.
        self._cache: dict[str, tuple[int, list[CaseRecord]]] = {}

    # ------------------------------------------------------------------------------ the key

    def _secret(self) -> bytes:
        with self._lock:
            if self._key is None:
                self._key = self._load_or_make_key()
            return self._key

    def _load_or_make_key(self) -> bytes:
        path = self.folder / "case-key"
        try:
            make_dirs(self.folder)
            if not path.exists():
                # Written whole under a temporary name, then linked into place: a link never
                # replaces, so of two gateways making a key at once one wins and the other
                # reads it, never a half-written file.
                tmp = self.folder / f".case-key.{secrets.token_hex(8)}.tmp"
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "wb") as f:
                    f.write(secrets.token_bytes(_KEY_BYTES))
                    f.flush()
                    os.fsync(f.fileno())
                try:
                    os.link(tmp, path)
                except FileExistsError:
                    pass  # another gateway of the store was first: its key counts
                finally:
                    tmp.unlink()
                fsync_dir(self.folder)
            key = path.read_bytes()
        except OSError as err:
            raise CaseRegistryError(f"{path}: cannot read or make the case key: {err}") \
                from err
        if len(key) != _KEY_BYTES:
            raise CaseRegistryError(f"{path}: {len(key)} bytes, expected {_KEY_BYTES}; "
                                    "restore it from the store's backup")
        return key

    def ref(self, token: str) -> str:
        """The case's reference: what is stored, audited and logged instead of the token."""
        # surrogatepass: a hostile capture's token may hold a lone surrogate (valid JSON,
        # not UTF-8); it still gets a reference, and simply matches no case.
        data = token.encode("utf-8", "surrogatepass")
        return hmac.new(self._secret(), data, hashlib.sha256).hexdigest()[:32]

    # ------------------------------------------------------------------------------ writing

    def _path(self, device_id: str) -> Path:
        return self.folder / "cases" / f"{device_id}.jsonl"

    def _append(self, device_id: str, record: dict) -> None:
        path = self._path(device_id)
        line = json.dumps(record, sort_keys=True, separators=(",", ":")).encode() + b"\n"
        try:
            make_dirs(path.parent)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, FILE_MODE)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                os.write(fd, line)
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as err:
            raise CaseRegistryError(f"{path}: cannot record the case: {err}") from err

    def opened(self, device_id: str, token: str, anatomic_site: str | None = None,
               timeout_s: float | None = None, at: float | None = None) -> str:
        """Record that the clinic opens ``token`` on ``device_id`` now (or ``at``); the
        device closes it by itself after ``timeout_s``. Returns the case's reference."""
        ref = self.ref(token)
        now = time.time() if at is None else at
        ends = None if timeout_s is None else now + timeout_s
        self._append(device_id, {"op": "open", "case": ref, "at": now, "ends": ends,
                                 "site": anatomic_site})
        return ref

    def closed(self, device_id: str, at: float | None = None) -> str | None:
        """Record that the clinic closes the device's case now (or ``at``). Returns the
        reference of the case that was open, or None (the close is recorded anyway)."""
        now = time.time() if at is None else at
        current = self.open_case(device_id, now)
        ref = current.ref if current is not None else None
        self._append(device_id, {"op": "close", "case": ref, "at": now})
        return ref

    # ------------------------------------------------------------------------------ reading

    def cases(self, device_id: str) -> list[CaseRecord]:
        """Every case the clinic opened on ``device_id``, oldest first."""
        path = self._path(device_id)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return []
        except OSError as err:
            raise CaseRegistryError(f"{path}: cannot read the case registry: {err}") from err
        with self._lock:
            cached = self._cache.get(device_id)
            if cached is not None and cached[0] == len(data):
                return cached[1]
        records = _parse(device_id, data, path)
        with self._lock:
            self._cache[device_id] = (len(data), records)
        return records

    def open_case(self, device_id: str, at: float | None = None) -> CaseRecord | None:
        """The case open on ``device_id`` at ``at`` (now by default), or None."""
        now = time.time() if at is None else at
        for case in reversed(self.cases(device_id)):
            if case.opened_at <= now and (case.ends_at is None or now < case.ends_at):
                return case
        return None

    def was_open(self, device_id: str, token: str, captured_at: float) -> bool:
        """True if the clinic had ``token`` open on ``device_id`` at ``captured_at`` (give or
        take ``skew`` for the two clocks)."""
        ref = self.ref(token)
        return any(case.ref == ref and case.opened_at - self.skew <= captured_at
                   and (case.ends_at is None or captured_at <= case.ends_at + self.skew)
                   for case in self.cases(device_id))


def _parse(device_id: str, data: bytes, path: Path) -> list[CaseRecord]:
    """The file's lines as cases: an ``open`` ends the case before it, a ``close`` ends the
    open one. A line torn by a crash mid-append (the last, without newline) is ignored."""
    records: list[CaseRecord] = []
    lines = data.split(b"\n")
    for number, raw in enumerate(lines[:-1], start=1):
        try:
            entry = json.loads(raw)
            op, at = entry["op"], float(entry["at"])
        except (ValueError, KeyError, TypeError) as err:
            raise CaseRegistryError(f"{path}: line {number} is not a case record ({err})") \
                from None
        if records and (records[-1].ends_at is None or records[-1].ends_at > at):
            last = records[-1]
            records[-1] = CaseRecord(last.device_id, last.ref, last.opened_at, at,
                                     last.anatomic_site)
        if op == "open":
            ends = entry.get("ends")
            records.append(CaseRecord(device_id, str(entry["case"]), at,
                                      None if ends is None else float(ends), entry.get("site")))
    return records
