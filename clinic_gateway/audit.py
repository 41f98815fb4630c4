"""The gateway's audit log: append-only, hash-chained JSON lines (docs/security.md, "The
audit log").

``<store>/.gateway/audit.jsonl``, one JSON object per line, keys sorted, no spaces::

    {"at":"2026-12-01T15:30:00.123Z","event":"ack.sent","prev":"<64 hex>","seq":7,...}

``seq`` counts lines from 1; ``prev`` is the SHA-256 (hex) of the previous line's bytes
(without its newline), and ``GENESIS`` (64 zeros) on the first line. Changing a line breaks
the next line's ``prev``; removing, inserting or moving lines breaks ``seq``: ``verify``
names the first line that does not hold. The last line has no successor to vouch for it,
so every append also logs ``audit.appended`` with its ``seq`` and SHA-256 to the gateway's
JSON log (journald, another system): that anchors the head.

Appends are durable (fsync before returning) and safe with several gateway processes
sharing a store: an exclusive ``flock`` on the file covers reading the last line and
appending the new one. A line torn by a crash mid-append (no newline at the end) was never
acknowledged as written; the next append cuts it off and records that it did, with the
torn bytes' SHA-256 and length, so the chain goes on intact.

Never put patient data in a line: the case token appears only as a keyed hash (see
clinic_gateway/cases.py, ``CaseRegistry.ref``).

Verify: ``clinic-gateway audit verify STORE`` (exit 0 intact, 1 with ``line N: ...``).
Revocations (clinic IT's tool): ``record_revocation`` or ``clinic-gateway audit revoked
STORE --device ID --serial HEX [--reason TEXT]``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import fcntl
import hashlib
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dermascope_wire.durable import make_dirs
from dermascope_wire.logs import log_event

log = logging.getLogger("clinic_gateway.audit")

GENESIS = "0" * 64
FILE_MODE = 0o640
#: Longest string value kept in a line (identifiers and reasons are far shorter).
MAX_TEXT = 200
#: How far back an append looks for the last line (lines are a few hundred bytes).
_MAX_LINE = 64 * 1024
_SCALARS = (str, int, float, bool, type(None))


class AuditError(RuntimeError):
    """The audit log cannot be appended to (unreadable last line, disk trouble)."""


@dataclass(frozen=True)
class Appended:
    """One line as written: its sequence number and SHA-256 (the next line's ``prev``)."""

    seq: int
    sha256: str


@dataclass(frozen=True)
class Verdict:
    """What ``verify`` found: ``ok``, the number of lines, the head's SHA-256, and the first
    line that does not hold (1-based, 0 when ok) with what is wrong with it."""

    ok: bool
    lines: int
    head: str
    bad_line: int = 0
    problem: str = ""

    def describe(self) -> str:
        if self.ok:
            return f"intact: {self.lines} lines, head {self.head}"
        return f"line {self.bad_line}: {self.problem}"


def audit_path(store_dir: Path) -> Path:
    """Where the gateway storing into ``store_dir`` keeps its audit log."""
    return Path(store_dir) / ".gateway" / "audit.jsonl"


def _clean(value: Any) -> Any:
    """A JSON value fit for a line: scalars (long strings cut) and lists of them."""
    if isinstance(value, str):
        return value[:MAX_TEXT]
    if isinstance(value, _SCALARS):
        return value
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value[:32]]
    return repr(value)[:MAX_TEXT]


