"""Hostile messages (issue 12, finding 3): the protocol's decoders and the gateway's message
handler treat every payload as hostile. Whatever arrives, only a ``ProtocolError`` leaves a
decoder, the handler answers a refusal (or drops a chunk) and goes on, and a real device
delivers its next capture through the same gateway."""

from __future__ import annotations

import hashlib
import json
import queue
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from paho.mqtt.enums import CallbackAPIVersion

from clinic_gateway.gateway import Gateway
from dermascope_wire import bundle
from dermascope_wire.protocol import (
    ACK_STATES,
    MAX_CONTROL_MESSAGE,
    MAX_JSON_DEPTH,
    Ack,
    Final,
    Manifest,
    ProtocolError,
    Topics,
    chunk_count_for,
    decode_chunk,
    encode_chunk,
    parse_up_topic,
    request_number,
)
from sim.device import SimDevice, sim_config

PREFIX = "derm/v1"
DEVICE = "dev-hostile"
HOSTILE = settings(max_examples=150, deadline=None,
                   suppress_health_check=[HealthCheck.too_slow])

# --------------------------------------------------------------------------- strategies

VALID = {
    "manifest": {"v": 1, "type": "manifest", "capture_id": "c1", "size": 10, "chunk_size": 4,
                 "chunk_count": 3, "sha256": "0" * 64, "content_type": bundle.CONTENT_TYPE,
                 "req": 1},
    "final": {"v": 1, "type": "final", "capture_id": "c1", "sha256": "0" * 64,
              "chunk_count": 3, "req": 2},
    "ack": {"v": 1, "type": "ack", "capture_id": "c1", "state": "committed", "req": 2,
            "chunk_count": 0, "reason": "", "sha256": "0" * 64},
}

# Every character, lone surrogates included (json.dumps escapes them as \ud800...).
odd_text = st.text(st.characters(exclude_categories=()), max_size=40)
odd_values = st.recursive(
    st.one_of(st.none(), st.booleans(), odd_text,
              st.integers(min_value=-(10**600), max_value=10**600),
              st.floats(allow_nan=True, allow_infinity=True)),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(odd_text, inner, max_size=3),
    max_leaves=8)


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, allow_nan=True).encode("utf-8")


def _nested(depth: int, opener: bytes) -> bytes:
    closer = b"]" if opener == b"[" else b"1}"
    return opener * depth + closer * depth if opener == b"[" else b'{"a":' * depth + closer


def hostile_json(kind: str) -> st.SearchStrategy[bytes]:
    """Payloads for a ``kind`` message: random bytes, deep nesting, a valid message with one
    field made hostile (huge number, wrong type, odd unicode, NaN), duplicate keys, numbers
    beyond any bound, oversized messages."""
    base = VALID[kind]
    one_field = st.builds(lambda key, value: _dumps({**base, key: value}),
                          st.sampled_from([*sorted(base), "extra"]), odd_values)
    return st.one_of(
        st.binary(max_size=512),
        st.builds(_nested, st.integers(MAX_JSON_DEPTH + 1, 3000), st.sampled_from([b"[", b"{"])),
        st.builds(lambda n: _dumps(base)[:-1] + b',"x":' + b"[" * n + b"]" * n + b"}",
                  st.integers(0, 2000)),
        one_field,
        st.builds(lambda key: _dumps(base)[:-1] + b"," + json.dumps(key).encode() + b":0}",
                  st.sampled_from(sorted(base))),  # a key twice
        st.builds(lambda digits: _dumps(base)[:-1] + b',"req":' + b"9" * digits + b"}",
                  st.integers(15, 6000)),
        st.builds(lambda n: _dumps({**base, "pad": "x" * n}),
                  st.integers(MAX_CONTROL_MESSAGE - 300, MAX_CONTROL_MESSAGE + 300)),
    )


hostile_chunks = st.one_of(
    st.binary(max_size=300),
    st.builds(lambda index, size, data: encode_chunk(b"\0" * 32, size, index, data),
              st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1), st.binary(max_size=64)),
    st.builds(lambda header, data: b"DRMC\x01" + header + data,
              st.binary(min_size=51, max_size=51), st.binary(max_size=64)),
)

DECODERS: dict[str, Callable[[bytes], object]] = {
    "manifest": Manifest.decode, "final": Final.decode, "ack": Ack.decode,
}


