"""On-device image-quality checks for dermoscopic frames (DESIGN.md sections 4 and 10).

Seven checks, each with a score, a threshold and pass/fail; the verdict is ``accept`` or
``retake`` with every failed check named, the cause first (``reasons[0]``, the report's
``primary_reason``: what the clinician acts on). Every check looks only inside the lens field
(:mod:`device_agent.camera.lens`). docs/quality.md explains each measure and how the default
thresholds were set from the simulator's labelled evaluation set.

The measures are chosen to be content-independent: they compare the image with itself (ratios
of gradient energy at two scales, in several directions), or use the field's own histogram, so
that skin tone, a lesion or hairs do not move them much; dense hair lying one way, which would
fake a smear, is found by a black-hat and filled before the blur is measured, and exposure is
judged per channel. All work happens on a copy whose
longer side is at most :data:`WORK_SIZE` pixels, which is what keeps a 12 MP frame cheap.

Score directions (also in each ``Thresholds`` field's comment):

- ``focus``: higher is sharper; passes when ``score >= threshold``.
- ``field``: fraction of the centred lens field that is lit; passes when ``score >= threshold``.
- ``underexposed``: brightness (90th percentile of luma, 0..255); passes when ``>= threshold``.
- ``motion``, ``overexposed``, ``glare``, ``colour``: higher is worse; pass when
  ``score <= threshold``.
"""

from __future__ import annotations

import itertools
import math
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from device_agent.camera import lens
from device_agent.camera.lens import LensField

CHECK_NAMES = ("focus", "motion", "underexposed", "overexposed", "glare", "field", "colour")

# Longer side of the working copy. The defocus the checks must catch (Gaussian sigma 4 px at
# 800x600) is still a 2.5 px blur here, well above the measure's resolution.
WORK_SIZE = 512

# Scales (Gaussian sigma, working pixels) of the two gradient-energy bands the focus and motion
# measures compare.
_FINE_SIGMA = 1.0
_COARSE_SIGMA = 2.0

# Checks that pass when the score is at least the threshold; the others pass when at most.
_HIGHER_IS_BETTER = frozenset({"focus", "underexposed", "field"})


class ImageError(ValueError):
    """An image file could not be read as an image; the message names the file and why."""


def regular_file(path: str | os.PathLike[str]) -> Path:
    """``path`` as a Path, or ImageError if it is missing or not a regular file."""
    p = Path(path)
    if not p.exists():
        raise ImageError(f"{p}: no such file")
    if not p.is_file():
        raise ImageError(f"{p}: not a regular file")
    return p


