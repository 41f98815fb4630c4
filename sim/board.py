"""The simulated board: gpiozero's own MockFactory standing in for the Pi's pins.

Helpers press, hold and double-press the button the way a finger would (the pauses between
edges are the finger, not synchronisation), read back every LED's timeline, and wait until a
timeline shows something (tests wait on that, not on fixed sleeps).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from gpiozero.pins.mock import MockFactory, MockPWMPin

from device_agent.config import PinsConfig


@dataclass(frozen=True)
class Change:
    #: ``time.monotonic()`` of the change
    at: float
    value: float


class RecordingPin(MockPWMPin):
    """A PWM-capable mock pin that also keeps every change on the absolute monotonic clock."""

    def __init__(self, factory: MockFactory, info: object) -> None:
        self.changes: list[Change] = []
        # Guards ``changes`` and wakes whoever waits for the timeline to show something.
        self.changed = threading.Condition()
        super().__init__(factory, info)

    def _change_state(self, value: float | bool) -> bool:
        # Not under the lock: for the button this runs gpiozero's edge callbacks.
        changed = super()._change_state(value)
        if changed:
            with self.changed:
                self.changes.append(Change(time.monotonic(), float(value)))
                self.changed.notify_all()
        return changed


class SimBoard:
    def __init__(self, pins: PinsConfig) -> None:
        self.pins = pins
        # PWM-capable mock pins throughout: the ring channels are PWMLEDs.
        self.factory = MockFactory(pin_class=RecordingPin)
        self._finger = threading.Event()  # never set: waits below are a finger's timing

    def pin(self, number: int) -> RecordingPin:
        return self.factory.pin(number)

    # -- the button ---------------------------------------------------------------------
    def _button_pin(self) -> RecordingPin:
        return self.pin(self.pins.button)

    def button_down(self) -> None:
        self._button_pin().drive_low()  # pull-up: pressed shorts to ground

    def button_up(self) -> None:
        self._button_pin().drive_high()

    def press(self, duration: float = 0.12) -> None:
        self.button_down()
        self._finger.wait(duration)
        self.button_up()

    def hold(self, duration: float = 2.0) -> None:
        self.press(duration)

    def double_press(self, duration: float = 0.08, gap: float = 0.15) -> None:
        self.press(duration)
        self._finger.wait(gap)
        self.press(duration)

    # -- the LEDs -----------------------------------------------------------------------
    def timeline(self, number: int) -> list[Change]:
        """Every change of the pin's value, oldest first."""
        pin = self.pin(number)
        with pin.changed:
            return list(pin.changes)

    def wait_for(
        self, number: int, predicate: Callable[[list[Change]], bool], timeout: float
    ) -> bool:
        """Wait until ``predicate`` holds for the pin's timeline (every change, oldest first),
        checked now and at each change; False if it still does not after ``timeout`` seconds."""
        pin = self.pin(number)
        with pin.changed:
            return pin.changed.wait_for(lambda: predicate(list(pin.changes)), timeout)

    def status_timeline(self) -> list[Change]:
        return self.timeline(self.pins.status_led)

    def close(self) -> None:
        self.factory.close()
