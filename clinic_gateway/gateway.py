"""The clinic's reference receiver (docs/protocol.md, the "gateway" side).

It subscribes to every device's uploads (an MQTT 5 shared subscription, so several receivers
can share the load), stages chunks on disk so a restarted gateway resumes where it was,
verifies the SHA-256 of the whole transfer, opens it if it is sealed (``--key``: the
clinic's private key), unpacks the bundle and stores
``<store>/<device>/<capture>.jpg`` and ``<capture>.json`` (the metadata) atomically. Only
then does it answer ``committed``. Duplicates and replays answer ``committed`` again and
store nothing twice.

Layout under ``store_dir``::

    <device>/<capture>.jpg, <capture>.json     stored captures
    .gateway/staging/<device>/<capture>/       manifest.json, data, received (see _Staging)
    .gateway/ledger/<device>/<capture>.json    transfer sha256 etc. of committed captures
    .gateway/pending/<device>/<capture>.json   a store whose after-ack work is not done yet
    .gateway/audit.jsonl                       the hash-chained audit log (clinic_gateway/audit.py)
    .gateway/cases/<device>.jsonl, case-key    the case registry (clinic_gateway/cases.py)

Files are 0640, folders 0750: patient images are for the gateway's account and group only.

A capture's after-ack work (DICOM export, removing its staging) is journaled in
``.gateway/pending`` before the capture is stored (when its transfer starts, on a thread of
its own, so the final's ack waits for no journal fsync) and the entry removed once the work
is done, so a receiver killed in between finishes it when it starts again (``_recover``),
without rescanning the store; an entry whose capture was never committed is dropped then.
The work itself runs in another process, the exporter (clinic_gateway/exporter.py), which
the gateway starts, feeds one capture at a time and starts again if it dies: the ack waits
for the durable store only, and nothing after it competes with paho's network thread for
the interpreter.

Receivers that share a group must share ``store_dir`` (e.g. a network volume): a shared
subscription hands each message to any one of them. All writes are temp + rename, and the
commit is a hard link that fails if the image already exists, so concurrent receivers
still store one copy.

Every message is treated as hostile (bounded, validated by ``protocol``); every paho
callback, the after-ack and audit threads and the exporter process are supervised: an
unexpected exception is logged with its traceback (a dead exporter is started again) and the
gateway goes on. Unsealed captures are refused unless the gateway runs in
development mode (``allow_unsealed``, ``--insecure-dev-mode``).

Identities (docs/security.md): a capture is stored under the device the broker let publish
it (the topic), and refused (``device_mismatch``) if its metadata names another; it is filed
under a case only if the clinic opened that case on that device through ``open_case``
(otherwise filed unassigned, ``case_unverified``). Final acks, seal errors, mismatches,
unverified cases and commands go to the audit log.

Run: ``clinic-gateway run --host 127.0.0.1 --port 1883 --store DIR --key clinic.pem``
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import datetime as dt
import functools
import hashlib
import json
import logging
import os
import queue
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import traceback
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import paho.mqtt.client as mqtt
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from clinic_gateway.audit import AuditError, AuditLog, audit_path
from clinic_gateway.cases import CaseRegistry
from clinic_gateway.commander import Commander
from clinic_gateway.metrics import GatewayMetrics
from dermascope_wire import bundle, seal, signing
from dermascope_wire.durable import TEMP_SUFFIX, fsync_dir, make_dirs, write_atomic
from dermascope_wire.identity import DEVICE_ID, check_case_token, check_device_id
from dermascope_wire.logs import EventName, add_json_handler, log_event
from dermascope_wire.protocol import (
    Ack,
    Final,
    Manifest,
    ProtocolError,
    Topics,
    decode_chunk,
    parse_up_topic,
    request_number,
    up_filter,
)
from dermascope_wire.sockets import tcp_nodelay

log = logging.getLogger("clinic_gateway.gateway")
#: paho-mqtt's own messages (connection trouble, exceptions it caught) go to the JSON log too.
paho_log = log.getChild("paho")

#: Everything the gateway writes is for the clinic's gateway account and its group (e.g. the
#: archive's importer), never for every local user: images, metadata, DICOM, ledger,
#: staging, journal, audit log and case registry. Folders are 0750 (``make_dirs``).
FILE_MODE = 0o640

DEFAULT_MAX_SIZE = 512 * 1024 * 1024
#: How long a case opened through the gateway stays open on the device (its own timeout).
DEFAULT_CASE_TIMEOUT = 4 * 3600.0
#: A transfer untouched this long was abandoned (device replaced, capture quarantined...).
DEFAULT_STAGING_TTL = 14 * 86400.0
ACCEPTED_CONTENT_TYPES = (bundle.CONTENT_TYPE, seal.CONTENT_TYPE)
#: Nesting a capture's metadata may have (it is stored as JSON and read by the DICOM export;
#: real metadata nests 3 deep).
MAX_METADATA_DEPTH = 16
#: What our own writes name their temporary files in a device folder: the image's and the
#: DICOM's ``.<capture>.<ext>.<pid>.tmp``, write_atomic's ``.<capture>.json.<random>.tmp``.
_TEMP_NAME = re.compile(r"^\.(?P<capture>.+)\.(?:jpg|json|dcm)\.[^.]+"
                        + re.escape(TEMP_SUFFIX) + r"\Z")
#: A receiver's temp file of an image names its pid (``.<capture>.jpg.<pid>.tmp``). Only
#: those count as a peer's work in flight: an exporter orphaned by a killed gateway may still
#: be finishing a DICOM temp file, and its job is redone from the journal anyway.
_TEMP_PID = re.compile(r"\.jpg\.(?P<pid>\d+)" + re.escape(TEMP_SUFFIX) + r"\Z")
#: Journal entries name the host and process that wrote them (a peer's work in flight).
_HOST = socket.gethostname()


def _is_live_peer(pid: object) -> bool:
    """Whether ``pid`` is a live process of this host other than this one."""
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0 or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, another user's
    return True


def _written_by_live_peer(name: str) -> bool:
    """Whether a temp file's name says a live peer is writing it now."""
    match = _TEMP_PID.search(name)
    return match is not None and _is_live_peer(int(match["pid"]))


paho_log.addFilter(EventName("gateway.mqtt_log"))
if paho_log.level == logging.NOTSET:
    # paho logs every packet at DEBUG; what matters (errors, caught exceptions) is above.
    paho_log.setLevel(logging.INFO)


#: A committed capture's after-ack work: (device id, capture id, export DICOM?).
_Job = tuple[str, str, bool]
#: What a journal entry records (``_write_journal``); the ledger adds the image's SHA-256.
_JOURNALED = ("capture_id", "device_id", "transfer_sha256", "size", "image")
#: How often the exporter may die on one job before it is left for the next start.
EXPORT_ATTEMPTS = 3
#: glibc's malloc for the exporter (unless the environment says otherwise): an export makes
#: several buffers of the image's size; served from a heap that keeps them instead of fresh
#: mappings, the next export faults no pages in (measured: two thirds of its CPU time).
_EXPORTER_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20),
                    "MALLOC_TRIM_THRESHOLD_": str(64 << 20)}

_REC = struct.Struct(">I")
#: Staged transfers whose files stay open between chunks (a small LRU, per receiver).
_OPEN_STAGINGS = 32
#: Transfers up to this size are also assembled in memory (see _Staging).
_MEMORY_LIMIT = 16 * 1024 * 1024


