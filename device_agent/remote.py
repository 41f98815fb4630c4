"""Remote commands from the clinic's gateway, on the agent's thread.

Commands arrive on paho's thread; ``CommandQueue`` queues them for the agent's thread (a
command never races a capture, e.g. a pair's ring switching), answers a flood "busy" rather
than queueing it without bound, and checks each one with the signed-command guard
(``signing.CommandGuard``: signature, device, expiry, sequence) before
``device_agent.commands`` validates and runs it. ``CommandHandlers`` is what the commands
do; the agent mixes it in and so is their target (``commands.CommandTarget``).
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

from dermascope_wire.logs import log_event
from dermascope_wire.signing import CommandGuard, SequenceStore, Trust
from device_agent import __version__, commands
from device_agent.camera.base import Camera
from device_agent.camera.metadata import SCHEMA
from device_agent.camera.quality import Thresholds, assess
from device_agent.camera.ring import FrameRing
from device_agent.capture import Outcomes
from device_agent.commands import CommandTarget, NoArgs, OpenCase, SetIllumination, SetSettings
from device_agent.config import Config
from device_agent.feedback.lights import Lights
from device_agent.packaging import Packager
from device_agent.report import render_report
from device_agent.session import Session, SessionError
from device_agent.uplink.outbox import Outbox

log = logging.getLogger(__name__)

#: Commands waiting for the agent's thread; more are answered "busy" at once.
MAX_QUEUED_COMMANDS = 16
#: In the state folder: the highest command sequence accepted (replays are refused).
COMMAND_SEQUENCE_FILE = "command-sequence.json"

Reply = Callable[[dict[str, Any]], None]


class UplinkLike(Protocol):
    """What the agent and its commands use of the uplink (``uplink.client.Uplink``)."""

    on_command: Callable[[bytes, Reply], None] | None
    #: The gateway signing keys acks must carry (set by the agent from its config).
    trust: Trust | None

    @property
    def online(self) -> bool: ...

    def notify(self) -> None: ...

    def healthy(self) -> bool: ...


@dataclass(frozen=True)
class QueuedCommand:
    payload: bytes
    reply: Reply


class CommandQueue:
    def __init__(self, trust: Trust, device_id: str, state_dir: Path,
                 put: Callable[[QueuedCommand], None]) -> None:
        """``put`` hands a command to the agent's thread (its inbox)."""
        self.guard = CommandGuard(trust, device_id,
                                  SequenceStore(state_dir / COMMAND_SEQUENCE_FILE))
        self._put = put
        self._queued = 0
        self._lock = threading.Lock()

    def submit(self, payload: bytes, reply: Reply) -> None:
        """Queue a command for the agent's thread (called from paho's); ``reply`` answers.
        A flood of commands is answered "busy" rather than queued without bound."""
        with self._lock:
            busy = self._queued >= MAX_QUEUED_COMMANDS
            if not busy:
                self._queued += 1
        if busy:
            log_event(log, "command.refused", logging.WARNING, code="busy")
            reply({"id": None, "ok": False, "error": {
                "code": "busy", "message": f"{MAX_QUEUED_COMMANDS} commands are waiting"}})
            return
        self._put(QueuedCommand(payload, reply))

    def run(self, command: QueuedCommand, target: CommandTarget) -> None:
        """Run a queued command on the agent's thread and answer it."""
        with self._lock:
            self._queued -= 1
        answer = self.execute(command.payload, target)
        try:
            command.reply(answer)
        except (ValueError, OSError, RuntimeError) as err:
            log_event(log, "command.reply_failed", logging.WARNING, error=str(err))

    def execute(self, payload: bytes, target: CommandTarget) -> dict[str, Any]:
        """Run one command now, on the caller's thread (the agent's, or a test's)."""
        return commands.execute(payload, target, self.guard)


class CommandHandlers:
    """The commands' effects on the device, mixed into the agent (whose parts they use)."""

    config: Config
    session: Session
    ring: FrameRing
    packager: Packager
    thresholds: Thresholds
    brightness: float
    override_window: float
    asleep: bool
    camera: Camera
    lights: Lights
    outbox: Outbox
    uplink: UplinkLike | None
    outcomes: Outcomes
    _light_for: Callable[[str], None]

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
        try:
            self.packager.store_report(report_id, metadata, picture)
        except OSError as err:
            return {"camera": "streaming", **report.to_dict(), "report_sent": False,
                    "error": str(err)}
        return {"camera": "streaming", **report.to_dict(), "report_capture_id": report_id}

    def resend_pending(self, args: NoArgs) -> dict[str, Any]:
        self.packager.notify()
        return {"pending": self.outbox.depth()}

    def status(self, args: NoArgs | None = None) -> dict[str, Any]:
        """The device's state, for the ``status`` command and the status file."""
        frames = self.ring.window(float("-inf"), float("inf"))
        fps = ((len(frames) - 1) / (frames[-1].timestamp - frames[0].timestamp)
               if len(frames) > 1 and frames[-1].timestamp > frames[0].timestamp else 0.0)
        streaming = bool(frames) and time.monotonic() - frames[-1].timestamp < 2.0
        last = self.outcomes.last()
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
                "at": self.outcomes.last_at},
            "storage_full": self.packager.full_needs is not None,
            "uplink_online": self.uplink.online if self.uplink is not None else False,
            "outbox": {"depth": self.outbox.depth(), "used_bytes": self.outbox.used_bytes(),
                       "quota_bytes": self.outbox.quota_bytes,
                       "oldest_created": self.outbox.oldest_created(),
                       "quarantined": len(self.outbox.quarantined())},
        }