def load_image(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an image file as HxWx3 uint8 BGR; raise ImageError when that is not possible.

    Trusted files only (the repository's, a bench's): files from a person go through
    :func:`device_agent.camera.imagefile.load_image`, which refuses oversized images from
    their header before decoding."""
    p = regular_file(path)
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise ImageError(f"{p}: cannot read: {exc.strerror or exc}") from exc
    if not data:
        raise ImageError(f"{p}: empty file")
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise ImageError(f"{p}: not a readable image (unknown or corrupt format)")
    return _as_bgr8(image, str(p))


def _as_bgr8(image: np.ndarray, name: str) -> np.ndarray:
    """Normalise a decoded image to 3-channel uint8 BGR, or explain why it cannot be."""
    if image.size == 0 or image.ndim not in (2, 3) or min(image.shape[:2]) < 16:
        raise ImageError(f"{name}: unusable image dimensions {image.shape}; need at least 16x16")
    if image.dtype == np.uint16:
        image = (image >> 8).astype(np.uint8)
    elif image.dtype != np.uint8:
        raise ImageError(f"{name}: unsupported pixel type {image.dtype}")
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    channels = image.shape[2]
    if channels == 1:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    if channels == 3:
        return image
    if channels == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
    raise ImageError(f"{name}: unsupported number of channels {channels}")


@dataclass(frozen=True)
class Thresholds:
    """One threshold per check, by check name; the config's ``[quality]`` table sets them.

    Defaults come from the simulator evaluation (bench/evaluate.py, docs/quality.md).
    """

    # Sharpness: 4 / (estimated blur sigma in the sharpest direction, px at 800 wide). 1.0 is
    # the blur the check must catch (sigma 4 px at 800x600); sharp frames score 2-3.5. Any
    # frame blurred by sigma >= 4 scores <= 1.0 (blurs add), so 1.15 leaves room for noise.
    # (With dense hair, focus is read past the directions the hair fakes; see "Hair".)
    # Pass when score >= focus.
    focus: float = 1.15
    # Directional blur: widest minus narrowest directional blur sigma, px at 800 wide,
    # discounted when it is a small share of the blur across (defocus). Under 1 for sharp
    # frames, under 1.8 for defocused ones, about 3 for a 21 px straight smear. Pass when <=.
    motion: float = 1.8
    # Brightness: 90th percentile of luma inside the field, 0..255. Pass when >=.
    underexposed: float = 40.0
    # Fraction of the field that has lost its colour: two or more channels >= 250, plus half
    # of the bright pixels (luma >= 200) with one. Pass when <=.
    overexposed: float = 0.25
    # Fraction of the field covered by saturated specular blobs (not tiny glints). Pass when <=.
    glare: float = 0.008
    # Fraction of the centred ideal lens field that is lit. Pass when >=.
    field: float = 0.85
    # Distance of the field's median colour from the skin gamut, in log-chromaticity x100
    # (roughly percent of channel-ratio error). Pass when <=.
    colour: float = 5.0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise TypeError(f"quality threshold {f.name} must be a number, got {value!r}")
            if not math.isfinite(value):
                raise ValueError(f"quality threshold {f.name} must be finite, got {value!r}")

    def as_dict(self) -> dict[str, float]:
        return {k: float(v) for k, v in asdict(self).items()}


@dataclass(frozen=True)
class CheckResult:
    """One check's outcome. ``judged`` is False when the frame held nothing the check could
    measure (focus and motion on a field that is almost entirely clipped or nearly black; the
    field in a frame that is black throughout): such a check passes, and the check that found
    the cause (overexposed, underexposed) fails instead."""

    name: str
    score: float
    threshold: float
    passed: bool
    judged: bool = True


@dataclass(frozen=True)
class QualityReport:
    """The checks' results. ``order`` is the cause-first order of the check names for this
    frame (:func:`cause_order`); empty means the vocabulary's order."""

    checks: tuple[CheckResult, ...]
    field: LensField | None
    order: tuple[str, ...] = ()

    @property
    def verdict(self) -> str:
        return "accept" if all(c.passed for c in self.checks) else "retake"

    @property
    def reasons(self) -> list[str]:
        """The failed checks, the cause first (the primary reason), then the others."""
        failed = {c.name for c in self.checks if not c.passed}
        order = self.order or CHECK_NAMES
        return [name for name in order if name in failed]

    @property
    def primary_reason(self) -> str | None:
        """What the clinician acts on (hold still, refocus, press the lens flat, change the
        light): the first reason; None when the frame is accepted."""
        reasons = self.reasons
        return reasons[0] if reasons else None

    @property
    def scores(self) -> dict[str, float]:
        return {c.name: c.score for c in self.checks}

    @property
    def thresholds(self) -> dict[str, float]:
        return {c.name: c.threshold for c in self.checks}

    def to_dict(self) -> dict[str, Any]:
        return {
            "verdict": self.verdict,
            "reasons": self.reasons,
            "primary_reason": self.primary_reason,
            "scores": {k: round(v, 4) for k, v in self.scores.items()},
            "thresholds": {k: round(v, 4) for k, v in self.thresholds.items()},
            "field": self.field.to_dict() if self.field is not None else None,
            "not_judged": [c.name for c in self.checks if not c.judged],
        }


def assess(image: np.ndarray, thresholds: Thresholds | None = None) -> QualityReport:
    """Run every check on a BGR uint8 frame (any size) and return the report."""
    t = thresholds or Thresholds()
    if not isinstance(image, np.ndarray):
        raise ImageError(f"expected a numpy image, got {type(image).__name__}")
    image = _as_bgr8(image, "image")
    work, factor = working_copy(image)
    field, mask = _field_mask(work)

    gray = cv2.cvtColor(work, cv2.COLOR_BGR2GRAY)
    # Working pixels per pixel of an 800-wide frame: blur limits are stated at 800x600.
    px_per_ref = work.shape[1] / REF_WIDTH
    inner = _inner_mask(mask, work)
    # Hairs are thin, dark, sharp and in dense hair lie mostly one way: left in, they make the
    # direction across them look sharper than the skin is, which reads as a smear. They are
    # filled from the skin around them before the blur is measured.
    edges_gray, hair = without_strands(gray, mask)
    sharp, aniso, smear = _focus_and_motion(edges_gray, inner, px_per_ref, hair)
    brightness = _brightness(gray, mask)
    # Focus and motion read edges. A field that is nearly all clipped, or so dark that its
    # edges drown in the noise, has none left to read, which says nothing about focus (the
    # exposure checks report it). Blur neither clips nor darkens, so this cannot hide a blur.
    edges_judged = (
        cv2.countNonZero(inner) >= _MIN_JUDGED_FRACTION * max(1, cv2.countNonZero(mask))
        and brightness >= _MIN_JUDGED_BRIGHTNESS
    )
    # No field in a frame that is black throughout: the lens may be fine and the exposure not;
    # the underexposed check reports that, and the field cannot be judged.
    field_judged = field is not None or float(np.percentile(gray, 99)) >= _MIN_FIELD_LEVEL
    scores = {
        "focus": sharp,
        "motion": aniso,
        "underexposed": brightness,
        "overexposed": _clipped_fraction(work, gray, mask),
        "glare": _glare_fraction(work, gray, mask),
        "field": field.centred_coverage if field is not None else 0.0,
        "colour": _cast_distance(work, mask),
    }
    not_judged = set()
    if not edges_judged:
        not_judged |= {"focus", "motion"}
    if brightness < _MIN_JUDGED_BRIGHTNESS:
        not_judged.add("colour")  # a few gray levels carry no colour worth judging
    if not field_judged:
        not_judged.add("field")
    checks = tuple(
        CheckResult(name, scores[name], float(getattr(t, name)), passed=True, judged=False)
        if name in not_judged
        else _result(name, scores[name], getattr(t, name))
        for name in CHECK_NAMES
    )
    return QualityReport(
        checks=checks,
        field=field.scaled(1.0 / factor) if field else None,
        order=cause_order(smear),
    )


# Which failure can be the consequence of which: exposure decides what every other check sees
# (a dark frame has no field edge and no texture; a clipped one has flat patches and blob
# edges), glare's blobs and a lifted lens's shadow add edges the blur measures read, and none
# of the blur checks can cause the others. So the order of causes is exposure, then glare,
# then the lens field, then colour, then blur.
_CAUSE_ORDER = ("underexposed", "overexposed", "glare", "field", "colour")
# When both blur checks fail, motion is the cause when the smear (widest minus narrowest
# directional blur) is at least this share of the blur across it (the narrowest); below it
# the blur is mostly the same in every direction: defocus, with a little anisotropy beside.
_SMEAR_FIRST = 0.72


def cause_order(smear: float) -> tuple[str, ...]:
    """Every check name, in the order a failure of each is the cause of the others'.

    ``smear`` is the motion spread over the narrowest directional blur (0 when unknown)."""
    blur = ("motion", "focus") if smear >= _SMEAR_FIRST else ("focus", "motion")
    return (*_CAUSE_ORDER, *blur)


# Focus and motion are judged only when at least this fraction of the field is free of
# clipping, and the field's brightness (90th percentile of luma) is at least this.
_MIN_JUDGED_FRACTION = 0.35
_MIN_JUDGED_BRIGHTNESS = 20.0
# With no field found, the field check is judged only if the frame's 99th percentile of luma
# reaches this: below it the frame is simply black.
_MIN_FIELD_LEVEL = 12.0


def _result(name: str, score: float, threshold: float) -> CheckResult:
    score = float(score)
    passed = score >= threshold if name in _HIGHER_IS_BETTER else score <= threshold
    return CheckResult(name=name, score=score, threshold=float(threshold), passed=passed)


# --------------------------------------------------------------------------------------------
# Working copy and masks


def working_copy(image: np.ndarray, size: int = WORK_SIZE) -> tuple[np.ndarray, float]:
    """The image reduced (never enlarged) so its longer side is at most ``size``; and the factor.

    A large frame is first reduced by the whole factor k that keeps it at least ``size``
    long: with a whole factor OpenCV's area resize averages k x k blocks in one pass (its
    fast path), half the cost of a pyramid on 12 MP and a quarter of a general area resize,
    anti-aliased all the same. An area resize of the small result finishes the job.
    """
    h, w = image.shape[:2]
    factor = min(1.0, size / max(h, w))
    if factor == 1.0:
        return image, 1.0
    k = max(h, w) // size
    small = image
    if k >= 2:
        # The last rows and columns beyond a multiple of k are left out: at most k - 1
        # pixels at the frame's edge, outside any lens field.
        rows, cols = h // k, w // k
        small = cv2.resize(image[: rows * k, : cols * k], (cols, rows),
                           interpolation=cv2.INTER_AREA)
    target = (max(1, round(w * factor)), max(1, round(h * factor)))
    return cv2.resize(small, target, interpolation=cv2.INTER_AREA), factor


def _field_mask(work: np.ndarray) -> tuple[LensField | None, np.ndarray]:
    """The lens field (in working coordinates) and its mask; the whole frame when none."""
    field, small_mask = lens.detect(work)
    h, w = work.shape[:2]
    if field is None or small_mask is None:
        return None, np.full((h, w), 255, np.uint8)
    mask = cv2.resize(small_mask, (w, h), interpolation=cv2.INTER_NEAREST)
    # Step in from the rim: the field's edge and its vignetted, softly lit border say nothing
    # about the skin.
    margin = max(1, round(0.03 * field.radius))
    mask = cv2.erode(mask, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * margin + 1,) * 2))
    if cv2.countNonZero(mask) < 64:
        return field, np.full((h, w), 255, np.uint8)
    return field, mask


