"""The one push button, turned into gestures.

- press: a short press. Emitted on release (so a hold is never mistaken for a press), but
  it carries the moment the button went down: that is the moment the clinician meant, and
  frame choice looks around it.
- hold: the button kept down for ``hold_time``. Emitted while still held; its release emits
  nothing more.
- double press: a second press that starts within ``double_press_window`` of the previous
  short press's release. It replaces that second press.

Software debounce on top of the pin driver's: a contact that re-closes within
``bounce_time`` of opening is the same press (gpiozero's mock pins do not debounce at all).
"""

from __future__ import annotations

import enum
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from gpiozero import Button
from gpiozero.pins import Factory


class Gesture(enum.Enum):
    PRESS = "press"
    HOLD = "hold"
    DOUBLE_PRESS = "double_press"


@dataclass(frozen=True)
class GestureEvent:
    gesture: Gesture
    #: ``time.monotonic()`` when the button went down.
    pressed_at: float
    #: ... and when it came up (None for a hold, emitted while the button is still down).
    released_at: float | None = None


class GestureButton:
    """A gpiozero ``Button`` whose edges become :class:`GestureEvent` calls to ``sink``."""

    def __init__(
        self,
        pin: int,
        sink: Callable[[GestureEvent], None],
        *,
        pin_factory: Factory | None = None,
        bounce_time: float = 0.02,
        hold_time: float = 1.5,
        double_press_window: float = 0.4,
    ) -> None:
        self._sink = sink
        self._bounce_time = bounce_time
        self._double_window = double_press_window
        self._lock = threading.Lock()
        self._down_at: float | None = None
        self._held = False
        self._bouncing = False
        self._last_release: float = float("-inf")
        self._last_down: float = float("-inf")
        self._last_was_press = False
        # Pull-up: the button shorts the pin to ground. bounce_time goes to the pin driver too.
        self._button = Button(
            pin,
            pull_up=True,
            bounce_time=bounce_time or None,
            hold_time=hold_time,
            pin_factory=pin_factory,
        )
        self._button.when_pressed = self._on_down
        self._button.when_released = self._on_up
        self._button.when_held = self._on_held

    def _on_down(self) -> None:
        now = time.monotonic()
        with self._lock:
            if self._down_at is not None:
                return  # the contact re-closed while we still count it as pressed
            if now - self._last_release < self._bounce_time:
                self._bouncing = True  # the release of the last press is still bouncing
                return
            self._down_at = now
            self._last_down = now
            self._held = False

    def _on_held(self) -> None:
        with self._lock:
            if self._down_at is None:
                return
            self._held = True
            event = GestureEvent(Gesture.HOLD, self._down_at)
        self._sink(event)

    def _on_up(self) -> None:
        now = time.monotonic()
        with self._lock:
            if self._bouncing:
                self._bouncing = False
                return
            down_at, held = self._down_at, self._held
            if down_at is None or now - down_at < self._bounce_time:
                return  # no press, or a contact glitch shorter than a bounce: still pressed
            self._down_at = None
            double = self._last_was_press and down_at - self._last_release <= self._double_window
            self._last_release = now
            if held:
                self._last_was_press = False
                return
            # A double press consumes both presses: a third press starts afresh.
            self._last_was_press = not double
            event = GestureEvent(Gesture.DOUBLE_PRESS if double else Gesture.PRESS, down_at,
                                 now)
        self._sink(event)

    def pressed_since(self, released_at: float, within: float) -> bool:
        """Did a press start within ``within`` seconds after ``released_at``? Its gesture
        (a double press, or a hold) is then on its way, or will be once it is released."""
        with self._lock:
            return released_at < self._last_down <= released_at + within

    @property
    def is_pressed(self) -> bool:
        return bool(self._button.is_pressed)

    def close(self) -> None:
        self._button.close()
