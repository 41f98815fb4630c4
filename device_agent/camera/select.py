"""Zero-shutter-lag frame choice: the best frame in a window around the button press.

Pressing the button shakes a handheld dermatoscope, so the steadiest frame is often one from
just before the press. :func:`frame_score` is a cheap per-frame figure computed on a small
gray copy of the frame's centre; :func:`choose_frame` picks the best-scoring frame whose
timestamp lies in ``[press_time - before, press_time + after]``.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

from device_agent.camera.base import Frame
from device_agent.camera.quality import directional_blur, per_direction

# The score looks at the central part of the frame (inside any lens field) at this size: small
# enough to score every frame of a 10 fps stream for nothing, big enough to see hand shake.
_CROP = 0.5
_SIZE = 256


def frame_score(image: np.ndarray) -> float:
    """Sharpness in the frame's blurriest direction (higher = sharper and steadier), 0..1.

    Uses the same edge-blur measure as the focus check, but takes the worst of 12 directions,
    so both defocus and shake (motion blur in any direction) lower it.
    """
    h, w = image.shape[:2]
    ch, cw = max(8, int(h * _CROP)), max(8, int(w * _CROP))
    y0, x0 = (h - ch) // 2, (w - cw) // 2
    crop = image[y0 : y0 + ch, x0 : x0 + cw]
    factor = min(1.0, _SIZE / max(ch, cw))
    if factor < 1.0:
        crop = cv2.resize(
            crop,
            (max(8, round(cw * factor)), max(8, round(ch * factor))),
            interpolation=cv2.INTER_AREA,
        )
    gray = cv2.cvtColor(crop, cv2.COLOR_BGR2GRAY) if crop.ndim == 3 else crop
    # Away from the borders, where the filters would read the reflected edge.
    mask = np.zeros(gray.shape, np.uint8)
    mask[8:-8, 8:-8] = 255
    if not mask.any():
        mask[:] = 255
    per_dir = per_direction(directional_blur(gray, mask))
    if np.all(np.isnan(per_dir)):
        return 0.0
    # Blur in the worst direction, as a sharpness: both defocus and shake lower it.
    return 1.0 / (1.0 + float(np.nanmax(per_dir)))


def choose_frame(
    frames: Sequence[Frame], press_time: float, before: float, after: float
) -> tuple[Frame, float] | None:
    """The best frame with ``press_time - before <= timestamp <= press_time + after``.

    Returns ``(frame, frame.timestamp - press_time)``, or None when no frame is in the window.
    Ties go to the frame closest to the press.
    """
    lo, hi = press_time - before, press_time + after
    candidates = [f for f in frames if lo <= f.timestamp <= hi]
    if not candidates:
        return None
    best = max(candidates, key=lambda f: (frame_score(f.image), -abs(f.timestamp - press_time)))
    return best, best.timestamp - press_time
