"""The ``device-agent`` command as a technician or a script meets it."""

from __future__ import annotations

import json
import subprocess
import sys

import cv2

from sim.scene import SceneSpec, render


def agent(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "device_agent", *args], capture_output=True,
                          text=True, timeout=120, check=False)


def test_assess_json_follows_the_contract(tmp_path):
    good = tmp_path / "good.png"
    blurred = tmp_path / "blurred.jpg"
    cv2.imwrite(str(good), render(SceneSpec(seed=3)))
    cv2.imwrite(str(blurred), render(SceneSpec(seed=3, defect="defocus", severity=2.0)))
    result = agent("assess", str(good), str(blurred), "--json")
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["path"] for r in records] == [str(good), str(blurred)]
    vocabulary = {"focus", "motion", "underexposed", "overexposed", "glare", "field", "colour"}
    for record in records:
        assert set(record) >= {"path", "verdict", "reasons", "scores"}
        assert record["verdict"] in {"accept", "retake"}
        assert set(record["reasons"]) <= vocabulary
        assert set(record["scores"]) == vocabulary
        assert all(isinstance(v, float | int) for v in record["scores"].values())
    assert records[0]["verdict"] == "accept"
    assert records[1]["verdict"] == "retake"
    assert "focus" in records[1]["reasons"]


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
    assert record["path"] == str(good)


def test_bad_config_names_the_field_and_exits_2(tmp_path):
    config = tmp_path / "config.toml"
    config.write_text('[device]\nid = "d1"\n[camera]\nfps = -3\n')
    result = agent("run", "--config", str(config))
    assert result.returncode == 2
    assert "camera.fps" in result.stderr
    assert "Traceback" not in result.stderr


def test_demo_runs_end_to_end(tmp_path):
    out = tmp_path / "demo"
    result = agent("demo", "--out", str(out), "--captures", "4")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "every accepted capture was stored and verified" in result.stdout
    events = [json.loads(line) for f in out.glob("*.jsonl") for line in f.read_text().splitlines()]
    accepted = {e["capture_id"] for e in events if e["event"] == "capture.accepted"}
    rejected = [e for e in events if e["event"] == "capture.rejected"]
    stored = {e["capture_id"]: e for e in events if e["event"] == "capture.stored"}
    assert accepted
    assert rejected
    assert all(e["reasons"] for e in rejected)
    assert accepted == set(stored)
    for event in stored.values():
        assert set(event) >= {"capture_id", "path", "sha256"}