def _inner_mask(mask: np.ndarray, work: np.ndarray) -> np.ndarray:
    """Mask for the gradient measures: away from the rim (the coarse blur must not reach the
    black outside) and away from clipped pixels (a saturated blob's edge is not focus, and a
    clipped area has lost its detail). May be empty: then there is nothing to judge focus by."""
    k = math.ceil(3 * _COARSE_SIGMA) * 2 + 1
    inner = cv2.erode(mask, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k)))
    # Two or more clipped channels (overexposure, glare): the pixel's detail is flattened, and
    # the flattening has directions of its own. One clipped channel (red on fair skin under a
    # bright ring, or under a strong colour cast) leaves the other two carrying the structure.
    clipped = (_clipped_channels(work) >= 2).astype(np.uint8)
    if clipped.any():
        clipped = cv2.dilate(clipped, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k)))
        inner[clipped > 0] = 0
    return inner


# --------------------------------------------------------------------------------------------
# Hair

# Black-hat (closing minus image) with a disc this wide (working px) finds dark structures
# narrower than it: hairs are 1-2 working px wide (0.5 working px of blur included), lesion dots
# up to 3. Skin furrows and a lesion's rim are wider or much fainter.
_STRAND_KERNEL = 7
# A strand pixel is darker than the closed (hair-free) image by at least this fraction of it
# (contrast, so the same on every skin tone) and by this many noise deviations.
_STRAND_CONTRAST = 0.15
_STRAND_SNR = 4.0
# Filling a strand: normalised Gaussian average of the skin around it, sigma in working px.
_FILL_SIGMA = 2.5
_STRAND_SE = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (_STRAND_KERNEL, _STRAND_KERNEL))
_GROW_SE = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (3, 3))
# Strands are filled when the black-hat lies one way (structure-tensor coherence, 0..1) at
# least this much, and this much more than the white-hat does. On the tuning frames: dense
# hair is 0.09-0.40 ahead of the white-hat; smeared photographs at most 0.065 (a smear streaks
# dark and bright detail alike); sparse hair, skin lines and sharp photographs lie every way.
_STRAND_COHERENCE = 0.25
_HAIR_ONE_WAY = 0.08


