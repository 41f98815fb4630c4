"""The device uplink end to end against a real Mosquitto and the reference gateway."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import queue
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from tqdm import tqdm

from clinic_gateway.gateway import Gateway
from dermascope_wire import bundle, seal
from dermascope_wire.protocol import Manifest, Topics, chunk_count_for, encode_chunk
from device_agent.config import UplinkConfig
from device_agent.uplink.client import Uplink, backoff_delay
from device_agent.uplink.outbox import Outbox
from sim.broker import AmqttBroker, MosquittoBroker, free_port
from sim.netfault import FaultProxy

DEVICE = "dev-1"


def uplink_config(broker: MosquittoBroker, **over: object) -> UplinkConfig:
    values: dict[str, object] = dict(host=broker.host, port=broker.port, ack_timeout=2.0,
                                     retry_min=0.1, retry_max=0.5, keepalive=5,
                                     chunk_size=16 * 1024)
    values.update(over)
    return UplinkConfig(**values)


def capture(n: int, size: int = 50_000) -> tuple[str, dict, bytes]:
    image = random.Random(n).randbytes(size)
    return f"cap-{n}", {"capture_id": f"cap-{n}", "device_id": DEVICE, "n": n}, image


def make_uplink(broker: MosquittoBroker, outbox: Outbox, **over: object) -> Uplink:
    return Uplink(uplink_config(broker, **over), DEVICE, outbox, "test-1.0")


def deliver_all(broker, outbox: Outbox, timeout: float = 30) -> None:
    """Run an uplink until the outbox is empty (and fail if it does not empty in time)."""
    up = make_uplink(broker, outbox)
    with up:
        assert up.wait_idle(timeout)


def put(outbox: Outbox, n: int, size: int = 50_000) -> tuple[str, dict, bytes]:
    capture_id, meta, image = capture(n, size)
    outbox.put(capture_id, bundle.pack(meta, image))
    return capture_id, meta, image


def assert_stored(store: Path, capture_id: str, meta: dict, image: bytes) -> None:
    assert (store / DEVICE / f"{capture_id}.jpg").read_bytes() == image
    assert json.loads((store / DEVICE / f"{capture_id}.json").read_text()) == meta


def test_capture_is_delivered_end_to_end_and_removed_only_then(
    broker, gateway, outbox, store, events
) -> None:
    items = [put(outbox, n, size=120_000) for n in range(3)]
    deliver_all(broker, outbox, timeout=30)
    for capture_id, meta, image in items:
        assert_stored(store, capture_id, meta, image)
    assert outbox.depth() == 0
    delivered = [e["capture_id"] for e in events.named("capture.delivered")]
    assert delivered == [c for c, _, _ in items]  # FIFO
    for stored in events.named("capture.stored"):
        path = Path(stored["path"])
        assert hashlib.sha256(path.read_bytes()).hexdigest() == stored["sha256"]


def test_sealed_capture_is_delivered_and_opened_at_the_gateway(
    broker, outbox, store
) -> None:
    private, public = seal.generate_keypair()
    capture_id, meta, image = capture(13, size=90_000)
    outbox.put(capture_id, seal.seal(bundle.pack(meta, image), public, DEVICE, capture_id))
    with Gateway(broker.host, broker.port, store, private_keys=[private]) as gw:
        assert gw.wait_ready(10)
        deliver_all(broker, outbox, timeout=30)
    assert_stored(store, capture_id, meta, image)


def test_entry_stays_until_gateway_acks(broker, outbox, store, events) -> None:
    capture_id, meta, image = put(outbox, 1)
    up = make_uplink(broker, outbox)
    with up:
        # The broker PUBACKs the manifest, but no gateway answers: the entry must stay.
        events.wait_for("uplink.retry", capture_id=capture_id)
        assert [e.capture_id for e in outbox.pending()] == [capture_id]
        with Gateway(broker.host, broker.port, store, allow_unsealed=True):
            assert up.wait_idle(30)
    assert_stored(store, capture_id, meta, image)
    assert outbox.depth() == 0


def test_broker_down_at_start_then_up(tmp_path, outbox, store, events) -> None:
    broker = MosquittoBroker(tmp_path / "late-broker", port=free_port())
    capture_id, meta, image = put(outbox, 2)
    up = make_uplink(broker, outbox)
    up.start()  # must not raise with the broker down
    try:
        events.wait_for("uplink.reconnect_scheduled", count=2)
        assert not up.online
        assert outbox.depth() == 1
        broker.start()
        with Gateway(broker.host, broker.port, store, allow_unsealed=True):
            assert up.wait_idle(30)
    finally:
        up.stop()
        broker.stop()
    assert_stored(store, capture_id, meta, image)


def test_broker_restart_mid_queue_loses_nothing(broker, gateway, outbox, store, events) -> None:
    items = [put(outbox, n, size=200_000) for n in range(4)]
    up = make_uplink(broker, outbox, chunk_size=4096)
    with up:
        events.wait_for("capture.delivered")
        broker.restart()
        assert up.wait_idle(40)
    for capture_id, meta, image in items:
        assert_stored(store, capture_id, meta, image)
    assert len(events.named("capture.stored")) == 4


def test_duplicate_after_lost_removal_is_stored_once(
    broker, gateway, outbox, store, events
) -> None:
    capture_id, meta, image = put(outbox, 3)
    up = make_uplink(broker, outbox)
    with up:
        assert up.wait_idle(30)
        # As if the device crashed after the ack but before remove(): the same capture again.
        put(outbox, 3)
        up.notify()
        events.wait_for("capture.delivered", count=2, capture_id=capture_id)
        assert up.wait_idle(30)
    assert len(events.named("capture.stored", capture_id=capture_id)) == 1
    assert len(events.named("gateway.duplicate", capture_id=capture_id)) == 1
    assert sorted(p.name for p in (store / DEVICE).iterdir()) == [
        f"{capture_id}.jpg", f"{capture_id}.json"]
    assert_stored(store, capture_id, meta, image)


def test_corrupt_entry_is_quarantined_and_the_next_is_delivered(
    broker, gateway, outbox, store, events
) -> None:
    bad = outbox.put("cap-bad", bundle.pack({}, b"x" * 10_000))
    raw = bytearray(bad.path.read_bytes())
    raw[-1] ^= 1
    bad.path.write_bytes(bytes(raw))
    capture_id, meta, image = put(outbox, 4)
    deliver_all(broker, outbox, timeout=30)
    assert_stored(store, capture_id, meta, image)
    assert events.named("outbox.quarantined", capture_id="cap-bad")
    assert not (store / DEVICE / "cap-bad.jpg").exists()
    assert len(outbox.quarantined()) == 1


def test_mqtt311_end_to_end(broker, outbox, store) -> None:
    capture_id, meta, image = put(outbox, 5, size=100_000)
    up = make_uplink(broker, outbox, protocol="mqtt311")
    with Gateway(broker.host, broker.port, store, protocol="mqtt311", allow_unsealed=True), up:
        assert up.wait_idle(30)
    assert_stored(store, capture_id, meta, image)


def test_falls_back_to_mqtt311_when_the_broker_refuses_mqtt5(
    tmp_path, outbox, store, events
) -> None:
    # amqtt comes with the dev extra (`make test` installs it); without it this errors.
    capture_id, meta, image = put(outbox, 10, size=80_000)
    with AmqttBroker(tmp_path / "amqtt") as broker, \
            Gateway(broker.host, broker.port, store, protocol="mqtt311", allow_unsealed=True) as gw:
        assert gw.wait_ready(10)
        up = make_uplink(broker, outbox)  # configured for MQTT 5
        with up:
            assert up.wait_idle(30)
    assert events.named("uplink.protocol_fallback")
    assert_stored(store, capture_id, meta, image)


def _refuse_mqtt5(connect: bytes) -> bytes | None:
    """A broker front that speaks only MQTT 3.1.1, like RabbitMQ's plugin: it answers an MQTT
    5 CONNECT with the 3.1.1 refusal "unacceptable protocol version" and lets 3.1.1 through
    to the real broker (a first-packet hook of sim.netfault.FaultProxy)."""
    n = 1
    while connect[n] & 0x80:  # the remaining-length varint
        n += 1
    level = connect[n + 1 + 2 + 4]
    return b"\x20\x02\x00\x01" if level == 5 else None  # CONNACK, 3.1.1 return code 1


def test_falls_back_to_mqtt311_when_the_broker_refuses_mqtt5_explicitly(
    broker, outbox, store, events
) -> None:
    capture_id, meta, image = put(outbox, 14, size=70_000)
    with FaultProxy(broker.host, broker.port, first_packet=_refuse_mqtt5) as proxy, \
            Gateway(broker.host, broker.port, store, allow_unsealed=True) as gw:
        assert gw.wait_ready(10)
        up = Uplink(uplink_config(broker, port=proxy.port), DEVICE, outbox, "test-1.0")
        with up:
            assert up.wait_idle(30)
    assert proxy.refused == 1
    assert len(events.named("uplink.protocol_fallback")) == 1
    assert events.named("uplink.connected")[-1]["protocol"] == "mqtt311"
    assert_stored(store, capture_id, meta, image)


def test_chunks_fit_the_brokers_maximum_packet_size(tmp_path, outbox, store, events) -> None:
    with MosquittoBroker(tmp_path / "small", extra_conf="max_packet_size 8192") as broker, \
            Gateway(broker.host, broker.port, store, allow_unsealed=True) as gw:
        assert gw.wait_ready(10)
        capture_id, meta, image = put(outbox, 6, size=60_000)
        up = make_uplink(broker, outbox, chunk_size=64 * 1024)
        with up:
            assert up.wait_idle(30)
    assert_stored(store, capture_id, meta, image)
    (delivered,) = events.named("capture.delivered")
    assert delivered["chunk_size"] <= 8192 - 56


def test_receive_maximum_is_respected(tmp_path, outbox, store, events) -> None:
    with MosquittoBroker(tmp_path / "rm", extra_conf="max_inflight_messages 2") as broker, \
            Gateway(broker.host, broker.port, store, allow_unsealed=True) as gw:
        assert gw.wait_ready(10)
        capture_id, meta, image = put(outbox, 7, size=100_000)
        up = make_uplink(broker, outbox, chunk_size=2048)
        with up:
            assert up.wait_idle(30)
    assert events.named("uplink.connected")[0]["receive_max"] == 2
    assert 1 <= up.peak_in_flight <= 2  # Mosquitto 2.0 would not even complain
    assert_stored(store, capture_id, meta, image)


def test_resume_sends_only_the_missing_chunks(broker, gateway, outbox, store, events) -> None:
    capture_id, meta, image = capture(8, size=40_000)
    data = bundle.pack(meta, image)
    outbox.put(capture_id, data)
    chunk_size = 4096
    count = chunk_count_for(len(data), chunk_size)
    sha = hashlib.sha256(data).digest()
    topics = Topics("derm/v1", DEVICE)
    # An earlier, interrupted attempt: manifest and the first half of the chunks got through.
    raw = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    raw.connect(broker.host, broker.port)
    raw.loop_start()
    try:
        m = Manifest(capture_id, len(data), chunk_size, count, sha.hex(), bundle.CONTENT_TYPE)
        raw.publish(topics.up(capture_id, "manifest"), m.encode(), qos=1).wait_for_publish(5)
        events.wait_for("gateway.manifest", capture_id=capture_id)
        for i in range(count // 2):
            raw.publish(topics.up(capture_id, "chunk"),
                        encode_chunk(sha, chunk_size, i, data[i * chunk_size:(i + 1) * chunk_size]),
                        qos=1).wait_for_publish(5)
    finally:
        raw.disconnect()
        raw.loop_stop()
    up = make_uplink(broker, outbox, chunk_size=chunk_size)
    with up:
        assert up.wait_idle(30)
    resumed = events.named("gateway.manifest", capture_id=capture_id)[-1]
    assert resumed["resumed"] is True
    assert resumed["missing"] == count - count // 2
    assert_stored(store, capture_id, meta, image)


def _status_watcher(broker: MosquittoBroker) -> tuple[mqtt.Client, queue.Queue]:
    got: queue.Queue = queue.Queue()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.on_message = lambda c, u, msg: got.put((msg.retain, json.loads(msg.payload)))
    client.connect(broker.host, broker.port)
    client.subscribe(Topics("derm/v1", DEVICE).status, qos=1)
    client.loop_start()
    return client, got


def _next_state(got: queue.Queue, state: str) -> dict:
    while True:
        _retain, status = got.get(timeout=20)
        if status["state"] == state:
            return status


def test_retained_status_online_heartbeat_and_offline(broker, outbox) -> None:
    put(outbox, 9)
    up = make_uplink(broker, outbox, heartbeat_interval=0.2)
    up.start()
    watcher, got = _status_watcher(broker)
    try:
        online = _next_state(got, "online")
        assert online["software_version"] == "test-1.0"
        assert online["outbox_depth"] == 1  # no gateway: still pending
        assert "disk_free_bytes" in online
        assert "oldest_pending_age_s" in online
        _next_state(got, "online")  # a heartbeat follows
        up.stop()
        assert _next_state(got, "offline")["reason"] == "stopped"
    finally:
        watcher.disconnect()
        watcher.loop_stop()


_AGENT = textwrap.dedent(
    """
    import sys, threading
    from pathlib import Path
    from device_agent.config import UplinkConfig
    from device_agent.uplink.client import Uplink
    from device_agent.uplink.outbox import Outbox
    up = Uplink(UplinkConfig(host="127.0.0.1", port=int(sys.argv[1]), keepalive=5), "dev-1",
                Outbox(Path(sys.argv[2]), 10**6), "test-1.0")
    up.start()
    threading.Event().wait()
    """
)


def test_last_will_says_offline_when_the_device_dies(broker, tmp_path) -> None:
    watcher, got = _status_watcher(broker)
    proc = subprocess.Popen([sys.executable, "-c", _AGENT, str(broker.port),
                             str(tmp_path / "ob")])
    try:
        _next_state(got, "online")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        assert _next_state(got, "offline")["reason"] == "connection lost"
    finally:
        proc.kill()
        proc.wait(timeout=10)
        watcher.disconnect()
        watcher.loop_stop()


def test_backoff_grows_is_capped_and_jittered() -> None:
    rng = random.Random(1)
    delays = [backoff_delay(n, 0.5, 8.0, rng) for n in range(10)]
    assert all(0.25 <= d <= 8.0 for d in delays)
    assert delays[-1] >= 4.0  # capped at 8 with equal jitter: in [4, 8]
    assert len({round(backoff_delay(5, 0.5, 8.0, rng), 6) for _ in range(20)}) > 1


# ------------------------------------------------------------------------------ fault injection


def assert_each_stored_once(store: Path, events, items: list[tuple[str, dict, bytes]]) -> None:
    for capture_id, meta, image in items:
        assert_stored(store, capture_id, meta, image)
        assert len(events.named("capture.stored", capture_id=capture_id)) == 1
    assert len(list((store / DEVICE).glob("*.jpg"))) == len(items)


@pytest.mark.parametrize(
    "moment", ["uplink.manifest_sent", "gateway.manifest", "uplink.final_sent"],
    ids=["after-manifest", "during-chunks", "during-final"],
)
def test_broker_killed_at_a_protocol_step_loses_and_duplicates_nothing(
    broker, gateway, outbox, store, events, moment
) -> None:
    items = [put(outbox, n, size=150_000) for n in range(3)]
    struck = threading.Event()

    def strike(record: dict) -> None:
        # Runs in the thread that logged the event, i.e. exactly at that protocol step.
        if record.get("capture_id") == "cap-1" and not struck.is_set():
            struck.set()
            broker.kill()

    events.on(moment, strike)
    up = make_uplink(broker, outbox, chunk_size=8192)
    with up:
        assert struck.wait(30)
        events.wait_for("uplink.disconnected")
        broker.start()
        assert up.wait_idle(40)
    assert_each_stored_once(store, events, items)


def _json_lines(text: str) -> list[dict]:
    out = []
    for line in text.splitlines():
        with contextlib.suppress(ValueError):
            out.append(json.loads(line))
    return out


def test_gateway_killed_mid_transfer_resumes_and_stores_once(
    broker, outbox, store, events
) -> None:
    capture_id, meta, image = put(outbox, 11, size=8_000_000)
    command = [sys.executable, "-m", "clinic_gateway", "run", "--host", broker.host,
               "--port", str(broker.port), "--store", str(store), "--insecure-dev-mode"]
    received = store / ".gateway" / "staging" / DEVICE / capture_id / "received"
    first = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    up = make_uplink(broker, outbox, chunk_size=2048)
    with up:
        # Another process: its staging file is all we can watch (bounded polling).
        deadline = time.monotonic() + 30
        while not (received.exists() and received.stat().st_size >= 4 * 500):
            assert time.monotonic() < deadline, "the gateway never staged 500 chunks"
            time.sleep(0.005)
        first.kill()  # SIGKILL mid-transfer: no goodbye, staging left as it is
        first.communicate(timeout=10)
        # Its log to a file: what it said is read whether or not it stops in time.
        second_log = store.parent / "second-gateway.jsonl"
        with second_log.open("w") as log_file:
            second = subprocess.Popen(command, stdout=log_file, text=True)
            try:
                assert up.wait_idle(60)
            finally:
                second.terminate()
                try:
                    second.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    # Seen once in a full run on 2 cores: its stop outlasting 30 s after this
                    # kill-and-restart (issue 14's note). What it stored is the point here.
                    second.kill()
                    second.wait(timeout=10)
        first.kill()
    out = second_log.read_text()
    logged = _json_lines(out)
    # The restarted gateway resumed from the staged chunks (whether the device learnt what
    # was missing from a manifest or from a final), it never started over.
    assert all(e["resumed"] for e in logged if e.get("event") == "gateway.manifest")
    (sent,) = events.named("uplink.manifest_sent", capture_id=capture_id)[-1:]
    assert events.named("uplink.final_sent", capture_id=capture_id)[-1]["resent"] < sent["chunks"]
    assert [e["capture_id"] for e in logged if e.get("event") == "capture.stored"] == [capture_id]
    assert_stored(store, capture_id, meta, image)


_DEVICE = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from device_agent.config import UplinkConfig
    from device_agent.uplink.client import Uplink
    from device_agent.uplink.outbox import Outbox
    config = UplinkConfig(host="127.0.0.1", port=int(sys.argv[1]), chunk_size=2048,
                          ack_timeout=2.0, retry_min=0.1, retry_max=0.5, keepalive=5)
    outbox = Outbox(Path(sys.argv[2]), 10**9)
    up = Uplink(config, "dev-1", outbox, "test-1.0")
    up.start()
    ok = up.wait_idle(60)
    up.stop()
    sys.exit(0 if ok else 1)
    """
)


