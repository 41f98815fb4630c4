"""One capture's transfer as a state machine, without I/O (docs/protocol.md).

A round starts with a manifest; the gateway answers with the chunks it lacks (``incomplete``
and a bitmap), the device sends those and a final, and so on until a verdict: ``committed``
(delivered: the outbox entry may go), ``rejected`` (quarantined) or anything else (no answer
in time, ``retry``, no progress, an answer about another transfer of the capture): back off
and start a new round. So after a reconnect or a restart only the missing chunks are sent.

Chunks the gateway cannot hold yet go out right behind the manifest, before its answer
(:class:`SendChunks` ``until_answered``): on a round with no failed one before it, every
chunk this transfer never published. That saves the manifest's round trip on every fresh
transfer and on every resume after a reconnect; the answer, once in, stops that stream,
and only the chunks it lists and the stream has not sent follow. A receiver that drops such
an early chunk (it has not staged the manifest yet) lists it in its answer to the final,
and it is sent again then.

The payload's SHA-256 (the outbox's record of it, in the manifest) is checked as the
chunks go out in order, so a large capture is read and hashed once: a payload that does not
match raises :class:`CorruptPayload` before its last chunk and its final go out.

:class:`Transfer` takes the acks (or None: no ack within the timeout) and returns the next
actions; ``client.Uplink`` carries them out over the MQTT connection (``connection``), and
``tests/test_transfer.py`` drives it with no broker. Beside it, the pure decisions of the
uplink: the chunk size (:func:`choose_chunk_size`, :class:`ChunkSizeLearner`) and whether
the device may act on an ack (:func:`verify_ack`).
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from dermascope_wire import bundle, seal, signing
from dermascope_wire.protocol import (
    MAX_CHUNKS,
    Ack,
    Final,
    Manifest,
    chunk_count_for,
    encode_chunk,
    max_chunk_size,
)

#: Rounds of "final -> still incomplete" without progress before we back off.
MAX_STALLED_ROUNDS = 3


def content_type_of(payload: bytes | memoryview) -> str:
    """What an outbox entry holds, told by its magic: a sealed bundle or a plain one."""
    head = bytes(payload[:16])
    if head.startswith(seal.MAGIC):
        return seal.CONTENT_TYPE
    if head.startswith(bundle.MAGIC):
        return bundle.CONTENT_TYPE
    return "application/octet-stream"  # the gateway refuses it: quarantined, never lost


# -- what the driver is to do next --------------------------------------------------------


@dataclass(frozen=True)
class SendManifest:
    manifest: Manifest


class CorruptPayload(ValueError):
    """The payload's bytes do not hash to the SHA-256 its outbox entry recorded."""


@dataclass(frozen=True)
class SendChunks:
    """Publish these chunks (``Transfer.chunk``), keeping the window of chunks in flight."""

    indexes: tuple[int, ...]
    #: Sent before the manifest's answer: stop at once when an ack that ``Transfer.answers``
    #: is in (the ``AwaitAck`` that follows takes it).
    until_answered: bool = False


@dataclass(frozen=True)
class SendFinal:
    final: Final
    #: how many chunks were sent before it
    resent: int


@dataclass(frozen=True)
class AwaitAck:
    """Wait up to the ack timeout for an ack that ``Transfer.answers``; then ``on_ack``."""

    req: int


@dataclass(frozen=True)
class Backoff:
    """Wait ``backoff_delay(attempt)``, then ``start`` a new round."""

    attempt: int
    reason: str


@dataclass(frozen=True)
class Done:
    """The verdict: ``committed`` (remove the outbox entry) or ``rejected`` (quarantine it)."""

    state: Literal["committed", "rejected"]
    reason: str = ""


Action = SendManifest | SendChunks | SendFinal | AwaitAck | Backoff | Done


