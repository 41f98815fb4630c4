"""Talking to systemd: readiness, stopping, and watchdog pings (sd_notify protocol).

The protocol is one datagram on the socket named by $NOTIFY_SOCKET; the Python bindings
for it either need libsystemd's headers to build or are unmaintained, so it is done here
in a few lines. Outside systemd (tests, the demo) every call is a no-op.
"""

from __future__ import annotations

import os
import socket
import time


def notify(state: str) -> bool:
    """Send ``state`` (e.g. "READY=1") to systemd; False when not run by systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # abstract socket namespace
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        sock.settimeout(1.0)
        sock.connect(address)
        sock.sendall(state.encode())
    return True


class Watchdog:
    """Pings systemd's watchdog at half its interval (WatchdogSec= in the unit)."""

    def __init__(self) -> None:
        usec = os.environ.get("WATCHDOG_USEC", "")
        pid = os.environ.get("WATCHDOG_PID", "")
        enabled = usec.isdigit() and (not pid or pid == str(os.getpid()))
        self.interval = int(usec) / 2e6 if enabled else None
        self._next = 0.0

    def ping(self) -> None:
        if self.interval is None:
            return
        now = time.monotonic()
        if now >= self._next:
            notify("WATCHDOG=1")
            self._next = now + self.interval