def _coherence(rel: np.ndarray, mask: np.ndarray) -> float:
    """How much the structure in ``rel`` lies one way: the structure tensor's coherence over
    the field, 0 (every way) to 1 (one way)."""
    rel = np.where(mask > 0, rel, 0.0).astype(np.float32)
    gx = cv2.Sobel(rel, cv2.CV_32F, 1, 0)
    gy = cv2.Sobel(rel, cv2.CV_32F, 0, 1)
    jxx, jyy = float(cv2.sumElems(gx * gx)[0]), float(cv2.sumElems(gy * gy)[0])
    jxy = float(cv2.sumElems(gx * gy)[0])
    return math.hypot(jxx - jyy, 2 * jxy) / (jxx + jyy) if jxx + jyy > 0 else 0.0


def strand_mask(gray: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, float]:
    """Thin dark high-contrast strands (hairs, lesion dots, a photograph's fine dark detail)
    inside the field, uint8 0/255; and how much more the dark strands lie one way than the
    bright ones do (0 when they do not lie one way at all).

    The morphological black-hat that dermoscopic hair-removal methods (DullRazor and its
    successors) use: the closing fills every dark structure narrower than the kernel, and what
    it filled, relative to the closed level, is the strand. Grown by one pixel for its
    anti-aliased flanks. Hair is dark: dense hair lying one way makes the black-hat lie one way
    (coherence 0.3-0.9) well beyond the white-hat (thin bright detail). A smear streaks dark and
    bright detail alike, and skin lines, a pigment network or sparse hair lie every way."""
    closed = cv2.morphologyEx(gray, cv2.MORPH_CLOSE, _STRAND_SE)
    level = np.maximum(closed.astype(np.float32), 1.0)
    hat = cv2.subtract(closed, gray).astype(np.float32)
    sigma_n = max(noise_sigma(gray, mask), 0.8)
    strands = (hat >= _STRAND_CONTRAST * level) & (hat >= _STRAND_SNR * sigma_n) & (mask > 0)
    dark = _coherence(hat / level, mask)
    one_way = 0.0
    if dark >= _STRAND_COHERENCE:
        opened = cv2.morphologyEx(gray, cv2.MORPH_OPEN, _STRAND_SE)
        bright = _coherence(cv2.subtract(gray, opened).astype(np.float32) / level, mask)
        one_way = max(0.0, dark - bright)
    return cv2.dilate(strands.astype(np.uint8) * 255, _GROW_SE), one_way


def without_strands(gray: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, bool]:
    """``gray`` (uint8) as float32, with hair lying one way replaced by the skin around it;
    and whether there was such hair.

    Only dark strands that lie one way (black-hat coherence at least
    :data:`_STRAND_COHERENCE` and :data:`_HAIR_ONE_WAY` above the white-hat's) are filled: they
    are what fakes a smear. Strands lying every way (sparse hair, skin lines, a pigment
    network, a photograph's fine detail) fake none, and the focus measure's calibration counts
    on them, so they stay. The fill is a normalised Gaussian average of the non-strand pixels
    nearby: smooth, so it adds no edge of its own. Blur elsewhere is untouched: a defocused or
    smeared frame keeps its evidence."""
    g = gray.astype(np.float32)
    strands, one_way = strand_mask(gray, mask)
    if one_way < _HAIR_ONE_WAY or not strands.any():
        return g, False
    keep = (strands == 0).astype(np.float32)
    num = cv2.GaussianBlur(g * keep, (0, 0), _FILL_SIGMA)
    den = cv2.GaussianBlur(keep, (0, 0), _FILL_SIGMA)
    filled = num / np.maximum(den, 1e-3)
    # Where a strand is wider than the fill reaches (a tuft), fall back to the closed image.
    closed = cv2.morphologyEx(gray, cv2.MORPH_CLOSE, _STRAND_SE).astype(np.float32)
    filled = np.where(den > 0.05, filled, closed)
    return np.where(strands > 0, filled, g).astype(np.float32), True


# --------------------------------------------------------------------------------------------
# Focus and motion


def _dog_kernel(sigma: float) -> np.ndarray:
    """1-D derivative-of-Gaussian kernel (column), scaled so that sum(|k|) = 1.

    With that scaling a perfect step edge gives the same peak response, 1/2 of its height, at
    every sigma; an edge blurred by b gives sigma / (2 sqrt(sigma^2 + b^2)).
    """
    half = math.ceil(3 * sigma)
    x = np.arange(-half, half + 1, dtype=np.float32)
    k = -x * np.exp(-(x * x) / (2 * sigma * sigma))
    return (k / np.abs(k).sum()).reshape(-1, 1)


