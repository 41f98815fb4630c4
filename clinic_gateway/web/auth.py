"""Who may use the GP's page and the API: staff passwords, API tokens, sessions, CSRF.

Passwords are kept in the config only as scrypt hashes (stdlib ``hashlib.scrypt``), one
string each, made by ``clinic-gateway hash-password``::

    scrypt$<log2 N>$<r>$<p>$<salt, base64>$<hash, base64>

API tokens (the EHR's) are long random strings; the config keeps their SHA-256
(``sha256$<hex>``): a token has 256 bits of its own, so a slow hash would add nothing but
a delay on every request.

Sessions are kept here, in the web process, and the browser holds only an opaque random id
(256 bits) in an HttpOnly, SameSite=Strict cookie: signing out or an idle timeout ends the
session for good, which a signed cookie holding the session itself could not do. Each
session has its own CSRF token, which every form and every state-changing API call made
with the cookie must carry.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
import threading
import time
from dataclasses import dataclass, field

#: scrypt's cost: N = 2**15, r = 8, p = 1 (32 MiB, about a tenth of a second per check).
SCRYPT_LOG2_N = 15
SCRYPT_R = 8
SCRYPT_P = 1
_SALT_BYTES = 16
_HASH_BYTES = 32
_MAXMEM = 128 * 1024 * 1024
_HASH_RE = re.compile(r"scrypt\$(\d{1,2})\$(\d{1,2})\$(\d{1,2})\$([A-Za-z0-9+/=]{16,})"
                      r"\$([A-Za-z0-9+/=]{32,})\Z")
_TOKEN_HASH_RE = re.compile(r"sha256\$[0-9a-f]{64}\Z")
#: What a user name may be (it goes into the audit log and the log as typed).
USER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}\Z")


class HashFormatError(ValueError):
    """A password or token hash in the config that is not in the documented format."""


@dataclass(frozen=True)
class PasswordHash:
    log2_n: int
    r: int
    p: int
    salt: bytes
    digest: bytes


def parse_hash(text: str) -> PasswordHash:
    """The parts of a ``scrypt$...`` string; HashFormatError naming what is wrong."""
    m = _HASH_RE.match(text)
    if m is None:
        raise HashFormatError("not a password hash of the form scrypt$<log2 N>$<r>$<p>$<salt>"
                              "$<hash> (make one with: clinic-gateway hash-password)")
    log2_n, r, p = (int(m.group(i)) for i in (1, 2, 3))
    if not (14 <= log2_n <= 20 and 1 <= r <= 32 and 1 <= p <= 16):
        raise HashFormatError(f"scrypt cost N=2**{log2_n}, r={r}, p={p} is outside "
                              "N=2**14..2**20, r=1..32, p=1..16")
    try:
        salt = base64.b64decode(m.group(4), validate=True)
        digest = base64.b64decode(m.group(5), validate=True)
    except ValueError:
        raise HashFormatError("the salt or hash is not base64") from None
    return PasswordHash(log2_n, r, p, salt, digest)


def _scrypt(password: str, log2_n: int, r: int, p: int, salt: bytes, size: int) -> bytes:
    return hashlib.scrypt(password.encode("utf-8"), salt=salt, n=2 ** log2_n, r=r, p=p,
                          maxmem=_MAXMEM, dklen=size)


def hash_password(password: str) -> str:
    """A new ``scrypt$...`` string for ``password`` (random salt)."""
    if not password:
        raise ValueError("an empty password cannot be used")
    salt = secrets.token_bytes(_SALT_BYTES)
    digest = _scrypt(password, SCRYPT_LOG2_N, SCRYPT_R, SCRYPT_P, salt, _HASH_BYTES)
    return (f"scrypt${SCRYPT_LOG2_N}${SCRYPT_R}${SCRYPT_P}$"
            f"{base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}")


def verify_password(password: str, stored: str) -> bool:
    """True if ``password`` matches the ``scrypt$...`` string (compared in constant time)."""
    h = parse_hash(stored)
    return hmac.compare_digest(_scrypt(password, h.log2_n, h.r, h.p, h.salt, len(h.digest)),
                               h.digest)


def new_api_token() -> tuple[str, str]:
    """A fresh API token and the ``sha256$...`` string to put in the config."""
    token = secrets.token_urlsafe(32)
    return token, hash_token(token)


def hash_token(token: str) -> str:
    return "sha256$" + hashlib.sha256(token.encode("utf-8")).hexdigest()


def check_token_hash(text: str) -> str:
    if not _TOKEN_HASH_RE.match(text):
        raise HashFormatError("not an API token hash of the form sha256$<64 hex digits> (make "
                              "one with: clinic-gateway hash-password --new-api-token)")
    return text


# A password check for a user that does not exist costs as much as one for a user that does:
# the answer's time does not tell which user names exist.
_DUMMY = hash_password(secrets.token_hex(8))


class Staff:
    """The configured users (name -> hash) and API clients (name -> token hash)."""

    def __init__(self, users: dict[str, str], api_tokens: dict[str, str]) -> None:
        self.users = dict(users)
        self.api_tokens = dict(api_tokens)

    def check_password(self, user: str, password: str) -> bool:
        stored = self.users.get(user)
        if stored is None:
            verify_password(password, _DUMMY)
            return False
        return verify_password(password, stored)

    def api_client(self, token: str) -> str | None:
        """The name of the API client whose token this is, or None."""
        given = hash_token(token)
        found = None
        for name, stored in self.api_tokens.items():
            if hmac.compare_digest(given, stored):
                found = name
        return found


@dataclass
class Session:
    sid: str
    user: str | None  # None: signed out (the sign-in form's own session, for its CSRF)
    csrf: str
    expires: float
    flash: list[str] = field(default_factory=list)

    def say(self, message: str) -> None:
        """A message for the next page (the last few only)."""
        self.flash = [*self.flash[-4:], message]


class Sessions:
    """Sessions by id, in memory, each ending after ``idle`` seconds without a request."""

    #: Bounds the memory anonymous visitors can take (oldest dropped first).
    MAX_SESSIONS = 10_000
    ANONYMOUS_IDLE = 900.0

    def __init__(self, idle: float) -> None:
        self.idle = idle
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()

    def new(self, user: str | None) -> Session:
        ttl = self.idle if user is not None else self.ANONYMOUS_IDLE
        session = Session(secrets.token_urlsafe(32), user, secrets.token_urlsafe(32),
                          time.monotonic() + ttl)
        with self._lock:
            self._purge()
            while len(self._sessions) >= self.MAX_SESSIONS:
                self._sessions.pop(next(iter(self._sessions)))
            self._sessions[session.sid] = session
        return session

    def get(self, sid: str | None) -> Session | None:
        """The live session ``sid`` names (its idle time starts again), or None."""
        if not sid:
            return None
        now = time.monotonic()
        with self._lock:
            session = self._sessions.get(sid)
            if session is None:
                return None
            if session.expires <= now:
                del self._sessions[sid]
                return None
            ttl = self.idle if session.user is not None else self.ANONYMOUS_IDLE
            session.expires = now + ttl
            return session

    def end(self, sid: str | None) -> None:
        with self._lock:
            self._sessions.pop(sid or "", None)

    def _purge(self) -> None:
        now = time.monotonic()
        for sid in [s for s, v in self._sessions.items() if v.expires <= now]:
            del self._sessions[sid]


class Throttle:
    """Sign-in attempts per user name: after ``limit`` failures within ``window`` seconds
    the name is refused until the window has passed (a guessing attack gets nowhere)."""

    MAX_NAMES = 10_000

    def __init__(self, limit: int = 5, window: float = 900.0) -> None:
        self.limit = limit
        self.window = window
        self._failures: dict[str, list[float]] = {}
        self._lock = threading.Lock()

    def _recent(self, name: str, now: float) -> list[float]:
        kept = [t for t in self._failures.get(name, []) if now - t < self.window]
        if kept:
            self._failures[name] = kept
        else:
            self._failures.pop(name, None)
        return kept

    def blocked(self, name: str) -> bool:
        with self._lock:
            return len(self._recent(name, time.monotonic())) >= self.limit

    def failed(self, name: str) -> None:
        now = time.monotonic()
        with self._lock:
            if len(self._failures) >= self.MAX_NAMES:
                self._failures.pop(next(iter(self._failures)))
            self._failures.setdefault(name, []).append(now)
            self._recent(name, now)

    def succeeded(self, name: str) -> None:
        with self._lock:
            self._failures.pop(name, None)


def csrf_ok(session: Session | None, given: str | None) -> bool:
    return (session is not None and isinstance(given, str)
            and hmac.compare_digest(session.csrf.encode(), given.encode()))
