"""A whole simulated device in one process: board, camera, outbox, uplink and agent.

The same code paths as ``device-agent run`` on a Pi, with the simulator's camera and
gpiozero's MockFactory in place of the hardware. The demo, the tests and the fault runs
drive it by pressing its button.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from types import TracebackType

from device_agent import __version__
from device_agent.agent import Agent, CaptureOutcome
from device_agent.config import Config, parse_config
from device_agent.uplink.client import Uplink
from device_agent.uplink.outbox import Outbox
from sim.board import SimBoard
from sim.camera import open_backend


def sim_config(state_dir: Path, port: int, device_id: str = "sim-0001", **sections: dict) -> Config:
    """A simulator config: sim camera, mock pins, a loopback broker on ``port``, plain MQTT,
    unsealed captures and unsigned acks and commands (all declared as a developer's bench)
    unless ``sections`` says otherwise. A config with both keys
    (``security={"clinic_public_key": ..., "gateway_public_key": [...]}``) is no bench; with
    one of them, the other is not required (a clinic key alone seals and accepts unsigned
    acks; a gateway key alone demands signed acks and commands of an unsealed bench).

    ``sections`` overrides or adds config tables, e.g. ``uplink={"ack_timeout": 5}``.
    """
    data: dict = {
        "device": {"id": device_id, "state_dir": str(state_dir)},
        "camera": {"backend": "sim", "fps": 15},
        "pins": {"pin_factory": "mock"},
        "uplink": {"host": "127.0.0.1", "port": port, "ack_timeout": 10.0,
                   "retry_min": 0.2, "retry_max": 2.0, "heartbeat_interval": 5.0,
                   "insecure_dev_mode": True},
    }
    given = sections.get("security", {})
    if not (given.get("clinic_public_key") and given.get("gateway_public_key")):
        data["security"] = {"insecure_dev_mode": True}
    for name, values in sections.items():
        data[name] = {**data.get(name, {}), **values}
    return parse_config(data, "simulator")


class SimDevice:
    def __init__(self, config: Config, *, with_uplink: bool = True) -> None:
        self.config = config
        self.board = SimBoard(config.pins)
        # The camera the config describes, as `device-agent run` opens it (its [camera] and
        # [sim] settings: streams, format, start delay, render width).
        self.camera = open_backend(config.camera, config.sim)
        self.outbox = Outbox(config.outbox_dir, int(config.outbox.quota_mb * 1024 * 1024))
        self.uplink = (
            Uplink(config.uplink, config.device.id, self.outbox, __version__)
            if with_uplink else None
        )
        self.agent = Agent(config, self.camera, self.outbox, self.uplink,
                           pin_factory=self.board.factory)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self.agent.run, args=(self._stop,),
                                        name="agent", daemon=True)

    def start(self) -> SimDevice:
        if self.uplink is not None:
            self.uplink.start()
        self.agent.start()
        self._thread.start()
        # Let the ring fill with a window's worth of frames, as a device awake a moment would.
        cam = self.config.camera
        self.agent.ring.wait_until(self.agent.ring_started_at + cam.window_before,
                                   timeout=cam.frame_timeout + cam.window_before)
        return self

    def show(self, defect: str | None = None, severity: float = 1.0,
             seed: int | None = None) -> None:
        """Put a new scene under the lens and wait until the ring holds only its frames,
        as a clinician moving the lens to the next lesion would."""
        self.camera.set_scene(defect=defect, severity=severity, seed=seed)
        cam = self.config.camera
        window = cam.window_before + cam.window_after
        self.agent.ring.wait_until(time.monotonic() + window, timeout=cam.frame_timeout + window)

    def wait_online(self, timeout: float = 15.0) -> None:
        """Until the uplink is connected and subscribed (commands need that)."""
        if self.uplink is not None and not self.uplink.wait_online(timeout):
            raise TimeoutError(f"the device did not come online within {timeout} s")

    # -- a clinician's finger -------------------------------------------------------------
    def press(self, timeout: float = 10.0) -> CaptureOutcome | None:
        """Press the button once (with the hand shake a press causes) and wait for the verdict."""
        index = self.agent.outcome_count
        self.camera.shake()
        self.board.press()
        return self.agent.wait_outcome(index, timeout)

    def hold(self, timeout: float = 10.0) -> CaptureOutcome | None:
        index = self.agent.outcome_count
        self.board.hold(self.config.button.hold_time + 0.3)
        return self.agent.wait_outcome(index, timeout)

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._thread.join(timeout)
        self.agent.close(timeout)
        if self.uplink is not None:
            self.uplink.stop(timeout)
        self.board.close()

    def __enter__(self) -> SimDevice:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
