"""Find the dermatoscope's circular lens field in a frame.

Behind a contact dermatoscope the sensor sees a bright disc (the skin, lit by the LED ring)
and black outside it. The disc may be cut by the frame's edge (device off-centre) or lose a
segment (lens tilted off the skin, so that side goes dark). We threshold the frame against
the black surround, keep the largest bright region, and fit a circle to the vertices of its
convex hull: straight cuts (frame edge, the boundary of a dark segment) contribute only their
two end points to the hull, and those lie on the true circle, so the fit recovers the full lens
circle even when part of it is missing.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import cv2
import numpy as np

# Detection runs on a copy whose longer side is at most this many pixels: the circle is large
# and smooth, so more resolution buys nothing.
DETECT_SIZE = 256

# The lens field's radius is at least this fraction of half the frame's shorter side. A contact
# dermatoscope's field fills most of the frame (the simulator's: 0.93); the bound is loose so
# that any real lens and sensor pairing passes, while a small lit spot does not.
MIN_RADIUS_FRACTION = 0.5


@dataclass(frozen=True)
class LensField:
    """The lens field in the coordinates of the image it was found in.

    ``cx``, ``cy``, ``radius``: the fitted lens circle (it may extend past the frame).
    ``coverage``: fraction of that circle's area that is lit and inside the frame.
    ``offset``: distance of the circle's centre from the frame centre, in radii.
    ``centred_coverage``: fraction of the ideal field (a circle of the same radius, at least
    MIN_RADIUS_FRACTION of half the frame's shorter side, shrunk to fit, at the frame centre)
    that is lit; the ``field`` check's score.
    ``found``: False when no plausible field was seen (then the other figures are 0).
    """

    cx: float
    cy: float
    radius: float
    coverage: float
    offset: float
    centred_coverage: float
    found: bool = True

    def to_dict(self) -> dict[str, Any]:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(self).items()}

    def scaled(self, factor: float) -> LensField:
        """The same field in an image resized by ``factor``."""
        return LensField(
            cx=self.cx * factor,
            cy=self.cy * factor,
            radius=self.radius * factor,
            coverage=self.coverage,
            offset=self.offset,
            centred_coverage=self.centred_coverage,
            found=self.found,
        )


def find_lens_field(image: np.ndarray) -> LensField | None:
    """The lens field of a BGR (or gray) uint8 image, or None when there is none."""
    field, _ = detect(image)
    return field


def detect(image: np.ndarray) -> tuple[LensField | None, np.ndarray | None]:
    """(field, lit mask at the detection size) — the mask is what the checks sample from."""
    small, factor = _small_gray(image)
    lit = _lit_region(small)
    if lit is None:
        return None, None
    h, w = small.shape
    contours, _ = cv2.findContours(lit, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    contour = max(contours, key=cv2.contourArea)
    hull = cv2.convexHull(contour)
    lit_full = np.zeros_like(lit)
    cv2.drawContours(lit_full, [hull], -1, 255, -1)

    cx, cy, radius = _fit_circle(hull.reshape(-1, 2).astype(np.float64))
    # A hull with too few vertices (a rectangle: an image with no dark surround) or a wild fit:
    # fall back to the circle inscribed in the lit region's bounding box.
    x, y, bw, bh = cv2.boundingRect(hull)
    if not np.isfinite(radius) or radius <= 0 or radius > 2 * max(h, w):
        cx, cy, radius = x + bw / 2, y + bh / 2, max(bw, bh) / 2

    circle = np.zeros_like(lit)
    cv2.circle(circle, (round(cx), round(cy)), round(radius), 255, -1)
    lit_in_circle = cv2.countNonZero(cv2.bitwise_and(lit_full, circle))
    coverage = min(1.0, lit_in_circle / (np.pi * radius**2))

    # The ideal field: same radius (but no smaller than a plausible lens field, and shrunk to
    # fit the frame), centred. A small lit spot is not a field, however well centred.
    ideal_r = min(max(radius, MIN_RADIUS_FRACTION * min(h, w) / 2), h / 2, w / 2)
    ideal = np.zeros_like(lit)
    cv2.circle(ideal, (round(w / 2), round(h / 2)), round(ideal_r), 255, -1)
    ideal_area = max(1, cv2.countNonZero(ideal))
    centred = cv2.countNonZero(cv2.bitwise_and(lit_full, ideal)) / ideal_area

    offset = float(np.hypot(cx - w / 2, cy - h / 2) / radius)
    field = LensField(
        cx=cx,
        cy=cy,
        radius=radius,
        coverage=float(coverage),
        offset=offset,
        centred_coverage=float(centred),
    )
    return field.scaled(1.0 / factor), cv2.bitwise_and(lit_full, circle)


def _small_gray(image: np.ndarray) -> tuple[np.ndarray, float]:
    """Gray copy at most DETECT_SIZE on its longer side, and the scale factor used."""
    h, w = image.shape[:2]
    factor = min(1.0, DETECT_SIZE / max(h, w))
    small = image
    if factor < 1.0:
        # Halve with pyrDown while far too big (cheap), then area-resize the rest of the way.
        while small.shape[0] * factor * 2 <= small.shape[0] / 2 and min(small.shape[:2]) > 2:
            small = cv2.pyrDown(small)
        size = (max(1, round(w * factor)), max(1, round(h * factor)))
        small = cv2.resize(small, size, interpolation=cv2.INTER_AREA)
    if small.ndim == 3:
        small = cv2.cvtColor(small, cv2.COLOR_BGR2GRAY)
    return small, factor


def _lit_region(gray: np.ndarray) -> np.ndarray | None:
    """Mask of the largest bright region, or None when nothing stands out from black."""
    h, w = gray.shape
    top = float(np.percentile(gray, 99))
    # Outside the lens the sensor reads a few DN; the field, even badly underexposed, is well
    # above that. A fraction of the bright end keeps dark lesions inside the field.
    threshold = max(6.0, 0.22 * top)
    if top < 10:
        return None
    mask = (gray > threshold).astype(np.uint8) * 255
    mask = cv2.morphologyEx(
        mask, cv2.MORPH_OPEN, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (3, 3))
    )
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    if n <= 1:
        return None
    biggest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    # A field smaller than ~3 % of the frame is no field (a stray reflection, a lit speck).
    if stats[biggest, cv2.CC_STAT_AREA] < 0.03 * h * w:
        return None
    return np.where(labels == biggest, 255, 0).astype(np.uint8)


def _fit_circle(points: np.ndarray) -> tuple[float, float, float]:
    """Least-squares (Kasa) circle through points; NaNs when they do not define one."""
    if len(points) < 5:
        return float("nan"), float("nan"), float("nan")
    x, y = points[:, 0], points[:, 1]
    a = np.column_stack([x, y, np.ones_like(x)])
    b = x**2 + y**2
    sol, *_ = np.linalg.lstsq(a, b, rcond=None)
    cx, cy = sol[0] / 2, sol[1] / 2
    r2 = sol[2] + cx**2 + cy**2
    if r2 <= 0:
        return float("nan"), float("nan"), float("nan")
    return float(cx), float(cy), float(np.sqrt(r2))
