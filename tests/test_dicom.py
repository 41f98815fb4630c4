"""The gateway's DICOM export, read back with pydicom."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom.encaps import generate_frames
from pydicom.filereader import dcmread

from clinic_gateway.dicom_export import DERMOSCOPIC_PHOTOGRAPHY, DicomExportError, export
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


_odd_text = st.text(st.characters(exclude_categories=()), max_size=30)
_odd_values = st.recursive(
    st.one_of(st.none(), st.booleans(), _odd_text, st.integers(-(10**40), 10**40),
              st.floats(allow_nan=True, allow_infinity=True)),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_odd_text, inner, max_size=3),
    max_leaves=6)
_FIELDS = ["capture_id", "device_id", "captured_at", "software_version", "camera", "dicom",
           "case", "isic", "pair", "overridden", "quality", "gateway"]


def test_odd_metadata_is_refused_by_name_or_exported(tmp_path, capture):
    """Metadata is the device's, hence hostile: only DicomExportError may leave export()."""
    jpeg, metadata = capture
    done: list[str] = []

    @settings(max_examples=150, deadline=None)
    @given(st.sampled_from(_FIELDS), _odd_values,
           st.sampled_from(["", "LightSourcePolarization", "OpticalMagnificationFactor",
                            "ImmersionMedia", "EmitterColorTemperature"]))
    def export_odd(field: str, value: object, dicom_key: str) -> None:
        odd = {**metadata, field: value}
        if dicom_key:
            odd = {**metadata, "dicom": {**metadata["dicom"], dicom_key: value}}
        try:
            path = export(jpeg, odd, tmp_path / "odd.dcm")
        except DicomExportError:
            done.append("refused")
        else:
            assert dcmread(path).SOPClassUID == DERMOSCOPIC_PHOTOGRAPHY
            done.append("exported")

    export_odd()
    assert "refused" in done
    assert not list(tmp_path.glob(".*"))  # no temp file left by a refusal


@pytest.mark.parametrize(("field", "value", "words"), [
    ("dicom", ["POLARIZED"], "dicom is not an object"),
    ("case", "TD-1", "case is not an object"),
    ("captured_at", 20261125, "captured_at"),
    ("device_id", "derm\\0042", "device_id"),
])
def test_malformed_metadata_is_named(tmp_path, capture, field, value, words):
    jpeg, metadata = capture
    with pytest.raises(DicomExportError, match=words):
        export(jpeg, {**metadata, field: value}, tmp_path / "x.dcm")


def test_dicom_values_of_the_wrong_kind_are_named(tmp_path, capture):
    jpeg, metadata = capture
    for key, value in (("LightSourcePolarization", {"a": 1}), ("ContactMethod", "contact!"),
                       ("OpticalMagnificationFactor", "ten"),
                       ("OpticalMagnificationFactor", float("nan"))):
        with pytest.raises(DicomExportError, match=key):
            export(jpeg, {**metadata, "dicom": {**metadata["dicom"], key: value}},
                   tmp_path / "x.dcm")


@pytest.mark.parametrize(("field", "value", "words"), [
    ("pair", "p-1", "pair is not an object"),
    ("pair", {"pair_id": "p/1", "index": 1, "of": 2}, "pair.pair_id"),
    ("pair", {"pair_id": "p1", "index": 3, "of": 2}, "pair.index"),
    ("pair", {"pair_id": "p1", "index": 1, "of": True}, "pair.of"),
    ("isic", {"anatom_site_general": ["head/neck"]}, "anatom_site_general"),
    ("gateway", {"case_ref": "../x"}, "gateway.case_ref"),
])
def test_malformed_pair_site_or_case_reference_is_named(tmp_path, capture, field, value,
                                                        words):
    jpeg, metadata = capture
    with pytest.raises(DicomExportError, match=words):
        export(jpeg, {**metadata, field: value}, tmp_path / "x.dcm")


def test_the_gateway_s_case_reference_replaces_the_device_s(tmp_path, capture):
    from clinic_gateway.dicom_export import for_gateway

    jpeg, metadata = capture
    claimed = {**metadata, "gateway": {"case_ref": "0" * 32}}
    forged = dcmread(export(jpeg, claimed, tmp_path / "a.dcm"))
    filed = dcmread(export(jpeg, for_gateway(claimed, "1" * 32), tmp_path / "b.dcm"))
    honest = dcmread(export(jpeg, for_gateway(metadata, "1" * 32), tmp_path / "c.dcm"))
    assert filed.StudyInstanceUID == honest.StudyInstanceUID != forged.StudyInstanceUID


def test_times_are_written_in_utc_whatever_offset_the_device_used(tmp_path, capture):
    jpeg, metadata = capture
    ds = dcmread(export(jpeg, {**metadata, "captured_at": "2026-11-25T14:30:00.123+02:00"},
                        tmp_path / "x.dcm"))
    assert ds.TimezoneOffsetFromUTC == "+0000"
    assert ds.AcquisitionDateTime == "20261125123000.123000+0000"
    assert (ds.ContentDate, ds.ContentTime) == ("20261125", "123000.123000")
