"""PACS delivery against a real Orthanc (sim/orthanc.py): the forward queue the exporter fills,
the forwarder that empties it over STOW-RS or C-STORE, and what Orthanc holds afterwards, read
back through its own API: nothing lost, nothing twice, refusals and bad entries set aside."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread

from clinic_gateway.check import check_pacs, run_checks
from clinic_gateway.config import ConfigError, parse_config
from clinic_gateway.exporter import Exporter
from clinic_gateway.forwarder import Forwarder, failed_dir, pending, queue_dir
from clinic_gateway.pacs import make_sender
from sim.fleet import _sample_image
from sim.orthanc import PrivateOrthanc
from sim.pki import TestCA
from tests.jsonlog import read_events
from tests.orthanc import (
    Running,
    TlsFront,
    assert_same_instance,
    capture_metadata,
    forwarder,
    pacs_config,
    pacs_section,
    read_back,
    running_orthanc,
    store_capture,
    toml_table,
)

TRANSPORTS = ("stow-rs", "c-store")


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[PrivateOrthanc]:
    with running_orthanc(tmp_path / "orthanc") as o:
        yield o


@pytest.fixture(scope="module")
def jpeg() -> bytes:
    return _sample_image()


def captures(store: Path, jpeg: bytes, count: int, device: str = "derm-0001") -> list[Path]:
    return [store_capture(store, device, f"cap-{i:04d}", jpeg, minute=i) for i in range(count)]


# -- the round trip -----------------------------------------------------------------------
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_each_queued_instance_reads_back_from_orthanc_as_it_was_written(
        tmp_path, orthanc, jpeg, events, transport):
    store = tmp_path / "store"
    sent = captures(store, jpeg, 3)
    assert len(pending(store)) == 3
    fw = forwarder(store, orthanc, transport)
    assert fw.run_once() is None
    assert pending(store) == []
    held = read_back(orthanc)
    assert set(held) == {str(dcmread(p).SOPInstanceUID) for p in sent}
    for path in sent:
        assert_same_instance(path, held[str(dcmread(path).SOPInstanceUID)])
    forwarded = events.named("pacs.forwarded")
    assert len(forwarded) == 3
    assert {e["transport"] for e in forwarded} == {transport}
    assert {e["capture_id"] for e in forwarded} == {p.stem for p in sent}


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_sending_an_instance_again_makes_no_second_one(tmp_path, orthanc, jpeg, transport):
    store = tmp_path / "store"
    (path,) = captures(store, jpeg, 1)
    fw = forwarder(store, orthanc, transport)
    fw.run_once()
    # As after a crash between the PACS's answer and the entry's removal: queued again.
    store_capture(store, "derm-0001", "cap-0000", jpeg)
    assert len(pending(store)) == 1
    fw.run_once()
    assert pending(store) == []
    assert fw.forwarded == 2
    assert list(read_back(orthanc)) == [str(dcmread(path).SOPInstanceUID)]


def test_over_dicom_tls_the_pacs_is_reached_only_with_the_clinics_ca(tmp_path, jpeg):
    store = tmp_path / "store"
    transport = "c-store"
    with running_orthanc(tmp_path / "orthanc", tls=TestCA(tmp_path / "pki")) as orthanc:
        (path,) = captures(store, jpeg, 1)
        # Without TLS the PACS's DICOM port does not talk to us.
        c = pacs_config(orthanc, transport, ca_file=None, cert_file=None, key_file=None)
        assert Forwarder(store, make_sender(c)).run_once() is not None
        # A CA that did not sign the PACS's certificate: nothing is sent, the entry waits.
        stranger = TestCA(tmp_path / "other-pki").cert_path
        c = pacs_config(orthanc, transport, ca_file=str(stranger))
        assert Forwarder(store, make_sender(c)).run_once() is not None
        assert len(pending(store)) == 1
        assert orthanc.instances() == []
        c = pacs_config(orthanc, transport)
        assert Forwarder(store, make_sender(c)).run_once() is None
        held = read_back(orthanc)
    assert list(held) == [str(dcmread(path).SOPInstanceUID)]
    assert_same_instance(path, held[str(dcmread(path).SOPInstanceUID)])


def test_over_https_stow_rs_reaches_the_pacs_only_with_the_clinics_ca(
        tmp_path, orthanc, jpeg):
    store = tmp_path / "store"
    ca = TestCA(tmp_path / "pki")
    client = ca.issue("gateway-pacs-client", checked=False)
    mutual = {"cert_file": str(client.cert), "key_file": str(client.key)}
    with TlsFront(orthanc, ca) as front:
        (path,) = captures(store, jpeg, 1)
        stranger = TestCA(tmp_path / "other-pki").cert_path
        for refused in ({"ca_file": str(stranger), **mutual},  # whose certificate is that?
                        {"ca_file": str(ca.cert_path)}):  # no client certificate
            c = pacs_config(orthanc, "stow-rs", url=front.url, **refused)
            assert Forwarder(store, make_sender(c)).run_once() is not None
        assert len(pending(store)) == 1
        assert orthanc.instances() == []
        c = pacs_config(orthanc, "stow-rs", url=front.url, ca_file=str(ca.cert_path), **mutual)
        assert Forwarder(store, make_sender(c)).run_once() is None
        config = parse_config({"service": {"insecure_dev_mode": True},
                               "store": {"dir": str(store)}, "pacs": c.model_dump(mode="json")})
        assert check_pacs(config).level == "ok"  # clinic-gateway check's line, over HTTPS
    held = read_back(orthanc)
    assert list(held) == [str(dcmread(path).SOPInstanceUID)]
    assert_same_instance(path, held[str(dcmread(path).SOPInstanceUID)])


# -- faults -------------------------------------------------------------------------------
def test_a_pacs_down_for_a_while_delays_the_queue_and_loses_nothing(
        tmp_path, orthanc, jpeg, events):
    store = tmp_path / "store"
    orthanc.stop()
    with Running(forwarder(store, orthanc)):
        sent = captures(store, jpeg, 5)
        retries = events.wait_for("pacs.retry", count=6)
        assert {e["reason"] for e in retries} == {"unreachable"}
        # The same oldest entry is tried again, waiting longer each time up to the cap.
        assert len({e["sop_instance_uid"] for e in retries}) == 1
        delays = [e["retry_in_s"] for e in retries]
        assert delays == sorted(delays)
        assert delays[0] < delays[-1] == 0.4
        assert len(pending(store)) == 5
        orthanc.start()
        events.wait_for("pacs.forwarded", count=5, timeout=30)
    assert pending(store) == []
    held = read_back(orthanc)
    assert len(held) == 5
    for path in sent:
        assert_same_instance(path, held[str(dcmread(path).SOPInstanceUID)])


def damage(path: Path) -> None:
    """The DICOM file with its JPEG cut short (a disk fault): still DICOM, same UID."""
    ds = dcmread(path)
    ds.PixelData = ds.PixelData[:1000]
    ds.save_as(path, enforce_file_format=True)


def test_an_instance_the_pacs_refuses_for_good_is_set_aside_and_the_queue_goes_on(
        tmp_path, orthanc, jpeg, events):
    store = tmp_path / "store"
    good_a, bad, good_b, gone = captures(store, jpeg, 4)
    damage(bad)
    gone.unlink()
    fw = forwarder(store, orthanc, "stow-rs")
    assert fw.run_once() is None
    assert pending(store) == []
    assert set(read_back(orthanc)) == {str(dcmread(p).SOPInstanceUID) for p in (good_a, good_b)}
    failed = {e["capture_id"]: e for e in events.named("pacs.failed")}
    assert set(failed) == {bad.stem, gone.stem}
    assert failed[bad.stem]["reason"] == "http_400"
    assert failed[gone.stem]["reason"] == "dicom_missing"
    kept = sorted(p.name for p in failed_dir(store).iterdir())
    uid = str(dcmread(bad).SOPInstanceUID)
    assert f"{uid}.json" in kept
    assert f"{uid}.reason" in kept
    assert (failed_dir(store) / f"{uid}.reason").read_text().startswith("http_400: HTTP 400")
    assert not events.named("pacs.retry")  # refused for good: not tried again


def test_bad_entries_in_the_queue_are_named_set_aside_and_never_stop_the_forwarder(
        tmp_path, orthanc, jpeg, events):
    store = tmp_path / "store"
    queue = queue_dir(store)
    queue.mkdir(parents=True)
    (queue / "1.2.3.json").write_text("{not json")
    (queue / "1.2.4.json").write_text(json.dumps(["a", "list"]))
    (queue / "1.2.5.json").write_text(json.dumps(
        {"sop_instance_uid": "1.2.5", "device_id": "d", "capture_id": "c",
         "dicom": "../../etc/passwd.dcm"}))
    (queue / "1.2.6.json").write_bytes(b"\xff\xfe\x00")
    (queue / "1.2.7.json").write_text(json.dumps(
        {"sop_instance_uid": "1.2.8", "device_id": "d", "capture_id": "c", "dicom": "d/c.dcm"}))
    old = time.time() - 3600
    for p in queue.iterdir():
        os.utime(p, (old, old))  # older than the good one: met first
    with Running(forwarder(store, orthanc)) as running:
        (good,) = captures(store, jpeg, 1)
        events.wait_for("pacs.forwarded", count=1)
        assert running.thread.is_alive()
    failed = {e["entry"]: e["error"] for e in events.named("pacs.failed")}
    assert set(failed) == {f"1.2.{n}.json" for n in range(3, 8)}
    assert all(e["reason"] == "entry_unreadable" for e in events.named("pacs.failed"))
    assert "Expecting property name" in failed["1.2.3.json"]
    assert "not a JSON object" in failed["1.2.4.json"]
    assert "not a .dcm file inside the store" in failed["1.2.5.json"]
    assert "names instance 1.2.8" in failed["1.2.7.json"]
    assert pending(store) == []
    assert list(read_back(orthanc)) == [str(dcmread(good).SOPInstanceUID)]


def test_a_second_forwarder_on_the_same_store_waits_and_sends_nothing(
        tmp_path, orthanc, jpeg, events):
    store = tmp_path / "store"
    first, second = forwarder(store, orthanc), forwarder(store, orthanc)
    with Running(first):
        events.wait_for("pacs.forwarder_started")
        with Running(second):
            events.wait_for("pacs.forwarder_waiting")
            captures(store, jpeg, 4)
            events.wait_for("pacs.forwarded", count=4)
    assert (first.forwarded, second.forwarded) == (4, 0)
    assert len(events.named("pacs.forwarder_started")) == 1
    assert len(read_back(orthanc)) == 4


# -- the forwarder process, killed -9 mid-queue -------------------------------------------
def service_config(tmp_path: Path, orthanc: PrivateOrthanc, transport: str) -> Path:
    path = tmp_path / "gateway.toml"
    path.write_text(
        f'[store]\ndir = "{tmp_path / "store"}"\n'
        f'[service]\ninsecure_dev_mode = true\nlog_file = "{tmp_path / "events.jsonl"}"\n'
        + toml_table("pacs", pacs_section(orthanc, transport)))
    return path


def logged(tmp_path: Path, name: str) -> list[dict]:
    return read_events(tmp_path / "events.jsonl", name)

def wait_logged(tmp_path: Path, name: str, count: int, timeout: float = 60.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    while len(found := logged(tmp_path, name)) < count:
        assert time.monotonic() < deadline, f"fewer than {count} {name} in {timeout} s"
        time.sleep(0.01)
    return found


def start_forwarder(config: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "clinic_gateway.forwarder", "--config",
                             str(config)], stdout=subprocess.DEVNULL)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_forwarder_killed_9_mid_queue_loses_nothing_and_duplicates_nothing(
        tmp_path, orthanc, jpeg, transport):
    config = service_config(tmp_path, orthanc, transport)
    store = tmp_path / "store"
    sent = captures(store, jpeg, 40)
    expected = {str(dcmread(p).SOPInstanceUID) for p in sent}
    proc = start_forwarder(config)
    try:
        wait_logged(tmp_path, "pacs.forwarded", 3)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(10) == -signal.SIGKILL
        left = len(pending(store))
        assert 0 < left < 40  # killed mid-queue
        proc = start_forwarder(config)
        deadline = time.monotonic() + 60
        while pending(store):
            assert time.monotonic() < deadline, f"{len(pending(store))} never forwarded"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)
    held = read_back(orthanc)
    assert set(held) == expected  # nothing lost, and read_back found no UID twice
    assert len(orthanc.instances()) == 40
    assert len({e["sop_instance_uid"] for e in logged(tmp_path, "pacs.forwarded")}) == 40
    assert logged(tmp_path, "pacs.forwarder_stopped")  # the second one stopped cleanly


# -- config and check ---------------------------------------------------------------------
@pytest.mark.parametrize(("pacs", "field"), [
    ({"enabled": True}, "pacs.url"),
    ({"enabled": True, "transport": "c-store"}, "pacs.host"),
    ({"enabled": True, "url": "ftp://pacs"}, "pacs.url"),
    ({"transport": "wado"}, "pacs.transport"),
    ({"password_file": "/nonexistent/pacs-password"}, "pacs.password_file"),
    ({"enabled": True, "url": "http://p/dicom-web", "username": "u"}, "password_file"),
    ({"ca_file": "/nonexistent/pacs-ca.crt"}, "pacs.ca_file"),
    ({"cert_file": "/etc/hostname"}, "pacs: cert_file and key_file go together"),
    ({"calling_ae_title": "A" * 17}, "pacs.calling_ae_title"),
    ({"retry_initial_s": 10, "retry_max_s": 5}, "pacs.retry_max_s"),
    ({"enabled": True, "url": "http://p/dicom-web", "bogus": 1}, "pacs.bogus"),
])
def test_a_bad_pacs_section_names_its_field(pacs, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        parse_config({"service": {"insecure_dev_mode": True}, "pacs": pacs})


def test_forwarding_needs_the_dicom_export():
    with pytest.raises(ConfigError, match=r"store\.export_dicom"):
        parse_config({"service": {"insecure_dev_mode": True}, "store": {"export_dicom": False},
                      "pacs": {"enabled": True, "url": "http://p/dicom-web"}})


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_check_says_whether_the_pacs_answers(tmp_path, orthanc, transport):
    config = service_config(tmp_path, orthanc, transport)
    (line,) = [c for c in run_checks(config, probe_broker=False) if c.name == "pacs"]
    assert line.level == "ok", line
    orthanc.stop()
    (line,) = [c for c in run_checks(config, probe_broker=False) if c.name == "pacs"]
    assert line.level == "fail"
    assert transport in line.detail


def test_a_forwarder_whose_supervisor_was_killed_9_stops_and_frees_the_queue(
        tmp_path, orthanc):
    config = service_config(tmp_path, orthanc, "stow-rs")
    # A stand-in supervisor: a shell that starts the forwarder as its child and waits.
    shell = subprocess.Popen(
        ["sh", "-c", f'"{sys.executable}" -m clinic_gateway.forwarder --config "{config}" '
                     '--parent $$ >/dev/null & wait'])
    try:
        (started,) = wait_logged(tmp_path, "pacs.forwarder_started", 1)
        shell.send_signal(signal.SIGKILL)
        shell.wait(10)
        wait_logged(tmp_path, "pacs.forwarder_stopped", 1, timeout=30)
    finally:
        if shell.poll() is None:
            shell.kill()
            shell.wait(10)
    # The next supervisor's forwarder takes the queue at once.
    proc = start_forwarder(config)
    try:
        wait_logged(tmp_path, "pacs.forwarder_started", 2, timeout=30)
        assert not logged(tmp_path, "pacs.forwarder_waiting")
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    assert started["transport"] == "stow-rs"


def test_the_journal_entry_stays_until_the_instance_is_queued(tmp_path, jpeg):
    store = tmp_path / "store"
    (store / "derm-0001").mkdir(parents=True)
    (store / "derm-0001" / "cap-0000.jpg").write_bytes(jpeg)
    (store / "derm-0001" / "cap-0000.json").write_text(json.dumps(
        capture_metadata("derm-0001", "cap-0000")))
    journal = store / ".gateway" / "pending" / "derm-0001" / "cap-0000.json"
    journal.parent.mkdir(parents=True)
    journal.write_text("{}")
    queue_dir(store).parent.mkdir(parents=True, exist_ok=True)
    queue_dir(store).write_text("not a folder")  # the queue cannot be written
    job = json.dumps({"device_id": "derm-0001", "capture_id": "cap-0000", "dicom": True})
    out = io.StringIO()
    Exporter(store, out, forward=True).run(io.StringIO(job + "\n"))
    said = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [e.get("event") for e in said] == ["exporter.job_failed", None]
    assert journal.exists()  # the next start hands the capture over again
    queue_dir(store).unlink()
    Exporter(store, io.StringIO(), forward=True).run(io.StringIO(job + "\n"))
    assert not journal.exists()
    (entry,) = pending(store)
    assert entry.stem == str(dcmread(store / "derm-0001" / "cap-0000.dcm").SOPInstanceUID)
