"""The metadata that travels with every image.

Field names follow the DICOM Dermoscopic Photography attributes and the ISIC conventions
where they fit (``image_type`` "dermoscopic", ``dermoscopic_type`` "contact polarized" ...),
so the clinic's side can map them without guessing. Never patient data: the only link to a
patient is the clinic's opaque case token, and only when the clinic opened a case.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from pathlib import Path
from typing import Any

from device_agent.camera.base import Frame
from device_agent.config import IlluminationConfig

SCHEMA = "dermascope.capture/1"

# systemd-timesyncd touches this file once the clock is synchronised (timedatectl's
# "System clock synchronized: yes").
_TIMESYNC_FLAG = Path("/run/systemd/timesync/synchronized")

_DERMOSCOPIC_TYPE = {"polarised": "contact polarized", "non_polarised": "contact non-polarized"}


def clock_synced() -> bool:
    return _TIMESYNC_FLAG.exists()


def _camera_settings(frame: Frame) -> dict[str, Any]:
    md = frame.metadata
    return {
        "exposure_time_us": md.get("ExposureTime"),
        "analogue_gain": md.get("AnalogueGain"),
        "lens_position": md.get("LensPosition"),
        "colour_temperature_k": md.get("ColourTemperature"),
    }


def build_metadata(
    *,
    capture_id: str,
    device_id: str,
    frame: Frame,
    camera_model: str,
    captured_at: dt.datetime,
    image: bytes,
    media_type: str,
    quality: dict[str, Any],
    illumination_mode: str,
    illumination: IlluminationConfig,
    brightness: float,
    overridden: bool,
    software_version: str,
    calibration_id: str | None = None,
    case_token: str | None = None,
    anatomic_site: str | None = None,
    pair: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The sidecar of one image (docs/protocol.md, "capture metadata")."""
    height, width = frame.image.shape[:2]
    polarised = illumination_mode == "polarised"
    return {
        "schema": SCHEMA,
        "kind": "capture",  # or "self_test" for a self-test picture sent on request
        "capture_id": capture_id,
        "device_id": device_id,
        "captured_at": captured_at.astimezone(dt.UTC).isoformat(timespec="milliseconds"),
        "clock_synced": clock_synced(),
        "image": {
            "media_type": media_type,
            "width": width,
            "height": height,
            "sha256": hashlib.sha256(image).hexdigest(),
        },
        # DICOM Dermoscopic Photography Image, Dermoscopic Image module (0016,1001-1005).
        "dicom": {
            "LightSourcePolarization": "POLARIZED" if polarised else "NON_POLARIZED",
            "ContactMethod": "CONTACT",
            "ImmersionMedia": illumination.immersion_media,
            "OpticalMagnificationFactor": illumination.magnification,
            "EmitterColorTemperature": illumination.emitter_colour_temperature_k,
        },
        # ISIC archive conventions.
        "isic": {
            "image_type": "dermoscopic",
            "dermoscopic_type": _DERMOSCOPIC_TYPE[illumination_mode],
            "anatom_site_general": anatomic_site,
        },
        "illumination": {"mode": illumination_mode, "brightness": brightness},
        "pair": pair,
        "camera": {"model": camera_model, **_camera_settings(frame)},
        "quality": quality,
        "overridden": overridden,
        "case": {"token": case_token, "assigned": case_token is not None},
        "calibration_id": calibration_id,
        "software_version": software_version,
    }
