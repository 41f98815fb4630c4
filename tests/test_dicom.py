"""The gateway's DICOM export, read back with pydicom."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from pydicom.encaps import generate_frames
from pydicom.filereader import dcmread

from sim.dicom_export import DERMOSCOPIC_PHOTOGRAPHY, DicomExportError, export
from sim.scene import SceneSpec, render


@pytest.fixture
def capture():
    _ok, jpeg = cv2.imencode(".jpg", render(SceneSpec(seed=2)), [cv2.IMWRITE_JPEG_QUALITY, 95])
    metadata = {
        "capture_id": "c0ffee", "device_id": "derm-0042",
        "captured_at": "2026-11-25T12:30:00.123+00:00", "software_version": "0.1.0",
        "camera": {"model": "imx477"},
        "dicom": {"LightSourcePolarization": "POLARIZED", "ContactMethod": "CONTACT",
                  "ImmersionMedia": "NONE", "OpticalMagnificationFactor": 10.0},
        "case": {"token": "TD-2026-000123", "assigned": True},
    }
    return jpeg.tobytes(), metadata


def test_export_reads_back_as_a_dermoscopic_photography_instance(tmp_path, capture):
    jpeg, metadata = capture
    path = export(jpeg, metadata, tmp_path / "c0ffee.dcm")
    ds = dcmread(path)
    assert ds.SOPClassUID == DERMOSCOPIC_PHOTOGRAPHY
    assert ds.SOPClassUID.name == "Dermoscopic Photography Image Storage"
    assert ds.file_meta.TransferSyntaxUID.name == "JPEG Baseline (Process 1)"
    assert ds.Modality == "DMS"
    assert ds.LightSourcePolarization == "POLARIZED"
    assert ds.ContactMethod == "CONTACT"
    assert float(ds.OpticalMagnificationFactor) == 10.0
    assert ds.AccessionNumber == "TD-2026-000123"
    assert ds.PatientName == ""
    assert ds.PatientID == ""
    assert ds.DeviceSerialNumber == "derm-0042"
    assert (ds.Rows, ds.Columns) == (760, 1014)
    (frame,) = generate_frames(ds.PixelData, number_of_frames=1)
    decoded = cv2.imdecode(np.frombuffer(frame, np.uint8), cv2.IMREAD_COLOR)
    assert decoded.shape == (760, 1014, 3)


def test_the_same_capture_exports_to_the_same_instance(tmp_path, capture):
    jpeg, metadata = capture
    a = dcmread(export(jpeg, metadata, tmp_path / "a.dcm"))
    b = dcmread(export(jpeg, metadata, tmp_path / "b.dcm"))
    assert a.SOPInstanceUID == b.SOPInstanceUID
    other = dcmread(export(jpeg, {**metadata, "capture_id": "beef"}, tmp_path / "c.dcm"))
    assert other.SOPInstanceUID != a.SOPInstanceUID
    assert other.StudyInstanceUID == a.StudyInstanceUID  # same case, same study


def test_bad_inputs_are_named(tmp_path, capture):
    jpeg, metadata = capture
    with pytest.raises(DicomExportError, match="not a JPEG"):
        export(b"nope", metadata, tmp_path / "x.dcm")
    with pytest.raises(DicomExportError, match="no JPEG frame header"):
        export(b"\xff\xd8\xff\xe0\x00\x04ab", metadata, tmp_path / "x.dcm")
    with pytest.raises(DicomExportError, match="not a well-formed JPEG"):
        export(b"\xff\xd8\xff\xe0\x00\x04ab" + b"\x00" * 20, metadata, tmp_path / "x.dcm")
    with pytest.raises(DicomExportError, match="capture_id"):
        export(jpeg, {k: v for k, v in metadata.items() if k != "capture_id"},
               tmp_path / "x.dcm")
