"""``device-agent demo``: the whole device, end to end, on the simulator.

A private Mosquitto on a free loopback port, the reference gateway, and a simulated device
whose button is pressed with a mix of good and defective scenes. Every JSON log event lands
in ``*.jsonl`` files under the output folder. The verdict of the run comes from those files
and the gateway's stored images, not from the agent's own bookkeeping: it exits 0 only if
every capture the agent reported accepted was stored at the gateway with the right SHA-256.

When Orthanc is installed (Debian packages orthanc and orthanc-dicomweb, ``make
system-deps``) the gateway also delivers to a private Orthanc, the clinic's PACS stand-in
(``<out>/pacs``, loopback ports): its exporter queues every DICOM object and a forwarder
sends it over DICOMweb STOW-RS, as ``[pacs]`` configures the service. The run then also
needs every stored DICOM object read back from Orthanc by its SOP Instance UID, and the demo
prints where to see the images in Orthanc's own web viewer.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import shutil
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from clinic_gateway import exporter
from clinic_gateway.config import PacsConfig
from clinic_gateway.forwarder import Forwarder, pending
from clinic_gateway.gateway import Gateway
from clinic_gateway.pacs import make_sender
from clinic_gateway.web.auth import Staff, hash_password
from clinic_gateway.web.server import WebServer, beside
from dermascope_wire import signing
from dermascope_wire.logs import add_json_handler
from dermascope_wire.seal import generate_keypair, public_key_pem
from device_agent.config import Config
from sim.device import SimDevice, sim_config
from sim.orthanc import PrivateOrthanc, find_orthanc
from sim.pki import TestCA
from sim.secure_broker import SecureMosquitto

DEVICE_ID = "demo-0001"
AGENT_LOG = "agent.jsonl"
GATEWAY_LOG = "gateway.jsonl"

# (scene defect, then hold to override a retake?) pressed in turn; pristine scenes between
# defects so a person watching sees both verdicts.
PLAN: tuple[tuple[str | None, bool], ...] = (
    (None, False),
    ("defocus", False),
    (None, False),
    ("glare", False),
    ("underexposed", True),
    (None, False),
    ("motion", False),
    ("overexposed", False),
    (None, False),
    ("off_centre", False),
)


@dataclass
class Verification:
    accepted: set[str]
    delivered: set[str]
    stored: dict[str, Path]
    bad: list[str]

    @property
    def ok(self) -> bool:
        return not self.bad and self.accepted <= set(self.stored)


@dataclass(frozen=True)
class Clinic:
    """The demo's stand-in for a clinic: a CA, the broker's and gateway's certificates,
    the device's identity, the clinic's sealing key pair and the gateway's signing key
    pair (acks and commands)."""

    ca: TestCA
    device_cert: Path
    device_key: Path
    gateway_tls: dict[str, str]
    # The clinic's command tool has its own certificate: the broker binds a connection's
    # client id to its certificate, so two connections on one certificate evict each other.
    commander_tls: dict[str, str]
    seal_public: Path
    seal_private: X25519PrivateKey
    signing_public: Path
    signing_private: Ed25519PrivateKey


def make_clinic(folder: Path, device_id: str) -> Clinic:
    ca = TestCA(folder)
    device = ca.issue(device_id)
    private, public = generate_keypair()
    seal_public = folder / "clinic-seal.pub.pem"
    seal_public.write_bytes(public_key_pem(public))
    tls = {name: {"ca_certs": str(ca.cert_path), "certfile": str(issued.cert),
                  "keyfile": str(issued.key)}
           for name, issued in (("gateway", ca.issue("gateway")),
                                ("commander", ca.issue("commander")))}
    signing_private = signing.generate_key()
    signing_public = folder / "gateway-sign.pub.pem"
    signing_public.write_bytes(signing.public_key_pem(signing_private.public_key()))
    return Clinic(ca, device.cert, device.key, tls["gateway"], tls["commander"], seal_public,
                  private, signing_public, signing_private)


def demo_config(out: Path, port: int, seed: int, clinic: Clinic) -> Config:
    return sim_config(
        out / "device", port, DEVICE_ID, sim={"seed": seed},
        uplink={"insecure_dev_mode": False, "host": "localhost",
                "ca_file": str(clinic.ca.cert_path), "cert_file": str(clinic.device_cert),
                "key_file": str(clinic.device_key)},
        security={"clinic_public_key": str(clinic.seal_public),
                  "gateway_public_key": [str(clinic.signing_public)]})


def _events(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def verify(out: Path) -> Verification:
    """Check the run from its log files and the gateway's stored files alone."""
    agent = _events(out / AGENT_LOG)
    gateway = _events(out / GATEWAY_LOG)
    accepted = {e["capture_id"] for e in agent if e.get("event") == "capture.accepted"}
    delivered = {e["capture_id"] for e in agent if e.get("event") == "capture.delivered"}
    stored: dict[str, Path] = {}
    bad: list[str] = []
    for event in gateway:
        if event.get("event") != "capture.stored":
            continue
        path = Path(event["path"])
        path = path if path.is_absolute() else out / path
        if not path.is_file():
            bad.append(f"{event['capture_id']}: stored file {path} is missing")
        elif hashlib.sha256(path.read_bytes()).hexdigest() != event["sha256"]:
            bad.append(f"{event['capture_id']}: {path} does not match its sha256")
        else:
            stored[event["capture_id"]] = path
    for missing in sorted(accepted - set(stored)):
        bad.append(f"{missing}: accepted on the device but never stored at the gateway")
    return Verification(accepted, delivered, stored, bad)


