"""``device-agent calibrate``: flat field, white balance and colour, per illumination mode.

Per mode, four captures in the calibration cap (docs/operations.md, "Colour calibration"):
the white target, the grey target, the 24-patch chart, and the same chart turned half a
turn, which is only scored (the held-out figure). They come from image files, or from the
camera (with the service stopped: it holds the camera), averaged over a few frames to beat
sensor noise. The grey target and the turned chart may be left out of files given on the
command line (older procedure): then the flat field is not checked at 20 % and the held-out
figure is leave-one-out over the chart. The new calibration keeps the other mode's existing
data, is stored durably in the state folder, and the agent applies it from its next start.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from device_agent.camera.base import Camera
from device_agent.camera.calibration import (
    Calibration,
    ModeCalibration,
    calibrate_mode,
    calibration_path,
    load_calibration,
    new_calibration,
    save_calibration,
)
from device_agent.camera.imagefile import load_image
from device_agent.camera.quality import assess
from device_agent.config import Config
from device_agent.report import write_report

FRAMES_AVERAGED = 8


@dataclass(frozen=True)
class Outcome:
    calibration: Calibration
    mode: str
    figures: dict[str, Any]
    report: Path | None


def average_frames(camera: Camera, count: int = FRAMES_AVERAGED, timeout: float = 2.0
                   ) -> np.ndarray:
    """The mean of ``count`` consecutive frames (sensor noise falls by sqrt(count))."""
    total: np.ndarray | None = None
    for _ in range(count):
        image = camera.next_frame(timeout).image.astype(np.float32)
        total = image if total is None else total + image
    assert total is not None
    return np.clip(np.rint(total / count), 0, 255).astype(np.uint8)


@dataclass(frozen=True)
class Targets:
    white: np.ndarray
    chart: np.ndarray
    grey: np.ndarray | None = None
    check_chart: np.ndarray | None = None


PROMPTS = (
    "Seat the WHITE target in the calibration cap on the lens, then press Enter",
    "Now the GREY target in the cap, then press Enter",
    "Now the COLOUR CHART in the cap (dark row at the bottom), then press Enter",
    "Now the SAME CHART TURNED HALF A TURN (dark row at the top), then press Enter",
)


def from_camera(camera: Camera, prompt: Callable[[str], object]) -> Targets:
    """Ask for each target in turn and capture it."""
    frames = []
    with camera:
        for text in PROMPTS:
            prompt(text)
            frames.append(average_frames(camera))
    white, grey, chart, check = frames
    return Targets(white, chart, grey, check)


def run_calibration(config: Config, mode: str, white: np.ndarray, chart: np.ndarray,
                    report_path: Path | None = None, *, grey: np.ndarray | None = None,
                    check_chart: np.ndarray | None = None) -> Outcome:
    """Calibrate ``mode`` and store the result (raises CalibrationError on bad frames)."""
    mode_cal: ModeCalibration = calibrate_mode(white, chart, grey, check_chart)
    path = calibration_path(config.device.state_dir)
    previous = load_calibration(path)
    modes = {**(previous.modes if previous else {}), mode: mode_cal}
    calibration = new_calibration(modes)
    save_calibration(calibration, path)
    figures = mode_cal.figures()
    if report_path is not None:
        shown = check_chart if check_chart is not None else chart
        corrected = calibration.apply(shown, mode)
        write_report(report_path, corrected, assess(corrected), f"calibration  "
                     f"{config.device.id}", summary_lines(calibration.calibration_id, mode,
                                                          figures))
    return Outcome(calibration, mode, figures, report_path)


def summary_lines(calibration_id: str, mode: str, f: dict[str, Any]) -> list[str]:
    """What the command prints and the report picture shows: the held-out figures first
    (they are the device's accuracy), the fit's own for comparison."""
    grey = ("not checked (no grey target)" if f["flat_grey_worst_sector"] is None
            else f"{100 * f['flat_grey_worst_sector']:.1f} %")
    return [f"{calibration_id}  mode {mode}",
            f"Delta E 2000 held out ({f['heldout_method']}): mean "
            f"{f['heldout_delta_e_mean']:.2f}, max {f['heldout_delta_e_max']:.2f}",
            f"  (on the fitted chart: mean {f['delta_e_mean']:.2f}; uncalibrated "
            f"{f['delta_e_before_mean']:.1f})",
            f"flat field, worst sector: white {100 * f['flat_white_worst_sector']:.1f} %, "
            f"grey {grey} (uncalibrated fall-off {100 * f['falloff_before']:.1f} %)"]


def load_frames(white: Path, chart: Path, grey: Path | None = None,
                check_chart: Path | None = None) -> Targets:
    return Targets(load_image(white), load_image(chart),
                   None if grey is None else load_image(grey),
                   None if check_chart is None else load_image(check_chart))
