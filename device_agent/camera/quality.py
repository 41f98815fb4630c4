"""On-device image-quality checks for dermoscopic frames (DESIGN.md sections 4 and 10).

Seven checks, each with a score, a threshold and pass/fail; the verdict is ``accept`` or
``retake`` with every failed check named. Every check looks only inside the lens field
(:mod:`device_agent.camera.lens`). docs/quality.md explains each measure and how the default
thresholds were set from the simulator's labelled evaluation set.

The measures are chosen to be content-independent: they compare the image with itself (ratios
of gradient energy at two scales, in several directions), or use the field's own histogram, so
that skin tone, a lesion or hairs do not move them much. All work happens on a copy whose
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


def load_image(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an image file as HxWx3 uint8 BGR; raise ImageError when that is not possible."""
    p = Path(path)
    if not p.exists():
        raise ImageError(f"{p}: no such file")
    if not p.is_file():
        raise ImageError(f"{p}: not a regular file")
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

    # Sharpness: median 1-D gradient energy at sigma 1 over that at sigma 2 (normalised
    # derivative-of-Gaussian kernels), in the sharpest of 8 directions. About 0.7-0.8 for a
    # sharp frame, 0.33 for a heavily blurred one. Pass when score >= focus.
    focus: float = 0.5
    # Directional blur: 1 - (sharpness ratio in the blurriest direction / in the sharpest).
    # 0 for isotropic content or defocus, towards 1 for long straight motion. Pass when <=.
    motion: float = 0.28
    # Brightness: 90th percentile of luma inside the field, 0..255. Pass when >=.
    underexposed: float = 40.0
    # Fraction of the field that is clipped (a channel >= 250 on a pixel with luma >= 200).
    # Pass when <=.
    overexposed: float = 0.25
    # Fraction of the field covered by saturated specular blobs (not tiny glints). Pass when <=.
    glare: float = 0.004
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
    name: str
    score: float
    threshold: float
    passed: bool


@dataclass(frozen=True)
class QualityReport:
    checks: tuple[CheckResult, ...]
    field: LensField | None

    @property
    def verdict(self) -> str:
        return "accept" if all(c.passed for c in self.checks) else "retake"

    @property
    def reasons(self) -> list[str]:
        failed = {c.name for c in self.checks if not c.passed}
        return [name for name in CHECK_NAMES if name in failed]

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
            "scores": {k: round(v, 4) for k, v in self.scores.items()},
            "thresholds": {k: round(v, 4) for k, v in self.thresholds.items()},
            "field": self.field.to_dict() if self.field is not None else None,
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
    sharp, aniso = _sharpness(gray, _inner_mask(mask, field, factor, work), work)
    scores = {
        "focus": sharp,
        "motion": aniso,
        "underexposed": _brightness(gray, mask),
        "overexposed": _clipped_fraction(work, gray, mask),
        "glare": _glare_fraction(work, gray, mask),
        "field": field.centred_coverage if field is not None else 0.0,
        "colour": _cast_distance(work, mask),
    }
    checks = tuple(_result(name, scores[name], getattr(t, name)) for name in CHECK_NAMES)
    return QualityReport(checks=checks, field=field.scaled(1.0 / factor) if field else None)


def _result(name: str, score: float, threshold: float) -> CheckResult:
    score = float(score)
    passed = score >= threshold if name in _HIGHER_IS_BETTER else score <= threshold
    return CheckResult(name=name, score=score, threshold=float(threshold), passed=passed)


# --------------------------------------------------------------------------------------------
# Working copy and masks


def working_copy(image: np.ndarray, size: int = WORK_SIZE) -> tuple[np.ndarray, float]:
    """The image reduced (never enlarged) so its longer side is at most ``size``; and the factor.

    Halving with pyrDown is far cheaper on 12 MP than one big area resize, and its small
    Gaussian pre-blur is what anti-aliasing needs anyway; an area resize finishes the job.
    """
    h, w = image.shape[:2]
    factor = min(1.0, size / max(h, w))
    if factor == 1.0:
        return image, 1.0
    small = image
    while max(small.shape[:2]) >= 4 * size:
        small = cv2.pyrDown(small)
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


