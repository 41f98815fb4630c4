"""The MQTT library's own log lines are JSON events too: every line of the agent's log has an
``event`` name (DESIGN.md section 10), also those paho writes when its loop outlives the
connection (it did in about one demo run in five, failing the demo's log check)."""

from __future__ import annotations

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode

from device_agent.uplink.client import paho_log


def test_paho_log_records_carry_an_event_name(events):
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="never-connected")
    client.enable_logger(paho_log)
    # The same call paho's network thread makes once the connection is gone.
    assert client.loop(timeout=0.01) == MQTTErrorCode.MQTT_ERR_NO_CONN
    (record,) = events.named("uplink.mqtt_log")
    assert "Client is not connected" in record["msg"]
