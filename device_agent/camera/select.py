"""Zero-shutter-lag frame choice: the best frame in a window around the button press.

Pressing the button shakes a handheld dermatoscope, so the steadiest frame is often one from
just before the press. :func:`frame_score` is a per-frame figure computed on a small gray copy
of the frame's centre; :func:`choose_frame` picks the best-scoring frame whose timestamp lies
in ``[press_time - before, press_time + after]``.

The press waits for the choice, so it must be quick: every frame in the window is first
ranked by :func:`gradient_energy` (a tenth of the cost), and only the best few get the full
:func:`frame_score`. Where the full score cannot tell two of them apart, the gradient energy
decides (see :data:`BLUR_TIE`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import cv2
import numpy as np

from device_agent.camera.base import Frame
from device_agent.camera.quality import directional_blur, per_direction

# The score looks at the central part of the frame (inside any lens field) at this size: small
# enough to score every frame of a 10 fps stream for nothing, big enough to see hand shake.
_CROP = 0.5
_SIZE = 256
# How many frames of a window, ranked by gradient energy, get the full frame_score.
SHORTLIST = 2
# The gradient-energy ranking works on the same centre crop at this size: the averaging
# beats the sensor noise down, and shake of a few pixels is still plain at this scale.
_RANK_SIZE = 128
# Worst-direction blur widths (px at the score's 256-px scale) closer than this are a tie.
# Between a steady frame and one with 3 px of shake (1.5 px at that scale) the measure's own
# noise is as large as the difference: over 80 simulated windows it called the shaken frame
# sharper by up to 0.04 px, so picking by a hair's difference made the choice flip with the
# OpenCV build (4.11 and 5.0 rasterise the simulated smear and interpolate the turned copies
# differently). Within a tie, gradient energy, a finer comparison between frames of the same
# skin, decides; 0.1 px here is 0.2 px in a 1014-px frame, no difference a clinician sees.
BLUR_TIE = 0.1


def _centre(image: np.ndarray, size: int) -> np.ndarray:
    """Gray copy of the frame's central part, reduced so its longer side is at most ``size``."""
    h, w = image.shape[:2]
    ch, cw = max(8, int(h * _CROP)), max(8, int(w * _CROP))
    y0, x0 = (h - ch) // 2, (w - cw) // 2
    crop = image[y0 : y0 + ch, x0 : x0 + cw]
    factor = min(1.0, size / max(ch, cw))
    if factor < 1.0:
        crop = cv2.resize(
            crop,
            (max(8, round(cw * factor)), max(8, round(ch * factor))),
            interpolation=cv2.INTER_AREA,
        )
    return cv2.cvtColor(crop, cv2.COLOR_BGR2GRAY) if crop.ndim == 3 else crop


def gradient_energy(image: np.ndarray) -> float:
    """Variance of the Laplacian of the centre, over its squared mean brightness.

    Not content-independent (a lesion or hairs raise it), so it only ranks frames of one
    window, which all show the same skin: there it falls with shake and defocus alike. The
    division keeps an exposure change between frames from counting as sharpness.
    """
    gray = _centre(image, _RANK_SIZE)
    mean = float(cv2.mean(gray)[0])
    return float(cv2.Laplacian(gray, cv2.CV_32F).var()) / max(mean, 1.0) ** 2


def frame_score(image: np.ndarray) -> float:
    """Sharpness in the frame's blurriest direction (higher = sharper and steadier), 0..1.

    Uses the same edge-blur measure as the focus check, but takes the worst of 12 directions,
    so both defocus and shake (motion blur in any direction) lower it.
    """
    return 1.0 / (1.0 + worst_blur(image))


def worst_blur(image: np.ndarray) -> float:
    """Blur width (px at the score's scale) in the centre's blurriest direction.

    Infinite when no edge stands out from the noise: nothing there can be called sharp.
    """
    gray = _centre(image, _SIZE)
    # Away from the borders, where the filters would read the reflected edge.
    mask = np.zeros(gray.shape, np.uint8)
    mask[8:-8, 8:-8] = 255
    if not mask.any():
        mask[:] = 255
    per_dir = per_direction(directional_blur(gray, mask))
    if np.all(np.isnan(per_dir)):
        return math.inf
    return float(np.nanmax(per_dir))


def scored(frame: Frame) -> np.ndarray:
    """What the scores read: the frame's low-resolution stream when the camera has one (the
    scores look at a 256-px centre, which a 1014-px lores holds in full), else the frame."""
    return frame.lores if frame.lores is not None else frame.gray()


def choose_frame(
    frames: Sequence[Frame], press_time: float, before: float, after: float
) -> tuple[Frame, float] | None:
    """The best frame with ``press_time - before <= timestamp <= press_time + after``.

    Returns ``(frame, frame.timestamp - press_time)``, or None when no frame is in the window.
    The :data:`SHORTLIST` frames with the most gradient energy are scored in full; among those
    whose worst-direction blur is within :data:`BLUR_TIE` of the sharpest, the one with the
    most gradient energy wins, and then the one closest to the press.
    """
    lo, hi = press_time - before, press_time + after
    candidates = [f for f in frames if lo <= f.timestamp <= hi]
    if not candidates:
        return None
    ranked = sorted(((gradient_energy(scored(f)), f) for f in candidates),
                    key=lambda pair: pair[0], reverse=True)[:SHORTLIST]
    blurs = [worst_blur(scored(f)) for _, f in ranked]
    # inf + BLUR_TIE is inf: when no frame shows an edge, all of them tie.
    limit = min(blurs) + BLUR_TIE
    tied = [pair for pair, blur in zip(ranked, blurs, strict=True) if blur <= limit]
    _, best = max(tied, key=lambda pair: (pair[0], -abs(pair[1].timestamp - press_time)))
    return best, best.timestamp - press_time
