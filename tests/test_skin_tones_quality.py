"""The same judgement on every skin tone (issue 18)."""

from __future__ import annotations

import numpy as np
import pytest

from device_agent.camera.quality import assess, working_copy
from sim.scene import SceneSpec, render

TONES = (1, 2, 3, 4, 5, 6)


@pytest.mark.parametrize("tone", TONES)
def test_blur_at_the_limit_is_caught_on_every_tone(tone: int) -> None:
    for seed, hair in ((30 + tone, "none"), (40 + tone, "sparse"), (50 + tone, "dense")):
        report = assess(render(SceneSpec(seed=seed, tone=tone, hair=hair, defect="defocus")))
        assert report.primary_reason == "focus", (hair, report.to_dict())
        report = assess(render(SceneSpec(seed=seed, tone=tone, hair=hair, defect="motion")))
        assert report.primary_reason == "motion", (hair, report.to_dict())


@pytest.mark.parametrize("severity", [0.8, 1.0])
def test_focus_score_near_the_limit_does_not_depend_on_the_tone(severity: float) -> None:
    # The same scene and blur (sigma 3.2 and 4 px at 800 wide) on six tones: the focus score
    # moves less than the threshold's margin, so the same blur gets the same verdict.
    scores = [assess(render(SceneSpec(seed=12, tone=t, hair="none", defect="defocus",
                                      severity=severity))).scores["focus"] for t in TONES]
    assert max(scores) - min(scores) < 0.1, scores


def _red_clipped(img: np.ndarray) -> float:
    work, _ = working_copy(img)
    h, w = work.shape[:2]
    yy, xx = np.mgrid[0:h, 0:w]
    inside = np.hypot(xx - w / 2, yy - h / 2) < 0.4 * h
    return float((work[..., 2][inside] >= 250).mean())


@pytest.mark.parametrize("seed", [1, 2])
def test_fair_skin_under_a_bright_ring_is_not_overexposed(seed: int) -> None:
    # Red clipped over a third of the field, green and blue intact: diagnostically fine.
    img = render(SceneSpec(seed=seed, tone=1, hair="none", exposure=1.2))
    assert _red_clipped(img) > 0.35
    report = assess(img)
    assert report.verdict == "accept", report.to_dict()


@pytest.mark.parametrize("tone", TONES)
def test_overexposure_is_caught_on_every_tone(tone: int) -> None:
    report = assess(render(SceneSpec(seed=60 + tone, tone=tone, hair="sparse",
                                     defect="overexposed")))
    assert report.primary_reason == "overexposed", report.to_dict()


@pytest.mark.parametrize("tone", [5, 6])
def test_dark_skin_is_not_underexposed(tone: int) -> None:
    for seed in (70, 71, 72):
        report = assess(render(SceneSpec(seed=seed, tone=tone, hair="dense", bubbles=True)))
        assert report.verdict == "accept", report.to_dict()
