import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from dermascope_wire import signing
from dermascope_wire.seal import generate_keypair, public_key_pem
from device_agent.camera.backends import open_camera
from device_agent.config import (
    CameraConfig,
    ConfigError,
    SimConfig,
    check_tls_files,
    ensure_state_dir,
    load_config,
    parse_config,
)
from sim.pki import TestCA

EXAMPLE = Path(__file__).parent.parent / "examples" / "config.toml"
BENCH = {"uplink": {"insecure_dev_mode": True}, "security": {"insecure_dev_mode": True}}


def bench(**sections: dict) -> dict:
    """A developer's bench config (plain MQTT, unsealed) with ``sections`` merged in."""
    data = {"device": {"id": "d1"}, **{k: dict(v) for k, v in BENCH.items()}}
    for name, values in sections.items():
        data[name] = {**data.get(name, {}), **values}
    return data


@pytest.fixture
def clinic_key(tmp_path) -> Path:
    path = tmp_path / "clinic-seal.pub.pem"
    path.write_bytes(public_key_pem(generate_keypair()[1]))
    return path


@pytest.fixture
def gateway_key(tmp_path) -> Path:
    path = tmp_path / "gateway-sign.pub.pem"
    path.write_bytes(signing.public_key_pem(signing.generate_key().public_key()))
    return path


def test_the_shipped_example_config_is_valid(tmp_path, clinic_key, gateway_key):
    # It names the keys where provisioning installs them; here, real keys stand in.
    text = (EXAMPLE.read_text()
            .replace("/etc/device-agent/clinic-seal.pub.pem", str(clinic_key))
            .replace("/etc/device-agent/gateway-sign-0123456789abcdef.pub.pem",
                     str(gateway_key)))
    (tmp_path / "config.toml").write_text(text)
    config = load_config(tmp_path / "config.toml")
    assert config.device.id
    assert config.uplink.chunk_size <= 128 * 1024  # fits managed brokers' packet caps
    assert config.camera.backend == "picamera2"
    assert not config.security.insecure_dev_mode


def test_defaults_fill_everything_but_the_device_id_the_transport_and_the_seal():
    config = parse_config(bench(device={"id": "derm-0001"}))
    assert config.outbox_dir == Path("/var/lib/device-agent/outbox")


def test_the_default_camera_is_the_real_one_never_the_simulator():
    assert parse_config(bench()).camera.backend == "picamera2"
    assert parse_config(bench(camera={"backend": "sim"})).camera.backend == "sim"


def test_picamera2_missing_is_a_config_error_naming_the_field(monkeypatch):
    monkeypatch.setitem(sys.modules, "picamera2", None)  # as on any machine but a Pi
    with pytest.raises(ConfigError, match=r'camera.backend = "picamera2": picamera2 is not '
                                          "installed"):
        open_camera(CameraConfig(backend="picamera2"), SimConfig())


def test_unsealed_captures_must_be_declared(clinic_key, gateway_key):
    with pytest.raises(ConfigError, match=r"^site.toml: security.clinic_public_key: no clinic "
                                          "key configured"):
        parse_config({"device": {"id": "d1"}, "uplink": {"insecure_dev_mode": True}},
                     "site.toml")
    assert parse_config(bench()).security.insecure_dev_mode
    keys = {"clinic_public_key": str(clinic_key), "gateway_public_key": str(gateway_key)}
    sealed = {"device": {"id": "d1"}, "uplink": {"insecure_dev_mode": True}, "security": keys}
    assert parse_config(sealed).security.clinic_public_key == clinic_key
    # A bench that seals but has no gateway key yet: allowed, as a bench.
    assert parse_config(bench(security={"clinic_public_key": str(clinic_key)})).security
    with pytest.raises(ConfigError, match=r"security.insecure_dev_mode = true contradicts "
                                          r"security.clinic_public_key and "
                                          r"security.gateway_public_key"):
        parse_config(bench(security=keys))


def _ec_public_pem() -> bytes:
    return ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (None, "cannot read key: No such file or directory"),
        ("directory", "cannot read key: Is a directory"),
        (b"not a key\n", "not a PEM public key"),
        ("ec", "the clinic key must be X25519, got"),
    ],
)
def test_a_bad_clinic_key_file_is_refused_at_load(tmp_path, content, expected):
    key = tmp_path / "clinic.pem"
    if content == "directory":
        key.mkdir()
    elif content == "ec":
        key.write_bytes(_ec_public_pem())
    elif content is not None:
        key.write_bytes(content)
    path = tmp_path / "c.toml"
    path.write_text(f'[device]\nid = "d1"\n[uplink]\ninsecure_dev_mode = true\n'
                    f'[security]\nclinic_public_key = "{key}"\n')
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert f"security.clinic_public_key: {key}: " in str(err.value)
    assert expected in str(err.value)


