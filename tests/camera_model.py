"""An independent camera model for the colour tests: it shares no code with the calibration
(nothing from device_agent or sim is imported here), so a mistake in the calibration's idea
of a camera cannot cancel a mistake in the camera.

Scene: linear sRGB (D65) reflectances, from colour-science's ColorChecker 2014 data and the
Monk Skin Tone scale. Camera: per-channel off-centre vignetting, a non-symmetric 3x3
crosstalk, a colour cast, shot and read noise, a tone curve (sRGB, BT.709's OETF or the
Raspberry Pi ISP's default gamma), 8-bit quantisation and JPEG through OpenCV.

Geometry is the calibration cap's drawing: the lens field is a disc centred in the frame
with radius 0.46 x the short side; the chart's 6 x 4 patches sit on a 0.26 x radius pitch
in the middle of it, each 0.8 of the pitch wide, on the chart's black card.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass, field

import cv2
import numpy as np

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import colour

WIDTH, HEIGHT = 1014, 760
FIELD_RADIUS = 0.46 * min(WIDTH, HEIGHT)
PITCH = 0.26 * FIELD_RADIUS
BLACK_CARD = 0.03  # the ColorChecker's matte black surround

#: The Monk Skin Tone scale (Monk 2019; Google's published sRGB values, skintone.google).
MONK_HEX = ("f6ede4", "f3e7db", "f7ead0", "eadaba", "d7bd96",
            "a07e56", "825c43", "604134", "3a312a", "292420")

#: rpi.contrast gamma_curve of Raspberry Pi's libcamera tuning files (input, output in
#: 0..65535; the ISP applies it to linear RGB after its own colour matrix).
PI_GAMMA = np.array([
    0, 0, 1024, 5040, 2048, 9338, 3072, 12356, 4096, 15312, 5120, 18051, 6144, 20790,
    7168, 23193, 8192, 25744, 9216, 27942, 10240, 30035, 11264, 32005, 12288, 33975,
    13312, 35815, 14336, 37600, 15360, 39168, 16384, 40642, 18432, 43379, 20480, 45749,
    22528, 47753, 24576, 49621, 26624, 51253, 28672, 52698, 30720, 53925, 32768, 54979,
    36864, 57012, 40960, 58656, 45056, 59954, 49152, 61183, 53248, 62355, 57344, 63419,
    61440, 64476, 65535, 65535], float).reshape(-1, 2) / 65535.0

CASTS = {
    "neutral": (1.0, 1.0, 1.0),
    "warm": (1.25, 1.0, 0.68),
    "cool": (0.74, 1.0, 1.3),
    "green": (0.84, 1.18, 0.82),
    "magenta": (1.18, 0.8, 1.14),
}

#: Rows: what each sensor channel sees of the scene's R, G, B. Not symmetric, rows sum to 1.
CROSSTALK = {
    "mild": np.array([[0.84, 0.12, 0.04], [0.08, 0.82, 0.10], [0.03, 0.14, 0.83]]),
    "strong": np.array([[0.62, 0.30, 0.08], [0.16, 0.60, 0.24], [0.06, 0.30, 0.64]]),
}


def tone(name: str, linear: np.ndarray) -> np.ndarray:
    x = np.clip(linear, 0.0, 1.0)
    if name == "srgb":
        return np.asarray(colour.cctf_encoding(x, function="sRGB"))
    if name == "bt709":
        return np.asarray(colour.models.oetf_BT709(x))
    if name == "pi":
        return np.interp(x, PI_GAMMA[:, 0], PI_GAMMA[:, 1])
    raise ValueError(f"unknown tone curve {name}")


TONES = ("srgb", "bt709", "pi")


@functools.cache
def chart_linear() -> np.ndarray:
    """ColorChecker 2014's 24 patches in linear sRGB (D65), row by row."""
    chart = colour.CCS_COLOURCHECKERS["ColorChecker24 - After November 2014"]
    xyz = colour.xyY_to_XYZ(np.array(list(chart.data.values())))
    return np.asarray(colour.XYZ_to_RGB(xyz, colour.RGB_COLOURSPACES["sRGB"],
                                        chart.illuminant, apply_cctf_encoding=False))


