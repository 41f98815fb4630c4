import threading
import time

import numpy as np
import pytest

from device_agent.camera.base import Frame
from device_agent.camera.ring import FrameRing


def frame(t, seq=0):
    return Frame(np.zeros((2, 2, 3), np.uint8), t, seq)


def test_keeps_only_the_newest_frames():
    ring = FrameRing(3)
    for i in range(5):
        ring.push(frame(float(i), i))
    assert [f.sequence for f in ring.window(-1, 10)] == [2, 3, 4]
    assert ring.latest().sequence == 4


def test_window_is_inclusive():
    ring = FrameRing(10)
    for i in range(10):
        ring.push(frame(i * 0.1, i))
    assert [f.sequence for f in ring.window(0.2, 0.4)] == [2, 3, 4]


def test_wait_until_returns_when_a_later_frame_arrives():
    ring = FrameRing(4)
    now = time.monotonic()
    pusher = threading.Timer(0.05, lambda: ring.push(frame(now + 1.0)))
    pusher.start()
    assert ring.wait_until(now + 0.5, timeout=5.0)
    pusher.join()
    assert not ring.wait_until(now + 2.0, timeout=0.05)


def test_capacity_must_be_positive():
    with pytest.raises(ValueError, match="at least 1"):
        FrameRing(0)
