"""What every bench script shares: timing by medians, and output for a person and as JSON.

Figures are ratios against a baseline measured in the same run (absolute times are noise
on shared machines). Each script prints its lines for a person, then one JSON object on
the last line.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path


def median_seconds(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def rss_mb(pid: int | None = None) -> float:
    """Resident set size from /proc, in MB."""
    status = Path(f"/proc/{pid or os.getpid()}/status").read_text()
    kb = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))
    return kb / 1024


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far, from /proc (clock ticks)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def child_pids(pid: int) -> dict[int, str]:
    """The processes whose parent is ``pid``, with their command names (from /proc)."""
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue  # gone meanwhile
        comm = text[text.index("(") + 1:text.rindex(")")]
        if int(text.rsplit(")", 1)[1].split()[1]) == pid:
            children[int(stat.parent.name)] = comm
    return children


UNIT = Path(__file__).resolve().parent.parent / "systemd" / "device-agent.service"


def unit_environment() -> dict[str, str]:
    """The ``Environment=`` settings of the shipped systemd unit, so that a bench runs the
    agent as the Pi does."""
    env = {}
    for line in UNIT.read_text().splitlines():
        if line.startswith("Environment="):
            for pair in line.removeprefix("Environment=").split():
                key, _, value = pair.partition("=")
                env[key] = value
    return env


def emit(name: str, lines: list[str], figures: dict) -> None:
    for line in lines:
        print(line)
    print(json.dumps({"bench": name, **figures}, sort_keys=True))
