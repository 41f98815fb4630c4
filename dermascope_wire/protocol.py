"""The transfer protocol between a device and the clinic gateway (docs/protocol.md).

Part of the wire package, shared by the device (``device_agent/uplink/client.py``) and the
clinic's gateway (``clinic_gateway/gateway.py``) so the two cannot drift. Everything a
receiver needs is inside the payloads (JSON control messages, binary chunks with their own
header and CRC), never in MQTT 5 properties, so MQTT 3.1.1 carries exactly the same protocol.

Topic tree (``<p>`` = topic prefix, default ``derm/v1``)::

    <p>/<device>/up/<capture>/manifest   device -> gateway  JSON
    <p>/<device>/up/<capture>/chunk      device -> gateway  binary
    <p>/<device>/up/<capture>/final      device -> gateway  JSON
    <p>/<device>/ack/<capture>           gateway -> device  JSON
    <p>/<device>/status                  device, retained   JSON (Last Will: offline)
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import struct
import zlib
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from dermascope_wire.identity import DEVICE_ID

PROTOCOL_VERSION = 1
#: A transfer has at most this many chunks, so the missing-chunk bitmap (8 KiB) always fits
#: in one small message, whatever the broker's packet cap.
MAX_CHUNKS = 65536
#: Bytes of the binary chunk header.
CHUNK_HEADER_SIZE = 56
#: Room kept for the fixed header, topic, packet id and MQTT 5 properties of a chunk PUBLISH.
PUBLISH_OVERHEAD = 512
#: Bytes a JSON control message (manifest, final, ack) may have: real ones are a few hundred.
MAX_CONTROL_MESSAGE = 64 * 1024
#: Nesting a JSON control message may have. Version 1 messages are flat (depth 1); the room
#: above that is for compatible additions. Deeper input is refused before it is parsed, so
#: no parser recursion depends on what a peer sends.
MAX_JSON_DEPTH = 8
#: Digits an integer in a control message may have (2**53 has 16).
MAX_INT_DIGITS = 20

_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}\Z")
_HEX64 = re.compile(r"^[0-9a-f]{64}\Z")
_HEX64_OR_EMPTY = re.compile(r"^(?:[0-9a-f]{64})?\Z")
# A MIME type's characters (RFC 6838 names, plus parameters): printable ASCII, bounded.
_CONTENT_TYPE = re.compile(r"^[\x21-\x7e]{1,127}\Z")
# Reason codes are short identifiers; unknown ones are allowed (docs/protocol.md, section 9).
_REASON = re.compile(r"^[A-Za-z0-9_.:-]{0,64}\Z")
# JSON strings (with their escapes) and the brackets outside them, for the depth scan. The
# string token is possessive and also ends at the end of input, so it never backtracks: the
# scan stays linear whatever the payload (a plain pattern is quadratic on '"\\"\\"...').
_JSON_STRING_OR_BRACKET = re.compile(rb'"(?:[^"\\]|\\.)*+(?:"|\\?\Z)|[\[\]{}]', re.DOTALL)
_CHUNK = struct.Struct(">4sB3xIIII32s")
CHUNK_MAGIC = b"DRMC"
assert _CHUNK.size == CHUNK_HEADER_SIZE

AckState = Literal["incomplete", "committed", "rejected", "retry"]
ACK_STATES = ("incomplete", "committed", "rejected", "retry")
UP_KINDS = ("manifest", "chunk", "final")


class ProtocolError(ValueError):
    """A message that does not follow the protocol. ``reason`` is a stable short code."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


# ---------------------------------------------------------------------------------- topics


@dataclass(frozen=True)
class Topics:
    """The topics of one device."""

    prefix: str
    device_id: str

    def up(self, capture_id: str, kind: str) -> str:
        return f"{self.prefix}/{self.device_id}/up/{capture_id}/{kind}"

    def ack(self, capture_id: str) -> str:
        return f"{self.prefix}/{self.device_id}/ack/{capture_id}"

    @property
    def ack_filter(self) -> str:
        return f"{self.prefix}/{self.device_id}/ack/+"

    @property
    def status(self) -> str:
        return f"{self.prefix}/{self.device_id}/status"

    @property
    def command(self) -> str:
        """The gateway's commands to this device (docs/protocol.md, "Commands")."""
        return f"{self.prefix}/{self.device_id}/cmd"

    @property
    def response(self) -> str:
        """Where answers go when the command named no (acceptable) response topic."""
        return f"{self.prefix}/{self.device_id}/resp"


