"""DICOM export at the reference gateway: a Dermoscopic Photography Image a PACS accepts.

The capture's JPEG goes in unchanged as encapsulated JPEG Baseline pixel data (no second
lossy step), with the Dermoscopic Image module filled from the capture's metadata
(docs/protocol.md, "capture metadata"). UIDs derive from the capture id, so exporting the
same capture twice gives the same instance: idempotent like the rest of the gateway.

Patient module attributes stay empty (type 2): the device never knows the patient. The
clinic's system, which knows what the opaque case token stands for, fills them when it
files the instance; the token travels in Accession Number (when it fits) and the Study
Description.

The metadata comes from a device and is treated as hostile: every field used is checked for
its type and DICOM value representation, and anything unfit is a ``DicomExportError`` that
names the field, never another exception.
"""

from __future__ import annotations

import datetime as dt
import math
import os
import re
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.filereader import dcmread
from pydicom.uid import JPEGBaseline8Bit, generate_uid

DERMOSCOPIC_PHOTOGRAPHY = "1.2.840.10008.5.1.4.1.1.77.1.7"
MODALITY = "DMS"  # dermoscopy
MANUFACTURER = "dermascope"
FILE_MODE = 0o640


class DicomExportError(ValueError):
    """The capture cannot be exported (undecodable image, missing or malformed metadata)."""


# Value representations (DICOM PS3.5 6.2) of the fields filled from the metadata.
_CODE_STRING = re.compile(r"[A-Z0-9 _]{0,16}")  # CS
_DEVICE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
_CAPTURE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_CASE_TOKEN = re.compile(r"[A-Za-z0-9._:-]{1,128}")
# LO text may not hold a backslash (the value separator) nor control characters.
_NOT_LO = re.compile(r"[^\x20-\x5b\x5d-\x7e]")


def _section(metadata: dict[str, Any], key: str) -> dict[str, Any]:
    value = metadata.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise DicomExportError(f"metadata {key} is not an object")
    return value


def _matching(value: Any, pattern: re.Pattern[str], name: str) -> str:
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise DicomExportError(f"metadata {name} is missing or malformed (got {value!r:.40})")
    return value


def _code(section: dict[str, Any], key: str) -> str:
    value = section.get(key)
    return "" if value is None else _matching(value, _CODE_STRING, f"dicom.{key}")


def _decimal(section: dict[str, Any], key: str) -> str:
    """A DS value (at most 16 characters) from a number or a numeric string."""
    value = section.get(key)
    if value is None or value == "":
        return ""
    try:
        number = float(value) if type(value) in (int, float, str) else math.nan
    except ValueError:
        number = math.nan
    if not math.isfinite(number):
        raise DicomExportError(f"metadata dicom.{key} is not a number (got {value!r:.40})")
    return f"{number:.8g}"


def _text(value: Any) -> str:
    """Free text for an LO attribute: printable ASCII, at most 64 characters."""
    return _NOT_LO.sub("?", value if isinstance(value, str) else "")[:64]


def _uid(*parts: str) -> str:
    return generate_uid(entropy_srcs=["dermascope", *parts])


def jpeg_size(jpeg: bytes) -> tuple[int, int]:
    """(rows, columns) from the JPEG's start-of-frame header, without decoding the image
    (decoding 12 MP would cost more than everything else the gateway does)."""
    if jpeg[:2] != b"\xff\xd8":
        raise DicomExportError("the stored image is not a JPEG (no SOI marker)")
    at = 2
    while at + 9 < len(jpeg):
        if jpeg[at] != 0xFF:
            raise DicomExportError("the stored image is not a well-formed JPEG")
        marker = jpeg[at + 1]
        length = int.from_bytes(jpeg[at + 2:at + 4], "big")
        if marker in (0xC0, 0xC1, 0xC2):  # baseline, extended, progressive
            rows = int.from_bytes(jpeg[at + 5:at + 7], "big")
            columns = int.from_bytes(jpeg[at + 7:at + 9], "big")
            return rows, columns
        at += 2 + length
    raise DicomExportError("the stored image has no JPEG frame header")


