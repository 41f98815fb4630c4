"""``clinic-gateway run --config`` and ``clinic-gateway check`` as clinic IT meets them: the
validated config, N supervised worker processes (one SIGKILLed mid-stream: nothing lost,
nothing stored twice), the metrics endpoint scraped over HTTP, and the checks."""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections import Counter
from pathlib import Path

import pytest

from clinic_gateway.config import Config, load_config
from dermascope_wire import seal, signing
from dermascope_wire.bundle import pack
from device_agent import __version__
from device_agent.config import UplinkConfig
from device_agent.uplink.client import Uplink
from device_agent.uplink.outbox import Outbox
from sim.broker import MosquittoBroker, free_port
from sim.fleet import _sample_image, fleet_devices
from sim.pki import TestCA
from sim.secure_broker import SecureMosquitto
from tests.jsonlog import read_events

EXAMPLE = Path(__file__).parent.parent / "clinic_gateway" / "config.example.toml"


# -- helpers ------------------------------------------------------------------------------
def gateway_cmd(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "clinic_gateway", *args], capture_output=True,
                          text=True, timeout=timeout, check=False)


def dev_config(tmp_path: Path, port: int, workers: int = 2, metrics_port: int = 0,
               extra: str = "") -> Path:
    """A developer's bench config (plain broker, no keys) with its JSON log in tmp_path."""
    path = tmp_path / "gateway.toml"
    path.write_text(
        f'[broker]\nhost = "127.0.0.1"\nport = {port}\n'
        f'[store]\ndir = "{tmp_path / "store"}"\n{extra}'
        f'[service]\nworkers = {workers}\ninsecure_dev_mode = true\n'
        f'log_file = "{tmp_path / "events.jsonl"}"\n'
        f'[metrics]\nenabled = {"true" if metrics_port else "false"}\nport = {metrics_port}\n')
    return path


def events(tmp_path: Path, name: str, **match: object) -> list[dict]:
    return read_events(tmp_path / "events.jsonl", name, **match)

def wait_events(tmp_path: Path, name: str, count: int = 1, timeout: float = 30.0,
                **match: object) -> list[dict]:
    """Until ``count`` such events are in the service's log (its processes are others: their
    log is what they tell us, so it is polled, with a deadline)."""
    deadline = time.monotonic() + timeout
    while len(found := events(tmp_path, name, **match)) < count:
        if time.monotonic() > deadline:
            pytest.fail(f"fewer than {count} {name} {match} within {timeout} s: {found}")
        time.sleep(0.02)
    return found


class Service:
    """``clinic-gateway run --config`` as systemd runs it."""

    def __init__(self, config: Path) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "clinic_gateway", "run", "--config",
                                      str(config)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=40)

    def __enter__(self) -> Service:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


def devices(tmp_path: Path, port: int, count: int, captures: int, image: bytes,
            prefix: str = "svc") -> tuple[list[Uplink], set[str]]:
    """Simulated devices (the real uplink code), their outboxes filled."""
    return fleet_devices(tmp_path, port, count, captures, image, prefix, retry_max=3.0)


def deliver(uplinks: list[Uplink], timeout: float = 90.0) -> None:
    for u in uplinks:
        u.start()
    deadline = time.monotonic() + timeout
    remaining = list(uplinks)
    try:
        while remaining and time.monotonic() < deadline:
            remaining = [u for u in remaining if not u.wait_idle(timeout=0.2)]
    finally:
        stoppers = [threading.Thread(target=u.stop, args=(5.0,)) for u in uplinks]
        for t in stoppers:
            t.start()
        for t in stoppers:
            t.join()
    assert not remaining, f"{len(remaining)} devices still had captures after {timeout} s"


def make_keys(folder: Path) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    private, _ = seal.generate_keypair()
    sealing = folder / "clinic.pem"
    sealing.write_bytes(seal.private_key_pem(private))
    sign = folder / "signing.pem"
    sign.write_bytes(signing.private_key_pem(signing.generate_key()))
    for p in (sealing, sign):
        p.chmod(0o600)
    return sealing, sign


