"""The orchestrator: gesture -> capture -> verdict -> feedback -> outbox -> uplink.

Threads (all named): ``camera`` fills the frame ring; ``agent`` (the caller of :meth:`run`)
turns gestures into captures; ``feedback`` plays LED patterns; the uplink has its own. An
accepted capture is written durably to the outbox before the clinician sees "accepted" and
before ``capture.accepted`` is logged: both are promises that it will reach the clinic.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import os
import queue
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from gpiozero.pins import Factory

from device_agent import __version__
from device_agent.buttons.gestures import Gesture, GestureButton, GestureEvent
from device_agent.camera.base import Camera, CameraError, Frame, FrameTimeout
from device_agent.camera.calibration import (
    Calibration,
    CalibrationError,
    calibration_path,
    load_calibration,
)
from device_agent.camera.encode import MEDIA_TYPE, encode_jpeg
from device_agent.camera.metadata import build_metadata
from device_agent.camera.quality import assess
from device_agent.camera.ring import FrameRing
from device_agent.camera.select import choose_frame
from device_agent.config import Config
from device_agent.feedback.lights import Lights, Signal
from device_agent.logs import log_event
from device_agent.status import status_path, write_status
from device_agent.uplink.bundle import pack
from device_agent.uplink.outbox import Outbox, StorageFull

log = logging.getLogger(__name__)


class UplinkLike(Protocol):
    @property
    def online(self) -> bool: ...

    def notify(self) -> None: ...


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


@dataclass(frozen=True)
class _Retake:
    capture_id: str
    frame: Frame
    quality: dict[str, Any]
    at: float


class Agent:
    def __init__(
        self,
        config: Config,
        camera: Camera,
        outbox: Outbox,
        uplink: UplinkLike | None = None,
        *,
        pin_factory: Factory | None = None,
    ) -> None:
        self.config = config
        self.camera = camera
        self.outbox = outbox
        self.uplink = uplink
        self.thresholds = config.thresholds()
        self.calibration = self._load_calibration()
        cam = config.camera
        self.ring = FrameRing(math.ceil(cam.ring_seconds * cam.fps) + 1)
        self.illumination = config.illumination.mode
        self.lights = Lights(
            config.pins.status_led,
            config.pins.ring_polarised,
            config.pins.ring_plain,
            pin_factory=pin_factory,
        )
        self._gestures: queue.Queue[GestureEvent] = queue.Queue()
        self.button = GestureButton(
            config.pins.button,
            self._gestures.put,
            pin_factory=pin_factory,
            bounce_time=config.button.bounce_time,
            hold_time=config.button.hold_time,
            double_press_window=config.button.double_press_window,
        )
        self._stop = threading.Event()
        self.ring_started_at = 0.0
        self._camera_thread: threading.Thread | None = None
        self._last_retake: _Retake | None = None
        self._full_at_bytes: int | None = None
        self._camera_fault = False
        self._outcomes: list[CaptureOutcome] = []
        self.outcome_count = 0
        self._last_outcome_at = 0.0
        self._next_status = 0.0
        self._outcome_added = threading.Condition()

    def _load_calibration(self) -> Calibration | None:
        path = calibration_path(self.config.device.state_dir)
        try:
            calibration = load_calibration(path)
        except CalibrationError as err:
            # Capturing uncalibrated (and saying so in every capture's metadata) beats not
            # capturing at all; doctor reports it as a failure to fix.
            log_event(log, "calibration.invalid", logging.ERROR, error=str(err))
            return None
        if calibration is not None:
            log_event(log, "calibration.loaded", calibration_id=calibration.calibration_id,
                      modes=sorted(calibration.modes))
        return calibration

    # -- life cycle ---------------------------------------------------------------------
    def start(self) -> None:
        self.ring_started_at = time.monotonic()
        self.camera.start()
        self.lights.illuminate(self.illumination, self.config.illumination.brightness)
        self._camera_thread = threading.Thread(target=self._stream, name="camera", daemon=True)
        self._camera_thread.start()
        log_event(log, "agent.started", device_id=self.config.device.id, version=__version__,
                  outbox_depth=self.outbox.depth())

    def run(self, stop: threading.Event, tick: Callable[[], None] | None = None) -> None:
        """Handle gestures until ``stop`` is set (SIGTERM, or the demo finishing).

        ``tick`` runs at least every quarter second while the loop is alive: the service
        pings systemd's watchdog from it, so a hung loop gets the agent restarted.
        """
        while not stop.is_set():
            if tick is not None:
                tick()
            try:
                gesture = self._gestures.get(timeout=0.25)
            except queue.Empty:
                gesture = None
            if gesture is not None:
                self.handle(gesture)
            self._update_standing()
            if time.monotonic() >= self._next_status:
                self.publish_status()

    def close(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self.camera.close()
        if self._camera_thread is not None:
            self._camera_thread.join(timeout)
        self.button.close()
        self.lights.close()
        log_event(log, "agent.stopped", device_id=self.config.device.id)

    def _stream(self) -> None:
        timeout = self.config.camera.frame_timeout
        while not self._stop.is_set():
            try:
                frame = self.camera.next_frame(timeout)
            except FrameTimeout as err:
                self._camera_fault = True
                log_event(log, "camera.timeout", logging.WARNING, error=str(err))
                continue
            except CameraError as err:
                if not self._stop.is_set():
                    self._camera_fault = True
                    log_event(log, "camera.failed", logging.ERROR, error=str(err))
                return
            self._camera_fault = False
            self.ring.push(frame)

    # -- gestures -----------------------------------------------------------------------
    def handle(self, event: GestureEvent) -> CaptureOutcome | None:
        log_event(log, f"gesture.{event.gesture.value}")
        if event.gesture is Gesture.PRESS:
            return self._record(self.capture(event.pressed_at))
        if event.gesture is Gesture.HOLD:
            return self._record(self.override())
        self.toggle_illumination()
        return None

    def toggle_illumination(self) -> None:
        self.illumination = "non_polarised" if self.illumination == "polarised" else "polarised"
        self.lights.illuminate(self.illumination, self.config.illumination.brightness)
        log_event(log, "illumination.changed", mode=self.illumination)

    def capture(self, pressed_at: float) -> CaptureOutcome:
        """Choose the best frame around ``pressed_at``, judge it, keep it if it is good."""
        cam = self.config.camera
        self.lights.show(Signal.CAPTURING)
        self.ring.wait_until(pressed_at + cam.window_after, timeout=cam.frame_timeout)
        window = self.ring.window(pressed_at - cam.window_before, pressed_at + cam.window_after)
        choice = choose_frame(window, pressed_at, cam.window_before, cam.window_after)
        capture_id = uuid.uuid4().hex
        if choice is None:
            log_event(log, "capture.failed", logging.ERROR, capture_id=capture_id,
                      reason="no_frame")
            self.lights.show(Signal.FAULT)
            return CaptureOutcome(capture_id, "failed", ("no_frame",))
        frame, offset = choice
        if self.calibration is not None:
            frame = replace(frame, image=self.calibration.apply(frame.image, self.illumination))
        report = assess(frame.image, self.thresholds)
        quality = {**report.to_dict(), "frame_offset_s": round(offset, 4)}
        if report.verdict != "accept":
            self._last_retake = _Retake(capture_id, frame, quality, time.monotonic())
            log_event(log, "capture.rejected", capture_id=capture_id, reasons=report.reasons,
                      scores=report.scores, frame_offset_s=quality["frame_offset_s"])
            self.lights.show(Signal.RETAKE)
            return CaptureOutcome(capture_id, "retake", tuple(report.reasons),
                                  frame_offset=offset, scores=report.scores)
        self._last_retake = None
        return self._keep(capture_id, frame, quality, overridden=False)

    def override(self) -> CaptureOutcome | None:
        """Keep the last retake anyway: the clinician judged it good enough, deliberately."""
        retake = self._last_retake
        if retake is None or time.monotonic() - retake.at > self.config.button.override_window:
            log_event(log, "override.ignored", reason="no recent retake")
            return None
        self._last_retake = None
        return self._keep(retake.capture_id, retake.frame, retake.quality, overridden=True)

    def _keep(
        self, capture_id: str, frame: Frame, quality: dict[str, Any], overridden: bool
    ) -> CaptureOutcome:
        image = encode_jpeg(frame.image, self.config.camera.jpeg_quality)
        # The frame's own moment on the wall clock, not the moment we got round to it.
        captured_at = dt.datetime.now(dt.UTC) - dt.timedelta(
            seconds=max(0.0, time.monotonic() - frame.timestamp)
        )
        metadata = build_metadata(
            capture_id=capture_id,
            device_id=self.config.device.id,
            frame=frame,
            camera_model=self.camera.model,
            captured_at=captured_at,
            image=image,
            media_type=MEDIA_TYPE,
            quality=quality,
            illumination_mode=self.illumination,
            overridden=overridden,
            software_version=__version__,
            calibration_id=self._calibration_id(),
        )
        scores = quality.get("scores", {})
        try:
            self.outbox.put(capture_id, pack(metadata, image))
        except StorageFull as err:
            self._full_at_bytes = self.outbox.used_bytes()
            log_event(log, "capture.refused", logging.WARNING, capture_id=capture_id,
                      reason="storage_full", error=str(err))
            self.lights.show(Signal.STORAGE_FULL)
            return CaptureOutcome(capture_id, "refused", ("storage_full",))
        except OSError as err:
            log_event(log, "capture.failed", logging.ERROR, capture_id=capture_id,
                      reason="outbox_write", error=str(err))
            self.lights.show(Signal.FAULT)
            return CaptureOutcome(capture_id, "failed", ("outbox_write",))
        log_event(log, "capture.accepted", capture_id=capture_id, overridden=overridden,
                  scores=scores, frame_offset_s=quality.get("frame_offset_s"))
        self.lights.show(Signal.OVERRIDDEN if overridden else Signal.ACCEPTED)
        if self.uplink is not None:
            self.uplink.notify()
        return CaptureOutcome(capture_id, "accept", (), overridden,
                              quality.get("frame_offset_s"), scores)

    def _calibration_id(self) -> str | None:
        if self.calibration is None or self.illumination not in self.calibration.modes:
            return None
        return self.calibration.calibration_id

    # -- what the clinician sees between captures --------------------------------------
    def _update_standing(self) -> None:
        if self._full_at_bytes is not None and self.outbox.used_bytes() < self._full_at_bytes:
            self._full_at_bytes = None  # something was delivered: there is room again
        if self._camera_fault:
            standing = Signal.FAULT
        elif self._full_at_bytes is not None:
            standing = Signal.STORAGE_FULL
        elif self.uplink is not None and not self.uplink.online:
            standing = Signal.OFFLINE
        else:
            standing = Signal.READY
        if standing is not self.lights.standing:
            self.lights.show(standing)

    # -- status for `device-agent status` and `doctor` ------------------------------------
    def status(self) -> dict[str, Any]:
        frames = self.ring.window(float("-inf"), float("inf"))
        fps = ((len(frames) - 1) / (frames[-1].timestamp - frames[0].timestamp)
               if len(frames) > 1 and frames[-1].timestamp > frames[0].timestamp else 0.0)
        streaming = bool(frames) and time.monotonic() - frames[-1].timestamp < 2.0
        last = self.last_outcome
        return {
            "updated_at": time.time(),
            "pid": os.getpid(),
            "device_id": self.config.device.id,
            "version": __version__,
            "illumination": self.illumination,
            "signal": self.lights.standing.value,
            "case_open": False,
            "camera": {"model": self.camera.model, "streaming": streaming,
                       "fps": round(fps, 2)},
            "last_capture": None if last is None else {
                "capture_id": last.capture_id, "verdict": last.verdict,
                "reasons": list(last.reasons), "overridden": last.overridden,
                "at": self._last_outcome_at},
            "uplink_online": self.uplink.online if self.uplink is not None else False,
            "outbox": {"depth": self.outbox.depth(), "used_bytes": self.outbox.used_bytes(),
                       "quota_bytes": self.outbox.quota_bytes,
                       "oldest_created": self.outbox.oldest_created(),
                       "quarantined": len(self.outbox.quarantined())},
        }

    def publish_status(self) -> None:
        """Rewrite the status file now (the run loop does it every second)."""
        self._next_status = time.monotonic() + 1.0
        try:
            write_status(status_path(self.config.device.state_dir), self.status())
        except OSError as err:
            log_event(log, "status.write_failed", logging.WARNING, error=str(err))

    # -- observers ----------------------------------------------------------------------
    def _record(self, outcome: CaptureOutcome | None) -> CaptureOutcome | None:
        if outcome is not None:
            with self._outcome_added:
                self._last_outcome_at = time.time()
                self._outcomes.append(outcome)
                self.outcome_count += 1
                del self._outcomes[:-100]  # observers want recent ones; keep memory flat
                self._outcome_added.notify_all()
        return outcome

    @property
    def last_outcome(self) -> CaptureOutcome | None:
        with self._outcome_added:
            return self._outcomes[-1] if self._outcomes else None

    def wait_outcome(self, index: int, timeout: float) -> CaptureOutcome | None:
        """Outcome number ``index`` (0-based, counting since start), or None on timeout."""
        with self._outcome_added:
            if not self._outcome_added.wait_for(lambda: self.outcome_count > index, timeout):
                return None
            position = index - (self.outcome_count - len(self._outcomes))
            return self._outcomes[position] if position >= 0 else None