def _line(record: dict[str, Any]) -> bytes:
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False).encode("ascii")


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class AuditLog:
    """Appends events to one audit file; any number of instances and processes at once."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def append(self, event: str, **fields: Any) -> Appended:
        """Write one line durably and return it; AuditError if it cannot be written."""
        record = {k: _clean(v) for k, v in fields.items()}
        try:
            make_dirs(self.path.parent)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, FILE_MODE)
        except OSError as err:
            raise AuditError(f"{self.path}: cannot open the audit log: {err}") from err
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # released by close, even on an error
            seq, prev = self._tail(fd)
            entry = {**record, "at": _now(), "event": event, "prev": prev, "seq": seq + 1}
            line = _line(entry)
            os.write(fd, line + b"\n")
            os.fsync(fd)
        except OSError as err:
            raise AuditError(f"{self.path}: cannot append to the audit log: {err}") from err
        finally:
            os.close(fd)
        done = Appended(seq + 1, hashlib.sha256(line).hexdigest())
        log_event(log, "audit.appended", audit_event=event, seq=done.seq, sha256=done.sha256)
        return done

    def _tail(self, fd: int) -> tuple[int, str]:
        """(seq, SHA-256) of the last complete line, or (0, GENESIS) for an empty file. A torn
        last line (a crash mid-append) is cut off here and its removal recorded."""
        size = os.fstat(fd).st_size
        if size == 0:
            return 0, GENESIS
        start = max(0, size - _MAX_LINE)
        tail = os.pread(fd, size - start, start)
        if not tail.endswith(b"\n"):
            cut = tail.rfind(b"\n") + 1  # 0 when the torn line is the only one
            if cut == 0 and start > 0:
                raise AuditError(f"{self.path}: the last line is torn and longer than "
                                 f"{_MAX_LINE} bytes; run clinic-gateway audit verify")
            torn = tail[cut:]
            os.ftruncate(fd, start + cut)
            seq, prev = self._tail(fd)
            line = _line({"at": _now(), "event": "audit.torn_line_removed", "prev": prev,
                          "seq": seq + 1, "torn_bytes": len(torn),
                          "torn_sha256": hashlib.sha256(torn).hexdigest()})
            os.write(fd, line + b"\n")
            log_event(log, "audit.torn_line_removed", level=logging.WARNING,
                      path=str(self.path), torn_bytes=len(torn))
            return seq + 1, hashlib.sha256(line).hexdigest()
        body = tail[:-1]
        cut = body.rfind(b"\n")
        if cut < 0 and start > 0:
            raise AuditError(f"{self.path}: the last line is longer than {_MAX_LINE} bytes; "
                             "run clinic-gateway audit verify")
        last = body[cut + 1:]
        try:
            seq = json.loads(last)["seq"]
        except (ValueError, KeyError, TypeError) as err:
            raise AuditError(f"{self.path}: the last line is not an audit record ({err}); "
                             "run clinic-gateway audit verify") from None
        if not isinstance(seq, int):
            raise AuditError(f"{self.path}: the last line has no sequence number")
        return seq, hashlib.sha256(last).hexdigest()


def verify(path: Path) -> Verdict:
    """Check the whole chain; the first line that does not hold is named."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return Verdict(True, 0, GENESIS)  # nothing audited yet
    lines = data.split(b"\n")
    if lines[-1]:
        return Verdict(False, len(lines), "", len(lines),
                       "incomplete (no newline at the end): torn by a crash, or cut")
    prev = GENESIS
    for number, raw in enumerate(lines[:-1], start=1):
        try:
            record = json.loads(raw)
        except ValueError:
            return Verdict(False, number, "", number, "not a JSON line")
        if not isinstance(record, dict):
            return Verdict(False, number, "", number, "not a JSON object")
        if record.get("seq") != number:
            return Verdict(False, number, "", number,
                           f"out of sequence (seq {record.get('seq')!r}, expected {number}): "
                           "a line was removed, inserted or moved here")
        if record.get("prev") != prev:
            # seq holds, so this line is where it belongs: the line before it changed.
            if number == 1:
                return Verdict(False, 1, "", 1, "does not start from the genesis hash")
            return Verdict(False, number - 1, "", number - 1,
                           f"changed (line {number} holds another SHA-256 for it)")
        prev = hashlib.sha256(raw).hexdigest()
    return Verdict(True, len(lines) - 1, prev)


def record_revocation(store_dir: Path, device_id: str, serial: str, reason: str = "") -> Appended:
    """Clinic IT's revocation tool records each revoked certificate here (the same line
    format for any tool: event ``certificate.revoked``, ``device_id``, ``serial`` in hex)."""
    return AuditLog(audit_path(store_dir)).append("certificate.revoked", device_id=device_id,
                                                  serial=serial, reason=reason)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="clinic-gateway audit",
                                     description="The gateway's hash-chained audit log.")
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("verify", help="verify the chain (exit 0 intact, 1 otherwise)")
    check.add_argument("store", type=Path, help="the gateway's store folder, or the log file")
    revoked = sub.add_parser("revoked", help="record a revoked device certificate")
    revoked.add_argument("store", type=Path, help="the gateway's store folder")
    revoked.add_argument("--device", required=True, help="the device id")
    revoked.add_argument("--serial", required=True, help="the certificate serial (hex)")
    revoked.add_argument("--reason", default="", help="why (no patient data)")
    args = parser.parse_args(argv)
    if args.command == "verify":
        path = args.store if args.store.is_file() else audit_path(args.store)
        verdict = verify(path)
        print(f"{path}: {verdict.describe()}", file=sys.stdout if verdict.ok else sys.stderr)
        return 0 if verdict.ok else 1
    try:
        done = record_revocation(args.store, args.device, args.serial, args.reason)
    except AuditError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"recorded as line {done.seq}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
