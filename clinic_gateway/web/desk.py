"""What the GP's page and the API do, whoever asks: the devices' overview, a device's case,
opening and closing it, and the audit of each action with the staff member's name.

Cases go through the gateway's own ``open_case``/``close_case`` (clinic_gateway/gateway.py):
the case registry records the case before the signed command goes out, so the captures it
is opened for are filed under it, and every command is audited. A Gateway object is made
for that and never started: this process receives no captures.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clinic_gateway.audit import AuditError, AuditLog, audit_path
from clinic_gateway.cases import CaseRecord
from clinic_gateway.commander import CommandTimeout
from clinic_gateway.gateway import CaseError, Gateway
from clinic_gateway.web.board import StatusBoard
from clinic_gateway.web.captures import CaptureShelf, CaptureView
from dermascope_wire.identity import IdentityError, check_case_token, check_device_id
from dermascope_wire.logs import log_event

log = logging.getLogger("clinic_gateway.web")

#: Anatomic sites as the ISIC archive names them (``anatom_site_general``): what a device's
#: ``open_case`` takes (docs/protocol.md section 11; device_agent/session.py has the same).
ANATOMIC_SITES = ("head/neck", "upper extremity", "lower extremity", "anterior torso",
                  "posterior torso", "lateral torso", "palms/soles", "oral/genital")


class DeskError(Exception):
    """An action that could not be done; ``status`` is the HTTP status that says why
    (400 bad input, 404 no such device, 502 the device refused, 504 it did not answer)
    and the message never holds the case token."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class CaseView:
    """A device's case, known by its reference (never its token)."""

    ref: str
    open: bool
    opened_at: str
    ends_at: str | None
    anatomic_site: str | None


@dataclass(frozen=True)
class DeviceView:
    device_id: str
    online: bool
    state: str  # online, offline, or unknown (no status seen)
    outbox_depth: int | None
    last_seen: str | None
    calibrated_at: str | None
    calibration_age_days: float | None
    software_version: str | None
    case: CaseView | None  # the open case, if any


def _iso(t: float | dt.datetime | None) -> str | None:
    if t is None:
        return None
    if isinstance(t, float | int):
        t = dt.datetime.fromtimestamp(t, dt.UTC)
    return t.astimezone(dt.UTC).isoformat(timespec="seconds")


def _case_view(case: CaseRecord, now: float) -> CaseView:
    return CaseView(case.ref, case.ends_at is None or now < case.ends_at, _iso(case.opened_at)
                    or "", _iso(case.ends_at), case.anatomic_site)


