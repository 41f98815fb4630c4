"""The ``device-agent`` command as a technician or a script meets it."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import cv2

from sim.scene import SceneSpec, photo_frame, render

DATA = Path(__file__).parent / "data"


def agent(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "device_agent", *args], capture_output=True,
                          text=True, timeout=120, check=False)


def test_assess_json_follows_the_contract(tmp_path):
    # Inputs whose verdicts are known: simulator scenes and real photographs (tests/data) in
    # the lens field, pristine or with one defect, as PNG and as JPEG.
    astronaut = cv2.imread(str(DATA / "astronaut.jpg"))
    chelsea = cv2.imread(str(DATA / "chelsea.jpg"))
    cases = [
        ("scene.png", render(SceneSpec(seed=3)), "accept", []),
        ("scene-defocus.jpg", render(SceneSpec(seed=3, defect="defocus", severity=2.0)),
         "retake", ["focus"]),
        ("chelsea.jpg", photo_frame(chelsea, SceneSpec(seed=3, width=400, height=300)),
         "accept", []),
        ("astronaut-glare.png",
         photo_frame(astronaut, SceneSpec(seed=2, width=640, height=480, defect="glare")),
         "retake", ["glare"]),
        ("astronaut-cast.jpg",
         photo_frame(astronaut, SceneSpec(seed=2, width=640, height=480, defect="colour_cast")),
         "retake", ["colour"]),
    ]
    paths = []
    for name, image, _, _ in cases:
        paths.append(str(tmp_path / name))
        assert cv2.imwrite(paths[-1], image)
    result = agent("assess", *paths, "--json")
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["path"] for r in records] == paths
    vocabulary = ["focus", "motion", "underexposed", "overexposed", "glare", "field", "colour"]
    for record, (name, _, verdict, reasons) in zip(records, cases, strict=True):
        assert set(record) >= {"path", "verdict", "reasons", "scores"}
        assert (record["verdict"], record["reasons"]) == (verdict, reasons), (name, record)
        assert sorted(record["scores"]) == sorted(vocabulary)
        assert all(isinstance(v, float | int) for v in record["scores"].values())


def test_assess_unreadable_input_exits_2_and_still_assesses_the_rest(tmp_path):
    good = tmp_path / "good.png"
    cv2.imwrite(str(good), render(SceneSpec(seed=4)))
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"not an image at all")
    result = agent("assess", str(junk), str(tmp_path / "missing.png"), str(good), "--json")
    assert result.returncode == 2
    assert "junk.jpg" in result.stderr
    assert "missing.png" in result.stderr
    (record,) = [json.loads(line) for line in result.stdout.splitlines()]
    assert (record["path"], record["verdict"], record["reasons"]) == (str(good), "accept", [])


def test_bad_config_names_the_field_and_exits_2(tmp_path):
    config = tmp_path / "config.toml"
    config.write_text('[device]\nid = "d1"\n[camera]\nfps = -3\n')
    result = agent("run", "--config", str(config))
    assert result.returncode == 2
    assert "camera.fps" in result.stderr
    assert "Traceback" not in result.stderr


def test_demo_runs_end_to_end(tmp_path):
    out = tmp_path / "demo"
    # The demo's first four scenes (sim/demo.py's PLAN): good, defocus, good, glare.
    result = agent("demo", "--out", str(out), "--captures", "4")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "every accepted capture was stored and verified" in result.stdout
    events = [json.loads(line) for f in sorted(out.glob("*.jsonl"))
              for line in f.read_text().splitlines()]
    accepted = {e["capture_id"] for e in events if e["event"] == "capture.accepted"}
    rejected = [e for e in events if e["event"] == "capture.rejected"]
    stored = {e["capture_id"]: e for e in events if e["event"] == "capture.stored"}
    assert len(accepted) == 2
    assert [e["reasons"] for e in rejected] == [["focus"], ["glare"]]
    assert accepted == set(stored)
    for event in stored.values():
        image = out / event["path"]  # absolute, or relative to the demo's DIR
        assert hashlib.sha256(image.read_bytes()).hexdigest() == event["sha256"]
        assert list(out.rglob(f"{event['capture_id']}.dcm"))
