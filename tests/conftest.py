"""Shared fixtures: a real, private Mosquitto on a free loopback port, and a log-event watcher."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from clinic_gateway.gateway import Gateway
from device_agent.uplink.outbox import Outbox
from sim.broker import MosquittoBroker


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[MosquittoBroker]:
    """A fresh Mosquitto per test (MQTT 5 and 3.1.1 on one listener), stopped afterwards."""
    with MosquittoBroker(tmp_path / "broker") as b:
        yield b


@pytest.fixture
def store(tmp_path: Path) -> Path:
    """Where the reference gateway stores captures."""
    return tmp_path / "store"


@pytest.fixture
def gateway(broker: MosquittoBroker, store: Path) -> Iterator[Gateway]:
    """The reference gateway on the test's broker, subscribed before the test starts. In
    development mode (unsealed captures accepted): the simulated devices do not seal."""
    with Gateway(broker.host, broker.port, store, allow_unsealed=True) as gw:
        assert gw.wait_ready(10)
        yield gw


@pytest.fixture
def outbox(tmp_path: Path) -> Outbox:
    return Outbox(tmp_path / "outbox", 50 * 1024 * 1024)


class EventLog(logging.Handler):
    """Collects structured log events (``log_event``) and lets a test wait for one."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[dict[str, Any]] = []
        self._cond = threading.Condition()
        self._hooks: dict[str, list[Callable[[dict[str, Any]], None]]] = {}

    def on(self, event: str, hook: Callable[[dict[str, Any]], None]) -> None:
        """Run ``hook(record)`` in the logging thread the moment ``event`` is logged: fault
        tests use it to strike at an exact step of a protocol."""
        self._hooks.setdefault(event, []).append(hook)

    def emit(self, record: logging.LogRecord) -> None:
        if hasattr(record, "event"):
            fields = dict(record.__dict__)
            with self._cond:
                self.records.append(fields)
                self._cond.notify_all()
            for hook in self._hooks.get(fields["event"], []):
                hook(fields)

    def named(self, event: str, **match: Any) -> list[dict[str, Any]]:
        with self._cond:
            return [r for r in self.records if r["event"] == event
                    and all(r.get(k) == v for k, v in match.items())]

    def wait_for(self, event: str, timeout: float = 20.0, count: int = 1,
                 **match: Any) -> list[dict[str, Any]]:
        """Block until ``count`` matching events were logged; fail the test on timeout."""
        with self._cond:
            ok = self._cond.wait_for(lambda: len(self.named(event, **match)) >= count, timeout)
        if not ok:
            pytest.fail(f"no {event} {match or ''} within {timeout}s; "
                        f"saw {[r['event'] for r in self.records]}")
        return self.named(event, **match)


@pytest.fixture
def events() -> Iterator[EventLog]:
    """Every event of the agent's and the gateway's loggers during the test."""
    handler = EventLog()
    loggers = [logging.getLogger(n) for n in ("device_agent", "clinic_gateway", "sim")]
    saved = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(logging.DEBUG)
    yield handler
    for lg, level in zip(loggers, saved, strict=True):
        lg.removeHandler(handler)
        lg.setLevel(level)


@pytest.fixture
def rig() -> Iterator[tuple[Any, Any]]:
    """A simulated board (gpiozero's MockFactory) and the Lights on it, from a lit "ready":
    the feedback thread lights it once it runs."""
    from device_agent.config import PinsConfig
    from device_agent.feedback.lights import Lights
    from sim.board import SimBoard

    board = SimBoard(PinsConfig())
    lights = Lights(board.pins.status_led, board.pins.ring_polarised, board.pins.ring_plain,
                    pin_factory=board.factory)
    assert board.wait_for(board.pins.status_led, lambda t: bool(t) and t[-1].value == 1.0,
                          5.0)
    yield board, lights
    lights.close()
    board.close()
