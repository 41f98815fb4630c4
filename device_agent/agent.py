"""The orchestrator: gesture -> capture -> verdict -> feedback -> outbox -> uplink.

Threads (all named and supervised, dermascope_wire.threads): ``camera`` fills the frame ring;
``agent`` (the caller of :meth:`run`) turns gestures into captures and runs the gateway's
commands, one at a time, so a command never races a capture (a pair's ring switching);
``feedback`` plays LED patterns; the uplink has its own. :meth:`run` returns (and the
service exits with a failure, for systemd to restart it) when one of them died.

An accepted capture is written durably to the outbox before the clinician sees "accepted":
that is a promise that it will reach the clinic. A press's capture is held back from
delivery, and ``capture.accepted`` logged, only once the press cannot turn out to be the
first half of a double press (which takes the capture back: a mode change, not a capture).
A capture stored but never announced because of a crash is announced at the next start,
marked ``recovered``.
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

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey
from gpiozero.pins import Factory

from dermascope_wire import threads
from dermascope_wire.bundle import pack
from dermascope_wire.logs import log_event
from dermascope_wire.seal import load_public_key, seal
from dermascope_wire.signing import CommandGuard, SequenceStore, Trust
from device_agent import __version__, commands
from device_agent.buttons.gestures import Gesture, GestureButton, GestureEvent
from device_agent.camera.base import Camera, CameraError, Frame, FrameTimeout
from device_agent.camera.calibration import (
    Calibration,
    CalibrationError,
    calibration_path,
    load_calibration,
)
from device_agent.camera.encode import MEDIA_TYPE, encode_jpeg
from device_agent.camera.metadata import SCHEMA, build_metadata
from device_agent.camera.quality import CHECK_NAMES, assess
from device_agent.camera.ring import FrameRing
from device_agent.camera.select import choose_frame
from device_agent.commands import NoArgs, OpenCase, SetIllumination, SetSettings
from device_agent.config import Config
from device_agent.feedback.lights import MODE_SIGNALS, Lights, Signal
from device_agent.report import render_report
from device_agent.session import Case, Session, SessionError
from device_agent.status import status_path, write_status
from device_agent.uplink.outbox import Outbox, StorageFull

log = logging.getLogger(__name__)


class UplinkLike(Protocol):
    on_command: Callable[[bytes, Callable[[dict[str, Any]], None]], None] | None
    #: The gateway signing keys acks must carry (set by the agent from its config).
    trust: Trust | None

    @property
    def online(self) -> bool: ...

    def notify(self) -> None: ...

    def healthy(self) -> bool: ...


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
class _Shot:
    """One judged image of a capture (a pair has two)."""

    capture_id: str
    frame: Frame
    mode: str
    quality: dict[str, Any]
    reasons: tuple[str, ...]


@dataclass(frozen=True)
class _Retake:
    shots: tuple[_Shot, ...]
    at: float


@dataclass(frozen=True)
class _Held:
    """An accepted press's capture, stored but held back while the press may still turn out
    to be the first half of a double press."""

    shots: tuple[_Shot, ...]
    overridden: bool
    pair_id: str | None
    case_open: bool
    #: when the press was released: a press that starts within the double-press window of
    #: this moment makes it a double press
    released_at: float


@dataclass(frozen=True)
class _Command:
    payload: bytes
    reply: Callable[[dict[str, Any]], None]


#: Commands waiting for the agent's thread; more are answered "busy" at once.
MAX_QUEUED_COMMANDS = 16
#: In the state folder: the highest command sequence accepted (replays are refused).
COMMAND_SEQUENCE_FILE = "command-sequence.json"


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
        self.session = Session(config.illumination.mode, config.case.timeout_s)
        self.brightness = config.illumination.brightness
        self.override_window = config.button.override_window
        self.clinic_key = self._load_clinic_key()
        # One trust list for acks and commands; unsigned passes only in development mode
        # without a gateway key (the config allows no other way to leave it out).
        sec = config.security
        self.trust = Trust.from_files(sec.gateway_public_key,
                                      allow_unsigned=sec.insecure_dev_mode
                                      and not sec.gateway_public_key)
        self.command_guard = CommandGuard(
            self.trust, config.device.id,
            SequenceStore(config.device.state_dir / COMMAND_SEQUENCE_FILE))
        if uplink is not None:
            uplink.on_command = self.submit_command
            uplink.trust = self.trust
        self.lights = Lights(
            config.pins.status_led,
            config.pins.ring_polarised,
            config.pins.ring_plain,
            pin_factory=pin_factory,
        )
        # Gestures (from gpiozero's thread) and commands (from paho's) for the agent's thread.
        self._inbox: queue.Queue[GestureEvent | _Command] = queue.Queue()
        self._queued_commands = 0
        self._commands_lock = threading.Lock()
        self.button = GestureButton(
            config.pins.button,
            self._inbox.put,
            pin_factory=pin_factory,
            bounce_time=config.button.bounce_time,
            hold_time=config.button.hold_time,
            double_press_window=config.button.double_press_window,
        )
        self._stop = threading.Event()
        self.ring_started_at = 0.0
        self._camera_thread: threads.Supervised | None = None
        self._last_retake: _Retake | None = None
        self._held: _Held | None = None
        # Bytes a refused capture needed: "storage full" stands until a write succeeds or
        # that much room is back (in the quota and on the disk).
        self._full_needs: int | None = None
        #: set when :meth:`run` ended because a thread died
        self.failed = False
        self._camera_fault = False
        self._wake = threading.Event()
        self._last_activity = time.monotonic()
        # Autofocus (cameras that have it): due when the camera (re)starts, after a "focus"
        # retake, and every camera.autofocus_every_s; never while a capture takes frames.
        self._autofocus_due_at = 0.0
        self._capturing = threading.Event()
        self.asleep = False
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

    def _load_clinic_key(self) -> X25519PublicKey | None:
        path = self.config.security.clinic_public_key
        # The config refuses a missing key unless security.insecure_dev_mode says otherwise.
        return None if path is None else load_public_key(path)

    # -- life cycle ---------------------------------------------------------------------
    def start(self) -> None:
        if not self.config.uplink.tls:
            log_event(log, "security.insecure_transport", logging.WARNING,
                      reason="uplink.insecure_dev_mode: plain MQTT, no TLS; development only")
        if self.clinic_key is None:
            log_event(log, "security.unsealed", logging.WARNING,
                      reason="security.insecure_dev_mode: captures are stored and sent "
                             "unsealed; development only, never with patients")
        if self.trust.allow_unsigned:
            log_event(log, "security.unauthenticated_gateway", logging.WARNING,
                      reason="security.insecure_dev_mode without gateway_public_key: unsigned "
                             "acks and commands are accepted; development only")
        self._announce_recovered()
        self.ring_started_at = time.monotonic()
        self.camera.start()
        self._light_for(self.session.mode)
        self._camera_thread = threads.start("camera", self._stream, log)
        log_event(log, "agent.started", device_id=self.config.device.id, version=__version__,
                  outbox_depth=self.outbox.depth())

    def _announce_recovered(self) -> None:
        """Captures stored before a crash cut the agent off from saying "accepted": say it
        now, so the device's count of accepted captures matches the clinic's."""
        recovered = self.outbox.unannounced()
        for entry in recovered:
            log_event(log, "capture.accepted", capture_id=entry.capture_id, recovered=True)
        self.outbox.mark_announced(e.capture_id for e in recovered)

    def healthy(self) -> bool:
        """Every thread of the device is alive (a dead one was logged as thread.crashed)."""
        return (threads.all_alive((self._camera_thread,)) and self.lights.healthy()
                and (self.uplink is None or self.uplink.healthy()))

    def run(self, stop: threading.Event, tick: Callable[[], None] | None = None) -> None:
        """Handle gestures and commands until ``stop`` is set (SIGTERM, or the demo
        finishing), or until a thread of the device died (then ``failed`` is set).

        ``tick`` runs at least every quarter second while every thread is alive: the service
        pings systemd's watchdog from it, so a hung or half-dead agent gets restarted.
        """
        while not stop.is_set():
            if not self.healthy():
                self.failed = True
                log_event(log, "agent.unhealthy", logging.CRITICAL,
                          reason="a thread of the device died (see thread.crashed)")
                return
            if tick is not None:
                tick()
            try:
                item = self._inbox.get(timeout=self._wait_time())
            except queue.Empty:
                item = None
            if isinstance(item, _Command):
                self._run_command(item)
            elif item is not None:
                self.handle(item)
            self._release_if_due()
            self._update_standing()
            if time.monotonic() >= self._next_status:
                self.publish_status()

    def _wait_time(self) -> float:
        if self._held is None:
            return 0.25
        due = self._held.released_at + self.config.button.double_press_window
        return min(0.25, max(0.0, due - time.monotonic()))

    def close(self, timeout: float = 5.0) -> None:
        """After :meth:`run` returned: a press's capture still held is announced now (a
        double press can no longer complete)."""
        self._release_held()
        self._stop.set()
        self._wake.set()
        self.camera.close()
        if self._camera_thread is not None:
            self._camera_thread.join(timeout)
        self.button.close()
        self.lights.close()
        log_event(log, "agent.stopped", device_id=self.config.device.id)

    def _stream(self) -> None:
        """The camera thread. It ends on a camera failure (logged): the agent is then
        unhealthy and the service restarts, which reopens the camera."""
        timeout = self.config.camera.frame_timeout
        while not self._stop.is_set():
            if self._sleep_due():
                try:
                    self._sleep()
                except CameraError as err:
                    self._camera_fault = True
                    log_event(log, "camera.failed", logging.ERROR, error=str(err))
                    return
                continue
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
        converged = self.camera.autofocus(self.config.camera.frame_timeout)
        # A cycle that did not converge (nothing in view, the lens lifted) is tried again soon.
        every = self.config.camera.autofocus_every_s
        self._autofocus_due_at = time.monotonic() + (every if converged else min(every, 5.0))
        log_event(log, "camera.autofocus", converged=converged,
                  seconds=round(time.monotonic() - started, 3))

    # -- sleeping while nobody uses the device ------------------------------------------
    def _sleep_due(self) -> bool:
        after = self.config.camera.sleep_after_s
        return after > 0 and time.monotonic() - self._last_activity > after

    def _sleep(self) -> None:
        """Stop streaming and darken the ring until a gesture wakes the device: a
        streaming camera costs CPU, power and heat for nothing on a device in its cradle."""
        self.camera.close()
        self.ring.clear()
        self.lights.dark()
        self.asleep = True
        log_event(log, "camera.asleep", idle_s=self.config.camera.sleep_after_s)
        self._wake.wait()  # set by a gesture, or by close()
        self._wake.clear()
        if self._stop.is_set():
            return
        self.ring_started_at = time.monotonic()
        self.camera.start()
        self._autofocus_due_at = 0.0  # the lens may have moved while the camera slept
        self._light_for(self.session.mode)
        self.asleep = False
        log_event(log, "camera.awake")

    def wake(self) -> None:
        self._last_activity = time.monotonic()
        self._wake.set()

    # -- gestures -----------------------------------------------------------------------
    def handle(self, event: GestureEvent) -> CaptureOutcome | None:
        log_event(log, f"gesture.{event.gesture.value}")
        if event.gesture is Gesture.DOUBLE_PRESS:
            self._withdraw_held()
        else:
            self._release_held()
        if self.asleep:
            # The press that wakes the device is not a capture: there are no frames around
            # it to choose from. The LED turns steady once the camera streams again.
            self.wake()
            return None
        self._last_activity = time.monotonic()
        if event.gesture is Gesture.PRESS:
            return self._record(self.capture(event.pressed_at, event.released_at))
        if event.gesture is Gesture.HOLD:
            return self._record(self.override())
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

    # -- capture ------------------------------------------------------------------------
    def capture(self, pressed_at: float, released_at: float | None = None) -> CaptureOutcome:
        """Choose the best frame around ``pressed_at`` (and, in pair mode, a second one
        under the other light), judge them, keep them if they are good. With ``released_at``
        (a press of the button) a kept capture is held while a double press may follow."""
        cam = self.config.camera
        self.lights.show(Signal.CAPTURING)
        mode = self.session.mode
        self._capturing.set()
        try:
            first = self._shoot(pressed_at, "polarised" if mode == "pair" else mode,
                                cam.window_before, cam.window_after)
            shots = [first]
            if first is not None and mode == "pair":
                shots.append(self._second_of_pair())
        finally:
            self._capturing.clear()
        if any(shot is None for shot in shots):
            capture_id = first.capture_id if first else uuid.uuid4().hex
            log_event(log, "capture.failed", logging.ERROR, capture_id=capture_id,
                      reason="no_frame")
            self.lights.show(Signal.FAULT)
            return CaptureOutcome(capture_id, "failed", ("no_frame",))
        judged = [shot for shot in shots if shot is not None]
        failed = {reason for shot in judged for reason in shot.reasons}
        reasons = tuple(name for name in CHECK_NAMES if name in failed)
        if reasons:
            self._last_retake = _Retake(tuple(judged), time.monotonic())
            if "focus" in reasons:
                self._autofocus_due_at = 0.0  # before the clinician's retake, if it can help
            for shot in judged:
                log_event(log, "capture.rejected", capture_id=shot.capture_id,
                          reasons=list(reasons), scores=shot.quality["scores"],
                          frame_offset_s=shot.quality["frame_offset_s"],
                          illumination=shot.mode)
            self.lights.show(Signal.RETAKE)
            return CaptureOutcome(judged[0].capture_id, "retake", reasons,
                                  frame_offset=judged[0].quality["frame_offset_s"],
                                  scores=judged[0].quality["scores"],
                                  linked=tuple(s.capture_id for s in judged))
        self._last_retake = None
        return self._keep(judged, overridden=False, released_at=released_at)

    def _shoot(self, moment: float, mode: str, before: float, after: float) -> _Shot | None:
        """The best frame in [moment - before, moment + after], calibrated and judged."""
        cam = self.config.camera
        self.ring.wait_until(moment + after, timeout=cam.frame_timeout)
        window = self.ring.window(moment - before, moment + after)
        choice = choose_frame(window, moment, before, after)
        if choice is None:
            return None
        frame, offset = choice
        if self.calibration is not None:
            frame = replace(frame, image=self.calibration.apply(frame.image, mode))
        report = assess(frame.image, self.thresholds)
        quality = {**report.to_dict(), "frame_offset_s": round(offset, 4)}
        return _Shot(uuid.uuid4().hex, frame, mode, quality, tuple(report.reasons))

    def _second_of_pair(self) -> _Shot | None:
        """Switch to non-polarised light and take the best frame once the light has
        settled; back to polarised afterwards."""
        cam = self.config.camera
        self.lights.illuminate("non_polarised", self.brightness)
        # Frames exposed (even partly) before the switch still show the old light.
        settled = time.monotonic() + 2.0 / cam.fps
        try:
            return self._shoot(settled, "non_polarised", 0.0, cam.window_after + 2.0 / cam.fps)
        finally:
            self._light_for(self.session.mode)

    def override(self) -> CaptureOutcome | None:
        """Keep the last retake anyway: the clinician judged it good enough, deliberately."""
        retake = self._last_retake
        if retake is None or time.monotonic() - retake.at > self.override_window:
            log_event(log, "override.ignored", reason="no recent retake")
            return None
        self._last_retake = None
        return self._keep(list(retake.shots), overridden=True)

    def _keep(self, shots: list[_Shot], overridden: bool,
              released_at: float | None = None) -> CaptureOutcome:
        """Seal and store every image of the capture durably, as one (a pair is both images
        or neither, whatever crash comes); only then say "accepted"."""
        case = self.session.case()
        pair_id = uuid.uuid4().hex if len(shots) > 1 else None
        items = []
        for index, shot in enumerate(shots, start=1):
            pair = None if pair_id is None else {"pair_id": pair_id, "index": index,
                                                 "of": len(shots)}
            items.append((shot.capture_id, self._package(shot, overridden, case, pair)))
        hold = released_at is not None and self.config.button.double_press_window > 0
        try:
            self.outbox.put_group(items, hold=hold)
        except OSError as err:
            return self._not_stored(shots[0].capture_id, err, sum(len(p) for _, p in items))
        self._full_needs = None  # a write succeeded: there is room again
        self.lights.show(Signal.OVERRIDDEN if overridden else Signal.ACCEPTED)
        held = _Held(tuple(shots), overridden, pair_id, case is not None,
                     released_at or time.monotonic())
        if hold:
            self._held = held
        else:
            self._announce(held)
        first = shots[0]
        return CaptureOutcome(first.capture_id, "accept", (), overridden,
                              first.quality["frame_offset_s"], first.quality["scores"],
                              linked=tuple(capture_id for capture_id, _ in items))

    def _announce(self, kept: _Held) -> None:
        """The capture is on its way: log it accepted, let the uplink have it."""
        ids = [shot.capture_id for shot in kept.shots]
        self.outbox.release(ids)
        for shot in kept.shots:
            log_event(log, "capture.accepted", capture_id=shot.capture_id,
                      overridden=kept.overridden, scores=shot.quality["scores"],
                      frame_offset_s=shot.quality["frame_offset_s"], illumination=shot.mode,
                      pair_id=kept.pair_id, case_open=kept.case_open)
        self.outbox.mark_announced(ids)
        if self.uplink is not None:
            self.uplink.notify()

    def _release_if_due(self) -> None:
        held = self._held
        if held is None:
            return
        window = self.config.button.double_press_window
        if time.monotonic() < held.released_at + window:
            return
        if self.button.pressed_since(held.released_at, within=window):
            return  # a second press began in time: its gesture decides (double press or not)
        self._release_held()

    def _release_held(self) -> None:
        held, self._held = self._held, None
        if held is not None:
            self._announce(held)

    def _withdraw_held(self) -> None:
        """The press was the first half of a double press: its capture never leaves."""
        held, self._held = self._held, None
        if held is None:
            return
        ids = [shot.capture_id for shot in held.shots]
        self.outbox.withdraw(ids)
        for capture_id in ids:
            log_event(log, "capture.withdrawn", capture_id=capture_id, reason="double_press")

    def _package(self, shot: _Shot, overridden: bool, case: Case | None,
                 pair: dict[str, Any] | None) -> bytes:
        image = encode_jpeg(shot.frame.image, self.config.camera.jpeg_quality)
        # The frame's own moment on the wall clock, not the moment we got round to it.
        captured_at = dt.datetime.now(dt.UTC) - dt.timedelta(
            seconds=max(0.0, time.monotonic() - shot.frame.timestamp))
        metadata = build_metadata(
            capture_id=shot.capture_id,
            device_id=self.config.device.id,
            frame=shot.frame,
            camera_model=self.camera.model,
            captured_at=captured_at,
            image=image,
            media_type=MEDIA_TYPE,
            quality=shot.quality,
            illumination_mode=shot.mode,
            illumination=self.config.illumination,
            brightness=self.brightness,
            overridden=overridden,
            software_version=__version__,
            calibration_id=self._calibration_id(shot.mode),
            case_token=case.token if case else None,
            anatomic_site=case.anatomic_site if case else None,
            pair=pair,
        )
        bundle = pack(metadata, image)
        if self.clinic_key is None:
            return bundle
        return seal(bundle, self.clinic_key, self.config.device.id, shot.capture_id)

    def _not_stored(self, capture_id: str, err: OSError, size: int) -> CaptureOutcome:
        if isinstance(err, StorageFull):
            self._full_needs = size
            log_event(log, "capture.refused", logging.WARNING, capture_id=capture_id,
                      reason="storage_full", error=str(err))
            self.lights.show(Signal.STORAGE_FULL)
            return CaptureOutcome(capture_id, "refused", ("storage_full",))
        log_event(log, "capture.failed", logging.ERROR, capture_id=capture_id,
                  reason="outbox_write", error=str(err))
        self.lights.show(Signal.FAULT)
        return CaptureOutcome(capture_id, "failed", ("outbox_write",))

    def _calibration_id(self, mode: str) -> str | None:
        if self.calibration is None or mode not in self.calibration.modes:
            return None
        return self.calibration.calibration_id

    # -- remote commands (device_agent.commands), on the agent's thread -----------------
    def submit_command(self, payload: bytes, reply: Callable[[dict[str, Any]], None]) -> None:
        """Queue a command for the agent's thread (called from paho's); ``reply`` answers.
        A flood of commands is answered "busy" rather than queued without bound."""
        with self._commands_lock:
            busy = self._queued_commands >= MAX_QUEUED_COMMANDS
            if not busy:
                self._queued_commands += 1
        if busy:
            log_event(log, "command.refused", logging.WARNING, code="busy")
            reply({"id": None, "ok": False, "error": {
                "code": "busy", "message": f"{MAX_QUEUED_COMMANDS} commands are waiting"}})
            return
        self._inbox.put(_Command(payload, reply))

    def _run_command(self, command: _Command) -> None:
        with self._commands_lock:
            self._queued_commands -= 1
        answer = self.execute_command(command.payload)
        try:
            command.reply(answer)
        except (ValueError, OSError, RuntimeError) as err:
            log_event(log, "command.reply_failed", logging.WARNING, error=str(err))

    def execute_command(self, payload: bytes) -> dict[str, Any]:
        """Run one command now, on the caller's thread (the agent's, or a test's)."""
        return commands.execute(payload, self, self.command_guard)

    def open_case(self, args: OpenCase) -> dict[str, Any]:
        case = self.session.open_case(args.case_token, args.anatomic_site, args.timeout_s)
        log_event(log, "case.opened", anatomic_site=case.anatomic_site, timeout_s=case.timeout)
        return {"case_open": True, "timeout_s": case.timeout}

    def close_case(self, args: NoArgs) -> dict[str, Any]:
        was_open = self.session.close_case() is not None
        log_event(log, "case.closed", was_open=was_open)
        return {"case_open": False, "was_open": was_open}

    def set_illumination(self, args: SetIllumination) -> dict[str, Any]:
        self.session.set_mode(args.mode)
        if args.brightness is not None:
            self.brightness = args.brightness
        self._light_for(args.mode)
        log_event(log, "illumination.changed", mode=args.mode, brightness=self.brightness)
        return {"mode": args.mode, "brightness": self.brightness}

    def set_settings(self, args: SetSettings) -> dict[str, Any]:
        if args.quality is not None:
            try:
                self.thresholds = replace(self.thresholds, **args.quality)
            except TypeError as err:
                raise SessionError(f"quality: {err}") from None
        if args.override_window is not None:
            self.override_window = args.override_window
        log_event(log, "settings.changed", changed=sorted(args.model_dump(exclude_none=True)))
        return {"quality": {k: getattr(self.thresholds, k)
                            for k in (args.quality or {})},
                "override_window": self.override_window}

    def self_test(self, args: NoArgs) -> dict[str, Any]:
        """Judge the newest frame and send the self-test picture to the clinic the way
        captures travel (sealed, through the outbox), marked ``kind: self_test``."""
        latest = self.ring.latest()
        if latest is None:
            return {"camera": "asleep" if self.asleep else "no frames", "verdict": None}
        report = assess(latest.image, self.thresholds)
        picture = render_report(latest.image, report, f"self-test  {self.config.device.id}  "
                                f"{dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC")
        report_id = uuid.uuid4().hex
        metadata = {"schema": SCHEMA, "kind": "self_test", "capture_id": report_id,
                    "device_id": self.config.device.id,
                    "captured_at": dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds"),
                    "quality": report.to_dict(), "software_version": __version__}
        bundle = pack(metadata, encode_jpeg(picture, 90))
        payload = (bundle if self.clinic_key is None else
                   seal(bundle, self.clinic_key, self.config.device.id, report_id))
        try:
            self.outbox.put(report_id, payload, announced=True)
        except OSError as err:
            return {"camera": "streaming", **report.to_dict(), "report_sent": False,
                    "error": str(err)}
        self._full_needs = None
        if self.uplink is not None:
            self.uplink.notify()
        return {"camera": "streaming", **report.to_dict(), "report_capture_id": report_id}

    def resend_pending(self, args: NoArgs) -> dict[str, Any]:
        if self.uplink is not None:
            self.uplink.notify()
        return {"pending": self.outbox.depth()}

    # -- what the clinician sees between captures --------------------------------------
    def _update_standing(self) -> None:
        if self._full_needs is not None and self.outbox.has_room(self._full_needs):
            self._full_needs = None  # delivered, or the disk was cleared: room again
        if self._camera_fault:
            standing = Signal.FAULT
        elif self.asleep:
            standing = Signal.ASLEEP
        elif self._full_needs is not None:
            standing = Signal.STORAGE_FULL
        elif self.uplink is not None and not self.uplink.online:
            standing = Signal.OFFLINE
        else:
            standing = Signal.READY
        if standing is not self.lights.standing:
            self.lights.show(standing)

    # -- status for `device-agent status` and `doctor` ------------------------------------
    def status(self, args: NoArgs | None = None) -> dict[str, Any]:
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
            "illumination": self.session.mode,
            "brightness": self.brightness,
            "signal": self.lights.standing.value,
            "case_open": self.session.case() is not None,
            "camera": {"model": self.camera.model, "streaming": streaming,
                       "fps": round(fps, 2), "asleep": self.asleep},
            "last_capture": None if last is None else {
                "capture_id": last.capture_id, "verdict": last.verdict,
                "reasons": list(last.reasons), "overridden": last.overridden,
                "at": self._last_outcome_at},
            "storage_full": self._full_needs is not None,
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
