"""The gateway's hash-chained audit log (issue 13, finding 9): verification names the first
line that does not hold; concurrent appenders keep one valid chain; the gateway audits what
it did with devices' messages, never a case token."""

from __future__ import annotations

import hashlib
import json
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from clinic_gateway import audit
from clinic_gateway.gateway import Gateway
from dermascope_wire import bundle
from tests.test_gateway import DEVICE, RawDevice


def write_log(store: Path, count: int = 6) -> Path:
    log = audit.AuditLog(audit.audit_path(store))
    for i in range(count):
        log.append("ack.sent", device_id="d1", capture_id=f"c{i}", state="committed")
    return log.path


def run_verify(store: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "clinic_gateway", "audit", "verify", str(store)],
                          capture_output=True, text=True, timeout=60, check=False)


def test_an_intact_log_verifies(tmp_path) -> None:
    path = write_log(tmp_path)
    lines = path.read_bytes().splitlines()
    first = json.loads(lines[0])
    assert (first["seq"], first["prev"]) == (1, audit.GENESIS)
    assert json.loads(lines[3])["prev"] == hashlib.sha256(lines[2]).hexdigest()
    done = run_verify(tmp_path)
    assert done.returncode == 0, done.stderr
    assert f"intact: 6 lines, head {hashlib.sha256(lines[-1]).hexdigest()}" in done.stdout
    assert stat.S_IMODE(path.stat().st_mode) & 0o027 == 0


def edit(path: Path, change) -> None:
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(change(lines)))


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        # a reason changed on line 3: line 4 holds another hash for it
        (lambda ls: [*ls[:2], ls[2].replace(b"committed", b"rejected"), *ls[3:]],
         "line 3: changed"),
        # the last-but-one line's JSON garbled
        (lambda ls: [*ls[:4], b"{not json\n", ls[5]], "line 5: not a JSON line"),
        # line 2 deleted: the old line 3 now stands at 2
        (lambda ls: [ls[0], *ls[2:]], "line 2: out of sequence (seq 3, expected 2)"),
        # lines 4 and 5 swapped
        (lambda ls: [*ls[:3], ls[4], ls[3], ls[5]], "line 4: out of sequence (seq 5"),
        # the first line rewritten with a new hash chain start
        (lambda ls: [ls[0].replace(audit.GENESIS.encode(), b"1" * 64), *ls[1:]],
         "line 1: does not start from the genesis hash"),
        # the end cut off mid-line
        (lambda ls: [*ls[:5], ls[5][:20]], "line 6: incomplete"),
    ],
)
def test_verify_names_the_first_line_that_does_not_hold(tmp_path, change, expected) -> None:
    path = write_log(tmp_path)
    edit(path, change)
    done = run_verify(tmp_path)
    assert done.returncode == 1
    assert expected in done.stderr


def test_a_line_rewritten_with_its_sequence_kept_is_named_too(tmp_path) -> None:
    # A forger who keeps seq and prev but changes what line 2 says.
    path = write_log(tmp_path)
    edit(path, lambda ls: [ls[0], ls[1].replace(b'"c1"', b'"cX"'), *ls[2:]])
    verdict = audit.verify(path)
    assert (verdict.ok, verdict.bad_line) == (False, 2)


APPENDER = """
import sys
from clinic_gateway.audit import AuditLog
log = AuditLog(sys.argv[1])
for i in range(int(sys.argv[3])):
    log.append("command.sent", device_id=sys.argv[2], command="status", n=i)
"""


def test_two_processes_appending_at_once_keep_one_valid_chain(tmp_path) -> None:
    path = audit.audit_path(tmp_path)
    procs = [subprocess.Popen([sys.executable, "-c", APPENDER, str(path), name, "150"])
             for name in ("p1", "p2")]
    for proc in procs:
        assert proc.wait(timeout=120) == 0
    verdict = audit.verify(path)
    assert verdict.ok, verdict.describe()
    assert verdict.lines == 300
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert sorted((r["device_id"], r["n"]) for r in records) == sorted(
        (name, i) for name in ("p1", "p2") for i in range(150))


