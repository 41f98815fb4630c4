"""Delivery over a real link: 5 MB captures through a delay-and-rate proxy (sim/netfault.py)
between the device and Mosquitto, against the raw floor of that same link.

The loopback bench (bench_uplink.py) measures where the gateway's CPU dominates; a clinic's
Wi-Fi is slower and farther. Here the device's uplink and a raw client both reach the broker
through a FaultProxy throttled to a rate and delayed one way each direction (half the RTT
each); the reference gateway process and the raw receiver sit next to the broker, as in a
clinic. Per profile, in the same run and alternating:

- raw floor: one QoS 1 PUBLISH of the capture's bytes over the link to a receiver that
  answers with a small message once it has them whole, timed until that answer is back;
- ours: the uplink delivers the same bytes (manifest, chunks, final) and holds the gateway's
  ``committed`` (verified, stored with fsync).

goodput = raw floor time / our time (medians). Goals (issue 16): >= 0.93 at 100 Mbit/s with
10 ms RTT, >= 0.95 at 20 Mbit/s 40 ms and at 5 Mbit/s 100 ms.

Then a cut at half way (the proxy resets the connection once half the capture's bytes have
reached the broker), twice per profile: the time lost against that profile's uncut median
(median of the two), which must stay under 2 RTT plus the first reconnect delay the uplink
took; and how many chunks went twice (the cut lost them: published but never at the broker
whole; that only those go again is behaviour, proven by tests/test_link.py).

    python bench/bench_link.py [--repeat 3] [--slow-repeat 2]
"""

from __future__ import annotations

import argparse
import logging
import queue
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
from bench_uplink import _ECHO, five_mb_capture
from common import emit
from paho.mqtt.enums import CallbackAPIVersion

from dermascope_wire.bundle import pack
from device_agent.config import UplinkConfig
from device_agent.uplink.client import Uplink
from device_agent.uplink.connection import HEALTHY_AFTER
from device_agent.uplink.outbox import Outbox
from sim.broker import MosquittoBroker
from sim.netfault import FaultProxy

CHUNK = 64 * 1024


@dataclass(frozen=True)
class Profile:
    name: str
    mbit_s: float
    rtt_s: float
    goal: float
    slow: bool = False

    @property
    def rate(self) -> float:
        """Bytes per second, each direction."""
        return self.mbit_s * 1e6 / 8


PROFILES = (Profile("100M-10ms", 100, 0.010, 0.93), Profile("20M-40ms", 20, 0.040, 0.95),
            Profile("5M-100ms", 5, 0.100, 0.95, slow=True))


