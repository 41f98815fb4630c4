"""Remote commands and the clinical session, on the simulated device (no broker needed:
the MQTT side of commands is tested with the uplink)."""

from __future__ import annotations

import json
import time

import pytest

from dermascope_wire.bundle import unpack
from device_agent.commands import execute, parse
from sim.device import SimDevice, sim_config


def cmd(name: str, request_id: str = "r1", **args) -> bytes:
    return json.dumps({"id": request_id, "command": name, "args": args}).encode()


@pytest.fixture
def device(tmp_path):
    with SimDevice(sim_config(tmp_path, 1), with_uplink=False) as device:
        device.show(None)
        yield device


def metadata_of(device, capture_id):
    return unpack(device.outbox.read(device.outbox.get(capture_id)))[0]


@pytest.mark.parametrize(
    ("payload", "code", "words"),
    [
        (b"{not json", "bad_json", "not a JSON object"),
        (b"[1, 2]", "bad_json", "not a JSON object"),
        (cmd("format_disk"), "unknown_command", "unknown command 'format_disk'"),
        (json.dumps({"command": "status", "extra": 1}).encode(), "bad_request", "extra"),
        (cmd("set_illumination", mode="uv"), "invalid_args", "set_illumination: mode"),
        (cmd("open_case"), "invalid_args", "case_token"),
        (cmd("open_case", case_token="case-1", colour="red"), "invalid_args", "colour"),
        (b" " * 20000, "too_large", "at most"),
    ],
)
def test_bad_commands_get_a_clear_error_answer(device, payload, code, words):
    answer = execute(payload, device.agent)
    assert answer["ok"] is False
    assert answer["error"]["code"] == code
    assert words in answer["error"]["message"]
    assert device.agent.status()["camera"]["streaming"]  # the agent carries on


def test_a_national_id_is_never_accepted_as_a_case_token(device):
    for token in ("010190-1234", "0101901234", "123456789012"):
        answer = execute(cmd("open_case", case_token=token), device.agent)
        assert answer["ok"] is False
        assert "national id" in answer["error"]["message"]
    assert device.agent.status()["case_open"] is False


def test_captures_carry_the_open_case_and_are_unassigned_after_close(device):
    answer = execute(cmd("open_case", case_token="TD-2026-000123",
                         anatomic_site="posterior torso"), device.agent)
    assert answer == {"id": "r1", "ok": True, "result": {"case_open": True,
                                                         "timeout_s": 4 * 3600.0}}
    inside = device.press()
    execute(cmd("close_case", "r2"), device.agent)
    device.show(None, seed=2)
    after = device.press()
    first, second = metadata_of(device, inside.capture_id), metadata_of(device, after.capture_id)
    assert first["case"] == {"token": "TD-2026-000123", "assigned": True}
    assert first["isic"]["anatom_site_general"] == "posterior torso"
    assert second["case"] == {"token": None, "assigned": False}


def test_an_open_case_times_out(device):
    execute(cmd("open_case", case_token="c-9", timeout_s=0.2), device.agent)
    assert device.agent.status()["case_open"] is True
    time.sleep(0.3)  # the case's own timeout is what is being tested
    assert device.agent.status()["case_open"] is False


def test_pair_mode_takes_both_lights_back_to_back_and_links_them(device):
    answer = execute(cmd("set_illumination", mode="pair", brightness=0.6), device.agent)
    assert answer["result"] == {"mode": "pair", "brightness": 0.6}
    outcome = device.press()
    assert outcome.verdict == "accept"
    assert len(outcome.linked) == 2
    pol, nonpol = (metadata_of(device, cid) for cid in outcome.linked)
    assert pol["dicom"]["LightSourcePolarization"] == "POLARIZED"
    assert nonpol["dicom"]["LightSourcePolarization"] == "NON_POLARIZED"
    assert pol["pair"]["pair_id"] == nonpol["pair"]["pair_id"]
    assert (pol["pair"]["index"], nonpol["pair"]["index"]) == (1, 2)
    # the ring lit the non-polarised channel for the second image, then went back
    board = device.board
    plain = [c.value for c in board.timeline(board.pins.ring_plain)]
    assert 0.6 in plain
    assert board.pin(board.pins.ring_plain).state == 0
    assert board.pin(board.pins.ring_polarised).state == pytest.approx(0.6)