def _fresh(out: Path) -> None:
    """Remove what an earlier demo left in ``out`` (only the demo's own files)."""
    for name in (AGENT_LOG, GATEWAY_LOG):
        (out / name).unlink(missing_ok=True)
    for name in ("device", "gateway", "broker", "clinic", "pacs"):
        shutil.rmtree(out / name, ignore_errors=True)


def run_demo(out: Path, captures: int, seed: int = 7) -> int:
    if captures < 1:
        print("device-agent demo: --captures must be at least 1")
        return 2
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    _fresh(out)
    handlers = [
        add_json_handler("device_agent", path=out / AGENT_LOG),
        add_json_handler("clinic_gateway", path=out / GATEWAY_LOG),
    ]
    started = time.monotonic()
    web_problems: list[str] = []
    pacs_problems: list[str] = []
    pacs_summary: list[str] = []
    try:
        clinic = make_clinic(out / "clinic", DEVICE_ID)
        with ExitStack() as stack:
            broker = stack.enter_context(SecureMosquitto(out / "broker", clinic.ca))
            print(f"broker    Mosquitto on {broker.host}:{broker.port} (private, loopback), "
                  "mutual TLS with the shipped config and ACL")
            pacs = _start_pacs(out / "pacs", stack)
            gateway = Gateway(broker.host, broker.port, out / "gateway",
                              private_keys=[clinic.seal_private], tls=clinic.gateway_tls,
                              signing_key=clinic.signing_private,
                              command_tls=clinic.commander_tls)
            if pacs is not None:
                gateway.exporter_command = exporter.command(forward=True)
            with gateway, GPPage(gateway, clinic) as page:
                kid = signing.key_id(clinic.signing_private.public_key())
                print("gateway   reference receiver, holds the clinic's sealing key; signs "
                      f"every ack and command (Ed25519 key {kid}); opens the case")
                forwarding = _forward(pacs, gateway.store_dir, stack)
                _press_through(demo_config(out, broker.port, seed, clinic), captures, seed,
                               gateway)
                web_problems = page.check(DEVICE_ID)
                if pacs is not None and forwarding is not None:
                    pacs_problems, pacs_summary = _check_pacs(pacs, gateway.store_dir)
                page.linger()
                if forwarding is not None:
                    forwarding.set()
    finally:
        for handler in handlers:
            for name in ("device_agent", "clinic_gateway"):
                logging.getLogger(name).removeHandler(handler)
            handler.close()
    result = verify(out)
    result.bad.extend(web_problems)
    seconds = time.monotonic() - started
    print()
    print(f"summary   {captures} presses, {len(result.accepted)} accepted, "
          f"{len(result.delivered)} delivered, {len(result.stored)} stored and verified "
          f"at the gateway, in {seconds:.1f} s")
    print(f"files     images, JSON sidecars and DICOM files under {out / 'gateway'}")
    print(f"logs      {out / AGENT_LOG}, {out / GATEWAY_LOG}")
    for line in pacs_summary:
        print(line)
    for problem in result.bad + pacs_problems:
        print(f"PROBLEM   {problem}")
    ok = result.ok and not pacs_problems
    print("result    " + ("OK: every accepted capture was stored and verified" if ok
                          else "FAILED"))
    return 0 if ok else 1


