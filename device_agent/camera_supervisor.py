"""Camera supervision: the ``camera`` thread that fills the frame ring, sleep and wake, and
when to autofocus.

The thread ends on a camera failure (logged): the agent is then unhealthy and the service
restarts, which reopens the camera. A device nobody touched for ``camera.sleep_after_s``
stops streaming and darkens the ring until a gesture wakes it. Autofocus (cameras that have
it) is due when the camera (re)starts, after a "focus" retake and every
``camera.autofocus_every_s``; never while a capture takes frames.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator

from dermascope_wire import threads
from dermascope_wire.logs import log_event
from device_agent.camera.base import Camera, CameraError, FrameTimeout
from device_agent.camera.ring import FrameRing
from device_agent.config import CameraConfig
from device_agent.feedback.lights import Lights

log = logging.getLogger(__name__)


class CameraSupervisor:
    def __init__(self, config: CameraConfig, camera: Camera, ring: FrameRing, lights: Lights,
                 relight: Callable[[], None]) -> None:
        """``relight`` lights the ring for the session's mode again (after a sleep)."""
        self.config = config
        self.camera = camera
        self.ring = ring
        self.lights = lights
        self.relight = relight
        self.ring_started_at = 0.0
        self.asleep = False
        #: the last frame timed out or the camera failed (the status LED says FAULT)
        self.fault = False
        self._thread: threads.Supervised | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._last_activity = time.monotonic()
        self._autofocus_due_at = 0.0
        self._capturing = threading.Event()
        # Timestamp of the first frame since the camera (re)started; None until it came.
        self._first_frame_at: float | None = None
        self._first_frame = threading.Condition()

    @property
    def streaming(self) -> bool:
        """Frames flow since the camera last (re)started."""
        with self._first_frame:
            return self._first_frame_at is not None

    def first_frame(self, timeout: float) -> float | None:
        """Timestamp of the first frame since the camera (re)started, waiting up to
        ``timeout`` s for it; None when none came in that time."""
        with self._first_frame:
            self._first_frame.wait_for(lambda: self._first_frame_at is not None, timeout)
            return self._first_frame_at

    def _restarting(self) -> None:
        with self._first_frame:
            self._first_frame_at = None

    def start(self) -> None:
        self._restarting()
        self.ring_started_at = time.monotonic()
        self.camera.start()
        self.relight()
        self._thread = threads.start("camera", self._stream, log)

    def alive(self) -> bool:
        return threads.all_alive((self._thread,))

    def close(self, timeout: float) -> None:
        self._stop.set()
        self._wake.set()
        self.camera.close()
        if self._thread is not None:
            self._thread.join(timeout)

    def touched(self) -> None:
        """Someone used the device: the idle time starts again."""
        self._last_activity = time.monotonic()

    def wake(self) -> None:
        self._last_activity = time.monotonic()
        self._wake.set()

    def focus_soon(self) -> None:
        """Autofocus before the next capture (a "focus" retake), if the camera can."""
        self._autofocus_due_at = 0.0

    @contextlib.contextmanager
    def capturing(self) -> Iterator[None]:
        """While a capture chooses frames: no autofocus cycle pauses the stream."""
        self._capturing.set()
        try:
            yield
        finally:
            self._capturing.clear()

    def _stream(self) -> None:
        timeout = self.config.frame_timeout
        while not self._stop.is_set():
            if self._sleep_due():
                try:
                    self._sleep()
                except CameraError as err:
                    self.fault = True
                    log_event(log, "camera.failed", logging.ERROR, error=str(err))
                    return
                continue
            try:
                frame = self.camera.stream_frame(timeout)
            except FrameTimeout as err:
                self.fault = True
                log_event(log, "camera.timeout", logging.WARNING, error=str(err))
                continue
            except CameraError as err:
                if not self._stop.is_set():
                    self.fault = True
                    log_event(log, "camera.failed", logging.ERROR, error=str(err))
                return
            self.fault = False
            self.ring.push(frame)
            if self._first_frame_at is None:
                with self._first_frame:
                    self._first_frame_at = frame.timestamp
                    self._first_frame.notify_all()
                log_event(log, "camera.streaming",
                          first_frame_s=round(time.monotonic() - self.ring_started_at, 3))
            if self._autofocus_due():
                self._autofocus()

    # -- autofocus ----------------------------------------------------------------------
    def _autofocus_due(self) -> bool:
        return (self.camera.has_autofocus and not self._capturing.is_set()
                and time.monotonic() >= self._autofocus_due_at)

    def _autofocus(self) -> None:
        """One focus cycle, on the camera thread: the stream pauses for it (a few frames),
        which is why it never runs while a capture is choosing frames."""
        started = time.monotonic()
        converged = self.camera.autofocus(self.config.frame_timeout)
        # A cycle that did not converge (nothing in view, the lens lifted) is tried again soon.
        every = self.config.autofocus_every_s
        self._autofocus_due_at = time.monotonic() + (every if converged else min(every, 5.0))
        log_event(log, "camera.autofocus", converged=converged,
                  seconds=round(time.monotonic() - started, 3))

    # -- sleeping while nobody uses the device ------------------------------------------
    def _sleep_due(self) -> bool:
        after = self.config.sleep_after_s
        return after > 0 and time.monotonic() - self._last_activity > after

    def _sleep(self) -> None:
        """Stop streaming and darken the ring until a gesture wakes the device: a
        streaming camera costs CPU, power and heat for nothing on a device in its cradle."""
        self.camera.close()
        self.ring.clear()
        self.lights.dark()
        self.asleep = True
        log_event(log, "camera.asleep", idle_s=self.config.sleep_after_s)
        self._wake.wait()  # set by a gesture, or by close()
        self._wake.clear()
        if self._stop.is_set():
            return
        self._restarting()
        self.ring_started_at = time.monotonic()
        self.camera.start()
        self._autofocus_due_at = 0.0  # the lens may have moved while the camera slept
        self.relight()
        self.asleep = False
        log_event(log, "camera.awake")
