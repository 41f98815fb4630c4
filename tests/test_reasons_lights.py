"""The status LED shows a retake's primary reason (issue 18): the retake's five quick flashes,
then one slow blink per action (1 hold still, 2 refocus, 3 press the lens flat, 4 light)."""

import itertools
import time

import pytest

from device_agent.camera.quality import CHECK_NAMES
from device_agent.feedback.lights import PATTERNS, Signal, retake_signal

TIMEOUT = 8.0


def test_every_check_has_a_retake_pattern_and_others_get_the_plain_one():
    for name in CHECK_NAMES:
        assert retake_signal(name) is not Signal.RETAKE
        assert retake_signal(name) in PATTERNS
    assert retake_signal(None) is Signal.RETAKE
    assert retake_signal("no_frame") is Signal.RETAKE
    assert retake_signal("motion") is not retake_signal("focus")
    assert retake_signal("overexposed") is retake_signal("glare")


@pytest.mark.parametrize(("reason", "blinks"), [("motion", 1), ("field", 3)])
def test_the_primary_reason_blinks_after_the_retake_flashes(rig, reason, blinks):
    board, lights = rig
    led = board.pins.status_led
    start = time.monotonic()
    lights.show(retake_signal(reason))
    want = 10 + 2 * blinks
    assert board.wait_for(led, lambda t: len([c for c in t if c.at >= start]) >= want, TIMEOUT)
    # No further change once the pattern has ended lit.
    assert not board.wait_for(led, lambda t: len([c for c in t if c.at >= start]) > want,
                              timeout=0.8)
    changes = [c for c in board.status_timeline() if c.at >= start]
    assert [c.value for c in changes] == [0.0, 1.0] * (5 + blinks)
    quick = changes[:10]
    slow = changes[10:]
    assert max(b.at - a.at for a, b in itertools.pairwise(quick)) < 0.3, quick
    assert min(b.at - a.at for a, b in itertools.pairwise(slow)) >= 0.3, slow
    assert slow[0].at - quick[-1].at >= 0.45  # the lit pause, then the first slow blink
    assert board.pin(led).state == 1
    assert lights.standing is Signal.READY


def test_a_captures_reasons_keep_the_cause_first_across_its_images():
    """The verdict of a capture (a pair has two images) keeps each image's cause-first order
    (docs/quality.md), the first image's cause leading, every reason once: the old fixed
    vocabulary order put ``focus`` before ``overexposed`` whatever the cause."""
    from device_agent.capture import Shot, verdict

    first = Shot("c1", None, "polarised", {}, ("overexposed", "focus"))
    second = Shot("c2", None, "non_polarised", {}, ("glare", "overexposed"))
    assert verdict((first, second)) == ("overexposed", "focus", "glare")
    assert verdict((Shot("c3", None, "polarised", {}, ()),)) == ()


def test_a_pressed_retake_blinks_its_primary_reason(tmp_path):
    """Through the agent: an underexposed scene is a retake whose primary reason is the
    light, and the status LED plays that pattern (five quick flashes, then four slow
    blinks), not the plain retake."""
    from sim.broker import free_port
    from sim.device import SimDevice, sim_config

    with SimDevice(sim_config(tmp_path / "device", free_port())) as device:
        device.show("underexposed")
        led = device.board.pins.status_led
        start = time.monotonic()
        outcome = device.press()
        assert outcome is not None
        assert outcome.verdict == "retake"
        assert outcome.reasons[0] == "underexposed"
        want = 10 + 2 * 4
        assert device.board.wait_for(
            led, lambda t: len([c for c in t if c.at >= start]) >= want, TIMEOUT)
