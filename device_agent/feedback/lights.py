"""What the clinician sees: the status LED's patterns and the LED ring's illumination.

The status LED has one *standing* pattern (ready, offline, storage full, fault) and plays
*transient* patterns over it (accepted, retake, overridden, capturing). One named thread
plays them; a new signal interrupts whatever is playing at once, so feedback is never
queued behind an old blink. docs/operations.md carries the same table for people.
"""

from __future__ import annotations

import enum
import logging
import queue
from dataclasses import dataclass

from gpiozero import LED, PWMLED
from gpiozero.pins import Factory

from dermascope_wire import threads
from dermascope_wire.logs import log_event

log = logging.getLogger(__name__)


class Signal(enum.Enum):
    READY = "ready"
    STARTING = "starting"
    CAPTURING = "capturing"
    ACCEPTED = "accepted"
    RETAKE = "retake"
    OVERRIDDEN = "overridden"
    STORAGE_FULL = "storage_full"
    OFFLINE = "offline"
    FAULT = "fault"
    ASLEEP = "asleep"
    MODE_POLARISED = "mode_polarised"
    MODE_NON_POLARISED = "mode_non_polarised"
    MODE_PAIR = "mode_pair"
    # A retake that says what to do: the retake's flashes, then slow blinks for the primary
    # reason (see RETAKE_SIGNALS).
    RETAKE_MOTION = "retake_motion"
    RETAKE_FOCUS = "retake_focus"
    RETAKE_FIELD = "retake_field"
    RETAKE_LIGHT = "retake_light"


@dataclass(frozen=True)
class Pattern:
    #: (led on?, seconds) steps; a standing pattern repeats them, a transient one plays once.
    #: Transients start dark so that every blink shows against a steady "ready".
    steps: tuple[tuple[bool, float], ...]
    standing: bool


PATTERNS: dict[Signal, Pattern] = {
    Signal.READY: Pattern(((True, 1.0),), standing=True),
    # The camera is starting (or waking): no frames yet. A press now waits for them.
    Signal.STARTING: Pattern(((True, 0.3), (False, 0.3)), standing=True),
    Signal.OFFLINE: Pattern(((True, 1.0), (False, 1.0)), standing=True),
    Signal.STORAGE_FULL: Pattern(((True, 0.1), (False, 0.9)), standing=True),
    Signal.FAULT: Pattern(((True, 0.05), (False, 0.05)), standing=True),
    Signal.ASLEEP: Pattern(((True, 0.05), (False, 2.95)), standing=True),
    Signal.CAPTURING: Pattern(((False, 5.0),), standing=False),
    Signal.ACCEPTED: Pattern(((False, 0.15), (True, 1.0), (False, 0.15)), standing=False),
    Signal.RETAKE: Pattern(((False, 0.1), (True, 0.1)) * 5, standing=False),
    Signal.OVERRIDDEN: Pattern(((False, 0.3), (True, 0.3)) * 2, standing=False),
    # Illumination mode after a double press: one, two or three short dark blinks.
    Signal.MODE_POLARISED: Pattern(((False, 0.25), (True, 0.25)) * 1, standing=False),
    Signal.MODE_NON_POLARISED: Pattern(((False, 0.25), (True, 0.25)) * 2, standing=False),
    Signal.MODE_PAIR: Pattern(((False, 0.25), (True, 0.25)) * 3, standing=False),
}

_RETAKE_FLASHES = ((False, 0.1), (True, 0.1)) * 5


def _retake_then(blinks: int) -> Pattern:
    """The retake's five quick flashes, a lit pause, then ``blinks`` slow dark blinks."""
    return Pattern(_RETAKE_FLASHES + ((True, 0.4),) + ((False, 0.35), (True, 0.35)) * blinks,
                   standing=False)


# What the clinician does about a retake's primary reason (QualityReport.primary_reason):
# one slow blink: hold still; two: refocus; three: press the lens flat and centred; four:
# change the light (exposure, glare, colour). Checks that name the same action share one.
PATTERNS.update({
    Signal.RETAKE_MOTION: _retake_then(1),
    Signal.RETAKE_FOCUS: _retake_then(2),
    Signal.RETAKE_FIELD: _retake_then(3),
    Signal.RETAKE_LIGHT: _retake_then(4),
})

