"""Signed messages from the clinic to a device: the gateway's acks and the clinic's commands.

Why: TLS only proves a message came through the broker from some client holding a certificate
the broker trusts. A compromised broker, or anyone with the gateway's certificate, could
otherwise answer ``committed`` (the device deletes a capture that was never stored) or send
commands. The clinic signs with an Ed25519 key whose public half is provisioned on the device
beside the clinic sealing key (docs/protocol.md, "Signed messages").

The envelope carries the exact bytes that were signed, so nobody has to reproduce a
canonical JSON form to verify::

    {"v":1,"type":"signed","key":"<key id>","body":"<base64 of body>","sig":"<base64>"}

``sig`` is Ed25519 (RFC 8032, pure) over ``CONTEXT + body``; ``key`` is the first 8 bytes of
SHA-256 of the raw 32-byte public key, in lowercase hex. The body is itself a JSON object
whose ``type`` says what it is (``ack``, ``command``): a signature made for one kind of
message is never accepted as another.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from dermascope_wire import keyfiles
from dermascope_wire.durable import write_atomic
from dermascope_wire.keyfiles import KeyFileError
from dermascope_wire.protocol import PROTOCOL_VERSION, ProtocolError, load_json

#: Prefixed to the body before signing, so a signature over the same bytes made for any
#: other purpose with the same key never verifies here.
CONTEXT = b"dermascope/v1 signed message\n"
ENVELOPE_TYPE = "signed"
SIGNATURE_SIZE = 64
#: A command's expiry may lie at most this far in the future (the device's clock): a
#: command withheld by a broker cannot be played long after it was meant.
MAX_COMMAND_LIFETIME = 24 * 3600
#: What the reference commander gives a command.
DEFAULT_COMMAND_LIFETIME = 600
#: Sequences and expiry times stay within what every JSON parser reads exactly.
MAX_JSON_INT = 2**53
_KEY_ID = re.compile(r"^[0-9a-f]{16}$")
_DEVICE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")


class SignatureError(ValueError):
    """A message the device must not act on. ``reason`` is a stable short code: from the
    envelope ``unsigned``, ``bad_envelope``, ``unknown_key``, ``bad_signature``; from an
    ack's binding (the uplink) ``wrong_device``, ``wrong_capture``, ``sha256_mismatch``."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class SigningKeyError(KeyFileError):
    """A signing key file that is missing, not PEM, or not Ed25519."""


# ---------------------------------------------------------------------------------- keys


def key_id(public_key: Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).digest()[:8].hex()


def generate_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def public_key_pem(key: Ed25519PublicKey) -> bytes:
    return keyfiles.public_pem(key)


def private_key_pem(key: Ed25519PrivateKey) -> bytes:
    return keyfiles.private_pem(key)


def load_public_key(path: Path) -> Ed25519PublicKey:
    return keyfiles.load_public(path, Ed25519PublicKey, "the gateway signing key",
                                SigningKeyError)


def load_private_key(path: Path) -> Ed25519PrivateKey:
    return keyfiles.load_private(path, Ed25519PrivateKey, "the gateway signing key",
                                 SigningKeyError)


# ---------------------------------------------------------------------------------- envelope