class _Staging:
    """One transfer's chunks on disk, so a restarted receiver resumes where it was.

    ``manifest.json``; ``data`` with chunk i at offset i * chunk_size; ``received``, an
    append-only log of u32 chunk indices, each appended after its data is written. Appends
    of 4 bytes are atomic, so receivers sharing the directory can log side by side. After a
    power cut a logged chunk may hold zeros: the SHA-256 at the final catches that, and the
    whole transfer is asked for again.
    """

    def __init__(self, directory: Path, manifest: Manifest) -> None:
        self.directory = directory
        self.manifest = manifest
        self._data_fd: int | None = None
        self._log_fd: int | None = None
        self.seen: set[int] = self.received()
        # Fast path: while chunks arrive in order (the usual case) keep them in memory and
        # hash as they come, so the final needs no disk read and no second pass. What is
        # verified is exactly what gets stored.
        self._start_in_memory(not self.seen)

    def _start_in_memory(self, fresh: bool) -> None:
        # One buffer of the transfer's size, filled chunk by chunk: no join at the final,
        # and its pages are touched while the chunks arrive, not all at once then.
        size = self.manifest.size
        self._buf: bytearray | None = bytearray(size) if fresh and size <= _MEMORY_LIMIT \
            else None
        self._next = 0  # chunks in the buffer (in order)
        self._hasher = hashlib.sha256()

    @classmethod
    def load(cls, directory: Path) -> _Staging | None:
        try:
            manifest = Manifest.decode((directory / "manifest.json").read_bytes())
        except (OSError, ProtocolError):
            return None
        return cls(directory, manifest)

    @classmethod
    def create(cls, directory: Path, manifest: Manifest) -> _Staging:
        shutil.rmtree(directory, ignore_errors=True)
        make_dirs(directory)
        write_atomic(directory / "manifest.json", dataclasses.replace(manifest, req=0).encode(),
                     mode=FILE_MODE, durable=False)
        return cls(directory, manifest)

    def matches(self, sha256: str, size: int | None, chunk_size: int) -> bool:
        m = self.manifest
        return m.sha256 == sha256 and m.chunk_size == chunk_size and size in (None, m.size)

    def write(self, index: int, data: bytes) -> None:
        if index in self.seen:
            return
        if self._data_fd is None or self._log_fd is None:
            self._data_fd = os.open(self.directory / "data", os.O_WRONLY | os.O_CREAT, 0o600)
            self._log_fd = os.open(self.directory / "received",
                                   os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.pwrite(self._data_fd, data, index * self.manifest.chunk_size)
        os.write(self._log_fd, _REC.pack(index))
        self.seen.add(index)
        if self._buf is not None:
            if index == self._next:
                offset = index * self.manifest.chunk_size
                self._buf[offset:offset + len(data)] = data
                self._next += 1
                self._hasher.update(data)
            else:
                self._buf = None  # out of order: fall back to the staged file

    def assembled(self) -> tuple[bytes | bytearray, str]:
        """The whole payload and its SHA-256 (hex), once every chunk is staged."""
        if self._buf is not None and self._next == self.manifest.chunk_count:
            return self._buf, self._hasher.hexdigest()
        data = self.read_all()
        return data, hashlib.sha256(data).hexdigest()

    def received(self) -> set[int]:
        """Authoritative (re-read from disk): other receivers may have added chunks."""
        try:
            raw = (self.directory / "received").read_bytes()
        except FileNotFoundError:
            return set()
        whole = len(raw) - len(raw) % _REC.size  # a torn last record is ignored
        return {i for (i,) in _REC.iter_unpack(raw[:whole]) if i < self.manifest.chunk_count}

    def missing(self) -> list[int]:
        have = self.received()
        self.seen |= have
        return [i for i in range(self.manifest.chunk_count) if i not in have]

    def read_all(self) -> bytes:
        try:
            with (self.directory / "data").open("rb") as f:
                return f.read(self.manifest.size)
        except FileNotFoundError:
            return b""

    def forget_chunks(self) -> None:
        self.close()
        for name in ("data", "received"):
            (self.directory / name).unlink(missing_ok=True)
        self.seen = set()
        self._start_in_memory(True)

    def close(self) -> None:
        for fd in (self._data_fd, self._log_fd):
            if fd is not None:
                os.close(fd)
        self._data_fd = self._log_fd = None


class _Journaled(NamedTuple):
    """A journal entry as written: its transfer's SHA-256 and the file's inode (the same
    inode at the final means no other receiver replaced it meanwhile)."""

    sha256: str
    inode: int


class Gateway:
    #: The exporter process's command line (``--store DIR`` follows; see exporter.py).
    exporter_command: tuple[str, ...] = (sys.executable, "-m", "clinic_gateway.exporter")
    # The client that sends commands (``_commander``), made on first use.
    _commander_client: Commander | None = None
    _commander_lock = threading.Lock()

    def __init__(self, host: str, port: int, store_dir: Path, topic_prefix: str = "derm/v1",
                 protocol: str = "mqtt5", group: str = "gateways",
                 max_size: int = DEFAULT_MAX_SIZE,
                 private_keys: Sequence[X25519PrivateKey] = (),
                 staging_ttl: float = DEFAULT_STAGING_TTL,
                 tls: dict[str, str] | None = None, export_dicom: bool = True,
                 allow_unsealed: bool = False,
                 signing_key: signing.Ed25519PrivateKey | Path | None = None,
                 command_tls: dict[str, str] | None = None,
                 metrics: GatewayMetrics | None = None) -> None:
        """``private_keys``: the clinic's keys that open sealed captures (several during a key
        rotation). Without any, sealed captures wait at the device (ack "retry").
        ``tls``: paho ``tls_set`` arguments (``ca_certs``, ``certfile``, ``keyfile``) for a
        broker with mutual TLS. ``export_dicom``: also write ``<capture>.dcm``.
        ``allow_unsealed``: development only: also store captures that were not sealed to
        the clinic's key (otherwise they are rejected, reason "unsealed").
        ``signing_key``: the clinic's Ed25519 key (or its PEM file) that signs every ack, so
        devices act only on acks of this gateway (docs/protocol.md, "Signed messages");
        without it acks go unsigned, which provisioned devices refuse; it signs the commands
        of :meth:`send_command` too. ``command_tls``: the ``tls`` of the connection that sends
        commands, under its own certificate (CN ``commander``): the shipped broker binds a
        client id to its certificate, so a second connection with the gateway's would evict
        the gateway's own (default: ``tls``, enough on a broker without that binding).
        ``metrics``: what the gateway counts (clinic_gateway/metrics.py; default: nothing)."""
        if protocol not in ("mqtt5", "mqtt311"):
            raise ValueError(f"protocol must be 'mqtt5' or 'mqtt311' (got {protocol!r})")
        self.host = host
        self.port = port
        # Absolute once: capture.stored names the file by its absolute path.
        self.store_dir = Path(store_dir).resolve()
        self.prefix = topic_prefix
        self.protocol = protocol
        self.group = group
        self.max_size = max_size
        self.private_keys = tuple(private_keys)
        self.staging_ttl = staging_ttl
        self.tls = tls
        self.command_tls = command_tls if command_tls is not None else tls
        self.export_dicom = export_dicom
        self.allow_unsealed = allow_unsealed
        self.signing_key = (signing.load_private_key(signing_key)
                            if isinstance(signing_key, (str, Path)) else signing_key)
        # Work that is no part of the promise runs after the ack, in the exporter process
        # (clinic_gateway/exporter.py), fed by a thread of ours: the DICOM export (derived,
        # redone from the stored JPEG and sidecar at any time) and removing a committed
        # transfer's staging (the ledger already answers replays).
        self._later: queue.Queue[_Job | None] = queue.Queue()
        # Jobs of the message being handled, released once its ack is published.
        self._held: list[_Job] = []
        self._exporter: subprocess.Popen[str] | None = None
        self._stopping = threading.Event()  # no exporter is started again once set
        # The threads a store writes and hashes on (``_store``), made on first use.
        self._io: concurrent.futures.ThreadPoolExecutor | None = None
        # Journal entries being written for transfers that started (``_journal``): the
        # transfer's SHA-256 once the entry is durable. Touched only from paho's thread.
        self._journaling: dict[tuple[str, str], concurrent.futures.Future[_Journaled | None]] = {}
        self._later_thread: threading.Thread | None = None
        # Audit lines of the message path, written in order on a thread of their own
        # (``_audit_later``): the ack does not wait for the audit log's fsync.
        self._audits: queue.Queue[tuple[str, dict[str, Any]] | None] = queue.Queue()
        self._audit_thread: threading.Thread | None = None
        self._later_pending = 0
        self._later_done = threading.Condition()
        self._staging = self.store_dir / ".gateway" / "staging"
        self._ledger = self.store_dir / ".gateway" / "ledger"
        self._pending = self.store_dir / ".gateway" / "pending"
        self._ready = threading.Event()
        self._mqtt5 = protocol == "mqtt5"
        self._client = self._make_client()
        self.stored_count = 0
        self.metrics = metrics if metrics is not None else GatewayMetrics()
        # Touched only from paho's network thread (all callbacks run there).
        self._open: OrderedDict[tuple[str, str], _Staging] = OrderedDict()

    def _make_client(self) -> mqtt.Client:
        client_id = f"gateway-{os.getpid()}-{id(self):x}"
        if self._mqtt5:
            client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                                 protocol=mqtt.MQTTv5)
        else:
            client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                                 protocol=mqtt.MQTTv311, clean_session=True)
        if self.tls:
            client.tls_set(**self.tls)
        client.reconnect_delay_set(0.2, 5.0)
        client.connect_timeout = 5.0
        client.enable_logger(paho_log)
        # Our callbacks never raise (_guarded); should one still, paho logs it and goes on
        # instead of ending its network loop, which would leave every device unanswered.
        client.suppress_exceptions = True
        client.on_socket_open = _guarded("on_socket_open", tcp_nodelay)
        client.on_connect = _guarded("on_connect", self._on_connect)
        client.on_subscribe = _guarded("on_subscribe", self._on_subscribe)
        client.on_disconnect = _guarded("on_disconnect", self._on_disconnect)
        client.on_message = _guarded("on_message", self._on_message)
        return client

    @property
    def subscription(self) -> str:
        base = up_filter(self.prefix)
        return f"$share/{self.group}/{base}" if self._mqtt5 else base

    def start(self, ready_timeout: float = 5.0) -> None:
        """Connect in the background; waits up to ``ready_timeout`` for the subscription so a
        device started right after finds it listening (it does not fail if the broker is
        down: it keeps reconnecting)."""
        if self.allow_unsealed:
            log_event(log, "gateway.insecure_dev_mode", level=logging.WARNING,
                      detail="unsealed captures are accepted: for development only, never "
                             "with patient images")
        if self.signing_key is None:
            log_event(log, "gateway.unsigned_acks", level=logging.ERROR,
                      detail="no signing key (--signing-key): acks go unsigned; provisioned "
                             "devices refuse them and deliver nothing. Development only")
        for d in (self.store_dir, self._staging, self._ledger, self._pending):
            make_dirs(d)
        self._stopping.clear()
        if self._later_thread is None:
            self._later_thread = threading.Thread(
                target=supervised, args=("gateway-after-ack", self._after_ack_loop),
                name="gateway-after-ack", daemon=True)
            self._later_thread.start()
        if self._audit_thread is None:
            self._audit_thread = threading.Thread(
                target=supervised, args=("gateway-audit", self._audit_loop),
                name="gateway-audit", daemon=True)
            self._audit_thread.start()
        self._recover()
        self._sweep_staging()
        kwargs: dict[str, Any] = {"clean_start": True} if self._mqtt5 else {}
        self._client.connect_async(self.host, self.port, keepalive=30, **kwargs)
        self._client.loop_start()
        if not self._ready.wait(ready_timeout):
            log_event(log, "gateway.not_ready", level=logging.WARNING, host=self.host,
                      port=self.port)

    def _sweep_staging(self) -> None:
        """Drop the staging of captures already committed (a crash came before its removal)
        and of transfers nobody touched for ``staging_ttl`` (the disk is not a graveyard; a
        device that still holds the capture simply starts it over), and temp files a crash
        left in the others. Staging holds only transfers in flight: cheap to look through."""
        horizon = time.time() - self.staging_ttl
        for directory in self._staging.glob("*/*"):
            device_id, capture_id = directory.parent.name, directory.name
            if self._committed(device_id, capture_id) is not None:
                shutil.rmtree(directory, ignore_errors=True)
                log_event(log, "gateway.staging_orphan_removed", device_id=device_id,
                          capture_id=capture_id)
                continue
            try:
                files = list(directory.iterdir())
                newest = max((p.stat().st_mtime for p in files),
                             default=directory.stat().st_mtime)
            except OSError:
                continue
            if newest < horizon:
                shutil.rmtree(directory, ignore_errors=True)
                log_event(log, "gateway.staging_expired", device_id=device_id,
                          capture_id=capture_id)
                continue
            for path in files:
                if path.name.startswith(".") and path.name.endswith(TEMP_SUFFIX):
                    path.unlink(missing_ok=True)

    def _pending_path(self, device_id: str, capture_id: str) -> Path:
        return self._pending / device_id / f"{capture_id}.json"

    def _recover(self) -> None:
        """Finish what a crash interrupted: every journaled store (``_store``) whose after-ack
        work was not done. Committed captures get their ledger record if it is missing,
        lose their staging and get their DICOM export (on the after-ack thread); temp files
        of the interrupted writes go. A store that never reached its commit leaves only
        its entry and temp files to remove: its staging stays, the device resumes.

        Workers of one service share the store, and one may start while a peer is in the
        middle of a transfer: an uncommitted entry whose writer is a live process of this
        host (other than this one) is that peer's work in flight, not a crash's leftover, so
        it and its temp files are left alone (``_owned_by_live_peer``). A committed one is
        finished here whoever wrote it: on a shared subscription the worker that journaled a
        transfer (at its manifest) need not be the one that committed it (at its final), and
        the after-ack work is idempotent."""
        for device_dir in sorted(p for p in self._pending.glob("*") if p.is_dir()):
            device_id = device_dir.name
            captures: list[str] = []
            for entry in sorted(device_dir.iterdir()):
                if entry.name.startswith("."):
                    if not _written_by_live_peer(entry.name):
                        entry.unlink(missing_ok=True)  # a journal write cut short
                    continue
                capture_id = entry.name.removesuffix(".json")
                if not self._is_committed(device_id, capture_id) and \
                        self._owned_by_live_peer(entry):
                    log_event(log, "gateway.recovery_skipped", device_id=device_id,
                              capture_id=capture_id, reason="live peer")
                    continue
                captures.append(capture_id)
            self._remove_temp_files(self.store_dir / device_id, captures)
            self._remove_temp_files(self._ledger / device_id, captures)
            for capture_id in captures:
                self._recover_one(device_id, capture_id)

    def _is_committed(self, device_id: str, capture_id: str) -> bool:
        return self._image_path(device_id, capture_id).exists() or \
            self._ledger_path(device_id, capture_id).exists()

    @staticmethod
    def _owned_by_live_peer(entry: Path) -> bool:
        """Whether the journal entry names a writer that is another live process here."""
        try:
            record = json.loads(entry.read_bytes())
        except (OSError, ValueError):
            return False
        if not isinstance(record, dict) or record.get("host") != _HOST:
            return False
        return _is_live_peer(record.get("pid"))

    def _recover_one(self, device_id: str, capture_id: str) -> None:
        entry = self._pending_path(device_id, capture_id)
        record: dict[str, Any] | None
        try:
            record = json.loads(entry.read_text("utf-8"))
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as err:
            log_event(log, "gateway.pending_unreadable", level=logging.ERROR,
                      device_id=device_id, capture_id=capture_id, error=str(err))
            record = None
        # Not a capture (kind): the exporter reads that from the sidecar.
        dicom = self.export_dicom
        committed = self._is_committed(device_id, capture_id)
        log_event(log, "gateway.recovering", device_id=device_id, capture_id=capture_id,
                  committed=committed)
        if not committed:
            entry.unlink(missing_ok=True)
            return
        ledger = self._ledger_path(device_id, capture_id)
        if not ledger.exists():
            self._recover_ledger(device_id, capture_id, record, ledger)
        self._drop_staging(device_id, capture_id)
        self._queue((device_id, capture_id, dicom))

    def _recover_ledger(self, device_id: str, capture_id: str, record: dict | None,
                        ledger: Path) -> None:
        """The ledger record of a capture committed without one, and its ``capture.stored``
        event, which the crash may have cut off (``_store`` logs it just before the ledger)."""
        image_path = self._image_path(device_id, capture_id)
        try:
            image = image_path.read_bytes()
        except OSError:
            image = None  # moved on to the archive already: logged before it went
        image_sha = None if image is None else _sha256(image)
        if record is not None:
            record = {k: record.get(k) for k in _JOURNALED}
            # The journal is written before the image's SHA-256 is known.
            if image_sha is not None:
                record["image_sha256"] = image_sha
            make_dirs(ledger.parent)
            write_atomic(ledger, json.dumps(record).encode(), mode=FILE_MODE, durable=False)
        if image is not None:
            log_event(log, "capture.stored", capture_id=capture_id, device_id=device_id,
                      path=str(image_path), sha256=image_sha, size=len(image),
                      recovered=True)

    def _remove_temp_files(self, directory: Path, captures: list[str]) -> None:
        """Temp files of these captures' interrupted writes in ``directory`` (one listing)."""
        wanted = set(captures)
        try:
            names = [e.name for e in os.scandir(directory)]
        except FileNotFoundError:
            return
        for name in names:
            match = _TEMP_NAME.match(name)
            if match and match["capture"] in wanted and not _written_by_live_peer(name):
                (directory / name).unlink(missing_ok=True)
                log_event(log, "gateway.temp_removed", path=str(directory / name))

    def wait_ready(self, timeout: float) -> bool:
        return self._ready.wait(timeout)

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping.set()
        self._client.disconnect()
        self._client.loop_stop()
        self._ready.clear()
        if self._later_thread is not None:
            self._later.put(None)
            self._later_thread.join(timeout)
            self._later_thread = None
        if self._audit_thread is not None:
            self._audits.put(None)
            self._audit_thread.join(timeout)
            self._audit_thread = None
        self._stop_exporter(timeout)
        if self._io is not None:
            self._io.shutdown()
            self._io = None
        while self._open:
            self._open.popitem()[1].close()
        with self._commander_lock:
            if self._commander_client is not None:
                self._commander_client.close()
                self._commander_client = None

    def _after_ack(self, job: _Job) -> None:
        """Hand ``job`` to the exporter once the current message's ack is out."""
        self._held.append(job)

    def _release_held(self) -> None:
        jobs, self._held = self._held, []
        for job in jobs:
            self._queue(job)

    def _queue(self, job: _Job) -> None:
        with self._later_done:
            self._later_pending += 1
        self._later.put(job)

    def _after_ack_loop(self) -> None:
        # Supervised (``supervised``): a job that raises is logged and the loop restarted.
        while (job := self._later.get()) is not None:
            try:
                self._hand_over(job)
            finally:
                with self._later_done:
                    self._later_pending -= 1
                    self._later_done.notify_all()

    def wait_exported(self, timeout: float) -> bool:
        """True once every DICOM export (and staging removal) and every audit line of the
        message path queued so far is done (tests, demo)."""
        with self._later_done:
            return self._later_done.wait_for(lambda: self._later_pending == 0, timeout)

    def _hand_over(self, job: _Job) -> None:
        """Have the exporter do ``job``; an exporter that dies meanwhile is started again
        and given the job again, up to EXPORT_ATTEMPTS times (a capture that kills it every
        time stays journaled for the next start, and the others go on)."""
        device_id, capture_id, _dicom = job
        for attempt in range(1, EXPORT_ATTEMPTS + 1):
            if self._stopping.is_set() and self._exporter is None:
                return  # stopped meanwhile: the journal keeps the job for the next start
            proc = self._exporter_process()
            if self._exchange(proc, job):
                return
            try:
                code = proc.wait(10)
            except subprocess.TimeoutExpired:  # it closed its stdout but lives on
                proc.kill()
                code = proc.wait()
            self._exporter = None
            _close_pipes(proc)
            # The temp file of the export it died in (dicom_export names it by process).
            (self.store_dir / device_id / f".{capture_id}.dcm.{proc.pid}{TEMP_SUFFIX}"
             ).unlink(missing_ok=True)
            log_event(log, "gateway.exporter_died", level=logging.ERROR, pid=proc.pid,
                      returncode=code, device_id=device_id, capture_id=capture_id,
                      attempt=attempt)
        log_event(log, "gateway.export_abandoned", level=logging.ERROR, device_id=device_id,
                  capture_id=capture_id, attempts=EXPORT_ATTEMPTS)

    def _exporter_process(self) -> subprocess.Popen[str]:
        if self._exporter is not None and self._exporter.poll() is not None:
            # Died between two jobs: whatever it was doing is done or journaled.
            log_event(log, "gateway.exporter_died", level=logging.ERROR,
                      pid=self._exporter.pid, returncode=self._exporter.returncode)
            _close_pipes(self._exporter)
            self._exporter = None
        if self._exporter is None:
            self._exporter = subprocess.Popen(
                [*self.exporter_command, "--store", str(self.store_dir)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, encoding="utf-8",
                env={**_EXPORTER_MALLOC, **os.environ})
            log_event(log, "gateway.exporter_started", pid=self._exporter.pid)
        return self._exporter

    def _exchange(self, proc: subprocess.Popen[str], job: _Job) -> bool:
        """Send one job and relay the exporter's events until it says done; False if it
        died first."""
        device_id, capture_id, dicom = job
        assert proc.stdin is not None
        assert proc.stdout is not None
        try:
            proc.stdin.write(json.dumps({"device_id": device_id, "capture_id": capture_id,
                                         "dicom": dicom}) + "\n")
            proc.stdin.flush()
        except (BrokenPipeError, ValueError):  # ValueError: closed
            return False
        for line in proc.stdout:
            try:
                said = json.loads(line)
                if said.get("done") is True:
                    return True
                fields = {k: v for k, v in said.items() if k not in ("event", "level")}
                log_event(log, str(said["event"]), level=int(said.get("level", logging.INFO)),
                          **fields)
            except (ValueError, KeyError, TypeError, AttributeError):
                log_event(log, "gateway.exporter_garbled", level=logging.ERROR,
                          line=line[:200])
        return False  # end of its output: it died

    def _stop_exporter(self, timeout: float) -> None:
        proc, self._exporter = self._exporter, None
        if proc is None:
            return
        assert proc.stdin is not None
        assert proc.stdout is not None
        with contextlib.suppress(OSError):
            proc.stdin.close()  # its end of input: it finishes its job and exits
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stdout.close()

    def __enter__(self) -> Gateway:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------------- paho callbacks

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any,
                    reason_code: ReasonCode, properties: Properties | None) -> None:
        if reason_code.is_failure:
            log_event(log, "gateway.connect_refused", level=logging.WARNING,
                      reason=str(reason_code))
            return
        client.subscribe(self.subscription, qos=1)
        log_event(log, "gateway.connected", host=self.host, port=self.port,
                  subscription=self.subscription)

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int,
                      reason_codes: list[ReasonCode], properties: Properties | None) -> None:
        failed = [str(rc) for rc in reason_codes if rc.is_failure]
        if failed:
            log_event(log, "gateway.subscribe_refused", level=logging.ERROR, reasons=failed)
            return
        self._ready.set()

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any,
                       reason_code: ReasonCode, properties: Properties | None) -> None:
        self._ready.clear()
        log_event(log, "gateway.disconnected", level=logging.INFO, reason=str(reason_code))

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        try:
            device_id, capture_id, kind = parse_up_topic(self.prefix, message.topic)
        except (ProtocolError, UnicodeDecodeError) as err:
            log_event(log, "gateway.bad_topic", level=logging.WARNING,
                      topic=repr(message._topic[:200]), detail=str(err)[:200])
            return
        self.metrics.seen(device_id)
        try:
            self._handle_message(device_id, capture_id, kind, message)
        finally:
            # Work of a store whose ack could not be sent still has to be done.
            self._release_held()

    def _handle_message(self, device_id: str, capture_id: str, kind: str,
                        message: mqtt.MQTTMessage) -> None:
        correlation = None
        if message.properties is not None:
            correlation = getattr(message.properties, "CorrelationData", None)
        request: Manifest | Final | None = None
        try:
            if kind == "manifest":
                request = Manifest.decode(message.payload)
                ack = self._handle_manifest(device_id, capture_id, request)
            elif kind == "chunk":
                self._handle_chunk(device_id, capture_id, message.payload)
                return
            else:
                request = Final.decode(message.payload)
                ack = self._handle_final(device_id, capture_id, request)
        except ProtocolError as err:
            log_event(log, "gateway.bad_message", level=logging.WARNING, device_id=device_id,
                      capture_id=capture_id, kind=kind, reason=err.reason, detail=err.detail)
            if kind == "chunk":
                return
            ack = Ack(capture_id, "rejected", req=request_number(message.payload),
                      reason=err.reason)
        except OSError as err:
            # Our disk, not the device's fault: tell it to come back later.
            log_event(log, "gateway.storage_error", level=logging.ERROR, device_id=device_id,
                      capture_id=capture_id, error=str(err))
            ack = Ack(capture_id, "retry", req=request_number(message.payload),
                      reason="storage_error")
        if request is not None and not ack.sha256:
            # Bind the answer to the transfer it answers: a device acts on an incomplete or
            # committed ack only for its own transfer's SHA-256.
            ack = dataclasses.replace(ack, sha256=request.sha256)
        self._send_ack(device_id, ack, correlation)
        if ack.state in ("committed", "rejected"):
            self.metrics.acked(ack.state, ack.reason)
            self._audit_later("ack.sent", device_id=device_id, capture_id=ack.capture_id,
                              state=ack.state, reason=ack.reason)

    def _send_ack(self, device_id: str, ack: Ack, correlation: bytes | None) -> None:
        props = None
        if self._mqtt5:
            props = Properties(PacketTypes.PUBLISH)
            props.MessageExpiryInterval = 600
            if correlation:
                props.CorrelationData = correlation
        payload = dataclasses.replace(ack, device_id=device_id).encode()
        if self.signing_key is not None:
            payload = signing.sign(payload, self.signing_key)
        info = self._client.publish(Topics(self.prefix, device_id).ack(ack.capture_id),
                                    payload, qos=1, properties=props)
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            log_event(log, "gateway.ack_failed", level=logging.WARNING,
                      capture_id=ack.capture_id, rc=str(info.rc))

    # ------------------------------------------------------------------------- the protocol

    def _image_path(self, device_id: str, capture_id: str) -> Path:
        return self.store_dir / device_id / f"{capture_id}.jpg"

    def _ledger_path(self, device_id: str, capture_id: str) -> Path:
        return self._ledger / device_id / f"{capture_id}.json"

    def _committed(self, device_id: str, capture_id: str) -> dict[str, Any] | None:
        """The ledger record if this capture was stored (the image is the commit; the ledger
        remembers it after clinic IT moved the image on to its archive)."""
        try:
            return json.loads(self._ledger_path(device_id, capture_id).read_text("utf-8"))
        except FileNotFoundError:
            pass
        except (OSError, ValueError):
            return {}
        return {} if self._image_path(device_id, capture_id).exists() else None

    def _staging_dir(self, device_id: str, capture_id: str) -> Path:
        return self._staging / device_id / capture_id

    def _staged(self, device_id: str, capture_id: str, fresh: bool = False) -> _Staging | None:
        key = (device_id, capture_id)
        staging = self._open.get(key)
        if staging is not None and not fresh:
            self._open.move_to_end(key)
            return staging
        if staging is not None:
            staging.close()
            del self._open[key]
        staging = _Staging.load(self._staging_dir(device_id, capture_id))
        if staging is not None:
            self._keep_open(key, staging)
        return staging

    def _keep_open(self, key: tuple[str, str], staging: _Staging) -> None:
        old = self._open.pop(key, None)
        if old is not None and old is not staging:
            old.close()
        self._open[key] = staging
        while len(self._open) > _OPEN_STAGINGS:
            _key, oldest = self._open.popitem(last=False)
            oldest.close()

    def _refuse_transfer(self, device_id: str, capture_id: str) -> None:
        """A transfer refused for good: its staging and its journal entry go."""
        self._drop_staging(device_id, capture_id)
        journaling = self._journaling.pop((device_id, capture_id), None)
        if journaling is not None:
            concurrent.futures.wait([journaling])  # or it would write the entry again
        self._pending_path(device_id, capture_id).unlink(missing_ok=True)

    def _journal(self, device_id: str, capture_id: str, m: Manifest) -> None:
        """Journal the after-ack work of a transfer that starts (or resumes), durably, on a
        store thread: by the final it is on disk, and ``_journal_durable`` only checks."""
        key = (device_id, capture_id)
        if len(self._journaling) > 4 * _OPEN_STAGINGS:
            for done in [k for k, f in self._journaling.items() if f.done()]:
                del self._journaling[done]
        self._journaling[key] = self._store_threads().submit(
            self._write_journal, device_id, capture_id, m.sha256, m.size, True)

    def _write_journal(self, device_id: str, capture_id: str, sha256: str, size: int,
                       at_manifest: bool = False) -> _Journaled | None:
        pending = self._pending_path(device_id, capture_id)
        if at_manifest and self._image_path(device_id, capture_id).exists():
            # Committed meanwhile by another receiver of the group, which journaled its own
            # work (an entry now would outlive that work until the next start).
            return None
        make_dirs(pending.parent)
        record = {"capture_id": capture_id, "device_id": device_id, "transfer_sha256": sha256,
                  "size": size, "image": self._image_path(device_id, capture_id).name,
                  "host": _HOST, "pid": os.getpid()}
        return _Journaled(sha256, write_atomic(pending, json.dumps(record).encode(),
                                               mode=FILE_MODE))

    def _journal_durable(self, device_id: str, capture_id: str, m: Manifest) -> Path:
        """The journal entry of this transfer, durable, before the capture is committed:
        normally written when the transfer started (``_journal``); written now if not (a
        failed write, or removed meanwhile by another receiver's start)."""
        pending = self._pending_path(device_id, capture_id)
        journaling = self._journaling.pop((device_id, capture_id), None)
        wrote = False
        if journaling is not None:
            try:
                ours = journaling.result()
            except OSError as err:
                log_event(log, "gateway.journal_failed", level=logging.WARNING,
                          device_id=device_id, capture_id=capture_id, error=str(err))
                ours = None
            if ours is not None and ours.sha256 == m.sha256:
                wrote = True
                with contextlib.suppress(OSError):
                    if os.stat(pending).st_ino == ours.inode:
                        return pending  # the very file we wrote and synced: no need to read it
        try:
            entry = json.loads(pending.read_bytes())
            same = isinstance(entry, dict) and entry.get("transfer_sha256") == m.sha256
        except (OSError, ValueError):
            same = False
        if not same:
            self._write_journal(device_id, capture_id, m.sha256, m.size)
        elif not wrote:
            fsync_dir(pending.parent)  # another receiver's entry: its name on disk too
        return pending

    def _drop_staging(self, device_id: str, capture_id: str, later: bool = False) -> None:
        staging = self._open.pop((device_id, capture_id), None)
        if staging is not None:
            staging.close()
        if not later:
            shutil.rmtree(self._staging_dir(device_id, capture_id), ignore_errors=True)
        # else a committed transfer: its staged megabytes go with its after-ack work.

    def _handle_manifest(self, device_id: str, capture_id: str, m: Manifest) -> Ack:
        if m.capture_id != capture_id:
            raise ProtocolError("bad_message", "manifest capture id differs from its topic")
        done = self._committed(device_id, capture_id)
        if done is not None:
            return self._duplicate_ack(capture_id, m.sha256, m.req, done)
        if m.size > self.max_size:
            return Ack(capture_id, "rejected", req=m.req, reason="too_large")
        if m.content_type not in ACCEPTED_CONTENT_TYPES:
            return Ack(capture_id, "rejected", req=m.req, reason="unsupported_content_type")
        if m.content_type == bundle.CONTENT_TYPE and not self.allow_unsealed:
            return self._refuse_unsealed(device_id, capture_id, m.req)
        if m.content_type == seal.CONTENT_TYPE and not self.private_keys:
            # A configuration problem here, not the device's: it keeps the capture and asks
            # again later, and nothing is transferred that could not be opened.
            log_event(log, "gateway.no_key", level=logging.ERROR, device_id=device_id,
                      capture_id=capture_id)
            return Ack(capture_id, "retry", req=m.req, reason="no_key")
        staged = self._staged(device_id, capture_id, fresh=True)
        same = staged is not None and staged.matches(m.sha256, m.size, m.chunk_size)
        if staged is None or not same:
            # A new transfer (or one with another chunk size after a reconnect to a broker
            # with a smaller packet cap): chunks staged for the old one cannot be reused.
            staged = _Staging.create(self._staging_dir(device_id, capture_id), m)
            self._keep_open((device_id, capture_id), staged)
        self._journal(device_id, capture_id, staged.manifest)
        missing = staged.missing()
        log_event(log, "gateway.manifest", device_id=device_id, capture_id=capture_id,
                  size=m.size, chunks=m.chunk_count, missing=len(missing), resumed=same)
        return Ack(capture_id, "incomplete", req=m.req, missing=tuple(missing),
                   chunk_count=m.chunk_count)

    def _refuse_unsealed(self, device_id: str, capture_id: str, req: int) -> Ack:
        # A patient image in the clear: refused for good (the device quarantines it) rather
        # than stored where sealing is the clinic's promise.
        log_event(log, "gateway.unsealed_rejected", level=logging.ERROR, device_id=device_id,
                  capture_id=capture_id)
        return Ack(capture_id, "rejected", req=req, reason="unsealed")

    def _duplicate_ack(self, capture_id: str, sha256: str, req: int,
                       done: dict[str, Any]) -> Ack:
        stored_sha = done.get("transfer_sha256", "")
        if stored_sha and stored_sha != sha256:
            log_event(log, "gateway.conflict", level=logging.ERROR, capture_id=capture_id)
            return Ack(capture_id, "rejected", req=req, reason="conflict", sha256=stored_sha)
        log_event(log, "gateway.duplicate", capture_id=capture_id)
        return Ack(capture_id, "committed", req=req, sha256=stored_sha)

    def _handle_chunk(self, device_id: str, capture_id: str, payload: bytes) -> None:
        chunk = decode_chunk(payload)
        staged = self._staged(device_id, capture_id)
        if staged is not None and not staged.matches(chunk.sha256.hex(), None, chunk.chunk_size):
            # Another receiver of our group may have started a newer transfer: look again.
            staged = self._staged(device_id, capture_id, fresh=True)
        if staged is None or not staged.matches(chunk.sha256.hex(), None, chunk.chunk_size):
            return  # stale: a chunk of an earlier or already committed transfer
        m = staged.manifest
        if not 0 <= chunk.index < m.chunk_count:
            raise ProtocolError("bad_chunk", f"index {chunk.index} >= {m.chunk_count}")
        expected = min(m.chunk_size, m.size - chunk.index * m.chunk_size)
        if len(chunk.data) != expected:
            raise ProtocolError("bad_chunk", f"chunk {chunk.index} has {len(chunk.data)} "
                                f"bytes, expected {expected}")
        # No fsync: a chunk lost in a power cut fails the SHA-256 and is simply re-sent.
        staged.write(chunk.index, chunk.data)

    def _handle_final(self, device_id: str, capture_id: str, f: Final) -> Ack:
        if f.capture_id != capture_id:
            raise ProtocolError("bad_message", "final capture id differs from its topic")
        done = self._committed(device_id, capture_id)
        if done is not None:
            return self._duplicate_ack(capture_id, f.sha256, f.req, done)
        staged = self._staged(device_id, capture_id)
        if staged is None or staged.manifest.sha256 != f.sha256:
            staged = self._staged(device_id, capture_id, fresh=True)
        if staged is None or staged.manifest.sha256 != f.sha256:
            # We hold no matching manifest (lost staging, or a replayed final): start over.
            return Ack(capture_id, "retry", req=f.req, reason="no_manifest")
        m = staged.manifest
        if m.content_type == bundle.CONTENT_TYPE and not self.allow_unsealed:
            # Staged while the gateway ran in development mode.
            self._refuse_transfer(device_id, capture_id)
            return self._refuse_unsealed(device_id, capture_id, f.req)
        missing = staged.missing()
        if missing:
            return Ack(capture_id, "incomplete", req=f.req, missing=tuple(missing),
                       chunk_count=m.chunk_count)
        data, digest = staged.assembled()
        if len(data) != m.size or digest != m.sha256:
            log_event(log, "gateway.sha256_mismatch", level=logging.WARNING,
                      device_id=device_id, capture_id=capture_id)
            staged.forget_chunks()
            return Ack(capture_id, "incomplete", req=f.req, missing=tuple(range(m.chunk_count)),
                       chunk_count=m.chunk_count, reason="sha256_mismatch")
        if m.content_type == seal.CONTENT_TYPE:
            if not self.private_keys:
                return Ack(capture_id, "retry", req=f.req, reason="no_key")
            opened = self._open_sealed(data, device_id, capture_id)
            if opened is None:
                self._refuse_transfer(device_id, capture_id)
                return Ack(capture_id, "rejected", req=f.req, reason="seal_error")
            data = opened
        try:
            metadata, image = bundle.unpack_view(data)
            if metadata.get("capture_id", capture_id) != capture_id:
                raise bundle.BundleError("metadata names another capture id")
            if _nesting(metadata) > MAX_METADATA_DEPTH:
                raise bundle.BundleError(f"metadata nests deeper than {MAX_METADATA_DEPTH}")
            _check_device(metadata, device_id)
            metadata = self._file_case(device_id, capture_id, metadata)
            sidecar = _sidecar(metadata)
        except DeviceMismatch as err:
            self._refuse_transfer(device_id, capture_id)
            return self._refuse_device_mismatch(device_id, capture_id, f.req, err.claimed)
        except (bundle.BundleError, RecursionError) as err:
            # RecursionError: metadata nested too deep for the JSON parser itself.
            log_event(log, "gateway.bad_bundle", level=logging.ERROR, device_id=device_id,
                      capture_id=capture_id, detail=str(err))
            self._refuse_transfer(device_id, capture_id)
            return Ack(capture_id, "rejected", req=f.req, reason="bad_bundle")
        self._store(device_id, capture_id, m, metadata, sidecar, image)
        self._drop_staging(device_id, capture_id, later=True)
        return Ack(capture_id, "committed", req=f.req, sha256=m.sha256)

    def _open_sealed(self, data: bytes, device_id: str, capture_id: str) -> bytes | None:
        for key in self.private_keys:
            try:
                return seal.open_sealed(data, key, device_id, capture_id)
            except seal.SealError:
                continue  # perhaps sealed to another of our keys (rotation)
        # Tampered, truncated, or sealed to a key we do not hold, or under another id: the
        # seal binds the device id, so a capture sealed as another device's fails here.
        log_event(log, "gateway.seal_error", level=logging.ERROR, device_id=device_id,
                  capture_id=capture_id)
        self._audit_later("seal.error", device_id=device_id, capture_id=capture_id)
        return None

    # ------------------------------------------------------- identities, cases and the audit

    @functools.cached_property
    def audit(self) -> AuditLog:
        """The store's hash-chained audit log (clinic_gateway/audit.py), shared by its gateways."""
        return AuditLog(audit_path(self.store_dir))

    @functools.cached_property
    def cases(self) -> CaseRegistry:
        """Which cases the clinic opened on which device (clinic_gateway/cases.py)."""
        return CaseRegistry(self.store_dir / ".gateway")

    def _audit(self, event: str, **fields: Any) -> None:
        """An audit line for what the gateway did with a device's message. The work is done
        (a capture stored, an ack due) whether or not the line can be written: a failure
        is logged as an error for clinic IT, and the device still gets its answer."""
        try:
            self.audit.append(event, **fields)
        except AuditError as err:
            log_event(log, "gateway.audit_failed", level=logging.ERROR, audit_event=event,
                      error=str(err))

    def _audit_later(self, event: str, **fields: Any) -> None:
        """``_audit`` on the audit thread, in the order asked: what paho's thread records
        about a message. It returns at once, so an ack published just before leaves
        without waiting for the audit log's lock and fsync (``wait_exported`` waits for
        these lines too)."""
        with self._later_done:
            self._later_pending += 1
        self._audits.put((event, fields))

    def _audit_loop(self) -> None:
        # Supervised (``supervised``); _audit itself never raises for the log's sake.
        while (item := self._audits.get()) is not None:
            try:
                self._audit(item[0], **item[1])
            finally:
                with self._later_done:
                    self._later_pending -= 1
                    self._later_done.notify_all()

    def _refuse_device_mismatch(self, device_id: str, capture_id: str, req: int,
                                claimed: object) -> Ack:
        # The broker vouches for the topic's device (its certificate); metadata that names
        # another device is a device speaking for another: refused for good, nothing stored.
        # The claimed id is logged only if it has the form of one: the field is the device's
        # to fill, and free text there could be anything, a patient's name included.
        shown = claimed if isinstance(claimed, str) and DEVICE_ID.match(claimed) \
            else f"<not a device id: {type(claimed).__name__}>"
        log_event(log, "gateway.device_mismatch", level=logging.ERROR, device_id=device_id,
                  capture_id=capture_id, claimed_device_id=shown)
        self._audit_later("capture.device_mismatch", device_id=device_id, capture_id=capture_id,
                    claimed_device_id=shown)
        return Ack(capture_id, "rejected", req=req, reason="device_mismatch")

    def _file_case(self, device_id: str, capture_id: str, metadata: dict) -> dict:
        """The metadata to file: as the device sent it if it claims no case, or a case the
        clinic had open on this device when the capture was taken (``CaseRegistry``);
        otherwise the claimed token is dropped and the capture filed unassigned, marked
        ``case_unverified``, with an event and an audit line naming the case by reference."""
        case = metadata.get("case")
        # The protocol's form is {"token": ..., "assigned": ...}; anything else claiming a
        # case (a bare string, a list...) is a claim that cannot be filed as it stands.
        token = case.get("token") if isinstance(case, dict) else case
        if token is None:
            return metadata
        taken = _timestamp(metadata.get("captured_at"))
        if isinstance(case, dict) and isinstance(token, str) and taken is not None \
                and self.cases.was_open(device_id, token, taken):
            return metadata
        ref = self.cases.ref(token) if isinstance(token, str) else None
        log_event(log, "gateway.case_unverified", level=logging.WARNING, device_id=device_id,
                  capture_id=capture_id, case_ref=ref, captured_at_known=taken is not None)
        self._audit_later("capture.case_unverified", device_id=device_id, capture_id=capture_id,
                    case_ref=ref)
        return {**metadata, "case": {"token": None, "assigned": False, "case_unverified": True}}

    def send_command(self, device_id: str, command: str, timeout: float = 10.0,
                     **args: Any) -> dict[str, Any]:
        """Send a command to a device through ``clinic_gateway.commander`` and return its
        answer; each is audited (``command.sent``, then ``command.answered`` or
        ``command.unanswered``), a case token only by its reference. CommandTimeout if the
        device does not answer."""
        token = args.get("case_token")
        ref = self.cases.ref(token) if isinstance(token, str) else None
        commander = self._commander()
        # No audit line, no command: a command the audit cannot show must not go out.
        self.audit.append("command.sent", device_id=device_id, command=command, case_ref=ref)
        try:
            answer = commander.send(device_id, command, timeout=timeout, **args)
        except OSError as err:  # CommandTimeout, or the broker refused the answer topic
            self._audit("command.unanswered", device_id=device_id, command=command,
                        case_ref=ref, error=type(err).__name__)
            raise
        error = answer.get("error") if isinstance(answer.get("error"), dict) else {}
        self._audit("command.answered", device_id=device_id, command=command, case_ref=ref,
                    ok=answer.get("ok") is True, code=error.get("code"))
        return answer

    def open_case(self, device_id: str, case_token: str, anatomic_site: str | None = None,
                  timeout_s: float = DEFAULT_CASE_TIMEOUT, timeout: float = 10.0
                  ) -> dict[str, Any]:
        """Open a case on a device: recorded in the case registry first (a capture taken the
        moment the device has it is then verifiable), then sent. A device that refuses it
        closes it in the registry again and raises CaseError; a device that does not answer
        raises CommandTimeout and the case stays recorded (it may have opened it: captures
        claiming it are then filed under it, which is what the clinic asked for)."""
        check_device_id(device_id)
        check_case_token(case_token)  # never a CPR number, not even to the registry
        ref = self.cases.opened(device_id, case_token, anatomic_site, timeout_s)
        log_event(log, "gateway.case_opened", device_id=device_id, case_ref=ref)
        args: dict[str, Any] = {"case_token": case_token, "timeout_s": timeout_s}
        if anatomic_site is not None:
            args["anatomic_site"] = anatomic_site
        answer = self.send_command(device_id, "open_case", timeout=timeout, **args)
        if answer.get("ok") is not True:
            self.cases.closed(device_id)
            raise CaseError(f"{device_id} refused open_case: {answer.get('error')}")
        return answer

    def close_case(self, device_id: str, timeout: float = 10.0) -> dict[str, Any]:
        """Close the device's case: recorded first (a capture after this moment is not
        filed under it), then sent."""
        check_device_id(device_id)
        ref = self.cases.closed(device_id)
        log_event(log, "gateway.case_closed", device_id=device_id, case_ref=ref)
        answer = self.send_command(device_id, "close_case", timeout=timeout)
        if answer.get("ok") is not True:
            raise CaseError(f"{device_id} refused close_case: {answer.get('error')}")
        return answer

    def _commander(self) -> Commander:
        # Made on first use (most gateways only receive), signing with the gateway's key and
        # keeping its sequence in the store, which every worker shares.
        with self._commander_lock:
            if self._commander_client is None:
                self._commander_client = Commander(
                    self.host, self.port, self.prefix, protocol=self.protocol,
                    tls=self.command_tls, signing_key=self.signing_key,
                    sequence_file=self.store_dir / ".gateway" / "command-sequence.json")
            return self._commander_client

    def _store(self, device_id: str, capture_id: str, m: Manifest, metadata: dict,
               sidecar: bytes, image: bytes | memoryview) -> None:
        device_dir = self.store_dir / device_id
        make_dirs(device_dir)
        ledger_dir = self._ledger / device_id
        make_dirs(ledger_dir)
        image_path = self._image_path(device_id, capture_id)
        # The image's SHA-256 (for the ledger) and the image's write and fsync run on the
        # store's threads, overlapping the journal's and the sidecar's fsyncs: hashlib,
        # writes and fsyncs all let go of the interpreter lock. The ack still waits for all.
        io = self._store_threads()
        image_sha = io.submit(_sha256, image)
        record: dict[str, Any] = {
            "capture_id": capture_id, "device_id": device_id, "transfer_sha256": m.sha256,
            "size": m.size, "image": image_path.name}
        dicom = self.export_dicom and metadata.get("kind", "capture") == "capture"
        # First the journal of the after-ack work, durably (normally done as the transfer
        # started): a crash anywhere from here on leaves an entry that the next start
        # finishes or undoes (_recover).
        self._journal_durable(device_id, capture_id, m)
        tmp = device_dir / f".{capture_id}.jpg.{os.getpid()}{TEMP_SUFFIX}"
        written = io.submit(_write_synced, tmp, image)
        try:
            write_atomic(device_dir / f"{capture_id}.json", sidecar, mode=FILE_MODE,
                         sync_dir=False)
        finally:
            written.result()  # raises what the image's write raised
        try:
            # The commit point: a link never replaces, so a second receiver (or a replay)
            # racing us finds the image there and stores nothing.
            os.link(tmp, image_path)
        except FileExistsError:
            # The receiver that stored it does the after-ack work and removes the entry.
            tmp.unlink(missing_ok=True)
            return
        tmp.unlink(missing_ok=True)
        fsync_dir(device_dir)
        record["image_sha256"] = image_sha.result()
        # Logged before the ledger is written: a capture committed without its ledger is
        # one whose event may be missing (a kill right after the link), and _recover logs
        # it then. So every stored capture has its event; a kill in the microseconds
        # between this line and the ledger's write repeats it (with ``recovered``).
        log_event(log, "capture.stored", capture_id=capture_id, device_id=device_id,
                  path=str(image_path), sha256=record["image_sha256"], size=len(image))
        # After the commit: the ledger answers duplicates (and tells other content apart)
        # even once the image has been moved away. A crash before it is harmless: the image
        # itself still says "committed", and _recover writes it from the journal. Not
        # fsynced: losing it needs a power cut right now AND the image archived away before
        # a replay; the image is what must be durable.
        write_atomic(self._ledger_path(device_id, capture_id), json.dumps(record).encode(),
                     mode=FILE_MODE, durable=False)
        self.stored_count += 1
        # Before the after-ack work: the exporter removes the staging, whose manifest's age
        # is the transfer's time.
        self.metrics.stored(self._staging_dir(device_id, capture_id))
        self._after_ack((device_id, capture_id, dicom))

    def _store_threads(self) -> concurrent.futures.ThreadPoolExecutor:
        if self._io is None:
            self._io = concurrent.futures.ThreadPoolExecutor(
                max_workers=2, thread_name_prefix="gateway-store")
        return self._io