class Desk:
    def __init__(self, gateway: Gateway, board: StatusBoard, command_timeout: float = 10.0
                 ) -> None:
        self.gateway = gateway
        self.board = board
        self.command_timeout = command_timeout
        self.shelf = CaptureShelf(gateway.store_dir, gateway.cases)
        self.audit = AuditLog(audit_path(gateway.store_dir))

    @property
    def store_dir(self) -> Path:
        return self.gateway.store_dir

    # ------------------------------------------------------------------------------ reading

    def devices(self) -> list[DeviceView]:
        statuses = self.board.devices()
        ids = sorted(set(statuses) | set(self.shelf.device_ids()))
        return [self.device(d) for d in ids]

    def device(self, device_id: str) -> DeviceView:
        self._check(device_id)
        status = self.board.get(device_id)
        now = time.time()
        open_case = self.gateway.cases.open_case(device_id, now)
        calibrated = status.calibrated_at if status is not None else None
        age = None
        if calibrated is not None:
            age = round((dt.datetime.now(dt.UTC) - calibrated).total_seconds() / 86400, 1)
        return DeviceView(
            device_id=device_id,
            online=status is not None and status.state == "online",
            state=status.state if status is not None else "unknown",
            outbox_depth=status.outbox_depth if status is not None else None,
            last_seen=_iso(status.ts) if status is not None else None,
            calibrated_at=_iso(calibrated), calibration_age_days=age,
            software_version=status.software_version if status is not None else None,
            case=_case_view(open_case, now) if open_case is not None else None)

    def known(self, device_id: str) -> bool:
        return (self.board.get(device_id) is not None
                or (self.store_dir / device_id).is_dir()
                or bool(self.gateway.cases.cases(device_id)))

    def last_case(self, device_id: str) -> tuple[CaseView | None, list[CaptureView]]:
        """The device's open case, or the last one it had, and the captures filed under it."""
        self._check(device_id)
        cases = self.gateway.cases.cases(device_id)
        if not cases:
            return None, []
        case = cases[-1]
        return _case_view(case, time.time()), self.shelf.of_case(case)

    def thumbnail(self, device_id: str, capture_id: str) -> bytes | None:
        self._check(device_id)
        return self.shelf.thumbnail(device_id, capture_id)

    # ------------------------------------------------------------------------------ acting

    def open_case(self, user: str, device_id: str, case_token: str,
                  anatomic_site: str | None) -> CaseView:
        self._check(device_id)
        if anatomic_site is not None and anatomic_site not in ANATOMIC_SITES:
            raise DeskError(400, f"anatomic_site must be one of {', '.join(ANATOMIC_SITES)}")
        try:
            check_case_token(case_token)
        except IdentityError as err:  # its message never repeats the token
            self.record("web.case_open_refused", user, device_id=device_id, reason=str(err))
            raise DeskError(400, str(err)) from None
        ref = self.gateway.cases.ref(case_token)
        self.record("web.case_open", user, device_id=device_id, case_ref=ref,
                    anatomic_site=anatomic_site)
        try:
            self.gateway.open_case(device_id, case_token, anatomic_site,
                                   timeout=self.command_timeout)
        except CaseError as err:
            raise DeskError(502, f"{device_id} refused to open the case: "
                                 f"{_reason(err)}") from None
        except CommandTimeout:
            raise DeskError(504, f"{device_id} did not answer within {self.command_timeout:g} "
                                 "s: is it on and online?") from None
        except AuditError as err:
            raise DeskError(503, f"the audit log cannot be written: {err}") from None
        except OSError as err:  # the broker refused us, or cannot be reached
            raise DeskError(502, f"the command could not be sent: {err}") from None
        case = self.gateway.cases.open_case(device_id)
        return _case_view(case, time.time()) if case is not None else \
            CaseView(ref, True, _iso(time.time()) or "", None, anatomic_site)

    def close_case(self, user: str, device_id: str) -> None:
        self._check(device_id)
        current = self.gateway.cases.open_case(device_id)
        self.record("web.case_close", user, device_id=device_id,
                    case_ref=current.ref if current is not None else None)
        try:
            self.gateway.close_case(device_id, timeout=self.command_timeout)
        except CaseError as err:
            raise DeskError(502, f"{device_id} refused to close the case: "
                                 f"{_reason(err)}") from None
        except CommandTimeout:
            raise DeskError(504, f"{device_id} did not answer within {self.command_timeout:g} "
                                 "s; the gateway files no more captures under the case") \
                from None
        except AuditError as err:
            raise DeskError(503, f"the audit log cannot be written: {err}") from None
        except OSError as err:
            raise DeskError(502, f"the command could not be sent: {err}") from None

    def record(self, event: str, user: str, **fields: Any) -> None:
        """One audit line (and log event) for a staff action. A line that cannot be written
        stops the action: what the audit cannot show must not happen."""
        self.audit.append(event, user=user, **fields)
        log_event(log, event, user=user, **fields)

    def _check(self, device_id: str) -> None:
        try:
            check_device_id(device_id)
        except IdentityError as err:
            raise DeskError(404, str(err)) from None


def _reason(err: Exception) -> str:
    return str(err).split(": ", 1)[-1][:200]