def _start_pacs(folder: Path, stack: ExitStack) -> PrivateOrthanc | None:
    """A private Orthanc for the gateway to deliver to, if Orthanc is installed."""
    if find_orthanc() is None:
        print("pacs      Orthanc is not installed (make system-deps): no PACS delivery")
        return None
    pacs = stack.enter_context(PrivateOrthanc(folder))
    print(f"pacs      Orthanc on {pacs.host}:{pacs.http_port} (private, loopback): the "
          "clinic's PACS, fed over DICOMweb STOW-RS")
    return pacs


def _forward(pacs: PrivateOrthanc | None, store: Path, stack: ExitStack
             ) -> threading.Event | None:
    """The gateway's PACS forwarder on a thread, until the returned event is set (or the
    demo ends)."""
    if pacs is None:
        return None
    config = PacsConfig.model_validate({**pacs.pacs_section("stow-rs"), "timeout_s": 10.0,
                                        "retry_initial_s": 0.2, "retry_max_s": 2.0,
                                        "poll_interval_s": 0.1})
    forwarder = Forwarder(store, make_sender(config), retry_initial=config.retry_initial_s,
                          retry_max=config.retry_max_s, poll_interval=config.poll_interval_s)
    stop = threading.Event()
    thread = threading.Thread(target=forwarder.run, args=(stop,), name="pacs-forwarder",
                              daemon=True)
    thread.start()

    def join() -> None:
        stop.set()
        thread.join(15)

    stack.callback(join)
    return stop


def _check_pacs(pacs: PrivateOrthanc, store: Path) -> tuple[list[str], list[str]]:
    """Wait (bounded) for the forward queue to empty, then read back from Orthanc every
    DICOM object the gateway stored: (problems, summary lines)."""
    deadline = time.monotonic() + 60.0
    while pending(store) and time.monotonic() < deadline:
        time.sleep(0.1)
    from pydicom import dcmread  # the gateway's dependency; only the PACS part needs it

    wanted = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID): p
              for p in sorted(store.glob("*/*.dcm"))}
    held = pacs.sop_instance_uids()
    problems = [f"{path.stem}: DICOM object {uid} never reached the PACS (Orthanc)"
                for uid, path in wanted.items() if uid not in held]
    found = len(wanted) - len(problems)
    summary = [
        f"pacs      {found} of {len(wanted)} DICOM objects read back from Orthanc by SOP "
        f"Instance UID ({len(held)} instances there)",
        f"viewer    {pacs.explorer_url}  (user {pacs.user}, password {pacs.password}); "
        "it stops with the demo: to look again, /usr/sbin/Orthanc "
        f"{pacs.config_path}",
    ]
    return problems, summary


