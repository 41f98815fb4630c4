"""Camera backend for the Raspberry Pi cameras, through picamera2.

picamera2 needs libcamera and only installs on Raspberry Pi OS, so it is imported when a
camera is opened, never at module import. Tests run this backend against a faithful fake of
exactly the Picamera2 calls used here (tests/fake_picamera2.py), passed in as ``factory``.

The colour calibration measures one fixed camera response, so the camera must not change
it per scene (docs/operations.md, "Colour calibration"): the sensor's tuning file is loaded
with adaptive contrast enhancement off (its gamma curve kept), and auto exposure and auto
white balance are locked. The lock's values are the ones stored in ``lock_file`` (written by
the first start that had none, after AE/AWB settled), so calibration and every later capture
run under the same gains, exposure and curve.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dermascope_wire.durable import StateFileError, read_state, write_atomic
from dermascope_wire.logs import log_event
from device_agent.camera.base import Camera, CameraError, Frame, FrameTimeout

log = logging.getLogger(__name__)
# AE/AWB count as settled when this many consecutive frames agree within _STABLE_TOLERANCE.
_STABLE_FRAMES = 3
_STABLE_TOLERANCE = 0.02


@dataclass(frozen=True)
class ExposureLock:
    """Fixed white balance and exposure: what the calibration was fitted under."""

    colour_gains: tuple[float, float]  # red, blue
    exposure_time_us: int
    analogue_gain: float

    def controls(self) -> dict[str, Any]:
        return {"AwbEnable": False, "AeEnable": False, "ColourGains": self.colour_gains,
                "ExposureTime": self.exposure_time_us, "AnalogueGain": self.analogue_gain}

    def to_dict(self) -> dict[str, Any]:
        return {"colour_gains": list(self.colour_gains),
                "exposure_time_us": self.exposure_time_us,
                "analogue_gain": self.analogue_gain}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ExposureLock:
        red, blue = (float(g) for g in data["colour_gains"])
        lock = cls((red, blue), int(data["exposure_time_us"]), float(data["analogue_gain"]))
        if not (min(lock.colour_gains) > 0 and lock.exposure_time_us > 0
                and lock.analogue_gain >= 1.0):
            raise ValueError("gains and exposure must be positive (analogue gain >= 1)")
        return lock

    @classmethod
    def from_metadata(cls, metadata: dict[str, Any]) -> ExposureLock:
        missing = [k for k in ("ColourGains", "ExposureTime", "AnalogueGain")
                   if k not in metadata]
        if missing:
            raise CameraError(f"the camera reports no {', '.join(missing)} in its frames' "
                              "metadata: it cannot lock white balance and exposure (a colour "
                              "Raspberry Pi camera is needed)")
        red, blue = metadata["ColourGains"]
        return cls((float(red), float(blue)), int(metadata["ExposureTime"]),
                   float(metadata["AnalogueGain"]))

    def close_to(self, other: ExposureLock) -> bool:
        pairs = ((self.colour_gains[0], other.colour_gains[0]),
                 (self.colour_gains[1], other.colour_gains[1]),
                 (self.exposure_time_us, other.exposure_time_us),
                 (self.analogue_gain, other.analogue_gain))
        return all(abs(a - b) <= _STABLE_TOLERANCE * max(abs(a), abs(b), 1e-9)
                   for a, b in pairs)


def load_lock(path: Path) -> ExposureLock | None:
    """The stored lock, None when there is none yet."""
    try:
        return read_state(path, ExposureLock.from_dict)
    except StateFileError as err:
        advice = ("; delete it to settle and store a new lock, then recalibrate both modes"
                  if err.malformed else "")
        raise CameraError(f"camera.lock_file {err}{advice}") from None


def save_lock(lock: ExposureLock, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(lock.to_dict()).encode(), mode=0o644)


def _import_picamera2() -> Callable[[int], Any]:
    try:
        from picamera2 import Picamera2
    except ImportError as err:
        raise CameraError(
            "camera.backend = 'picamera2' needs the picamera2 package, which installs on "
            "Raspberry Pi OS only (apt install python3-picamera2, or pip install "
            "'device-agent[pi]'); use camera.backend = 'sim' elsewhere"
        ) from err
    return Picamera2


def camera_tuning(picamera2: Any, camera_num: int, tuning_file: str) -> dict[str, Any]:
    """The sensor's tuning (``tuning_file``, or ``<model>.json`` for the sensor attached as
    ``camera_num``) with adaptive contrast enhancement off: the ISP then applies the file's
    fixed gamma curve to every scene alike, the curve the calibration measures."""
    name = tuning_file
    if not name:
        try:
            model = str(picamera2.global_camera_info()[camera_num]["Model"])
        except (IndexError, KeyError) as err:
            raise CameraError(f"cannot open camera {camera_num}: no such camera "
                              f"({err!r})") from err
        name = f"{model}.json"
    try:
        if os.path.isabs(name):
            tuning = picamera2.load_tuning_file(os.path.basename(name),
                                                dir=os.path.dirname(name))
        else:
            tuning = picamera2.load_tuning_file(name)
    except (RuntimeError, OSError, ValueError) as err:
        raise CameraError(f"camera.tuning_file: cannot load the tuning file {name!r} ({err}); "
                          "name one of libcamera's (e.g. imx477.json, imx708.json) or give "
                          "an absolute path") from None
    try:
        contrast = picamera2.find_tuning_algo(tuning, "rpi.contrast")
    except (KeyError, StopIteration, TypeError, AttributeError):
        raise CameraError(f"camera.tuning_file: {name!r} has no rpi.contrast algorithm; it "
                          "is not a Raspberry Pi camera tuning file") from None
    contrast["ce_enable"] = 0
    return tuning


def _i420(array: np.ndarray, width: int, height: int) -> np.ndarray:
    """picamera2's YUV420 array, (h * 3/2, stride) with every plane's rows padded to the
    stride, as the packed (h * 3/2, w) I420 image OpenCV converts."""
    stride = array.shape[1]
    if stride == width:
        return array.copy()
    flat = array.reshape(-1)
    y = array[:height, :width]
    quarter = (height // 2) * (stride // 2)
    u = flat[height * stride: height * stride + quarter].reshape(height // 2, stride // 2)
    v = flat[height * stride + quarter: height * stride + 2 * quarter].reshape(
        height // 2, stride // 2)
    chroma = np.concatenate([u[:, : width // 2], v[:, : width // 2]]).reshape(-1, width)
    return np.concatenate([y, chroma])


class PicameraCamera(Camera):
    """Streams the main output of a Pi camera (IMX477 HQ, IMX708 Camera Module 3, ...), and
    with ``lores`` (w, h) its lores output too, whose gray plane frame choice scores."""

    def __init__(
        self,
        width: int,
        height: int,
        fps: float,
        camera_num: int = 0,
        factory: Callable[[int], Any] | None = None,
        lores: tuple[int, int] | None = None,
        main_format: str = "RGB888",
        tuning_file: str = "",
        lock: ExposureLock | None = None,
        lock_file: Path | None = None,
        settle_s: float = 3.0,
    ) -> None:
        self._size = (width, height)
        self._lores = lores
        self._format = main_format
        self._fps = fps
        self._camera_num = camera_num
        self._factory = factory
        self._cam: Any = None
        self._sequence = 0
        self._tuning_file = tuning_file
        self._lock = lock
        self._lock_file = lock_file
        self._settle_s = settle_s
        #: the white balance and exposure in force since start
        self.locked: ExposureLock | None = None

    def start(self) -> None:
        factory = self._factory or _import_picamera2()
        tuning = camera_tuning(factory, self._camera_num, self._tuning_file)
        lock = self._lock
        if lock is None and self._lock_file is not None:
            lock = load_lock(self._lock_file)
        try:
            cam = factory(self._camera_num, tuning=tuning)
        except (RuntimeError, IndexError, OSError) as err:
            raise CameraError(f"cannot open camera {self._camera_num}: {err}") from err
        self.model = str(cam.camera_properties.get("Model", "unknown"))
        # RGB888 is BGR in memory: exactly what OpenCV expects, no conversion per frame.
        # The lores stream is YUV420, the only format the Pi's ISP gives it on every model
        # (Pi 4 and Zero 2 W included); its Y plane is the gray image the scores read, made
        # by the ISP's own scaler at no cost to the CPU.
        lores = {"size": self._lores, "format": "YUV420"} if self._lores else None
        config = cam.create_video_configuration(
            main={"size": self._size, "format": self._format},
            lores=lores,
            buffer_count=4,
            # A stored lock holds from the very first frame.
            controls={"FrameRate": self._fps, **(lock.controls() if lock else {})},
        )
        try:
            cam.configure(config)
            cam.start()
            if lock is None:
                lock = self._settle_and_lock(cam)
        except BaseException:
            cam.close()
            raise
        self.locked = lock
        # The HQ camera's focus is set by hand on its lens; the Camera Module 3 has a motor.
        self.has_autofocus = "AfMode" in cam.camera_controls
        self._cam = cam

    def _settle_and_lock(self, cam: Any) -> ExposureLock:
        """Let AE and AWB converge (bounded by ``settle_s`` and a frame count), then fix
        the values they reached, and store them when there is a lock file."""
        deadline = time.monotonic() + self._settle_s
        seen: list[ExposureLock] = []
        for _ in range(max(_STABLE_FRAMES, math.ceil(self._settle_s * self._fps) + 1)):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                metadata = cam.capture_metadata(wait=max(remaining, 2.0 / self._fps))
            except TimeoutError:
                cam.cancel_all_and_flush()
                break
            seen.append(ExposureLock.from_metadata(metadata))
            recent = seen[-_STABLE_FRAMES:]
            if len(recent) == _STABLE_FRAMES and all(v.close_to(seen[-1]) for v in recent):
                break
        if not seen:
            raise CameraError(f"no frame from the camera within camera.settle_s "
                              f"({self._settle_s:g} s) to settle exposure and white balance")
        lock = seen[-1]
        recent = seen[-_STABLE_FRAMES:]
        settled = len(recent) == _STABLE_FRAMES and all(v.close_to(lock) for v in recent)
        cam.set_controls(lock.controls())
        log_event(log, "camera.locked", level=logging.INFO if settled else logging.WARNING,
                  settled=settled, frames=len(seen), **lock.to_dict(),
                  stored=None if self._lock_file is None else str(self._lock_file))
        if self._lock_file is not None:
            save_lock(lock, self._lock_file)
        return lock

    def _camera(self) -> Any:
        if self._cam is None:
            raise CameraError("camera is not started")
        return self._cam

    def next_frame(self, timeout: float) -> Frame:
        return self.stream_frame(timeout).bgr()

    def stream_frame(self, timeout: float) -> Frame:
        cam = self._camera()
        try:
            request = cam.capture_request(wait=timeout)
        except TimeoutError as err:
            # A timed-out job stays queued inside picamera2; flush it so the next call is clean.
            cam.cancel_all_and_flush()
            raise FrameTimeout(f"no frame from the camera within {timeout:.1f} s") from err
        lores = None
        try:
            image = request.make_array("main")
            if self._format == "YUV420":
                image = _i420(image, *self._size)
            if self._lores:
                # YUV420 comes as one (h * 3/2, stride) array, rows padded to the stride: the
                # Y plane is the first h rows' first w columns. A copy, so the ring keeps
                # neither the padding nor the chroma planes alive.
                width, height = self._lores
                lores = request.make_array("lores")[:height, :width].copy()
            metadata = request.get_metadata()
        finally:
            request.release()
        self._sequence += 1
        # SensorTimestamp is CLOCK_MONOTONIC in ns, the clock time.monotonic() reads on Linux.
        stamp_ns = metadata.get("SensorTimestamp")
        timestamp = stamp_ns / 1e9 if stamp_ns else time.monotonic()
        return Frame(image=image, timestamp=timestamp, sequence=self._sequence, metadata=metadata,
                     lores=lores, yuv420=self._format == "YUV420")

    def autofocus(self, timeout: float) -> bool:
        cam = self._camera()
        if not self.has_autofocus:
            return False
        try:
            return bool(cam.autofocus_cycle(wait=timeout))
        except TimeoutError:
            cam.cancel_all_and_flush()
            return False

    def close(self) -> None:
        cam, self._cam = self._cam, None
        if cam is not None:
            cam.stop()
            cam.close()
