"""The PACS forward queue and the one process that empties it (``[pacs]``, docs/gateway.md).

The device's ack stays tied to the gateway's own durable store: the PACS is delivered to
afterwards, from a queue on disk, so a PACS down for hours delays its images and loses none.
The exporter (clinic_gateway/exporter.py) writes each capture's DICOM file, makes it durable
and then durably enqueues ``.gateway/forward/<SOP Instance UID>.json`` before it removes the
capture's journal entry; whatever a crash interrupts is redone from the journal, and
enqueueing twice writes the same entry again.

One forwarder per store sends the queue, oldest first (the supervisor of ``clinic-gateway
run`` starts it and restarts it if it dies; an flock on ``forward/.lock`` keeps a second one,
e.g. another gateway host on the same store, waiting). An entry is removed only once the PACS
said it holds the instance; a forwarder killed between the PACS's answer and the removal
sends it again, and the PACS keeps one instance per SOP Instance UID. After a failed try it
waits (``retry_initial_s``, doubling up to ``retry_max_s``) and tries the same entry again:
when the PACS is down, nothing behind it could go either. An entry the PACS refused for good,
or one that cannot be read, is moved to ``forward/failed/`` (with ``<name>.reason``), logged
(``pacs.failed``) and counted, and the queue goes on; clinic IT moves it back to retry.

Run: ``python -m clinic_gateway.forwarder --config FILE`` (the supervisor does).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import logging
import os
import re
import signal
import sys
import threading
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from clinic_gateway.metrics import ForwarderMetrics
from clinic_gateway.pacs import PacsError, Rejected, RetryLater, Sender
from dermascope_wire.durable import fsync_dir, make_dirs, write_atomic
from dermascope_wire.logs import log_event

log = logging.getLogger("clinic_gateway.forwarder")

FILE_MODE = 0o640
#: A SOP Instance UID (PS3.5 9.1): digits and dots, at most 64 characters.
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*\Z")
#: How often a forwarder that finds the queue locked by another looks again.
LOCK_RETRY = 5.0


def queue_dir(store_dir: Path) -> Path:
    return Path(store_dir) / ".gateway" / "forward"


def failed_dir(store_dir: Path) -> Path:
    return queue_dir(store_dir) / "failed"


@dataclass(frozen=True)
class ForwardEntry:
    """One instance to deliver: its UID, where it came from, and its DICOM file (relative
    to the store)."""

    sop_instance_uid: str
    device_id: str
    capture_id: str
    dicom: str
    enqueued_at: float = 0.0

    def validate(self) -> ForwardEntry:
        if not _UID.match(self.sop_instance_uid) or len(self.sop_instance_uid) > 64:
            raise ValueError(f"sop_instance_uid {self.sop_instance_uid!r:.80} is not a UID")
        path = Path(self.dicom)
        if path.is_absolute() or ".." in path.parts or path.suffix != ".dcm":
            raise ValueError(f"dicom {self.dicom!r:.200} is not a .dcm file inside the store")
        return self


class EntryError(ValueError):
    """A queue entry that cannot be read as a ForwardEntry (named, with the problem)."""


def enqueue(store_dir: Path, entry: ForwardEntry) -> Path:
    """Durably add ``entry`` to the queue (replacing the same UID's: idempotent)."""
    entry.validate()
    folder = queue_dir(store_dir)
    make_dirs(folder)
    path = folder / f"{entry.sop_instance_uid}.json"
    write_atomic(path, json.dumps(asdict(entry)).encode(), mode=FILE_MODE)
    return path


def read_entry(path: Path) -> ForwardEntry:
    try:
        data = json.loads(path.read_bytes())
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        entry = ForwardEntry(**{k: data[k] for k in ("sop_instance_uid", "device_id",
                                                    "capture_id", "dicom")},
                             enqueued_at=float(data.get("enqueued_at", 0.0)))
        if not all(isinstance(v, str) for v in (entry.sop_instance_uid, entry.device_id,
                                                 entry.capture_id, entry.dicom)):
            raise ValueError("sop_instance_uid, device_id, capture_id, dicom must be text")
        entry.validate()
    except KeyError as err:
        raise EntryError(f"{path.name}: no {err.args[0]!r}") from None
    except (ValueError, TypeError) as err:  # JSONDecodeError and UnicodeDecodeError too
        raise EntryError(f"{path.name}: {err}") from None
    if path.stem != entry.sop_instance_uid:
        raise EntryError(f"{path.name}: names instance {entry.sop_instance_uid}")
    return entry


def pending(store_dir: Path) -> list[Path]:
    """The queue's entries, oldest first (temp files of a write cut short left out)."""
    entries = []
    try:
        with os.scandir(queue_dir(store_dir)) as it:
            for e in it:
                if e.name.endswith(".json") and not e.name.startswith(".") and e.is_file():
                    with contextlib.suppress(FileNotFoundError):  # sent meanwhile
                        entries.append((e.stat().st_mtime, e.name))
    except FileNotFoundError:
        return []
    return [queue_dir(store_dir) / name for _mtime, name in sorted(entries)]


def depth(store_dir: Path) -> tuple[int, int]:
    """(entries waiting, entries failed): what the metrics and ``check`` show."""
    def count(folder: Path) -> int:
        try:
            with os.scandir(folder) as it:
                return sum(1 for e in it if e.name.endswith(".json")
                           and not e.name.startswith("."))
        except FileNotFoundError:
            return 0
    return count(queue_dir(store_dir)), count(failed_dir(store_dir))


class Backoff:
    def __init__(self, initial: float, cap: float) -> None:
        self.initial, self.cap = initial, cap
        self.next = initial

    def take(self) -> float:
        delay, self.next = self.next, min(self.cap, self.next * 2)
        return delay

    def reset(self) -> None:
        self.next = self.initial


class Forwarder:
    """Empties the queue of one store into the PACS through ``sender``."""

    def __init__(self, store_dir: Path, sender: Sender, *, retry_initial: float = 2.0,
                 retry_max: float = 300.0, poll_interval: float = 1.0,
                 metrics: ForwarderMetrics | None = None,
                 parent_pid: int | None = None) -> None:
        self.store_dir = Path(store_dir).resolve()
        self.sender = sender
        self.backoff = Backoff(retry_initial, retry_max)
        self.poll_interval = poll_interval
        self.metrics = metrics if metrics is not None else ForwarderMetrics()
        self.parent_pid = parent_pid
        self.forwarded = 0
        self._attempts: dict[str, int] = {}
        self._lock_fd: int | None = None

    # -- the queue's lock: one forwarder per store ------------------------------------------
    def _take_lock(self, stop: threading.Event) -> bool:
        folder = queue_dir(self.store_dir)
        make_dirs(failed_dir(self.store_dir))
        fd = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT, FILE_MODE)
        said = False
        while not stop.is_set():
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                self._lock_fd = fd
                return True
            except BlockingIOError:
                if not said:
                    log_event(log, "pacs.forwarder_waiting", level=logging.WARNING,
                              detail="another forwarder holds this store's queue")
                    said = True
                if stop.wait(LOCK_RETRY) or self._orphaned():
                    break
        os.close(fd)
        return False

    def _release_lock(self) -> None:
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            os.close(fd)  # the flock goes with it

    def _orphaned(self) -> bool:
        """The supervisor that started us is gone (killed): we go too, so the next
        supervisor's forwarder can take the queue."""
        return self.parent_pid is not None and os.getppid() != self.parent_pid

    # -- the loop ---------------------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        """Forward until ``stop`` is set (or the parent process is gone)."""
        if not self._take_lock(stop):
            return
        try:
            waiting, failed = depth(self.store_dir)
            log_event(log, "pacs.forwarder_started", transport=self.sender.transport,
                      queued=waiting, failed=failed)
            while not stop.is_set() and not self._orphaned():
                delay = self.run_once(stop)
                stop.wait(self.poll_interval if delay is None else delay)
        finally:
            self._release_lock()
            self.sender.close()
            log_event(log, "pacs.forwarder_stopped", forwarded=self.forwarded)

    def run_once(self, stop: threading.Event | None = None) -> float | None:
        """One pass over the queue, oldest first; the delay before the next try after a
        failed one (the pass ends there), or None once the queue was emptied."""
        for path in pending(self.store_dir):
            if stop is not None and stop.is_set():
                return None
            delay = self.forward(path)
            if delay is not None:
                return delay
        return None

    def forward(self, path: Path) -> float | None:
        """Send one entry: None when it is done (sent or failed for good), else the delay
        before trying again."""
        try:
            entry = read_entry(path)
        except FileNotFoundError:
            return None  # sent meanwhile (a previous forwarder's pass)
        except EntryError as err:
            self._fail(path, "entry_unreadable", str(err))
            return None
        uid = entry.sop_instance_uid
        started = time.monotonic()
        try:
            self.sender.send(self.store_dir / entry.dicom, uid)
        except RetryLater as err:
            attempt = self._attempts[uid] = self._attempts.get(uid, 0) + 1
            delay = self.backoff.take()
            self.metrics.retried(err.reason)
            log_event(log, "pacs.retry", level=logging.WARNING, sop_instance_uid=uid,
                      device_id=entry.device_id, capture_id=entry.capture_id,
                      transport=self.sender.transport, reason=err.reason,
                      error=err.detail, attempt=attempt, retry_in_s=round(delay, 3))
            return delay
        except Rejected as err:
            self._fail(path, err.reason, err.detail, entry)
            return None
        except Exception as err:  # noqa: BLE001 - one entry's bug must not stop the queue
            # Not a PACS answer we know: kept for a person to look at, the queue goes on.
            log_event(log, "pacs.forward_crashed", level=logging.ERROR, sop_instance_uid=uid,
                      error=repr(err)[:500], traceback=traceback.format_exc())
            self._fail(path, "unexpected", repr(err)[:500], entry)
            return None
        seconds = time.monotonic() - started
        path.unlink(missing_ok=True)
        self.backoff.reset()
        self.forwarded += 1
        self.metrics.forwarded(seconds)
        log_event(log, "pacs.forwarded", sop_instance_uid=uid, device_id=entry.device_id,
                  capture_id=entry.capture_id, transport=self.sender.transport,
                  seconds=round(seconds, 4), attempts=self._attempts.pop(uid, 0) + 1)
        return None

    def _fail(self, path: Path, reason: str, detail: str,
              entry: ForwardEntry | None = None) -> None:
        folder = failed_dir(self.store_dir)
        make_dirs(folder)
        target = folder / path.name
        write_atomic(folder / f"{path.stem}.reason", f"{reason}: {detail}\n".encode(),
                     mode=FILE_MODE, sync_dir=False)
        with contextlib.suppress(FileNotFoundError):
            path.replace(target)
        fsync_dir(folder)
        self.metrics.failed(reason)
        fields: dict[str, Any] = {"entry": path.name, "reason": reason, "error": detail,
                                  "moved_to": str(target)}
        if entry is not None:
            self._attempts.pop(entry.sop_instance_uid, None)
            fields.update(sop_instance_uid=entry.sop_instance_uid, device_id=entry.device_id,
                          capture_id=entry.capture_id)
        log_event(log, "pacs.failed", level=logging.ERROR, **fields)