# --------------------------------------------------------------------------- the decoders


@pytest.mark.parametrize("kind", sorted(DECODERS))
def test_decoders_raise_only_protocol_errors(kind: str) -> None:
    @HOSTILE
    @given(hostile_json(kind))
    def decode(payload: bytes) -> None:
        reason = ""
        try:
            DECODERS[kind](payload)
        except ProtocolError as err:
            reason = err.reason
        assert reason in ("", "bad_message", "unsupported_version")
        assert 0 <= request_number(payload) <= 2**53

    decode()


@HOSTILE
@given(hostile_chunks)
def test_decode_chunk_raises_only_protocol_errors(payload: bytes) -> None:
    reason = ""
    try:
        decode_chunk(payload)
    except ProtocolError as err:
        reason = err.reason
    assert reason in ("", "bad_chunk", "unsupported_version")


def test_nesting_is_refused_before_the_parser_recurses() -> None:
    for payload in (b"[" * 2000, b'{"a":' * 10_000, _dumps(VALID["manifest"])[:-1]
                    + b',"x":' + b"[" * (MAX_JSON_DEPTH + 1) + b"]" * (MAX_JSON_DEPTH + 1) + b"}"):
        with pytest.raises(ProtocolError, match="nests") as err:
            Manifest.decode(payload)
        assert err.value.reason == "bad_message"
    # Brackets inside strings are text, not nesting.
    text = {**VALID["manifest"], "note": "[" * 5000}
    assert Manifest.decode(_dumps(text)).capture_id == "c1"


@pytest.mark.parametrize(("payload", "words"), [
    (b"x" * (MAX_CONTROL_MESSAGE + 1), "more than 65536"),
    (_dumps({**VALID["manifest"], "size": float("nan")}), "not a JSON number"),
    (_dumps({**VALID["manifest"], "size": float("inf")}), "not a JSON number"),
    (_dumps(VALID["manifest"])[:-1] + b',"size":' + b"1" * 30 + b"}", "30 digits"),
    (_dumps(VALID["manifest"])[:-1] + b',"req":3}', "duplicate keys"),
    (_dumps({**VALID["manifest"], "size": True}), "size must be an integer"),
    (_dumps({**VALID["manifest"], "capture_id": "c1\n"}), "capture_id"),
    (_dumps({**VALID["manifest"], "content_type": "\u202eevil\ud800"}), "content_type"),
    (b"\xed\xa0\x80", "not UTF-8"),
], ids=["size", "nan", "infinity", "digits", "duplicate", "bool", "newline", "unicode", "utf8"])
def test_each_hostile_form_is_named(payload: bytes, words: str) -> None:
    with pytest.raises(ProtocolError, match=words) as err:
        Manifest.decode(payload)
    assert err.value.reason == "bad_message"


def test_ack_fields_are_validated_not_coerced() -> None:
    for field, value in (("reason", {"nested": 1}), ("reason", "x" * 65), ("sha256", 42),
                         ("sha256", "Z" * 64)):
        with pytest.raises(ProtocolError, match=field):
            Ack.decode(_dumps({**VALID["ack"], field: value}))


# --------------------------------------------------------------------------- the handler


def _message(topic: str, payload: bytes) -> mqtt.MQTTMessage:
    message = mqtt.MQTTMessage(topic=topic.encode("utf-8", "surrogatepass"))
    message.payload = payload
    return message


class _Handler:
    """A gateway that is not connected: its message handler is called directly, its acks
    are collected instead of published."""

    def __init__(self, store: Path) -> None:
        self.gateway = Gateway("127.0.0.1", 1, store, allow_unsealed=True, export_dicom=False)
        self.acks: list[Ack] = []
        self.gateway._send_ack = lambda device_id, ack, correlation: self.acks.append(ack)

    def send(self, topic: str, payload: bytes) -> list[Ack]:
        self.acks.clear()
        # The unguarded handler: any exception other than the answers fails the test.
        self.gateway._on_message(self.gateway._client, None, _message(topic, payload))
        return list(self.acks)

    def deliver(self, capture_id: str) -> Ack:
        image = b"\xff\xd8" + bytes(range(256)) * 8
        data = bundle.pack({"capture_id": capture_id}, image)
        sha = hashlib.sha256(data).hexdigest()
        count = chunk_count_for(len(data), 512)
        topics = Topics(PREFIX, DEVICE)
        self.send(topics.up(capture_id, "manifest"),
                  Manifest(capture_id, len(data), 512, count, sha, bundle.CONTENT_TYPE).encode())
        for i in range(count):
            self.send(topics.up(capture_id, "chunk"),
                      encode_chunk(bytes.fromhex(sha), 512, i, data[i * 512:(i + 1) * 512]))
        (ack,) = self.send(topics.up(capture_id, "final"), Final(capture_id, sha, count).encode())
        return ack


