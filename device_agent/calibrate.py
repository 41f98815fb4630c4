"""``device-agent calibrate``: flat field, white balance and colour, per illumination mode.

From two frames per mode: the white target, then the 24-patch chart, both in the
calibration cap. They come from image files, or from the camera (with the service stopped:
it holds the camera), averaged over a few frames to beat sensor noise. The new calibration
keeps the other mode's existing data, is stored durably in the state folder, and the agent
applies it from its next start.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

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
    figures: dict[str, float]
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


def from_camera(camera: Camera, prompt: Callable[[str], object]) -> tuple[np.ndarray, np.ndarray]:
    """Ask for each target in turn and capture it."""
    with camera:
        prompt("Seat the WHITE target in the calibration cap on the lens, then press Enter")
        white = average_frames(camera)
        prompt("Now the COLOUR CHART in the cap, then press Enter")
        chart = average_frames(camera)
    return white, chart


def run_calibration(config: Config, mode: str, white: np.ndarray, chart: np.ndarray,
                    report_path: Path | None = None) -> Outcome:
    """Calibrate ``mode`` and store the result (raises CalibrationError on bad frames)."""
    mode_cal: ModeCalibration = calibrate_mode(white, chart)
    path = calibration_path(config.device.state_dir)
    previous = load_calibration(path)
    modes = {**(previous.modes if previous else {}), mode: mode_cal}
    calibration = new_calibration(modes)
    save_calibration(calibration, path)
    figures = mode_cal.figures()
    if report_path is not None:
        corrected = calibration.apply(chart, mode)
        notes = [f"{calibration.calibration_id}  mode {mode}",
                 f"Delta E 2000: mean {figures['delta_e_mean']:.2f}, max "
                 f"{figures['delta_e_max']:.2f} (before {figures['delta_e_before_mean']:.1f})",
                 f"flat field: fall-off to the edge {100 * figures['falloff_after']:.1f} % "
                 f"(before {100 * figures['falloff_before']:.1f} %)"]
        write_report(report_path, corrected, assess(corrected), f"calibration  "
                     f"{config.device.id}", notes)
    return Outcome(calibration, mode, figures, report_path)


def load_frames(white: Path, chart: Path) -> tuple[np.ndarray, np.ndarray]:
    return load_image(white), load_image(chart)
