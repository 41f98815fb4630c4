"""The device's own costs, each as a ratio or against a goal from issue 9.

- press -> feedback latency on the simulator, in frame periods, against 1.5 + the verdict's
  own time in frame periods (measured in the same run);
- sealing + durable outbox write of a 5 MB capture / a plain write + fsync of the same bytes;
- CPU of the running agent (`device-agent run` on the simulator, with the systemd unit's
  environment) as % of one core: idle (camera asleep after `camera.sleep_after_s`), and
  streaming, with the simulator's own frame rendering measured separately and taken out;
- RSS of the running agent, and RSS growth over 1000 captures in one process.

    python bench/bench_device.py [--captures 1000]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import cpu_seconds, emit, median_seconds, rss_mb, unit_environment
from tqdm import tqdm

from dermascope_wire.seal import generate_keypair, seal
from device_agent.camera.quality import assess
from device_agent.uplink.outbox import Outbox
from sim.broker import free_port
from sim.device import SimDevice, sim_config
from sim.scene import SceneSpec, render

IDLE_CPU_GOAL = 1.0  # % of one core
RSS_GOAL_MB = 150.0
LATENCY_GOAL_FRAMES = 1.5  # plus the verdict's own time


def latency(tmp: Path, presses: int = 15) -> dict[str, float]:
    config = sim_config(tmp / "latency", free_port())
    with SimDevice(config, with_uplink=False) as device:
        device.show(None)
        frame = device.agent.ring.latest()
        verdict = median_seconds(lambda: assess(frame.image), 9)
        times = []
        for _ in range(presses):
            index = device.agent.outcome_count
            device.camera.shake()
            device.board.press()  # returns at the release: the gesture is recognised there
            released = time.monotonic()
            if not device.agent.wait_outcome(index, timeout=10):
                raise RuntimeError("a press got no outcome within 10 s")
            times.append(time.monotonic() - released)
            # A clinician's pace: a press within the double-press window of the last one
            # would be a double press (a mode change), not a capture.
            time.sleep(config.button.double_press_window + 0.1)
    period = 1.0 / config.camera.fps
    return {"latency_frames": statistics.median(times) / period,
            "verdict_frames": verdict / period, "frame_period_ms": period * 1000}


def seal_and_store(tmp: Path, size: int = 5 * 1024 * 1024, repeat: int = 9) -> dict[str, float]:
    payload = os.urandom(size)
    _, public = generate_keypair()
    outbox = Outbox(tmp / "outbox", 1 << 30)
    plain = tmp / "plain.bin"

    def write_fsync() -> None:
        with open(plain, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())

    counter = iter(range(10**6))

    def sealed_put() -> None:
        capture_id = f"bench{next(counter):06d}"
        outbox.put(capture_id, seal(payload, public, "bench", capture_id))
        outbox.remove(capture_id)

    rounds = [(median_seconds(write_fsync, 3), median_seconds(sealed_put, 3))
              for _ in range(repeat)]
    base = statistics.median(r[0] for r in rounds)
    ours = statistics.median(r[1] for r in rounds)
    return {"plain_ms": base * 1000, "seal_outbox_ms": ours * 1000, "ratio": ours / base}


def _agent_cpu(tmp: Path, name: str, sleep_after: float, settle: float, seconds: float
               ) -> tuple[float, float]:
    """(% of one core, RSS MB) of `device-agent run` on the simulator, after ``settle`` s."""
    config = tmp / f"{name}.toml"
    config.write_text(
        f'[device]\nid = "bench-1"\nstate_dir = "{tmp / name}"\n'
        f'[camera]\nbackend = "sim"\nfps = 10\nsleep_after_s = {sleep_after}\n'
        f'[pins]\npin_factory = "mock"\n'
        f'[uplink]\nport = {free_port()}\ninsecure_dev_mode = true\n'
        f'[security]\ninsecure_dev_mode = true\n')
    proc = subprocess.Popen([sys.executable, "-m", "device_agent", "run", "--config",
                             str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, **unit_environment()})
    try:
        time.sleep(settle)  # start-up (imports, first frames) and, asleep, the idle wait
        cpu0, wall0 = cpu_seconds(proc.pid), time.monotonic()
        time.sleep(seconds)
        cpu = (cpu_seconds(proc.pid) - cpu0) / (time.monotonic() - wall0)
        return cpu * 100, rss_mb(proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def running_agent(tmp: Path, seconds: float = 10.0) -> dict[str, float]:
    awake, rss = _agent_cpu(tmp, "awake", 0, 5.0, seconds)
    asleep, _ = _agent_cpu(tmp, "asleep", 2, 8.0, seconds)
    # What the simulated sensor itself costs per second: 10 frames of noise and copying,
    # work a real camera does in its own hardware.
    spec = SceneSpec(seed=1)
    render(spec, 0)
    counter = iter(range(1, 10**6))
    sim = median_seconds(lambda: render(spec, next(counter)), 30) * 10 * 100
    # The simulator's frame caches live in the agent's process too; on a Pi they do not.
    probe = ("import device_agent.agent, sim.camera\n"
             "from bench.common import rss_mb\n"
             "before = rss_mb()\n"
             "sim.camera.SimCamera(1014, 760, 10).start()\n"
             "from sim.scene import SceneSpec, render\n"
             "render(SceneSpec(seed=1), 1)\n"
             "print(rss_mb() - before)\n")
    sim_rss = float(subprocess.run([sys.executable, "-c", probe], capture_output=True,
                                   text=True, check=True, timeout=120,
                                   cwd=Path(__file__).parent.parent).stdout)
    return {"awake_cpu_percent": awake, "sim_camera_percent": sim,
            "awake_agent_cpu_percent": max(0.0, awake - sim),
            "idle_cpu_percent": asleep, "rss_mb": rss, "sim_caches_mb": sim_rss,
            "agent_rss_mb": rss - sim_rss}


def rss_growth(tmp: Path, captures: int) -> dict[str, float]:
    config = sim_config(tmp / "growth", free_port(), outbox={"quota_mb": 4096})
    with SimDevice(config, with_uplink=False) as device:
        device.show(None)
        agent = device.agent
        after = config.camera.window_after
        marks = {}
        for n in tqdm(range(1, captures + 1), desc="captures", unit="capture",
                      disable=not sys.stderr.isatty()):
            # Pressed a moment ago: the frames around it are already in the ring.
            outcome = agent.capture(time.monotonic() - after - 0.01)
            for capture_id in outcome.linked:
                agent.outbox.remove(capture_id)
            if n in (captures // 10, captures):
                marks[n] = rss_mb()
    first, last = marks[captures // 10], marks[captures]
    return {"rss_at_10pct_mb": first, "rss_at_end_mb": last, "growth_mb": last - first}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--captures", type=int, default=1000)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-device-") as name:
        tmp = Path(name)
        lat = latency(tmp)
        store = seal_and_store(tmp)
        idle = running_agent(tmp)
        growth = rss_growth(tmp, args.captures)
    latency_ok = lat["latency_frames"] <= LATENCY_GOAL_FRAMES + lat["verdict_frames"]
    idle_ok = idle["idle_cpu_percent"] <= IDLE_CPU_GOAL
    rss_ok = idle["agent_rss_mb"] <= RSS_GOAL_MB
    lines = [
        f"press -> feedback : {lat['latency_frames']:.2f} frame periods "
        f"({lat['frame_period_ms']:.0f} ms each); the verdict alone is "
        f"{lat['verdict_frames']:.2f} -> goal <= 1.5 + verdict: "
        f"{'met' if latency_ok else 'NOT met'}",
        f"seal + outbox     : {store['ratio']:.2f}x a plain write+fsync of 5 MB "
        f"({store['seal_outbox_ms']:.1f} vs {store['plain_ms']:.1f} ms)",
        f"idle agent        : {idle['idle_cpu_percent']:.2f} % of a core, camera asleep "
        f"(goal <= {IDLE_CPU_GOAL} %: {'met' if idle_ok else 'NOT met'})",
        f"streaming agent   : {idle['awake_cpu_percent']:.1f} % of a core, of which the "
        f"simulated sensor {idle['sim_camera_percent']:.1f} %: agent "
        f"{idle['awake_agent_cpu_percent']:.1f} %",
        f"RSS               : {idle['rss_mb']:.0f} MB, of which the simulator's frame "
        f"caches {idle['sim_caches_mb']:.0f} MB: agent {idle['agent_rss_mb']:.0f} MB "
        f"(goal <= {RSS_GOAL_MB:.0f} MB: {'met' if rss_ok else 'NOT met'})",
        f"RSS growth        : {growth['growth_mb']:+.1f} MB from capture {args.captures // 10} "
        f"to {args.captures}",
    ]
    emit("device", lines, {"latency": lat, "seal_outbox": store, "running_agent": idle,
                           "rss_growth": growth,
                           "goals": {"latency": latency_ok, "idle_cpu": idle_ok,
                                     "rss": rss_ok}})
    return 0 if latency_ok and idle_ok and rss_ok else 1


if __name__ == "__main__":
    sys.exit(main())