def up_filter(prefix: str) -> str:
    """What a gateway subscribes to (all devices' uploads)."""
    return f"{prefix}/+/up/+/+"


def parse_up_topic(prefix: str, topic: str) -> tuple[str, str, str]:
    """``<p>/<device>/up/<capture>/<kind>`` -> (device_id, capture_id, kind)."""
    head = prefix + "/"
    if not topic.startswith(head):
        raise ProtocolError("bad_topic", f"{topic!r} is not under {prefix!r}")
    parts = topic[len(head):].split("/")
    if len(parts) != 4 or parts[1] != "up" or parts[3] not in UP_KINDS:
        raise ProtocolError("bad_topic", f"{topic!r} is not <device>/up/<capture>/<kind>")
    device_id, _, capture_id, kind = parts
    if not DEVICE_ID.fullmatch(device_id) or not _ID_RE.fullmatch(capture_id):
        raise ProtocolError("bad_topic", f"bad device or capture id in {topic!r}")
    return device_id, capture_id, kind


def parse_ack_topic(prefix: str, device_id: str, topic: str) -> str:
    head = f"{prefix}/{device_id}/ack/"
    capture_id = topic[len(head):] if topic.startswith(head) else ""
    if not _ID_RE.fullmatch(capture_id):
        raise ProtocolError("bad_topic", f"{topic!r} is not an ack topic of {device_id!r}")
    return capture_id


def max_chunk_size(configured: int, max_packet: int | None, topic_len: int) -> int:
    """The chunk size to use: the configured one, capped so a chunk PUBLISH fits the broker's
    Maximum Packet Size (CONNACK property; None when the broker states none)."""
    size = configured
    if max_packet:
        size = min(size, max_packet - CHUNK_HEADER_SIZE - PUBLISH_OVERHEAD - topic_len)
    if size < 256:
        raise ProtocolError("packet_too_small",
                            f"broker maximum packet size {max_packet} leaves no room for chunks")
    return size


# ---------------------------------------------------------------------------------- JSON


def _dump(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True).encode("utf-8")


def _depth(payload: bytes) -> int:
    """The deepest nesting of arrays and objects, brackets inside strings not counted."""
    depth = deepest = 0
    for match in _JSON_STRING_OR_BRACKET.finditer(payload):
        token = match.group()
        if token in (b"[", b"{"):
            depth += 1
            deepest = max(deepest, depth)
        elif token in (b"]", b"}"):
            depth -= 1
    return deepest


def _no_constant(name: str) -> Any:
    raise ProtocolError("bad_message", f"{name} is not a JSON number")


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise ProtocolError("bad_message", f"an integer of {len(text)} digits")
    return int(text)


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # Parsers disagree on which of two equal keys wins; a message that says both is refused.
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise ProtocolError("bad_message", "duplicate keys in a JSON object")
    return obj


def load_json(payload: bytes, kind: str) -> dict[str, Any]:
    """Parse a control message as a JSON object, treating it as hostile: bounded size and
    nesting, strict UTF-8, no NaN or Infinity, no huge integers, no duplicate keys. Every
    failure is a ``ProtocolError`` ("bad_message")."""
    if len(payload) > MAX_CONTROL_MESSAGE:
        raise ProtocolError("bad_message", f"{kind} has {len(payload)} bytes, more than "
                            f"{MAX_CONTROL_MESSAGE}")
    depth = _depth(bytes(payload))
    if depth > MAX_JSON_DEPTH:
        raise ProtocolError("bad_message", f"{kind} nests {depth} deep, more than "
                            f"{MAX_JSON_DEPTH}")
    try:
        obj = json.loads(bytes(payload).decode("utf-8"), parse_constant=_no_constant,
                         parse_int=_bounded_int, object_pairs_hook=_unique_keys)
    except ProtocolError:
        raise  # raised by a hook above, already named
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        # RecursionError cannot come after the depth check; caught all the same, as the
        # parser's own limit depends on the interpreter.
        raise ProtocolError("bad_message", f"{kind} is not UTF-8 JSON: {err}") from None
    if not isinstance(obj, dict):
        raise ProtocolError("bad_message", f"{kind} is not a JSON object")
    return obj


