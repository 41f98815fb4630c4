"""The last fraction of a second of frames, for zero-shutter-lag choice.

Pressing the button shakes a handheld device, so the steadiest frame is often one from just
before the press. The camera thread pushes every frame here; a press asks for the frames in
a window around its moment, waiting (with a timeout) for the frames after it to arrive.
"""

from __future__ import annotations

import threading
from collections import deque

from device_agent.camera.base import Frame


class FrameRing:
    """A bounded, thread-safe buffer of the most recent frames."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"ring capacity must be at least 1, got {capacity}")
        self._frames: deque[Frame] = deque(maxlen=capacity)
        self._changed = threading.Condition()

    @property
    def capacity(self) -> int:
        return self._frames.maxlen or 0

    def push(self, frame: Frame) -> None:
        with self._changed:
            self._frames.append(frame)
            self._changed.notify_all()

    def latest(self) -> Frame | None:
        with self._changed:
            return self._frames[-1] if self._frames else None

    def window(self, start: float, end: float) -> list[Frame]:
        """Frames with ``start <= timestamp <= end``, oldest first."""
        with self._changed:
            return [f for f in self._frames if start <= f.timestamp <= end]

    def wait_until(self, moment: float, timeout: float) -> bool:
        """Block until a frame at or after ``moment`` is in the ring; False on timeout."""
        with self._changed:
            return self._changed.wait_for(
                lambda: bool(self._frames) and self._frames[-1].timestamp >= moment, timeout
            )

    def clear(self) -> None:
        with self._changed:
            self._frames.clear()
