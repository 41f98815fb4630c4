"""Capture and judging: the best frame around a press (and, in pair mode, a second one under
the other light), calibrated and judged by the quality checks, and the verdict.

Nothing here stores or says anything to the clinician: the orchestrator (``agent``) turns a
verdict into feedback and, for an accepted capture, hands the images to ``packaging``.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from dermascope_wire.logs import log_event
from device_agent.camera.base import Frame
from device_agent.camera.calibration import (
    Calibration,
    CalibrationError,
    calibration_path,
    load_calibration,
)
from device_agent.camera.quality import Thresholds, assess
from device_agent.camera.ring import FrameRing
from device_agent.camera.select import choose_frame
from device_agent.config import CameraConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CaptureOutcome:
    """What one gesture came to, for the demo, tests and the status report."""

    capture_id: str
    #: "accept", "retake", "refused" (storage full) or "failed" (no frame, disk error)
    verdict: str
    reasons: tuple[str, ...] = ()
    overridden: bool = False
    frame_offset: float | None = None
    scores: dict[str, float] = field(default_factory=dict)
    #: every capture id this gesture produced (two for a pair)
    linked: tuple[str, ...] = ()


@dataclass(frozen=True)
class Shot:
    """One judged image of a capture (a pair has two)."""

    capture_id: str
    frame: Frame
    mode: str
    quality: dict[str, Any]
    reasons: tuple[str, ...]


@dataclass(frozen=True)
class Retake:
    """A capture judged "retake", kept in mind for a hold that overrides the verdict."""

    shots: tuple[Shot, ...]
    at: float


class NoFrame(Exception):
    """No frame to choose from around the press (or for the pair's second image)."""

    def __init__(self, capture_id: str) -> None:
        super().__init__(capture_id)
        self.capture_id = capture_id


def verdict(shots: tuple[Shot, ...]) -> tuple[str, ...]:
    """The checks any image of the capture failed, the cause first (the first failing
    image's primary reason, docs/quality.md), then the others once each; () means accept."""
    return tuple(dict.fromkeys(reason for shot in shots for reason in shot.reasons))


def rejected(shots: tuple[Shot, ...], reasons: tuple[str, ...]) -> CaptureOutcome:
    """Log a capture judged "retake" and say what it came to."""
    for shot in shots:
        log_event(log, "capture.rejected", capture_id=shot.capture_id, reasons=list(reasons),
                  scores=shot.quality["scores"], frame_offset_s=shot.quality["frame_offset_s"],
                  illumination=shot.mode)
    return CaptureOutcome(shots[0].capture_id, "retake", reasons,
                          frame_offset=shots[0].quality["frame_offset_s"],
                          scores=shots[0].quality["scores"],
                          linked=tuple(s.capture_id for s in shots))


def load_device_calibration(state_dir: Path) -> Calibration | None:
    """The device's calibration (``calibrate``), or None: uncalibrated, or invalid (logged)."""
    try:
        calibration = load_calibration(calibration_path(state_dir))
    except CalibrationError as err:
        # Capturing uncalibrated (and saying so in every capture's metadata) beats not
        # capturing at all; doctor reports it as a failure to fix.
        log_event(log, "calibration.invalid", logging.ERROR, error=str(err))
        return None
    if calibration is not None:
        log_event(log, "calibration.loaded", calibration_id=calibration.calibration_id,
                  modes=sorted(calibration.modes))
    return calibration


class Judge:
    def __init__(self, config: CameraConfig, ring: FrameRing, calibration: Calibration | None,
                 light_for: Callable[[str], None],
                 first_frame: Callable[[float], float | None] | None = None,
                 started_at: Callable[[], float] | None = None) -> None:
        """``light_for(mode)`` lights the ring for an illumination mode (a pair switches it
        for its second image). ``first_frame(timeout)`` is the timestamp of the first frame
        since the camera (re)started, waiting up to ``timeout`` s (None: none came), and
        ``started_at()`` when it (re)started."""
        self.config = config
        self.ring = ring
        self.calibration = calibration
        self.light_for = light_for
        self.first_frame = first_frame
        self.started_at = started_at

    def _after_start(self, pressed_at: float) -> float:
        """The moment to take the press's frames from. A press before the camera's first
        frames (the agent starting, the camera waking) has none around it: it waits, up to
        ``camera.start_wait_s``, and takes its frames from the first window of the stream,
        rather than failing while the LED still says "starting"."""
        if self.first_frame is None or self.started_at is None:
            return pressed_at
        if pressed_at < self.started_at():
            return pressed_at  # from before this stream: its frames are gone (no_frame)
        cam = self.config
        first = self.first_frame(cam.start_wait_s)
        if first is None or first <= pressed_at + cam.window_after:
            return pressed_at  # streaming before the window closed (or never: no_frame)
        log_event(log, "capture.waited_for_frames", waited_s=round(first - pressed_at, 3))
        return first + cam.window_before

    def take(self, pressed_at: float, mode: str, thresholds: Thresholds) -> tuple[Shot, ...]:
        """The judged image(s) of a press in ``mode``; NoFrame when one is missing."""
        cam = self.config
        first = self._shoot(self._after_start(pressed_at), "polarised" if mode == "pair" else mode,
                            cam.window_before, cam.window_after, thresholds, pressed_at)
        if first is None:
            raise NoFrame(uuid.uuid4().hex)
        if mode != "pair":
            return (first,)
        second = self._second_of_pair(mode, thresholds)
        if second is None:
            raise NoFrame(first.capture_id)
        return first, second

    def _shoot(self, moment: float, mode: str, before: float, after: float,
               thresholds: Thresholds, pressed_at: float | None = None) -> Shot | None:
        """The best frame in [moment - before, moment + after], calibrated and judged; its
        offset is from ``pressed_at`` (the press, when the moment had to wait for frames)."""
        self.ring.wait_until(moment + after, timeout=self.config.frame_timeout)
        choice = choose_frame(self.ring.window(moment - before, moment + after), moment,
                              before, after)
        # Only the chosen frame stays referenced from here: the camera goes on filling the
        # ring while the frame is judged, and a window kept alive would hold the frames the
        # ring lets go (10 MB each at 3 MP, 35 MB at 12 MP).
        if choice is None:
            return None
        frame, offset = choice
        if pressed_at is not None:
            offset = frame.timestamp - pressed_at
        frame = frame.bgr()
        if self.calibration is not None:
            frame = replace(frame, image=self.calibration.apply(frame.image, mode))
        report = assess(frame.image, thresholds)
        quality = {**report.to_dict(), "frame_offset_s": round(offset, 4)}
        return Shot(uuid.uuid4().hex, frame, mode, quality, tuple(report.reasons))

    def _second_of_pair(self, mode: str, thresholds: Thresholds) -> Shot | None:
        """Switch to non-polarised light and take the best frame once the light has
        settled; back to polarised afterwards."""
        cam = self.config
        self.light_for("non_polarised")
        # Frames exposed (even partly) before the switch still show the old light.
        settled = time.monotonic() + 2.0 / cam.fps
        try:
            return self._shoot(settled, "non_polarised", 0.0, cam.window_after + 2.0 / cam.fps,
                               thresholds)
        finally:
            self.light_for(mode)


class Outcomes:
    """What the gestures came to, for observers (the demo, tests, the status report)."""

    def __init__(self) -> None:
        self._outcomes: list[CaptureOutcome] = []
        self.count = 0
        #: wall-clock time of the last outcome
        self.last_at = 0.0
        self._added = threading.Condition()

    def record(self, outcome: CaptureOutcome | None) -> CaptureOutcome | None:
        if outcome is not None:
            with self._added:
                self.last_at = time.time()
                self._outcomes.append(outcome)
                self.count += 1
                del self._outcomes[:-100]  # observers want recent ones; keep memory flat
                self._added.notify_all()
        return outcome

    def last(self) -> CaptureOutcome | None:
        with self._added:
            return self._outcomes[-1] if self._outcomes else None

    def wait(self, index: int, timeout: float) -> CaptureOutcome | None:
        """Outcome number ``index`` (0-based, counting since start), or None on timeout."""
        with self._added:
            if not self._added.wait_for(lambda: self.count > index, timeout):
                return None
            position = index - (self.count - len(self._outcomes))
            return self._outcomes[position] if position >= 0 else None