def test_a_failed_half_makes_the_pair_a_retake_and_hold_keeps_both(device):
    execute(cmd("set_illumination", mode="pair"), device.agent)
    device.show("defocus", severity=2.0)
    retake = device.press()
    assert retake.verdict == "retake"
    assert "focus" in retake.reasons
    assert device.outbox.depth() == 0
    kept = device.hold()
    assert kept.verdict == "accept"
    assert kept.overridden
    assert set(kept.linked) == set(retake.linked)
    assert device.outbox.depth() == 2


def test_settings_change_thresholds_until_restart(device):
    answer = execute(cmd("set_settings", quality={"focus": 99.0}), device.agent)
    assert answer["ok"]
    assert answer["result"]["quality"] == {"focus": 99.0}
    assert device.press().reasons == ("focus",)
    bad = execute(cmd("set_settings", quality={"sharpness": 1.0}), device.agent)
    assert bad["ok"] is False
    assert "sharpness" in bad["error"]["message"]


def test_status_self_test_and_resend(device):
    assert execute(cmd("status"), device.agent)["result"]["camera"]["streaming"] is True
    test = execute(cmd("self_test"), device.agent)["result"]
    assert test["camera"] == "streaming"
    assert test["verdict"] == "accept"  # a good scene under the lens
    assert test["reasons"] == []
    # the self-test picture waits in the outbox (no uplink in this test)
    assert execute(cmd("resend_pending"), device.agent)["result"] == {"pending": 1}
    assert device.outbox.pending()[0].capture_id == test["report_capture_id"]


def test_double_press_cycles_the_illumination_mode(device, events):
    assert device.agent.session.mode == "polarised"
    device.board.double_press()
    events.wait_for("illumination.changed", timeout=5)  # handled on the agent's own thread
    assert device.agent.session.mode == "non_polarised"
    assert device.board.pin(device.board.pins.ring_plain).state > 0


def test_parse_returns_the_validated_arguments():
    request_id, name, args = parse(cmd("open_case", "x7", case_token="abc", timeout_s=60))
    assert (request_id, name, args.case_token, args.timeout_s) == ("x7", "open_case", "abc", 60)


def test_commands_over_mqtt_are_answered_on_the_response_topic(tmp_path, broker):
    from clinic_gateway.commander import Commander

    config = sim_config(tmp_path / "dev", broker.port)
    with SimDevice(config) as device:
        device.wait_online()
        commander = Commander(broker.host, broker.port)
        try:
            opened = commander.send(config.device.id, "open_case", case_token="TD-77")
            assert opened["ok"] is True
            assert device.agent.status()["case_open"] is True
            status = commander.send(config.device.id, "status")
            assert status["result"]["device_id"] == config.device.id
            bad = commander.send(config.device.id, "set_illumination", mode="ultraviolet")
            assert bad["ok"] is False
            assert bad["error"]["code"] == "invalid_args"
            garbage = commander.send_raw(config.device.id, b"\xff garbage")
            assert garbage["error"]["code"] == "bad_json"
            # the device is still up and answering
            assert commander.send(config.device.id, "close_case")["ok"] is True
        finally:
            commander.close()


# ------------------------------------------------------------------ signed commands (issue 13)


@pytest.fixture(scope="module")
def gateway_key():
    from dermascope_wire import signing

    return signing.generate_key()


def signed_device_config(tmp_path, port, key):
    from dermascope_wire import signing

    public = tmp_path / "gateway-sign.pub.pem"
    public.write_bytes(signing.public_key_pem(key.public_key()))
    # Unsealed (a bench), but with a gateway key: commands must be signed.
    return sim_config(tmp_path / "dev", port, security={"gateway_public_key": [str(public)]})