def _dump(obj: Mapping[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True).encode("utf-8")


def sign(body: bytes, private_key: Ed25519PrivateKey) -> bytes:
    """The envelope carrying ``body`` (a JSON object's bytes) and its signature."""
    signature = private_key.sign(CONTEXT + body)
    return _dump({"v": PROTOCOL_VERSION, "type": ENVELOPE_TYPE,
                  "key": key_id(private_key.public_key()),
                  "body": base64.b64encode(body).decode("ascii"),
                  "sig": base64.b64encode(signature).decode("ascii")})


def sign_json(body: Mapping[str, Any], private_key: Ed25519PrivateKey) -> bytes:
    return sign(_dump(body), private_key)


def _b64(envelope: dict[str, Any], name: str) -> bytes:
    value = envelope.get(name)
    if not isinstance(value, str):
        raise SignatureError("bad_envelope", f"{name} is missing or not a string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as err:
        raise SignatureError("bad_envelope", f"{name} is not base64: {err}") from None


@dataclass(frozen=True)
class Opened:
    """A message that passed ``Trust.open``: the body's bytes and the key that signed them
    (None: an unsigned message, accepted in development mode only)."""

    body: bytes
    key_id: str | None


@dataclass(frozen=True)
class Trust:
    """The clinic signing keys a device trusts, by key id (several during a rotation), and
    whether unsigned messages pass (development mode without a key only)."""

    keys: Mapping[str, Ed25519PublicKey] = field(default_factory=dict)
    allow_unsigned: bool = False

    @classmethod
    def of(cls, keys: Iterable[Ed25519PublicKey], allow_unsigned: bool = False) -> Trust:
        return cls({key_id(k): k for k in keys}, allow_unsigned)

    @classmethod
    def from_files(cls, paths: Iterable[Path], allow_unsigned: bool = False) -> Trust:
        return cls.of((load_public_key(p) for p in paths), allow_unsigned)

    def open(self, payload: bytes, kind: str) -> Opened:
        """Check a message from the clinic; raise SignatureError (or ProtocolError for
        something that is not a JSON object at all) unless it is signed by a trusted key,
        or unsigned and unsigned messages are allowed."""
        envelope = load_json(payload, kind)
        if envelope.get("type") != ENVELOPE_TYPE:
            if self.allow_unsigned:
                return Opened(bytes(payload), None)
            raise SignatureError("unsigned", f"{kind} is not signed; this device accepts "
                                 "only messages signed by the clinic's gateway key")
        if envelope.get("v") != PROTOCOL_VERSION or type(envelope.get("v")) is not int:
            raise SignatureError("bad_envelope", f"envelope version {envelope.get('v')!r:.20}")
        extra = set(envelope) - {"v", "type", "key", "body", "sig"}
        if extra:
            raise SignatureError("bad_envelope", f"unknown field(s) {', '.join(sorted(extra))}")
        kid = envelope.get("key")
        if not isinstance(kid, str) or not _KEY_ID.fullmatch(kid):
            raise SignatureError("bad_envelope", "key is not a 16-digit lowercase hex key id")
        public_key = self.keys.get(kid)
        if public_key is None:
            raise SignatureError("unknown_key", f"{kind} is signed by key {kid}, which this "
                                 "device does not trust")
        body = _b64(envelope, "body")
        signature = _b64(envelope, "sig")
        if len(signature) != SIGNATURE_SIZE:
            raise SignatureError("bad_signature", f"signature has {len(signature)} bytes")
        try:
            public_key.verify(signature, CONTEXT + body)
        except InvalidSignature:
            raise SignatureError("bad_signature", f"{kind} signature does not verify with "
                                 f"key {kid}") from None
        return Opened(body, kid)


# ---------------------------------------------------------------------------------- commands


@dataclass(frozen=True)
class CommandAuth:
    """What a signed command body adds to the command itself."""

    device_id: str
    seq: int
    expires: int


def command_body(device_id: str, seq: int, expires: int, request: Mapping[str, Any]) -> bytes:
    """The signed body of a command: the command (``id``, ``command``, ``args``) plus who it
    is for, its sequence and its expiry."""
    return _dump({**request, "v": PROTOCOL_VERSION, "type": "command", "device_id": device_id,
                  "seq": seq, "expires": expires})


class CommandRefused(ValueError):
    """A command that failed authentication; ``code`` is the answer's error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class SequenceStore:
    """The highest command sequence this device accepted, kept durably in its state folder:
    a restart must not make an old command playable again."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def last(self) -> int:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return 0
        except OSError as err:
            raise CommandRefused("internal_error", f"{self.path}: cannot read the command "
                                 f"sequence: {err.strerror or err}") from None
        try:
            value = json.loads(data)["last_seq"]
        except (ValueError, KeyError, TypeError):
            value = None
        if type(value) is not int or value < 0:
            # Resetting it would make old commands playable again: refuse until a
            # technician looks (docs/protocol.md, "Commands").
            raise CommandRefused("internal_error", f"{self.path}: the command sequence file "
                                 "is damaged; signed commands are refused until it is fixed")
        return value

    def advance(self, seq: int) -> None:
        write_atomic(self.path, _dump({"last_seq": seq}))


@dataclass
class CommandGuard:
    """Opens a command on behalf of one device: signature, device, expiry, sequence."""

    trust: Trust
    device_id: str
    sequence: SequenceStore

    def open(self, payload: bytes, now: float | None = None) -> tuple[dict[str, Any], bool]:
        """The command's JSON object (without the signed envelope fields) and whether it
        was signed; CommandRefused for anything not to be run. The sequence is recorded
        durably before the command is handed on, so a crash cannot make it playable."""
        try:
            opened = self.trust.open(payload, "command")
        except SignatureError as err:
            raise CommandRefused("unauthenticated", str(err)) from None
        except ProtocolError as err:
            raise CommandRefused("bad_json", f"not a JSON object: {err.detail}") from None
        try:
            body = load_json(opened.body, "command")
        except ProtocolError as err:
            raise CommandRefused("bad_json", f"signed body: {err.detail}") from None
        if opened.key_id is None:
            return body, False
        auth = self._check(body, time.time() if now is None else now)
        self.sequence.advance(auth.seq)
        request = {k: v for k, v in body.items()
                   if k not in ("v", "type", "device_id", "seq", "expires")}
        return request, True

    def _check(self, body: dict[str, Any], now: float) -> CommandAuth:
        if body.get("type") != "command" or body.get("v") != PROTOCOL_VERSION:
            raise CommandRefused("unauthenticated", "the signed body is not a version 1 "
                                 "command")
        device_id, seq, expires = body.get("device_id"), body.get("seq"), body.get("expires")
        if not isinstance(device_id, str) or not _DEVICE_RE.fullmatch(device_id):
            raise CommandRefused("bad_request", "device_id is missing or malformed")
        if device_id != self.device_id:
            raise CommandRefused("wrong_device", f"the command is for {device_id}, not "
                                 f"{self.device_id}")
        if type(seq) is not int or not 0 < seq <= MAX_JSON_INT:
            raise CommandRefused("bad_request", "seq must be an integer in [1, 2**53]")
        if type(expires) is not int or not 0 < expires <= MAX_JSON_INT:
            raise CommandRefused("bad_request", "expires must be an integer in [1, 2**53] "
                                 "(UTC seconds since 1970)")
        if expires <= now:
            raise CommandRefused("expired", f"the command expired {now - expires:.0f} s ago "
                                 "(is the device clock right?)")
        if expires > now + MAX_COMMAND_LIFETIME:
            raise CommandRefused("expired", f"the command expires {expires - now:.0f} s from "
                                 f"now, more than {MAX_COMMAND_LIFETIME} s (is the device "
                                 "clock right?)")
        last = self.sequence.last()
        if seq <= last:
            raise CommandRefused("replayed", f"sequence {seq} is not above the last accepted "
                                 f"({last})")
        return CommandAuth(device_id, seq, expires)
