"""A private Mosquitto running the shipped mutual-TLS config and ACL (deploy/mosquitto/).

Only what must differ on a test machine is replaced: the port (loopback only), the
certificate paths (a throwaway CA from :mod:`sim.pki`) and the ACL's path. Everything else
is the file clinic IT installs, so the tests prove the real thing.
"""

from __future__ import annotations

import getpass
import re
from pathlib import Path

from sim.broker import MosquittoBroker
from sim.pki import TestCA

DEPLOY = Path(__file__).resolve().parent.parent / "deploy" / "mosquitto"
SHIPPED_CONF = DEPLOY / "dermascope.conf"
SHIPPED_ACL = DEPLOY / "dermascope.acl"


def render_conf(text: str, values: dict[str, str]) -> str:
    """Replace the value of each directive named in ``values``; fail if one is missing."""
    for key, value in values.items():
        text, count = re.subn(rf"(?m)^{re.escape(key)} .*$", f"{key} {value}", text)
        if count != 1:
            raise ValueError(f"directive {key!r} appears {count} times in the shipped config")
    return text


class SecureMosquitto(MosquittoBroker):
    def __init__(self, workdir: Path, ca: TestCA, port: int | None = None,
                 extra_acl: str = "") -> None:
        super().__init__(workdir, port)
        self.ca = ca
        self.extra_acl = extra_acl
        self.server = ca.issue("broker", server=True)

    def _write_conf(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        acl = self.workdir / "dermascope.acl"
        acl.write_text(SHIPPED_ACL.read_text(encoding="utf-8") + self.extra_acl,
                       encoding="utf-8")
        conf = render_conf(SHIPPED_CONF.read_text(encoding="utf-8"), {
            "listener": f"{self.port} {self.host}",
            "cafile": str(self.ca.cert_path),
            "certfile": str(self.server.cert),
            "keyfile": str(self.server.key),
            "acl_file": str(acl),
        })
        self.conf_path.write_text(
            # Mosquitto started as root drops to the "mosquitto" user, who cannot read the
            # test's private folder; running as ourselves needs no drop (no effect non-root).
            conf + f"\nuser {getpass.getuser()}\n"
            f"persistence false\nlog_dest file {self.log_path}\n"
            "log_type all\nconnection_messages true\n",
            encoding="utf-8",
        )
