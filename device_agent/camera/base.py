"""The one interface every camera backend implements.

A camera streams frames while the device is awake; the agent keeps the most recent ones in a
ring buffer and picks the best around a button press. Backends: ``picam`` (picamera2 on the
Pi) and the simulator's ``sim.camera``. Both are chosen by name (``camera.backend``) through
:func:`~device_agent.camera.backends.open_camera`, among the entry points installed.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
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
    """

    image: np.ndarray
    timestamp: float
    sequence: int
    metadata: dict[str, Any] = field(default_factory=dict)
    lores: np.ndarray | None = None


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
        """Block until the next frame; raise FrameTimeout after ``timeout`` seconds."""

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