class _Events(logging.Handler):
    """The uplink's events, to read the reconnect delay it took."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def named(self, event: str) -> list[logging.LogRecord]:
        return [r for r in self.records if getattr(r, "event", None) == event]


class RawLink:
    """The floor: one QoS 1 publish of the bytes over the link, answered on receipt. It
    subscribes again whenever it reconnects (the cuts reset its connection too)."""

    def __init__(self, broker: MosquittoBroker, proxy: FaultProxy) -> None:
        self.echo = subprocess.Popen([sys.executable, "-c", _ECHO, str(broker.port)],
                                     stdout=subprocess.PIPE, text=True)
        assert self.echo.stdout is not None
        assert self.echo.stdout.readline().strip() == "ready"
        self.answers: queue.Queue[bytes] = queue.Queue()
        self.ready = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.client.on_message = lambda c, u, m: self.answers.put(m.payload)
        self.client.on_connect = lambda c, *_: c.subscribe("bench/raw/ack", qos=1)
        self.client.on_subscribe = lambda *_: self.ready.set()
        self.client.on_disconnect = lambda *_: self.ready.clear()
        self.client.reconnect_delay_set(0.05, 0.5)
        self.client.connect(proxy.host, proxy.port)
        self.client.loop_start()

    def send(self, payload: bytes) -> float:
        if not self.ready.wait(30):
            raise RuntimeError("the raw client is not connected")
        started = time.perf_counter()
        self.client.publish("bench/raw", payload, qos=1)
        self.answers.get(timeout=120)
        return time.perf_counter() - started

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
        self.echo.terminate()
        self.echo.wait(timeout=10)


class Device:
    """The real uplink through the proxy, with an outbox of its own."""

    def __init__(self, proxy: FaultProxy, workdir: Path) -> None:
        self.outbox = Outbox(workdir / "outbox", 1 << 30)
        config = UplinkConfig(host=proxy.host, port=proxy.port, chunk_size=CHUNK,
                              insecure_dev_mode=True, heartbeat_interval=3600.0)
        self.uplink = Uplink(config, "bench-dev", self.outbox, "bench")
        self.events = _Events()
        self.logger = logging.getLogger("device_agent")
        self.logger.addHandler(self.events)
        self.logger.setLevel(logging.DEBUG)
        self.uplink.start()
        assert self.uplink.wait_online(30), "the uplink did not come online"

    def deliver(self, capture: bytes) -> float:
        capture_id = uuid.uuid4().hex
        payload = pack({"capture_id": capture_id, "device_id": "bench-dev",
                        "captured_at": "2026-11-25T12:00:00+00:00"}, capture)
        self.outbox.put(capture_id, payload)
        started = time.perf_counter()
        self.uplink.notify()
        assert self.uplink.wait_idle(timeout=300), "not delivered"
        return time.perf_counter() - started

    def healthy_connection(self) -> None:
        """Until the connection is old enough to count as healthy (connection.HEALTHY_AFTER):
        the cut measured is that of a working link, not of one that just came back."""
        deadline = time.monotonic() + 30
        while self.uplink.connection.connected_for() < HEALTHY_AFTER:
            if time.monotonic() > deadline:
                raise RuntimeError("the uplink did not stay connected")
            time.sleep(0.05)

    def close(self) -> None:
        self.logger.removeHandler(self.events)
        self.uplink.stop()


def _wait_for_gateway(log: Path) -> None:
    deadline = time.monotonic() + 30
    while not (log.exists() and "gateway.connected" in log.read_text()):
        if time.monotonic() > deadline:
            raise RuntimeError("the gateway did not connect")
        time.sleep(0.05)


def measure(profile: Profile, proxy: FaultProxy, raw: RawLink, device: Device,
            capture: bytes, repeat: int) -> dict:
    proxy.throttle(profile.rate)
    proxy.delay(to_server=profile.rtt_s / 2, to_client=profile.rtt_s / 2)
    raws, ours = [], []
    for _ in range(repeat):  # alternating, so both meet the same machine load
        raws.append(raw.send(capture))
        ours.append(device.deliver(capture))
    raw_s, ours_s = statistics.median(raws), statistics.median(ours)
    # The cut at half way: the proxy resets the link when half the capture's bytes have
    # reached the broker, twice (the median).
    cuts, first_steps, again, reconnects = [], [], [], 0
    for _ in range(2):
        device.healthy_connection()
        records = len(device.events.records)
        published = device.uplink.chunks_published
        proxy.cut(after_bytes=len(capture) // 2)
        cuts.append(device.deliver(capture))
        delays = [r.delay for r in device.events.records[records:]
                  if getattr(r, "event", None) == "uplink.reconnect_scheduled"]
        first_steps.append(delays[0] if delays else 0.0)
        reconnects += len(delays)
        again.append(device.uplink.chunks_published - published - -(-len(capture) // CHUNK))
    cut_s, first_step = statistics.median(cuts), statistics.median(first_steps)
    sent_again = statistics.median(again)
    lost = cut_s - ours_s
    budget = 2 * profile.rtt_s + first_step
    return {"raw_ms": round(raw_s * 1000, 1), "ours_ms": round(ours_s * 1000, 1),
            "goodput": round(raw_s / ours_s, 3), "goal": profile.goal,
            "goal_met": raw_s / ours_s >= profile.goal, "runs": repeat,
            "cut": {"ms": round(cut_s * 1000, 1), "lost_ms": round(lost * 1000, 1),
                    "lost_rtt": round(lost / profile.rtt_s, 2),
                    "reconnect_delay_ms": round(first_step * 1000, 1),
                    "budget_ms": round(budget * 1000, 1), "goal_met": lost < budget,
                    "chunks_sent_again": sent_again, "chunk_kb": CHUNK // 1024,
                    "runs": len(cuts), "reconnects": reconnects}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="runs per fast profile")
    parser.add_argument("--slow-repeat", type=int, default=2, help="runs at 5 Mbit/s")
    args = parser.parse_args(argv)
    capture = five_mb_capture()
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="bench-link-") as name, \
            MosquittoBroker(Path(name) / "broker") as broker, \
            FaultProxy(broker.host, broker.port) as proxy:
        workdir = Path(name)
        log = workdir / "gateway.jsonl"
        gateway = subprocess.Popen(
            [sys.executable, "-m", "clinic_gateway", "run", "--port", str(broker.port),
             "--store", str(workdir / "store"), "--log", str(log), "--insecure-dev-mode"],
            stdout=subprocess.DEVNULL)
        raw = device = None
        try:
            _wait_for_gateway(log)
            raw = RawLink(broker, proxy)
            device = Device(proxy, workdir)
            raw.send(capture)  # warm-up of both paths, on the unshaped link
            device.deliver(capture)
            for profile in PROFILES:
                repeat = args.slow_repeat if profile.slow else args.repeat
                results[profile.name] = measure(profile, proxy, raw, device, capture, repeat)
        finally:
            if device is not None:
                device.close()
            if raw is not None:
                raw.close()
            gateway.terminate()
            gateway.wait(timeout=10)
    mb = len(capture) / 1e6
    lines = [f"capture      : {mb:.1f} MB JPEG, {CHUNK // 1024} KiB chunks; raw floor = one "
             "QoS 1 publish of the same bytes over the same link, answered on receipt"]
    for name, r in results.items():
        c = r["cut"]
        lines.append(
            f"{name:<12} : raw {r['raw_ms']:.0f} ms, ours {r['ours_ms']:.0f} ms (median of "
            f"{r['runs']}): goodput {r['goodput']:.3f}x the floor (goal >= {r['goal']}: "
            f"{'met' if r['goal_met'] else 'NOT met'})")
        lines.append(
            f"{'':<12}   cut at half way: +{c['lost_ms']:.0f} ms = {c['lost_rtt']:.1f} RTT "
            f"(goal < 2 RTT + reconnect delay {c['reconnect_delay_ms']:.0f} ms = "
            f"{c['budget_ms']:.0f} ms: {'met' if c['goal_met'] else 'NOT met'}), "
            f"{c['chunks_sent_again']:g} chunk(s) sent again (median of {c['runs']})")
    met = all(r["goal_met"] and r["cut"]["goal_met"] for r in results.values())
    emit("link", lines, {"bytes": len(capture), "chunk_size": CHUNK, "profiles": results,
                         "goal_met": met})
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