class Transfer:
    def __init__(self, capture_id: str, data: bytes | memoryview, sha256: bytes,
                 chunk_size: int, next_req: Callable[[], int] | None = None) -> None:
        """``sha256``: the payload's, as recorded when it was stored (checked as the chunks
        go out). ``next_req`` numbers the requests (the uplink's counter, shared by
        transfers)."""
        self.capture_id = capture_id
        self.data = data
        self.sha256 = sha256
        self.chunk_size = chunk_size
        self.chunk_count = chunk_count_for(len(data), chunk_size)
        self._next_req = next_req or itertools.count(1).__next__
        #: rounds that ended without a verdict (the next backoff's exponent)
        self.attempt = 0
        #: Chunks went out and no ack came back since: a connection lost now may be the
        #: broker refusing our packet size.
        self.exposed = False
        #: the request awaiting its ack, and whether it is a final (chunks went before it)
        self.req = 0
        self.after_final = False
        self._stalled = 0
        self._best = self.chunk_count + 1
        #: chunks this transfer published (any round, any connection)
        self.published: set[int] = set()
        self._round_sent: set[int] = set()  # since this round's manifest
        self._hasher = hashlib.sha256()
        self._hashed = 0  # chunks hashed, in order from the first

    @property
    def manifest(self) -> Manifest:
        return Manifest(capture_id=self.capture_id, size=len(self.data),
                        chunk_size=self.chunk_size, chunk_count=self.chunk_count,
                        sha256=self.sha256.hex(), content_type=content_type_of(self.data),
                        req=self.req)

    def chunk(self, index: int) -> bytes:
        """Chunk ``index`` as published now (it counts as sent). CorruptPayload when it
        completes the in-order pass over the payload and the bytes do not match its
        SHA-256."""
        data = self.data[index * self.chunk_size:(index + 1) * self.chunk_size]
        if index == self._hashed:
            self._hasher.update(data)
            self._hashed += 1
            if self._hashed == self.chunk_count and self._hasher.digest() != self.sha256:
                raise CorruptPayload(f"{self.capture_id}: the payload does not match its "
                                     "SHA-256")
        self.published.add(index)
        self._round_sent.add(index)
        self.exposed = True
        return encode_chunk(self.sha256, self.chunk_size, index, data)

    def start(self) -> list[Action]:
        """A new round: the manifest, the chunks that may go before its answer (every one
        never published, unless a round of this transfer failed: then the gateway is asked
        first), then the manifest's ack."""
        self.req = self._next_req()
        self.after_final = False
        self._stalled = 0
        self._best = self.chunk_count + 1
        self._round_sent = set()
        actions: list[Action] = [SendManifest(self.manifest)]
        if not self.attempt:
            early = tuple(i for i in range(self.chunk_count) if i not in self.published)
            if early:
                actions.append(SendChunks(early, until_answered=True))
        actions.append(AwaitAck(self.req))
        return actions

    def answers(self, ack: Ack) -> bool:
        """Whether ``ack`` is the one awaited: a verdict (committed/rejected) holds whenever
        it comes; the others only answer the request they name."""
        return ack.state in ("committed", "rejected") or ack.req == self.req

    def on_ack(self, ack: Ack | None) -> list[Action]:
        """The awaited ack (verified: ``verify_ack``), or None when none came in time."""
        if ack is not None and self.after_final:
            self.exposed = False  # the connection carried our chunks: their size is fine
        if ack is not None and ack.state == "incomplete":
            if ack.chunk_count != self.chunk_count:
                ack = None  # answers a different transfer of this capture: start over
            elif len(ack.missing) >= self._best and self._stalled + 1 >= MAX_STALLED_ROUNDS:
                ack = None  # the gateway makes no progress: back off
            else:
                return self._send_missing(ack.missing)
        if ack is not None and ack.state in ("committed", "rejected"):
            return [Done(ack.state, ack.reason)]
        # No answer, a transient "retry" or no progress: back off, then start again.
        why = "ack timeout" if ack is None else f"gateway: {ack.state} {ack.reason}"
        self.attempt += 1
        return [Backoff(self.attempt - 1, why)]

    def _send_missing(self, missing: tuple[int, ...]) -> list[Action]:
        if len(missing) >= self._best:
            self._stalled += 1
        self._best = min(self._best, len(missing))
        if not self.after_final:
            # The manifest's answer: what it lacked when the manifest came, less what went
            # out since (a receiver that dropped some lists them in its answer to the final).
            missing = tuple(i for i in missing if i not in self._round_sent)
        self.req = self._next_req()
        self.after_final = True
        final = Final(self.capture_id, self.sha256.hex(), self.chunk_count, self.req)
        actions: list[Action] = []
        if missing:
            self.exposed = True
            actions.append(SendChunks(missing))
        return [*actions, SendFinal(final, len(missing)), AwaitAck(self.req)]


