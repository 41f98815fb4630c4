"""A private Mosquitto running the shipped mutual-TLS config and ACL (deploy/mosquitto/).

Only what must differ on a test machine is replaced: the port (loopback only), the
certificate and CRL paths (a throwaway CA from :mod:`sim.pki`), the ACL's path and the
path of the dermascope_guard plugin, built here from its shipped source. Everything else is
the file clinic IT installs, so the tests prove the real thing.
"""

from __future__ import annotations

import getpass
import hashlib
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from sim.broker import BrokerError, MosquittoBroker
from sim.pki import TestCA

DEPLOY = Path(__file__).resolve().parent.parent / "deploy" / "mosquitto"
SHIPPED_CONF = DEPLOY / "dermascope.conf"
SHIPPED_ACL = DEPLOY / "dermascope.acl"
GUARD_SOURCE = DEPLOY / "dermascope_guard.c"

_build_lock = threading.Lock()


def render_conf(text: str, values: dict[str, str]) -> str:
    """Replace the value of each directive named in ``values``; fail if one is missing."""
    for key, value in values.items():
        text, count = re.subn(rf"(?m)^{re.escape(key)} .*$", f"{key} {value}", text)
        if count != 1:
            raise ValueError(f"directive {key!r} appears {count} times in the shipped config")
    return text


def shipped_directive(key: str) -> str:
    """The value of ``key`` in the shipped config."""
    match = re.search(rf"(?m)^{re.escape(key)} (.*)$", SHIPPED_CONF.read_text(encoding="utf-8"))
    if not match:
        raise ValueError(f"directive {key!r} is not in the shipped config")
    return match.group(1).strip()


def build_guard_plugin() -> Path:
    """Compile deploy/mosquitto/dermascope_guard.c (once per source version) and return the
    shared object, as clinic IT builds it (its header comment has the command)."""
    source = GUARD_SOURCE.read_bytes()
    digest = hashlib.sha256(source).hexdigest()[:16]
    out = Path(tempfile.gettempdir()) / f"dermascope_guard-{digest}.so"
    with _build_lock:
        if out.is_file():
            return out
        compiler = shutil.which("cc") or shutil.which("gcc")
        if not compiler:
            raise BrokerError("no C compiler to build the dermascope_guard plugin: "
                              "apt-get install gcc mosquitto-dev libmosquitto-dev libssl-dev")
        tmp = out.with_suffix(f".{getpass.getuser()}.tmp")
        result = subprocess.run(
            [compiler, "-shared", "-fPIC", "-O2", "-Wall", "-Wextra", "-Werror", "-o",
             str(tmp), str(GUARD_SOURCE), "-lcrypto"], capture_output=True, text=True,
            timeout=120)
        if result.returncode != 0:
            raise BrokerError(f"building {GUARD_SOURCE.name} failed (are mosquitto-dev, "
                              f"libmosquitto-dev and libssl-dev installed?): "
                              f"{result.stderr.strip()[-2000:]}")
        tmp.replace(out)
        return out


class SecureMosquitto(MosquittoBroker):
    """``extra_acl``: more ACL text; every ``user NAME`` in it is also a trusted (non-device)
    name for the guard plugin, as clinic IT would list it in ``plugin_opt_trusted``."""

    def __init__(self, workdir: Path, ca: TestCA, port: int | None = None,
                 extra_acl: str = "") -> None:
        super().__init__(workdir, port)
        self.ca = ca
        self.extra_acl = extra_acl
        self.server = ca.issue("broker", server=True)
        if not ca.crl_path.exists():
            ca.write_crl()

    def _write_conf(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        acl = self.workdir / "dermascope.acl"
        acl.write_text(SHIPPED_ACL.read_text(encoding="utf-8") + self.extra_acl,
                       encoding="utf-8")
        trusted = shipped_directive("plugin_opt_trusted").split()
        trusted += [u for u in re.findall(r"(?m)^user (\S+)", self.extra_acl) if u not in trusted]
        conf = render_conf(SHIPPED_CONF.read_text(encoding="utf-8"), {
            "listener": f"{self.port} {self.host}",
            "cafile": str(self.ca.cert_path),
            "certfile": str(self.server.cert),
            "keyfile": str(self.server.key),
            "crlfile": str(self.ca.crl_path),
            "acl_file": str(acl),
            "plugin": str(build_guard_plugin()),
            "plugin_opt_trusted": " ".join(trusted),
            "plugin_opt_crlfile": str(self.ca.crl_path),
        })
        self.conf_path.write_text(
            # Mosquitto started as root drops to the "mosquitto" user, who cannot read the
            # test's private folder; running as ourselves needs no drop (no effect non-root).
            conf + f"\nuser {getpass.getuser()}\n"
            f"persistence false\nlog_dest file {self.log_path}\n"
            "log_type all\nconnection_messages true\n",
            encoding="utf-8",
        )

    def reload(self, timeout: float = 10.0) -> None:
        """SIGHUP, as ``systemctl reload mosquitto`` sends it; returns once the broker has
        logged the reload (it reloads in its main loop, before it serves anything else)."""
        if self._proc is None or self._proc.poll() is not None:
            raise BrokerError("the broker is not running")
        before = self._reloads()
        self._proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + timeout
        while self._reloads() <= before:
            if time.monotonic() > deadline:
                raise BrokerError(f"no reload logged within {timeout}s (see {self.log_path})")
            # The log file is the broker's only report of a reload: poll it, bounded.
            time.sleep(0.02)

    def _reloads(self) -> int:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace").count(
                "Reloading config.")
        except FileNotFoundError:
            return 0
