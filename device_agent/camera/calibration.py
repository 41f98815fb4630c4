"""Colour and flat-field calibration: what makes a lesion's colour mean the same on every
device, under both illumination modes.

Per illumination mode, from the calibration cap's targets (docs/operations.md, "Colour
calibration"):

1. white target and grey (~20 %) target, and the chart's six neutral patches -> the tone
   response per channel (:mod:`device_agent.camera.tone`): 8-bit code -> linear light,
   whatever curve the camera's ISP applied;
2. white target, in linear light -> a gain map (flat field and white balance in one): a
   smooth low-order 2-D fit per channel, so off-centre and per-channel vignetting is
   followed in every direction; checked on the grey target (20 %) and the white one;
3. 24-patch chart -> a 3x3 colour correction matrix (Cheung 2004 least squares, from
   colour-science) in linear sRGB, after the tone response and the gain map;
4. the same chart turned half a turn (a second capture: other frames, every patch in
   another place) -> the held-out Delta E 2000 that is stored and reported. Without it,
   the held-out figure is leave-one-out over the chart's patches (weaker: same frames).

Output is re-encoded to sRGB. The result gets a calibration id that goes into every
capture's metadata, and is applied to each chosen frame before it is checked and encoded
(:meth:`Calibration.apply`).
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

from dermascope_wire.durable import StateFileError, read_state, write_atomic
from device_agent.camera.colour import (
    chart_patch_centres,
    chart_patch_size,
    chart_reference_linear,
    colour,
    delta_e_2000,
    linear_rgb_to_lab,
    srgb_lut_from_linear,
)
from device_agent.camera.lens import find_lens_field
from device_agent.camera.tone import ToneData, fit_tone, srgb_tone

CALIBRATION_FILE = "calibration.json"
GRID_WIDTH = 64
MODES = ("polarised", "non_polarised")
# Rows per strip when applying to a frame: bounds the float working copy (12 MP at full
# height would need ~150 MB).
_STRIP = 256
_ENCODE_STEPS = 4096
# linear (in _ENCODE_STEPS steps) -> 8-bit sRGB. From the IEC formula rather than
# colour-science, so that applying a calibration on every capture does not load
# colour-science's 30 MB; tests check it against colour-science.
_TO_SRGB = srgb_lut_from_linear(_ENCODE_STEPS)
NEUTRALS = slice(18, 24)  # the chart's bottom row: white 9.5 down to black 2
_POLY_DEGREE = 6
HELD_OUT_TURNED = "second chart, turned"
HELD_OUT_LOO = "leave-one-out"
class CalibrationError(ValueError):
    """The calibration frames or file cannot give a calibration; the message says why."""


@dataclass(frozen=True)
class ModeCalibration:
    gain_map: np.ndarray  # (grid h, grid w, 3) float32, linear gains, RGB order
    ccm: np.ndarray  # (3, 3) linear RGB
    delta_e_before_mean: float
    delta_e_mean: float  # in-sample: the chart the matrix was fitted to
    delta_e_max: float
    falloff_before: float
    falloff_after: float
    #: (256, 3) float32, 8-bit code -> linear light per channel (RGB)
    tone: np.ndarray | None = None
    #: Delta E 2000 on patches the fit did not see (see heldout_method); the max is over
    #: the patches inside sRGB (the chart's cyan is not)
    heldout_delta_e_mean: float | None = None
    heldout_delta_e_max: float | None = None
    heldout_method: str | None = None
    #: worst 45-degree sector's brightness error, field rim against centre, after the
    #: correction: on the white target, and on the grey one (None: no grey target given)
    flat_white_worst_sector: float | None = None
    flat_grey_worst_sector: float | None = None

    def figures(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k in ("delta_e_before_mean", "delta_e_mean", "delta_e_max", "falloff_before",
                  "falloff_after", "heldout_delta_e_mean", "heldout_delta_e_max",
                  "flat_white_worst_sector", "flat_grey_worst_sector"):
            value = getattr(self, k)
            out[k] = None if value is None else round(float(value), 3)
        out["heldout_method"] = self.heldout_method
        return out

    def to_linear_lut(self) -> np.ndarray:
        return srgb_tone() if self.tone is None else self.tone


def _to_linear(image_bgr: np.ndarray, tone: np.ndarray) -> np.ndarray:
    """8-bit BGR -> linear RGB float32 through a per-channel (RGB) tone LUT."""
    lut = np.ascontiguousarray(tone[:, ::-1].reshape(1, 256, 3).astype(np.float32))
    return cv2.LUT(np.ascontiguousarray(image_bgr), lut)[..., ::-1]


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


def worst_sector(linear: np.ndarray, cx: float, cy: float, radius: float,
                 sectors: int = 8) -> float:
    """The largest brightness error, rim (0.85-0.95 of the radius) against centre, in any
    45-degree sector: a ring average hides a dark side behind a bright one."""
    h, w = linear.shape[:2]
    yy, xx = np.mgrid[0:h, 0:w]
    r = np.hypot(xx - cx, yy - cy) / radius
    sector = ((np.arctan2(yy - cy, xx - cx) + np.pi) / (2 * np.pi) * sectors).astype(int)
    luminance = linear @ np.array([0.2126, 0.7152, 0.0722], np.float32)
    centre = float(luminance[r < 0.3].mean())
    ring = (r > 0.85) & (r < 0.95)
    return max(abs(1.0 - float(luminance[ring & (sector % sectors == s)].mean()) / centre)
               for s in range(sectors))


def _poly_terms(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return np.stack([x ** i * y ** j for i in range(_POLY_DEGREE + 1)
                     for j in range(_POLY_DEGREE + 1 - i)], axis=-1)


def gain_map_from_white(white_linear: np.ndarray, cx: float, cy: float, radius: float
                        ) -> np.ndarray:
    """Gains per channel on a coarse grid that make the white target uniform and neutral,
    from a smooth 2-D polynomial fit of the target in linear light (noise and JPEG blocks
    do not get into the map, and the fit holds up to the field's rim)."""
    h, w = white_linear.shape[:2]
    scale = 160 / w
    small = cv2.resize(white_linear, (160, max(2, round(h * scale))),
                       interpolation=cv2.INTER_AREA)
    sh, sw = small.shape[:2]
    yy, xx = np.mgrid[0:sh, 0:sw].astype(np.float64)
    # small-pixel centres in full-frame coordinates
    x = ((xx + 0.5) / scale - 0.5 - cx) / radius
    y = ((yy + 0.5) / scale - 0.5 - cy) / radius
    inside = np.hypot(x, y) < 0.96
    terms = _poly_terms(x[inside], y[inside])
    grid = (GRID_WIDTH, max(2, round(GRID_WIDTH * h / w)))
    gy, gx = np.mgrid[0:grid[1], 0:grid[0]].astype(np.float64)
    px = ((gx + 0.5) * w / grid[0] - 0.5 - cx) / radius
    py = ((gy + 0.5) * h / grid[1] - 0.5 - cy) / radius
    # Outside the field nothing is seen: hold the rim's value rather than extrapolate.
    rr = np.maximum(np.hypot(px, py), 1e-9)
    shrink = np.minimum(1.0, 1.0 / rr)
    at = _poly_terms(px * shrink, py * shrink)
    centre_terms = _poly_terms(np.zeros(1), np.zeros(1))
    profile = np.empty((grid[1], grid[0], 3))
    centre = np.empty(3)
    for c in range(3):
        coef = np.linalg.lstsq(terms, small[..., c][inside].astype(np.float64), rcond=None)[0]
        profile[..., c] = at @ coef
        centre[c] = float((centre_terms @ coef)[0])
    if float(centre.min()) < 0.02:
        raise CalibrationError("white target: far too dark; check the LED ring")
    # Uniform and neutral at the level the green channel has in the centre.
    return np.clip(centre[1] / np.maximum(profile, 1e-4), 0.1, 10.0).astype(np.float32)


def _corrected_linear(image_bgr: np.ndarray, tone: np.ndarray, gain_map: np.ndarray,
                      ccm: np.ndarray) -> np.ndarray:
    h, w = image_bgr.shape[:2]
    gains = cv2.resize(gain_map, (w, h), interpolation=cv2.INTER_LINEAR)
    return cv2.transform(_to_linear(image_bgr, tone) * gains, ccm.astype(np.float32))


def _patch_windows(cx: float, cy: float, radius: float) -> list[tuple[slice, slice]]:
    half = int(0.2 * chart_patch_size(radius))  # the inner half of each patch
    return [(slice(int(y) - half, int(y) + half), slice(int(x) - half, int(x) + half))
            for x, y in chart_patch_centres(cx, cy, radius)]


def patch_means(image: np.ndarray, cx: float, cy: float, radius: float) -> np.ndarray:
    """(24, channels) means of the chart's patches, in the frame's grid order."""
    return np.array([image[ys, xs].reshape(-1, image.shape[2]).astype(np.float64).mean(0)
                     for ys, xs in _patch_windows(cx, cy, radius)])


def _grey_pairs(white_bgr: np.ndarray, grey_bgr: np.ndarray, cx: float, cy: float,
                radius: float) -> tuple[np.ndarray, np.ndarray]:
    """Grey and white target codes (RGB) at the same places over the field."""
    h, w = white_bgr.shape[:2]
    size = (48, max(2, round(48 * h / w)))
    small_w = cv2.resize(white_bgr.astype(np.float32), size, interpolation=cv2.INTER_AREA)
    small_g = cv2.resize(grey_bgr.astype(np.float32), size, interpolation=cv2.INTER_AREA)
    yy, xx = np.mgrid[0:size[1], 0:size[0]]
    r = np.hypot((xx + 0.5) * w / size[0] - cx, (yy + 0.5) * h / size[1] - cy) / radius
    inside = r < 0.9
    return small_g[inside][:, ::-1], small_w[inside][:, ::-1]


def _neutral_ratios(camera_from_reference: np.ndarray) -> np.ndarray:
    """(6, 3) what each camera channel sees of a neutral patch against a perfectly neutral
    white, given the camera's linear response to the reference colours (3x3): the chart's
    "neutral" patches are a little tinted (its white is 5 % short of blue), the white
    target is not."""
    seen = np.maximum(chart_reference_linear()[NEUTRALS] @ camera_from_reference.T, 1e-4)
    return seen / np.maximum(np.ones(3) @ camera_from_reference.T, 1e-4)


def _neutral_row_on_top(chart_codes: np.ndarray, white_codes: np.ndarray) -> bool:
    """True when the chart's grey row is at the top: against the white target at the same
    places (a rough white balance, whatever the curve), the grey row's patches have the
    least spread between channels."""
    ratio = np.log(np.maximum(chart_codes, 1.0) / np.maximum(white_codes, 1.0))
    spread = ratio.std(axis=1)
    return float(spread[:6].mean()) < float(spread[18:].mean())


def _check_frame(image: np.ndarray, shape: tuple[int, ...], what: str) -> None:
    if image.shape != shape:
        raise CalibrationError(f"{what}: {image.shape[1]}x{image.shape[0]} is not the white "
                               f"target's size {shape[1]}x{shape[0]}; capture every target "
                               "with the same camera settings")


def _chart_delta_e(measured: np.ndarray, reference: np.ndarray) -> np.ndarray:
    return delta_e_2000(linear_rgb_to_lab(np.clip(measured, 0, 1)),
                        linear_rgb_to_lab(reference))


def _fit_ccm(measured: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Least squares in linear light (Cheung 2004) first, then refined to the smallest
    Delta E 2000: linear least squares favours the bright patches, while the eye (and a
    lesion's dark browns and blue-greys) cares about every one alike."""
    start = np.asarray(colour().matrix_colour_correction(measured, reference,
                                                         method="Cheung 2004", terms=3))
    target = linear_rgb_to_lab(reference)

    def residuals(flat: np.ndarray) -> np.ndarray:
        corrected = measured @ flat.reshape(3, 3).T
        return delta_e_2000(linear_rgb_to_lab(np.clip(corrected, 1e-6, None)), target)

    # Levenberg-Marquardt with a numerical Jacobian: 9 unknowns, 24 residuals, bounded
    # to a fixed number of steps.
    x = start.ravel().astype(np.float64)
    r = residuals(x)
    damping = 1e-3
    for _ in range(30):
        jac = np.empty((len(r), 9))
        for j in range(9):
            step = np.zeros(9)
            step[j] = 1e-5
            jac[:, j] = (residuals(x + step) - r) / 1e-5
        normal = jac.T @ jac
        trial = x - np.linalg.solve(normal + damping * np.diag(np.diag(normal) + 1e-9),
                                    jac.T @ r)
        r_trial = residuals(trial)
        if float(r_trial @ r_trial) < float(r @ r):
            x, r, damping = trial, r_trial, damping / 3
        else:
            damping *= 4
            if damping > 1e6:
                break
    return x.reshape(3, 3)


def _in_gamut(reference: np.ndarray) -> np.ndarray:
    return np.all((reference >= 0) & (reference <= 1), axis=1)


def calibrate_mode(white_bgr: np.ndarray, chart_bgr: np.ndarray,
                   grey_bgr: np.ndarray | None = None,
                   check_chart_bgr: np.ndarray | None = None) -> ModeCalibration:
    """Fit one illumination mode (see the module's doc for the targets)."""
    # The chart sits where the white target sat, in the same cap: the field found on the
    # white target (which fills it) holds for every frame; on the chart, the black card
    # would confuse the search.
    cx, cy, radius = _field(white_bgr, "white target")
    for image, what in ((chart_bgr, "colour chart"), (grey_bgr, "grey target"),
                        (check_chart_bgr, "turned colour chart")):
        if image is not None:
            _check_frame(image, white_bgr.shape, what)
    reference = chart_reference_linear()
    windows_white = patch_means(white_bgr[..., ::-1], cx, cy, radius)
    chart_codes = patch_means(chart_bgr[..., ::-1], cx, cy, radius)
    if float(chart_codes[NEUTRALS][0].min()) < 0.25 * float(windows_white[NEUTRALS][0].min()):
        raise CalibrationError("colour chart: its white patch is far darker than the white "
                               "target; seat the chart in the cap, patches towards the lens, "
                               "the dark row at the bottom")
    if _neutral_row_on_top(chart_codes, windows_white):
        raise CalibrationError("colour chart: it is upside down (the grey row is at the top); "
                               "seat it with the dark row at the bottom for this capture, and "
                               "turn it only for the check capture")
    # A clipped end carries no level: the curve there cannot be measured, nor undone.
    if float(windows_white.max()) >= 253:
        raise CalibrationError("white target: clipped (code 253 or more); lower the exposure "
                               "or the LED current and capture again")
    if float(chart_codes[NEUTRALS][-1].min()) < 3:
        raise CalibrationError("colour chart: the black patch is clipped to black; raise "
                               "the exposure or check the camera's black level")
    grey_codes, white_at_grey = ((np.empty((0, 3)), np.empty((0, 3))) if grey_bgr is None
                                 else _grey_pairs(white_bgr, grey_bgr, cx, cy, radius))
    identity = np.eye(3)
    # The neutral patches' tint, as this camera sees it, depends on its colour response,
    # which is known only after a first fit: fit twice.
    camera_from_reference = identity
    for _ in range(2):
        tone = fit_tone(ToneData(neutral=chart_codes[NEUTRALS],
                                 white_at_neutral=windows_white[NEUTRALS],
                                 neutral_ratio=_neutral_ratios(camera_from_reference),
                                 grey=grey_codes, white_at_grey=white_at_grey))
        white_linear = _to_linear(white_bgr, tone)
        gain_map = gain_map_from_white(white_linear, cx, cy, radius)
        measured = patch_means(_corrected_linear(chart_bgr, tone, gain_map, identity),
                               cx, cy, radius)
        ccm = _fit_ccm(measured, reference)
        camera_from_reference = np.linalg.inv(ccm)
    after = _chart_delta_e(measured @ ccm.T, reference)
    assumed_srgb = _to_linear(chart_bgr, srgb_tone())
    before = _chart_delta_e(patch_means(assumed_srgb, cx, cy, radius), reference)
    inside = _in_gamut(reference)
    if check_chart_bgr is not None:
        turned = patch_means(_corrected_linear(check_chart_bgr, tone, gain_map, ccm),
                             cx, cy, radius)
        held = _chart_delta_e(turned[::-1], reference)
        upright = _chart_delta_e(turned, reference)
        if float(upright.mean()) < float(held.mean()):
            raise CalibrationError("turned colour chart: it is the right way up; turn the "
                                   "chart half a turn (180 degrees) in the cap and capture "
                                   "it again")
        method = HELD_OUT_TURNED
    else:
        held = np.array([_chart_delta_e(
            measured[i:i + 1] @ _fit_ccm(np.delete(measured, i, 0),
                                         np.delete(reference, i, 0)).T,
            reference[i:i + 1])[0] for i in range(len(reference))])
        method = HELD_OUT_LOO
    flat_white = _corrected_linear(white_bgr, tone, gain_map, identity)
    flat_grey = (None if grey_bgr is None else
                 worst_sector(_corrected_linear(grey_bgr, tone, gain_map, identity),
                              cx, cy, radius))
    return ModeCalibration(
        gain_map=gain_map, ccm=ccm.astype(np.float32), tone=tone,
        delta_e_before_mean=float(before.mean()), delta_e_mean=float(after.mean()),
        delta_e_max=float(after.max()), falloff_before=falloff(white_linear, cx, cy, radius),
        falloff_after=falloff(flat_white, cx, cy, radius),
        heldout_delta_e_mean=float(held.mean()), heldout_delta_e_max=float(held[inside].max()),
        heldout_method=method,
        flat_white_worst_sector=worst_sector(flat_white, cx, cy, radius),
        flat_grey_worst_sector=flat_grey)


_OPTIONAL_FLOATS = ("heldout_delta_e_mean", "heldout_delta_e_max", "flat_white_worst_sector",
                    "flat_grey_worst_sector")


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
        # In BGR throughout: reverse the channel order of the RGB tables, gains and matrix.
        lut = np.ascontiguousarray(cal.to_linear_lut()[:, ::-1].reshape(1, 256, 3))
        gains = cv2.resize(cal.gain_map[..., ::-1], (w, h), interpolation=cv2.INTER_LINEAR)
        ccm = cal.ccm[::-1, ::-1].astype(np.float32)
        out = np.empty_like(image_bgr)
        for top in range(0, h, _STRIP):
            rows = slice(top, min(h, top + _STRIP))
            linear = cv2.transform(cv2.LUT(np.ascontiguousarray(image_bgr[rows]), lut)
                                   * gains[rows], ccm)
            index = np.clip(linear * (_ENCODE_STEPS - 1), 0, _ENCODE_STEPS - 1)
            out[rows] = _TO_SRGB[index.astype(np.uint16)]
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "calibration_id": self.calibration_id,
            "created": self.created,
            "modes": {name: {**cal.figures(),
                             "gain_map": np.round(cal.gain_map, 5).tolist(),
                             "ccm": np.round(cal.ccm, 6).tolist(),
                             "tone": (None if cal.tone is None else
                                      np.round(cal.tone.T, 7).tolist())}
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
                # Calibrations from before the tone response was measured assumed sRGB.
                tone = m.get("tone")
                tone_lut = None if tone is None else np.asarray(tone, np.float32).T.copy()
                if tone_lut is not None and tone_lut.shape != (256, 3):
                    raise ValueError(f"mode {name}: tone has the wrong shape")
                optional = {k: (None if m.get(k) is None else float(m[k]))
                            for k in _OPTIONAL_FLOATS}
                method = m.get("heldout_method")
                modes[name] = ModeCalibration(
                    gain_map=gain_map, ccm=ccm, tone=tone_lut,
                    heldout_method=None if method is None else str(method), **optional,
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
        digest.update(name.encode() + modes[name].gain_map.tobytes() + modes[name].ccm.tobytes()
                      + modes[name].to_linear_lut().tobytes())
    return Calibration(f"cal-{created:%Y%m%dT%H%M%SZ}-{digest.hexdigest()[:8]}",
                       created.isoformat(timespec="seconds"), modes)


def calibration_path(state_dir: Path) -> Path:
    return state_dir / CALIBRATION_FILE


def load_calibration(path: Path) -> Calibration | None:
    """The stored calibration, None if the device was never calibrated."""
    try:
        return read_state(path, Calibration.from_dict)
    except StateFileError as err:
        raise CalibrationError(str(err)) from None


def save_calibration(calibration: Calibration, path: Path) -> None:
    """Atomically, and durably: a calibration that was reported done must survive a
    power cut."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(calibration.to_dict()).encode(), mode=0o644)
