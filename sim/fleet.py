"""Many simulated devices against one broker and several gateway workers (issue 9).

Each device is the real uplink code (Outbox + Uplink, one MQTT connection each) with its
outbox filled with real capture bundles; the gateway workers are separate processes
(``clinic-gateway run``) sharing one store through an MQTT 5 shared subscription, so a
worker can be killed with SIGKILL mid-transfer the way a crashed server dies. The figures
come from the workers' ``capture.stored`` events and the stored files, not from the
devices' own bookkeeping.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2

from dermascope_wire.bundle import pack
from device_agent import __version__
from device_agent.config import UplinkConfig
from device_agent.uplink.client import Uplink
from device_agent.uplink.outbox import Outbox
from sim.broker import MosquittoBroker
from sim.scene import SceneSpec, render


@dataclass(frozen=True)
class FleetResult:
    devices: int
    captures_per_device: int
    workers: int
    killed_worker: bool
    accepted: int
    stored: int
    lost: int
    duplicated: int
    seconds: float

    @property
    def captures_per_second(self) -> float:
        return self.stored / self.seconds if self.seconds else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "captures_per_second": round(self.captures_per_second, 2)}


def _sample_image() -> bytes:
    ok, jpeg = cv2.imencode(".jpg", render(SceneSpec(seed=11)), [cv2.IMWRITE_JPEG_QUALITY, 90])
    assert ok
    return jpeg.tobytes()


def _worker(port: int, store: Path, log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "clinic_gateway", "run", "--host", "127.0.0.1", "--port", str(port),
         "--store", str(store), "--log", str(log), "--insecure-dev-mode"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _events(log: Path, name: str) -> list[dict]:
    if not log.exists():
        return []
    lines = log.read_text(encoding="utf-8").splitlines()
    return [e for e in map(json.loads, lines) if e.get("event") == name]


def _wait_connected(logs: list[Path], timeout: float) -> None:
    """Until every worker has logged its connection (polling its log: the workers are
    other processes, and their log is what they tell us)."""
    deadline = time.monotonic() + timeout
    while not all(_events(log, "gateway.connected") for log in logs):
        if time.monotonic() > deadline:
            raise TimeoutError(f"gateway workers did not connect within {timeout} s")
        time.sleep(0.05)


def _stored_events(logs: list[Path]) -> Counter:
    """Stores per capture id: a ``recovered`` event (logged again at a restart, in case the
    kill cut the first off) counts only for a capture that has no other."""
    counts: Counter = Counter()
    recovered: set[str] = set()
    for log in logs:
        for event in _events(log, "capture.stored"):
            if event.get("recovered"):
                recovered.add(event["capture_id"])
            else:
                counts[event["capture_id"]] += 1
    counts.update(recovered - set(counts))
    return counts


def _kill_when_stored(proc: subprocess.Popen, logs: list[Path], after: int,
                      killed: threading.Event, done: threading.Event) -> None:
    """SIGKILL ``proc`` as soon as ``after`` captures are stored. Its own thread, polling
    every 10 ms: a loop that also waits on the devices checks too seldom, and a small fleet
    can finish before it looks."""
    while not done.wait(0.01):
        if sum(_stored_events(logs).values()) >= after:
            os.kill(proc.pid, signal.SIGKILL)
            killed.set()
            return


def fleet_devices(workdir: Path, port: int, count: int, captures: int, image: bytes,
                  prefix: str = "fleet", retry_max: float = 5.0
                  ) -> tuple[list[Uplink], set[str]]:
    """``count`` simulated devices on a loopback broker (the real uplink code), each outbox
    filled with ``captures`` unsealed captures of ``image``; and the capture ids."""
    config = UplinkConfig(host="127.0.0.1", port=port, ack_timeout=20.0, retry_min=0.2,
                          retry_max=retry_max, heartbeat_interval=60.0, insecure_dev_mode=True)
    uplinks: list[Uplink] = []
    accepted: set[str] = set()
    for d in range(count):
        device_id = f"{prefix}-{d:04d}"
        outbox = Outbox(workdir / "devices" / device_id, 1 << 30)
        for _ in range(captures):
            capture_id = uuid.uuid4().hex
            outbox.put(capture_id, pack({"capture_id": capture_id, "device_id": device_id,
                                         "schema": "dermascope.capture/1"}, image))
            accepted.add(capture_id)
        uplinks.append(Uplink(config, device_id, outbox, __version__))
    return uplinks, accepted


def run_fleet(workdir: Path, devices: int = 100, captures: int = 10, workers: int = 2,
              kill_worker_after: int | None = None, timeout: float = 600.0) -> FleetResult:
    """Deliver ``devices`` x ``captures`` captures; if ``kill_worker_after`` is set, SIGKILL
    the first worker once that many captures are stored."""
    workdir.mkdir(parents=True, exist_ok=True)
    image = _sample_image()
    store = workdir / "store"
    logs = [workdir / f"worker-{k}.jsonl" for k in range(workers)]
    with MosquittoBroker(workdir / "broker", extra_conf="max_connections -1\n") as broker:
        procs = [_worker(broker.port, store, log) for log in logs]
        _wait_connected(logs, timeout=30.0)
        uplinks, accepted = fleet_devices(workdir, broker.port, devices, captures, image)
        killed = threading.Event()
        done = threading.Event()
        killer = threading.Thread(
            target=_kill_when_stored, name="fleet-killer",
            args=(procs[0], logs, kill_worker_after, killed, done), daemon=True)
        started = time.monotonic()
        try:
            if kill_worker_after is not None:
                killer.start()
            for uplink in uplinks:
                uplink.start()
            deadline = started + timeout
            remaining = list(uplinks)
            while remaining and time.monotonic() < deadline:
                remaining = [u for u in remaining if not u.wait_idle(timeout=0.2)]
            seconds = time.monotonic() - started
        finally:
            done.set()
            if killer.is_alive():
                killer.join(timeout=5.0)
            stoppers = [threading.Thread(target=u.stop, args=(5.0,)) for u in uplinks]
            for t in stoppers:
                t.start()
            for t in stoppers:
                t.join()
            for proc in procs:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
                    proc.wait(timeout=10)
    events = _stored_events(logs)
    on_disk = {p.stem for p in store.glob("fleet-*/*.jpg")}
    return FleetResult(
        devices=devices, captures_per_device=captures, workers=workers,
        killed_worker=killed.is_set(),
        accepted=len(accepted), stored=len(on_disk & accepted),
        lost=len(accepted - on_disk),
        duplicated=sum(n - 1 for n in events.values() if n > 1),
        seconds=round(seconds, 2))
