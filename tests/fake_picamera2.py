"""A faithful fake of exactly the Picamera2 calls device_agent.camera.picam makes.

It keeps picamera2's rules that the backend must respect, so breaking one fails a test:
configure before start, capture only while started, every request released exactly once
and not read after release, ``wait`` as a timeout in seconds that raises TimeoutError (what
``concurrent.futures.Future.result`` raises inside picamera2), RGB888 delivered as an
HxWx3 uint8 array in BGR order with (width, height) sizes, SensorTimestamp in ns on
CLOCK_MONOTONIC, and autofocus controls only on cameras that have them.
"""

from __future__ import annotations

import time
from typing import Any

import cv2
import numpy as np


class FakeRequest:
    def __init__(self, camera: FakePicamera2, image: np.ndarray, metadata: dict[str, Any]):
        self._camera = camera
        self._image = image
        self._metadata = metadata
        self.released = False

    def make_array(self, name: str) -> np.ndarray:
        if self.released:
            raise RuntimeError("request used after release")
        if self._camera.config.get(name) is None:
            raise RuntimeError(f"Stream {name!r} is not defined")
        if name == "lores":
            return self._camera.lores_array(self._image)
        if self._camera.config["main"]["format"] == "YUV420":
            return self._camera.yuv420_array(self._image)
        return self._image.copy()  # picamera2 copies out of the camera buffer

    def get_metadata(self) -> dict[str, Any]:
        if self.released:
            raise RuntimeError("request used after release")
        return dict(self._metadata)

    def release(self) -> None:
        if self.released:
            raise RuntimeError("request released twice")
        self.released = True
        self._camera.outstanding -= 1


