"""Colour and flat-field calibration: what makes a lesion's colour mean the same on every
device, under both illumination modes.

Per illumination mode, from two frames of the calibration cap:

1. white target -> a gain map (flat field and white balance in one): linear gains per
   channel on a coarse grid that make the white target uniform and neutral. It corrects
   the LED ring's vignetting and its colour;
2. 24-patch chart -> a 3x3 colour correction matrix (Cheung 2004 least squares, from
   colour-science) in linear sRGB, fitted after the gain map; the chart's published values
   are the reference, and Delta E 2000 before and after is reported.

The result gets a calibration id that goes into every capture's metadata, and is applied
to each chosen frame before it is checked and encoded (:meth:`Calibration.apply`).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from dermascope_wire.durable import write_atomic
from device_agent.camera.colour import (
    chart_patch_centres,
    chart_patch_size,
    chart_reference_linear,
    colour,
    delta_e_2000,
    linear_rgb_to_lab,
    srgb_lut_from_linear,
    srgb_lut_to_linear,
)
from device_agent.camera.lens import find_lens_field

CALIBRATION_FILE = "calibration.json"
GRID_WIDTH = 64
MODES = ("polarised", "non_polarised")
# Rows per strip when applying to a frame: bounds the float working copy (12 MP at full
# height would need ~150 MB).
_STRIP = 256
_ENCODE_STEPS = 4096
# 8-bit sRGB -> linear, and linear (in _ENCODE_STEPS steps) -> 8-bit sRGB. From the IEC
# formula rather than colour-science, so that applying a calibration on every capture does
# not load colour-science's 30 MB; tests check both against colour-science.
_TO_LINEAR = srgb_lut_to_linear()
_TO_SRGB = srgb_lut_from_linear(_ENCODE_STEPS)


class CalibrationError(ValueError):
    """The calibration frames or file cannot give a calibration; the message says why."""


@dataclass(frozen=True)
class ModeCalibration:
    gain_map: np.ndarray  # (grid h, grid w, 3) float32, linear gains, RGB order
    ccm: np.ndarray  # (3, 3) linear RGB
    delta_e_before_mean: float
    delta_e_mean: float
    delta_e_max: float
    falloff_before: float
    falloff_after: float

    def figures(self) -> dict[str, float]:
        return {k: round(float(getattr(self, k)), 3) for k in (
            "delta_e_before_mean", "delta_e_mean", "delta_e_max", "falloff_before",
            "falloff_after")}


def _linear(image_bgr: np.ndarray) -> np.ndarray:
    """8-bit sRGB BGR -> linear RGB float32."""
    return _TO_LINEAR[image_bgr[..., ::-1]]


def _field(image_bgr: np.ndarray, what: str) -> tuple[float, float, float]:
    field = find_lens_field(image_bgr)
    if field is None or not field.found or field.coverage < 0.9:
        raise CalibrationError(f"{what}: the lens field is not fully seen; seat the "
                               "calibration cap on the lens and try again")
    return field.cx, field.cy, field.radius


def _disc(shape: tuple[int, int], cx: float, cy: float, radius: float) -> np.ndarray:
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
    return np.hypot(xx - cx, yy - cy) / radius


def falloff(linear: np.ndarray, cx: float, cy: float, radius: float) -> float:
    """Brightness lost from the field's centre to its edge (0.02 = 2 % darker)."""
    r = _disc(linear.shape[:2], cx, cy, radius)
    luminance = linear @ np.array([0.2126, 0.7152, 0.0722], np.float32)
    centre = float(luminance[r < 0.3].mean())
    edge = float(luminance[(r > 0.85) & (r < 0.95)].mean())
    return 1.0 - edge / centre