def _inner_mask(
    mask: np.ndarray, field: LensField | None, factor: float, work: np.ndarray
) -> np.ndarray:
    """Mask for the gradient measures: away from the rim (the coarse blur must not reach the
    black outside) and away from clipped pixels (a saturated blob's edge is not focus)."""
    k = math.ceil(3 * _COARSE_SIGMA) * 2 + 1
    inner = cv2.erode(mask, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k)))
    clipped = (cv2.min(cv2.min(work[..., 0], work[..., 1]), work[..., 2]) >= 245).astype(np.uint8)
    if clipped.any():
        clipped = cv2.dilate(clipped, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k)))
        inner[clipped > 0] = 0
    if cv2.countNonZero(inner) < 64:
        return mask
    return inner


# --------------------------------------------------------------------------------------------
# Focus and motion


def _dog_kernel(sigma: float) -> np.ndarray:
    """1-D derivative-of-Gaussian kernel (column vector) for sepFilter2D."""
    half = math.ceil(3 * sigma)
    x = np.arange(-half, half + 1, dtype=np.float32)
    k = -x * np.exp(-(x * x) / (2 * sigma * sigma))
    return (k / np.abs(k).sum()).reshape(-1, 1)


def _gauss_kernel(sigma: float) -> np.ndarray:
    return cv2.getGaussianKernel(2 * math.ceil(3 * sigma) + 1, sigma).astype(np.float32)


_DOG = {s: _dog_kernel(s) for s in (_FINE_SIGMA, _COARSE_SIGMA)}
# Smoothing across the derivative direction. It narrows what each directional measure sees to
# frequencies close to its own direction, so a smear along the motion barely reaches the
# measure across it (without it, a 1/f^2 spectrum leaks the smear into every direction).
_ACROSS = _gauss_kernel(3.0)

# The 1-D measures run along x and y of the image turned by each of these angles: 8 directions
# 22.5 degrees apart, so any motion is within 11.25 degrees of one of them.
_ROTATIONS = (0.0, 22.5, 45.0, 67.5)