class DeviceMismatch(ValueError):
    """The metadata names another device than the one the broker let publish it."""

    def __init__(self, claimed: object) -> None:
        super().__init__(f"metadata names device {claimed!r:.80}")
        self.claimed = claimed


class CaseError(RuntimeError):
    """A device refused to open or close a case (the message has its answer)."""


def _check_device(metadata: dict, device_id: str) -> None:
    """DeviceMismatch unless the metadata's ``device_id``, when it has one, is the topic's
    (the identity the broker enforced from the device's certificate)."""
    claimed = metadata.get("device_id", device_id)
    if claimed != device_id:
        raise DeviceMismatch(claimed)


def _timestamp(value: object) -> float | None:
    """A capture's ``captured_at`` (ISO 8601; UTC when no offset) as Unix time, or None."""
    if not isinstance(value, str) or len(value) > 64:
        return None
    try:
        taken = dt.datetime.fromisoformat(value)
    except ValueError:
        return None
    if taken.tzinfo is None:
        taken = taken.replace(tzinfo=dt.UTC)
    return taken.timestamp()


def _nesting(value: Any) -> int:
    """How deep lists and objects nest in ``value`` (counted without recursion, and no
    further than just past MAX_METADATA_DEPTH)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list) and deepest <= MAX_METADATA_DEPTH:
            deepest = max(deepest, depth)
            stack.extend((v, depth + 1) for v in (item.values() if isinstance(item, dict)
                                                   else item))
    return deepest


def _sidecar(metadata: dict) -> bytes:
    """The metadata as stored: strict JSON in UTF-8 (no NaN, no lone surrogate), or a
    BundleError: the device's JSON may hold both."""
    try:
        return json.dumps(metadata, indent=2, sort_keys=True, ensure_ascii=False,
                          allow_nan=False).encode("utf-8")
    except ValueError as err:  # UnicodeEncodeError is one
        raise bundle.BundleError(f"metadata cannot be stored as strict JSON: {err}") from None


