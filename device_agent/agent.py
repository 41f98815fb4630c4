"""The orchestrator: gesture -> capture -> verdict -> feedback -> outbox -> uplink.

Each job has its module, and data flows one way through them: ``camera_supervisor`` (the
``camera`` thread filling the frame ring, sleep and wake, autofocus) -> ``capture`` (frames
around a press, the verdict) -> ``packaging`` (metadata, JPEG, bundle, sealed into the
outbox; held while a double press may follow) -> the uplink. ``remote`` queues the gateway's
commands and holds what they do. What stays here is the run loop, the flow of one gesture,
the clinician's feedback and the device's health and status.

Threads (all named and supervised, dermascope_wire.threads): ``camera``; ``agent`` (the caller
of :meth:`run`) turns gestures into captures and runs the gateway's commands, one at a time,
so a command never races a capture; ``feedback`` plays LED patterns; the uplink has its own.
:meth:`run` returns (and the service exits with a failure, for systemd to restart it) when
one of them died.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from gpiozero.pins import Factory

from dermascope_wire.logs import log_event
from dermascope_wire.signing import Trust
from device_agent import __version__
from device_agent.buttons.gestures import Gesture, GestureButton, GestureEvent
from device_agent.camera.base import Camera
from device_agent.camera.ring import FrameRing, ring_size
from device_agent.camera_supervisor import CameraSupervisor
from device_agent.capture import (
    CaptureOutcome,
    Judge,
    NoFrame,
    Outcomes,
    Retake,
    Shot,
    load_device_calibration,
    rejected,
    verdict,
)
from device_agent.config import Config
from device_agent.feedback.lights import MODE_SIGNALS, Lights, Signal, retake_signal
from device_agent.packaging import Packager, not_stored
from device_agent.remote import CommandHandlers, CommandQueue, QueuedCommand, UplinkLike
from device_agent.session import Session
from device_agent.status import status_path, write_status
from device_agent.uplink.outbox import Outbox

__all__ = ["Agent", "CaptureOutcome", "UplinkLike"]
log = logging.getLogger(__name__)


class Agent(CommandHandlers):
    def __init__(self, config: Config, camera: Camera, outbox: Outbox,
                 uplink: UplinkLike | None = None, *, pin_factory: Factory | None = None
                 ) -> None:
        self.config = config
        self.camera = camera
        self.outbox = outbox
        self.uplink = uplink
        self.thresholds = config.thresholds()
        self.calibration = load_device_calibration(config.device.state_dir)
        cam = config.camera
        self.ring = FrameRing(ring_size(cam.width, cam.height, cam.fps, cam.ring_seconds,
                                        cam.lores_width, cam.main_format).frames)
        self.session = Session(config.illumination.mode, config.case.timeout_s)
        self.brightness = config.illumination.brightness
        self.override_window = config.button.override_window
        self.packager = Packager(config, camera, self.calibration, outbox,
                                 uplink.notify if uplink is not None else lambda: None)
        # One trust list for acks and commands; unsigned passes only in development mode
        # without a gateway key (the config allows no other way to leave it out).
        sec = config.security
        self.trust = Trust.from_files(sec.gateway_public_key, allow_unsigned=sec.insecure_dev_mode
                                      and not sec.gateway_public_key)
        # Gestures (from gpiozero's thread) and commands (from paho's) for the agent's thread.
        self._inbox: queue.Queue[GestureEvent | QueuedCommand] = queue.Queue()
        self.remote = CommandQueue(self.trust, config.device.id, config.device.state_dir,
                                   self._inbox.put)
        if uplink is not None:
            uplink.on_command = self.submit_command
            uplink.trust = self.trust
            uplink.calibrated_at = self.calibration.created if self.calibration else None
        pins = config.pins
        self.lights = Lights(pins.status_led, pins.ring_polarised, pins.ring_plain,
                             pin_factory=pin_factory, standing=Signal.STARTING)
        self.button = GestureButton(pins.button, self._inbox.put, pin_factory=pin_factory,
                                    bounce_time=config.button.bounce_time,
                                    hold_time=config.button.hold_time,
                                    double_press_window=config.button.double_press_window)
        self.supervisor = CameraSupervisor(cam, camera, self.ring, self.lights,
                                           lambda: self._light_for(self.session.mode))
        self.judge = Judge(cam, self.ring, self.calibration, self._light_for,
                           self.supervisor.first_frame, lambda: self.supervisor.ring_started_at)
        self._last_retake: Retake | None = None
        #: set when :meth:`run` ended because a thread died
        self.failed = False
        self.outcomes = Outcomes()
        self._next_status = 0.0

    @property
    def asleep(self) -> bool:
        return self.supervisor.asleep

    @property
    def ring_started_at(self) -> float:
        return self.supervisor.ring_started_at

    # -- life cycle ---------------------------------------------------------------------
    def start(self) -> None:
        if not self.config.uplink.tls:
            log_event(log, "security.insecure_transport", logging.WARNING,
                      reason="uplink.insecure_dev_mode: plain MQTT, no TLS; development only")
        if self.packager.clinic_key is None:
            log_event(log, "security.unsealed", logging.WARNING,
                      reason="security.insecure_dev_mode: captures are stored and sent "
                             "unsealed; development only, never with patients")
        if self.trust.allow_unsigned:
            log_event(log, "security.unauthenticated_gateway", logging.WARNING,
                      reason="security.insecure_dev_mode without gateway_public_key: unsigned "
                             "acks and commands are accepted; development only")
        self.packager.announce_recovered()
        self.supervisor.start()
        log_event(log, "agent.started", device_id=self.config.device.id, version=__version__,
                  outbox_depth=self.outbox.depth())

    def healthy(self) -> bool:
        """Every thread of the device is alive (a dead one was logged as thread.crashed)."""
        return (self.supervisor.alive() and self.lights.healthy()
                and (self.uplink is None or self.uplink.healthy()))

    def run(self, stop: threading.Event, tick: Callable[[], None] | None = None) -> None:
        """Handle gestures and commands until ``stop`` is set (SIGTERM, or the demo
        finishing), or until a thread of the device died (then ``failed`` is set).

        ``tick`` runs at least every quarter second while every thread is alive: the service
        pings systemd's watchdog from it, so a hung or half-dead agent gets restarted.
        """
        window = self.config.button.double_press_window
        while not stop.is_set():
            if not self.healthy():
                self.failed = True
                log_event(log, "agent.unhealthy", logging.CRITICAL,
                          reason="a thread of the device died (see thread.crashed)")
                return
            if tick is not None:
                tick()
            due = self.packager.held_due_in(window)
            try:
                item = self._inbox.get(timeout=0.25 if due is None else min(0.25, max(0.0, due)))
            except queue.Empty:
                item = None
            if isinstance(item, QueuedCommand):
                self.remote.run(item, self)
            elif item is not None:
                self.handle(item)
            self.packager.release_if_due(window, self.button.pressed_since)
            self._update_standing()
            if time.monotonic() >= self._next_status:
                self.publish_status()

    def close(self, timeout: float = 5.0) -> None:
        """After :meth:`run` returned: a press's capture still held is announced now (a
        double press can no longer complete)."""
        self.packager.release_held()
        self.supervisor.close(timeout)
        self.button.close()
        self.lights.close()
        log_event(log, "agent.stopped", device_id=self.config.device.id)

    def wake(self) -> None:
        self.supervisor.wake()

    # -- gestures -----------------------------------------------------------------------
    def handle(self, event: GestureEvent) -> CaptureOutcome | None:
        log_event(log, f"gesture.{event.gesture.value}")
        if event.gesture is Gesture.DOUBLE_PRESS:
            self.packager.withdraw_held()
        else:
            self.packager.release_held()
        if self.asleep:
            # The press that wakes the device is not a capture: there are no frames around
            # it to choose from. The LED turns steady once the camera streams again.
            self.wake()
            return None
        self.supervisor.touched()
        if event.gesture is Gesture.PRESS:
            return self.outcomes.record(self.capture(event.pressed_at, event.released_at))
        if event.gesture is Gesture.HOLD:
            return self.outcomes.record(self.override())
        self.next_mode()
        return None

    def next_mode(self) -> str:
        """Double press: polarised -> non-polarised -> pair -> polarised."""
        mode = self.session.next_mode()
        self._light_for(mode)
        self.lights.show(MODE_SIGNALS[mode])
        log_event(log, "illumination.changed", mode=mode)
        return mode

    def _light_for(self, mode: str) -> None:
        # A pair starts polarised; the ring switches for the second image only.
        self.lights.illuminate("polarised" if mode == "pair" else mode, self.brightness)

    # -- one capture ----------------------------------------------------------------------
    def capture(self, pressed_at: float, released_at: float | None = None) -> CaptureOutcome:
        """Choose the best frame around ``pressed_at`` (and, in pair mode, a second one
        under the other light), judge them, keep them if they are good. With ``released_at``
        (a press of the button) a kept capture is held while a double press may follow."""
        self.lights.show(Signal.CAPTURING)
        # A new press supersedes the last retake: a hold overrides the latest capture's
        # verdict, never an older one. Let go now, its frames are not held while this
        # capture's are judged (9 MB each at 2028x1520, 35 MB at 12 MP).
        self._last_retake = None
        try:
            with self.supervisor.capturing():
                shots = self.judge.take(pressed_at, self.session.mode, self.thresholds)
        except NoFrame as missing:
            log_event(log, "capture.failed", logging.ERROR, capture_id=missing.capture_id,
                      reason="no_frame")
            self.lights.show(Signal.FAULT)
            return CaptureOutcome(missing.capture_id, "failed", ("no_frame",))
        reasons = verdict(shots)
        if reasons:
            self._last_retake = Retake(shots, time.monotonic())
            if "focus" in reasons:
                self.supervisor.focus_soon()  # before the clinician's retake, if it can help
            outcome = rejected(shots, reasons)
            self.lights.show(retake_signal(reasons[0]))  # blinks what to do
            return outcome
        return self._keep(shots, overridden=False, released_at=released_at)

    def override(self) -> CaptureOutcome | None:
        """Keep the last retake anyway: the clinician judged it good enough, deliberately."""
        retake = self._last_retake
        if retake is None or time.monotonic() - retake.at > self.override_window:
            log_event(log, "override.ignored", reason="no recent retake")
            return None
        self._last_retake = None
        return self._keep(retake.shots, overridden=True)

    def _keep(self, shots: tuple[Shot, ...], overridden: bool,
              released_at: float | None = None) -> CaptureOutcome:
        """Stored durably first (``packaging``); only then does the clinician see "accepted"."""
        hold = released_at is not None and self.config.button.double_press_window > 0
        first = shots[0]
        try:
            kept = self.packager.store(shots, overridden, self.session.case(), self.brightness,
                                       released_at or time.monotonic(), hold)
        except OSError as err:
            outcome = not_stored(first.capture_id, err)
            self.lights.show(Signal.STORAGE_FULL if outcome.verdict == "refused"
                             else Signal.FAULT)
            return outcome
        self.lights.show(Signal.OVERRIDDEN if overridden else Signal.ACCEPTED)
        if hold:
            self.packager.hold(kept)
        else:
            self.packager.announce(kept)
        return CaptureOutcome(first.capture_id, "accept", (), overridden,
                              first.quality["frame_offset_s"], first.quality["scores"],
                              linked=tuple(kept.ids))

    # -- remote commands (device_agent.remote), on the agent's thread ---------------------
    def submit_command(self, payload: bytes, reply: Callable[[dict[str, Any]], None]) -> None:
        """Queue a command for the agent's thread (called from paho's); ``reply`` answers."""
        self.remote.submit(payload, reply)

    def execute_command(self, payload: bytes) -> dict[str, Any]:
        """Run one command now, on the caller's thread (the agent's, or a test's)."""
        return self.remote.execute(payload, self)

    # -- what the clinician sees between captures, and the status file --------------------
    def _update_standing(self) -> None:
        storage_full = self.packager.recheck_room()
        if self.supervisor.fault:
            standing = Signal.FAULT
        elif self.asleep:
            standing = Signal.ASLEEP
        elif not self.supervisor.streaming:
            standing = Signal.STARTING
        elif storage_full:
            standing = Signal.STORAGE_FULL
        elif self.uplink is not None and not self.uplink.online:
            standing = Signal.OFFLINE
        else:
            standing = Signal.READY
        if standing is not self.lights.standing:
            self.lights.show(standing)

    def publish_status(self) -> None:
        """Rewrite the status file now (the run loop does it every second)."""
        self._next_status = time.monotonic() + 1.0
        try:
            write_status(status_path(self.config.device.state_dir), self.status())
        except OSError as err:
            log_event(log, "status.write_failed", logging.WARNING, error=str(err))

    # -- observers (device_agent.capture.Outcomes) ---------------------------------------
    @property
    def outcome_count(self) -> int:
        return self.outcomes.count

    @property
    def last_outcome(self) -> CaptureOutcome | None:
        return self.outcomes.last()

    def wait_outcome(self, index: int, timeout: float) -> CaptureOutcome | None:
        """Outcome number ``index`` (0-based, counting since start), or None on timeout."""
        return self.outcomes.wait(index, timeout)