# -- the chunk size ------------------------------------------------------------------------


def choose_chunk_size(size: int, configured: int, max_packet: int | None,
                      topic_len: int) -> int | None:
    """The chunk size for a payload of ``size`` bytes: the configured one, capped to fit
    the broker's Maximum Packet Size, and bigger when the payload would need more than
    MAX_CHUNKS chunks. None: too large for the broker's packet cap (quarantine it).
    ProtocolError (packet_too_small) when the broker's cap leaves no room for chunks."""
    chunk_size = max_chunk_size(configured, max_packet, topic_len)
    if chunk_count_for(size, chunk_size) > MAX_CHUNKS:
        chunk_size = -(-size // MAX_CHUNKS)
        if max_packet and chunk_size > max_chunk_size(10**12, max_packet, 0):
            return None
    return chunk_size


class ChunkSizeLearner:
    """Brokers without a stated packet cap (3.1.1) close the connection on a too large
    PUBLISH. Two drops in a row between sending chunks and the next ack: halve the chunk
    size (not below 1 KiB) for the next attempts. If the cause was something else, this
    only costs some efficiency.

    Over MQTT 5 only a drop the broker explains as "Packet too large" counts: a broker
    states its cap in the CONNACK (the chunks fit under it) and must say so when a packet
    is over it, so any other drop is the link, and halving would only restart the transfer
    from zero (another chunk size) for nothing."""

    def __init__(self) -> None:
        #: the learnt cap on the chunk size (None: none learnt)
        self.cap: int | None = None
        self._drops = 0

    def limit(self, configured: int) -> int:
        return min(configured, self.cap or configured)

    def carried(self) -> None:
        """An ack came back after chunks: the connection carries this size."""
        self._drops = 0

    def dropped(self, chunk_size: int, mqtt5: bool, packet_too_large: bool) -> int | None:
        """The connection ended while chunks were exposed; the new cap if it was lowered."""
        if mqtt5 and not packet_too_large:
            return None
        self._drops += 1
        if self._drops < 2 or chunk_size <= 1024:
            return None
        self._drops = 0
        self.cap = max(1024, chunk_size // 2)
        return self.cap


# -- acks -------------------------------------------------------------------------------


def verify_ack(payload: bytes, trust: signing.Trust, device_id: str, capture_id: str,
               sha256: str) -> Ack:
    """The ack in ``payload`` if the device may act on it: signed by a trusted key (or
    unsigned in development mode), for this device and capture, and for a ``committed`` or
    ``incomplete`` one, about this very transfer (its SHA-256), so a signed ack of another
    transfer replayed here means nothing. SignatureError or ProtocolError otherwise."""
    opened = trust.open(payload, "ack")
    ack = Ack.decode(opened.body)
    if ack.capture_id != capture_id:
        raise signing.SignatureError("wrong_capture", "the ack names another capture "
                                     "than its topic")
    if ack.device_id != device_id and (opened.key_id is not None or ack.device_id):
        raise signing.SignatureError("wrong_device", f"the ack is for device "
                                     f"{ack.device_id or '(none)'!r:.70}")
    if ack.state in ("committed", "incomplete") and ack.sha256 != sha256:
        raise signing.SignatureError("sha256_mismatch", f"a {ack.state} ack for another "
                                     "transfer of this capture (SHA-256 differs)")
    return ack

