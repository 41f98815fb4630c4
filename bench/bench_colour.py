"""Colour calibration accuracy on held-out data, per tone curve and cast (issue 17).

The camera is the independent model in tests/camera_model.py (it shares no code with the
calibration). Per case: calibrate with the real ``run_calibration`` from the white, grey,
chart and turned-chart captures (8 frames each), then score a frame the fit never saw (a
shuffled 7 x 5 board of the 24 chart colours and the 10 Monk skin tones reaching 0.95 of
the field, other noise) and flat white and 20 % grey frames (other noise), through
``Calibration.apply`` as the device does. Delta E 2000 from colour-science.

Goals: chart mean <= 2, skin mean <= 2, worst in-gamut patch <= 5, flat field worst
45-degree sector <= 2 % at white and at 20 % grey. Prints a table, then one JSON line; exit
status 0 when every case meets every goal.

    python bench/bench_colour.py
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from common import emit

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests import camera_model as cm
from tests.test_colour_heldout import (
    CHART_MEAN,
    FLAT,
    SKIN_MEAN,
    WORST_IN_GAMUT,
    calibrate,
    held_out_figures,
)

CASES = [(tone, cast, "mild") for tone in cm.TONES for cast in sorted(cm.CASTS)]
CASES += [(tone, "neutral", "strong") for tone in cm.TONES]


def main() -> int:
    lines = [f"{'tone':6} {'cast':8} {'xtalk':6} {'chart':>11} {'skin':>11} {'worst':>6} "
             f"{'flat w':>7} {'flat g':>7} {'stored':>7}"]
    cases = []
    ok = True
    for tone, cast, crosstalk in CASES:
        camera = cm.Camera(tone=tone, cast=cast, crosstalk=crosstalk)
        with tempfile.TemporaryDirectory() as state:
            outcome = calibrate(camera, Path(state))
            got = held_out_figures(outcome.calibration, camera)
        met = bool(got["chart_mean"] <= CHART_MEAN and got["skin_mean"] <= SKIN_MEAN
               and got["worst_in_gamut"] <= WORST_IN_GAMUT and got["flat_white"] <= FLAT
               and got["flat_grey"] <= FLAT)
        ok = ok and met
        stored = outcome.figures["heldout_delta_e_mean"]
        lines.append(f"{tone:6} {cast:8} {crosstalk:6} "
                     f"{got['chart_mean']:5.2f}/{got['chart_max']:5.2f}"
                     f" {got['skin_mean']:5.2f}/{got['skin_max']:5.2f} {got['worst_in_gamut']:6.2f}"
                     f" {100 * got['flat_white']:6.2f}% {100 * got['flat_grey']:6.2f}%"
                     f" {stored:7.2f}{'' if met else '  GOAL MISSED'}")
        cases.append({"tone": tone, "cast": cast, "crosstalk": crosstalk, "met": met,
                      "stored_heldout_mean": stored,
                      **{k: round(v, 4) for k, v in got.items()}})
    emit("colour", lines, {"goals_met": ok, "cases": cases})
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
