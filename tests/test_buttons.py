"""Gestures from gpiozero's MockFactory pins, pressed as a finger would."""

import queue

import pytest

from device_agent.buttons.gestures import Gesture, GestureButton
from device_agent.config import PinsConfig
from sim.board import SimBoard


@pytest.fixture
def board():
    board = SimBoard(PinsConfig())
    yield board
    board.close()


@pytest.fixture
def gestures(board):
    events: queue.Queue = queue.Queue()
    button = GestureButton(board.pins.button, events.put, pin_factory=board.factory,
                           bounce_time=0.02, hold_time=0.3, double_press_window=0.3)
    yield events
    button.close()


def drain(events, timeout=0.5):
    out = []
    while True:
        try:
            out.append(events.get(timeout=timeout))
        except queue.Empty:
            return out


def test_a_press_carries_the_moment_the_button_went_down(board, gestures):
    import time

    before = time.monotonic()
    board.press(0.1)
    (event,) = drain(gestures)
    assert event.gesture is Gesture.PRESS
    assert before <= event.pressed_at <= before + 0.05  # the press, not the release


def test_a_hold_is_not_also_a_press(board, gestures):
    board.hold(0.6)
    assert [e.gesture for e in drain(gestures)] == [Gesture.HOLD]


def test_double_press(board, gestures):
    board.double_press(duration=0.06, gap=0.1)
    assert [e.gesture for e in drain(gestures)] == [Gesture.PRESS, Gesture.DOUBLE_PRESS]


def test_presses_far_apart_are_two_presses(board, gestures):
    board.press(0.06)
    board._finger.wait(0.5)
    board.press(0.06)
    assert [e.gesture for e in drain(gestures)] == [Gesture.PRESS, Gesture.PRESS]


def test_contact_bounce_is_one_press(board, gestures):
    # A worn switch: chatter at both edges, each change a few ms apart.
    board.button_down()
    board.button_up()
    board.button_down()
    board._finger.wait(0.1)
    board.button_up()
    board.button_down()
    board.button_up()
    assert [e.gesture for e in drain(gestures)] == [Gesture.PRESS]
