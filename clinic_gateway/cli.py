"""``clinic-gateway``: the clinic's service and clinic IT's tools, one command.

    clinic-gateway run --config /etc/clinic-gateway/config.toml
    clinic-gateway check --config /etc/clinic-gateway/config.toml
    clinic-gateway run --host HOST --port PORT --store DIR --key clinic.pem ...  (development)
    clinic-gateway audit verify STORE
    clinic-gateway audit revoked STORE --device ID --serial HEX
    clinic-gateway hash-password [--new-api-token]   (for the config's [web] section)
    clinic-gateway revoke --ca-cert clinic-ca.crt --ca-key clinic-ca.key --crl FILE CERT...

Each subcommand is its module's own command line (``clinic_gateway.service``,
``clinic_gateway.check``, ``clinic_gateway.audit``, ``clinic_gateway.revoke``); ``run``
without ``--config`` is ``clinic_gateway.gateway``'s development command line.
"""

from __future__ import annotations

import argparse
import importlib
import sys

#: subcommand -> (module, its function taking the remaining arguments, one-line help)
COMMANDS = {
    "run": ("clinic_gateway.service", "main", "receive, verify, store and acknowledge captures"),
    "check": ("clinic_gateway.check", "main", "check the config, keys, store and broker"),
    "audit": ("clinic_gateway.audit", "main", "verify the audit log, or record a revocation"),
    "revoke": ("clinic_gateway.revoke", "command", "revoke device certificates in the CRL"),
    "hash-password": ("clinic_gateway.web.passwords", "main",
                      "hash a staff password (or make an API token) for [web]"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in COMMANDS:
        module, function, _ = COMMANDS[argv[0]]
        return int(getattr(importlib.import_module(module), function)(argv[1:]))
    parser = argparse.ArgumentParser(prog="clinic-gateway", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, _, text) in COMMANDS.items():
        sub.add_parser(name, help=text, add_help=False)
    parser.parse_args(argv)  # --help, or the error naming the commands (exit 2)
    return 2
