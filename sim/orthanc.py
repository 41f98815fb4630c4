"""A private Orthanc (the clinic's PACS stand-in) on free loopback ports, for tests and the demo.

Its own config, storage and index folders under ``workdir``; the DICOMweb plugin loaded
(STOW-RS at ``/dicom-web/``); HTTP behind a user and password. Orthanc 1.10 has no bind
address: it listens on every interface, so it is locked to this machine instead: HTTP answers
loopback clients only (``RemoteAccessAllowed`` false) and C-STORE is accepted only from the
one calling AE title declared here at 127.0.0.1 (``DicomCheckModalityHost``).

Stopped and started again on the same folders and ports, it keeps what it stored: a PACS
that was down for a while (:meth:`PrivateOrthanc.stop`, :meth:`PrivateOrthanc.start`).

With ``tls`` (a :class:`sim.pki.TestCA`) its DICOM port speaks DICOM TLS and requires the
caller's certificate; the CA issues Orthanc's server certificate and the gateway's client
certificate (:attr:`PrivateOrthanc.client`). Its HTTP stays plain: the HTTPS of Debian's
Orthanc 1.10.1 ends the server with a segmentation fault at the first TLS connection.
"""

from __future__ import annotations

import base64
import json
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from sim.broker import free_port
from sim.pki import Issued, TestCA

ORTHANC_BINARIES = ("/usr/sbin/Orthanc", "/usr/bin/Orthanc")
DICOMWEB_PLUGINS = ("/usr/share/orthanc/plugins/libOrthancDicomWeb.so",
                    "/usr/lib/orthanc/libOrthancDicomWeb.so")
USER = "gateway"
PASSWORD = "orthanc-test-password"  # a throwaway server's, on loopback only
#: The calling AE title Orthanc accepts C-STOREs from (at 127.0.0.1 only).
GATEWAY_AET = "DERMGW"
ORTHANC_AET = "ORTHANC"


class OrthancError(RuntimeError):
    pass


def find_orthanc() -> tuple[str, str] | None:
    """(Orthanc's binary, its DICOMweb plugin), or None if either is not installed
    (Debian packages ``orthanc`` and ``orthanc-dicomweb``)."""
    binary = next((p for p in ORTHANC_BINARIES if Path(p).is_file()), shutil.which("Orthanc"))
    plugin = next((p for p in DICOMWEB_PLUGINS if Path(p).is_file()), None)
    if binary is None or plugin is None:
        return None
    return binary, plugin


def reap(proc: subprocess.Popen, timeout: float = 20.0) -> None:
    """Wait (at most ``timeout``, then SIGKILL) until a stopping Orthanc has exited."""
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