def build_dataset(jpeg: bytes, metadata: dict[str, Any]) -> Dataset:
    rows, columns = jpeg_size(jpeg)
    if not isinstance(metadata, dict):
        raise DicomExportError("metadata is not an object")
    capture_id = _matching(metadata.get("capture_id"), _CAPTURE_ID, "capture_id")
    device_id = _matching(metadata.get("device_id"), _DEVICE_ID, "device_id")
    try:
        taken = dt.datetime.fromisoformat(metadata.get("captured_at"))
    except (TypeError, ValueError):
        taken = None
    if taken is None or not 1900 <= taken.year <= 9999:
        raise DicomExportError(f"metadata captured_at is missing or not an ISO 8601 time "
                               f"(got {metadata.get('captured_at')!r:.40})")
    dicom = _section(metadata, "dicom")
    case = _section(metadata, "case")
    token = case.get("token")
    if token is not None:
        token = _matching(token, _CASE_TOKEN, "case.token")

    ds = Dataset()
    ds.SOPClassUID = DERMOSCOPIC_PHOTOGRAPHY
    ds.SOPInstanceUID = _uid("instance", capture_id)
    # One study per case (or per device and day when unassigned), one series per device.
    study_key = f"case:{token}" if token else f"device:{device_id}:{taken:%Y%m%d}"
    ds.StudyInstanceUID = _uid("study", study_key)
    ds.SeriesInstanceUID = _uid("series", study_key, device_id)
    ds.Modality = MODALITY
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.InstanceNumber = 1
    ds.SeriesNumber = 1
    # Patient and study: type 2, left for the clinic's system that knows the patient.
    ds.PatientName = ""
    ds.PatientID = ""
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    ds.ReferringPhysicianName = ""
    ds.StudyID = ""
    ds.AccessionNumber = token if token and len(token) <= 16 else ""
    ds.StudyDescription = f"Teledermatology case {token}"[:64] if token else "Unassigned"
    ds.StudyDate = ds.ContentDate = taken.strftime("%Y%m%d")
    ds.StudyTime = ds.ContentTime = taken.strftime("%H%M%S.%f")
    ds.AcquisitionDateTime = taken.strftime("%Y%m%d%H%M%S.%f+0000")
    ds.Manufacturer = MANUFACTURER
    ds.ManufacturerModelName = _text(_section(metadata, "camera").get("model"))
    ds.DeviceSerialNumber = device_id
    ds.SoftwareVersions = _text(metadata.get("software_version"))
    # Dermoscopic Image module
    ds.RecognizableVisualFeatures = "NO"
    ds.LightSourcePolarization = _code(dicom, "LightSourcePolarization")
    ds.ContactMethod = _code(dicom, "ContactMethod")
    ds.ImmersionMedia = _code(dicom, "ImmersionMedia")
    ds.OpticalMagnificationFactor = _decimal(dicom, "OpticalMagnificationFactor")
    ds.AnatomicRegionSequence = []
    ds.AcquisitionContextSequence = []
    # Image pixel: the JPEG as it was stored.
    ds.Rows, ds.Columns = rows, columns
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "YBR_FULL_422"
    ds.PlanarConfiguration = 0
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.LossyImageCompression = "01"
    ds.LossyImageCompressionMethod = "ISO_10918_1"
    ds.PixelData = encapsulate([jpeg])
    ds["PixelData"].VR = "OB"

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.file_meta = meta
    return ds


def export(jpeg: bytes, metadata: dict[str, Any], path: Path) -> Path:
    """Write the DICOM file (atomically) and read it back to check it."""
    ds = build_dataset(jpeg, metadata)
    # Named by process, so two receivers sharing a store never write the same temp file.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        # Created 0640 (not the umask's usual 0644): a patient image, for the gateway's
        # account and group only.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
        with os.fdopen(fd, "wb") as f:
            ds.save_as(f, enforce_file_format=True)
        check(tmp, jpeg)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def check(path: Path, jpeg: bytes) -> Dataset:
    """Read a written file back: the right class, our attributes, the same JPEG inside."""
    ds = dcmread(path)
    if ds.SOPClassUID != DERMOSCOPIC_PHOTOGRAPHY or ds.Modality != MODALITY:
        raise DicomExportError(f"{path}: not a dermoscopic photography instance")
    frames = list(generate_frames(ds.PixelData, number_of_frames=1))
    if frames[0].rstrip(b"\0") != jpeg.rstrip(b"\0"):
        raise DicomExportError(f"{path}: the pixel data is not the stored image")
    return ds
