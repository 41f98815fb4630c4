"""A case's captures as the store holds them, and their thumbnails.

The store keeps each capture as ``<device>/<capture>.jpg`` with its metadata beside it
(``<capture>.json``, docs/protocol.md section 12). A case's captures are those the gateway
filed under it: their metadata's case token has the case's reference
(``CaseRegistry.ref``), and so only captures the clinic had this case open for. The token
itself is read from the metadata only to compute that reference: it is never returned.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from clinic_gateway.cases import CaseRecord, CaseRegistry
from dermascope_wire.logs import log_event

log = logging.getLogger("clinic_gateway.web.captures")

#: The longest side of a thumbnail, in pixels.
THUMBNAIL_SIZE = 320
#: Captures listed for one case at most (newest kept): a case is a handful of lesions.
MAX_CAPTURES = 200
#: Sidecars read at most per listing (the newest files of the device's folder).
MAX_SCANNED = 2_000
_THUMBNAILS_CACHED = 256
_LISTINGS_CACHED = 1_000


@dataclass(frozen=True)
class CaptureView:
    """What the GP sees of one capture (no patient data, no case token)."""

    capture_id: str
    captured_at: str | None
    kind: str
    verdict: str | None
    reasons: list[str]
    light_mode: str | None
    pair: dict[str, Any] | None
    overridden: bool


def _view(capture_id: str, meta: dict[str, Any]) -> CaptureView:
    quality = meta.get("quality") if isinstance(meta.get("quality"), dict) else {}
    light = meta.get("illumination") if isinstance(meta.get("illumination"), dict) else {}
    pair = meta.get("pair") if isinstance(meta.get("pair"), dict) else None
    reasons = quality.get("reasons")
    return CaptureView(
        capture_id=capture_id,
        captured_at=meta.get("captured_at") if isinstance(meta.get("captured_at"), str) else None,
        kind=str(meta.get("kind", "capture"))[:32],
        verdict=quality.get("verdict") if isinstance(quality.get("verdict"), str) else None,
        reasons=[str(r)[:64] for r in reasons][:16] if isinstance(reasons, list) else [],
        light_mode=light.get("mode") if isinstance(light.get("mode"), str) else None,
        pair={k: pair.get(k) for k in ("pair_id", "index", "of")} if pair else None,
        overridden=meta.get("overridden") is True)


def _taken(view: CaptureView) -> float:
    if view.captured_at is None:
        return 0.0
    try:
        t = dt.datetime.fromisoformat(view.captured_at)
    except ValueError:
        return 0.0
    return (t if t.tzinfo else t.replace(tzinfo=dt.UTC)).timestamp()


class CaptureShelf:
    """Reads the store's captures for the web app."""

    def __init__(self, store_dir: Path, cases: CaseRegistry) -> None:
        self.store_dir = Path(store_dir)
        self.cases = cases
        self._thumbs: OrderedDict[tuple[str, str, int], bytes] = OrderedDict()
        self._listed: dict[tuple[str, str, float], tuple[int, list[CaptureView]]] = {}
        self._lock = threading.Lock()

    def device_ids(self) -> list[str]:
        """Devices with a folder in the store (they delivered at least one capture)."""
        from dermascope_wire.identity import DEVICE_ID

        try:
            return sorted(e.name for e in os.scandir(self.store_dir)
                          if e.is_dir() and not e.name.startswith(".") and DEVICE_ID.match(e.name))
        except FileNotFoundError:
            return []

    def of_case(self, case: CaseRecord) -> list[CaptureView]:
        """The captures filed under ``case``, oldest first. The answer is kept until the
        device's folder changes (a capture stored changes its time): the page asks every
        second, and a device's folder may hold years of captures."""
        folder = self.store_dir / case.device_id
        try:
            changed = folder.stat().st_mtime_ns
        except FileNotFoundError:
            return []
        key = (case.device_id, case.ref, case.opened_at)
        with self._lock:
            cached = self._listed.get(key)
            if cached is not None and cached[0] == changed:
                return cached[1]
        views = self._scan(folder, case)
        if time.time_ns() - changed < 1_000_000_000:
            # Changed a moment ago: a file added within the same tick of the folder's clock
            # would not change its time again, so this answer is not kept.
            return views
        with self._lock:
            if len(self._listed) >= _LISTINGS_CACHED:
                self._listed.clear()
            self._listed[key] = (changed, views)
        return views

    def _scan(self, folder: Path, case: CaseRecord) -> list[CaptureView]:
        since = case.opened_at - self.cases.skew
        try:
            entries = [e for e in os.scandir(folder)
                       if e.name.endswith(".json") and not e.name.startswith(".")]
        except FileNotFoundError:
            return []
        # Stored after the case opened (a capture is taken, then stored): cheap to tell
        # from the file's time, so only those sidecars are read.
        recent: list[tuple[float, os.DirEntry]] = []
        for entry in entries:
            try:
                mtime = entry.stat().st_mtime
            except FileNotFoundError:
                continue
            if mtime >= since:
                recent.append((mtime, entry))
        recent.sort(key=lambda item: item[0])
        views = []
        for _, entry in recent[-MAX_SCANNED:]:
            meta = self._metadata(Path(entry.path))
            if meta is None or not self._filed_under(meta, case):
                continue
            capture_id = entry.name.removesuffix(".json")
            if (folder / f"{capture_id}.jpg").exists():
                views.append(_view(capture_id, meta))
        views.sort(key=_taken)
        return views[-MAX_CAPTURES:]

    def _filed_under(self, meta: dict[str, Any], case: CaseRecord) -> bool:
        filed = meta.get("case")
        token = filed.get("token") if isinstance(filed, dict) else None
        return isinstance(token, str) and self.cases.ref(token) == case.ref

    @staticmethod
    def _metadata(path: Path) -> dict[str, Any] | None:
        try:
            meta = json.loads(path.read_bytes())
        except (OSError, ValueError) as err:
            log_event(log, "web.unreadable_sidecar", level=logging.WARNING, path=str(path),
                      error=type(err).__name__)
            return None
        return meta if isinstance(meta, dict) else None

    def image_path(self, device_id: str, capture_id: str) -> Path:
        return self.store_dir / device_id / f"{capture_id}.jpg"

    def thumbnail(self, device_id: str, capture_id: str) -> bytes | None:
        """A JPEG at most THUMBNAIL_SIZE pixels on its longest side, or None if there is no
        such capture. Kept for the next request (the page asks for each one once a second
        at most, the browser does not keep them: no-store)."""
        path = self.image_path(device_id, capture_id)
        try:
            mtime = path.stat().st_mtime_ns
        except FileNotFoundError:
            return None
        key = (device_id, capture_id, mtime)
        with self._lock:
            if key in self._thumbs:
                self._thumbs.move_to_end(key)
                return self._thumbs[key]
        data = np.fromfile(path, np.uint8)
        # A quarter of the size already while decoding: several times faster than a full
        # decode of a 12-megapixel JPEG followed by a resize.
        image = cv2.imdecode(data, cv2.IMREAD_REDUCED_COLOR_4)
        if image is not None and max(image.shape[:2]) < THUMBNAIL_SIZE:
            image = cv2.imdecode(data, cv2.IMREAD_COLOR)  # a small image: all of it
        if image is None:
            log_event(log, "web.unreadable_image", level=logging.WARNING, path=str(path))
            return None
        h, w = image.shape[:2]
        scale = THUMBNAIL_SIZE / max(h, w)
        if scale < 1:
            image = cv2.resize(image, (max(1, round(w * scale)), max(1, round(h * scale))),
                               interpolation=cv2.INTER_AREA)
        ok, jpeg = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 80])
        if not ok:
            return None
        thumb = jpeg.tobytes()
        with self._lock:
            self._thumbs[key] = thumb
            while len(self._thumbs) > _THUMBNAILS_CACHED:
                self._thumbs.popitem(last=False)
        return thumb