def _fill(values: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Extend the field's values outwards so that interpolating the grid at the field's
    edge never mixes in the black outside (normalised convolution, a few rounds)."""
    values = values.copy()
    known = valid.astype(np.float32)
    for _ in range(8):
        weight = cv2.GaussianBlur(known, (0, 0), 2.0)
        spread = cv2.GaussianBlur(values * known[..., None], (0, 0), 2.0)
        guess = spread / np.maximum(weight, 1e-6)[..., None]
        grow = (known < 0.5) & (weight > 0.05)
        values[grow] = guess[grow]
        known = np.maximum(known, grow.astype(np.float32))
    values[known < 0.5] = values[known >= 0.5].mean(axis=0)
    return values


def gain_map_from_white(white_bgr: np.ndarray) -> tuple[np.ndarray, float, tuple]:
    cx, cy, radius = _field(white_bgr, "white target")
    linear = _linear(white_bgr)
    h, w = linear.shape[:2]
    inside = (_disc((h, w), cx, cy, radius) < 0.97).astype(np.float32)
    grid = (GRID_WIDTH, max(2, round(GRID_WIDTH * h / w)))
    area = cv2.resize(inside, grid, interpolation=cv2.INTER_AREA)
    sums = cv2.resize(linear * inside[..., None], grid, interpolation=cv2.INTER_AREA)
    valid = area > 0.98
    profile = _fill(sums / np.maximum(area, 1e-6)[..., None], valid)
    profile = cv2.GaussianBlur(profile, (0, 0), 1.0)
    centre = profile[grid[1] // 2, grid[0] // 2]
    if float(centre.min()) < 0.02:
        raise CalibrationError("white target: far too dark; check the LED ring")
    # Uniform and neutral at the level the green channel has in the centre.
    gains = (centre[1] / np.maximum(profile, 1e-4)).astype(np.float32)
    return gains, falloff(linear, cx, cy, radius), (cx, cy, radius)


def _apply_linear(linear_rgb: np.ndarray, gain_map: np.ndarray, ccm: np.ndarray) -> np.ndarray:
    h, w = linear_rgb.shape[:2]
    gains = cv2.resize(gain_map, (w, h), interpolation=cv2.INTER_LINEAR)
    return cv2.transform(linear_rgb * gains, ccm.astype(np.float32))


def patch_means(linear_rgb: np.ndarray, cx: float, cy: float, radius: float) -> np.ndarray:
    half = int(0.2 * chart_patch_size(radius))  # the inner half of each patch
    means = []
    for x, y in chart_patch_centres(cx, cy, radius):
        patch = linear_rgb[int(y) - half:int(y) + half, int(x) - half:int(x) + half]
        means.append(patch.reshape(-1, 3).mean(axis=0))
    return np.array(means)


def calibrate_mode(white_bgr: np.ndarray, chart_bgr: np.ndarray) -> ModeCalibration:
    gain_map, falloff_before, _ = gain_map_from_white(white_bgr)
    cx, cy, radius = _field(chart_bgr, "colour chart")
    chart = _linear(chart_bgr)
    reference = chart_reference_linear()
    measured_raw = patch_means(chart, cx, cy, radius)
    measured = patch_means(_apply_linear(chart, gain_map, np.eye(3)), cx, cy, radius)
    ccm = np.asarray(colour().matrix_colour_correction(measured, reference,
                                                       method="Cheung 2004", terms=3))
    corrected = measured @ ccm.T
    target_lab = linear_rgb_to_lab(reference)
    before = delta_e_2000(linear_rgb_to_lab(measured_raw), target_lab)
    after = delta_e_2000(linear_rgb_to_lab(np.clip(corrected, 0, 1)), target_lab)
    wx, wy, wr = _field(white_bgr, "white target")
    white_after = _apply_linear(_linear(white_bgr), gain_map, np.eye(3))
    return ModeCalibration(gain_map=gain_map, ccm=ccm.astype(np.float32),
                           delta_e_before_mean=float(before.mean()),
                           delta_e_mean=float(after.mean()), delta_e_max=float(after.max()),
                           falloff_before=falloff_before,
                           falloff_after=falloff(white_after, wx, wy, wr))


@dataclass(frozen=True)
class Calibration:
    calibration_id: str
    created: str
    modes: dict[str, ModeCalibration]

    def apply(self, image_bgr: np.ndarray, mode: str) -> np.ndarray:
        """The frame as a calibrated device would have taken it (uncalibrated modes pass
        through unchanged)."""
        cal = self.modes.get(mode)
        if cal is None:
            return image_bgr
        h, w = image_bgr.shape[:2]
        # In BGR throughout: reverse the channel order of the RGB gains and matrix.
        gains = cv2.resize(cal.gain_map[..., ::-1], (w, h), interpolation=cv2.INTER_LINEAR)
        ccm = cal.ccm[::-1, ::-1].astype(np.float32)
        out = np.empty_like(image_bgr)
        for top in range(0, h, _STRIP):
            rows = slice(top, min(h, top + _STRIP))
            linear = cv2.transform(_TO_LINEAR[image_bgr[rows]] * gains[rows], ccm)
            index = np.clip(linear * (_ENCODE_STEPS - 1), 0, _ENCODE_STEPS - 1)
            out[rows] = _TO_SRGB[index.astype(np.uint16)]
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "calibration_id": self.calibration_id,
            "created": self.created,
            "modes": {name: {**cal.figures(),
                             "gain_map": np.round(cal.gain_map, 5).tolist(),
                             "ccm": np.round(cal.ccm, 6).tolist()}
                      for name, cal in self.modes.items()},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Calibration:
        try:
            modes = {}
            for name, m in data["modes"].items():
                gain_map = np.asarray(m["gain_map"], np.float32)
                ccm = np.asarray(m["ccm"], np.float32)
                if gain_map.ndim != 3 or gain_map.shape[2] != 3 or ccm.shape != (3, 3):
                    raise ValueError(f"mode {name}: gain_map or ccm has the wrong shape")
                modes[name] = ModeCalibration(
                    gain_map=gain_map, ccm=ccm,
                    **{k: float(m[k]) for k in ("delta_e_before_mean", "delta_e_mean",
                                                "delta_e_max", "falloff_before",
                                                "falloff_after")})
            return cls(str(data["calibration_id"]), str(data["created"]), modes)
        except (KeyError, TypeError, ValueError) as err:
            raise CalibrationError(f"calibration data is malformed: {err}") from None

    def age_days(self, now: dt.datetime | None = None) -> float:
        created = dt.datetime.fromisoformat(self.created)
        return ((now or dt.datetime.now(dt.UTC)) - created).total_seconds() / 86400


def new_calibration(modes: dict[str, ModeCalibration]) -> Calibration:
    created = dt.datetime.now(dt.UTC)
    digest = hashlib.sha256()
    for name in sorted(modes):
        digest.update(name.encode() + modes[name].gain_map.tobytes() + modes[name].ccm.tobytes())
    return Calibration(f"cal-{created:%Y%m%dT%H%M%SZ}-{digest.hexdigest()[:8]}",
                       created.isoformat(timespec="seconds"), modes)


def calibration_path(state_dir: Path) -> Path:
    return state_dir / CALIBRATION_FILE


def load_calibration(path: Path) -> Calibration | None:
    """The stored calibration, None if the device was never calibrated."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as err:
        raise CalibrationError(f"{path}: cannot read: {err.strerror}") from None
    try:
        return Calibration.from_dict(json.loads(text))
    except ValueError as err:
        raise CalibrationError(f"{path}: {err}") from None


def save_calibration(calibration: Calibration, path: Path) -> None:
    """Atomically, and durably: a calibration that was reported done must survive a
    power cut."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(calibration.to_dict()).encode(), mode=0o644)
