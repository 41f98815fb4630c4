from pathlib import Path

import pytest

from device_agent.config import ConfigError, load_config, parse_config

EXAMPLE = Path(__file__).parent.parent / "examples" / "config.toml"


def test_the_shipped_example_config_is_valid():
    config = load_config(EXAMPLE)
    assert config.device.id
    assert config.uplink.chunk_size <= 128 * 1024  # fits managed brokers' packet caps


def test_defaults_fill_everything_but_the_device_id_and_the_transport():
    config = parse_config({"device": {"id": "derm-0001"}, "uplink": {"insecure_dev_mode": True}})
    assert config.camera.backend == "sim"
    assert config.outbox_dir == Path("/var/lib/device-agent/outbox")


def test_plain_mqtt_must_be_declared_and_tls_must_be_whole():
    with pytest.raises(ConfigError, match="no TLS configured; run device-agent provision"):
        parse_config({"device": {"id": "d1"}})
    with pytest.raises(ConfigError, match="missing cert_file, key_file"):
        parse_config({"device": {"id": "d1"}, "uplink": {"ca_file": "/etc/ca.crt"}})
    tls = {"ca_file": "/a", "cert_file": "/b", "key_file": "/c"}
    assert parse_config({"device": {"id": "d1"}, "uplink": tls}).uplink.tls


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
