"""One line per check: what the device's `doctor` and the gateway's `check` report."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

Level = Literal["ok", "warn", "fail"]
#: A certificate that expires sooner than this is a warning.
CERT_WARN_DAYS = 30


@dataclass(frozen=True)
class Check:
    name: str
    level: Level
    detail: str
    action: str = ""

    def line(self) -> str:
        mark = {"ok": "ok  ", "warn": "WARN", "fail": "FAIL"}[self.level]
        todo = f" -> {self.action}" if self.action else ""
        return f"{mark}  {self.name:12s} {self.detail}{todo}"

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


def fit_for_clinical_use(checks: list[Check]) -> bool:
    return all(c.level != "fail" for c in checks)