def band_ratios(gray: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Fine-over-coarse 1-D gradient energy ratio along each of 8 directions.

    Along one direction we take the derivative of a 1-D Gaussian at two scales (sigma 1 and 2
    working pixels) and compare their energies. For natural images (power falling as 1/f^2)
    the ratio depends on blur along that line, not on contrast or content, and falls steadily as
    blur grows.
    Defocus lowers it in every direction; motion blur lowers it along the motion only, because
    a 1-D filter across the motion does not see the smear.
    """
    g = gray.astype(np.float32)
    m = mask
    # Crop to the field's bounding box: less to rotate and filter.
    ys, xs = np.nonzero(m[::4, ::4])
    if len(ys):
        y0, y1 = max(0, ys.min() * 4 - 4), min(m.shape[0], ys.max() * 4 + 5)
        x0, x1 = max(0, xs.min() * 4 - 4), min(m.shape[1], xs.max() * 4 + 5)
        g, m = g[y0:y1, x0:x1], m[y0:y1, x0:x1]
    h, w = g.shape
    ratios = []
    for angle in _ROTATIONS:
        if angle:
            rot = cv2.getRotationMatrix2D((w / 2, h / 2), angle, 1.0)
            # Lanczos: a bilinear turn would itself blur the turned directions measurably.
            gr = cv2.warpAffine(
                g, rot, (w, h), flags=cv2.INTER_LANCZOS4, borderMode=cv2.BORDER_REFLECT
            )
            # Pixels whose rotated neighbourhood came from outside the mask are dropped.
            mr = cv2.warpAffine(m, rot, (w, h), flags=cv2.INTER_NEAREST, borderValue=0)
        else:
            gr, mr = g, m
        sel = mr[::2, ::2] > 0
        for along_x in (True, False):
            energies = []
            for sigma in (_FINE_SIGMA, _COARSE_SIGMA):
                k = _DOG[sigma]
                if along_x:
                    d = cv2.sepFilter2D(gr, cv2.CV_32F, k, _ACROSS)
                else:
                    d = cv2.sepFilter2D(gr, cv2.CV_32F, _ACROSS, k)
                # Median, not mean: a few high-contrast hairs would otherwise dominate the
                # energy (and its direction). Every other pixel is plenty for a median.
                energies.append(
                    float(np.median(np.abs(d[::2, ::2][sel]))) ** 2 if sel.any() else 0.0
                )
            ratios.append(energies[0] / max(energies[1], 1e-12))
    return np.array(ratios, np.float64)


def _sharpness(gray: np.ndarray, mask: np.ndarray, work: np.ndarray) -> tuple[float, float]:
    """(focus score, motion score)."""
    ratios = band_ratios(gray, mask)
    best, worst = float(ratios.max()), float(ratios.min())
    anisotropy = 1.0 - worst / best if best > 0 else 0.0
    return best, anisotropy


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


def _clipped_fraction(work: np.ndarray, gray: np.ndarray, mask: np.ndarray) -> float:
    """Fraction of field pixels that are clipped: a channel at the top of the range on a bright
    pixel (luma >= 200).

    The luma condition keeps saturated colour (a clipped red channel on orange or red content)
    from counting, while overexposed skin, even dark skin, is bright as well as clipped.
    """
    n = cv2.countNonZero(mask)
    if n == 0:
        return 0.0
    top = cv2.max(cv2.max(work[..., 0], work[..., 1]), work[..., 2])
    clipped = ((top >= 250) & (gray >= 200)).astype(np.uint8) * 255
    return cv2.countNonZero(cv2.bitwise_and(clipped, mask)) / n


# --------------------------------------------------------------------------------------------
# Glare


def _glare_fraction(work: np.ndarray, gray: np.ndarray, mask: np.ndarray) -> float:
    """Area of specular blobs as a fraction of the field.

    A specular blob is a connected patch of near-white saturated pixels that is (a) bigger than
    an LED glint, (b) local — much smaller than the field, brighter than its surroundings.
    (b) keeps a globally overexposed frame from reading as glare.
    """
    field_area = cv2.countNonZero(mask)
    if field_area == 0:
        return 0.0
    white = cv2.min(cv2.min(work[..., 0], work[..., 1]), work[..., 2]) >= 230
    white = cv2.bitwise_and(white.astype(np.uint8) * 255, mask)
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
#   u >= 0.04,  u - v >= 0.2,  v <= 0.15,  u <= 1.3,  v >= -1.4
# drawn generously around skin tones from very fair to very dark, with erythema and pigment.
_GAMUT = ((0.04, 0.15), (0.35, 0.15), (1.3, -0.1), (1.3, -1.4), (0.04, -1.4), (0.04, -0.16))


def _cast_distance(work: np.ndarray, mask: np.ndarray) -> float:
    """Distance (x100, log-chromaticity) of the field's median colour from the skin gamut.

    Only pixels with no clipped channel count: a clipped channel has lost its colour.
    """
    unclipped = (cv2.max(cv2.max(work[..., 0], work[..., 1]), work[..., 2]) < 250).astype(np.uint8)
    m = cv2.bitwise_and(mask, unclipped * 255)
    if cv2.countNonZero(m) < 0.05 * max(1, cv2.countNonZero(mask)):
        return 0.0  # nearly all clipped: nothing to judge; the overexposed check says so
    b, g, r = (_percentile(_histogram(work[..., c], m), 50) + 0.5 for c in range(3))
    return 100.0 * skin_gamut_distance(math.log(r / g), math.log(b / g))


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