@functools.cache
def monk_linear() -> np.ndarray:
    srgb = np.array([[int(h[i:i + 2], 16) for i in (0, 2, 4)] for h in MONK_HEX]) / 255.0
    return np.asarray(colour.cctf_decoding(srgb, function="sRGB"))


def lab(linear_rgb: np.ndarray) -> np.ndarray:
    d65 = colour.CCS_ILLUMINANTS["CIE 1931 2 Degree Standard Observer"]["D65"]
    xyz = colour.RGB_to_XYZ(linear_rgb, colour.RGB_COLOURSPACES["sRGB"],
                            apply_cctf_decoding=False)
    return np.asarray(colour.XYZ_to_Lab(xyz, d65))


def delta_e(measured_linear: np.ndarray, reference_linear: np.ndarray) -> np.ndarray:
    return np.asarray(colour.delta_E(lab(measured_linear), lab(reference_linear),
                                     method="CIE 2000"))


def in_gamut(reference_linear: np.ndarray) -> np.ndarray:
    return np.all((reference_linear >= 0) & (reference_linear <= 1), axis=1)


@dataclass(frozen=True)
class Camera:
    tone: str = "srgb"
    cast: str = "warm"
    crosstalk: str = "mild"
    exposure: float = 0.62
    #: fall-off at the field edge per channel (R, G, B) and each channel's optical centre
    #: offset (x, y) as a share of the field radius: vignetting that is neither round nor
    #: grey
    vignetting: tuple[float, float, float] = (0.38, 0.32, 0.28)
    centre_offsets: tuple[tuple[float, float], ...] = ((0.06, -0.03), (0.03, 0.02),
                                                       (-0.02, 0.05))
    electrons: float = 6000.0  # full scale, for shot noise
    read_noise: float = 0.002
    jpeg_quality: int = 90
    extra: dict = field(default_factory=dict)

    def mix(self) -> np.ndarray:
        return np.diag(CASTS[self.cast]) @ CROSSTALK[self.crosstalk]

    def _vignette(self) -> np.ndarray:
        yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float64)
        out = np.empty((HEIGHT, WIDTH, 3))
        for c in range(3):
            ox, oy = self.centre_offsets[c]
            d = np.hypot(xx - WIDTH / 2 - ox * FIELD_RADIUS,
                         yy - HEIGHT / 2 - oy * FIELD_RADIUS) / FIELD_RADIUS
            # cos^4-like: most of the loss late, towards the edge
            out[..., c] = 1 - self.vignetting[c] * (0.6 * d ** 2 + 0.4 * d ** 4)
        r = np.hypot(xx - WIDTH / 2, yy - HEIGHT / 2) / FIELD_RADIUS
        return out * (r <= 1.0)[..., None]

    def shoot(self, scene: np.ndarray, seed: int, frames: int = 1) -> np.ndarray:
        """An 8-bit BGR frame as the camera delivers it (the mean of ``frames`` JPEG
        frames, as the calibration command averages them)."""
        rng = np.random.default_rng(seed)
        sensor = np.clip(scene @ self.mix().T, 0, None) * self._vignette() * self.exposure
        total = np.zeros(scene.shape, np.float64)
        for _ in range(frames):
            noisy = sensor + rng.normal(0, 1, sensor.shape) * np.sqrt(
                np.maximum(sensor, 0) / self.electrons + self.read_noise ** 2)
            code = np.clip(np.rint(tone(self.tone, noisy) * 255), 0, 255).astype(np.uint8)
            ok, jpeg = cv2.imencode(".jpg", np.ascontiguousarray(code[..., ::-1]),
                                    [cv2.IMWRITE_JPEG_QUALITY, self.jpeg_quality])
            assert ok
            total += cv2.imdecode(jpeg, cv2.IMREAD_COLOR)
        return np.clip(np.rint(total / frames), 0, 255).astype(np.uint8)


