"""The frame ring within a memory budget, and frame choice on the camera's lores stream.

A 12 MP frame is 35 MB in BGR: the zero-shutter-lag ring of a second of them at 10 fps
would be 388 MB, more than a Pi Zero 2 W has. The config states a budget and refuses a
ring that does not fit; frame choice scores the small lores stream, and the verdict is the
same as when it scored the full frames.
"""

from __future__ import annotations

import tomllib
from dataclasses import replace
from pathlib import Path

import pytest

from device_agent.camera.base import Frame
from device_agent.camera.picam import PicameraCamera
from device_agent.camera.quality import assess
from device_agent.camera.ring import FrameRing, lores_size, ring_size
from device_agent.camera.select import choose_frame
from device_agent.config import CameraConfig, ConfigError, parse_config
from sim.camera import SimCamera
from tests.fake_picamera2 import FakePicamera2

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "config.toml"


def bench(**camera: object) -> dict:
    return {"device": {"id": "ring-1"}, "camera": {"backend": "sim", **camera},
            "uplink": {"insecure_dev_mode": True}, "security": {"insecure_dev_mode": True}}


def test_a_12_mp_ring_of_a_second_is_refused_naming_the_field_and_the_megabytes():
    with pytest.raises(ConfigError, match=r"camera.memory_budget_mb: the frame ring needs "
                                          r"388 MB \(11 RGB888 frames of 4056x3040.*allows 128 MB"):
        parse_config(bench(width=4056, height=3040))


def test_a_ring_that_fits_the_budget_is_accepted():
    # Five 12 MP frames (0.4 s at 10 fps: the press window) in a 200 MB budget.
    config = parse_config(bench(width=4056, height=3040, ring_seconds=0.4,
                                memory_budget_mb=200, lores_width=1014))
    size = ring_size(4056, 3040, 10, 0.4, 1014)
    assert size.frames == 5
    assert size.megabytes == pytest.approx(5 * (4056 * 3040 * 3 + 1014 * 760) / 2**20)
    assert size.megabytes <= config.camera.memory_budget_mb
    # ... and the same ring one frame longer does not.
    with pytest.raises(ConfigError, match=r"needs 212 MB \(6 RGB888 frames"):
        parse_config(bench(width=4056, height=3040, ring_seconds=0.5, memory_budget_mb=200))


def test_the_shipped_example_camera_fits_the_default_budget():
    camera = tomllib.loads(EXAMPLE.read_text())["camera"]
    assert camera["memory_budget_mb"] == CameraConfig().memory_budget_mb  # the default
    parsed = parse_config(bench(**{**camera, "backend": "sim"})).camera
    assert ring_size(parsed.width, parsed.height, parsed.fps, parsed.ring_seconds,
                     parsed.lores_width).megabytes <= parsed.memory_budget_mb


def test_the_lores_stream_must_be_smaller_than_the_main_one():
    with pytest.raises(ConfigError, match=r"camera.lores_width \(1014\) must be at least 64 "
                                          r"and less than camera.width \(1014\)"):
        parse_config(bench(lores_width=1014))


def test_the_ring_holds_what_ring_size_counts():
    size = ring_size(320, 240, 10, 1.0, 160)
    ring = FrameRing(size.frames)
    camera = SimCamera(320, 240, fps=1000.0, lores_width=160)
    camera.start()
    for _ in range(size.frames + 5):
        ring.push(camera.next_frame(timeout=5))
    camera.close()
    frames = ring.window(0, float("inf"))
    assert len(frames) == size.frames
    held = sum(f.image.nbytes + f.lores.nbytes for f in frames)
    assert held == pytest.approx(size.megabytes * 2**20)


def test_the_picamera2_backend_streams_the_lores_y_plane():
    opened: list[FakePicamera2] = []

    class factory(FakePicamera2):  # stands in for the Picamera2 class
        def __init__(self, num: int = 0, tuning: dict | None = None) -> None:
            super().__init__(num, tuning=tuning)
            opened.append(self)

    lores = lores_size(640, 480, 331)
    assert lores == (330, 248)  # even sides, as YUV420 needs
    camera = PicameraCamera(640, 480, 30.0, factory=factory, lores=lores)
    with camera:
        assert opened[0].config["lores"] == {"size": (330, 248), "format": "YUV420"}
        frame = camera.next_frame(timeout=1.0)
        assert opened[0].outstanding == 0
    assert frame.image.shape == (480, 640, 3)
    assert frame.lores.shape == (248, 330)  # without the rows' padding to 384 bytes
    assert frame.lores.max() < 255
    assert frame.lores.base is None  # its own copy: the chroma planes are not kept alive
    # The gray of the same picture: the fake's gradient runs left to right.
    assert frame.lores[0, 0] < frame.lores[0, -1]


def _clip(camera: SimCamera, defect: str | None, frames: int = 7, press: int = 4
          ) -> list[Frame]:
    """Frames of one scene, 0.1 s apart, the hand shaking from frame ``press`` on."""
    camera.set_scene(defect=defect)
    clip = []
    for i in range(frames):
        if i == press:
            camera.shake(duration=60.0, length=12.0)
        clip.append(replace(camera.next_frame(timeout=5), timestamp=i * 0.1))
    camera.shake(duration=0.0)
    return clip


@pytest.mark.parametrize("defect", [None, "defocus", "motion", "underexposed", "glare",
                                    "colour_cast", "off_centre"])
