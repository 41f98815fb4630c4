"""Revoke device certificates and (re-)issue the clinic CA's CRL: a tool for clinic IT.

    clinic-gateway revoke --ca-cert clinic-ca.crt --ca-key clinic-ca.key \\
        --crl /etc/mosquitto/certs/clinic-ca.crl derm-0042.crt
    systemctl reload mosquitto

Without certificates it only re-issues the CRL with a new validity (run it monthly: the
broker refuses every client once the CRL has expired). The broker reads the CRL at start and
on reload (SIGHUP); devices already connected stay connected through a reload.
docs/provisioning.md ("Revoking a device") has the whole workflow.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from clinic_gateway.audit import record_revocation
from clinic_gateway.crl import CRLError, revoke_in_crl
from dermascope_wire.logs import json_formatter, log_event

log = logging.getLogger("clinic_gateway.revoke")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="clinic-gateway revoke", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ca-cert", type=Path, required=True, help="the clinic CA certificate")
    parser.add_argument("--ca-key", type=Path, required=True, help="the clinic CA private key")
    parser.add_argument("--crl", type=Path, required=True,
                        help="the CRL file the broker reads (crlfile); created if missing")
    parser.add_argument("--days", type=float, default=30,
                        help="validity of the new CRL in days (default 30)")
    parser.add_argument("--audit", type=Path, metavar="STORE",
                        help="also record each revocation in the gateway's audit log (its "
                             "store folder), when the gateway's store is reachable from here")
    parser.add_argument("certificates", type=Path, nargs="*",
                        help="PEM certificates to revoke (none: only re-issue the CRL)")
    args = parser.parse_args(argv)
    try:
        ca_cert = x509.load_pem_x509_certificate(args.ca_cert.read_bytes())
        ca_key = serialization.load_pem_private_key(args.ca_key.read_bytes(), password=None)
        if not isinstance(ca_key, ec.EllipticCurvePrivateKey) \
                or ca_key.public_key() != ca_cert.public_key():
            raise CRLError(f"{args.ca_key} is not the EC private key of {args.ca_cert}")
        certs = [x509.load_pem_x509_certificate(p.read_bytes()) for p in args.certificates]
        added = revoke_in_crl(args.crl, ca_cert, ca_key, certs, days=args.days)
    except (OSError, ValueError) as exc:  # CRLError and cryptography's parse errors
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for cert, path in zip(certs, args.certificates, strict=True):
        cn = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
        common_name = str(cn[0].value) if cn else None
        log_event(log, "ca.revoked", certificate=str(path), common_name=common_name,
                  serial=f"{cert.serial_number:x}", new=cert.serial_number in added)
        if args.audit is not None and cert.serial_number in added:
            try:
                record_revocation(args.audit, common_name or "?", f"{cert.serial_number:x}",
                                  reason="revoked by clinic IT (clinic-gateway revoke)")
            except (OSError, ValueError) as exc:
                # The CRL is already written: say so, and how to record it by hand.
                print(f"error: the CRL is written, but the audit log was not: {exc}; record "
                      f"it with clinic-gateway audit revoked", file=sys.stderr)
                return 1
    print(json.dumps({"crl": str(args.crl), "revoked": [f"{s:x}" for s in added]}))
    print("now reload the broker: systemctl reload mosquitto", file=sys.stderr)
    return 0


def command(argv: list[str] | None = None) -> int:
    """The command line (``clinic-gateway revoke``): ``main`` with its events as JSON lines on
    standard error."""
    handler = logging.StreamHandler()
    handler.setFormatter(json_formatter())
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    return main(argv)


if __name__ == "__main__":
    sys.exit(command())