class FakePicamera2:
    """Stands in for ``picamera2.Picamera2``; one instance per opened camera."""

    def __init__(self, camera_num: int = 0, *, model: str = "imx477", autofocus: bool = False,
                 frames: int | None = None, af_result: bool = True) -> None:
        if camera_num != 0:
            raise IndexError("list index out of range")  # what picamera2 raises: no such camera
        self.camera_properties = {"Model": model, "PixelArraySize": (4056, 3040)}
        self.camera_controls: dict[str, tuple[Any, Any, Any]] = {
            "ExposureTime": (1, 66666, None), "FrameRate": (1.0, 60.0, None)}
        if autofocus:
            self.camera_controls["AfMode"] = (0, 2, 0)
        self.config: dict[str, Any] = {}
        self.configured = False
        self.started = False
        self.closed = False
        self.outstanding = 0
        self.flushed = 0
        self.frames_left = frames  # None = endless; 0 = the sensor stopped delivering
        self.af_result = af_result
        self._sequence = 0
        self._next_due = 0.0

    def create_video_configuration(self, main: dict | None = None, lores: dict | None = None,
                                   buffer_count: int = 6, controls: dict | None = None,
                                   **_: Any) -> dict[str, Any]:
        main = {"format": "XBGR8888", "size": (1280, 720), **(main or {})}
        return {"use_case": "video", "main": main, "lores": lores,
                "buffer_count": buffer_count, "controls": dict(controls or {})}

    def configure(self, config: dict[str, Any]) -> None:
        if self.started:
            raise RuntimeError("Camera must be stopped before configuring")
        lores = config.get("lores")
        if lores is not None:
            # picamera2's rules for lores: YUV420 on the Pi 4 and earlier ISPs, no larger
            # than main, even sides.
            (lw, lh), (mw, mh) = lores["size"], config["main"]["size"]
            if lores.get("format") != "YUV420":
                raise RuntimeError("lores stream must be YUV420 on this Pi")
            if lw > mw or lh > mh:
                raise RuntimeError("lores stream dimensions may not exceed main stream")
            if lw % 2 or lh % 2:
                raise RuntimeError("lores stream dimensions must be even")
        self.config = config
        self.configured = True

    def start(self) -> None:
        if not self.configured:
            raise RuntimeError("Camera has not been configured")
        self.started = True
        self._next_due = time.monotonic()

    def _image(self) -> np.ndarray:
        width, height = self.config["main"]["size"]
        if self.config["main"]["format"] not in ("RGB888", "YUV420"):
            raise AssertionError("the fake serves the formats the backend asks for: RGB888, "
                                 "YUV420")
        x = np.linspace(0, 255, width, dtype=np.uint8)
        image = np.empty((height, width, 3), np.uint8)
        image[:] = x[None, :, None]
        image[..., 0] //= 2  # blue channel first in memory, as picamera2's RGB888
        return image

    @staticmethod
    def _to_yuv420(gray: np.ndarray) -> np.ndarray:
        """picamera2's YUV420 array: (h * 3/2, stride), rows padded to a multiple of 64
        bytes (the padding is garbage: 255 here, so reading it shows)."""
        h, w = gray.shape
        stride = -(-w // 64) * 64
        out = np.full((h * 3 // 2, stride), 128, np.uint8)  # neutral chroma
        out[:h, w:] = 255
        out[:h, :w] = gray
        return out

    @staticmethod
    def yuv420_array(image: np.ndarray) -> np.ndarray:
        """The main stream in YUV420 as picamera2's make_array gives it: (h * 3/2, stride),
        the three planes one after the other, each row padded (Y to a multiple of 64 bytes,
        U and V to half of that); padding bytes are garbage (255)."""
        h, w = image.shape[:2]
        stride = -(-w // 64) * 64
        i420 = cv2.cvtColor(image, cv2.COLOR_BGR2YUV_I420)  # packed: (h * 3/2, w)
        flat = np.full(stride * h * 3 // 2, 255, np.uint8)
        flat[: stride * h].reshape(h, stride)[:, :w] = i420[:h]
        chroma = i420[h:].reshape(-1)
        quarter = (h // 2) * (w // 2)
        for plane in range(2):
            start = stride * h + plane * (h // 2) * (stride // 2)
            rows = flat[start: start + (h // 2) * (stride // 2)].reshape(h // 2, stride // 2)
            rows[:, : w // 2] = chroma[plane * quarter: (plane + 1) * quarter].reshape(
                h // 2, w // 2)
        return flat.reshape(h * 3 // 2, stride)

    def lores_array(self, image: np.ndarray) -> np.ndarray:
        """The lores stream's YUV420 buffer: the ISP's downscale of the main image."""
        width, height = self.config["lores"]["size"]
        small = cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA)
        return self._to_yuv420(cv2.cvtColor(small, cv2.COLOR_BGR2GRAY))

    def capture_request(self, wait: float | bool | None = None, **_: Any) -> FakeRequest:
        if not self.started:
            raise RuntimeError("Camera is not running")
        if self.frames_left == 0:
            if wait is None or wait is True:
                raise AssertionError("the backend waited forever on a camera that stopped")
            raise TimeoutError()
        if self.frames_left is not None:
            self.frames_left -= 1
        # A sensor delivers at its frame rate: capture_request blocks until the next frame.
        period = 1.0 / float(self.config["controls"].get("FrameRate", 30.0))
        wait = self._next_due - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        self._next_due = max(self._next_due + period, time.monotonic())
        self._sequence += 1
        metadata = {"SensorTimestamp": time.monotonic_ns(), "ExposureTime": 9000,
                    "AnalogueGain": 1.5, "FrameDuration": 100000}
        if "AfMode" in self.camera_controls:
            metadata["LensPosition"] = 7.5
        self.outstanding += 1
        return FakeRequest(self, self._image(), metadata)

    def cancel_all_and_flush(self) -> None:
        self.flushed += 1

    def autofocus_cycle(self, wait: float | bool | None = None) -> bool:
        if "AfMode" not in self.camera_controls:
            raise RuntimeError("AfMode not supported by this camera")
        if not self.started:
            raise RuntimeError("Camera is not running")
        return self.af_result

    def stop(self) -> None:
        self.started = False

    def close(self) -> None:
        self.stop()
        self.closed = True