def _patches(centres: np.ndarray, colours: np.ndarray, size: float,
             surround: float) -> np.ndarray:
    scene = np.full((HEIGHT, WIDTH, 3), surround)
    half = size / 2
    for (x, y), rgb in zip(centres, colours, strict=True):
        scene[round(y - half):round(y + half), round(x - half):round(x + half)] = np.clip(
            rgb, 0, 1)
    return scene


def chart_centres() -> np.ndarray:
    xs = WIDTH / 2 + (np.arange(6) - 2.5) * PITCH
    ys = HEIGHT / 2 + (np.arange(4) - 1.5) * PITCH
    return np.array([(x, y) for y in ys for x in xs])


def chart_scene(turned: bool = False) -> np.ndarray:
    """The chart in the cap on its black card; ``turned``: half a turn (180 degrees)."""
    colours = chart_linear()[::-1] if turned else chart_linear()
    return _patches(chart_centres(), colours, 0.8 * PITCH, BLACK_CARD)


def flat_scene(reflectance: float) -> np.ndarray:
    return np.full((HEIGHT, WIDTH, 3), reflectance)


@dataclass(frozen=True)
class HeldOut:
    scene: np.ndarray
    centres: np.ndarray  # (n, 2) x, y
    reference: np.ndarray  # (n, 3) linear sRGB
    skin: np.ndarray  # (n,) bool: a Monk tone, not a chart patch
    chart: np.ndarray  # (n,) bool: a ColorChecker colour
    size: float


def held_out_layout(seed: int) -> HeldOut:
    """A 7 x 5 board the calibration never saw: the 24 chart colours and the 10 Monk skin
    tones (and one mid grey) shuffled, the outer patches' corners reaching 0.95 of the
    field radius."""
    pitch = 0.95 * FIELD_RADIUS / np.hypot(3.35, 2.35)
    xs = WIDTH / 2 + (np.arange(7) - 3) * pitch
    ys = HEIGHT / 2 + (np.arange(5) - 2) * pitch
    centres = np.array([(x, y) for y in ys for x in xs])
    colours = np.vstack([chart_linear(), monk_linear(), [[0.2, 0.2, 0.2]]])
    skin = np.r_[np.zeros(24, bool), np.ones(10, bool), False]
    chart = np.r_[np.ones(24, bool), np.zeros(11, bool)]
    order = np.random.default_rng(seed).permutation(len(colours))
    size = 0.7 * pitch
    return HeldOut(_patches(centres, colours[order], size, 0.2), centres, colours[order],
                   skin[order], chart[order], size)


def patch_means(linear: np.ndarray, centres: np.ndarray, size: float) -> np.ndarray:
    half = int(0.3 * size)  # the inner 60 %: clear of the JPEG's ringing at the edges
    return np.array([linear[int(y) - half:int(y) + half, int(x) - half:int(x) + half]
                     .reshape(-1, 3).mean(axis=0) for x, y in centres])


def to_linear(image_bgr: np.ndarray) -> np.ndarray:
    return np.asarray(colour.cctf_decoding(image_bgr[..., ::-1] / 255.0, function="sRGB"))


def worst_sector(linear: np.ndarray, sectors: int = 8) -> float:
    """Largest brightness error between the field's centre and its rim (0.85-0.95 of the
    radius), in any of ``sectors`` equal angular sectors (0.02 = 2 %)."""
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH]
    dx, dy = xx - WIDTH / 2, yy - HEIGHT / 2
    r = np.hypot(dx, dy) / FIELD_RADIUS
    angle = (np.arctan2(dy, dx) + np.pi) / (2 * np.pi) * sectors
    y = linear @ np.array([0.2126, 0.7152, 0.0722])
    centre = y[r < 0.3].mean()
    ring = (r > 0.85) & (r < 0.95)
    return max(abs(1 - y[ring & (angle.astype(int) % sectors == s)].mean() / centre)
               for s in range(sectors))
