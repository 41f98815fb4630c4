"""The gateway's after-ack work, in a process of its own: DICOM export and staging clean-up.

A capture is acknowledged as soon as it is durably stored (``Gateway._store``); what follows
is no part of that promise and must not slow the next capture down: building and checking a
5 MB DICOM file is tens of milliseconds of pure Python, and in the gateway's own process it
held the interpreter lock against paho's network thread. So every gateway runs one exporter
process (``python -m clinic_gateway.exporter --store DIR``), started when it is first needed
and supervised by the gateway (``_ExporterSupervisor`` in clinic_gateway/gateway.py): a dead
exporter is started again and handed the job it died on once more.

The durable feed is the store's journal, ``.gateway/pending/<device>/<capture>.json``,
written before the capture is committed and removed here once its work is done. The gateway
hands the exporter one committed capture at a time over stdin; whatever a crash of either
process interrupts is still in the journal, and the gateway's next start hands it over again
(``Gateway._recover``). Every step is idempotent: the DICOM object is derived from the stored
JPEG and sidecar only (the same object every time), written to a temp file and renamed; a
DICOM file already there is kept; removing staging or the entry twice is harmless. Only
captures of kind ``capture`` become DICOM (the sidecar says).

With ``--forward`` (``[pacs] enabled``) each DICOM file is also made durable and queued for
the PACS (``.gateway/forward/<SOP Instance UID>.json``, clinic_gateway/forwarder.py) before
the journal entry goes: a crash in between queues it again, which is harmless.

Protocol, one JSON object per line:

- gateway -> exporter: ``{"device_id": ..., "capture_id": ..., "dicom": true|false}``
- exporter -> gateway: any number of ``{"event": name, "level": n, ...fields}`` (logged by
  the gateway in its own log, so the exporter needs no log configuration), then
  ``{"done": true}`` for that job.

The exporter ends when its stdin closes (the gateway stopped, or was killed: no orphan
outlives the job it was doing).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
import traceback
from pathlib import Path
from typing import Any, TextIO

from pydicom import dcmread
from pydicom.errors import InvalidDicomError

from clinic_gateway import dicom_export, forwarder
from clinic_gateway.cases import CaseRegistry

#: How much lower the exporter's CPU priority is than the gateway's (``nice``): the export
#: of one capture must never slow the receiving of the next.
NICE = 10


def command(forward: bool) -> tuple[str, ...]:
    """The exporter's command line for ``Gateway.exporter_command`` (``--store`` follows):
    with ``forward``, every DICOM file is queued for the PACS."""
    base = (sys.executable, "-m", "clinic_gateway.exporter")
    return (*base, "--forward") if forward else base


class Exporter:
    def __init__(self, store_dir: Path, out: TextIO, forward: bool = False) -> None:
        self.store_dir = Path(store_dir)
        self.out = out
        self.forward = forward
        self.cases = CaseRegistry(self.store_dir / ".gateway")

    def _say(self, message: dict[str, Any]) -> None:
        self.out.write(json.dumps(message) + "\n")
        self.out.flush()

    def event(self, name: str, level: int = logging.INFO, **fields: Any) -> None:
        self._say({"event": name, "level": level, **fields})

    def run(self, jobs: TextIO) -> None:
        for line in jobs:
            try:
                job = json.loads(line)
                self.do(str(job["device_id"]), str(job["capture_id"]), bool(job["dicom"]))
            except Exception as err:  # noqa: BLE001 - the supervisor: logged, job consumed
                # The journal entry stays: the gateway's next start tries it again.
                self.event("exporter.job_failed", logging.ERROR, error=repr(err)[:500],
                           traceback=traceback.format_exc())
            self._say({"done": True})

    def do(self, device_id: str, capture_id: str, dicom: bool) -> None:
        """One committed capture's after-ack work, then its journal entry goes."""
        entry = self.store_dir / ".gateway" / "pending" / device_id / f"{capture_id}.json"
        image_path = self.store_dir / device_id / f"{capture_id}.jpg"
        path = image_path.with_suffix(".dcm")
        if dicom and not path.exists():
            self.export(image_path, path, device_id, capture_id)
        if dicom and self.forward and path.exists():
            self.enqueue(path, device_id, capture_id)
        shutil.rmtree(self.store_dir / ".gateway" / "staging" / device_id / capture_id,
                      ignore_errors=True)
        entry.unlink(missing_ok=True)

    def export(self, image_path: Path, path: Path, device_id: str, capture_id: str) -> None:
        try:
            image = image_path.read_bytes()
            metadata = json.loads(path.with_suffix(".json").read_text("utf-8"))
            if isinstance(metadata, dict) and metadata.get("kind", "capture") != "capture":
                return  # not a dermoscopic image (a picture of the lesion's context...)
            # The case's study is named by its keyed reference (clinic_gateway/cases.py),
            # never the token: the gateway's word, replacing anything the device sent.
            token = dicom_export.case_token(metadata)
            case_ref = self.cases.ref(token) if token is not None else None
            dicom_export.export(image, dicom_export.for_gateway(metadata, case_ref), path)
        except (dicom_export.DicomExportError, OSError, ValueError) as err:
            # Moved on to the clinic's archive already, unreadable, or metadata the DICOM
            # export cannot use: logged, nothing to export.
            self.event("gateway.dicom_failed", logging.WARNING, device_id=device_id,
                       capture_id=capture_id, error=str(err))


    def enqueue(self, path: Path, device_id: str, capture_id: str) -> None:
        """Queue the DICOM file for the PACS, once it is on disk for good."""
        try:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)  # the queue must never name a file a power cut can take
            finally:
                os.close(fd)
            uid = str(dcmread(path, stop_before_pixels=True,
                              specific_tags=["SOPInstanceUID"]).SOPInstanceUID)
        except (OSError, InvalidDicomError, AttributeError) as err:
            self.event("pacs.enqueue_failed", logging.ERROR, device_id=device_id,
                       capture_id=capture_id, error=str(err)[:300])
            return
        entry = forwarder.ForwardEntry(uid, device_id, capture_id,
                                       str(path.relative_to(self.store_dir)), time.time())
        forwarder.enqueue(self.store_dir, entry)
        self.event("pacs.queued", device_id=device_id, capture_id=capture_id,
                   sop_instance_uid=uid)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m clinic_gateway.exporter",
                                     description="The gateway's after-ack work (started by "
                                                 "the gateway; jobs on stdin).")
    parser.add_argument("--store", type=Path, required=True)
    parser.add_argument("--nice", type=int, default=NICE,
                        help="CPU priority below the gateway's (default %(default)s)")
    parser.add_argument("--forward", action="store_true",
                        help="queue every DICOM file for the PACS (clinic_gateway/forwarder.py)")
    args = parser.parse_args(argv)
    # Background work: on a busy gateway the receiving path gets the CPU first.
    os.nice(args.nice)
    Exporter(args.store, sys.stdout, forward=args.forward).run(sys.stdin)
    return 0


if __name__ == "__main__":
    sys.exit(main())