@pytest.mark.parametrize("staged_before_kill", [0, 200, 900])
def test_device_killed_mid_transfer_delivers_once_after_restart(
    broker, gateway, tmp_path, store, events, staged_before_kill
) -> None:
    box_dir = tmp_path / "device-outbox"
    items = [put(Outbox(box_dir, 10**9), n, size=4_000_000) for n in (20, 21)]
    first_id = items[0][0]
    staged = threading.Event()
    if staged_before_kill == 0:
        events.on("gateway.manifest", lambda r: staged.set())
    received = store / ".gateway" / "staging" / DEVICE / first_id / "received"
    device = subprocess.Popen([sys.executable, "-c", _DEVICE, str(broker.port), str(box_dir)])
    try:
        deadline = time.monotonic() + 30
        first_stored = store / DEVICE / f"{first_id}.jpg"
        # (If a slow poll misses the moment, the kill hits the second capture instead.)
        while not (staged.is_set() or first_stored.exists()
                   or (staged_before_kill and received.exists()
                       and received.stat().st_size >= 4 * staged_before_kill)):
            assert time.monotonic() < deadline, "the transfer never got that far"
            time.sleep(0.002)  # watching another process's progress: bounded polling
        device.kill()  # kill -9 of the device mid-transfer
        device.wait(timeout=10)
        restarted = subprocess.run([sys.executable, "-c", _DEVICE, str(broker.port),
                                    str(box_dir)], timeout=90, check=False)
        assert restarted.returncode == 0
    finally:
        device.kill()
        device.wait(timeout=10)
    assert Outbox(box_dir, 10**9).depth() == 0
    assert_each_stored_once(store, events, items)


