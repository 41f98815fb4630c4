"""``clinic-gateway hash-password``: what goes into the config's ``[web]`` section.

    clinic-gateway hash-password            asks for a password twice, prints its hash
    clinic-gateway hash-password --stdin    reads the password from standard input's first line
    clinic-gateway hash-password --new-api-token   prints a new API token and its hash

The hash goes under ``[web.users]`` (``"dr.hansen" = "scrypt$..."``), the token's hash under
``[web.api_tokens]``; the password itself is never stored, the token is given to the clinic's
system once and kept by it.
"""

from __future__ import annotations

import argparse
import getpass
import sys

from clinic_gateway.web.auth import hash_password, new_api_token


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="clinic-gateway hash-password",
                                     description=__doc__.split("\n\n")[0])
    how = parser.add_mutually_exclusive_group()
    how.add_argument("--stdin", action="store_true",
                     help="read the password from standard input (first line)")
    how.add_argument("--new-api-token", action="store_true",
                     help="make a new API token (for [web.api_tokens]) instead")
    args = parser.parse_args(argv)
    if args.new_api_token:
        token, stored = new_api_token()
        print(f"token (give it to the clinic's system, once): {token}")
        print(f"hash (for [web.api_tokens]): {stored}")
        return 0
    if args.stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        try:
            password = getpass.getpass("password: ")
            if password != getpass.getpass("again: "):
                print("clinic-gateway hash-password: the two passwords differ", file=sys.stderr)
                return 1
        except (EOFError, KeyboardInterrupt):
            print("clinic-gateway hash-password: no password given", file=sys.stderr)
            return 1
    if len(password) < 8:
        print("clinic-gateway hash-password: use at least 8 characters", file=sys.stderr)
        return 1
    print(hash_password(password))
    return 0


if __name__ == "__main__":
    sys.exit(main())
