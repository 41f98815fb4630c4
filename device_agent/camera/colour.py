"""Colour-science helpers shared by calibration and the simulator's targets.

The reference data (the 24-patch ColorChecker's published values) and the conversions come
from ``colour-science``; this module only fixes our conventions: linear sRGB (D65) as the
working space, CIE Lab under D65 for Delta E 2000, and OpenCV's BGR order at the edges.
"""

from __future__ import annotations

import functools
import warnings

import numpy as np

CHART = "ColorChecker24 - After November 2014"
CHART_ROWS, CHART_COLS = 4, 6


@functools.cache
def colour():  # -> the colour-science module
    """colour-science, imported on first use (it costs a third of a second) and without
    its notes about optional plotting and SciPy features we do not use."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import colour as colour_science
    return colour_science


def srgb_to_linear(values: np.ndarray) -> np.ndarray:
    """sRGB-encoded values in 0..1 to linear light (IEC 61966-2-1)."""
    return np.asarray(colour().cctf_decoding(values, function="sRGB"), dtype=np.float64)


def linear_to_srgb(values: np.ndarray) -> np.ndarray:
    return np.asarray(colour().cctf_encoding(np.clip(values, 0, 1), function="sRGB"))


def srgb_lut_to_linear() -> np.ndarray:
    """float32[256]: 8-bit sRGB code -> linear light (IEC 61966-2-1's piecewise curve)."""
    v = np.arange(256) / 255.0
    return np.where(v <= 0.04045, v / 12.92, ((v + 0.055) / 1.055) ** 2.4).astype(np.float32)


def srgb_lut_from_linear(steps: int) -> np.ndarray:
    """uint8[steps]: linear light in ``steps`` even steps over 0..1 -> 8-bit sRGB code."""
    v = np.linspace(0.0, 1.0, steps)
    encoded = np.where(v <= 0.0031308, v * 12.92, 1.055 * v ** (1 / 2.4) - 0.055)
    return np.clip(np.rint(encoded * 255), 0, 255).astype(np.uint8)


def linear_rgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    c = colour()
    d65 = c.CCS_ILLUMINANTS["CIE 1931 2 Degree Standard Observer"]["D65"]
    xyz = c.RGB_to_XYZ(rgb, c.RGB_COLOURSPACES["sRGB"], apply_cctf_decoding=False)
    return np.asarray(c.XYZ_to_Lab(xyz, d65))


def delta_e_2000(lab_a: np.ndarray, lab_b: np.ndarray) -> np.ndarray:
    return np.asarray(colour().delta_E(lab_a, lab_b, method="CIE 2000"))


@functools.cache
def chart_reference_linear() -> np.ndarray:
    """The chart's 24 patches as linear sRGB (D65, chromatically adapted from the chart's
    D50), row by row: shape (24, 3)."""
    c = colour()
    chart = c.CCS_COLOURCHECKERS[CHART]
    xyz = c.xyY_to_XYZ(np.array(list(chart.data.values())))
    return np.asarray(c.XYZ_to_RGB(xyz, c.RGB_COLOURSPACES["sRGB"], chart.illuminant,
                                   apply_cctf_encoding=False))


def chart_patch_centres(cx: float, cy: float, radius: float) -> np.ndarray:
    """Where the patches sit in a frame, given the lens field.

    The chart is held in the calibration cap at a fixed place under the lens, so its patches
    are at fixed positions relative to the field: a 6 x 4 grid filling the middle of it.
    Returns (24, 2) (x, y) centres, row by row; see :func:`chart_patch_size`.
    """
    pitch = chart_patch_size(radius)
    xs = cx + (np.arange(CHART_COLS) - (CHART_COLS - 1) / 2) * pitch
    ys = cy + (np.arange(CHART_ROWS) - (CHART_ROWS - 1) / 2) * pitch
    return np.array([(x, y) for y in ys for x in xs])


def chart_patch_size(radius: float) -> float:
    """Centre-to-centre distance of neighbouring patches (patches fill 80 % of it)."""
    return 0.26 * radius
