"""Ready from the first press: while the camera starts (a real sensor takes most of a second
before its first frame) the status LED says "starting", and a press then waits, bounded by
``camera.start_wait_s``, for the frames instead of failing with ``no_frame``."""

from __future__ import annotations

import itertools
import threading

import pytest

from device_agent.feedback.lights import Signal
from sim.broker import free_port
from sim.device import SimDevice, sim_config

START_DELAY = 1.2  # s to the simulated sensor's first frame


@pytest.fixture
def slow_start(tmp_path):
    """A simulated device whose camera takes START_DELAY s to deliver, started but with
    no frame yet (SimDevice.start would wait for frames: this one does not)."""
    config = sim_config(tmp_path / "state", free_port())
    device = SimDevice(config, with_uplink=False)
    device.camera.start_delay = START_DELAY
    stop = threading.Event()
    runner = threading.Thread(target=device.agent.run, args=(stop,), name="agent", daemon=True)
    device.agent.start()
    runner.start()
    try:
        yield device
    finally:
        stop.set()
        runner.join(10)
        device.agent.close()
        device.board.close()


def _blinks(timeline, until: float) -> int:
    """Status LED changes from on to off before ``until``."""
    changes = [c for c in timeline if c.at < until]
    return sum(1 for a, b in itertools.pairwise(changes) if a.value == 1.0 and b.value == 0.0)


def test_a_press_right_after_start_waits_for_frames_and_is_captured(events, slow_start):
    device = slow_start
    agent = device.agent
    assert agent.ring.latest() is None  # the camera has not delivered yet
    device.board.press()
    outcome = agent.wait_outcome(0, timeout=START_DELAY + 10)
    assert outcome is not None
    assert outcome.verdict == "accept", outcome
    assert "no_frame" not in outcome.reasons
    assert not events.named("capture.failed")
    waited = events.named("capture.waited_for_frames")
    assert len(waited) == 1
    assert waited[0]["waited_s"] > 0
    # The offset is the chosen frame's time from the press itself: after the camera's start.
    assert outcome.frame_offset >= waited[0]["waited_s"]
    # The kept frame is one of the stream's first window, not one from before it.
    streaming = events.wait_for("camera.streaming", timeout=5)[0]
    assert streaming["first_frame_s"] >= START_DELAY * 0.9


def test_the_led_says_starting_until_frames_flow_then_ready(events, slow_start):
    device = slow_start
    agent = device.agent
    assert agent.lights.standing is Signal.STARTING
    assert not agent.supervisor.streaming
    first = agent.supervisor.first_frame(timeout=START_DELAY + 5)
    assert first is not None
    events.wait_for("feedback.standing", signal="ready", timeout=5)
    # Before the first frame the LED blinked (starting), it did not stand steady (ready).
    assert _blinks(device.board.status_timeline(), first) >= 1
    assert agent.lights.standing is Signal.READY


def test_a_press_gives_no_frame_when_the_camera_never_delivers(tmp_path, events):
    """Bounded: a camera that never starts still ends the press, with no_frame."""
    config = sim_config(tmp_path / "state", free_port(),
                        camera={"start_wait_s": 0.5, "frame_timeout": 0.5})
    device = SimDevice(config, with_uplink=False)
    device.camera.start_delay = 60.0
    device.agent.start()
    try:
        outcome = device.agent.capture(device.agent.ring_started_at)
        assert outcome.verdict == "failed"
        assert outcome.reasons == ("no_frame",)
    finally:
        device.agent.close()
        device.board.close()
