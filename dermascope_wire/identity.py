"""Who and what may be named: device ids and case tokens, checked the same way by the
device, the clinic's CA and the gateway.

A device id becomes a certificate CN, the broker's user name, a topic level and a folder
name, so it may hold nothing that MQTT, a file system or a log reads otherwise. A case token
is the clinic's opaque reference to a referral: never a name and never a Danish CPR number,
however it is written.
"""

from __future__ import annotations

import calendar
import re
import unicodedata

#: A device id (``\Z``, not ``$``: ``$`` also matches before a trailing newline).
DEVICE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}\Z")
#: Names the broker ACL or the clinic's services use (compared case-insensitively, so no
#: look-alike such as "Gateway" is ever issued to a device); ``gateway-<n>`` too.
RESERVED_IDS = frozenset({"gateway", "gateways", "admin", "broker", "clinic", "commander",
                          "monitor", "root", "mosquitto"})


class IdentityError(ValueError):
    """A device id or case token that must not be used; the message says why."""


def check_device_id(device_id: object) -> str:
    """``device_id`` if it may name a device (certificate CN, broker user, topic level);
    IdentityError naming the problem otherwise."""
    if not isinstance(device_id, str) or not DEVICE_ID.match(device_id):
        raise IdentityError(f"device id {device_id!r}: use 1-64 letters, digits, '-' or '_', "
                            "starting with a letter or digit (no '/', '+', '#', '$', "
                            "whitespace or newline)")
    if device_id.lower() in RESERVED_IDS or device_id.lower().startswith("gateway-"):
        raise IdentityError(f"device id {device_id!r} is reserved (not one of "
                            f"{', '.join(sorted(RESERVED_IDS))}, nor gateway-<n>: the "
                            "clinic's gateway workers)")
    return device_id


_TOKEN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}\Z")
# Runs of digits and what separates them (after NFKC, so full-width digits are digits).
_DIGITS_OR_SEPARATOR = re.compile(r"[0-9]+|[^0-9A-Za-z]{1,3}|[A-Za-z]+")
#: A run of this many digits anywhere is national-id-like, whatever it is meant to be.
_LONG_DIGIT_RUN = re.compile(r"[0-9]{9,}")
#: Where a CPR number written with separators may be split: DD|MM|YY|SSSS, or with the
#: century, DD|MM|YYYY|SSSS (positions counted in digits).
_CPR_SPLITS = ((2, 4, 6, 10), (2, 4, 8, 12))


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
        raise IdentityError("case_token must be a string")
    # The CPR check comes first, on the raw text, so a CPR number written with spaces or
    # odd dashes is named for what it is rather than as a bad character.
    if looks_like_cpr(token):
        raise IdentityError("case_token looks like a national id (CPR number); send the "
                            "clinic's opaque case reference instead")
    if not _TOKEN.match(token):
        raise IdentityError("case_token must be 1-128 letters, digits or . _ : - "
                            "(an opaque reference, never a name)")
    return token
