"""Status patterns, read back from the simulated board's LED timeline.

Every wait is on the timeline itself (``SimBoard.wait_for``) with a timeout. A wait that is
expected to time out is an observation window: it proves the LED did *not* change, and its
length is chosen to be longer than the pattern step that would otherwise show.
"""

import itertools
import time

import pytest

from device_agent.feedback.lights import Signal
from sim.board import Change

TIMEOUT = 5.0  # generous: the patterns below take at most a few seconds


def since(start: float, timeline: list[Change]) -> list[Change]:
    return [c for c in timeline if c.at >= start]


def test_ready_is_steady_on(rig):
    board, lights = rig
    seen = len(board.status_timeline())
    # A blinking pattern changes within its longest step (1 s, offline's): watch longer.
    assert not board.wait_for(board.pins.status_led, lambda t: len(t) > seen, timeout=1.2)
    assert board.pin(board.pins.status_led).state == 1
    assert lights.standing is Signal.READY


def test_retake_blinks_fast_five_times_then_returns_to_ready(rig):
    board, lights = rig
    led = board.pins.status_led
    start = time.monotonic()
    lights.show(Signal.RETAKE)
    assert board.wait_for(led, lambda t: sum(c.value == 1.0 for c in since(start, t)) >= 5,
                          TIMEOUT)
    # A sixth blink would go dark 0.1 s after the fifth: none comes, the LED stays lit.
    assert not board.wait_for(led, lambda t: len(since(start, t)) > 10, timeout=0.5)
    changes = since(start, board.status_timeline())
    assert [c.value for c in changes] == [0.0, 1.0] * 5  # from dark, ending lit: ready again
    # Fast: 0.1 s steps, 0.9 s from the first dark to the last lit; 0.3 s steps would take 2.7.
    assert min(b.at - a.at for a, b in itertools.pairwise(changes)) >= 0.09, changes
    assert changes[-1].at - changes[0].at < 1.8, changes
    assert board.pin(led).state == 1
    assert lights.standing is Signal.READY


def test_a_new_signal_interrupts_the_old_one_at_once(rig):
    board, lights = rig
    led = board.pins.status_led
    start = time.monotonic()
    lights.show(Signal.CAPTURING)
    assert board.wait_for(led, lambda t: t[-1].at >= start and t[-1].value == 0.0, TIMEOUT)
    start = time.monotonic()
    lights.show(Signal.ACCEPTED)
    # Well under CAPTURING's five seconds: a queued ACCEPTED would miss this wait.
    assert board.wait_for(led, lambda t: any(c.value == 1.0 for c in since(start, t)),
                          timeout=2.0)
    first_on = next(c for c in since(start, board.status_timeline()) if c.value == 1.0)
    assert first_on.at - start < 0.3  # at once: after ACCEPTED's own 0.15 s of dark


def test_standing_pattern_persists_after_a_transient(rig):
    board, lights = rig
    led = board.pins.status_led
    start = time.monotonic()
    lights.show(Signal.OFFLINE)
    lights.show(Signal.ACCEPTED)
    # ACCEPTED (dark, lit 1 s, dark), then OFFLINE's slow blink (lit 1 s, dark 1 s, ...).
    # "ready" would stay lit after ACCEPTED: the fifth change, dark again, is offline's.
    assert board.wait_for(led, lambda t: len(since(start, t)) >= 5, TIMEOUT)
    changes = since(start, board.status_timeline())[:5]
    assert [c.value for c in changes] == [0.0, 1.0, 0.0, 1.0, 0.0]
    lit_offline = changes[4].at - changes[3].at
    assert 0.9 <= lit_offline < 1.5, changes  # slow: not storage full's or fault's flash
    assert lights.standing is Signal.OFFLINE


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