def test_two_functions_on_one_pin_name_both_fields():
    with pytest.raises(ConfigError, match=r"pins.status_led and pins.ring_plain both use "
                                          "GPIO 13"):
        parse_config(bench(pins={"status_led": 13}))
    with pytest.raises(ConfigError, match=r"pins.button and pins.ring_polarised both use GPIO 5"):
        parse_config(bench(pins={"button": 5, "ring_polarised": 5}))


def test_retry_min_above_retry_max_is_refused():
    with pytest.raises(ConfigError, match=r"uplink.retry_min \(90\) is greater than "
                                          r"uplink.retry_max \(60\)"):
        parse_config(bench(uplink={"retry_min": 90, "retry_max": 60}))
    assert parse_config(bench(uplink={"retry_min": 5, "retry_max": 5})).uplink.retry_max == 5


def test_a_press_window_longer_than_the_ring_is_refused():
    with pytest.raises(ConfigError, match=r"camera.window_before \+ camera.window_after "
                                          r"\(1.1 s\) exceed camera.ring_seconds \(1 s\)"):
        parse_config(bench(camera={"window_before": 1.0, "window_after": 0.1}))


def test_the_state_dir_is_created_and_must_be_a_writable_directory(tmp_path):
    made = ensure_state_dir(parse_config(bench(device={"state_dir": str(tmp_path / "a/b")})))
    assert made.is_dir()
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(ConfigError, match=rf"device.state_dir: {a_file} exists but is not a "
                                          "directory"):
        ensure_state_dir(parse_config(bench(device={"state_dir": str(a_file)})))
    with pytest.raises(ConfigError, match=r"device.state_dir: cannot create .*: Not a directory"):
        ensure_state_dir(parse_config(bench(device={"state_dir": str(a_file / "sub")})))


def test_tls_files_are_checked_before_the_service_connects(tmp_path):
    ca = TestCA(tmp_path / "ca")
    device = ca.issue("d1")
    other = ca.issue("d2")
    tls = {"ca_file": str(ca.cert_path), "cert_file": str(device.cert),
           "key_file": str(device.key)}
    check_tls_files(parse_config(bench(uplink=tls)))
    missing = {**tls, "cert_file": str(tmp_path / "none.crt")}
    with pytest.raises(ConfigError, match=r"uplink.cert_file: cannot read .*none.crt"):
        check_tls_files(parse_config(bench(uplink=missing)))
    not_pem = tmp_path / "junk.crt"
    not_pem.write_text("junk")
    with pytest.raises(ConfigError, match=r"uplink.ca_file: .*junk.crt is not a PEM"):
        check_tls_files(parse_config(bench(uplink={**tls, "ca_file": str(not_pem)})))
    with pytest.raises(ConfigError, match=r"uplink.cert_file, uplink.key_file"):
        check_tls_files(parse_config(bench(uplink={**tls, "key_file": str(other.key)})))
    locked = tmp_path / "locked.key"
    key = serialization.load_pem_private_key(device.key.read_bytes(), password=None)
    locked.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                         serialization.PrivateFormat.PKCS8,
                                         serialization.BestAvailableEncryption(b"secret")))
    with pytest.raises(ConfigError, match=r"uplink.cert_file, uplink.key_file"):
        check_tls_files(parse_config(bench(uplink={**tls, "key_file": str(locked)})))


def test_plain_mqtt_must_be_declared_and_tls_must_be_whole():
    unsealed = {"insecure_dev_mode": True}
    with pytest.raises(ConfigError, match="no TLS configured; run device-agent provision"):
        parse_config({"device": {"id": "d1"}, "security": unsealed})
    with pytest.raises(ConfigError, match="missing cert_file, key_file"):
        parse_config({"device": {"id": "d1"}, "uplink": {"ca_file": "/etc/ca.crt"},
                      "security": unsealed})
    tls = {"ca_file": "/a", "cert_file": "/b", "key_file": "/c"}
    assert parse_config({"device": {"id": "d1"}, "uplink": tls, "security": unsealed}).uplink.tls


@pytest.mark.parametrize(
    ("data", "names"),
    [
        ({}, "device: Field required"),
        ({"device": {"id": "bad id/with slash"}}, "device.id"),
        ({"device": {"id": "d1"}, "uplink": {"port": 70000}}, "uplink.port"),
        ({"device": {"id": "d1"}, "uplink": {"prot": 1}}, "uplink.prot: Extra inputs"),
        ({"device": {"id": "d1"}, "camera": {"backend": "webcam"}}, "camera.backend"),
        ({"device": {"id": "d1"}, "quality": {"focsu": 0.3}}, "unknown threshold(s) focsu"),
        ({"device": {"id": "d1"}, "illumination": {"brightness": 2}}, "illumination.brightness"),
    ],
)
def test_every_error_names_the_field(data, names):
    with pytest.raises(ConfigError) as err:
        parse_config(data, "site.toml")
    assert names in str(err.value)
    assert str(err.value).startswith("site.toml: ")


