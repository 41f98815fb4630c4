"""The last fraction of a second of frames, for zero-shutter-lag choice.

Pressing the button shakes a handheld device, so the steadiest frame is often one from just
before the press. The camera thread pushes every frame here; a press asks for the frames in
a window around its moment, waiting (with a timeout) for the frames after it to arrive.

The ring is most of the agent's memory: ``ring_seconds`` x ``fps`` (+1) full frames, and
their small ``lores`` copies when the camera has that stream. :func:`ring_size` is that
sum; the config refuses a ring larger than ``camera.memory_budget_mb`` (a 12 MP frame is
35 MB in BGR: a second of them at 10 fps is more than a Pi Zero 2 W's 512 MB).
"""

from __future__ import annotations

import math
import threading
from collections import deque
from dataclasses import dataclass

from device_agent.camera.base import Frame

MB = 1024 * 1024


@dataclass(frozen=True)
class RingSize:
    """What a ring of frames holds, and costs."""

    frames: int
    #: one full frame as kept: BGR, or YUV420
    frame_bytes: int
    #: one lores copy (gray), 0 without a lores stream
    lores_bytes: int

    @property
    def megabytes(self) -> float:
        return self.frames * (self.frame_bytes + self.lores_bytes) / MB


def lores_size(width: int, height: int, lores_width: int) -> tuple[int, int]:
    """(w, h) of the lores stream for a main stream of ``width`` x ``height``: the same
    field, ``lores_width`` wide, both sides even (YUV420 halves them for its colour planes)."""
    w = lores_width - lores_width % 2
    h = round(height * w / width)
    return w, max(2, h - h % 2)


def ring_size(width: int, height: int, fps: float, ring_seconds: float,
              lores_width: int = 0, main_format: str = "RGB888") -> RingSize:
    """The frames a ring of ``ring_seconds`` holds at ``fps``, and their bytes: 3 a pixel
    in RGB888 (BGR in memory), 1.5 in YUV420."""
    lores = 0
    if lores_width:
        lw, lh = lores_size(width, height, lores_width)
        lores = lw * lh
    frame = width * height * 3 // 2 if main_format == "YUV420" else width * height * 3
    return RingSize(math.ceil(ring_seconds * fps) + 1, frame, lores)


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
        """The newest frame, in BGR."""
        with self._changed:
            latest = self._frames[-1] if self._frames else None
        return latest.bgr() if latest is not None else None

    def window(self, start: float, end: float) -> list[Frame]:
        """Frames with ``start <= timestamp <= end``, oldest first, as kept: compact ones
        (``yuv420``) need :meth:`Frame.bgr` before their pixels are read as BGR."""
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