def _close_pipes(proc: subprocess.Popen[str]) -> None:
    for stream in (proc.stdin, proc.stdout):
        if stream is not None:
            with contextlib.suppress(OSError):
                stream.close()


def _sha256(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def _write_synced(path: Path, data: bytes | memoryview) -> None:
    """Write a new file and fsync it (the temp file of the image, linked into place)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _guarded(name: str, callback: Callable[..., None]) -> Callable[..., None]:
    """The supervisor of a paho callback, as paho wraps its users' callbacks: an unexpected
    exception is logged with its traceback and goes no further, so paho's network loop (and
    every device's acks) survives it."""
    def guarded(*args: Any) -> None:
        try:
            callback(*args)
        except Exception as err:  # noqa: BLE001 - the supervisor: logged with its traceback
            log_event(log, "gateway.callback_failed", level=logging.ERROR, callback=name,
                      error=repr(err)[:500], traceback=traceback.format_exc())
    return guarded


def supervised(name: str, target: Callable[[], None]) -> None:
    """Run ``target`` (a thread's loop) until it returns; an unexpected exception is logged
    with its traceback (``thread.crashed``) and the loop restarted. The after-ack loop
    consumes the job that raised, so a restart always makes progress."""
    while True:
        try:
            target()
            return
        except Exception as err:  # noqa: BLE001 - the supervisor: logged, loop restarted
            log_event(log, "thread.crashed", level=logging.ERROR, thread_name=name,
                      error=repr(err)[:500], traceback=traceback.format_exc(), restarted=True)


def exit_on_thread_death(done: threading.Event, crashed: list[str]
                         ) -> Callable[[threading.ExceptHookArgs], None]:
    """A ``threading.excepthook`` for the gateway process: a thread died of an exception
    nobody supervised (e.g. paho's network loop), so the gateway may be deaf now. The death
    goes to the JSON log with its traceback, the thread's name to ``crashed``, and ``done``
    is set: main() then exits non-zero and systemd starts the gateway afresh."""
    def thread_died(hook: threading.ExceptHookArgs) -> None:
        name = hook.thread.name if hook.thread is not None else "?"
        log_event(log, "thread.crashed", level=logging.CRITICAL, thread_name=name,
                  error=repr(hook.exc_value)[:500], restarted=False,
                  traceback="".join(traceback.format_exception(
                      hook.exc_type, hook.exc_value, hook.exc_traceback)))
        crashed.append(name)
        done.set()
    return thread_died


def serve_until_done(gateway: Gateway, done: threading.Event, crashed: list[str]) -> int:
    """Run ``gateway`` until ``done`` is set (a signal, or a thread's death, which
    ``crashed`` then names); the process's exit status: 70 (EX_SOFTWARE) after a thread's
    death, so systemd restarts it, else 0.

    SIGINT and SIGTERM are blocked while the gateway starts its threads, which keep that
    mask (and so do the threads they start): the kernel may deliver a process's signal to
    any thread that does not block it, and Python runs the handler only once the main
    thread wakes, which a signal caught by another thread does not do (seen: a SIGTERM that
    went unanswered until the hour-long wait below ran out)."""
    stop_signals = {signal.SIGINT, signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
    try:
        gateway.start()
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, stop_signals)
    while not done.wait(3600):
        pass
    gateway.stop()
    if crashed:
        log_event(log, "gateway.exit", level=logging.CRITICAL, reason="thread crashed",
                  threads=crashed)
        return 70  # EX_SOFTWARE
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="clinic-gateway run",
                                     description="Reference clinic gateway receiver.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=1883)
    parser.add_argument("--store", type=Path, required=True, help="directory for stored images")
    parser.add_argument("--prefix", default="derm/v1", help="topic prefix")
    parser.add_argument("--protocol", choices=("mqtt5", "mqtt311"), default="mqtt5")
    parser.add_argument("--group", default="gateways", help="shared subscription group")
    parser.add_argument("--log", type=Path, help="also write JSON log events to this file")
    parser.add_argument("--key", type=Path, action="append", default=[],
                        help="clinic private key (PEM, X25519) that opens sealed captures; "
                             "repeat during a key rotation")
    parser.add_argument("--ca", type=Path, help="clinic CA (PEM), for a mutual-TLS broker")
    parser.add_argument("--cert", type=Path, help="the gateway's certificate (CN gateway)")
    parser.add_argument("--cert-key", type=Path, help="the gateway's TLS private key")
    parser.add_argument("--signing-key", type=Path,
                        help="the clinic's Ed25519 private key (PEM) that signs every ack; "
                             "devices trust its public half (security.gateway_public_key)")
    parser.add_argument("--insecure-dev-mode", action="store_true",
                        help="development only: also store captures that are not sealed to "
                             "the clinic's key (logged as a warning)")
    args = parser.parse_args(argv)
    tls = None
    if args.ca or args.cert or args.cert_key:
        if not (args.ca and args.cert and args.cert_key):
            parser.error("mutual TLS needs --ca, --cert and --cert-key together")
        tls = {"ca_certs": str(args.ca), "certfile": str(args.cert),
               "keyfile": str(args.cert_key)}
    try:
        keys = [seal.load_private_key(path) for path in args.key]
    except seal.KeyFileError as err:
        parser.error(str(err))
    try:
        signing_key = (signing.load_private_key(args.signing_key)
                       if args.signing_key else None)
    except signing.SigningKeyError as err:
        parser.error(str(err))

    add_json_handler("clinic_gateway", stream=sys.stdout)
    if args.log:
        add_json_handler("clinic_gateway", path=args.log)
    done = threading.Event()
    crashed: list[str] = []
    threading.excepthook = exit_on_thread_death(done, crashed)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    gateway = Gateway(args.host, args.port, args.store, args.prefix, args.protocol, args.group,
                      private_keys=keys, tls=tls, allow_unsealed=args.insecure_dev_mode,
                      signing_key=signing_key)
    return serve_until_done(gateway, done, crashed)


if __name__ == "__main__":
    sys.exit(main())