# -- the config ---------------------------------------------------------------------------
def test_the_example_config_documents_every_key_and_loads(tmp_path):
    """Every key of every section is in the example, and the example (its /etc paths pointed
    at real keys and certificates) is a valid config: secure, two workers with {n}."""
    text = EXAMPLE.read_text(encoding="utf-8")
    for section, model in Config.model_fields.items():
        assert f"[{section}]" in text, section
        for key in model.annotation.model_fields:
            assert re.search(rf"(?m)^#? ?{key} = ", text), f"{section}.{key}"
    etc = tmp_path / "etc"
    ca = TestCA(etc / "tls")
    for n, cn in ((1, "gateway"), (2, "gateway-2")):
        issued = ca.issue(cn, checked=False)
        issued.cert.rename(etc / "tls" / f"gateway-{n}.crt")
        issued.key.rename(etc / "tls" / f"gateway-{n}.key")
    ca.issue("commander")
    shutil.copy(ca.cert_path, etc / "tls" / "clinic-ca.crt")
    sealing, _ = make_keys(etc / "keys")
    sealing.rename(etc / "keys" / "clinic-2026.pem")
    config_path = tmp_path / "config.toml"
    config_path.write_text(text.replace("/etc/clinic-gateway/", f"{etc}/")
                           .replace("/var/lib/clinic-gateway/", f"{tmp_path}/"))
    config = load_config(config_path)
    assert config.service.workers == 2
    assert not config.service.insecure_dev_mode
    assert config.worker_tls(2)["certfile"] == str(etc / "tls" / "gateway-2.crt")
    assert config.command_tls(1)["certfile"] == str(etc / "tls" / "commander.crt")


@pytest.mark.parametrize(("body", "field"), [
    ('[broker]\nport = 1883\n', "broker.ca_file"),  # secure by default: no TLS, no start
    ('[service]\ninsecure_dev_mode = true\nworkerz = 2\n', "service.workerz"),
    ('[service]\ninsecure_dev_mode = true\nworkers = 0\n', "service.workers"),
    ('[broker]\nca_file = "/nonexistent/ca.crt"\ncert_file = "/x/gateway-{n}.crt"\n'
     'key_file = "/x/gateway-{n}.key"\n[service]\ninsecure_dev_mode = true\n', "broker.ca_file"),
    ('[broker]\nca_file = "ca.crt"\ncert_file = "gateway.crt"\nkey_file = "gateway.key"\n'
     '[service]\nworkers = 2\ninsecure_dev_mode = true\n', "broker.cert_file"),
    ('[keys]\nsealing = ["/nonexistent/clinic.pem"]\n[service]\ninsecure_dev_mode = true\n',
     "keys.sealing"),
    ('[service]\ninsecure_dev_mode = true\n[metrics]\nport = 70000\n', "metrics.port"),
])
def test_a_bad_config_names_the_field_and_exits_2(tmp_path, body, field):
    config = tmp_path / "config.toml"
    config.write_text(body)
    for command in ("run", "check"):
        result = gateway_cmd(command, "--config", str(config))
        assert result.returncode == 2, (command, result.stdout, result.stderr)
        assert field in result.stderr + result.stdout, (command, result.stderr)
        assert "Traceback" not in result.stderr


def test_without_keys_the_service_refuses_to_start(tmp_path):
    ca = TestCA(tmp_path / "pki")
    gw = ca.issue("gateway")
    config = tmp_path / "config.toml"
    config.write_text(f'[broker]\nca_file = "{ca.cert_path}"\ncert_file = "{gw.cert}"\n'
                      f'key_file = "{gw.key}"\n')
    result = gateway_cmd("run", "--config", str(config))
    assert result.returncode == 2
    assert "keys.sealing" in result.stderr
    assert "Traceback" not in result.stderr


# -- workers ------------------------------------------------------------------------------
def test_two_workers_one_sigkilled_mid_stream_store_every_capture_exactly_once(tmp_path):
    with MosquittoBroker(tmp_path / "broker") as broker, \
            Service(dev_config(tmp_path, broker.port, workers=2)) as service:
        started = wait_events(tmp_path, "gateway.worker_started", count=2)
        wait_events(tmp_path, "gateway.connected", count=2)
        victim = next(e for e in started if e["worker"] == 1)
        uplinks, accepted = devices(tmp_path, broker.port, count=6, captures=4,
                                    image=_sample_image())
        killed = threading.Event()

        def kill_mid_stream() -> None:
            # Once some captures are stored and more are on their way.
            wait_events(tmp_path, "capture.stored", count=6, timeout=60)
            os.kill(victim["pid"], signal.SIGKILL)
            killed.set()

        killer = threading.Thread(target=kill_mid_stream, daemon=True)
        killer.start()
        deliver(uplinks)
        killer.join(timeout=5)
        assert killed.is_set()
        died = wait_events(tmp_path, "gateway.worker_died", worker=1)
        assert (died[0]["pid"], died[0]["signal"]) == (victim["pid"], "SIGKILL")
        # The supervisor started worker 1 again, and it connected.
        restarted = wait_events(tmp_path, "gateway.worker_started", count=2, worker=1)
        wait_events(tmp_path, "gateway.connected", count=3)
        assert restarted[1]["pid"] != victim["pid"]
        assert service.stop() == 0
    logged = events(tmp_path, "capture.stored")
    on_disk = {p.stem for p in (tmp_path / "store").glob("svc-*/*.jpg")}
    assert on_disk == accepted  # nothing lost
    # Every capture has its event, the one the kill cut off logged by recovery.
    assert {e["capture_id"] for e in logged} == accepted
    stored = Counter(e["capture_id"] for e in logged if not e.get("recovered"))
    assert max(stored.values()) == 1  # nothing stored twice
    assert events(tmp_path, "gateway.service_stopped")
    # Every worker is gone with the supervisor.
    for e in events(tmp_path, "gateway.worker_started"):
        with pytest.raises(ProcessLookupError):
            os.kill(e["pid"], 0)