def _expected(topic: str, payload: bytes) -> tuple[str, str] | None:
    """What the handler must answer: None (nothing: a chunk or a bad topic), or the state and
    reason of a refusal, or ("", "") when the payload is a valid message."""
    try:
        _, _, kind = parse_up_topic(PREFIX, topic)
    except ProtocolError:
        return None
    if kind == "chunk":
        return None
    try:
        DECODERS[kind](payload)
    except ProtocolError as err:
        return ("rejected", err.reason)
    return ("", "")


@pytest.mark.parametrize("kind", ["manifest", "final", "chunk", "topic"])
def test_handler_answers_every_hostile_message_and_goes_on(tmp_path: Path, kind: str) -> None:
    handler = _Handler(tmp_path / "store")
    topics = Topics(PREFIX, DEVICE)
    if kind == "chunk":
        cases = st.tuples(st.just(topics.up("c1", "chunk")), hostile_chunks)
    elif kind == "topic":
        levels = st.text(st.characters(exclude_categories=()), max_size=12)
        topic = st.one_of(
            st.builds(lambda d, c, k: f"{PREFIX}/{d}/up/{c}/{k}", levels, levels,
                      levels | st.sampled_from(["manifest", "final", "chunk"])),
            st.text(st.characters(exclude_categories=()), max_size=60))
        cases = st.tuples(topic, st.binary(max_size=64) | hostile_json("manifest"))
    else:
        cases = st.tuples(st.just(topics.up("c1", kind)), hostile_json(kind))

    delivered: list[str] = []

    @HOSTILE
    @given(cases)
    def hostile(case: tuple[str, bytes]) -> None:
        topic, payload = case
        acks = handler.send(topic, payload)
        expected = _expected(topic, payload)
        if expected is None:
            assert acks == []
        else:
            (ack,) = acks
            assert ack.state in ACK_STATES
            if expected[0]:
                assert (ack.state, ack.reason) == expected
        # After each hostile message, a normal capture still goes through.
        capture_id = f"after-{len(delivered)}"
        assert handler.deliver(capture_id).state == "committed"
        delivered.append(capture_id)

    hostile()
    assert handler.gateway.stored_count == len(delivered) > 0
    stored = {p.stem for p in (tmp_path / "store" / DEVICE).glob("*.jpg")}
    assert stored == set(delivered)


def test_an_unexpected_fault_in_a_callback_is_logged_and_paho_goes_on(gateway, broker, events,
                                                                      monkeypatch) -> None:
    """A bug of ours (not a bad message) in the handler: logged with its traceback, and the
    network loop keeps answering."""
    real = gateway._handle_manifest
    calls = []

    def faulty(device_id: str, capture_id: str, m: Manifest) -> Ack:
        calls.append(capture_id)
        if len(calls) == 1:
            raise RuntimeError("a fault of the gateway's own")
        return real(device_id, capture_id, m)

    monkeypatch.setattr(gateway, "_handle_manifest", faulty)
    with _Probe(broker) as probe:
        probe.publish("boom", "manifest", Manifest("boom", 10, 4, 3, "0" * 64,
                                                   bundle.CONTENT_TYPE, 5).encode())
        (failed,) = events.wait_for("gateway.callback_failed", timeout=10)
        assert failed["callback"] == "on_message"
        assert "RuntimeError: a fault of the gateway's own" in failed["traceback"]
        probe.publish("fine", "manifest", Manifest("fine", 10, 4, 3, "0" * 64,
                                                   bundle.CONTENT_TYPE, 6).encode())
        ack = probe.ack("fine")
        assert (ack.state, ack.req) == ("incomplete", 6)


