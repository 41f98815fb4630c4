"""Delivery throughput: a 5 MB capture delivered AND acknowledged through Mosquitto on
loopback with 64 KiB chunks, against one raw single-message publish of the same bytes.

Both sides are measured the same way, in the same run: from the moment the device side
starts sending until it holds the receiver's answer. The raw baseline is one 5 MB QoS 1
PUBLISH to a receiver process that answers with a small message when it has the bytes;
ours is the real uplink (manifest, chunks, final) to the reference gateway process, which
verifies, stores (fsync) and only then acknowledges; its DICOM export of each capture
follows the ack in the gateway's exporter process (clinic_gateway/exporter.py), so with
captures back to back it overlaps the next transfer, as on a busy gateway (the goal's
figure). For comparison, a second series waits for each export before the next capture (a
gateway with nothing else to do), and the CPU each side spends per message is shown.
Goal (issues 5 and 14): ours >= 0.5x the raw throughput.

The two are measured in alternating rounds (a batch of raw publishes, then a batch of
deliveries), so both see the same machine: on a shared 2-core VM the raw publish alone
drifted from 12 to 25 ms within minutes, more than the gap being measured. Each batch of
ours starts with an untimed delivery (it follows an idle gateway) and ends once its last
export is done, so no export of ours runs while the raw baseline is timed. The figure is
the ratio of the medians; each round's own ratio is printed as well, to show the spread.
The uplink's own protocol events
split a delivery into phases, so a shortfall shows where the time goes: reading the outbox
entry (no hashing: its SHA-256 is checked as the chunks go out), the chunks (they follow the
manifest at once; its answer, manifest_answer_ms, comes back meanwhile), the gateway's
verify, store and ack after the final (with what it still had to take of the chunks), and
the outbox entry's removal.

    python bench/bench_uplink.py [--rounds 4] [--repeat 4]
"""

from __future__ import annotations

import argparse
import logging
import os
import queue
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from pathlib import Path

import cv2
import paho.mqtt.client as mqtt
from common import child_pids, cpu_seconds, emit
from paho.mqtt.enums import CallbackAPIVersion

from dermascope_wire.bundle import pack
from device_agent.config import UplinkConfig
from device_agent.uplink.client import Uplink
from device_agent.uplink.outbox import Outbox
from sim.broker import MosquittoBroker
from sim.scene import SceneSpec, render

GOAL = 0.5
CHUNK = 64 * 1024

# The raw receiver: answers "got" on <topic>/ack for every message it receives whole.
_ECHO = textwrap.dedent("""
    import sys, paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion
    port = int(sys.argv[1])
    c = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    def on_connect(c, u, f, rc, p):
        c.subscribe("bench/raw", qos=1)
    def on_subscribe(c, u, mid, codes, p):
        print("ready", flush=True)
    c.on_connect = on_connect
    c.on_subscribe = on_subscribe
    c.on_message = lambda c, u, m: c.publish("bench/raw/ack", str(len(m.payload)), qos=1)
    c.connect("127.0.0.1", port)
    c.loop_forever()
""")


def five_mb_capture() -> bytes:
    """A realistic capture: a 12 MP simulated frame as JPEG (about 5 MB with metadata)."""
    image = render(SceneSpec(seed=4, width=4056, height=3040))
    ok, jpeg = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 99])
    assert ok
    return jpeg.tobytes()


def _broker_pid() -> int:
    (pid,) = [p for p, comm in child_pids(os.getpid()).items() if comm == "mosquitto"]
    return pid


def _cpu_ms(pids: list[int]) -> float:
    return sum(cpu_seconds(pid) for pid in pids) * 1000


class RawSide:
    """One raw QoS 1 publish of the capture to a receiver process that answers on receipt,
    timed in batches (``measure``) so that they interleave with ours."""

    def __init__(self, port: int) -> None:
        self.echo = subprocess.Popen([sys.executable, "-c", _ECHO, str(port)],
                                     stdout=subprocess.PIPE, text=True)
        self.answers: queue.Queue = queue.Queue()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.client.on_message = lambda c, u, m: self.answers.put(m.payload)
        assert self.echo.stdout is not None
        assert self.echo.stdout.readline().strip() == "ready"
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.client.subscribe("bench/raw/ack", qos=1)
        time.sleep(0.5)  # the subscription settles; not part of any timing
        self.sides = {"sender": [os.getpid()], "broker": [_broker_pid()],
                      "receiver": [self.echo.pid]}
        self.times: list[float] = []
        self.cpu = dict.fromkeys(self.sides, 0.0)

    def measure(self, payload: bytes, count: int, warm_up: bool = False) -> None:
        before = {side: _cpu_ms(pids) for side, pids in self.sides.items()}
        for _ in range(count):
            started = time.perf_counter()
            self.client.publish("bench/raw", payload, qos=1)
            self.answers.get(timeout=60)
            if not warm_up:
                self.times.append(time.perf_counter() - started)
        if not warm_up:
            for side, pids in self.sides.items():
                self.cpu[side] += _cpu_ms(pids) - before[side]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
        self.echo.terminate()
        self.echo.wait(timeout=10)