def _gauss_kernel(sigma: float) -> np.ndarray:
    return cv2.getGaussianKernel(2 * math.ceil(3 * sigma) + 1, sigma).astype(np.float32)


_DOG = {s: _dog_kernel(s) for s in (_FINE_SIGMA, _COARSE_SIGMA)}
# Smoothing across the derivative direction. It narrows what each directional measure sees to
# structure running across that direction, so a smear along the motion barely reaches the
# measure across it (an isotropic filter would leak the smear into every direction).
_ACROSS = _gauss_kernel(3.0)
# Response of each filter pair to unit white noise, for the noise-relative edge selection.
_NOISE_GAIN = {
    s: float(np.sqrt((_DOG[s] ** 2).sum() * (_ACROSS**2).sum()))
    for s in (_FINE_SIGMA, _COARSE_SIGMA)
}
# An edge counts when its coarse response is this many noise deviations strong.
_EDGE_SNR = 5.0
# Shading wider than this (Gaussian sigma, working px) is removed before measuring edges.
_SHADING_SIGMA = 6.0

# The 1-D measures run along x and y of the image turned by each of these angles: 12
# directions 15 degrees apart, so the direction across any motion is within 7.5 degrees of one
# of them (and sees at most sin(7.5 deg) = 13 % of the smear).
_ROTATIONS = (0.0, 15.0, 30.0, 45.0, 60.0, 75.0)

# A blur estimate in pixels of an 800-pixel-wide frame: the unit the issue states limits in.
REF_WIDTH = 800.0


def noise_sigma(gray: np.ndarray, mask: np.ndarray) -> float:
    """Sensor noise (standard deviation, gray levels), robust to image structure.

    Immerkaer's operator (the difference of two Laplacians) cancels smooth structure; the
    median of its absolute response over the field, unlike the mean, ignores the edges.
    """
    k = np.array([[1, -2, 1], [-2, 4, -2], [1, -2, 1]], np.float32)
    r = np.abs(cv2.filter2D(gray.astype(np.float32), cv2.CV_32F, k))
    values = r[mask > 0]
    if values.size == 0:
        return 0.0
    # 6 = the operator's gain on white noise (sqrt(36)); 0.6745 turns a median into a sigma.
    return float(np.median(values)) / 0.6745 / 6.0


def _edge_response(sigma: float, blur: np.ndarray, shading: float) -> np.ndarray:
    """Peak response of the sum(|k|)=1 derivative-of-Gaussian at ``sigma`` to a unit step
    blurred by ``blur``, after the shading removal (a Gaussian high-pass at ``shading``)."""
    resp = sigma / (2 * np.sqrt(sigma**2 + blur**2))
    if shading > 0:
        resp = resp - sigma / (2 * np.sqrt(sigma**2 + blur**2 + shading**2))
    return resp


# The edge model, tabulated: blur (working px) -> fine/coarse response ratio. The ratio falls
# monotonically from its value for a sharp step to s1/s2 as blur grows.
_BLUR_GRID = np.linspace(0.0, 40.0, 801)


def _blur_from_ratio(ratio: np.ndarray) -> np.ndarray:
    """Invert the edge model: fine/coarse response ratio -> Gaussian blur (working pixels)."""
    table = _edge_response(_FINE_SIGMA, _BLUR_GRID, _SHADING_SIGMA) / _edge_response(
        _COARSE_SIGMA, _BLUR_GRID, _SHADING_SIGMA
    )
    # np.interp needs increasing x: the ratio falls with blur, so read the table backwards.
    return np.interp(ratio, table[::-1], _BLUR_GRID[::-1])


# The field is judged in tiles, TILES x TILES over its bounding box, and the tiles' verdicts
# combined by a median: a soft shadow edge, a tuft of hair or a lesion's rim is local, while
# defocus and motion blur are the same everywhere.
TILES = 4
_MIN_EDGES_PER_TILE = 12
_STRIDE = 2
_ONE = np.ones((1, 1), np.float32)


