"""The one interface every camera backend implements.

A camera streams frames while the device is awake; the agent keeps the most recent ones in a
ring buffer and picks the best around a button press. Backends: ``picam`` (picamera2 on the
Pi) and the simulator's ``sim.camera``. Both are chosen by name (``camera.backend``) through
:func:`~device_agent.camera.backends.open_camera`, among the entry points installed.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field, replace
from types import TracebackType
from typing import Any

import numpy as np


class CameraError(RuntimeError):
    """The camera could not be opened, configured or read."""


class FrameTimeout(CameraError, TimeoutError):
    """No frame arrived within the timeout."""


@dataclass(frozen=True)
class Frame:
    """One image from the stream.

    ``image`` is an HxWx3 uint8 array in OpenCV's BGR order (what picamera2's ``RGB888``
    format delivers). ``timestamp`` is on the ``time.monotonic()`` clock so it can be compared
    with the moment of a button press. ``metadata`` holds the camera's own figures under
    libcamera's control names (``ExposureTime`` in µs, ``AnalogueGain``, ``LensPosition``,
    ``FocusFoM``, ...), whatever the backend has.

    ``lores`` is the same moment from the camera's small second stream (picamera2's
    ``lores``: the ISP's downscale of the whole field, gray, HxW uint8), when the camera has
    one (``camera.lores_width``): frame choice scores it instead of the full frame, which at
    12 MP would cost a hundred times more per frame. None: choice scores ``image``.

    ``yuv420`` marks the ring's compact form (:meth:`Camera.stream_frame`): ``image`` is
    then the I420 buffer picamera2's YUV420 format gives, (h * 3/2) x w uint8, half the
    bytes of BGR; :meth:`bgr` converts the one frame that is chosen.
    """

    image: np.ndarray
    timestamp: float
    sequence: int
    metadata: dict[str, Any] = field(default_factory=dict)
    lores: np.ndarray | None = None
    yuv420: bool = False

    def bgr(self) -> Frame:
        """This frame with ``image`` in BGR (itself when it already is)."""
        if not self.yuv420:
            return self
        import cv2  # base is imported by the config; only frames need OpenCV

        return replace(self, image=cv2.cvtColor(self.image, cv2.COLOR_YUV2BGR_I420),
                       yuv420=False)

    def gray(self) -> np.ndarray:
        """The luma of the frame without converting it: the Y plane of a compact frame."""
        if self.yuv420:
            return self.image[: self.image.shape[0] * 2 // 3]
        return self.image


class Camera(ABC):
    """A streaming camera. Use as a context manager so it is always released."""

    #: Sensor/camera model for the capture metadata, e.g. "imx477".
    model: str = "unknown"
    #: Whether :meth:`autofocus` moves a lens (Camera Module 3), known once started.
    has_autofocus: bool = False

    @abstractmethod
    def start(self) -> None:
        """Open the device and start streaming."""

    @abstractmethod
    def next_frame(self, timeout: float) -> Frame:
        """Block until the next frame (BGR); raise FrameTimeout after ``timeout`` seconds."""

    def stream_frame(self, timeout: float) -> Frame:
        """The next frame as the frame ring keeps it: compact (YUV420) on a camera streaming
        that format, BGR otherwise. Only the ring's reader converts, once, what it chose."""
        return self.next_frame(timeout)

    @abstractmethod
    def close(self) -> None:
        """Stop streaming and release the device. Safe to call twice."""

    def autofocus(self, timeout: float) -> bool:
        """Run one autofocus cycle if the camera has autofocus; True when it converged."""
        return False

    def __enter__(self) -> Camera:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