def test_choosing_on_the_lores_stream_gives_the_verdict_of_the_full_frames(defect):
    """The old ring scored the full frames; the new one scores their lores copies. On a
    normal-size sensor, with a shaken press, the same scene gets the same verdict."""
    camera = SimCamera(1014, 760, fps=1000.0, seed=7, lores_width=508)
    camera.start()
    clip = _clip(camera, defect)
    camera.close()
    press = 0.35  # between frames 3 and 4: the window holds 1..4, frame 4 shaken
    assert all(f.lores is not None and f.lores.shape == (380, 508) for f in clip)

    old = choose_frame([replace(f, lores=None) for f in clip], press, 0.3, 0.1)
    new = choose_frame(clip, press, 0.3, 0.1)
    assert old is not None
    assert new is not None
    assert new[0].image.shape == (760, 1014, 3)  # the verdict reads the full frame
    assert new[0].sequence != clip[4].sequence  # the shaken frame is not chosen
    old_reasons = assess(old[0].image).reasons
    assert assess(new[0].image).reasons == old_reasons
    if defect in ("defocus", "underexposed", "glare"):
        assert old_reasons  # the scene's defect is caught either way
    if defect is None:
        assert old_reasons == []


def test_a_new_press_lets_the_last_retake_go(tmp_path):
    """A retake's frames are held for a hold to override it; the next press supersedes it,
    even one that finds no frame, so two captures' frames are never held at once."""
    from sim.broker import free_port
    from sim.device import SimDevice, sim_config

    config = sim_config(tmp_path / "device", free_port())
    with SimDevice(config, with_uplink=False) as device:
        device.show("underexposed")
        agent = device.agent
        retake = agent.capture(agent.ring.latest().timestamp - config.camera.window_after)
        assert retake.verdict == "retake"
        # Pressed long before anything the ring holds: no frame around it.
        failed = agent.capture(agent.ring_started_at - 60.0)
        assert failed.verdict == "failed"
        assert agent.override() is None  # nothing left to override


def test_a_yuv420_ring_keeps_half_the_bytes_and_gives_back_the_frame():
    """picamera2's YUV420 main stream, rows padded to the stride: the ring keeps the packed
    I420 frame (1.5 bytes a pixel); the chosen one converts back to the BGR picture, while
    calibration and doctor reading next_frame get BGR as before."""
    opened: list[FakePicamera2] = []

    class factory(FakePicamera2):  # stands in for the Picamera2 class
        def __init__(self, num: int = 0, tuning: dict | None = None) -> None:
            super().__init__(num, tuning=tuning)
            opened.append(self)

    camera = PicameraCamera(330, 248, 30.0, factory=factory, main_format="YUV420")
    with camera:
        assert opened[0].config["main"]["format"] == "YUV420"
        compact = camera.stream_frame(timeout=1.0)
        plain = camera.next_frame(timeout=1.0)
    assert compact.yuv420
    assert compact.image.shape == (372, 330)  # no stride padding (384) kept
    assert compact.image.nbytes == ring_size(330, 248, 10, 0, 0, "YUV420").frame_bytes
    assert not plain.yuv420
    assert plain.image.shape == (248, 330, 3)
    back = compact.bgr()
    assert back.image.shape == (248, 330, 3)
    # The fake's picture (a left-to-right gradient) survives the round trip, padding unread.
    reference = opened[0]._image().astype(int)
    assert abs(back.image.astype(int) - reference).max() <= 3
    assert compact.gray().shape == (248, 330)


def test_a_12_mp_yuv420_ring_of_the_press_window_fits_the_default_budget():
    config = parse_config(bench(width=4056, height=3040, ring_seconds=0.4,
                                main_format="YUV420", lores_width=1014))
    size = ring_size(4056, 3040, 10, 0.4, 1014, "YUV420")
    assert size.megabytes == pytest.approx(5 * (4056 * 3040 * 1.5 + 1014 * 760) / 2**20)
    assert size.megabytes <= config.camera.memory_budget_mb


@pytest.mark.parametrize("defect", [None, "underexposed", "colour_cast"])
def test_an_agent_with_a_compact_ring_gives_the_verdicts_of_a_bgr_one(tmp_path, defect):
    """The whole press, from the button: the ring keeps YUV420 frames and scores lores, the
    verdict and the stored image come from the chosen frame converted to BGR."""
    from sim.broker import free_port
    from sim.device import SimDevice, sim_config

    outcomes = {}
    for fmt in ("RGB888", "YUV420"):
        config = sim_config(tmp_path / fmt, free_port(),
                            camera={"main_format": fmt, "lores_width": 508})
        device = SimDevice(config, with_uplink=False)
        assert device.camera.lores_size == lores_size(1014, 760, 508)  # as configured
        with device:
            device.show(defect)
            outcome = device.press()
            kept = device.agent.ring.window(0, float("inf"))
            assert all(f.yuv420 == (fmt == "YUV420") for f in kept)
            assert all(f.lores is not None for f in kept)
            assert device.agent.ring.latest().image.shape == (760, 1014, 3)
        assert outcome is not None
        outcomes[fmt] = (outcome.verdict, outcome.reasons)
    assert outcomes["YUV420"] == outcomes["RGB888"]
    assert outcomes["RGB888"][0] == ("accept" if defect is None else "retake")