def directional_blur(gray: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Blur width (Gaussian sigma, working pixels) per tile and direction: (tiles, 12).

    NaN where a tile has too few edges in that direction to tell.

    Along one direction we filter with the derivative of a 1-D Gaussian at two scales (sigma 1
    and 2) and compare their mean responses on the pixels that hold a real edge (coarse
    response well above the noise). The ratio depends on the edges' blur, not on their
    contrast, the skin tone or what the scene holds, and the edge model turns it into a blur
    width. Defocus widens edges in every direction; motion blur only along the motion, because
    a 1-D filter across the motion does not see the smear.
    """
    g = gray.astype(np.float32)
    m = mask
    # Crop to the field's bounding box: less to turn and filter.
    ys, xs = np.nonzero(m[::4, ::4])
    if len(ys):
        y0, y1 = max(0, ys.min() * 4 - 4), min(m.shape[0], ys.max() * 4 + 5)
        x0, x1 = max(0, xs.min() * 4 - 4), min(m.shape[1], xs.max() * 4 + 5)
        g, m = g[y0:y1, x0:x1], m[y0:y1, x0:x1]
    # Floor: a clipped or posterised frame reads as noiseless, and then every ripple is an edge.
    sigma_n = max(noise_sigma(g, m), 0.8)
    if _SHADING_SIGMA > 0:
        # Take out shading far wider than any blur we measure (vignetting, the soft shadow of a
        # lifted lens): such a ramp would otherwise read as one huge blurred edge. Normalised
        # so that the black outside the mask does not leak in.
        inside = (m > 0).astype(np.float32)
        den = cv2.GaussianBlur(inside, (0, 0), _SHADING_SIGMA)
        low = cv2.GaussianBlur(g * inside, (0, 0), _SHADING_SIGMA) / np.maximum(den, 1e-3)
        g = g - low
    h, w = g.shape
    # Tile label of every pixel, 1..TILES^2 inside the mask and 0 outside; turned with the image.
    rows = np.minimum(np.arange(h) * TILES // max(h, 1), TILES - 1)
    cols = np.minimum(np.arange(w) * TILES // max(w, 1), TILES - 1)
    tiles = (rows[:, None] * TILES + cols[None, :] + 1).astype(np.uint8)
    tiles[m == 0] = 0
    n_bins = TILES * TILES + 1
    blurs = []
    for angle in _ROTATIONS:
        if angle:
            rot = cv2.getRotationMatrix2D((w / 2, h / 2), angle, 1.0)
            # Bicubic: a bilinear turn would itself blur the turned directions measurably.
            gr = cv2.warpAffine(
                g, rot, (w, h), flags=cv2.INTER_CUBIC, borderMode=cv2.BORDER_REFLECT
            )
            tr = cv2.warpAffine(tiles, rot, (w, h), flags=cv2.INTER_NEAREST, borderValue=0)
        else:
            gr, tr = g, tiles
        # Statistics on every other pixel each way: the filters ran on all of them, and a
        # quarter of the edge pixels is plenty for a mean while costing a quarter of the time.
        tr = tr[::_STRIDE, ::_STRIDE]
        inside = tr > 0
        labels = tr[inside]
        for along_x in (True, False):
            # The smoothing across is shared by both scales: filter across once.
            if along_x:
                across = cv2.sepFilter2D(gr, cv2.CV_32F, _ONE, _ACROSS)
            else:
                across = cv2.sepFilter2D(gr, cv2.CV_32F, _ACROSS, _ONE)
            resp = {}
            for sigma in (_FINE_SIGMA, _COARSE_SIGMA):
                k = _DOG[sigma]
                if along_x:
                    d = cv2.sepFilter2D(across, cv2.CV_32F, k, _ONE)
                else:
                    d = cv2.sepFilter2D(across, cv2.CV_32F, _ONE, k)
                resp[sigma] = np.abs(d[::_STRIDE, ::_STRIDE][inside])
            coarse = resp[_COARSE_SIGMA]
            edges = coarse > _EDGE_SNR * sigma_n * _NOISE_GAIN[_COARSE_SIGMA]
            lab = labels[edges]
            count = np.bincount(lab, minlength=n_bins)[1:]
            fine_sum = np.bincount(lab, weights=resp[_FINE_SIGMA][edges], minlength=n_bins)[1:]
            coarse_sum = np.bincount(lab, weights=coarse[edges], minlength=n_bins)[1:]
            with np.errstate(invalid="ignore", divide="ignore"):
                ratio = fine_sum / coarse_sum
            blur = _blur_from_ratio(np.nan_to_num(ratio, nan=1.0))
            blur[count < _MIN_EDGES_PER_TILE] = np.nan
            blurs.append(blur)
    return np.stack(blurs, axis=1)


def per_direction(blurs: np.ndarray) -> np.ndarray:
    """Median over tiles of each direction's blur (NaN for a direction too few tiles saw)."""
    seen = np.count_nonzero(~np.isnan(blurs), axis=0)
    out = np.full(blurs.shape[1], np.nan)
    for i in np.flatnonzero(seen >= _MIN_TILES):
        out[i] = float(np.nanmedian(blurs[:, i]))
    return out


_MIN_TILES = 2
# The motion score is the spread, discounted when the spread is less than this share of the
# blur across the smear: sharp frames show 0.1-0.3, defocused ones 0.05-0.7 (the high end with
# dense hair), a 21 px smear 0.7-2.4.
_SMEAR_SHARE = 0.6
# With dense hair lying one way, focus is read from the third-sharpest direction: the hair
# fakes sharpness in a band of directions across it, a smear leaves a band across it sharp.
_HAIR_SKIP = 2


def _focus_and_motion(
    gray: np.ndarray, mask: np.ndarray, px_per_ref: float, hair: bool = False
) -> tuple[float, float, float]:
    """(focus score, motion score, smear ratio) from the directional blur widths.

    Each direction's blur is the median over the tiles that saw edges across it, in px of an
    800-wide frame. focus = 4 / (blur sigma in the sharpest direction): 1.0 is exactly the
    blur the check must catch (Gaussian sigma 4 px at 800x600); a sharp frame scores 2-4.
    motion = widest minus narrowest directional blur (px at 800 wide): under 1 for isotropic
    blur, about 3.3 for a 21 px straight smear. (Fitting b(phi)^2 = b0^2 + (L^2/12) cos^2(phi
    - m) for a smear length L was tried: it amplifies noise at large blur, and the plain spread
    separates motion from defocus better.)
    """
    per_dir = per_direction(directional_blur(gray, mask)) / px_per_ref
    seen = ~np.isnan(per_dir)
    if not seen.any():
        return 0.0, 0.0, 0.0  # no edge stands out from the noise: nothing in view is sharp
    if np.count_nonzero(seen) < 0.75 * len(per_dir):
        # Too few directions seen to call anything a smear: judge focus alone.
        return 4.0 / max(float(np.nanmin(per_dir)), 0.25), 0.0, 0.0
    # Focus from the sharpest direction (a smear leaves the direction across it sharp); the
    # model's isotropic part reads about the same on defocus but is noisier on a smear.
    best = float(np.nanmin(per_dir))
    spread = float(np.nanmax(per_dir)) - best
    smear = spread / max(best, 0.25)
    if hair:
        # Blurred hairs (too faint for the fill) still read sharper than the skin across
        # them: the focus is read from a direction they cannot reach as much.
        best = float(np.sort(per_dir[seen])[min(_HAIR_SKIP, np.count_nonzero(seen) - 1)])
    # A smear is a blur along one direction that the direction across it does not share. When
    # the spread is a small share of the blur across (defocus: every direction blurred, the
    # spread is estimation noise and the remains of blurred hairs), it is discounted.
    return 4.0 / max(best, 0.25), spread * min(1.0, smear / _SMEAR_SHARE), smear


# --------------------------------------------------------------------------------------------
# Exposure


def _histogram(channel: np.ndarray, mask: np.ndarray) -> np.ndarray:
    return cv2.calcHist([channel], [0], mask, [256], [0, 256]).ravel()


def _percentile(hist: np.ndarray, q: float) -> float:
    total = hist.sum()
    if total <= 0:
        return 0.0
    cdf = np.cumsum(hist) / total
    return float(np.searchsorted(cdf, q / 100.0))


def _brightness(gray: np.ndarray, mask: np.ndarray) -> float:
    return _percentile(_histogram(gray, mask), 90)


# A pixel with one clipped channel counts (half) only when it is this bright: a clipped red
# channel on red or orange content of moderate luma is colour, not exposure.
_ONE_CHANNEL_LUMA = 200


def _clipped_fraction(work: np.ndarray, gray: np.ndarray, mask: np.ndarray) -> float:
    """Fraction of field pixels that have lost their colour: two or more channels clipped,
    and half of each bright pixel with one.

    Judged per channel: skin under white light has red above green above blue, so a bright
    ring on fair skin clips red first while green and blue still hold the texture and the hue
    (a diagnostically fine frame); overexposure, on any tone, clips green as well. A single
    clipped channel (red on fair skin, on orange or red content) does not count.
    """
    n = cv2.countNonZero(mask)
    if n == 0:
        return 0.0
    n_clipped = _clipped_channels(work)
    lost = (n_clipped >= 2).astype(np.uint8) * 255
    # One clipped channel on a bright pixel counts half: the frame is overexposed when that
    # channel is clipped over most of the field (dark skin at x3.5 clips red everywhere and
    # green in the middle), not when a bright ring clips red in the middle of fair skin.
    one = ((n_clipped == 1) & (gray >= _ONE_CHANNEL_LUMA)).astype(np.uint8) * 255
    lost_n = cv2.countNonZero(cv2.bitwise_and(lost, mask))
    one_n = cv2.countNonZero(cv2.bitwise_and(one, mask))
    return (lost_n + 0.5 * one_n) / n


# --------------------------------------------------------------------------------------------
# Glare


_GLARE_MAX_SATURATED = 0.15
# A specular reflection of the LEDs clips every channel; a white object in a well-exposed frame
# (a scar, a label, a white strap in a photograph) usually does not, so the level is clipping.
_GLARE_LEVEL = 250


def _glare_fraction(work: np.ndarray, gray: np.ndarray, mask: np.ndarray) -> float:
    """Area of specular blobs as a fraction of the field.

    A specular blob is a connected patch of clipped white pixels that is (a) bigger than
    an LED glint, (b) local — much smaller than the field, brighter than its surroundings.
    (b) keeps a globally overexposed frame from reading as glare.
    """
    field_area = cv2.countNonZero(mask)
    if field_area == 0:
        return 0.0
    white = cv2.min(cv2.min(work[..., 0], work[..., 1]), work[..., 2]) >= _GLARE_LEVEL
    white = cv2.bitwise_and(white.astype(np.uint8) * 255, mask)
    # When much of the field is saturated the frame is overexposed, and saturated patches are
    # exposure, not reflections: that is the overexposed check's finding, not glare's.
    if cv2.countNonZero(white) > _GLARE_MAX_SATURATED * field_area:
        return 0.0
    n, labels, stats, _ = cv2.connectedComponentsWithStats(white, connectivity=8)
    min_area = max(4, 0.0008 * field_area)
    max_area = 0.25 * field_area
    h, w = gray.shape
    total = 0
    for i in range(1, n):
        area = int(stats[i, cv2.CC_STAT_AREA])
        if area < min_area or area > max_area:
            continue
        x, y, bw, bh = stats[i, :4]
        pad = max(3, int(0.5 * math.sqrt(area)))
        x0, y0 = max(0, x - pad), max(0, y - pad)
        x1, y1 = min(w, x + bw + pad), min(h, y + bh + pad)
        blob = (labels[y0:y1, x0:x1] == i).astype(np.uint8)
        ring = cv2.dilate(blob, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * pad + 1,) * 2))
        ring = cv2.bitwise_and(ring - blob, (mask[y0:y1, x0:x1] > 0).astype(np.uint8))
        if cv2.countNonZero(ring) == 0:
            continue
        surround = cv2.mean(gray[y0:y1, x0:x1], ring)[0]
        if surround < 215:  # stands out from its surroundings: a reflection, not exposure
            total += area
    return total / field_area


