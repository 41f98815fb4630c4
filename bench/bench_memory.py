"""The device's memory and start-up, against goals from issue 16.

- importing ``device_agent.agent``: seconds and RSS, as ratios to bare Python importing
  numpy and OpenCV (which the agent cannot do without), measured in the same run, and which
  heavy modules (colour-science, scipy, pydicom, the simulator) it loads: none is the goal;
- ``device-agent run`` on the simulator: seconds from exec to the agent started and to the
  first frame (the LED turns from "starting" to "ready"), and RSS then;
- a simulated 4056x3040 sensor: the agent running its zero-shutter-lag ring and judging a
  press in each of several scenes, in a process of its own; its peak RSS (goal <= 200 MB)
  and its verdicts against the reference path (the old ring: choice scored on the full
  frames), computed here on the very same frames. Three times: the sensor's 2x2-binned
  mode (2028x1520) kept in YUV420, the design for a Pi Zero 2 W and the goal; and all
  12 MP, in YUV420 and in RGB888, whose profiles show why they do not fit.

The agent's process draws no scene: the frames are drawn here first, saved, and replayed by
a camera that reads one file a frame (the simulator's drawing caches would otherwise be
counted as the agent's memory).

    python bench/bench_memory.py
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
from common import emit, unit_environment

from device_agent.camera.base import Camera, CameraError, Frame

ROOT = Path(__file__).resolve().parent.parent
SENSOR = (4056, 3040)
RSS_GOAL_MB = 200.0
HEAVY = ("colour", "scipy", "pydicom", "sim", "clinic_gateway", "matplotlib")
# The scenes a press is judged in, and the frames of each clip: 0.1 s apart, the hand
# shaking from frame SHAKE_FROM on (the press), as the simulated board makes it.
SCENES = (None, "defocus", "motion", "underexposed", "overexposed", "glare", "colour_cast",
          "off_centre")
CLIP = 8
SHAKE_FROM = 4
PRESS = 0.35  # s into the clip: the window (0.3 s before, 0.1 after) holds frames 1..4
FPS = 10.0
DRAW = (1014, 760)  # the scene is drawn this size and scaled up, as sim.render_width does


# -- imports --------------------------------------------------------------------------------
_PROBE = """
import sys, time, json
started = time.perf_counter()
{imports}
seconds = time.perf_counter() - started
rss = next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmRSS:'))
heavy = sorted({{m.split('.')[0] for m in sys.modules}} & {heavy!r})
print(json.dumps({{"seconds": seconds, "rss_mb": rss / 1024, "heavy": heavy}}))
"""


def _probe(imports: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _PROBE.format(imports=imports,
                                                               heavy=set(HEAVY))],
                         capture_output=True, text=True, timeout=120, check=True, cwd=ROOT)
    return json.loads(out.stdout)


def imports(repeat: int = 5) -> dict:
    runs: dict[str, list[dict]] = {"bare": [], "baseline": [], "agent": []}
    for _ in range(repeat):  # interleaved, so a busy moment of the machine hits all three
        runs["bare"].append(_probe("pass"))
        runs["baseline"].append(_probe("import numpy, cv2"))
        runs["agent"].append(_probe("import device_agent.agent"))

    def med(name: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[name])

    bare = med("bare", "rss_mb")
    return {
        "agent_import_s": med("agent", "seconds"),
        "baseline_import_s": med("baseline", "seconds"),
        "import_time_ratio": med("agent", "seconds") / med("baseline", "seconds"),
        "agent_rss_mb": med("agent", "rss_mb"),
        "baseline_rss_mb": med("baseline", "rss_mb"),
        "bare_python_rss_mb": bare,
        "import_rss_ratio": (med("agent", "rss_mb") - bare) / (med("baseline", "rss_mb") - bare),
        "heavy_modules_loaded": runs["agent"][0]["heavy"],
    }


# -- start to ready -------------------------------------------------------------------------
def _events(stream, into: queue.Queue) -> None:
    for line in stream:
        try:
            into.put((time.monotonic(), json.loads(line)))
        except ValueError:
            continue  # not an event line


def start_to_ready(tmp: Path, repeat: int = 3) -> dict:
    from sim.broker import free_port

    results = []
    for n in range(repeat):
        config = tmp / f"start{n}.toml"
        config.write_text(
            f'[device]\nid = "bench-start"\nstate_dir = "{tmp / f"start{n}"}"\n'
            f'[camera]\nbackend = "sim"\nfps = {FPS}\n[pins]\npin_factory = "mock"\n'
            f'[uplink]\nport = {free_port()}\ninsecure_dev_mode = true\n'
            f'[security]\ninsecure_dev_mode = true\n')
        launched = time.monotonic()
        proc = subprocess.Popen([sys.executable, "-m", "device_agent", "run", "--config",
                                 str(config)], stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, text=True, cwd=ROOT,
                                env={**os.environ, **unit_environment()})
        seen: queue.Queue = queue.Queue()
        threading.Thread(target=_events, args=(proc.stdout, seen), daemon=True).start()
        marks: dict[str, float] = {}
        try:
            deadline = time.monotonic() + 60
            while "camera.streaming" not in marks and time.monotonic() < deadline:
                try:
                    at, event = seen.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                marks.setdefault(event.get("event", ""), at - launched)
            if "camera.streaming" not in marks:
                raise RuntimeError("device-agent run did not stream within 60 s")
            status = Path(f"/proc/{proc.pid}/status").read_text()
            rss = next(int(line.split()[1]) for line in status.splitlines()
                       if line.startswith("VmRSS:")) / 1024
        finally:
            proc.terminate()
            proc.wait(timeout=30)
        results.append({"started_s": marks["agent.started"],
                        "ready_s": marks["camera.streaming"], "rss_mb": rss})
    baseline = statistics.median(
        _timed([sys.executable, "-c", "import numpy, cv2"]) for _ in range(repeat))
    ready = statistics.median(r["ready_s"] for r in results)
    return {"started_s": statistics.median(r["started_s"] for r in results),
            "ready_s": ready, "ready_rss_mb": statistics.median(r["rss_mb"] for r in results),
            "baseline_python_numpy_cv2_s": baseline, "ready_ratio": ready / baseline}


def _timed(command: list[str]) -> float:
    started = time.monotonic()
    subprocess.run(command, check=True, timeout=120, cwd=ROOT, capture_output=True)
    return time.monotonic() - started


# -- the 12 MP sensor -----------------------------------------------------------------------
def draw_clips(folder: Path) -> None:
    """Each scene's clip, drawn at DRAW size, one .npy a frame."""
    from sim.scene import SceneSpec, render

    for index, defect in enumerate(SCENES):
        spec = SceneSpec(seed=11, width=DRAW[0], height=DRAW[1], defect=defect)
        for i in range(CLIP):
            shake = 12.0 if i >= SHAKE_FROM else 0.0
            np.save(folder / f"{index}-{i}.npy", render(spec, index * CLIP + i + 1, shake))


