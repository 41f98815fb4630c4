"""The simulated camera: synthetic dermoscopic frames, streamed at the configured rate.

Frames come from :mod:`sim.scene`, deterministic per seed. Tests and the demo change the
scene (a defect and its severity) between presses, and the simulated board asks for hand
shake right after a press, as a real hand would cause, so frame choice has something to
choose between.
"""

from __future__ import annotations

import threading
import time
from dataclasses import replace

import cv2
import numpy as np

from device_agent.camera.base import Camera, CameraError, Frame, FrameTimeout
from device_agent.camera.ring import lores_size
from device_agent.config import CameraConfig, SimConfig
from sim.scene import DEFECTS, SceneSpec, render


def open_backend(camera: CameraConfig, sim: SimConfig) -> SimCamera:
    """The ``sim`` camera backend (entry point ``device_agent.camera_backends``, registered by
    the simulator's distribution): what ``camera.backend = "sim"`` opens."""
    return SimCamera(
        camera.width, camera.height, camera.fps, seed=sim.seed, defect=sim.defect,
        severity=sim.severity, autofocus=sim.autofocus, start_delay=sim.start_delay_s,
        lores_width=camera.lores_width, render_width=sim.render_width,
        main_format=camera.main_format,
    )


class SimCamera(Camera):
    model = "sim-imx477"

    def __init__(
        self,
        width: int = 1014,
        height: int = 760,
        fps: float = 10.0,
        seed: int = 1,
        defect: str | None = None,
        severity: float = 1.0,
        autofocus: bool = False,
        start_delay: float = 0.0,
        lores_width: int = 0,
        render_width: int = 0,
        main_format: str = "RGB888",
    ) -> None:
        #: "YUV420": the ring gets compact frames (stream_frame), as picamera2 gives them
        self.main_format = main_format
        self._period = 1.0 / fps
        self._size = (width, height)
        #: (w, h) of the lores stream (gray, as picamera2's Y plane), None without one
        self.lores_size = lores_size(width, height, lores_width) if lores_width else None
        # The scene is drawn this wide and scaled up to the sensor's size, as a soft lens
        # would: drawing 12 MP takes seconds a frame and a gigabyte of caches.
        if render_width and render_width < width:
            width, height = render_width, round(height * render_width / width)
        #: seconds from start() to the first frame, as a real sensor starting up
        self.start_delay = start_delay
        self.has_autofocus = autofocus
        # How far the lens has drifted from focus (a defocus severity), until a cycle.
        self._drift = 0.0
        self.autofocus_cycles = 0
        self._lock = threading.Lock()
        self._spec = SceneSpec(seed=seed, width=width, height=height)
        self.set_scene(defect=defect, severity=severity)
        self._shake: tuple[float, float, float] | None = None  # (start, end, length px)
        self._still: np.ndarray | None = None
        self._closed = threading.Event()
        self._started = False
        self._next_due = 0.0
        self._sequence = 0

    def set_scene(
        self, defect: str | None = None, severity: float = 1.0, seed: int | None = None
    ) -> None:
        """What the lens sees from the next frame on."""
        if defect is not None and defect not in DEFECTS:
            raise ValueError(f"unknown defect {defect!r}; expected one of {DEFECTS}")
        with self._lock:
            self._spec = replace(
                self._spec,
                defect=defect,
                severity=severity,
                seed=self._spec.seed if seed is None else seed,
            )

    def show_image(self, image: np.ndarray | None) -> None:
        """Stream this fixed image (a calibration target, a recorded photograph) instead of
        the synthetic scene; None returns to the scene."""
        with self._lock:
            self._still = image

    def shake(self, duration: float = 0.3, length: float = 15.0) -> None:
        """Blur the frames of the next ``duration`` seconds as a hand pressing a button does."""
        now = time.monotonic()
        with self._lock:
            self._shake = (now, now + duration, length)

    def drift_lens(self, severity: float = 1.5) -> None:
        """The focus motor's position goes stale, as after a move to other skin or a warm-up:
        frames come out defocused until the next autofocus cycle (cameras with autofocus)."""
        if not self.has_autofocus:
            raise CameraError("this simulated camera has a fixed-focus lens")
        with self._lock:
            self._drift = severity

    def autofocus(self, timeout: float) -> bool:
        """A cycle takes three frame periods, as the Camera Module 3's PDAF roughly does;
        close() interrupts it."""
        if not self.has_autofocus:
            return False
        if self._closed.wait(min(timeout, 3 * self._period)):
            return False
        with self._lock:
            self._drift = 0.0
        self.autofocus_cycles += 1
        return True

    def start(self) -> None:
        self._closed.clear()
        self._started = True
        self._next_due = time.monotonic() + self.start_delay

    def next_frame(self, timeout: float) -> Frame:
        if not self._started:
            raise CameraError("camera is not started")
        wait = self._next_due - time.monotonic()
        if wait > timeout:
            # As a real sensor: the caller waited the whole timeout for nothing.
            if self._closed.wait(timeout):
                raise CameraError("camera closed")
            raise FrameTimeout(f"no frame from the camera within {timeout:.1f} s")
        # Wait out the frame period like a sensor does; close() interrupts the wait.
        if wait > 0 and self._closed.wait(wait):
            raise CameraError("camera closed")
        now = time.monotonic()
        self._next_due = max(self._next_due + self._period, now)
        with self._lock:
            spec, shake, still, drift = self._spec, self._shake, self._still, self._drift
        if drift > 0 and spec.defect is None:
            spec = replace(spec, defect="defocus", severity=drift)
        length = shake[2] if shake and shake[0] <= now <= shake[1] else 0.0
        self._sequence += 1
        image = still.copy() if still is not None else render(spec, self._sequence, length)
        drawn = image
        if image.shape[1::-1] != self._size:
            image = cv2.resize(image, self._size, interpolation=cv2.INTER_LINEAR)
        lores = None
        if self.lores_size is not None:
            # The ISP's downscale of the whole field; of the drawn scene when that is already
            # lores-sized (the same picture, without scaling 12 MP down again every frame).
            small = drawn if drawn.shape[1::-1] == self.lores_size else cv2.resize(
                image, self.lores_size, interpolation=cv2.INTER_AREA)
            lores = cv2.cvtColor(small, cv2.COLOR_BGR2GRAY)
        metadata = {
            "SensorTimestamp": int(now * 1e9),
            "ExposureTime": 8000,
            "AnalogueGain": 1.0,
            "FrameDuration": int(self._period * 1e6),
        }
        if self.has_autofocus:
            metadata["LensPosition"] = 7.5  # dioptres, as libcamera reports it
        return Frame(image=image, timestamp=now, sequence=self._sequence, metadata=metadata,
                     lores=lores)

    def stream_frame(self, timeout: float) -> Frame:
        frame = self.next_frame(timeout)
        if self.main_format != "YUV420":
            return frame
        return replace(frame, image=cv2.cvtColor(frame.image, cv2.COLOR_BGR2YUV_I420),
                       yuv420=True)

    def close(self) -> None:
        self._closed.set()
        self._started = False
