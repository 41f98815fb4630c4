"""``device-agent wipe``: decommission a device, as a technician does before it leaves the
clinic (repair, resale, disposal).

It removes what makes the device this device and what it still holds: its private key and
certificate, the clinic's keys and CA, its config, and its state (calibration, status, the
outbox). A capture accepted but not yet delivered is a promise to a clinician, so the wipe
refuses while the outbox holds any, unless the technician says so explicitly
(``--discard-undelivered``); and it refuses while the agent runs (it would write again).

The private key is overwritten before it is unlinked. On flash storage with wear levelling
that does not guarantee the old blocks are gone: docs/security.md says what else to do (the
clinic revokes the certificate; full-disk encryption or destroying the card).
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from dermascope_wire.logs import log_event
from device_agent.camera.calibration import calibration_path
from device_agent.config import Config, load_config
from device_agent.remote import COMMAND_SEQUENCE_FILE
from device_agent.status import is_live, read_status, status_path
from device_agent.uplink.outbox import Outbox

log = logging.getLogger(__name__)


class WipeRefused(RuntimeError):
    """The wipe did not start: the message says why and what to do."""


@dataclass
class WipeReport:
    removed: list[Path] = field(default_factory=list)
    discarded: int = 0  # undelivered captures destroyed on the technician's word
    #: what the state folder held besides the agent's own files: left for a person to judge
    left: list[Path] = field(default_factory=list)


def identity_files(config: Config, config_path: Path) -> list[Path]:
    """The files that make the device this device (what provision wrote), config last."""
    files: list[Path] = []
    key = config.uplink.key_file
    if key is not None:
        files += [key, key.with_suffix(".csr")]
    for path in (config.uplink.cert_file, config.uplink.ca_file,
                 config.security.clinic_public_key, *config.security.gateway_public_key):
        if path is not None:
            files.append(path)
    if config.uplink.cert_file is not None:
        files.append(config.uplink.cert_file.with_name(config.uplink.cert_file.name + ".old"))
    files.append(config_path)
    return files


def _destroy_key(path: Path) -> None:
    """Overwrite a private key in place (and sync) before unlinking it."""
    size = path.stat().st_size
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, b"\0" * size, 0)
        os.fsync(fd)
    finally:
        os.close(fd)
    path.unlink()


def wipe(config_path: Path, *, discard_undelivered: bool = False) -> WipeReport:
    """Remove the device's identity, keys and state; WipeRefused if it must not happen now."""
    config = load_config(config_path)
    state = config.device.state_dir
    if is_live(read_status(status_path(state))):
        raise WipeRefused("the agent is running: stop it first "
                          "(sudo systemctl stop device-agent)")
    report = WipeReport()
    if config.outbox_dir.is_dir():
        waiting = Outbox(config.outbox_dir, int(config.outbox.quota_mb * 1024 * 1024)).depth()
        if waiting and not discard_undelivered:
            raise WipeRefused(
                f"{waiting} accepted capture(s) are not yet delivered to the clinic: start the "
                "agent and wait until `device-agent status` shows 0 waiting, or pass "
                "--discard-undelivered to destroy them")
        report.discarded = waiting
    if config.uplink.key_file is not None and config.uplink.key_file.is_file():
        _destroy_key(config.uplink.key_file)
        report.removed.append(config.uplink.key_file)
    for path in identity_files(config, config_path):
        if path.is_file():
            path.unlink()
            report.removed.append(path)
    # Only the agent's own files: a state_dir set to a shared folder by mistake must not
    # cost anything else.
    for path in (config.outbox_dir, status_path(state), calibration_path(state),
                 state / COMMAND_SEQUENCE_FILE):
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
        else:
            continue
        report.removed.append(path)
    if state.is_dir():
        report.left = sorted(state.iterdir())
        if not report.left:
            state.rmdir()
    log_event(log, "device.wiped", device_id=config.device.id, removed=len(report.removed),
              discarded=report.discarded)
    return report