def test_stop_waits_until_delivered_entries_are_freed(
    broker, gateway, outbox, store, events, monkeypatch
) -> None:
    """Delivered entries' files are freed on a daemon thread; a device that stops and exits
    right after a delivery (as the agent does on SIGTERM) must not leave one behind, or it
    would be sent again at the next start (seen in a full run: the kill-and-restart test
    below found an entry left by its restarted device)."""
    from device_agent.uplink import outbox as outbox_module

    real_unlink = outbox_module._unlink

    def slow_unlink(path: Path, capture_id: str) -> None:
        time.sleep(0.5)  # a large file's blocks freed on a slow SD card
        real_unlink(path, capture_id)

    monkeypatch.setattr(outbox_module, "_unlink", slow_unlink)
    items = [put(outbox, 30, size=20_000)]
    up = Uplink(uplink_config(broker), DEVICE, outbox, "test-1.0")
    up.start()
    try:
        assert up.wait_idle(30)
    finally:
        up.stop()
    assert list(outbox.root.glob("*.entry")) == []  # gone when stop returns
    assert_each_stored_once(store, events, items)


def test_mqtt311_broker_with_an_unstated_packet_cap_gets_smaller_chunks(
    tmp_path, outbox, store, events
) -> None:
    # Over 3.1.1 there is no CONNACK Maximum Packet Size: Mosquitto just drops the client on
    # a too large PUBLISH. The uplink must learn a chunk size that fits.
    with MosquittoBroker(tmp_path / "cap311", extra_conf="max_packet_size 10000") as broker, \
            Gateway(broker.host, broker.port, store, protocol="mqtt311", allow_unsealed=True) as gw:
        assert gw.wait_ready(10)
        capture_id, meta, image = put(outbox, 12, size=100_000)
        up = make_uplink(broker, outbox, protocol="mqtt311", chunk_size=64 * 1024)
        with up:
            assert up.wait_idle(60)
    assert events.named("uplink.chunk_size_reduced")
    (delivered,) = events.named("capture.delivered")
    assert delivered["chunk_size"] <= 8192
    assert_stored(store, capture_id, meta, image)