def _load(payload: bytes, kind: str) -> dict[str, Any]:
    obj = load_json(payload, kind)
    version = obj.get("v")
    if type(version) is not int or version != PROTOCOL_VERSION:
        raise ProtocolError("unsupported_version",
                            f"{kind} has protocol version {version!r:.40}, expected "
                            f"{PROTOCOL_VERSION}")
    if obj.get("type") != kind:
        raise ProtocolError("bad_message", f"expected type {kind!r}, got "
                            f"{obj.get('type')!r:.40}")
    return obj


def request_number(payload: bytes) -> int:
    """Best effort: the ``req`` of a control message that was refused, so the refusal can
    echo it; 0 when it cannot be read."""
    try:
        req = load_json(payload, "message").get("req", 0)
    except ProtocolError:
        return 0
    return req if type(req) is int and 0 <= req <= 2**53 else 0


def _int(obj: dict[str, Any], key: str, lo: int, hi: int) -> int:
    value = obj.get(key)
    if type(value) is not int or not lo <= value <= hi:
        raise ProtocolError("bad_message", f"{key} must be an integer in [{lo}, {hi}] "
                            f"(got {value!r:.40})")
    return value


def _str(obj: dict[str, Any], key: str, pattern: re.Pattern[str] | None = None) -> str:
    value = obj.get(key)
    if not isinstance(value, str) or (pattern is not None and not pattern.fullmatch(value)):
        raise ProtocolError("bad_message", f"{key} is missing or malformed (got {value!r:.40})")
    return value


@dataclass(frozen=True)
class Manifest:
    """Announces a transfer. ``sha256`` is the lowercase hex digest of the whole payload."""

    capture_id: str
    size: int
    chunk_size: int
    chunk_count: int
    sha256: str
    content_type: str
    req: int = 0

    def encode(self) -> bytes:
        return _dump({"v": PROTOCOL_VERSION, "type": "manifest", **asdict(self)})

    @classmethod
    def decode(cls, payload: bytes) -> Manifest:
        obj = _load(payload, "manifest")
        size = _int(obj, "size", 0, 2**53)
        chunk_size = _int(obj, "chunk_size", 1, 2**31)
        chunk_count = _int(obj, "chunk_count", 1, MAX_CHUNKS)
        if chunk_count != chunk_count_for(size, chunk_size):
            raise ProtocolError("bad_message", f"chunk_count {chunk_count} does not match "
                                f"size {size} / chunk_size {chunk_size}")
        return cls(
            capture_id=_str(obj, "capture_id", _ID_RE),
            size=size,
            chunk_size=chunk_size,
            chunk_count=chunk_count,
            sha256=_str(obj, "sha256", _HEX64),
            content_type=_str(obj, "content_type", _CONTENT_TYPE),
            req=_int(obj, "req", 0, 2**53),
        )