def test_workers_go_when_their_supervisor_is_killed(tmp_path):
    """A supervisor killed with SIGKILL (an OOM kill, a `kill -9`) leaves no worker behind
    holding the shared subscription: each stops by itself, cleanly, and systemd's next
    supervisor starts its own."""
    with MosquittoBroker(tmp_path / "broker") as broker, \
            Service(dev_config(tmp_path, broker.port, workers=2)) as service:
        started = wait_events(tmp_path, "gateway.worker_started", count=2)
        wait_events(tmp_path, "gateway.connected", count=2)
        service.proc.kill()
        service.proc.wait(timeout=10)
        deadline = time.monotonic() + 30
        alive = [e["pid"] for e in started]
        while alive and time.monotonic() < deadline:
            alive = [pid for pid in alive if _running(pid)]
            threading.Event().wait(0.05)
        assert alive == []


def _running(pid: int) -> bool:
    """Whether ``pid`` is a live process (an orphan's zombie, reaped by init, is not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


# -- metrics ------------------------------------------------------------------------------
def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        assert answer.status == 200
        return answer.read().decode()


def metric(text: str, name: str, **labels: str) -> float:
    wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = rf"(?m)^{re.escape(name)}" + (rf"\{{{re.escape(wanted)}\}}" if labels else "") \
        + r" (\S+)$"
    match = re.search(pattern, text)
    assert match, f"{name}{labels} not in:\n{text}"
    return float(match.group(1))


def test_metrics_are_scraped_over_http_after_a_capture(tmp_path):
    image = _sample_image()
    port = free_port()
    with MosquittoBroker(tmp_path / "broker") as broker, \
            Service(dev_config(tmp_path, broker.port, workers=2, metrics_port=port,
                               extra=f"max_size_mb = {len(image) * 3 / 2**20:.3f}\n")) as svc:
        wait_events(tmp_path, "gateway.connected", count=2)
        wait_events(tmp_path, "gateway.metrics_listening", port=port)
        before = scrape(port)
        assert metric(before, "clinic_gateway_up") == 1
        assert metric(before, "clinic_gateway_workers_alive") == 2
        uplinks, _ = devices(tmp_path, broker.port, count=1, captures=1, image=image)
        big, _ = devices(tmp_path, broker.port, count=1, captures=1, image=image * 4,
                         prefix="big")
        deliver(uplinks + big)
        text = scrape(port)
        assert metric(text, "clinic_gateway_captures_stored_total") == 1
        assert metric(text, "clinic_gateway_captures_rejected_total", reason="too_large") == 1
        assert metric(text, "clinic_gateway_transfer_seconds_count") == 1
        assert 0 < metric(text, "clinic_gateway_transfer_seconds_sum") < 60
        seen = metric(text, "clinic_gateway_device_last_seen_timestamp_seconds",
                      device_id="svc-0000")
        assert time.time() - 120 < seen <= time.time()
        # The committed transfer's staging goes after its ack (off the ack path): wait for it.
        deadline = time.monotonic() + 30
        while metric(scrape(port), "clinic_gateway_staging_bytes") != 0:
            assert time.monotonic() < deadline, "the staging was never cleaned up"
            time.sleep(0.05)
        assert metric(text, "clinic_gateway_workers_configured") == 2
        assert svc.stop() == 0


def test_a_metrics_port_in_use_stops_the_service_with_the_fields_named(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = gateway_cmd("run", "--config", str(dev_config(tmp_path, 1, metrics_port=port)))
    assert result.returncode == 1
    assert f"metrics.address, metrics.port: cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr
    assert not events(tmp_path, "gateway.worker_started")  # no worker left behind


# -- check --------------------------------------------------------------------------------
def test_check_on_a_bench_says_every_line_and_not_fit(tmp_path):
    with MosquittoBroker(tmp_path / "broker") as broker:
        result = gateway_cmd("check", "--config", str(dev_config(tmp_path, broker.port)))
    assert result.returncode == 1, result.stdout
    lines = {line.split()[1]: line.split()[0] for line in result.stdout.splitlines()
             if line.strip() and not line.startswith(("fit", "NOT"))}
    assert {k: lines[k] for k in ("config", "store", "broker", "audit")} == dict.fromkeys(
        ("config", "store", "broker", "audit"), "ok")
    assert lines["disk"] in ("ok", "WARN")
    assert {k: lines[k] for k in ("mode", "tls", "sealing", "signing")} == dict.fromkeys(
        ("mode", "tls", "sealing", "signing"), "FAIL")
    assert "NOT fit" in result.stdout


def test_check_fails_on_a_broken_audit_chain(tmp_path):
    config = dev_config(tmp_path, free_port())
    audit = tmp_path / "store" / ".gateway" / "audit.jsonl"
    audit.parent.mkdir(parents=True, mode=0o750)
    (tmp_path / "store").chmod(0o750)
    audit.write_text('{"seq": 1, "prev": "0", "event": "ack.sent"}\n')
    result = gateway_cmd("check", "--config", str(config), "--no-broker")
    assert result.returncode == 1
    assert re.search(r"(?m)^FAIL\s+audit\s+", result.stdout), result.stdout


def secure_config(tmp_path: Path, ca: TestCA, port: int, workers: int = 2) -> Path:
    tls = tmp_path / "tls"
    tls.mkdir()
    for n in range(1, workers + 1):
        issued = ca.issue("gateway" if n == 1 else f"gateway-{n}", checked=False)
        issued.cert.rename(tls / f"gateway-{n}.crt")
        issued.key.rename(tls / f"gateway-{n}.key")
    commander = ca.issue("commander")
    sealing, sign = make_keys(tmp_path / "keys")
    store = tmp_path / "store"
    store.mkdir(mode=0o750)
    path = tmp_path / "config.toml"
    path.write_text(
        f'[broker]\nhost = "localhost"\nport = {port}\nca_file = "{ca.cert_path}"\n'
        f'cert_file = "{tls}/gateway-{{n}}.crt"\nkey_file = "{tls}/gateway-{{n}}.key"\n'
        f'command_cert_file = "{commander.cert}"\ncommand_key_file = "{commander.key}"\n'
        f'[store]\ndir = "{store}"\n[keys]\nsealing = ["{sealing}"]\nsigning = "{sign}"\n'
        f'[service]\nworkers = {workers}\nlog_file = "{tmp_path / "events.jsonl"}"\n'
        f'[metrics]\nenabled = false\n')
    return path


#: What docs/gateway.md asks clinic IT to add for worker 2 (the guard plugin's trusted
#: names come from these ``user`` lines in the test broker, as from plugin_opt_trusted).
WORKER_2_ACL = """
user gateway-2
topic read derm/v1/+/up/#
topic read derm/v1/+/status
topic read derm/v1/+/resp/#
topic write derm/v1/+/ack/#
topic write derm/v1/+/cmd/#
"""


def sealed_devices(tmp_path: Path, ca: TestCA, port: int, count: int, captures: int
                   ) -> tuple[list[Uplink], set[str]]:
    """Provisioned devices: their own certificates, captures sealed to the clinic's key,
    acks trusted only when signed by the clinic's signing key (the config's keys)."""
    clinic_key = seal.load_private_key(tmp_path / "keys" / "clinic.pem").public_key()
    trust = signing.Trust.of([signing.load_private_key(tmp_path / "keys" / "signing.pem")
                              .public_key()])
    image = _sample_image()
    uplinks, accepted = [], set()
    for d in range(count):
        device_id = f"sec-{d:04d}"
        issued = ca.issue(device_id)
        config = UplinkConfig(host="localhost", port=port, ca_file=ca.cert_path,
                              cert_file=issued.cert, key_file=issued.key, ack_timeout=20.0,
                              retry_min=0.2, retry_max=3.0)
        outbox = Outbox(tmp_path / "devices" / device_id, 1 << 30)
        for _ in range(captures):
            capture_id = uuid.uuid4().hex
            bundle = pack({"capture_id": capture_id, "device_id": device_id,
                           "schema": "dermascope.capture/1"}, image)
            outbox.put(capture_id, seal.seal(bundle, clinic_key, device_id, capture_id))
            accepted.add(capture_id)
        uplinks.append(Uplink(config, device_id, outbox, __version__, trust=trust))
    return uplinks, accepted


def test_two_workers_with_their_own_certificates_on_the_shipped_broker(tmp_path):
    """The shipped broker config with worker 2's ACL block: check is fit (exit 0); both
    workers subscribe under their own CN and stay connected (neither evicts the other), and
    sealed captures of provisioned devices are opened with keys.sealing, acked under
    keys.signing (the devices trust nothing else) and stored once each."""
    ca = TestCA(tmp_path / "pki")
    with SecureMosquitto(tmp_path / "broker", ca, extra_acl=WORKER_2_ACL) as broker:
        config = secure_config(tmp_path, ca, broker.port)
        result = gateway_cmd("check", "--config", str(config))
        assert result.returncode == 0, result.stdout
        assert "fit to receive captures" in result.stdout
        for who in ("worker 1 (CN gateway)", "worker 2 (CN gateway-2)", "commander"):
            assert who in result.stdout
        with Service(config) as service:
            wait_events(tmp_path, "gateway.connected", count=2)
            for n in (1, 2):
                wait_events(tmp_path, "gateway.connected", worker=n)
            uplinks, accepted = sealed_devices(tmp_path, ca, broker.port, count=3, captures=2)
            deliver(uplinks)
            assert service.stop() == 0
        stored = Counter(e["capture_id"] for e in events(tmp_path, "capture.stored"))
        assert stored == Counter(accepted)  # each once
        assert {p.stem for p in (tmp_path / "store").glob("sec-*/*.jpg")} == accepted
        assert not events(tmp_path, "gateway.worker_died")
        assert len(events(tmp_path, "gateway.connected")) == 2  # no reconnects: no eviction


def test_check_fails_on_an_expired_worker_certificate(tmp_path):
    ca = TestCA(tmp_path / "pki")
    config = secure_config(tmp_path, ca, free_port())
    expired = ca.issue("gateway-2", checked=False, days=1,
                       valid_from=dt.datetime.now(dt.UTC) - dt.timedelta(days=10))
    expired.cert.replace(tmp_path / "tls" / "gateway-2.crt")
    expired.key.replace(tmp_path / "tls" / "gateway-2.key")
    result = gateway_cmd("check", "--config", str(config), "--no-broker")
    assert result.returncode == 1, result.stdout
    assert re.search(r"(?m)^FAIL\s+tls\s+worker 2 \(CN gateway-2\): expired 9 days ago",
                     result.stdout), result.stdout
    assert re.search(r"(?m)^ok\s+tls\s+worker 1 \(CN gateway\)", result.stdout)


def _blocked_signals(pid: int, tid: str) -> int:
    status = Path(f"/proc/{pid}/task/{tid}/status").read_text()
    return int(re.search(r"^SigBlk:\s+([0-9a-f]+)$", status, re.M).group(1), 16)


def test_only_the_main_thread_of_a_gateway_takes_sigterm(tmp_path):
    """A SIGTERM the kernel hands to one of the gateway's other threads never wakes the main
    thread, where Python runs the handler: the gateway then did not stop (seen in a full
    run). Every thread but the main one blocks SIGTERM and SIGINT."""
    with MosquittoBroker(tmp_path / "broker") as broker:
        proc = subprocess.Popen([sys.executable, "-m", "clinic_gateway", "run", "--host",
                                 broker.host, "--port", str(broker.port), "--store",
                                 str(tmp_path / "store"), "--insecure-dev-mode"],
                                stdout=subprocess.PIPE, text=True)
        try:
            assert json.loads(proc.stdout.readline())  # it logs once it runs
            deadline = time.monotonic() + 30
            while len(os.listdir(f"/proc/{proc.pid}/task")) < 4:  # paho, after-ack, audit
                assert time.monotonic() < deadline, "the gateway never started its threads"
                threading.Event().wait(0.05)
            wanted = (1 << (signal.SIGTERM - 1)) | (1 << (signal.SIGINT - 1))
            for tid in os.listdir(f"/proc/{proc.pid}/task"):
                blocked = _blocked_signals(proc.pid, tid) & wanted
                assert blocked == (0 if int(tid) == proc.pid else wanted), tid
            proc.terminate()
            assert proc.wait(timeout=30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