def test_a_line_torn_by_a_crash_is_cut_off_and_recorded(tmp_path, events) -> None:
    path = write_log(tmp_path, 3)
    with path.open("ab") as f:
        f.write(b'{"at":"2026-12-01T00:00:00.000Z","event":"ack.se')  # power cut here
    audit.AuditLog(path).append("ack.sent", capture_id="c9")
    verdict = audit.verify(path)
    assert verdict.ok, verdict.describe()
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["event"] for r in records[3:]] == ["audit.torn_line_removed", "ack.sent"]
    assert records[3]["torn_bytes"] == 48
    assert events.named("audit.torn_line_removed")


def test_a_revocation_is_recorded_through_the_module_and_its_command(tmp_path) -> None:
    audit.record_revocation(tmp_path, "derm-7", "1f2e", "device stolen")
    done = subprocess.run([sys.executable, "-m", "clinic_gateway", "audit", "revoked",
                           str(tmp_path), "--device", "derm-8", "--serial", "abcd"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    records = [json.loads(x) for x in audit.audit_path(tmp_path).read_text().splitlines()]
    assert [(r["event"], r["device_id"], r["serial"]) for r in records] == [
        ("certificate.revoked", "derm-7", "1f2e"), ("certificate.revoked", "derm-8", "abcd")]
    assert run_verify(tmp_path).returncode == 0


def test_the_gateway_audits_its_final_acks_and_seal_errors_without_tokens(
        broker, store, events) -> None:
    token = "TD-2026-000777"
    with Gateway(broker.host, broker.port, store, allow_unsealed=True) as gw:
        assert gw.wait_ready(10)
        dev = RawDevice(broker)
        try:
            ok = bundle.pack({"capture_id": "a1", "device_id": DEVICE,
                              "case": {"token": token, "assigned": True}}, b"img")
            assert dev.transfer("a1", ok).state == "committed"
            bad = bundle.pack({"capture_id": "a2", "device_id": "someone-else"}, b"img")
            assert dev.transfer("a2", bad).state == "rejected"
            assert dev.manifest("a3", ok).state == "incomplete"  # not audited: no outcome
        finally:
            dev.close()
    path = audit.audit_path(store)
    assert audit.verify(path).ok
    records = [json.loads(x) for x in path.read_text().splitlines()]
    assert [(r["event"], r.get("capture_id"), r.get("state"), r.get("reason"))
            for r in records] == [
        ("capture.case_unverified", "a1", None, None),
        ("ack.sent", "a1", "committed", ""),
        ("capture.device_mismatch", "a2", None, None),
        ("ack.sent", "a2", "rejected", "device_mismatch"),
    ]
    assert token not in path.read_text()
    assert records[0]["case_ref"] == gw.cases.ref(token)
    anchors = events.named("audit.appended")
    assert [a["seq"] for a in anchors] == [1, 2, 3, 4]
    assert anchors[-1]["sha256"] == audit.verify(path).head


def test_an_audit_log_that_cannot_be_written_is_an_error_and_the_device_still_gets_its_ack(
        broker, store, events) -> None:
    audit.audit_path(store).mkdir(parents=True)  # a folder where the file should be
    with Gateway(broker.host, broker.port, store, allow_unsealed=True) as gw:
        assert gw.wait_ready(10)
        dev = RawDevice(broker)
        try:
            data = bundle.pack({"capture_id": "f1", "device_id": DEVICE}, b"img")
            assert dev.transfer("f1", data).state == "committed"
        finally:
            dev.close()
        with pytest.raises(audit.AuditError, match=r"audit\.jsonl"):
            gw.send_command(DEVICE, "status", timeout=1.0)  # no audit line, no command
    (failed,) = events.named("gateway.audit_failed")
    assert (failed["levelname"], failed["audit_event"]) == ("ERROR", "ack.sent")
    assert "audit.jsonl" in failed["error"]


def test_a_damaged_last_line_stops_appends_until_it_is_looked_at(tmp_path) -> None:
    path = write_log(tmp_path, 2)
    with path.open("ab") as f:
        f.write(b'{"forged": true}\n')
    before = path.read_bytes()
    with pytest.raises(audit.AuditError, match="last line is not an audit record"):
        audit.AuditLog(path).append("ack.sent", capture_id="c9")
    assert path.read_bytes() == before
    assert "line 3: out of sequence" in run_verify(tmp_path).stderr