def chunk_count_for(size: int, chunk_size: int) -> int:
    """An empty payload is still one (empty) chunk, so every transfer has a chunk 0."""
    return max(1, -(-size // chunk_size))


@dataclass(frozen=True)
class Final:
    """The device has sent every chunk it believes the gateway lacks; asks for a verdict."""

    capture_id: str
    sha256: str
    chunk_count: int
    req: int = 0

    def encode(self) -> bytes:
        return _dump({"v": PROTOCOL_VERSION, "type": "final", **asdict(self)})

    @classmethod
    def decode(cls, payload: bytes) -> Final:
        obj = _load(payload, "final")
        return cls(
            capture_id=_str(obj, "capture_id", _ID_RE),
            sha256=_str(obj, "sha256", _HEX64),
            chunk_count=_int(obj, "chunk_count", 1, MAX_CHUNKS),
            req=_int(obj, "req", 0, 2**53),
        )


@dataclass(frozen=True)
class Ack:
    """The gateway's answer to a manifest or final.

    - ``incomplete``: it holds some chunks; ``missing`` lists the ones to (re)send.
    - ``committed``: the capture is verified and stored (also for any later duplicate).
    - ``rejected``: permanently refused; ``reason`` says why. Retrying will not help.
    - ``retry``: a transient problem at the gateway (e.g. its disk); try again later.

    ``sha256`` is the transfer's digest the ack answers (``committed``: the stored one).
    ``device_id`` names the device it is for: a signed ack (``signing``) binds both.
    """

    capture_id: str
    state: AckState
    req: int = 0
    missing: tuple[int, ...] = field(default=())
    chunk_count: int = 0
    reason: str = ""
    sha256: str = ""
    device_id: str = ""

    def encode(self) -> bytes:
        obj: dict[str, Any] = {
            "v": PROTOCOL_VERSION, "type": "ack", "capture_id": self.capture_id,
            "state": self.state, "req": self.req, "reason": self.reason, "sha256": self.sha256,
            "chunk_count": self.chunk_count,
        }
        if self.device_id:
            obj["device_id"] = self.device_id
        if self.state == "incomplete":
            bitmap = encode_bitmap(self.missing, self.chunk_count)
            obj["missing"] = base64.b64encode(bitmap).decode()
            obj["missing_count"] = len(self.missing)
        return _dump(obj)

    @classmethod
    def decode(cls, payload: bytes) -> Ack:
        obj = _load(payload, "ack")
        state = obj.get("state")
        if state not in ACK_STATES:
            raise ProtocolError("bad_message", f"unknown ack state {state!r:.40}")
        chunk_count = _int(obj, "chunk_count", 0, MAX_CHUNKS)
        missing: tuple[int, ...] = ()
        if state == "incomplete":
            try:
                bitmap = base64.b64decode(_str(obj, "missing"), validate=True)
            except binascii.Error as err:
                raise ProtocolError("bad_message", f"missing is not base64: {err}") from None
            missing = decode_bitmap(bitmap, chunk_count)
        return cls(
            capture_id=_str(obj, "capture_id", _ID_RE),
            state=state,
            req=_int(obj, "req", 0, 2**53),
            missing=missing,
            chunk_count=chunk_count,
            reason=_str(obj, "reason", _REASON) if "reason" in obj else "",
            sha256=_str(obj, "sha256", _HEX64_OR_EMPTY) if "sha256" in obj else "",
            device_id=_str(obj, "device_id", DEVICE_ID) if "device_id" in obj else "",
        )


def encode_bitmap(indices: Iterable[int], count: int) -> bytes:
    """Bit i (byte i // 8, bit i % 8, least significant first) set = chunk i missing."""
    bitmap = bytearray((count + 7) // 8)
    for i in indices:
        if not 0 <= i < count:
            raise ValueError(f"chunk index {i} out of range [0, {count})")
        bitmap[i >> 3] |= 1 << (i & 7)
    return bytes(bitmap)


def decode_bitmap(bitmap: bytes, count: int) -> tuple[int, ...]:
    if len(bitmap) != (count + 7) // 8:
        raise ProtocolError("bad_message", f"bitmap of {len(bitmap)} bytes for {count} chunks")
    return tuple(i for i in range(count) if bitmap[i >> 3] & (1 << (i & 7)))


# ---------------------------------------------------------------------------------- chunks


@dataclass(frozen=True)
class Chunk:
    sha256: bytes  # digest of the whole payload: binds the chunk to its manifest
    chunk_size: int  # the transfer's nominal chunk size: chunks of another transfer mismatch
    index: int
    data: bytes


def encode_chunk(sha256: bytes, chunk_size: int, index: int, data: bytes) -> bytes:
    header = _CHUNK.pack(CHUNK_MAGIC, PROTOCOL_VERSION, chunk_size, index, len(data),
                         zlib.crc32(data), sha256)
    return header + data


def decode_chunk(payload: bytes) -> Chunk:
    if len(payload) < CHUNK_HEADER_SIZE:
        raise ProtocolError("bad_chunk", "shorter than the chunk header")
    magic, version, chunk_size, index, length, crc, sha256 = _CHUNK.unpack_from(payload)
    if magic != CHUNK_MAGIC:
        raise ProtocolError("bad_chunk", "bad magic")
    if version != PROTOCOL_VERSION:
        raise ProtocolError("unsupported_version", f"chunk version {version}")
    data = bytes(payload[CHUNK_HEADER_SIZE:])
    if len(data) != length:
        raise ProtocolError("bad_chunk", f"length {len(data)} != header's {length}")
    if zlib.crc32(data) != crc:
        raise ProtocolError("bad_chunk", f"CRC mismatch in chunk {index}")
    return Chunk(sha256, chunk_size, index, data)


def chunk_slice(payload: bytes, chunk_size: int, index: int) -> bytes:
    return payload[index * chunk_size:(index + 1) * chunk_size]


# ---------------------------------------------------------------------------------- status


def status_payload(state: Literal["online", "offline"], device_id: str, **health: Any) -> bytes:
    """The retained status message (also the Last Will, with state "offline")."""
    return _dump({"v": PROTOCOL_VERSION, "type": "status", "state": state,
                  "device_id": device_id, **health})
