"""The PACS tests' helpers: a real Orthanc (sim/orthanc.py), the gateway's [pacs] pointing at
it, captures stored as the gateway stores them, and reading every instance back."""

from __future__ import annotations

import atexit
import contextlib
import datetime as dt
import io
import json
import socket
import ssl
import subprocess
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset

from clinic_gateway.config import PacsConfig
from clinic_gateway.exporter import Exporter
from clinic_gateway.forwarder import Forwarder
from clinic_gateway.pacs import make_sender
from sim.orthanc import PrivateOrthanc, reap
from sim.pki import TestCA

#: Attributes a PACS must hold exactly as the gateway wrote them.
KEY_ATTRIBUTES = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID",
                  "Modality", "Rows", "Columns", "DeviceSerialNumber", "AccessionNumber",
                  "LightSourcePolarization", "ContactMethod", "ContentDate", "ContentTime",
                  "InstanceNumber")


#: Orthancs told to stop whose exit nobody waited for yet (``running_orthanc``).
_EXITING: list[subprocess.Popen] = []


@contextmanager
def running_orthanc(folder: Path, lua: str | None = None,
                    tls: TestCA | None = None) -> Iterator[PrivateOrthanc]:
    """A private Orthanc for one test. Its stop (~3.5 s of Orthanc polling for it) runs on
    while the next tests do: the exit is waited for when the test session ends."""
    orthanc = PrivateOrthanc(folder, lua=lua, tls=tls)
    orthanc.start()
    try:
        yield orthanc
    finally:
        exiting = orthanc.stop(wait=False)
        if exiting is not None:
            _EXITING.append(exiting)


@atexit.register
def _reap_exiting() -> None:
    while _EXITING:
        reap(_EXITING.pop())


def pacs_section(orthanc: PrivateOrthanc, transport: str, **extra: object) -> dict:
    """The [pacs] table for ``orthanc`` (fast retries: a test's PACS comes back in seconds)."""
    return {**orthanc.pacs_section(transport), "timeout_s": 10.0, "retry_initial_s": 0.05,
            "retry_max_s": 0.4, "poll_interval_s": 0.05, **extra}


def pacs_config(orthanc: PrivateOrthanc, transport: str, **extra: object) -> PacsConfig:
    return PacsConfig.model_validate(pacs_section(orthanc, transport, **extra))


def toml_table(name: str, values: dict) -> str:
    return f"[{name}]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items())


def capture_metadata(device_id: str, capture_id: str, minute: int = 0) -> dict:
    taken = dt.datetime(2026, 11, 25, 12, 30, tzinfo=dt.UTC) + dt.timedelta(minutes=minute)
    return {"capture_id": capture_id, "device_id": device_id,
            "schema": "dermascope.capture/1", "captured_at": taken.isoformat(),
            "software_version": "0.1.0", "camera": {"model": "imx477"},
            "dicom": {"LightSourcePolarization": "POLARIZED", "ContactMethod": "CONTACT",
                      "ImmersionMedia": "NONE", "OpticalMagnificationFactor": 10.0}}


def store_capture(store: Path, device_id: str, capture_id: str, jpeg: bytes,
                  minute: int = 0) -> Path:
    """A capture as the gateway stores it, then its after-ack work by the real exporter with
    forwarding on: its DICOM file, queued for the PACS. The DICOM file's path."""
    folder = store / device_id
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{capture_id}.jpg").write_bytes(jpeg)
    (folder / f"{capture_id}.json").write_text(
        json.dumps(capture_metadata(device_id, capture_id, minute)), encoding="utf-8")
    out = io.StringIO()
    Exporter(store, out, forward=True).do(device_id, capture_id, dicom=True)
    said = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [e["event"] for e in said] == ["pacs.queued"], said
    return folder / f"{capture_id}.dcm"


def read_back(orthanc: PrivateOrthanc) -> dict[str, Dataset]:
    """Every instance Orthanc holds, as its stored DICOM file, by SOP Instance UID."""
    found: dict[str, Dataset] = {}
    for orthanc_id in orthanc.instances():
        ds = dcmread(io.BytesIO(orthanc.instance_file(orthanc_id)))
        assert ds.SOPInstanceUID not in found, f"two instances {ds.SOPInstanceUID}"
        found[ds.SOPInstanceUID] = ds
    return found


def assert_same_instance(sent: Path, held: Dataset) -> None:
    """What the PACS holds is what the gateway wrote: pixel data byte for byte, and the
    key attributes."""
    ours = dcmread(sent)
    assert held.PixelData == ours.PixelData
    assert held.file_meta.TransferSyntaxUID == ours.file_meta.TransferSyntaxUID
    for name in KEY_ATTRIBUTES:
        assert held.get(name) == ours.get(name), name


def forwarder(store: Path, orthanc: PrivateOrthanc, transport: str = "stow-rs") -> Forwarder:
    c = pacs_config(orthanc, transport)
    return Forwarder(store, make_sender(c), retry_initial=c.retry_initial_s,
                     retry_max=c.retry_max_s, poll_interval=c.poll_interval_s)


class Running:
    """A forwarder on a thread of the test, stopped at the end."""

    def __init__(self, fw: Forwarder) -> None:
        self.fw = fw
        self.stop = threading.Event()
        self.thread = threading.Thread(target=fw.run, args=(self.stop,), daemon=True)

    def __enter__(self) -> Running:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(15)
        assert not self.thread.is_alive()


class TlsFront:
    """HTTPS in front of Orthanc's plain HTTP, as clinics put a reverse proxy in front of a
    PACS's DICOMweb (Debian's Orthanc 1.10.1 crashes on its own HTTPS): TLS with a server
    certificate of ``ca``, requiring a client certificate of ``ca``; each connection's bytes
    are relayed to Orthanc unchanged."""

    def __init__(self, orthanc: PrivateOrthanc, ca: TestCA) -> None:
        self.target = (orthanc.host, orthanc.http_port)
        server = ca.issue("pacs", server=True, checked=False)
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH,
                                                  cafile=str(ca.cert_path))
        self.context.verify_mode = ssl.CERT_REQUIRED
        self.context.load_cert_chain(str(server.cert), str(server.key))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.2)
        self.port = self.listener.getsockname()[1]
        self.url = f"https://127.0.0.1:{self.port}/dicom-web"
        self.stop = threading.Event()
        self.threads: list[threading.Thread] = []
        self.sockets: list[socket.socket] = []

    def __enter__(self) -> TlsFront:
        self._start(self._accept)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for s in self.sockets:  # a kept-alive connection's pumps end now
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
        for thread in self.threads:
            thread.join(10)
        self.listener.close()

    def _start(self, target: Callable[..., None], *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        self.threads.append(thread)
        thread.start()

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                raw, _ = self.listener.accept()
            except TimeoutError:
                continue
            raw.settimeout(10)
            try:
                client = self.context.wrap_socket(raw, server_side=True)
            except (ssl.SSLError, OSError):
                raw.close()  # a client that does not trust us, or has no certificate
                continue
            upstream = socket.create_connection(self.target, timeout=10)
            self.sockets += [client, upstream]
            self._start(self._pump, client, upstream)
            self._start(self._pump, upstream, client)

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while not self.stop.is_set() and (data := source.recv(1 << 16)):
                sink.sendall(data)
        for s in (source, sink):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
