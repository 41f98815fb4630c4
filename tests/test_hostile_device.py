"""Every message the device handles is hostile until proven otherwise (issue 12): random
bytes, deep nesting, huge numbers, wrong types and odd unicode on its ack and command topics
never stop a thread, always get the protocol's answer, and a normal capture still goes
through afterwards."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from paho.mqtt.enums import CallbackAPIVersion

from dermascope_wire.protocol import Topics
from device_agent.commands import execute
from sim.broker import free_port
from sim.device import SimDevice, sim_config

DEVICE = "sim-0001"
TOPICS = Topics("derm/v1", DEVICE)

# JSON values of every kind, nested a little, with the numbers and strings that break parsers.
_scalars = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True)
            | st.text() | st.integers(min_value=10**30, max_value=10**300))
_json = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=4)
                     | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
_command_names = st.sampled_from(["open_case", "close_case", "set_illumination",
                                  "set_settings", "self_test", "status", "resend_pending",
                                  "format_disk", ""])


def _nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


#: Payloads that broke, or would break, a naive handler.
HOSTILE: list[bytes] = [
    b"[" * 2000,
    _nested(5000),
    b'{"a":' * 3000 + b"1" + b"}" * 3000,
    b"\xff\xfe\x00garbage",
    b"",
    b"null",
    b'{"v": 1, "type": "ack", "capture_id": "x", "state": "committed", "req": 1e400}',
    b'{"v": 1, "type": "ack", "state": "incomplete", "chunk_count": 99999999999999999999}',
    json.dumps({"v": 1, "type": "ack", "capture_id": "\u202e\ud7ff" * 50,
                "state": "rejected"}).encode(),
    json.dumps({"id": 7, "command": "status"}).encode(),
    json.dumps({"id": "x", "command": "set_settings",
                "args": {"quality": {"focus": "NaN"}}}).encode(),
    json.dumps({"id": "x", "command": "set_settings",
                "args": {"quality": {"focus": 1e999}}}).encode(),
    json.dumps({"id": "x", "command": "open_case", "args": {"case_token": ["a"]}}).encode(),
    b" " * 20000,
]


@pytest.fixture
def quiet_device(tmp_path) -> Iterator[SimDevice]:
    with SimDevice(sim_config(tmp_path / "device", free_port()), with_uplink=False) as device:
        device.show(None)
        yield device


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(payload=st.binary(max_size=2048) | st.builds(
    lambda name, args, request_id: json.dumps(
        {"id": request_id, "command": name, "args": args}).encode(),
    _command_names, _json, st.one_of(st.text(max_size=10), st.integers(), st.none())))
def test_every_command_payload_gets_an_answer_and_never_raises(quiet_device, payload):
    answer = execute(payload, quiet_device.agent)
    assert isinstance(answer["ok"], bool)
    if not answer["ok"]:
        assert answer["error"]["code"] in {"too_large", "bad_json", "bad_request",
                                           "unknown_command", "invalid_args"}
    json.dumps(answer, allow_nan=False)  # the answer itself can always be sent


def test_a_nan_threshold_is_refused_not_applied(quiet_device):
    before = quiet_device.agent.thresholds
    for payload in HOSTILE[-4:-1]:
        answer = execute(payload, quiet_device.agent)
        assert answer["ok"] is False
        # Refused by the JSON reader (a number beyond float) or by validation (NaN, a list).
        assert answer["error"]["code"] in {"bad_json", "invalid_args"}
    assert quiet_device.agent.thresholds == before
    assert quiet_device.press().verdict == "accept"


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from(["ack", "cmd", "other"]),
       capture=st.text(st.characters(exclude_categories=("Cs",)), max_size=20),
       payload=st.binary(max_size=1024) | st.sampled_from(HOSTILE))
def test_the_uplinks_message_handler_never_raises(quiet_device, outbox, kind, capture, payload):
    from device_agent.config import UplinkConfig
    from device_agent.uplink.client import Uplink

    uplink = Uplink(UplinkConfig(insecure_dev_mode=True), DEVICE, outbox, "test")
    answers: list[dict[str, Any]] = []
    uplink.on_command = lambda body, reply: reply(execute(body, quiet_device.agent))
    topic = {"ack": TOPICS.ack(capture), "cmd": TOPICS.command,
             "other": f"derm/v1/{capture}"}[kind]
    message = mqtt.MQTTMessage(topic=topic.encode())
    message.payload = payload

    class Client:
        def publish(self, topic, payload, qos=0, properties=None):
            answers.append(json.loads(payload))

    uplink.connection._on_message(Client(), None, message)  # unguarded: it must hold by itself
    if kind == "cmd":
        assert len(answers) == 1
        assert isinstance(answers[0]["ok"], bool)


class Hostile:
    """A client on the test's (ACL-free) broker that publishes to a device's topics."""

    def __init__(self, port: int) -> None:
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="hostile",
                                  protocol=mqtt.MQTTv5)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def publish(self, topic: str, payload: bytes) -> None:
        self.client.publish(topic, payload, qos=1).wait_for_publish(timeout=5)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def test_hostile_acks_and_commands_over_mqtt_never_stop_delivery(tmp_path, broker, gateway,
                                                                store, events):
    config = sim_config(tmp_path / "device", broker.port, uplink={"ack_timeout": 3.0})
    hostile = Hostile(broker.port)
    with SimDevice(config) as device:
        device.wait_online()
        device.show(None)
        first = device.press()
        assert first.verdict == "accept"
        try:
            for payload in HOSTILE:
                hostile.publish(TOPICS.ack(first.capture_id), payload)
                hostile.publish(TOPICS.command, payload)
        finally:
            hostile.close()
        # Every hostile command was answered (busy or not), none killed a thread.
        assert device.agent.healthy()
        assert device.uplink.wait_idle(timeout=60)
        device.show(None, seed=2)
        second = device.press()
        assert second.verdict == "accept"
        assert device.uplink.wait_idle(timeout=30)
        assert device.agent.healthy()
    assert {p.stem for p in (store / DEVICE).glob("*.jpg")} == {first.capture_id,
                                                               second.capture_id}
    assert not events.named("thread.crashed")
    assert not events.named("uplink.callback_failed")
    assert len(events.named("capture.delivered")) == 2


def test_a_command_flood_is_answered_busy_not_queued_without_bound(quiet_device):
    answers: list[dict[str, Any]] = []
    done = threading.Event()
    agent = quiet_device.agent
    # The agent's thread is kept busy with one slow command while the flood arrives.
    gate = threading.Event()
    real_status = agent.status

    def slow_status(args=None):
        gate.wait(10)
        return real_status(args)

    agent.status = slow_status  # type: ignore[method-assign]
    payload = json.dumps({"id": "s", "command": "status"}).encode()

    def reply(answer: dict[str, Any]) -> None:
        answers.append(answer)
        if len(answers) == 40:
            done.set()

    for _ in range(40):
        agent.submit_command(payload, reply)
    busy = [a for a in answers if not a["ok"]]
    assert busy, "a flood must be refused, not queued"
    assert all(a["error"]["code"] == "busy" for a in busy)
    gate.set()
    assert done.wait(20)
    assert sum(a["ok"] for a in answers) <= 17  # the one running and those that fit