# --------------------------------------------------------------------------------------------
# Colour

# Skin colour in log-chromaticity u = ln(R/G), v = ln(B/G): exposure cancels out, and a wrong
# white balance (channel gains) is a plain shift. Skin, lesions included, has red above green
# and well above blue; no skin is green, cyan or blue. The gamut is the convex region
#   u >= 0.04,  u - v >= 0.12,  v <= 0.15,  u <= 1.3,  v >= -1.4,  u + v >= -0.25
# drawn generously around skin tones from very fair to very dark, with erythema and pigment.
# The last edge is the skin locus: melanin and haemoglobin take blue out of skin and leave red,
# so the less blue a skin holds (the darker it is) the redder it is; skin lies along
# u + v ~ 0 from type I to type VI (pristine frames -0.10..0.35). Without that edge a cast
# towards green on dark skin (R/G and B/G both down) stopped in the empty corner of low u and
# low v (about (0.0, -0.6)), inside an absolute range yet far from any skin of that blueness.
_GAMUT = (
    (0.04, -0.08),
    (0.27, 0.15),
    (0.4, 0.15),
    (1.3, -0.1),
    (1.3, -1.4),
    (1.15, -1.4),
    (0.04, -0.29),
)


# Where a colour can really lie when one channel's median reads clipped (B, G, R order): the
# true B/G is higher than a clipped blue reads, both ratios lower under a clipped green, the
# true R/G higher under a clipped red.
_CLIPPED_RAYS = ((0.0, 1.0), (-1.0, -1.0), (1.0, 0.0))
_RAY_STEPS = np.linspace(0.0, 1.5, 61)