# ------------------------------------------------------------------------------ soak

_SOAK_DEVICE = textwrap.dedent(
    """
    import hashlib, random, sys
    from pathlib import Path
    from device_agent.config import UplinkConfig
    from dermascope_wire import bundle
    from device_agent.uplink.client import Uplink
    from device_agent.uplink.outbox import Outbox
    port, box, run, mode = int(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4]
    config = UplinkConfig(host="127.0.0.1", port=port, chunk_size=4096, ack_timeout=1.0,
                          retry_min=0.05, retry_max=0.3, keepalive=5)
    outbox = Outbox(box, 10**9)
    up = Uplink(config, "soak-dev", outbox, "soak")
    up.start()
    if mode == "drain":
        ok = up.wait_idle(120)
        up.stop()
        sys.exit(0 if ok else 1)
    rng = random.Random(run)
    i = 0
    while True:
        capture_id = f"{run}-{i}"
        image = rng.randbytes(rng.randint(2_000, 120_000))
        outbox.put(capture_id, bundle.pack({"capture_id": capture_id}, image))
        # "Accepted" is reported only once the outbox holds it durably, as the agent does.
        print(f"ACCEPTED {capture_id} {hashlib.sha256(image).hexdigest()}", flush=True)
        up.notify()
        i += 1
        if i % 3 == 0:
            up.wait_idle(0.2)  # capture cadence: let transfers overlap with new captures
    """
)


