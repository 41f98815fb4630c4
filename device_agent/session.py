"""The clinical session: the open case (if any) and how the lesion is lit.

The clinic's system knows the patient; the device only ever holds the opaque case token the
gateway sends with ``open_case``. A token that looks like a Danish CPR number (or any bare
national-id-like digit string) is refused, so a misconfigured clinic system cannot put a
patient's identity on the device. Captures without an open case are kept and marked
unassigned.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

from dermascope_wire import identity
from dermascope_wire.identity import IdentityError

#: Anatomic sites as the ISIC archive names them (``anatom_site_general``).
ANATOMIC_SITES = ("head/neck", "upper extremity", "lower extremity", "anterior torso",
                  "posterior torso", "lateral torso", "palms/soles", "oral/genital")
#: Illumination modes: one LED channel, or both back to back ("pair").
MODES = ("polarised", "non_polarised", "pair")


class SessionError(ValueError):
    """A case or mode request that cannot be honoured; the message says why."""


def check_case_token(token: str) -> str:
    """The token if it may be a case token (dermascope_wire.identity), else SessionError."""
    try:
        return identity.check_case_token(token)
    except IdentityError as err:
        raise SessionError(str(err)) from None


@dataclass(frozen=True)
class Case:
    token: str
    opened_at: float  # time.monotonic()
    timeout: float
    anatomic_site: str | None = None

    def expired(self, now: float) -> bool:
        return now - self.opened_at > self.timeout


class Session:
    """Thread-safe: commands arrive on the uplink's thread, captures on the agent's."""

    def __init__(self, mode: str, case_timeout: float) -> None:
        if mode not in MODES:
            raise SessionError(f"illumination mode {mode!r}: expected one of {MODES}")
        self._lock = threading.Lock()
        self._mode = mode
        self._case: Case | None = None
        self.case_timeout = case_timeout

    @property
    def mode(self) -> str:
        with self._lock:
            return self._mode

    def set_mode(self, mode: str) -> None:
        if mode not in MODES:
            raise SessionError(f"illumination mode {mode!r}: expected one of {MODES}")
        with self._lock:
            self._mode = mode

    def next_mode(self) -> str:
        """The double-press cycle: polarised -> non-polarised -> pair -> polarised."""
        with self._lock:
            self._mode = MODES[(MODES.index(self._mode) + 1) % len(MODES)]
            return self._mode

    def open_case(self, token: str, anatomic_site: str | None = None,
                  timeout: float | None = None) -> Case:
        check_case_token(token)
        if anatomic_site is not None and anatomic_site not in ANATOMIC_SITES:
            raise SessionError(f"anatomic_site {anatomic_site!r}: expected one of "
                               f"{', '.join(ANATOMIC_SITES)}")
        case = Case(token, time.monotonic(), timeout or self.case_timeout, anatomic_site)
        with self._lock:
            self._case = case
        return case

    def close_case(self) -> Case | None:
        with self._lock:
            case, self._case = self._case, None
            return case

    def case(self, now: float | None = None) -> Case | None:
        """The open case, or None (closing it first if it has timed out)."""
        with self._lock:
            if self._case is not None and self._case.expired(now or time.monotonic()):
                self._case = None
            return self._case

    def describe(self) -> dict[str, Any]:
        case = self.case()
        return {"mode": self.mode, "case_open": case is not None,
                "anatomic_site": case.anatomic_site if case else None}