class _Phases(logging.Handler):
    """Times the uplink's own protocol events, to show where a delivery's time goes."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.marks: list[tuple[float, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.marks.append((time.perf_counter(), str(getattr(record, "event", record.msg))))

    def phases(self, started: float) -> dict[str, float]:
        names = [name for _, name in self.marks]
        at = {}
        for when, name in self.marks:
            at.setdefault(name, []).append(when)
        try:
            manifest = at["uplink.manifest_sent"][0]
            first_ack, final = at["uplink.ack"][0], at["uplink.final_sent"][0]
            last_ack, done = at["uplink.ack"][-1], at["capture.delivered"][0]
        except (KeyError, IndexError):
            raise RuntimeError(f"unexpected protocol events: {names}") from None
        # The chunks follow the manifest at once; its answer comes back while they go out
        # (manifest_answer_ms overlaps chunks_ms and is not part of the sum).
        return {"read_entry_ms": (manifest - started) * 1000,
                "chunks_ms": (final - manifest) * 1000,
                "gateway_verify_store_ack_ms": (last_ack - final) * 1000,
                "outbox_remove_ms": (done - last_ack) * 1000,
                "manifest_answer_ms": (first_ack - manifest) * 1000}


def _wait_exported(store: Path, capture_id: str) -> None:
    deadline = time.monotonic() + 30
    while not any(store.glob(f"*/{capture_id}.dcm")):
        if time.monotonic() > deadline:
            raise RuntimeError("the gateway's exporter did not export the capture")
        time.sleep(0.01)


class OurSide:
    """The real uplink delivering to the reference gateway process, timed in batches.
    ``spaced``: each capture waits until the previous one's export is done (a gateway with
    nothing else to do), instead of following it back to back."""

    def __init__(self, port: int, workdir: Path, spaced: bool = False) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.store = workdir / "store"
        self.spaced = spaced
        log = workdir / "gateway.jsonl"
        self.gateway = subprocess.Popen(
            [sys.executable, "-m", "clinic_gateway", "run", "--port", str(port),
             "--store", str(self.store), "--log", str(log), "--insecure-dev-mode"],
            stdout=subprocess.DEVNULL)
        self.outbox = Outbox(workdir / "outbox", 1 << 30)
        config = UplinkConfig(port=port, chunk_size=CHUNK, insecure_dev_mode=True,
                              heartbeat_interval=3600.0)
        self.uplink = Uplink(config, "bench-dev", self.outbox, "bench")
        self.tracer = _Phases()
        self.logger = logging.getLogger("device_agent")
        self.logger.addHandler(self.tracer)
        self.logger.setLevel(logging.DEBUG)
        deadline = time.monotonic() + 30
        while not (log.exists() and "gateway.connected" in log.read_text()):
            assert time.monotonic() < deadline, "gateway did not connect"
            time.sleep(0.05)
        self.uplink.start()
        self.sides = {"sender": [os.getpid()], "broker": [_broker_pid()],
                      "receiver": [self.gateway.pid]}
        self.times: list[float] = []
        self.phases: list[dict[str, float]] = []
        self.cpu: dict[str, float] = {}
        self.delivered = 0  # in the measured batches, CPU-counted
        self.previous: str | None = None

    def measure(self, capture: bytes, count: int) -> None:
        """``count`` timed deliveries, each following another whose export overlaps it
        (unless ``spaced``): the batch's first delivery, which follows an idle gateway, is
        not timed. The batch ends once its last export is done, so what is measured next
        (the raw baseline) runs on a quiet machine; the CPU of all of it is counted."""
        if "after_ack" not in self.sides:
            self._deliver(capture)  # warm-up: starts the exporter, whose CPU counts
            _wait_exported(self.store, self.previous or "")
            self.sides["after_ack"] = list(child_pids(self.gateway.pid))
            self.cpu = dict.fromkeys(self.sides, 0.0)
        before = {side: _cpu_ms(pids) for side, pids in self.sides.items()}
        self._deliver(capture)
        for _ in range(count):
            if self.spaced and self.previous is not None:
                _wait_exported(self.store, self.previous)
            took, phases = self._deliver(capture)
            self.times.append(took)
            self.phases.append(phases)
        _wait_exported(self.store, self.previous or "")
        self.delivered += count + 1
        for side, pids in self.sides.items():
            self.cpu[side] += _cpu_ms(pids) - before[side]

    def _deliver(self, capture: bytes) -> tuple[float, dict[str, float]]:
        capture_id = self.previous = uuid.uuid4().hex
        payload = pack({"capture_id": capture_id, "device_id": "bench-dev",
                        "captured_at": "2026-11-25T12:00:00+00:00"}, capture)
        self.outbox.put(capture_id, payload)
        self.tracer.marks.clear()
        started = time.perf_counter()
        self.uplink.notify()
        assert self.uplink.wait_idle(timeout=120), "not delivered"
        return time.perf_counter() - started, self.tracer.phases(started)

    def median_phases(self) -> dict[str, float]:
        return {k: statistics.median(p[k] for p in self.phases) for k in self.phases[0]}

    def close(self) -> None:
        self.logger.removeHandler(self.tracer)
        self.uplink.stop()
        self.gateway.terminate()
        self.gateway.wait(timeout=10)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4,
                        help="rounds of a raw batch then one of ours (default 4)")
    parser.add_argument("--repeat", type=int, default=4,
                        help="timed messages per batch (default 4)")
    args = parser.parse_args(argv)
    capture = five_mb_capture()
    rounds: list[float] = []
    with tempfile.TemporaryDirectory(prefix="bench-uplink-") as name, \
            MosquittoBroker(Path(name) / "broker") as broker:
        raw_side = RawSide(broker.port)
        busy = OurSide(broker.port, Path(name) / "busy")
        try:
            raw_side.measure(capture, 1, warm_up=True)
            for _ in range(args.rounds):
                raw_at, ours_at = len(raw_side.times), len(busy.times)
                raw_side.measure(capture, args.repeat)
                busy.measure(capture, args.repeat)
                rounds.append(statistics.median(raw_side.times[raw_at:])
                              / statistics.median(busy.times[ours_at:]))
        finally:
            busy.close()
        idle = OurSide(broker.port, Path(name) / "idle", spaced=True)
        try:
            idle.measure(capture, args.repeat * args.rounds)
        finally:
            idle.close()
            raw_side.close()
    raw, ours = statistics.median(raw_side.times), statistics.median(busy.times)
    spaced = statistics.median(idle.times)
    phases, spaced_phases = busy.median_phases(), idle.median_phases()
    raw_cpu = {k: v / len(raw_side.times) for k, v in raw_side.cpu.items()}
    cpu = {k: v / busy.delivered for k, v in busy.cpu.items()}
    ratio = raw / ours
    mb = len(capture) / 1e6
    lines = [
        f"capture        : {mb:.1f} MB JPEG (12 MP simulated frame), {CHUNK // 1024} KiB chunks",
        f"raw publish    : {raw * 1000:.0f} ms ({mb / raw:.0f} MB/s), one QoS 1 message, "
        "answered on receipt",
        f"uplink         : {ours * 1000:.0f} ms ({mb / ours:.0f} MB/s), delivered, verified, "
        "stored with fsync and acknowledged (DICOM export after the ack, in the exporter)",
        f"ratio          : {ratio:.2f}x raw throughput (goal >= {GOAL}x: "
        f"{'met' if ratio >= GOAL else 'NOT met'}); medians of {len(busy.times)} each, "
        f"in {len(rounds)} alternating rounds: " + ", ".join(f"{r:.2f}" for r in rounds),
        "where it goes  : " + ", ".join(f"{k[:-3].replace('_', ' ')} {v:.0f} ms"
                                         for k, v in phases.items()),
        f"chunks alone   : {raw / (phases['chunks_ms'] / 1000):.2f}x raw throughput",
        f"gateway idle   : {spaced * 1000:.0f} ms, {raw / spaced:.2f}x raw throughput, when "
        "each capture waits for the previous one's export (not the goal's figure): "
        + ", ".join(f"{k[:-3].replace('_', ' ')} {v:.0f} ms" for k, v in spaced_phases.items()),
        "CPU per message: raw " + ", ".join(f"{k} {v:.0f} ms" for k, v in raw_cpu.items())
        + "; ours " + ", ".join(f"{k.replace('_', ' ')} {v:.0f} ms" for k, v in cpu.items())
        + " (the after-ack exporter runs after the ack, off the delivery's path)",
    ]
    emit("uplink", lines, {"bytes": len(capture), "chunk_size": CHUNK,
                           "raw_ms": raw * 1000, "uplink_ms": ours * 1000,
                           "ratio": round(ratio, 3), "goal_met": ratio >= GOAL,
                           "round_ratios": [round(r, 3) for r in rounds],
                           "idle_gateway_ratio": round(raw / spaced, 3),
                           "idle_gateway_phases_ms": {k: round(v, 1)
                                                      for k, v in spaced_phases.items()},
                           "phases_ms": {k: round(v, 1) for k, v in phases.items()},
                           "cpu_ms": {"raw": {k: round(v, 1) for k, v in raw_cpu.items()},
                                      "ours": {k: round(v, 1) for k, v in cpu.items()}}})
    return 0 if ratio >= GOAL else 1


if __name__ == "__main__":
    sys.exit(main())
