"""DICOM export at the reference gateway: a Dermoscopic Photography Image a PACS accepts.

The capture's JPEG goes in unchanged as encapsulated JPEG Baseline pixel data (no second
lossy step), with the Dermoscopic Image module filled from the capture's metadata
(docs/protocol.md, "capture metadata"). UIDs derive from the capture id, so exporting the
same capture twice gives the same instance: idempotent like the rest of the gateway.

Patient module attributes stay empty (type 2): the device never knows the patient. The
clinic's system, which knows what the opaque case token stands for, fills them when it
files the instance; the token travels in Accession Number (when it fits) and the Study
Description.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.filereader import dcmread
from pydicom.uid import JPEGBaseline8Bit, generate_uid

DERMOSCOPIC_PHOTOGRAPHY = "1.2.840.10008.5.1.4.1.1.77.1.7"
MODALITY = "DMS"  # dermoscopy
MANUFACTURER = "dermascope"


class DicomExportError(ValueError):
    """The capture cannot be exported (undecodable image, missing metadata)."""


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
    try:
        capture_id = metadata["capture_id"]
        device_id = metadata["device_id"]
        taken = dt.datetime.fromisoformat(metadata["captured_at"])
    except (KeyError, TypeError, ValueError) as err:
        raise DicomExportError(f"metadata lacks {err}") from None
    dicom = metadata.get("dicom", {})
    case = metadata.get("case") or {}
    token = case.get("token")

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
    ds.ManufacturerModelName = str(metadata.get("camera", {}).get("model", ""))[:64]
    ds.DeviceSerialNumber = device_id
    ds.SoftwareVersions = str(metadata.get("software_version", ""))
    # Dermoscopic Image module
    ds.RecognizableVisualFeatures = "NO"
    ds.LightSourcePolarization = dicom.get("LightSourcePolarization", "")
    ds.ContactMethod = dicom.get("ContactMethod", "")
    ds.ImmersionMedia = dicom.get("ImmersionMedia", "")
    ds.OpticalMagnificationFactor = dicom.get("OpticalMagnificationFactor", "")
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
    tmp = path.with_name(f".{path.name}.tmp")
    ds.save_as(tmp, enforce_file_format=True)
    check(tmp, jpeg)
    tmp.replace(path)
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