RETAKE_SIGNALS: dict[str, Signal] = {
    "motion": Signal.RETAKE_MOTION,
    "focus": Signal.RETAKE_FOCUS,
    "field": Signal.RETAKE_FIELD,
    "underexposed": Signal.RETAKE_LIGHT,
    "overexposed": Signal.RETAKE_LIGHT,
    "glare": Signal.RETAKE_LIGHT,
    "colour": Signal.RETAKE_LIGHT,
}


def retake_signal(primary_reason: str | None) -> Signal:
    """The retake pattern for a retake whose first (primary) reason is ``primary_reason``;
    the plain retake when there is none or it is not a quality check (e.g. ``no_frame``)."""
    return RETAKE_SIGNALS.get(primary_reason or "", Signal.RETAKE)


MODE_SIGNALS = {"polarised": Signal.MODE_POLARISED, "non_polarised": Signal.MODE_NON_POLARISED,
                "pair": Signal.MODE_PAIR}


class Lights:
    """Status LED and the two-channel LED ring, on gpiozero devices."""

    def __init__(
        self,
        status_pin: int,
        ring_polarised_pin: int,
        ring_plain_pin: int,
        *,
        pin_factory: Factory | None = None,
        standing: Signal = Signal.READY,
    ) -> None:
        """``standing`` is the pattern shown from the start (the agent starts "starting")."""
        self._status = LED(status_pin, pin_factory=pin_factory)
        self._ring = {
            "polarised": PWMLED(ring_polarised_pin, pin_factory=pin_factory),
            "non_polarised": PWMLED(ring_plain_pin, pin_factory=pin_factory),
        }
        self._signals: queue.Queue[Signal | None] = queue.Queue()
        if not PATTERNS[standing].standing:
            raise ValueError(f"{standing.value} is not a standing pattern")
        self._standing = standing
        self._closed = False
        self._thread = threads.start("feedback", self._play, log)

    # -- status LED ---------------------------------------------------------------------
    def show(self, signal: Signal) -> None:
        """Show a signal now; a standing one also becomes the pattern to return to."""
        self._signals.put(signal)

    def healthy(self) -> bool:
        """The LED thread runs (or was closed on purpose)."""
        return self._closed or self._thread.is_alive()

    @property
    def standing(self) -> Signal:
        return self._standing

    def _play(self) -> None:
        current = PATTERNS[self._standing]
        step = 0
        while True:
            on, seconds = current.steps[step]
            self._status.value = on
            try:
                signal = self._signals.get(timeout=seconds)
            except queue.Empty:
                step += 1
                if step == len(current.steps):
                    step = 0
                    current = PATTERNS[self._standing]
                continue
            if signal is None:
                return
            pattern = PATTERNS[signal]
            if pattern.standing:
                changed = signal is not self._standing
                self._standing = signal  # before the event: whoever hears it reads the new one
                if changed:
                    log_event(log, "feedback.standing", signal=signal.value)
            current, step = pattern, 0

    # -- LED ring -----------------------------------------------------------------------
    def illuminate(self, mode: str, brightness: float) -> None:
        """Light the ring in one mode ("polarised" / "non_polarised"); the other goes dark."""
        if mode not in self._ring:
            raise ValueError(
                f"unknown illumination mode {mode!r}; expected one of {list(self._ring)}"
            )
        if not 0.0 <= brightness <= 1.0:
            raise ValueError(f"brightness must be within 0..1, got {brightness}")
        for name, led in self._ring.items():
            led.value = brightness if name == mode else 0.0

    def dark(self) -> None:
        for led in self._ring.values():
            led.value = 0.0

    def close(self, timeout: float = 2.0) -> None:
        self._closed = True
        self._signals.put(None)
        self._thread.join(timeout)
        self.dark()
        self._status.off()
        self._status.close()
        for led in self._ring.values():
            led.close()
