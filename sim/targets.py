"""Calibration targets as the simulated camera sees them: a white target, a grey target and
a 24-patch colour chart (upright, and turned half a turn) in the lens field, through a
device response with known colour cast, vignetting and noise, so the calibration tests have
ground truth.

The device response is linear light x vignetting x a 3x3 colour mix (white balance error
and channel crosstalk), a slightly non-linear tone curve, then sRGB encoding, sensor noise
and 8-bit quantisation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from device_agent.camera.colour import (
    chart_patch_centres,
    chart_patch_size,
    chart_reference_linear,
    linear_to_srgb,
)

#: Casts a badly white-balanced LED ring gives, as linear gains (R, G, B).
CASTS: dict[str, tuple[float, float, float]] = {
    "neutral": (1.0, 1.0, 1.0),
    "warm": (1.3, 1.0, 0.7),
    "cool": (0.75, 1.0, 1.35),
    "green": (0.85, 1.2, 0.85),
    "magenta": (1.2, 0.8, 1.15),
}


@dataclass(frozen=True)
class Response:
    cast: str = "warm"
    #: brightness lost at the edge of the lens field (0.35 = 35 % darker than the centre)
    vignetting: float = 0.35
    #: share of each channel that leaks into the others
    crosstalk: float = 0.06
    #: sensor noise, standard deviation in 8-bit levels
    noise: float = 1.5
    exposure: float = 0.8
    #: the sensor's tone curve is not quite linear: a 3x3 matrix cannot undo this exactly
    tone_exponent: float = 1.06
    seed: int = 1

    def matrix(self) -> np.ndarray:
        mix = np.full((3, 3), self.crosstalk) + np.eye(3) * (1 - 3 * self.crosstalk)
        return np.diag(CASTS[self.cast]) @ mix


def _geometry(width: int, height: int) -> tuple[float, float, float]:
    return width / 2, height / 2, 0.46 * min(width, height)


def _expose(linear: np.ndarray, response: Response, width: int, height: int) -> np.ndarray:
    cx, cy, radius = _geometry(width, height)
    yy, xx = np.mgrid[0:height, 0:width]
    r = np.hypot(xx - cx, yy - cy) / radius
    falloff = 1 - response.vignetting * np.clip(r, 0, 1) ** 2
    light = linear * (falloff * (r <= 1.0))[..., None] * response.exposure
    light = np.clip(light @ response.matrix().T, 0, None) ** response.tone_exponent
    encoded = linear_to_srgb(light) * 255
    rng = np.random.default_rng(response.seed)
    encoded = encoded + rng.normal(0, response.noise, encoded.shape)
    rgb = np.clip(np.rint(encoded), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(rgb[..., ::-1])  # BGR


def render_white(response: Response, width: int = 1014, height: int = 760) -> np.ndarray:
    """The white calibration target (90 % reflectance, spectrally flat) filling the field."""
    return _expose(np.full((height, width, 3), 0.9), response, width, height)


def render_grey(response: Response, width: int = 1014, height: int = 760) -> np.ndarray:
    """The grey calibration target (20 % reflectance, spectrally flat) filling the field."""
    return _expose(np.full((height, width, 3), 0.2), response, width, height)


def render_chart(response: Response, width: int = 1014, height: int = 760,
                 turned: bool = False) -> np.ndarray:
    """The 24-patch chart in the calibration cap, on its black (3 %) card; ``turned``: half
    a turn (180 degrees), as for the held-out capture."""
    cx, cy, radius = _geometry(width, height)
    linear = np.full((height, width, 3), 0.03)
    half = 0.4 * chart_patch_size(radius)
    reference = chart_reference_linear()
    for (x, y), rgb in zip(chart_patch_centres(cx, cy, radius),
                           reference[::-1] if turned else reference, strict=True):
        linear[int(y - half):int(y + half), int(x - half):int(x + half)] = rgb
    return _expose(linear, response, width, height)
