"""Camera backend for the Raspberry Pi cameras, through picamera2.

picamera2 needs libcamera and only installs on Raspberry Pi OS, so it is imported when a
camera is opened, never at module import. Tests run this backend against a faithful fake of
exactly the Picamera2 calls used here (tests/fake_picamera2.py), passed in as ``factory``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

from device_agent.camera.base import Camera, CameraError, Frame, FrameTimeout


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
    ) -> None:
        self._size = (width, height)
        self._lores = lores
        self._format = main_format
        self._fps = fps
        self._camera_num = camera_num
        self._factory = factory
        self._cam: Any = None
        self._sequence = 0

    def start(self) -> None:
        factory = self._factory or _import_picamera2()
        try:
            cam = factory(self._camera_num)
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
            controls={"FrameRate": self._fps},
        )
        cam.configure(config)
        cam.start()
        # The HQ camera's focus is set by hand on its lens; the Camera Module 3 has a motor.
        self.has_autofocus = "AfMode" in cam.camera_controls
        self._cam = cam

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