class PrivateOrthanc:
    def __init__(self, workdir: Path, lua: str | None = None, reopen: bool = False,
                 tls: TestCA | None = None) -> None:
        """``reopen``: the Orthanc an earlier run left in ``workdir`` (its config, ports and
        stored instances), e.g. the demo's, to look at it again."""
        found = find_orthanc()
        if found is None:
            raise OrthancError("Orthanc with its DICOMweb plugin is not installed (Debian "
                               "packages orthanc and orthanc-dicomweb; make system-deps)")
        self.binary, self.plugin = found
        self.workdir = Path(workdir).resolve()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.host = "127.0.0.1"
        self.user, self.password = USER, PASSWORD
        self.aet = ORTHANC_AET
        self.lua = lua
        self.proc: subprocess.Popen[bytes] | None = None
        self._log = None
        self.ca = tls
        self.server: Issued | None = None
        self.client: Issued | None = None
        if tls is not None:
            self.server = tls.issue("pacs", server=True, checked=False)
            self.client = tls.issue("gateway-pacs-client", checked=False)
        if reopen:
            config = json.loads(self.config_path.read_text(encoding="utf-8"))
            self.http_port, self.dicom_port = config["HttpPort"], config["DicomPort"]
        else:
            self.http_port = free_port()
            self.dicom_port = free_port()
            self._write_config()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.url}/dicom-web"

    @property
    def explorer_url(self) -> str:
        """Orthanc's own web viewer (Orthanc Explorer)."""
        return f"{self.url}/app/explorer.html"

    @property
    def config_path(self) -> Path:
        return self.workdir / "orthanc.json"

    def _write_config(self) -> None:
        config: dict[str, Any] = {
            "Name": "dermascope-test-pacs",
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "index"),
            "Plugins": [self.plugin],
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": True,
            "RegisteredUsers": {self.user: self.password},
            "HttpTimeout": 10,
            "DicomServerEnabled": True,
            "DicomAet": self.aet,
            "DicomPort": self.dicom_port,
            "DicomCheckCalledAet": True,
            "DicomAlwaysAllowEcho": False,
            "DicomAlwaysAllowStore": False,
            "DicomCheckModalityHost": True,
            # The port is where Orthanc would call the gateway back (C-MOVE): never used here.
            "DicomModalities": {"gateway": [GATEWAY_AET, "127.0.0.1", 104]},
            "DicomScpTimeout": 10,
            "OverwriteInstances": False,
            "SaveJobs": False,
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False,
                         "Host": self.host},
        }
        if self.server is not None and self.ca is not None:
            config.update({
                "DicomTlsEnabled": True, "DicomTlsCertificate": str(self.server.cert),
                "DicomTlsPrivateKey": str(self.server.key),
                "DicomTlsTrustedCertificates": str(self.ca.cert_path),
                "DicomTlsRemoteCertificateRequired": True})
        if self.lua is not None:
            script = self.workdir / "filter.lua"
            script.write_text(self.lua, encoding="utf-8")
            config["LuaScripts"] = [str(script)]
        self.config_path.write_text(json.dumps(config, indent=2), encoding="utf-8")

    def start(self, timeout: float = 30.0) -> None:
        """Start Orthanc and wait (at most ``timeout``) until its REST API answers."""
        if self.proc is not None and self.proc.poll() is None:
            return
        self._log = open(self.workdir / "orthanc.log", "ab")  # noqa: SIM115 - kept open
        self.proc = subprocess.Popen([self.binary, str(self.config_path)],
                                     stdout=self._log, stderr=subprocess.STDOUT,
                                     cwd=self.workdir)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise OrthancError(f"Orthanc exited with {self.proc.returncode} at start; "
                                   f"see {self.workdir / 'orthanc.log'}")
            try:
                self.get("/system", timeout=1.0)
                return
            except (OSError, OrthancError):
                if time.monotonic() > deadline:
                    self.stop()
                    raise OrthancError(f"Orthanc did not answer within {timeout} s; see "
                                       f"{self.workdir / 'orthanc.log'}") from None
                time.sleep(0.05)

    def stop(self, timeout: float = 20.0, *, wait: bool = True) -> subprocess.Popen | None:
        """SIGTERM, then wait (at most ``timeout``, then SIGKILL) until Orthanc has exited:
        about 3.5 s, its HTTP and DICOM servers poll for the stop. ``wait=False`` returns the
        exiting process instead, for a caller that reaps it later (``reap``)."""
        proc, self.proc = self.proc, None
        exiting = None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            if wait:
                reap(proc, timeout)
            else:
                exiting = proc
        if self._log is not None:
            self._log.close()  # Orthanc writes on through its own copy
            self._log = None
        return exiting

    def __enter__(self) -> PrivateOrthanc:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def pacs_section(self, transport: str) -> dict[str, Any]:
        """The gateway's ``[pacs]`` table for this Orthanc (its password written to a file
        beside the config, as the gateway wants it)."""
        password = self.workdir / "pacs-password"
        password.write_text(self.password + "\n", encoding="utf-8")
        password.chmod(0o600)
        tls: dict[str, Any] = {}
        if self.ca is not None and self.client is not None:
            tls = {"ca_file": str(self.ca.cert_path), "cert_file": str(self.client.cert),
                   "key_file": str(self.client.key)}
        if transport == "stow-rs":
            return {"enabled": True, "transport": transport, "url": self.dicomweb_url,
                    "username": self.user, "password_file": str(password)}
        return {"enabled": True, "transport": transport, "host": self.host,
                "port": self.dicom_port, "called_ae_title": self.aet,
                "calling_ae_title": GATEWAY_AET, **tls}

    # -- its REST API, for reading back what was stored --------------------------------------
    def _request(self, path: str, timeout: float) -> bytes:
        request = urllib.request.Request(self.url + path)
        token = base64.b64encode(f"{self.user}:{self.password}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as answer:
                return answer.read()
        except urllib.error.HTTPError as err:
            raise OrthancError(f"GET {path}: HTTP {err.code}") from None

    def get(self, path: str, timeout: float = 10.0) -> Any:
        return json.loads(self._request(path, timeout))

    def instances(self) -> list[str]:
        """Orthanc's ids of every stored instance."""
        return list(self.get("/instances"))

    def instance_file(self, orthanc_id: str) -> bytes:
        """The stored DICOM file (Part 10) of one instance."""
        return self._request(f"/instances/{orthanc_id}/file", timeout=30.0)

    def instance_preview(self, orthanc_id: str) -> bytes:
        """The image as Orthanc's viewer renders it (PNG): proof it decodes the pixel data."""
        return self._request(f"/instances/{orthanc_id}/preview", timeout=30.0)

    def sop_instance_uids(self) -> dict[str, str]:
        """SOP Instance UID -> Orthanc id, of every stored instance."""
        return {self.get(f"/instances/{i}")["MainDicomTags"]["SOPInstanceUID"]: i
                for i in self.instances()}
