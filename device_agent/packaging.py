"""Packaging: an accepted capture's metadata, JPEG and bundle, sealed for the clinic and
stored durably in the outbox; then held back or announced.

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
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

from dermascope_wire.bundle import pack
from dermascope_wire.logs import log_event
from dermascope_wire.seal import load_public_key, seal
from device_agent import __version__
from device_agent.camera.base import Camera
from device_agent.camera.calibration import Calibration
from device_agent.camera.encode import MEDIA_TYPE, encode_jpeg
from device_agent.camera.metadata import build_metadata
from device_agent.capture import CaptureOutcome, Shot
from device_agent.config import Config
from device_agent.session import Case
from device_agent.uplink.outbox import Outbox, StorageFull

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Kept:
    """An accepted capture, stored; held back while its press may still turn out to be the
    first half of a double press, then announced."""

    shots: tuple[Shot, ...]
    overridden: bool
    pair_id: str | None
    case_open: bool
    #: when the press was released: a press that starts within the double-press window of
    #: this moment makes it a double press
    released_at: float

    @property
    def ids(self) -> list[str]:
        return [shot.capture_id for shot in self.shots]


def not_stored(capture_id: str, err: OSError) -> CaptureOutcome:
    """An accepted capture the outbox could not take: refused (storage full) or failed."""
    if isinstance(err, StorageFull):
        log_event(log, "capture.refused", logging.WARNING, capture_id=capture_id,
                  reason="storage_full", error=str(err))
        return CaptureOutcome(capture_id, "refused", ("storage_full",))
    log_event(log, "capture.failed", logging.ERROR, capture_id=capture_id,
              reason="outbox_write", error=str(err))
    return CaptureOutcome(capture_id, "failed", ("outbox_write",))


class Packager:
    def __init__(self, config: Config, camera: Camera, calibration: Calibration | None,
                 outbox: Outbox, notify: Callable[[], None]) -> None:
        """``camera`` names its model (known once started); ``notify`` tells the uplink a
        capture is ready to go."""
        self.config = config
        self.camera = camera
        self.calibration = calibration
        self.outbox = outbox
        self.notify = notify
        path = config.security.clinic_public_key
        # The config refuses a missing key unless security.insecure_dev_mode says otherwise.
        self.clinic_key: X25519PublicKey | None = (None if path is None
                                                   else load_public_key(path))
        self.held: Kept | None = None
        #: Bytes a refused capture needed: "storage full" stands until a write succeeds or
        #: that much room is back (in the quota and on the disk).
        self.full_needs: int | None = None

    # -- storing ------------------------------------------------------------------------
    def store(self, shots: tuple[Shot, ...], overridden: bool, case: Case | None,
              brightness: float, released_at: float, hold: bool) -> Kept:
        """Seal and store every image of the capture durably, as one (a pair is both images
        or neither, whatever crash comes). OSError (StorageFull among them) if not stored."""
        pair_id = uuid.uuid4().hex if len(shots) > 1 else None
        items = []
        for index, shot in enumerate(shots, start=1):
            pair = None if pair_id is None else {"pair_id": pair_id, "index": index,
                                                 "of": len(shots)}
            items.append((shot.capture_id,
                          self._package(shot, overridden, case, pair, brightness)))
        try:
            self.outbox.put_group(items, hold=hold)
        except StorageFull:
            self.full_needs = sum(len(p) for _, p in items)
            raise
        self.full_needs = None  # a write succeeded: there is room again
        return Kept(shots, overridden, pair_id, case is not None, released_at)

    def store_report(self, report_id: str, metadata: dict[str, Any], picture: np.ndarray) -> None:
        """A self-test picture, sent to the clinic the way captures travel (sealed, through
        the outbox), announced at once. OSError if not stored."""
        payload = self._seal(pack(metadata, encode_jpeg(picture, 90)), report_id)
        self.outbox.put(report_id, payload, announced=True)
        self.full_needs = None
        self.notify()

    def recheck_room(self) -> bool:
        """Whether "storage full" still stands (delivered, or the disk cleared: not)."""
        if self.full_needs is not None and self.outbox.has_room(self.full_needs):
            self.full_needs = None
        return self.full_needs is not None

    def _package(self, shot: Shot, overridden: bool, case: Case | None,
                 pair: dict[str, Any] | None, brightness: float) -> bytes:
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
            brightness=brightness,
            overridden=overridden,
            software_version=__version__,
            calibration_id=self._calibration_id(shot.mode),
            case_token=case.token if case else None,
            anatomic_site=case.anatomic_site if case else None,
            pair=pair,
        )
        return self._seal(pack(metadata, image), shot.capture_id)

    def _seal(self, bundle: bytes, capture_id: str) -> bytes:
        if self.clinic_key is None:
            return bundle
        return seal(bundle, self.clinic_key, self.config.device.id, capture_id)

    def _calibration_id(self, mode: str) -> str | None:
        if self.calibration is None or mode not in self.calibration.modes:
            return None
        return self.calibration.calibration_id

    # -- held back, announced, withdrawn ------------------------------------------------
    def hold(self, kept: Kept) -> None:
        self.held = kept

    def announce(self, kept: Kept) -> None:
        """The capture is on its way: log it accepted, let the uplink have it."""
        self.outbox.release(kept.ids)
        for shot in kept.shots:
            log_event(log, "capture.accepted", capture_id=shot.capture_id,
                      overridden=kept.overridden, scores=shot.quality["scores"],
                      frame_offset_s=shot.quality["frame_offset_s"], illumination=shot.mode,
                      pair_id=kept.pair_id, case_open=kept.case_open)
        self.outbox.mark_announced(kept.ids)
        self.notify()

    def announce_recovered(self) -> None:
        """Captures stored before a crash cut the agent off from saying "accepted": say it
        now, so the device's count of accepted captures matches the clinic's."""
        recovered = self.outbox.unannounced()
        for entry in recovered:
            log_event(log, "capture.accepted", capture_id=entry.capture_id, recovered=True)
        self.outbox.mark_announced(e.capture_id for e in recovered)

    def held_due_in(self, window: float) -> float | None:
        """Seconds until the held capture may be released (None: nothing held)."""
        if self.held is None:
            return None
        return self.held.released_at + window - time.monotonic()

    def release_if_due(self, window: float,
                       pressed_since: Callable[[float, float], bool]) -> None:
        """Announce the held capture once no double press can follow its press any more."""
        held = self.held
        if held is None or time.monotonic() < held.released_at + window:
            return
        if pressed_since(held.released_at, window):
            return  # a second press began in time: its gesture decides (double press or not)
        self.release_held()

    def release_held(self) -> None:
        held, self.held = self.held, None
        if held is not None:
            self.announce(held)

    def withdraw_held(self) -> None:
        """The press was the first half of a double press: its capture never leaves."""
        held, self.held = self.held, None
        if held is None:
            return
        self.outbox.withdraw(held.ids)
        for capture_id in held.ids:
            log_event(log, "capture.withdrawn", capture_id=capture_id, reason="double_press")
