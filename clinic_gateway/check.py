"""``clinic-gateway check --config FILE``: is this gateway fit to receive patient images?

One line per check, as the device's ``device-agent doctor`` (whose ``Check`` it reuses): ok,
warn or fail, what it saw, and for anything not ok what to do. Exit 0 when nothing fails,
1 otherwise, 2 when the config itself is invalid (its field named). It reads and probes,
and writes nothing in the store but a temporary file to prove it writable.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import stat
import tempfile
import uuid
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature

from clinic_gateway.audit import audit_path, verify
from clinic_gateway.config import (
    DEFAULT_CONFIG_PATH,
    Config,
    ConfigError,
    check_tls_files,
    load_config,
    worker_path,
)
from dermascope_wire.checks import CERT_WARN_DAYS, Check, fit_for_clinical_use
from dermascope_wire.sockets import mqtt_connects

#: A store smaller than this fails (a few captures), one below DISK_WARN warns.
DISK_FAIL_BYTES = 1 << 30
DISK_WARN_BYTES = 20 << 30
EXIT_FIT, EXIT_UNFIT, EXIT_CONFIG = 0, 1, 2


def check_mode(config: Config) -> Check | None:
    if not config.service.insecure_dev_mode:
        return None
    return Check("mode", "fail", "service.insecure_dev_mode = true: development only, never "
                 "with patient images", "configure TLS and keys, remove insecure_dev_mode")


def check_store(config: Config) -> Check:
    folder = config.store.dir
    try:
        folder.mkdir(mode=0o750, parents=True, exist_ok=True)  # as the gateway makes it
        with tempfile.TemporaryFile(dir=folder):
            pass
        mode = stat.S_IMODE(folder.stat().st_mode)
    except OSError as err:
        return Check("store", "fail", f"{folder}: not writable: {err.strerror or err}",
                     "fix store.dir or its owner (the clinic-gateway user)")
    if mode & 0o007:
        # Patient images: for the gateway's account and group only (gateway.FILE_MODE).
        return Check("store", "fail", f"{folder} is open to every local user "
                     f"({mode:04o})", f"chmod 0750 {folder}")
    return Check("store", "ok", f"{folder} writable, mode {mode:04o}")


def check_keys(config: Config) -> list[Check]:
    # The config's validators loaded them already: here they are reported.
    keys = config.keys
    checks = []
    if keys.sealing:
        names = ", ".join(p.name for p in keys.sealing)
        checks.append(Check("sealing", "ok", f"{len(keys.sealing)} clinic key(s) load: {names}"))
    else:
        checks.append(Check("sealing", "fail", "no clinic private key: sealed captures wait "
                            "at the devices", "set keys.sealing"))
    if keys.signing is not None:
        checks.append(Check("signing", "ok", f"signing key {keys.signing.name} loads"))
    else:
        checks.append(Check("signing", "fail", "no signing key: acks go unsigned, provisioned "
                            "devices refuse them", "set keys.signing"))
    for path in [*keys.sealing, *([keys.signing] if keys.signing else [])]:
        if stat.S_IMODE(path.stat().st_mode) & 0o077:
            checks.append(Check("keys", "warn", f"{path} is readable by others than its owner",
                                f"chmod 0600 {path}"))
    return checks


def check_tls(config: Config) -> list[Check]:
    b = config.broker
    if not b.tls:
        return [Check("tls", "fail", "plain MQTT (insecure_dev_mode): development only",
                      "set broker.ca_file, cert_file, key_file")]
    try:
        check_tls_files(config)
        ca = x509.load_pem_x509_certificate(b.ca_file.read_bytes())
    except (ConfigError, OSError, ValueError) as err:
        return [Check("tls", "fail", str(err), "install the files the clinic CA issued")]
    certs = [(f"worker {n}", worker_path(b.cert_file, n))
             for n in range(1, config.service.workers + 1)]
    if b.command_cert_file is not None:
        certs.append(("commander", str(b.command_cert_file)))
    checks = []
    for who, path in certs:
        cert = x509.load_pem_x509_certificate(Path(path).read_bytes())
        cn = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
        name = f"{who} (CN {cn[0].value if cn else '?'})"
        try:
            cert.verify_directly_issued_by(ca)
        except (ValueError, TypeError, InvalidSignature):
            checks.append(Check("tls", "fail", f"{name}: {path} is not signed by "
                                "broker.ca_file", "install the certificate the clinic CA signed"))
            continue
        days = (cert.not_valid_after_utc - dt.datetime.now(dt.UTC)).total_seconds() / 86400
        if days < 0:
            checks.append(Check("tls", "fail", f"{name}: expired {-days:.0f} days ago",
                                "renew it: docs/gateway.md, certificates"))
        elif days < CERT_WARN_DAYS:
            checks.append(Check("tls", "warn", f"{name}: expires in {days:.0f} days",
                                "renew it soon: docs/gateway.md, certificates"))
        else:
            checks.append(Check("tls", "ok", f"{name}: chain verifies, valid {days:.0f} "
                                "more days"))
    return checks


def check_broker(config: Config, timeout: float = 5.0) -> Check:
    """Connect and disconnect, under the commander's certificate when there is one: the
    shipped broker makes the client id the CN, and the command connection is opened only
    when a command is sent, while worker 1's (the fallback) would be taken over from the
    running worker for a moment (it reconnects at once; devices resend what it missed)."""
    b = config.broker
    where = f"{b.host}:{b.port}"
    problem = mqtt_connects(b.host, b.port, client_id=f"gateway-check-{uuid.uuid4().hex[:8]}",
                            mqtt5=b.protocol == "mqtt5", tls=config.command_tls(1),
                            timeout=timeout)
    if problem is not None:
        return Check("broker", "fail", f"{where}: {problem}",
                     "check broker.host/port, the network, the certificate, the ACL and "
                     "plugin_opt_trusted (docs/gateway.md)")
    return Check("broker", "ok", f"{where} accepts the gateway"
                 + (" over mutual TLS" if b.tls else " (plain MQTT)"))


def check_audit(config: Config) -> Check:
    verdict = verify(audit_path(config.store.dir))
    if not verdict.ok:
        return Check("audit", "fail", verdict.describe(),
                     "keep the file as evidence; see docs/security.md, audit log")
    return Check("audit", "ok", verdict.describe())


def check_disk(config: Config) -> Check:
    try:
        free = shutil.disk_usage(config.store.dir).free
    except OSError as err:
        return Check("disk", "fail", f"{config.store.dir}: {err.strerror}", "check the volume")
    gb = free / (1 << 30)
    if free < DISK_FAIL_BYTES:
        return Check("disk", "fail", f"{gb:.2f} GB free", "free space on the store's volume")
    if free < DISK_WARN_BYTES:
        return Check("disk", "warn", f"{gb:.1f} GB free", "free space soon")
    return Check("disk", "ok", f"{gb:.1f} GB free")


def check_pacs(config: Config) -> Check:
    """Reach the PACS the way the forwarder sends (a QIDO-RS query, or an association and
    C-ECHO): nothing is stored. Also says how many instances wait in the queue."""
    from clinic_gateway.forwarder import depth
    from clinic_gateway.pacs import PacsError, make_sender

    waiting, failed = depth(config.store.dir)
    backlog = f"; {waiting} waiting, {failed} failed in the queue" if waiting or failed else ""
    p = config.pacs
    if not p.enabled:
        return Check("pacs", "ok", "no PACS delivery ([pacs] enabled = false): images stay "
                     "in the store" + backlog)
    try:
        sender = make_sender(p)
        try:
            seen = sender.probe()
        finally:
            sender.close()
    except (PacsError, OSError, ValueError) as err:
        return Check("pacs", "fail", f"{p.transport}: {err}{backlog}",
                     "check [pacs] (url or host/port, AE titles, user and password file, "
                     "CA) and the network; docs/gateway.md, PACS")
    if failed:
        return Check("pacs", "warn", f"{seen}{backlog}",
                     "look at .gateway/forward/failed/*.reason; docs/gateway.md, PACS")
    return Check("pacs", "ok", seen + backlog)


def run_checks(config_path: Path, probe_broker: bool = True) -> list[Check]:
    try:
        config = load_config(config_path)
        check_tls_files(config)  # a missing or unreadable TLS file is a config error too
    except ConfigError as err:
        return [Check("config", "fail", str(err), "fix the named field")]
    checks = [Check("config", "ok", f"{config_path} valid ({config.service.workers} "
                    f"worker(s))")]
    mode = check_mode(config)
    if mode is not None:
        checks.append(mode)
    checks.append(check_store(config))
    checks.extend(check_keys(config))
    checks.extend(check_tls(config))
    if probe_broker:
        checks.append(check_broker(config))
    checks.append(check_audit(config))
    checks.append(check_disk(config))
    checks.append(check_pacs(config))
    return checks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="clinic-gateway check",
                                     description="Check the gateway's config, store, keys, "
                                                 "certificates, broker, audit log and PACS.")
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG_PATH)
    parser.add_argument("--no-broker", action="store_true", help="skip the broker connection")
    parser.add_argument("--json", action="store_true", help="one JSON object")
    args = parser.parse_args(argv)
    checks = run_checks(args.config, probe_broker=not args.no_broker)
    fit = fit_for_clinical_use(checks)
    if args.json:
        print(json.dumps({"fit": fit, "checks": [c.to_dict() for c in checks]}))
    else:
        for check in checks:
            print(check.line())
        print("\nfit to receive captures" if fit else "\nNOT fit: fix the FAIL lines")
    if checks[0].name == "config" and checks[0].level == "fail":
        return EXIT_CONFIG
    return EXIT_FIT if fit else EXIT_UNFIT


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
