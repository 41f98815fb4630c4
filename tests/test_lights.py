"""Status patterns, read back from the simulated board's LED timeline."""

import time

import pytest

from device_agent.config import PinsConfig
from device_agent.feedback.lights import Lights, Signal
from sim.board import SimBoard


@pytest.fixture
def rig():
    board = SimBoard(PinsConfig())
    lights = Lights(board.pins.status_led, board.pins.ring_polarised, board.pins.ring_plain,
                    pin_factory=board.factory)
    yield board, lights
    lights.close()
    board.close()


def blinks_since(board, start):
    return sum(1 for c in board.status_timeline() if c.at >= start and c.value == 1.0)


def test_ready_is_steady_on(rig):
    board, _ = rig
    time.sleep(0.3)  # observing a steady LED for a while is the point of this test
    assert board.pin(board.pins.status_led).state == 1


def test_retake_blinks_fast_five_times_then_returns_to_ready(rig):
    board, lights = rig
    start = time.monotonic()
    lights.show(Signal.RETAKE)
    time.sleep(1.4)
    changes = [c for c in board.status_timeline() if c.at >= start]
    ons = [c for c in changes if c.value == 1.0]
    assert len(ons) == 5  # five blinks from dark, ending lit: steady ready again
    assert board.pin(board.pins.status_led).state == 1


def test_a_new_signal_interrupts_the_old_one_at_once(rig):
    board, lights = rig
    lights.show(Signal.CAPTURING)
    time.sleep(0.1)
    assert board.pin(board.pins.status_led).state == 0
    start = time.monotonic()
    lights.show(Signal.ACCEPTED)
    time.sleep(0.4)
    first_on = next(c for c in board.status_timeline() if c.at >= start and c.value == 1.0)
    assert first_on.at - start < 0.3  # not queued behind CAPTURING's five seconds


def test_standing_pattern_persists_after_a_transient(rig):
    board, lights = rig
    lights.show(Signal.OFFLINE)
    lights.show(Signal.ACCEPTED)
    time.sleep(1.5 + 2.1)
    assert lights.standing is Signal.OFFLINE
    start = time.monotonic() - 2.0
    assert blinks_since(board, start) >= 1
    offs = [c for c in board.status_timeline() if c.at >= start and c.value == 0.0]
    assert offs, "offline blinks slowly, it is not steady"


def test_ring_lights_one_mode_at_a_time(rig):
    board, lights = rig
    lights.illuminate("polarised", 0.8)
    assert board.pin(board.pins.ring_polarised).state == pytest.approx(0.8)
    assert board.pin(board.pins.ring_plain).state == 0
    lights.illuminate("non_polarised", 0.5)
    assert board.pin(board.pins.ring_polarised).state == 0
    assert board.pin(board.pins.ring_plain).state == pytest.approx(0.5)
    with pytest.raises(ValueError, match="unknown illumination mode"):
        lights.illuminate("uv", 1.0)