def test_only_signed_fresh_commands_for_this_device_run_over_mqtt(tmp_path, broker, events,
                                                                   gateway_key):
    from clinic_gateway.commander import Commander
    from dermascope_wire import signing

    config = signed_device_config(tmp_path, broker.port, gateway_key)
    device_id = config.device.id
    clinic = Commander(broker.host, broker.port, signing_key=gateway_key,
                       sequence_file=tmp_path / "clinic-seq.json")
    unsigned = Commander(broker.host, broker.port)
    rogue = Commander(broker.host, broker.port, signing_key=signing.generate_key())
    now = int(time.time())

    def signed(target: str = device_id, seq: int | None = None, expires: int | None = None,
               window: float = 5.0) -> bytes:
        request = {"id": "x1", "command": "set_settings", "args": {"override_window": window}}
        body = signing.command_body(target, clinic.next_sequence() if seq is None else seq,
                                    now + 300 if expires is None else expires, request)
        return signing.sign(body, gateway_key)

    try:
        with SimDevice(config) as device:
            device.wait_online()
            assert clinic.send(device_id, "set_settings", override_window=7.0)["ok"] is True
            assert device.agent.override_window == 7.0
            replay = signed(window=11.0)
            assert clinic.send_raw(device_id, replay)["ok"] is True
            assert device.agent.override_window == 11.0
            assert clinic.send(device_id, "set_settings", override_window=7.0)["ok"] is True
            tampered = json.loads(signed(window=3.0))
            tampered["body"] = signed(window=4.0).split(b'"body":"')[1].split(b'"')[0].decode()
            refusals = {
                "unauthenticated": [
                    unsigned.send(device_id, "set_settings", override_window=1.0),
                    rogue.send(device_id, "set_settings", override_window=1.0),
                    clinic.send_raw(device_id, json.dumps(tampered).encode()),
                ],
                "replayed": [replayed := clinic.send_raw(device_id, replay)],
                "expired": [clinic.send_raw(device_id, signed(expires=now - 5)),
                            clinic.send_raw(device_id, signed(expires=now + 3 * 86400))],
                "wrong_device": [clinic.send_raw(device_id, signed(target="sim-other"))],
            }
            for code, answers in refusals.items():
                for answer in answers:
                    assert answer["ok"] is False, answer
                    assert answer["error"]["code"] == code, answer
            assert device.agent.override_window == 7.0  # nothing refused changed anything
            assert replayed["id"] == "x1"  # a refusal still pairs with its request
            assert len(events.named("command.refused")) == 7
        # The sequence is durable: after a restart, the replay is still refused.
        with SimDevice(config) as device:
            device.wait_online()
            answer = clinic.send_raw(device_id, replay)
            assert answer["error"]["code"] == "replayed"
            assert device.agent.override_window != 11.0
            assert clinic.send(device_id, "status")["ok"] is True
    finally:
        for commander in (clinic, unsigned, rogue):
            commander.close()


def test_the_command_guard_refuses_a_damaged_sequence_file_rather_than_forget_it(
        tmp_path, gateway_key):
    from dermascope_wire import signing

    store = signing.SequenceStore(tmp_path / "command-sequence.json")
    guard = signing.CommandGuard(signing.Trust.of([gateway_key.public_key()]), "dev-1", store)
    request = {"id": "r", "command": "status", "args": {}}
    now = time.time()
    body = signing.command_body("dev-1", 5, int(now) + 60, request)
    assert guard.open(signing.sign(body, gateway_key), now) == (request, True)
    assert store.last() == 5
    store.path.write_text("{not json")
    later = signing.command_body("dev-1", 6, int(now) + 60, request)
    with pytest.raises(signing.CommandRefused, match="damaged") as err:
        guard.open(signing.sign(later, gateway_key), now)
    assert err.value.code == "internal_error"


