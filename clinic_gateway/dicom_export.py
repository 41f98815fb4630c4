"""DICOM export at the reference gateway: a Dermoscopic Photography Image a PACS accepts.

The capture's JPEG goes in unchanged as encapsulated JPEG Baseline pixel data (no second
lossy step), with the Dermoscopic Image module filled from the capture's metadata
(docs/protocol.md, "capture metadata"). Every object passes the reference validator
(dicom3tools' ``dciodvfy``) with no error; tests/test_dicom_validator.py runs it.

Identity, all derived, so exporting the same capture twice gives the same object (idempotent
like the rest of the gateway):

- SOP Instance UID: from the capture id (from the device, pair id and position for the two
  images of a pair, so that each can name the other before both have arrived; the agent's
  pair ids are random UUIDs, so these are as unique as capture ids).
- Study: one per case, its UID "2.25.<n>" from the case's *reference* (``case_ref``: the
  gateway's keyed HMAC of the token, sim/cases.py), never from the token itself; a capture
  without a case goes to its device's study of the day (UTC).
- Series: one per light mode (LightSourcePolarization) and device within the study: the
  General Equipment attributes are series-level, so two devices never share a series.
- Study-level attributes are the same on every image of a study: Study Date is the
  capture's (UTC) day, Study Time is empty (the study's start is not known here), Study ID
  the tail of the study's UID.
- Pair: both images share a Frame of Reference and an Acquisition UID, and each lists the
  other in Referenced Image Sequence (purpose (122401, DCM, "Same Anatomy")).

Anatomy: the ISIC ``anatom_site_general`` of the case becomes Anatomic Region Sequence, a
SNOMED CT code from the DICOM context groups (``ANATOMIC_REGIONS``), with Image Laterality
"U" for an unpaired region and empty (unknown) for a paired one: the ISIC general sites never
say which side. A site the map does not know, or none, leaves the region out (the attribute
is type 1C) and the laterality empty.

Patient module attributes stay empty (type 2): the device never knows the patient. The
clinic's system, which knows what the opaque case token stands for, fills them when it
files the instance; the token travels in Accession Number (when it fits) and the Study
Description, never in a UID.

The metadata comes from a device and is treated as hostile: every field used is checked for
its type and DICOM value representation, and anything unfit is a ``DicomExportError`` that
names the field, never another exception. A well-formed value the standard does not define
(an Immersion Media of "NONE", say) is exported as unknown (empty), not refused.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import math
import os
import re
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.filereader import dcmread
from pydicom.uid import JPEGBaseline8Bit, generate_uid

from dermascope_wire.identity import DEVICE_ID

DERMOSCOPIC_PHOTOGRAPHY = "1.2.840.10008.5.1.4.1.1.77.1.7"
MODALITY = "DMS"  # dermoscopy
MANUFACTURER = "dermascope"
FILE_MODE = 0o640


class DicomExportError(ValueError):
    """The capture cannot be exported (undecodable image, missing or malformed metadata)."""


#: The ISIC general anatomic sites (``isic.anatom_site_general``) as a single Anatomic Region
#: Sequence item: (code value, code meaning, laterality), scheme SCT. Codes from the DICOM
#: context groups (PS3.16): CID 4029 "Dermatology Anatomic Site" where it has the region,
#: else CID 4031 "Common Anatomic Regions" or CID 4 "Anatomic Region". Laterality is what
#: Image Laterality can say: "U" for an unpaired region, "" (unknown) for a paired region
#: the ISIC site does not take sides on. "oral/genital" has no code: no concept in these
#: groups covers both the oral mucosa (113277000) and the skin of the external genitalia
#: (60944009), and a wrong region is worse than none.
ANATOMIC_REGIONS: dict[str, tuple[str, str, str]] = {
    "head/neck": ("774007", "Head and Neck", "U"),  # CID 4031
    "upper extremity": ("371311000", "Skin of upper extremity", ""),  # CID 4029
    "lower extremity": ("371304004", "Skin of lower extremity", ""),  # CID 4029
    "anterior torso": ("181491009", "Skin of anterior trunk", "U"),  # CID 4029
    "posterior torso": ("66643007", "Skin of back", "U"),  # CID 4029
    "lateral torso": ("58602004", "Flank", ""),  # CID 4
    "palms/soles": ("66019005", "Extremity", ""),  # CID 4031: palms and soles both
}
#: Enumerated values of the Dermoscopic Image module (PS3.3 C.8.12.13); anything else the
#: device sends is exported as unknown (empty). A dry contact ("NONE", the device's default)
#: has no value of its own in the standard.
LIGHT_SOURCE_POLARIZATION = ("POLARIZED", "NON_POLARIZED")
CONTACT_METHOD = ("CONTACT", "NON_CONTACT")
IMMERSION_MEDIA = ("ULTRASOUND_GEL", "ALCOHOL", "WATER", "MINERAL_OIL", "PLASTIC_CAP")
#: The pair's purpose of reference: the other image shows the same anatomy (under the other
#: light). (122401, DCM, "Same Anatomy"), CID 7210; CID 7201, the baseline for Referenced
#: Image Sequence, is extensible and has no closer concept.
SAME_ANATOMY = ("122401", "DCM", "Same Anatomy")
#: Series Number and Description by light mode ("" : the device did not say).
_SERIES = {"POLARIZED": (1, "Dermoscopy, polarized light"),
           "NON_POLARIZED": (2, "Dermoscopy, non-polarized light"),
           "": (3, "Dermoscopy")}
#: Metadata key under which the gateway hands the exporter what only it knows (the case's
#: keyed reference); it replaces whatever the device put there (``for_gateway``).
GATEWAY = "gateway"

# Value representations (DICOM PS3.5 6.2) of the fields filled from the metadata.
_CODE_STRING = re.compile(r"[A-Z0-9 _]{0,16}")  # CS
_CAPTURE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_CASE_TOKEN = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_CASE_REF = re.compile(r"[A-Za-z0-9]{16,128}")
_PAIR_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
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


def _uid25(*parts: str) -> str:
    """A UUID-derived UID (PS3.5 B.2, "2.25.<n>") from a hash of ``parts``."""
    digest = hashlib.sha256("\x00".join(["dermascope", *parts]).encode()).digest()
    return f"2.25.{int.from_bytes(digest[:16], 'big')}"


def _enumerated(section: dict[str, Any], key: str, allowed: tuple[str, ...]) -> str:
    """A CS value the standard enumerates, or "" (unknown) for any other well-formed one."""
    value = _code(section, key)
    return value if value in allowed else ""


def _pair(metadata: dict[str, Any]) -> tuple[str, int, int] | None:
    """(pair_id, index, of) of an image taken as one of a pair, or None."""
    pair = metadata.get("pair")
    if pair is None:
        return None
    if not isinstance(pair, dict):
        raise DicomExportError("metadata pair is not an object")
    pair_id = _matching(pair.get("pair_id"), _PAIR_ID, "pair.pair_id")
    index, of = pair.get("index"), pair.get("of")
    if type(of) is not int or not 2 <= of <= 8:
        raise DicomExportError(f"metadata pair.of is not 2 to 8 (got {of!r:.40})")
    if type(index) is not int or not 1 <= index <= of:
        raise DicomExportError(f"metadata pair.index is not 1 to {of} (got {index!r:.40})")
    return pair_id, index, of


def _code_item(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def for_gateway(metadata: Any, case_ref: str | None) -> Any:
    """The metadata to export, with what the gateway alone knows: the keyed reference of
    the capture's case (``CaseRegistry.ref(token)``), which names its study. Whatever the
    device put under the same key is replaced."""
    if not isinstance(metadata, dict):
        return metadata
    return {**metadata, GATEWAY: {"case_ref": case_ref}}


def case_token(metadata: Any) -> str | None:
    """The case token the metadata files the capture under (a string), or None."""
    case = metadata.get("case") if isinstance(metadata, dict) else None
    token = case.get("token") if isinstance(case, dict) else None
    return token if isinstance(token, str) else None


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
    device_id = _matching(metadata.get("device_id"), DEVICE_ID, "device_id")
    try:
        taken = dt.datetime.fromisoformat(metadata.get("captured_at"))
        # Written as UTC (TimezoneOffsetFromUTC "+0000"); no offset means UTC (protocol).
        if taken.tzinfo is not None:
            taken = taken.astimezone(dt.UTC)
    except (TypeError, ValueError, OverflowError):
        taken = None
    if taken is None or not 1900 <= taken.year <= 9999:
        raise DicomExportError(f"metadata captured_at is missing or not an ISO 8601 time "
                               f"(got {metadata.get('captured_at')!r:.40})")
    dicom = _section(metadata, "dicom")
    case = _section(metadata, "case")
    token = case.get("token")
    if token is not None:
        token = _matching(token, _CASE_TOKEN, "case.token")
    case_ref = _section(metadata, GATEWAY).get("case_ref")
    if case_ref is not None:
        case_ref = _matching(case_ref, _CASE_REF, f"{GATEWAY}.case_ref")
    isic = _section(metadata, "isic")
    site = isic.get("anatom_site_general")
    if site is not None and not isinstance(site, str):
        raise DicomExportError(f"metadata isic.anatom_site_general is not text "
                               f"(got {site!r:.40})")
    pair = _pair(metadata)
    polarization = _enumerated(dicom, "LightSourcePolarization", LIGHT_SOURCE_POLARIZATION)
    contact = _enumerated(dicom, "ContactMethod", CONTACT_METHOD)
    immersion = _enumerated(dicom, "ImmersionMedia", IMMERSION_MEDIA)
    overridden = metadata.get("overridden") is True
    quality = metadata.get("quality")
    reasons = quality.get("reasons") if isinstance(quality, dict) else None

    ds = Dataset()
    ds.SOPClassUID = DERMOSCOPIC_PHOTOGRAPHY
    ds.TimezoneOffsetFromUTC = "+0000"  # every date and time here is UTC
    # Study: the case (by its keyed reference when the gateway gave it; a hash of the token
    # otherwise, never the token in clear), or the device's day when unassigned.
    if token:
        study_key = f"case-ref:{case_ref}" if case_ref else \
            "case-hash:" + hashlib.sha256(token.encode()).hexdigest()
    else:
        study_key = f"device:{device_id}:{taken:%Y%m%d}"
    ds.StudyInstanceUID = _uid25("study", study_key)
    # Series: one per light mode (and device: General Equipment is series-level).
    ds.SeriesInstanceUID = _uid25("series", ds.StudyInstanceUID, device_id, polarization)
    ds.SeriesNumber, ds.SeriesDescription = _SERIES[polarization]
    if pair is None:
        ds.SOPInstanceUID = _uid("instance", capture_id)
        ds.FrameOfReferenceUID = _uid25("frame-of-reference", device_id, capture_id)
        ds.InstanceNumber = 1
    else:
        # Each image of a pair names the other: both UIDs come from the pair.
        pair_id, index, of = pair
        ds.SOPInstanceUID = _uid25("pair-instance", device_id, pair_id, str(index))
        # Same spot, same moment, the lens on the skin: one frame of reference, one
        # acquisition.
        ds.FrameOfReferenceUID = _uid25("pair-frame-of-reference", device_id, pair_id)
        ds.AcquisitionUID = _uid25("pair-acquisition", device_id, pair_id)
        ds.ImagesInAcquisition = of
        ds.InstanceNumber = index
        references = []
        for other in range(1, of + 1):
            if other == index:
                continue
            ref = Dataset()
            ref.ReferencedSOPClassUID = DERMOSCOPIC_PHOTOGRAPHY
            ref.ReferencedSOPInstanceUID = _uid25("pair-instance", device_id, pair_id,
                                                  str(other))
            ref.PurposeOfReferenceCodeSequence = [_code_item(*SAME_ANATOMY)]
            references.append(ref)
        ds.ReferencedImageSequence = references
    ds.PositionReferenceIndicator = ""  # no patient-based reference point (type 2)
    ds.Modality = MODALITY
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    # Patient and study: type 2, left for the clinic's system that knows the patient.
    ds.PatientName = ""
    ds.PatientID = ""
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    ds.ReferringPhysicianName = ""
    # The study's short id (SH, 16): the tail of its UID, the same for every image of it.
    ds.StudyID = ds.StudyInstanceUID[-16:]
    ds.AccessionNumber = token if token and len(token) <= 16 else ""
    ds.StudyDescription = f"Teledermatology case {token}"[:64] if token else "Unassigned"
    # Study-level, hence the same for every image of the study: the day, not the moment.
    ds.StudyDate = taken.strftime("%Y%m%d")
    ds.StudyTime = ""
    ds.ContentDate = taken.strftime("%Y%m%d")
    ds.ContentTime = taken.strftime("%H%M%S.%f")
    ds.AcquisitionDateTime = taken.strftime("%Y%m%d%H%M%S.%f+0000")
    ds.Manufacturer = MANUFACTURER
    # Enhanced General Equipment: type 1, so never empty.
    ds.ManufacturerModelName = _text(_section(metadata, "camera").get("model")) or "unknown"
    ds.DeviceSerialNumber = device_id
    ds.SoftwareVersions = _text(metadata.get("software_version")) or "unknown"
    # General Image: no patient orientation is known for a lens pressed on the skin.
    ds.PatientOrientation = ""
    region = ANATOMIC_REGIONS.get(site) if site is not None else None
    if region is not None:
        code, meaning, laterality = region
        ds.AnatomicRegionSequence = [_code_item(code, "SCT", meaning)]
        ds.ImageLaterality = laterality
    else:
        ds.ImageLaterality = ""  # unknown region, unknown side
    comments = []
    if site is not None:
        comments.append(f"Anatomic site (ISIC): {_text(site)}.")
    if overridden:
        why = ", ".join(r for r in reasons if isinstance(r, str)) \
            if isinstance(reasons, list) else ""
        comments.append("Kept by the clinician although the quality check asked for a "
                        f"retake{f' ({_text(why)})' if why else ''}.")
    if comments:
        ds.ImageComments = " ".join(comments)
    # Dermoscopic Image module
    ds.RecognizableVisualFeatures = "NO"
    ds.LightSourcePolarization = polarization
    ds.EmitterColorTemperature = _decimal(dicom, "EmitterColorTemperature")
    ds.ContactMethod = contact
    if contact == "CONTACT":
        ds.ImmersionMedia = immersion  # type 2C: empty for a dry contact or unknown
    ds.OpticalMagnificationFactor = _decimal(dicom, "OpticalMagnificationFactor")
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
    """Write the DICOM file (atomically) and read it back to check it. The gateway passes
    ``for_gateway(metadata, case_ref)`` so that a case's study is named by its keyed
    reference."""
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
