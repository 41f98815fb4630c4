"""Quality checks on simulator ground truth and on real photographs in a lens field."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from device_agent.camera.lens import find_lens_field
from device_agent.camera.quality import (
    CHECK_NAMES,
    ImageError,
    QualityReport,
    Thresholds,
    assess,
    load_image,
)
from sim.scene import DEFECTS, SceneSpec, expected_reasons, photo_frame, render

DATA = Path(__file__).parent / "data"
SEEDS = (1, 2, 3, 4, 5, 6)  # covers all six skin tones' neighbourhood and lesion/no lesion


def _report(spec: SceneSpec) -> QualityReport:
    return assess(render(spec))


@pytest.mark.parametrize("seed", SEEDS)
def test_pristine_frames_are_accepted(seed: int) -> None:
    report = _report(SceneSpec(seed=seed))
    assert report.verdict == "accept", report.to_dict()
    assert report.reasons == []


@pytest.mark.parametrize("defect", DEFECTS)
@pytest.mark.parametrize("seed", [1, 4])
def test_each_defect_trips_exactly_its_checks(defect: str, seed: int) -> None:
    report = _report(SceneSpec(seed=seed, defect=defect))
    assert report.verdict == "retake"
    assert set(report.reasons) == expected_reasons(defect), report.to_dict()


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_focus_score_falls_monotonically_with_blur(seed: int) -> None:
    severities = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0)
    scores = [
        _report(SceneSpec(seed=seed, defect="defocus", severity=s)).scores["focus"]
        for s in severities
    ]
    assert all(a > b for a, b in itertools.pairwise(scores)), scores


def test_motion_is_told_apart_from_defocus() -> None:
    for seed in (2, 5):
        defocus = _report(SceneSpec(seed=seed, defect="defocus"))
        motion = _report(SceneSpec(seed=seed, defect="motion"))
        assert "focus" in defocus.reasons
        assert "motion" not in defocus.reasons
        assert "motion" in motion.reasons
        assert "focus" not in motion.reasons
        assert motion.scores["motion"] > 2 * defocus.scores["motion"]


def test_assess_is_deterministic() -> None:
    img = render(SceneSpec(seed=7, defect="glare"))
    assert assess(img).to_dict() == assess(img.copy()).to_dict()


def test_same_verdict_at_12_megapixels() -> None:
    small = _report(SceneSpec(seed=3))
    big = _report(SceneSpec(seed=3, width=4056, height=3040))
    assert big.verdict == small.verdict == "accept"
    assert big.field is not None
    assert small.field is not None
    assert big.field.radius == pytest.approx(small.field.radius * 4, rel=0.03)
    blurred = _report(SceneSpec(seed=3, width=4056, height=3040, defect="defocus"))
    assert blurred.reasons == ["focus"]


def test_report_shape_and_json() -> None:
    report = _report(SceneSpec(seed=2, defect="underexposed"))
    data = report.to_dict()
    json.dumps(data)  # JSON-able
    assert set(data) >= {"verdict", "reasons", "scores", "thresholds", "field"}
    assert list(data["scores"]) == list(CHECK_NAMES)
    assert data["verdict"] == "retake"
    assert data["reasons"] == ["underexposed"]
    assert [c.name for c in report.checks] == list(CHECK_NAMES)


def test_reasons_put_the_cause_first() -> None:
    # Severe overexposure and an off-centre field at once list both, the exposure first: it is
    # what every other check sees through.
    img = render(SceneSpec(seed=1, defect="off_centre"))
    img = cv2.convertScaleAbs(img, alpha=3.5)
    report = assess(img)
    assert report.reasons[0] == "overexposed"
    assert "field" in report.reasons
    assert report.to_dict()["primary_reason"] == "overexposed"
    assert sorted(report.reasons) == sorted(set(report.reasons))


def test_thresholds_are_applied() -> None:
    img = render(SceneSpec(seed=2))
    strict = Thresholds(focus=100.0, underexposed=250.0)
    report = assess(img, strict)
    # Cause first: a dark frame explains a soft one, not the other way round.
    assert report.reasons == ["underexposed", "focus"]
    assert report.primary_reason == "underexposed"
    assert report.thresholds["focus"] == 100.0
    with pytest.raises(TypeError, match="focus"):
        Thresholds(focus="sharp")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="glare"):
        Thresholds(glare=float("nan"))


def test_black_frame_is_underexposed_not_a_field_fault() -> None:
    # All black: the lens may be fine and the exposure not; the field cannot be judged.
    black = np.full((600, 800, 3), 3, np.uint8)
    assert find_lens_field(black) is None
    report = assess(black)
    assert report.field is None
    assert report.reasons == ["underexposed"]
    assert "field" in report.to_dict()["not_judged"]


def test_small_lit_spot_is_no_field() -> None:
    frame = np.full((600, 800, 3), 2, np.uint8)
    spot = render(SceneSpec(seed=2, width=200, height=150))
    frame[225:375, 300:500] = spot
    report = assess(frame)
    assert "field" in report.reasons
    assert report.scores["field"] < 0.5


def test_lens_field_is_found_through_a_cut() -> None:
    spec = SceneSpec(seed=4, defect="off_centre")
    field = find_lens_field(render(spec))
    pristine = find_lens_field(render(SceneSpec(seed=4)))
    assert field is not None
    assert pristine is not None
    # The radius is recovered although the frame edge cuts the circle.
    assert field.radius == pytest.approx(pristine.radius, rel=0.05)
    assert field.offset > 0.3
    assert pristine.offset < 0.1


# --------------------------------------------------------------------------------------------
# Real photographs placed in a simulated lens field


def _photo(name: str) -> np.ndarray:
    return load_image(DATA / name)


@pytest.mark.parametrize("seed", [1, 2])
def test_real_photograph_pristine_is_accepted(seed: int) -> None:
    frame = photo_frame(_photo("astronaut.jpg"), SceneSpec(seed=seed, width=640, height=480))
    report = assess(frame)
    assert report.verdict == "accept", report.to_dict()


@pytest.mark.parametrize(
    "defect", ["defocus", "motion", "underexposed", "overexposed", "glare", "off_centre", "lifted"]
)
def test_real_photograph_defects(defect: str) -> None:
    spec = SceneSpec(seed=2, width=640, height=480, defect=defect)
    report = assess(photo_frame(_photo("astronaut.jpg"), spec))
    assert set(report.reasons) >= expected_reasons(defect), report.to_dict()


def test_real_photograph_colour_cast() -> None:
    spec = SceneSpec(seed=2, width=640, height=480, defect="colour_cast")
    report = assess(photo_frame(_photo("astronaut.jpg"), spec))
    assert report.reasons == ["colour"]


def test_real_photograph_focus_monotonic() -> None:
    photo = _photo("astronaut.jpg")
    scores = []
    for sigma in (0.0, 1.0, 2.0, 3.0, 4.0, 6.0):
        blurred = cv2.GaussianBlur(photo, (0, 0), sigma) if sigma else photo
        frame = photo_frame(blurred, SceneSpec(seed=1, width=640, height=480))
        scores.append(assess(frame).scores["focus"])
    assert all(a > b for a, b in itertools.pairwise(scores)), scores


def test_second_photograph_sharp_vs_blurred() -> None:
    photo = _photo("chelsea.jpg")
    sharp = assess(photo_frame(photo, SceneSpec(seed=3, width=400, height=300)))
    blurred = assess(photo_frame(photo, SceneSpec(seed=3, width=400, height=300, defect="defocus")))
    assert sharp.verdict == "accept", sharp.to_dict()
    assert "focus" in blurred.reasons


def test_plain_photograph_without_lens_surround() -> None:
    # An ordinary photograph (no black surround) is judged over the whole frame, and its
    # field reads as complete.
    report = assess(_photo("astronaut.jpg"))
    assert report.scores["field"] > 0.9
    assert "field" not in report.reasons


# --------------------------------------------------------------------------------------------
# Loading images


def test_load_image_round_trip(tmp_path: Path) -> None:
    img = render(SceneSpec(seed=1, width=320, height=240))
    path = tmp_path / "frame.png"
    cv2.imwrite(str(path), img)
    loaded = load_image(path)
    assert loaded.shape == (240, 320, 3)
    assert np.array_equal(loaded, img)


def test_load_image_gray_and_alpha(tmp_path: Path) -> None:
    gray = np.full((40, 50), 128, np.uint8)
    cv2.imwrite(str(tmp_path / "g.png"), gray)
    assert load_image(tmp_path / "g.png").shape == (40, 50, 3)
    rgba = np.full((40, 50, 4), 200, np.uint8)
    cv2.imwrite(str(tmp_path / "a.png"), rgba)
    assert load_image(tmp_path / "a.png").shape == (40, 50, 3)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.jpg", b"", "empty file"),
        ("junk.png", b"this is not an image at all", "not a readable image"),
        ("truncated.png", b"\x89PNG\r\n\x1a\n\x00\x00", "not a readable image"),
    ],
)
def test_unreadable_images_raise(tmp_path: Path, name: str, content: bytes, message: str) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ImageError, match=message) as info:
        load_image(path)
    assert name in str(info.value)


def test_missing_file_and_directory_raise(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="no such file") as info:
        load_image(tmp_path / "nope.jpg")
    assert "nope.jpg" in str(info.value)
    with pytest.raises(ImageError, match="not a regular file"):
        load_image(tmp_path)


def test_tiny_image_raises(tmp_path: Path) -> None:
    cv2.imwrite(str(tmp_path / "tiny.png"), np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(ImageError, match="dimensions"):
        load_image(tmp_path / "tiny.png")


# --------------------------------------------------------------------------------------------
# The evaluation tool


def test_evaluation_runs_and_reports(capsys: pytest.CaptureFixture[str]) -> None:
    from bench.evaluate import main

    assert (
        main(
            [
                "--seeds",
                "1",
                "--width",
                "506",
                "--height",
                "380",
                "--no-photos",
                "--workers",
                "1",
                "--group-seeds",
                "0",
                "--json",
            ]
        )
        == 0
    )
    result = json.loads(capsys.readouterr().out)
    assert "groups" not in result
    sim = result["sim"]
    assert set(sim["per_check"]) == set(CHECK_NAMES)
    assert sim["pristine_frames"] == 2
    assert sim["false_retake_rate"] == 0.0
    assert sim["per_defect"]["defocus"]["1.0"]["recall"] == 1.0
    assert result["thresholds"] == Thresholds().as_dict()


def test_evaluation_reports_every_group(capsys: pytest.CaptureFixture[str]) -> None:
    from bench.evaluate import main

    args = ["--groups-only", "--group-seeds", "6", "--width", "506", "--height", "380",
            "--workers", "1"]
    assert main(args) == 0
    out = capsys.readouterr().out
    result = json.loads(out.strip().splitlines()[-1])
    groups = result["groups"]
    assert set(groups) == {"all:all", *(f"tone:{t}" for t in ("I", "II", "III", "IV", "V", "VI")),
                           "hair:none", "hair:sparse", "hair:dense",
                           "bubbles:no bubbles", "bubbles:bubbles",
                           "renderer:strands hair, gaussian defocus"}
    assert groups["all:all"]["pristine"] == 18  # every seed, every hair density
    assert groups["tone:IV"]["single_defect_frames"] == 9  # 8 defects + sigma 8
    assert set(groups["all:all"]["recall"]) == set(DEFECTS)
    assert result["set"]["group_seeds"] == {"first": 1000, "count": 6, "held_out": True}
    assert "| type VI |" in out  # the markdown table