def main(argv: list[str] | None = None) -> int:
    """The forwarder process of ``clinic-gateway run`` (started by its supervisor)."""
    from clinic_gateway.config import ConfigError, load_config
    from clinic_gateway.pacs import make_sender
    from dermascope_wire.logs import add_json_handler

    parser = argparse.ArgumentParser(prog="python -m clinic_gateway.forwarder",
                                     description="Forward the store's DICOM objects to the "
                                                 "PACS ([pacs] of the gateway's config).")
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--parent", type=int, help="exit once this process is gone")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config)
    except ConfigError as err:
        print(f"clinic-gateway forwarder: {err}", file=sys.stderr)
        return 2
    add_json_handler("clinic_gateway", stream=sys.stdout)
    if config.service.log_file is not None:
        add_json_handler("clinic_gateway", path=config.service.log_file)
    if not config.pacs.enabled:
        log_event(log, "pacs.disabled")
        return 0
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    # The supervisor blocks these to wait for them, and a child inherits its mask.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
    metrics: ForwarderMetrics = ForwarderMetrics()
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from clinic_gateway.metrics import PrometheusForwarderMetrics

        metrics = PrometheusForwarderMetrics()
    p = config.pacs
    try:
        sender = make_sender(p)
    except (OSError, ValueError, PacsError) as err:  # a TLS file that does not load...
        log_event(log, "pacs.forwarder_failed", level=logging.CRITICAL, error=str(err))
        return 1
    Forwarder(config.store.dir, sender, retry_initial=p.retry_initial_s,
              retry_max=p.retry_max_s, poll_interval=p.poll_interval_s, metrics=metrics,
              parent_pid=args.parent).run(stop)
    return 0


if __name__ == "__main__":
    sys.exit(main())
