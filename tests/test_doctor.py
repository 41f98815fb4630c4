"""``device-agent doctor`` as a technician runs it."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
from pathlib import Path

from sim.broker import free_port
from sim.device import SimDevice, sim_config
from sim.pki import TestCA
from sim.secure_broker import SecureMosquitto


def write_config(tmp_path: Path, port: int, extra: str = "",
                 security: str = "insecure_dev_mode = true\n", backend: str = "sim") -> Path:
    """``extra`` goes in [uplink], ``security`` is the [security] table."""
    path = tmp_path / "config.toml"
    path.write_text(
        f'[device]\nid = "dev1"\nstate_dir = "{tmp_path / "state"}"\n'
        f'[camera]\nbackend = "{backend}"\n[pins]\npin_factory = "mock"\n'
        f'[security]\n{security}'
        f'[uplink]\nport = {port}\n{extra}'
    )
    return path


def doctor(config: Path, *extra: str, env_path: Path | None = None) -> tuple[int, dict]:
    env = None
    if env_path is not None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(env_path), *sys.path])}
    result = subprocess.run([sys.executable, "-m", "device_agent", "doctor", "--config",
                             str(config), "--json", *extra], capture_output=True, text=True,
                            timeout=120, check=False, env=env)
    report = json.loads(result.stdout)
    return result.returncode, {c["name"]: c for c in report["checks"]} | {
        "fit": report["fit_for_clinical_use"]}


def test_a_bench_device_is_never_fit_for_clinical_use(tmp_path, broker):
    config = write_config(tmp_path, broker.port, "insecure_dev_mode = true\n")
    code, checks = doctor(config)
    assert code == 1
    assert not checks["fit"]
    # The simulator's frames and unsealed captures: each alone makes it unfit.
    assert checks["backend"]["level"] == "fail"
    assert checks["backend"]["detail"] == "simulated camera: not fit for clinical use"
    assert checks["sealing"]["level"] == "fail"
    assert checks["sealing"]["detail"].startswith("captures unsealed")
    assert "not fit for clinical use" in checks["sealing"]["detail"]
    failed = {name for name, c in checks.items() if name != "fit" and c["level"] == "fail"}
    assert failed == {"backend", "sealing"}
    assert checks["camera"]["level"] == "ok"
    assert "opened directly" in checks["camera"]["detail"]
    assert checks["leds"]["level"] == "ok"
    assert checks["button"]["level"] == "ok"
    assert checks["broker"]["level"] == "ok"
    assert checks["tls"]["level"] == "warn"
    assert "development only" in checks["tls"]["detail"]


def test_a_sealed_device_on_the_real_camera_has_neither_bench_failure(tmp_path, broker):
    from dermascope_wire import signing
    from dermascope_wire.seal import generate_keypair, public_key_pem

    key = tmp_path / "clinic-seal.pub.pem"
    key.write_bytes(public_key_pem(generate_keypair()[1]))
    gateway_key = tmp_path / "gateway-sign.pub.pem"
    gateway_key.write_bytes(signing.public_key_pem(signing.generate_key().public_key()))
    stubs = tmp_path / "stubs" / "picamera2"  # picamera2 absent, as on any machine but a Pi
    stubs.mkdir(parents=True)
    (stubs / "__init__.py").write_text("raise ImportError('not on a Pi')\n")
    config = write_config(tmp_path, broker.port, "insecure_dev_mode = true\n",
                          security=f'clinic_public_key = "{key}"\n'
                                   f'gateway_public_key = "{gateway_key}"\n',
                          backend="picamera2")
    code, checks = doctor(config, env_path=stubs.parent)
    assert "backend" not in checks
    assert checks["sealing"]["level"] == "ok"
    assert checks["camera"]["level"] == "fail"
    assert "picamera2 is not installed" in checks["camera"]["detail"]
    assert code == 1


def test_an_unreachable_broker_makes_it_unfit(tmp_path):
    config = write_config(tmp_path, free_port(), "insecure_dev_mode = true\n")
    code, checks = doctor(config)
    assert code == 1
    assert not checks["fit"]
    assert checks["broker"]["level"] == "fail"
    assert "unreachable" in checks["broker"]["detail"]
    assert checks["broker"]["action"]


def test_an_unprovisioned_device_fails_at_the_config(tmp_path):
    code, checks = doctor(write_config(tmp_path, free_port(), security=""))
    assert code == 1
    assert checks["config"]["level"] == "fail"
    assert "run device-agent provision" in checks["config"]["detail"]


def test_a_bad_config_is_the_one_failing_line(tmp_path):
    config = tmp_path / "config.toml"
    config.write_text('[device]\nid = "dev1"\n[outbox]\nquota_mb = -1\n')
    code, checks = doctor(config)
    assert code == 1
    assert checks["config"]["level"] == "fail"
    assert "outbox.quota_mb" in checks["config"]["detail"]
    assert set(checks) == {"config", "fit"}


def test_an_unusable_state_dir_and_a_missing_gpio_library_are_fail_lines(tmp_path):
    stubs = tmp_path / "stubs" / "lgpio"  # lgpio absent, as on any machine but a Pi
    stubs.mkdir(parents=True)
    (stubs / "__init__.py").write_text("raise ImportError('not on a Pi')\n")
    config = write_config(tmp_path, free_port(), "insecure_dev_mode = true\n")
    (tmp_path / "state").write_text("a file where the state folder should be")
    config.write_text(config.read_text().replace('pin_factory = "mock"', 'pin_factory = "lgpio"'))
    code, checks = doctor(config, "--no-broker", env_path=stubs.parent)
    assert code == 1
    assert checks["disk"]["level"] == "fail"
    assert "device.state_dir: " in checks["disk"]["detail"]
    assert "is not a directory" in checks["disk"]["detail"]
    assert checks["leds"]["level"] == "fail"
    assert 'pins.pin_factory = "lgpio": no usable GPIO library' in checks["leds"]["detail"]
    assert checks["button"]["level"] == "fail"


def test_a_provisioned_device_passes_tls_and_broker_and_an_expired_one_fails(tmp_path):
    ca = TestCA(tmp_path / "ca")
    good = ca.issue("dev1")
    expired = ca.issue("dev1-old", valid_from=dt.datetime.now(dt.UTC) - dt.timedelta(days=50),
                       days=30)
    with SecureMosquitto(tmp_path / "broker", ca) as broker:
        tls = (f'ca_file = "{ca.cert_path}"\ncert_file = "{good.cert}"\n'
               f'key_file = "{good.key}"\nhost = "localhost"\n')
        code, checks = doctor(write_config(tmp_path, broker.port, tls))
        assert checks["tls"]["level"] == "ok", checks["tls"]
        assert checks["broker"]["level"] == "ok", checks["broker"]

        old = tls.replace(str(good.cert), str(expired.cert)).replace(str(good.key),
                                                                     str(expired.key))
        code, checks = doctor(write_config(tmp_path, broker.port, old))
        assert code == 1
        assert checks["tls"]["level"] == "fail"
        assert "expired" in checks["tls"]["detail"]
        assert checks["broker"]["level"] == "fail"


def test_while_the_agent_runs_doctor_reads_its_live_status(tmp_path, broker):
    config = write_config(tmp_path, broker.port, "insecure_dev_mode = true\n")
    with SimDevice(sim_config(tmp_path / "state", broker.port, "dev1",
                              uplink={"insecure_dev_mode": True})) as device:
        device.agent.publish_status()
        code, checks = doctor(config)
    assert checks["service"]["level"] == "ok"
    assert "running agent" in checks["camera"]["detail"]
    assert "in use by the running agent" in checks["leds"]["detail"]
    assert checks["outbox"]["level"] == "ok"
    assert code == 1  # a bench device: the simulated camera and unsealed captures


def test_the_person_readable_output(tmp_path, broker):
    config = write_config(tmp_path, broker.port, "insecure_dev_mode = true\n")
    result = subprocess.run([sys.executable, "-m", "device_agent", "doctor", "--config",
                             str(config)], capture_output=True, text=True, timeout=120,
                            check=False)
    lines = result.stdout.splitlines()
    assert any(line.startswith("ok    camera") for line in lines)
    assert any(line.startswith("WARN  tls") and "->" in line for line in lines)
    assert any(line.startswith("FAIL  backend      simulated camera: not fit for clinical use")
               for line in lines)
    assert lines[-1] == "NOT fit for clinical use: fix the FAIL lines"
    assert result.returncode == 1


def test_self_test_picture_and_calibration_state(tmp_path, broker):
    import cv2

    config = write_config(tmp_path, broker.port, "insecure_dev_mode = true\n")
    picture = tmp_path / "selftest.png"
    _, checks = doctor(config, "--report", str(picture))
    assert checks["report"]["level"] == "ok"
    assert cv2.imread(str(picture)).shape[:2] == (860, 1400)
    assert checks["calibration"]["level"] == "warn"
    assert "never calibrated" in checks["calibration"]["detail"]

    from device_agent.calibrate import run_calibration
    from device_agent.config import load_config
    from sim.targets import Response, render_chart, render_white

    r = Response()
    for mode in ("polarised", "non_polarised"):
        run_calibration(load_config(config), mode, render_white(r), render_chart(r))
    _code, checks = doctor(config)
    assert checks["calibration"]["level"] == "ok", checks["calibration"]
    assert "0 days old" in checks["calibration"]["detail"]
