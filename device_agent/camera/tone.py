"""The camera's tone response, measured rather than assumed: per channel, 8-bit code ->
linear light, so that the flat field and the colour matrix work on light, whatever curve the
ISP applied (sRGB, BT.709, the Raspberry Pi's default gamma, ...).

What is known without knowing the curve: at one place in the field, the white target and
a neutral chart patch get the same light, so their linear values stand in the ratio of
their reflectances, vignetting or not. The six neutral patches (published reflectances)
against the white target at the same places give that ratio at six levels; the grey
target against the white target, pixel by pixel over the vignetted field, gives one more
(unknown but constant) ratio at many levels. The curve, log(linear) as a piecewise-linear
function of log(code) per channel, is the smoothest that honours all of those: one linear
least-squares solve.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Knots in log2(code), from code 4 to 255, even in sqrt(code): close enough together in the
# highlights (about 20 codes) to follow an ISP's shoulder, where 1 code is 1-2 % of light.
_KNOTS = np.log2(np.linspace(2.0, np.sqrt(255.0), 22) ** 2)
_SMOOTH = 0.05  # weight of the curvature penalty against the ratio equations


@dataclass(frozen=True)
class ToneData:
    """What the fit needs, all in 8-bit codes, RGB order.

    neutral: (n, 3) the chart's neutral patches; white_at_neutral: (n, 3) the white
    target at the same places; neutral_ratio: (n, 3) per channel, what the camera sees of
    the patch / of a perfect white (the "neutral" patches are not quite grey, so this
    depends on the camera's colour response);
    grey, white_at_grey: (m, 3) pairs from the grey and white targets at the same places
    (m may be 0).
    """

    neutral: np.ndarray
    white_at_neutral: np.ndarray
    neutral_ratio: np.ndarray
    grey: np.ndarray
    white_at_grey: np.ndarray


def _srgb_log(codes: np.ndarray) -> np.ndarray:
    """sRGB's power law in the mid tones and highlights, straight (linear light) below code
    20, the toe BT.709's OETF and the Raspberry Pi's gamma curve both have (sRGB's own is
    shorter)."""
    v = np.maximum(codes, 20.0) / 255.0
    srgb = np.log(((v + 0.055) / 1.055) ** 2.4)
    return srgb + np.log(np.minimum(codes, 20.0) / 20.0)


#: rpi.contrast gamma_curve of Raspberry Pi's libcamera tuning files (linear in, encoded
#: out, 0..65535)
PI_GAMMA = np.array([
    0, 0, 1024, 5040, 2048, 9338, 3072, 12356, 4096, 15312, 5120, 18051, 6144, 20790,
    7168, 23193, 8192, 25744, 9216, 27942, 10240, 30035, 11264, 32005, 12288, 33975,
    13312, 35815, 14336, 37600, 15360, 39168, 16384, 40642, 18432, 43379, 20480, 45749,
    22528, 47753, 24576, 49621, 26624, 51253, 28672, 52698, 30720, 53925, 32768, 54979,
    36864, 57012, 40960, 58656, 45056, 59954, 49152, 61183, 53248, 62355, 57344, 63419,
    61440, 64476, 65535, 65535], float).reshape(-1, 2) / 65535.0


def _pi_log(codes: np.ndarray) -> np.ndarray:
    return np.log(np.interp(codes / 255.0, PI_GAMMA[:, 1], PI_GAMMA[:, 0]))


# Where the data say nothing (between the measured levels), the curve bends as the mean, in
# log light, of sRGB and of the Raspberry Pi's default gamma curve: the two ends of what a
# camera here delivers. The data decide the rest.
_PRIOR = 0.5 * _pi_log(2.0 ** _KNOTS) + 0.5 * _srgb_log(2.0 ** _KNOTS)


def _basis(codes: np.ndarray) -> np.ndarray:
    """(len(codes), K) weights: log linear-light at ``codes`` as a mix of the knots'."""
    x = np.clip(np.log2(np.maximum(codes, 1e-3)), _KNOTS[0], _KNOTS[-1])
    k = np.clip(np.searchsorted(_KNOTS, x) - 1, 0, len(_KNOTS) - 2)
    t = (x - _KNOTS[k]) / (_KNOTS[k + 1] - _KNOTS[k])
    out = np.zeros((len(codes), len(_KNOTS)))
    out[np.arange(len(codes)), k] = 1 - t
    out[np.arange(len(codes)), k + 1] = t
    return out


def fit_tone(data: ToneData) -> np.ndarray:
    """float32 (256, 3): code -> linear light per channel (RGB), 1.0 at code 255.

    Unknowns: the knots' log values per channel, -log(white target's reflectance), and
    log(grey target / white target); the ratios are shared by the channels (both targets
    are neutral)."""
    k = len(_KNOTS)
    n_unknowns = 3 * k + 2
    rows: list[np.ndarray] = []
    rhs: list[float] = []
    has_grey = len(data.grey) > 0
    for c in range(3):
        cols = slice(c * k, (c + 1) * k)
        # a neutral patch against the white target at its place:
        # log g(N) - log g(W) = log(ratio) - log(white target's reflectance)
        diff = _basis(data.neutral[:, c]) - _basis(data.white_at_neutral[:, c])
        for i in range(len(diff)):
            row = np.zeros(n_unknowns)
            row[cols] = diff[i]
            row[3 * k] = -1.0
            weight = 1.0
            rows.append(weight * row)
            rhs.append(weight * float(np.log(data.neutral_ratio[i, c])))
        if has_grey:
            diff = _basis(data.grey[:, c]) - _basis(data.white_at_grey[:, c])
            weight = np.sqrt(24.0 / len(diff))  # together worth four times the neutrals
            for i in range(len(diff)):
                row = np.zeros(n_unknowns)
                row[cols] = weight * diff[i]
                row[3 * k + 1] = -weight
                rows.append(row)
                rhs.append(0.0)
        for j in range(1, k - 1):
            h0, h1 = _KNOTS[j] - _KNOTS[j - 1], _KNOTS[j + 1] - _KNOTS[j]
            row = np.zeros(n_unknowns)
            # change of slope against the prior's, weighted as the integral of the squared
            # second derivative
            bend = _SMOOTH / np.sqrt((h0 + h1) / 2) * np.array([1 / h0, -1 / h0 - 1 / h1,
                                                                 1 / h1])
            row[c * k + j - 1:c * k + j + 2] = bend
            rows.append(row)
            rhs.append(float(bend @ _PRIOR[j - 1:j + 2]))
        row = np.zeros(n_unknowns)  # gauge: 1.0 at code 255
        row[c * k + k - 1] = 10.0
        rows.append(row)
        rhs.append(0.0)
    if not has_grey:
        row = np.zeros(n_unknowns)
        row[3 * k + 1] = 1.0
        rows.append(row)
        rhs.append(0.0)
    solution = np.linalg.lstsq(np.array(rows), np.array(rhs), rcond=None)[0]
    codes = np.arange(256, dtype=np.float64)
    lut = np.empty((256, 3))
    floor = 2.0 ** _KNOTS[0]
    for c in range(3):
        log_g = _basis(codes) @ solution[c * k:(c + 1) * k]
        g = np.exp(log_g)
        # below the lowest knot: straight to zero (the curves all start at black)
        g[codes < floor] = g[int(floor)] * codes[codes < floor] / floor
        lut[:, c] = np.maximum.accumulate(g)
    return lut.astype(np.float32)


def srgb_tone() -> np.ndarray:
    """The curve assumed before this was measured (calibrations without one): sRGB."""
    v = np.arange(256) / 255.0
    g = np.where(v <= 0.04045, v / 12.92, ((v + 0.055) / 1.055) ** 2.4)
    return np.repeat(g[:, None], 3, axis=1).astype(np.float32)