def _clipped_channels(work: np.ndarray) -> np.ndarray:
    """Per pixel, how many of the three channels are clipped (>= 250)."""
    return np.count_nonzero(work >= 250, axis=2).astype(np.uint8)


def _cast_distance(work: np.ndarray, mask: np.ndarray) -> float:
    """Distance (x100, log-chromaticity) of the field's median colour from the skin gamut.

    Pixels with no clipped channel count: a clipped channel has lost its colour. When almost
    none are left, pixels with exactly one clipped channel stand in: clipping only pulls a
    colour towards neutral, so a cast seen through it is real (a strong blue cast clips blue
    first). Pixels with two or three clipped channels are overexposure, not colour.
    """
    n_clipped = _clipped_channels(work)
    field_px = max(1, cv2.countNonZero(mask))
    m = cv2.bitwise_and(mask, (n_clipped == 0).astype(np.uint8) * 255)
    if cv2.countNonZero(m) < 0.05 * field_px:
        m = cv2.bitwise_and(mask, (n_clipped <= 1).astype(np.uint8) * 255)
        if cv2.countNonZero(m) < 0.05 * field_px:
            return 0.0  # nearly all clipped: nothing to judge; the overexposed check says so
    medians = [_percentile(_histogram(work[..., c], m), 50) for c in range(3)]
    b, g, r = (x + 0.5 for x in medians)
    u, v = math.log(r / g), math.log(b / g)
    # A median that reads clipped is only a lower bound on that channel: the true colour lies
    # somewhere along a ray from (u, v). Red clipped on skin under too much light lowers R/G
    # alone, which on dark skin (low B/G) would cross the skin locus and read as a green cast.
    # The cast is judged at the point of the ray nearest the gamut.
    rays = [ray for ray, x in zip(_CLIPPED_RAYS, medians, strict=True) if x >= 250]
    if not rays:
        return 100.0 * skin_gamut_distance(u, v)
    if len(rays) > 1:
        return 0.0  # two channels' colour lost: the overexposed check judges it
    du, dv = rays[0]
    return 100.0 * min(skin_gamut_distance(u + t * du, v + t * dv) for t in _RAY_STEPS)


def skin_gamut_distance(u: float, v: float) -> float:
    """How far (u, v) = (ln R/G, ln B/G) lies outside the skin gamut polygon; 0 inside."""
    p = np.array([u, v])
    poly = np.array((*_GAMUT, _GAMUT[0]))
    inside = cv2.pointPolygonTest(
        poly[:-1].astype(np.float32).reshape(-1, 1, 2), (float(u), float(v)), False
    )
    if inside >= 0:
        return 0.0
    best = math.inf
    for a, b in itertools.pairwise(poly):
        ab = b - a
        t = float(np.clip(np.dot(p - a, ab) / np.dot(ab, ab), 0.0, 1.0))
        best = min(best, float(np.linalg.norm(p - (a + t * ab))))
    return best