def _frames(folder: Path, scene: int, size: tuple[int, int], lores_width: int):
    """The clip as the camera delivers it: main at ``size``, lores gray; timestamps i/FPS."""
    for i in range(CLIP):
        drawn = np.load(folder / f"{scene}-{i}.npy")
        yield Frame(image=_scale(drawn, size), timestamp=i / FPS, sequence=i + 1,
                    lores=_lores(drawn, size, lores_width))


def _scale(drawn: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    return cv2.resize(drawn, size, interpolation=cv2.INTER_LINEAR)


def _lores(drawn: np.ndarray, size: tuple[int, int], lores_width: int) -> np.ndarray:
    from device_agent.camera.ring import lores_size

    lores = lores_size(size[0], size[1], lores_width)
    small = drawn if drawn.shape[1::-1] == lores else cv2.resize(
        _scale(drawn, size), lores, interpolation=cv2.INTER_AREA)
    return cv2.cvtColor(small, cv2.COLOR_BGR2GRAY)


def reference_verdicts(folder: Path, size: tuple[int, int]) -> list[list[str]]:
    """The old ring's verdicts: choice scored on the full frames."""
    from device_agent.camera.quality import assess
    from device_agent.camera.select import choose_frame

    verdicts = []
    for scene in range(len(SCENES)):
        frames = [replace(f, lores=None) for f in _frames(folder, scene, size, DRAW[0])]
        choice = choose_frame(frames, PRESS, 0.3, 0.1)
        verdicts.append(assess(choice[0].image).reasons if choice else ["no_frame"])
    return verdicts


_AGENT = """
import json, sys, threading, time
from pathlib import Path
import numpy as np
from gpiozero.pins.mock import MockFactory, MockPWMPin
sys.path.insert(0, {bench!r})
from bench_memory import ReplayCamera, CLIP, FPS, PRESS, SCENES
from device_agent.agent import Agent
from device_agent.config import parse_config
from device_agent.uplink.outbox import Outbox

def rss(key):
    return next(int(l.split()[1]) for l in open('/proc/self/status')
                if l.startswith(key + ':')) / 1024

width, height, lores_width, budget, main_format = {width}, {height}, {lores}, {budget}, {fmt!r}
config = parse_config({{
    "device": {{"id": "bench-12mp", "state_dir": {state!r}}},
    "camera": {{"backend": "picamera2", "width": width, "height": height, "fps": FPS,
                "lores_width": lores_width, "ring_seconds": 0.4, "memory_budget_mb": budget,
                "main_format": main_format}},
    "pins": {{"pin_factory": "mock"}}, "outbox": {{"quota_mb": 4096}},
    "uplink": {{"insecure_dev_mode": True}}, "security": {{"insecure_dev_mode": True}}}})
imported = rss("VmRSS")
camera = ReplayCamera(Path({clips!r}), (width, height), lores_width, FPS, main_format)
agent = Agent(config, camera, Outbox(config.outbox_dir, 4 << 30),
              pin_factory=MockFactory(pin_class=MockPWMPin))
agent.start()
verdicts, streaming = [], 0.0
for scene in range(len(SCENES)):
    base = camera.play(scene)
    # The press is judged once frame 4 is in: the ring still holds frames 1..4 then.
    if not agent.ring.wait_until(base + 4 / FPS, timeout=30):
        raise SystemExit("the replay camera stalled")
    streaming = max(streaming, rss("VmRSS"))
    outcome = agent.capture(base + PRESS)
    verdicts.append(list(outcome.reasons) if outcome.verdict != "failed" else ["no_frame"])
    if outcome.verdict == "accept":
        for capture_id in outcome.linked:
            agent.outbox.remove(capture_id)
agent.close()
ring = sum(f.image.nbytes + (f.lores.nbytes if f.lores is not None else 0)
           for f in agent.ring.window(0, float("inf"))) / 2**20
print(json.dumps({{"verdicts": verdicts, "peak_rss_mb": rss("VmHWM"),
                  "imported_rss_mb": imported, "streaming_rss_mb": streaming,
                  "ring_mb": ring, "ring_frames": agent.ring.capacity}}))
"""


def run_agent(tmp: Path, clips: Path, size: tuple[int, int], lores_width: int,
              budget: float, name: str, main_format: str) -> dict:
    script = _AGENT.format(bench=str(Path(__file__).parent), width=size[0], height=size[1],
                           lores=lores_width, budget=budget, state=str(tmp / name),
                           clips=str(clips), fmt=main_format)
    # With the systemd unit's environment (its malloc settings), as the agent runs on a Pi.
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=600, cwd=ROOT, env={**os.environ, **unit_environment()})
    if out.returncode != 0:
        raise RuntimeError(f"the {name} agent failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


class ReplayCamera(Camera):
    """Plays the saved clips at the frame rate, as a sensor would deliver them: the main
    stream scaled up to the sensor mode's size, the lores stream as its gray downscale, on
    a steady timestamp grid. Between clips it repeats a clip's last frame. One file is read
    per frame, so the process holds no more than the frame in flight."""

    model = "replay-imx477"

    def __init__(self, clips: Path, size: tuple[int, int], lores_width: int, fps: float,
                 main_format: str = "RGB888"):
        self._main_format = main_format
        self._clips = clips
        self._size = size
        self._lores_width = lores_width
        self._period = 1.0 / fps
        self._changed = threading.Condition()
        self._closed = threading.Event()
        self._scene, self._index = 0, CLIP - 1
        self._pending: int | None = None
        self._clip_started: float | None = None
        self._next_due = 0.0
        self._sequence = 0

    def start(self) -> None:
        self._closed.clear()
        self._next_due = time.monotonic()

    def play(self, scene: int, timeout: float = 10.0) -> float:
        """Play a scene's clip from the next frame on; its frame 0's timestamp."""
        with self._changed:
            self._pending, self._clip_started = scene, None
            if not self._changed.wait_for(lambda: self._clip_started is not None, timeout):
                raise CameraError("the replay camera delivered no frame")
            return self._clip_started

    def next_frame(self, timeout: float) -> Frame:
        wait = self._next_due - time.monotonic()
        if wait > 0 and self._closed.wait(min(wait, timeout)):
            raise CameraError("camera closed")
        stamp = self._next_due  # the sensor's grid, whatever this process's delays
        self._next_due += self._period
        with self._changed:
            if self._pending is not None:
                self._scene, self._index, self._pending = self._pending, 0, None
                self._clip_started = stamp
                self._changed.notify_all()
            else:
                self._index = min(self._index + 1, CLIP - 1)
            scene, index = self._scene, self._index
        drawn = np.load(self._clips / f"{scene}-{index}.npy")
        self._sequence += 1
        return Frame(image=_scale(drawn, self._size), timestamp=stamp,
                     sequence=self._sequence,
                     metadata={"SensorTimestamp": int(stamp * 1e9), "ExposureTime": 8000},
                     lores=_lores(drawn, self._size, self._lores_width))

    def stream_frame(self, timeout: float) -> Frame:
        frame = self.next_frame(timeout)
        if self._main_format != "YUV420":
            return frame
        return replace(frame, image=cv2.cvtColor(frame.image, cv2.COLOR_BGR2YUV_I420),
                       yuv420=True)

    def close(self) -> None:
        self._closed.set()


def sensor_12mp(tmp: Path) -> dict:
    clips = tmp / "clips"
    clips.mkdir()
    draw_clips(clips)
    binned = (SENSOR[0] // 2, SENSOR[1] // 2)
    results = {}
    references = {}
    for name, size, fmt, budget in (("binned", binned, "YUV420", 128.0),
                                    ("full", SENSOR, "YUV420", 128.0),
                                    ("full_rgb888", SENSOR, "RGB888", 200.0)):
        if size not in references:
            references[size] = reference_verdicts(clips, size)
        reference = references[size]
        agent = run_agent(tmp, clips, size, 1014, budget, name, fmt)
        results[name] = {**agent, "width": size[0], "height": size[1], "main_format": fmt,
                         "reference_verdicts": reference,
                         "same_verdicts": agent["verdicts"] == reference,
                         "frame_mb": size[0] * size[1] * (1.5 if fmt == "YUV420" else 3)
                         / 2**20}
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as name:
        tmp = Path(name)
        imp = imports()
        start = start_to_ready(tmp)
        sensor = sensor_12mp(tmp)
    binned = sensor["binned"]
    lean_ok = not imp["heavy_modules_loaded"]
    # The goal is the design for a Pi Zero 2 W (the binned mode); every run, 12 MP too,
    # must give the old ring's verdicts.
    memory_ok = (binned["peak_rss_mb"] <= RSS_GOAL_MB
                 and all(run["same_verdicts"] for run in sensor.values()))
    lines = [
        f"import agent      : {imp['agent_import_s']:.2f} s, {imp['agent_rss_mb']:.0f} MB RSS; "
        f"{imp['import_time_ratio']:.1f}x the time and {imp['import_rss_ratio']:.2f}x the "
        f"memory of python + numpy + cv2 ({imp['baseline_import_s']:.2f} s, "
        f"{imp['baseline_rss_mb']:.0f} MB); heavy modules loaded: "
        f"{', '.join(imp['heavy_modules_loaded']) or 'none'} (goal none: "
        f"{'met' if lean_ok else 'NOT met'})",
        f"start to ready    : agent started {start['started_s']:.2f} s, first frame (LED "
        f"ready) {start['ready_s']:.2f} s after exec = {start['ready_ratio']:.1f}x python + "
        f"numpy + cv2 starting ({start['baseline_python_numpy_cv2_s']:.2f} s); RSS "
        f"{start['ready_rss_mb']:.0f} MB (simulated camera included)",
        f"4056x3040 sensor  : 2x2-binned {binned['width']}x{binned['height']} YUV420 + lores "
        f"1014: peak RSS {binned['peak_rss_mb']:.0f} MB (ring {binned['ring_frames']} frames, "
        f"{binned['ring_mb']:.0f} MB), verdicts "
        f"{'the same as' if binned['same_verdicts'] else 'NOT the same as'} the old ring's "
        f"in {len(SCENES)} scenes (goal <= {RSS_GOAL_MB:.0f} MB, same: "
        f"{'met' if memory_ok else 'NOT met'})",
    ]
    for name in ("full", "full_rgb888"):
        run = sensor[name]
        lines.append(
            f"  all 12 MP {run['main_format']:6s}: peak RSS {run['peak_rss_mb']:.0f} MB, verdicts "
            f"{'the same' if run['same_verdicts'] else 'NOT the same'}; profile: imported "
            f"{run['imported_rss_mb']:.0f} MB + ring {run['ring_frames']} x "
            f"{run['frame_mb']:.1f} MB = {run['ring_mb']:.0f} MB (streaming "
            f"{run['streaming_rss_mb']:.0f} MB) + the frame in flight and the chosen frame in "
            f"BGR ({SENSOR[0] * SENSOR[1] * 3 / 2**20:.0f} MB each) -> "
            f"{'within' if run['peak_rss_mb'] <= RSS_GOAL_MB else 'over'} the goal")
    emit("memory", lines, {"imports": imp, "start": start, "sensor_12mp": sensor,
                           "goals": {"lean_imports": lean_ok, "memory_12mp": memory_ok}})
    return 0 if lean_ok and memory_ok else 1


if __name__ == "__main__":
    sys.exit(main())