# --------------------------------------------------------------------------- a real broker


class _Probe:
    """A raw MQTT client on the device's topics: publishes anything, collects acks."""

    def __init__(self, broker: Any) -> None:
        self.topics = Topics(PREFIX, DEVICE)
        self.acks: dict[str, queue.Queue[Ack]] = {}
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.client.on_message = self._on_ack
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        self.client.subscribe(self.topics.ack_filter, qos=1)
        # A round trip on our own connection proves the subscription is in place.
        self.client.publish(f"{PREFIX}/ping", b"", qos=1).wait_for_publish(5)

    def _on_ack(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        capture_id = msg.topic.rsplit("/", 1)[-1]
        self.acks.setdefault(capture_id, queue.Queue()).put(Ack.decode(msg.payload))

    def publish(self, capture_id: str, kind: str, payload: bytes, topic: str = "") -> None:
        self.acks.setdefault(capture_id, queue.Queue())
        info = self.client.publish(topic or self.topics.up(capture_id, kind), payload, qos=1)
        info.wait_for_publish(5)

    def ack(self, capture_id: str, timeout: float = 10.0) -> Ack:
        return self.acks.setdefault(capture_id, queue.Queue()).get(timeout=timeout)

    def __enter__(self) -> _Probe:
        return self

    def __exit__(self, *exc: object) -> None:
        self.client.disconnect()
        self.client.loop_stop()


REAL_BROKER_CASES: list[tuple[str, str, bytes]] = [
    ("deep", "manifest", b"[" * 2000),  # the manifest of finding 3
    ("deep-obj", "final", b'{"a":' * 5000),
    ("deep-field", "manifest", _dumps(VALID["manifest"])[:-1] + b',"x":' + b"[" * 3000
     + b"]" * 3000 + b"}"),
    ("big", "manifest", b" " * (MAX_CONTROL_MESSAGE + 10) + b"{}"),
    ("nan", "manifest", _dumps({**VALID["manifest"], "capture_id": "nan", "size": float("nan")})),
    ("huge", "final", _dumps(VALID["final"])[:-1] + b',"req":' + b"9" * 5000 + b"}"),
    ("types", "manifest", _dumps({**VALID["manifest"], "capture_id": "types",
                                  "chunk_size": [1], "size": {"a": None}})),
    ("dup", "final", _dumps({**VALID["final"], "capture_id": "dup"})[:-1] + b',"req":7}'),
    ("unicode", "manifest", _dumps({**VALID["manifest"], "capture_id": "unicode",
                                    "content_type": "\u202e\ud800\u0000"})),
    ("utf8", "final", b"\xff\xfe\xed\xa0\x80"),
]


def test_hostile_messages_through_a_real_broker_then_a_capture_is_delivered(
        tmp_path, broker, gateway, store, events) -> None:
    with _Probe(broker) as probe:
        for capture_id, kind, payload in REAL_BROKER_CASES:
            probe.publish(capture_id, kind, payload)
        # Chunks and topics the gateway cannot use get no answer: they must not stop it.
        probe.publish("c1", "chunk", b"[" * 2000)
        probe.publish("c1", "chunk", b"DRMC\x01" + b"\xff" * 60)
        probe.publish("x", "", b"[" * 2000, topic=f"{PREFIX}/{DEVICE}/up/x/other")
        probe.publish("x", "", b"[" * 2000, topic=f"{PREFIX}/bad id!/up/x/manifest")
        for capture_id, _kind, _payload in REAL_BROKER_CASES:
            ack = probe.ack(capture_id)
            assert (ack.state, ack.reason) == ("rejected", "bad_message"), capture_id
        events.wait_for("gateway.bad_topic", count=2)
    assert events.named("gateway.callback_failed") == []

    with SimDevice(sim_config(tmp_path / "device", broker.port)) as device:
        device.show(None)
        outcome = device.press()
        assert outcome is not None
        assert outcome.verdict == "accept"
        events.wait_for("capture.delivered", capture_id=outcome.capture_id, timeout=30)
    (stored,) = events.named("capture.stored")
    assert Path(stored["path"]) == store / "sim-0001" / f"{outcome.capture_id}.jpg"
    assert hashlib.sha256(Path(stored["path"]).read_bytes()).hexdigest() == stored["sha256"]