def test_the_commanders_sequence_survives_a_restart_and_a_clock_stepped_back(tmp_path, broker,
                                                                            gateway_key):
    from clinic_gateway.commander import Commander

    sequence = tmp_path / "clinic-seq.json"
    future = (time.time_ns() // 1000) + 10**12  # as if written with a clock far ahead
    sequence.write_text(json.dumps({"last_seq": future}))
    first = Commander(broker.host, broker.port, signing_key=gateway_key, sequence_file=sequence)
    try:
        assert first.next_sequence() == future + 1
    finally:
        first.close()
    again = Commander(broker.host, broker.port, signing_key=gateway_key, sequence_file=sequence)
    try:
        assert again.next_sequence() == future + 2
    finally:
        again.close()
    sequence.write_text("damaged")
    with pytest.raises(ValueError, match="not a command sequence file"):
        Commander(broker.host, broker.port, signing_key=gateway_key, sequence_file=sequence)


# ------------------------------------------------ CPR numbers as case tokens (issue 13, 8)

import datetime as dt  # noqa: E402

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from device_agent.session import SessionError, check_case_token  # noqa: E402

#: What people put between the parts of a CPR number (and in dates): dashes of every kind,
#: spaces, dots, colons, slashes, or nothing.
SEPARATORS = ["", "-", " ", ".", ":", "/", "_", "\u2010", "\u2011", "\u2012", "\u2013",
              "\u2014", "\u2212", "\u00a0", " - ", " \u2013 ", "--", ". "]


@st.composite
def written_cprs(draw: st.DrawFn) -> str:
    """A real CPR date and serial, written as people write them."""
    born = draw(st.dates(min_value=dt.date(1858, 1, 1), max_value=dt.date(2057, 12, 31)))
    serial = draw(st.integers(0, 9999))
    century = draw(st.booleans())
    year = f"{born.year:04d}" if century else f"{born.year % 100:02d}"
    in_date = draw(st.sampled_from(["", "", ".", "-", "/", " "]))  # 01.01.90 or 010190
    between = draw(st.sampled_from(SEPARATORS))
    prefix = draw(st.sampled_from(["", "", "cpr", "CPR:", "pt ", "x"]))
    suffix = draw(st.sampled_from(["", "", "x", "-a", " ", "\n"]))
    return (f"{prefix}{born.day:02d}{in_date}{born.month:02d}{in_date}{year}"
            f"{between}{serial:04d}{suffix}")


@settings(max_examples=400, deadline=None)
@given(written_cprs())
def test_a_cpr_number_is_refused_however_it_is_written(token: str) -> None:
    with pytest.raises(SessionError, match="national id"):
        check_case_token(token)


KNOWN_CPRS = [
    "010190:1234", "010190-1234", "0101901234", "010190 1234", "01.01.90-1234",
    "01.01.1990-1234", "01011990-1234", "010190\u20131234", "010190/1234",
    "cpr010190-1234x", "CPR:010190.1234", "\uff10\uff11\uff10\uff11\uff19\uff10-1234",
    "290200-1234",  # 29 February (2000, a leap year)
]
ORDINARY_TOKENS = [
    "TD-2026-000123", "TD-2026-999999", "case-1", "c-9", "REF.2026.11.30", "A1B2C3D4",
    "TD-2026-0001", "dermato:2026:77", "310299-1234",  # 31 February: no date
    "12345678",  # eight digits: no CPR number
]


def test_known_ways_of_writing_a_cpr_number_are_refused_and_ordinary_tokens_are_not(
        device) -> None:
    for token in KNOWN_CPRS:
        answer = execute(cmd("open_case", case_token=token), device.agent)
        assert answer["ok"] is False, token
        assert "national id" in answer["error"]["message"]
        assert device.agent.status()["case_open"] is False
    for token in ORDINARY_TOKENS:
        assert check_case_token(token) == token
        answer = execute(cmd("open_case", case_token=token), device.agent)
        assert answer["ok"] is True, (token, answer)