def test_bad_toml_and_missing_file_are_clear(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[device\nid = 1\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "missing.toml")


def test_the_error_shows_what_was_given(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[device]\nid = "d1"\n[uplink]\nport = "eighty"\n')
    with pytest.raises(ConfigError, match=r"uplink.port: .*\(got 'eighty'\)"):
        load_config(path)


def _config_file(tmp_path: Path, clinic_key: Path, case: str) -> Path:
    """A config that is fine but for ``case``; everything else a bench config."""
    device = f'state_dir = "{tmp_path / "state"}"'
    camera, pins, uplink = 'backend = "sim"', 'pin_factory = "mock"', ""
    security = "insecure_dev_mode = true"
    if case == "key missing":
        security = f'clinic_public_key = "{tmp_path / "absent.pem"}"'
    elif case == "key not PEM":
        (tmp_path / "junk.pem").write_text("junk")
        security = f'clinic_public_key = "{tmp_path / "junk.pem"}"'
    elif case == "no key":
        security = ""
    elif case == "pins":
        pins += "\nbutton = 12"
    elif case == "retry":
        uplink = "retry_min = 9\nretry_max = 3"
    elif case == "state_dir":
        (tmp_path / "afile").write_text("x")
        device = f'state_dir = "{tmp_path / "afile"}"'
    elif case == "picamera2":
        camera = 'backend = "picamera2"'
    elif case == "lgpio":
        pins = 'pin_factory = "lgpio"'
    elif case == "tls":
        uplink = "\n".join(f'{name} = "{tmp_path / name}"'
                           for name in ("ca_file", "cert_file", "key_file"))
    path = tmp_path / "config.toml"
    path.write_text(f'[device]\nid = "d1"\n{device}\n[camera]\n{camera}\n[pins]\n{pins}\n'
                    f'[uplink]\nport = 1\ninsecure_dev_mode = true\n{uplink}\n'
                    f'[security]\n{security}\n')
    return path


@pytest.fixture
def off_the_pi(tmp_path) -> dict[str, str]:
    """An environment where picamera2 and lgpio fail to import, as on any machine but a Pi
    (and whatever this machine has installed)."""
    stubs = tmp_path / "stubs"
    for name in ("picamera2", "lgpio"):
        (stubs / name).mkdir(parents=True)
        (stubs / name / "__init__.py").write_text(f"raise ImportError('no {name} here')\n")
    import os

    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(stubs), *sys.path])}


@pytest.mark.parametrize(
    ("case", "field"),
    [
        ("key missing", "security.clinic_public_key: "),
        ("key not PEM", "security.clinic_public_key: "),
        ("no key", "security.clinic_public_key: no clinic key configured"),
        ("pins", "pins.button and pins.ring_polarised both use GPIO 12"),
        ("retry", "uplink.retry_min (9) is greater than uplink.retry_max (3)"),
        ("state_dir", "device.state_dir: "),
        ("picamera2", 'camera.backend = "picamera2": picamera2 is not installed'),
        ("lgpio", 'pins.pin_factory = "lgpio": no usable GPIO library'),
        ("tls", "uplink.ca_file: cannot read "),
    ],
)
def test_run_refuses_a_bad_config_with_exit_2_and_the_field_named(tmp_path, clinic_key,
                                                                  off_the_pi, case, field):
    config = _config_file(tmp_path, clinic_key, case)
    result = subprocess.run([sys.executable, "-m", "device_agent", "run", "--config",
                             str(config)], capture_output=True, text=True, timeout=60,
                            stdin=subprocess.DEVNULL, env=off_the_pi, check=False)
    assert "Traceback" not in result.stderr
    assert result.returncode == 2, result.stderr
    assert "device-agent: config error: " in result.stderr
    assert field in result.stderr


def test_calibrate_and_status_refuse_a_bad_config_too(tmp_path, clinic_key, off_the_pi):
    config = _config_file(tmp_path, clinic_key, "state_dir")
    for command in ("calibrate", "status"):
        result = subprocess.run([sys.executable, "-m", "device_agent", command, "--config",
                                 str(config)], capture_output=True, text=True, timeout=60,
                                stdin=subprocess.DEVNULL, env=off_the_pi, check=False)
        assert "Traceback" not in result.stderr
        assert result.returncode == 2, (command, result.stderr)
        assert "device.state_dir: " in result.stderr


def test_immersion_media_is_one_the_dicom_standard_knows():
    with pytest.raises(ConfigError, match=r"illumination\.immersion_media"):
        parse_config(bench(illumination={"immersion_media": "GLYCERIN"}))
    config = parse_config(bench(illumination={"immersion_media": "WATER",
                                              "emitter_colour_temperature_k": 5600}))
    assert config.illumination.emitter_colour_temperature_k == 5600