class GPPage:
    """The GP's page and the API (clinic_gateway/web) beside the demo's gateway, on a
    loopback port, with a demo login made for this run; it watches the devices' status with
    its own certificate (CN "monitor", the shipped ACL's)."""

    USER = "gp"

    def __init__(self, gateway: Gateway, clinic: Clinic) -> None:
        self.password = secrets.token_urlsafe(9)
        monitor = clinic.ca.issue("monitor")
        self.parts = beside(gateway, Staff({self.USER: hash_password(self.password)}, {}),
                            status_tls={"ca_certs": str(clinic.ca.cert_path),
                                        "certfile": str(monitor.cert),
                                        "keyfile": str(monitor.key)})
        self.server = WebServer(self.parts.app)

    def __enter__(self) -> GPPage:
        self.server.start()
        print(f"web       the GP's page: {self.server.url}/  (demo login {self.USER} / "
              f"{self.password}; API described at {self.server.url}/openapi.json)")
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.stop()
        self.parts.board.stop()

    def check(self, device_id: str) -> list[str]:
        """Sign in as the GP would and check that the case's captures are on the page, each
        with its verdict and thumbnail; the problems found, if any."""
        import httpx

        problems = []
        with httpx.Client(base_url=self.server.url, timeout=30) as http:
            form = http.get("/login").text
            csrf = form.split('name="csrf_token" value="', 1)[1].split('"', 1)[0]
            http.post("/login", data={"username": self.USER, "password": self.password,
                                      "csrf_token": csrf})
            state = http.get(f"/api/v1/devices/{device_id}").json().get("state")
            if state not in ("online", "offline"):
                problems.append(f"{device_id}: the GP's page never saw its status ({state})")
            listed = http.get(f"/api/v1/devices/{device_id}/captures")
            if listed.status_code != 200:
                return [f"the GP's page answered {listed.status_code} for the captures"]
            shown = listed.json()["captures"]
            stored = {p.stem for p in (self.parts.desk.store_dir / device_id).glob("*.jpg")}
            for capture in shown:
                thumb = http.get(capture["thumbnail_url"])
                if thumb.status_code != 200 or not thumb.content.startswith(b"\xff\xd8"):
                    problems.append(f"{capture['capture_id']}: no thumbnail on the GP's page")
            missing = stored - {c["capture_id"] for c in shown}
            problems.extend(f"{c}: stored but not on the GP's page" for c in sorted(missing))
            verdicts = ", ".join(c["verdict"] or "?" for c in shown)
            print(f"web       {len(shown)} captures of the case on the GP's page with their "
                  f"thumbnails ({verdicts})")
        return problems

    def linger(self) -> None:
        """Keep the page up DEMO_WEB_SECONDS (default 0) for a person to look at it."""
        seconds = float(os.environ.get("DEMO_WEB_SECONDS", "0") or 0)
        if seconds > 0:
            print(f"web       the GP's page stays up {seconds:g} s: {self.server.url}/")
            threading.Event().wait(seconds)


def _press_through(config: Config, captures: int, seed: int, gateway: Gateway) -> None:
    with SimDevice(config) as device:
        print(f"device    {config.device.id}: sealed to the clinic key (HPKE), mutual TLS, "
              "acts only on signed acks and commands")
        device.wait_online()
        # Through the gateway: it records the case, so it files the case's captures.
        answer = gateway.open_case(config.device.id, "DEMO-CASE-1",
                                   anatomic_site="posterior torso")
        print(f"command   open_case -> {'ok' if answer['ok'] else answer['error']}")
        for i in range(captures):
            defect, hold = PLAN[i % len(PLAN)]
            device.show(defect, seed=seed + i)
            outcome = device.press()
            scene = defect or "good"
            if outcome is None:
                print(f"press {i + 1:2d}  scene {scene:13s} -> no verdict (timed out)")
                continue
            why = f" ({', '.join(outcome.reasons)})" if outcome.reasons else ""
            print(f"press {i + 1:2d}  scene {scene:13s} -> {outcome.verdict}{why}"
                  f"  [{outcome.capture_id[:8]}]")
            if hold and outcome.verdict == "retake":
                kept = device.hold()
                if kept is not None:
                    print(f"          hold (override)     -> {kept.verdict}, kept and "
                          f"flagged overridden  [{kept.capture_id[:8]}]")
        answer = gateway.close_case(config.device.id)
        print(f"command   close_case -> {'ok' if answer['ok'] else answer['error']}")
        print("uplink    waiting for the gateway to acknowledge every capture ...")
        if device.uplink is not None and not device.uplink.wait_idle(timeout=60.0):
            print("uplink    not everything was acknowledged within 60 s")
        # The DICOM export follows each ack in the gateway's exporter process: the demo
        # leaves every stored capture's DICOM object (DESIGN section 10).
        if not gateway.wait_exported(60.0):
            print("gateway   not every DICOM export was done within 60 s")
