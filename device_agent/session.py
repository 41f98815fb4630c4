"""The clinical session: the open case (if any) and how the lesion is lit.

The clinic's system knows the patient; the device only ever holds the opaque case token the
gateway sends with ``open_case``. A token that looks like a Danish CPR number (or any bare
national-id-like digit string) is refused, so a misconfigured clinic system cannot put a
patient's identity on the device. Captures without an open case are kept and marked
unassigned.
"""

from __future__ import annotations

import calendar
import re
import threading
import time
import unicodedata
from dataclasses import dataclass
from typing import Any

#: Anatomic sites as the ISIC archive names them (``anatom_site_general``).
ANATOMIC_SITES = ("head/neck", "upper extremity", "lower extremity", "anterior torso",
                  "posterior torso", "lateral torso", "palms/soles", "oral/genital")
#: Illumination modes: one LED channel, or both back to back ("pair").
MODES = ("polarised", "non_polarised", "pair")

_TOKEN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}\Z")
# Runs of digits and what separates them (after NFKC, so full-width digits are digits).
_DIGITS_OR_SEPARATOR = re.compile(r"[0-9]+|[^0-9A-Za-z]{1,3}|[A-Za-z]+")
#: A run of this many digits anywhere is national-id-like, whatever it is meant to be.
_LONG_DIGIT_RUN = re.compile(r"[0-9]{9,}")
#: Where a CPR number written with separators may be split: DD|MM|YY|SSSS, or with the
#: century, DD|MM|YYYY|SSSS (positions counted in digits).
_CPR_SPLITS = ((2, 4, 6, 10), (2, 4, 8, 12))


class SessionError(ValueError):
    """A case or mode request that cannot be honoured; the message says why."""


def looks_like_cpr(token: str) -> bool:
    """True if ``token`` holds a Danish CPR number however it is written: DDMMYY then the
    four serial digits, with or without the century (DDMMYYYY), split at those places by
    any one to three separators (dash of any kind, space, dot, colon, slash...) or none,
    alone or inside a longer token (``cpr010190-1234x``); or any run of nine or more digits.
    Only real calendar days count, so ``TD-2026-000123`` is no CPR number."""
    text = unicodedata.normalize("NFKC", token)
    if _LONG_DIGIT_RUN.search(text):
        return True
    # The token as alternating pieces; a CPR candidate is a stretch of digit runs joined by
    # separators whose cumulative digit counts all fall on the allowed splits.
    pieces = [m.group() for m in _DIGITS_OR_SEPARATOR.finditer(text)]
    for start, piece in enumerate(pieces):
        if not piece.isdigit():
            continue
        for splits in _CPR_SPLITS:
            digits = ""
            for i in range(start, len(pieces), 2):
                run = pieces[i]
                if not run.isdigit():
                    break
                digits += run
                if len(digits) not in splits:
                    break
                if len(digits) == splits[-1]:
                    if _valid_day(digits):
                        return True
                    break
                if i + 1 >= len(pieces) or pieces[i + 1].isalnum():
                    break  # a letter (or the end) ends the number
    return False


def _valid_day(digits: str) -> bool:
    day, month = int(digits[:2]), int(digits[2:4])
    if not 1 <= month <= 12:
        return False
    # Without the century any year may be meant: February has 29 days then.
    year = int(digits[4:8]) if len(digits) == 12 else 2000 + int(digits[4:6])
    if len(digits) == 12 and not 1800 <= year <= 2099:
        return False
    return 1 <= day <= calendar.monthrange(year, month)[1]


def check_case_token(token: str) -> str:
    if not isinstance(token, str):
        raise SessionError("case_token must be a string")
    # The CPR check comes first, on the raw text, so a CPR number written with spaces or
    # odd dashes is named for what it is rather than as a bad character.
    if looks_like_cpr(token):
        raise SessionError("case_token looks like a national id (CPR number); send the "
                           "clinic's opaque case reference instead")
    if not _TOKEN.match(token):
        raise SessionError("case_token must be 1-128 letters, digits or . _ : - "
                           "(an opaque reference, never a name)")
    return token


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
