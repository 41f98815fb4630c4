"""The device fails safe and loud (issue 12): no half pair, no capture from a double press,
nothing stored and never announced, "storage full" that tells the truth on a real full
disk, and no thread that dies quietly."""

from __future__ import annotations

import errno
import json
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import cv2
import pytest

from device_agent.status import read_status, status_path
from sim.broker import free_port
from sim.device import SimDevice, sim_config

DEVICE = "sim-0001"


def stored(store: Path) -> set[str]:
    return {p.stem for p in (store / DEVICE).glob("*.jpg")}


def crash(state: Path, port: int, *args: str) -> subprocess.CompletedProcess[str]:
    """A simulated device in its own process, killed with SIGKILL where ``args`` aim."""
    result = subprocess.run([sys.executable, "-m", "sim.crash", "--state", str(state),
                             "--port", str(port), *args],
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == -signal.SIGKILL, result.stderr
    return result


# -- a pair is both images or neither ---------------------------------------------------


def test_a_pair_killed_between_its_two_writes_never_reaches_the_clinic(
        tmp_path, broker, gateway, store, events):
    state = tmp_path / "device"
    crash(state, broker.port, "--pair", "--kill-on-rename", "1")
    config = sim_config(state, broker.port)
    with SimDevice(config) as device:
        device.show(None, seed=5)
        after = device.press()
        assert after.verdict == "accept"
        assert device.uplink.wait_idle(timeout=60)
    # Only the capture pressed after the restart: nothing of the interrupted pair.
    assert stored(store) == {after.capture_id}
    assert events.named("outbox.partial_group_discarded")


def test_a_pair_killed_after_both_writes_arrives_whole_and_is_announced(
        tmp_path, broker, gateway, store, events):
    state = tmp_path / "device"
    crash(state, broker.port, "--pair", "--kill-on-rename", "2")
    with SimDevice(sim_config(state, broker.port)) as device:
        assert device.uplink.wait_idle(timeout=60)
    recovered = {r["capture_id"] for r in events.named("capture.accepted", recovered=True)}
    assert len(recovered) == 2
    assert stored(store) == recovered
    pair_ids = {json.loads((store / DEVICE / f"{c}.json").read_text())["pair"]["pair_id"]
                for c in recovered}
    assert len(pair_ids) == 1


# -- stored before a crash, announced after it -------------------------------------------


def test_a_capture_stored_but_not_yet_announced_is_announced_as_recovered(
        tmp_path, broker, gateway, store, events):
    state = tmp_path / "device"
    crash(state, broker.port, "--kill-on-rename", "1")
    with SimDevice(sim_config(state, broker.port)) as device:
        assert device.uplink.wait_idle(timeout=60)
        recovered = events.named("capture.accepted", recovered=True)
        assert len(recovered) == 1
        assert stored(store) == {recovered[0]["capture_id"]}
    # Announced once: a second restart says nothing more.
    with SimDevice(sim_config(state, broker.port)):
        pass
    assert len(events.named("capture.accepted", recovered=True)) == 1


# -- a double press is a mode change, never a capture -----------------------------------


def test_a_double_press_leaves_no_capture_at_the_clinic(tmp_path, broker, gateway, store,
                                                         events):
    config = sim_config(tmp_path / "device", broker.port)
    with SimDevice(config) as device:
        device.show(None)
        device.camera.shake()
        device.board.double_press()
        events.wait_for("illumination.changed", timeout=10)
        assert device.agent.session.mode == "non_polarised"
        withdrawn = events.wait_for("capture.withdrawn", timeout=10)
        assert withdrawn[0]["reason"] == "double_press"
        # A single press afterwards is a capture, delivered as ever.
        device.show(None, seed=3)
        single = device.press()
        assert single.verdict == "accept"
        assert device.uplink.wait_idle(timeout=30)
    assert stored(store) == {single.capture_id}
    accepted = {r["capture_id"] for r in events.named("capture.accepted")}
    assert accepted == {single.capture_id}


def test_a_single_press_is_announced_once_the_double_press_window_has_passed(tmp_path,
                                                                             events):
    config = sim_config(tmp_path / "device", free_port())
    with SimDevice(config, with_uplink=False) as device:
        device.show(None)
        outcome = device.press()
        assert outcome.verdict == "accept"
        # Stored at once (the clinician was told), delivered only after the window.
        assert [e.capture_id for e in device.outbox.pending()] == [outcome.capture_id]
        events.wait_for("capture.accepted", timeout=5, capture_id=outcome.capture_id)
        assert [e.capture_id for e in device.outbox.deliverable()] == [outcome.capture_id]


# -- storage full, on a real full file system --------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 6 MB file system (tmpfs), so the disk, not the quota, fills up."""
    mount = tmp_path / "small"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


def fill(disk: Path) -> Path:
    filler = disk / "filler"
    with filler.open("wb", buffering=0) as f:
        while True:
            try:
                f.write(b"\0" * 65536)
            except OSError as err:
                if err.errno != errno.ENOSPC:
                    raise
                return filler  # full: exactly what this is for


def test_storage_full_on_a_real_full_disk_clears_when_space_returns(small_disk, events):
    config = sim_config(small_disk / "state", free_port(), outbox={"quota_mb": 512})
    with SimDevice(config, with_uplink=False) as device:
        device.show(None)
        device.agent.publish_status()
        filler = fill(small_disk)
        refused = device.press()
        assert refused.verdict == "refused"
        assert refused.reasons == ("storage_full",)
        events.wait_for("feedback.standing", timeout=5, signal="storage_full")
        device.agent.publish_status()
        status = read_status(status_path(config.device.state_dir))
        # The status file could not be replaced, but it was rewritten in place: no stale "ready".
        assert status is not None
        assert status["storage_full"] is True
        assert status["signal"] == "storage_full"
        assert status["last_capture"]["verdict"] == "refused"
        ready_before = len(events.named("feedback.standing", signal="ready"))
        filler.unlink()
        events.wait_for("feedback.standing", timeout=5, signal="ready", count=ready_before + 1)
        device.show(None, seed=4)
        accepted = device.press()
        assert accepted.verdict == "accept"
        device.agent.publish_status()
        status = read_status(status_path(config.device.state_dir))
        assert status["storage_full"] is False
        assert status["signal"] == "ready"


# -- nothing dies quietly -----------------------------------------------------------------


def test_a_dead_thread_stops_the_agent_loudly_and_stops_the_watchdog(tmp_path, events,
                                                                     monkeypatch):
    config = sim_config(tmp_path / "device", free_port())
    pings: list[float] = []
    with SimDevice(config, with_uplink=False) as device:

        def broken(timeout: float):
            raise ZeroDivisionError("a bug in the camera backend")

        monkeypatch.setattr(device.camera, "next_frame", broken)
        crashed = events.wait_for("thread.crashed", timeout=10)
        assert crashed[0]["thread_name"] == "camera"
        assert "ZeroDivisionError" in crashed[0]["traceback"]
        events.wait_for("agent.unhealthy", timeout=5)
        assert device.agent.failed
        pings_at_death = len(pings)
        # The loop has ended: nothing pings the watchdog any more.
        device.agent.run(threading.Event(), tick=lambda: pings.append(1))
        assert len(pings) == pings_at_death


def test_a_command_that_fails_inside_the_agent_is_answered_and_the_device_goes_on(
        tmp_path, broker, gateway, store, events, monkeypatch):
    from clinic_gateway.commander import Commander

    def report_that_breaks(*args, **kwargs):
        cv2.resize(None, (0, 0))  # a real cv2.error, as odd frames can cause

    monkeypatch.setattr("device_agent.remote.render_report", report_that_breaks)
    config = sim_config(tmp_path / "device", broker.port)
    with SimDevice(config) as device:
        device.wait_online()
        commander = Commander(broker.host, broker.port)
        try:
            answer = commander.send(config.device.id, "self_test")
            assert answer["ok"] is False
            assert answer["error"]["code"] == "internal_error"
            assert "error" in answer["error"]["message"]
            assert events.named("command.failed")[0]["traceback"]
            assert commander.send(config.device.id, "status")["ok"] is True
        finally:
            commander.close()
        device.show(None)
        outcome = device.press()
        assert outcome.verdict == "accept"
        assert device.uplink.wait_idle(timeout=30)
    assert stored(store) == {outcome.capture_id}