def _soak_trial(command: list[str], accepted: dict[str, str], lifetime: float,
                strike: Callable[[], None] | None) -> None:
    # stderr: the device's own warnings (disconnects) are expected noise here.
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True)

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            word, capture_id, sha = line.split()
            if word == "ACCEPTED":
                accepted[capture_id] = sha

    reader = threading.Thread(target=read, name="soak-reader", daemon=True)
    reader.start()
    try:
        # Random fault timing is the point of a soak; nothing waits on these sleeps.
        time.sleep(lifetime / 2)
        if strike is not None:
            strike()
        time.sleep(lifetime / 2)
    finally:
        proc.kill()  # kill -9 at a random instant
        proc.wait(timeout=10)
        reader.join(timeout=10)


def test_soak_kill9_and_broker_restarts(broker, store, tmp_path, events) -> None:
    """Devices killed with SIGKILL at random instants, the broker killed and restarted at
    random moments: every capture reported accepted is stored exactly once and intact.
    The counts come from the gateway's stored files and the device's own "accepted" lines.
    Short by default; SOAK_TRIALS=500 SOAK_RESTARTS=50 for the long run."""
    trials = int(os.environ.get("SOAK_TRIALS", "20"))
    restarts = min(trials, int(os.environ.get("SOAK_RESTARTS", "4")))
    rng = random.Random(int(os.environ.get("SOAK_SEED", "1")))
    box = tmp_path / "soak-outbox"
    accepted: dict[str, str] = {}
    restart_in = set(rng.sample(range(trials), restarts))

    def restart_broker() -> None:
        broker.kill()
        broker.start()

    with Gateway(broker.host, broker.port, store, allow_unsealed=True) as gw:
        assert gw.wait_ready(10)
        # A bar on a terminal: `make soak` runs for many minutes.
        for trial in tqdm(range(trials), desc="soak trials", unit="trial",
                          disable=not sys.stderr.isatty()):
            command = [sys.executable, "-c", _SOAK_DEVICE, str(broker.port), str(box),
                       f"t{trial}", "run"]
            _soak_trial(command, accepted, rng.uniform(0.4, 2.0),
                        restart_broker if trial in restart_in else None)
        drain = subprocess.run([sys.executable, "-c", _SOAK_DEVICE, str(broker.port), str(box),
                                "drain", "drain"], timeout=180, check=False)
    stored = {p.stem: hashlib.sha256(p.read_bytes()).hexdigest()
              for p in (store / "soak-dev").glob("*.jpg")}
    times_stored: dict[str, int] = {}
    for e in events.named("capture.stored"):
        times_stored[e["capture_id"]] = times_stored.get(e["capture_id"], 0) + 1
    figures = {
        "trials": trials,
        "broker_restarts": restarts,
        "captures_accepted": len(accepted),
        "stored": len(stored),
        "lost": len(set(accepted) - set(stored)),
        "duplicated": sum(1 for n in times_stored.values() if n > 1),
        "corrupt": sum(1 for c, sha in accepted.items() if c in stored and stored[c] != sha),
        # Written to the outbox but killed before it said so: delivered, never promised.
        "stored_unreported": len(set(stored) - set(accepted)),
    }
    print(f"\nsoak: {trials} kill -9 trials, {restarts} broker restarts: "
          f"{figures['captures_accepted']} accepted, {figures['stored']} stored, "
          f"{figures['lost']} lost, {figures['duplicated']} duplicated, "
          f"{figures['corrupt']} corrupt")
    print(json.dumps({"soak": figures}))
    assert drain.returncode == 0
    assert figures["captures_accepted"] > 0
    assert (figures["lost"], figures["duplicated"], figures["corrupt"]) == (0, 0, 0)
    assert figures["stored_unreported"] <= trials


def test_uplink_can_be_started_again_after_stop(broker, gateway, outbox, store) -> None:
    up = make_uplink(broker, outbox)
    up.start()
    up.stop()
    capture_id, meta, image = put(outbox, 15)
    with up:
        assert up.wait_idle(30)
    assert_stored(store, capture_id, meta, image)
