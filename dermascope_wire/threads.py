"""Long-lived threads under supervision.

A thread that dies of an unexpected exception must never leave a service that looks alive
and does nothing (a device that no longer delivers, a gateway that no longer acks). Every
long-lived thread is started through :func:`start`: whatever kills it is logged with its
traceback as ``thread.crashed`` on its owner's logger (so the event lands in the owner's JSON
log), and its owner sees it in :func:`all_alive`. The services
ping systemd's watchdog only while all their threads are alive and exit non-zero when one
is gone, so systemd restarts them whole: simpler and safer than restarting one thread
whose shared state may be half updated.

Threads we do not start ourselves (paho's network loop, gpiozero's callbacks) reach
:func:`install_excepthook`, which logs them the same way.
"""

from __future__ import annotations

import logging
import threading
import traceback
from collections.abc import Callable, Iterable

from dermascope_wire.logs import log_event


class Supervised(threading.Thread):
    """A daemon thread whose death by exception is logged and remembered."""

    def __init__(self, name: str, target: Callable[[], object], log: logging.Logger) -> None:
        super().__init__(name=name, daemon=True)
        self._body = target
        self._log = log
        #: ``"ExceptionType: message"`` once the thread died of an exception.
        self.crashed: str | None = None

    def run(self) -> None:
        try:
            self._body()
        except BaseException as err:  # noqa: BLE001 - the supervisor: whatever ends the thread
            self.crashed = f"{type(err).__name__}: {err}"
            log_event(self._log, "thread.crashed", logging.CRITICAL, thread_name=self.name,
                      error=self.crashed, traceback=traceback.format_exc())


def start(name: str, target: Callable[[], object], log: logging.Logger) -> Supervised:
    """Start ``target`` in a supervised thread; its death is logged on ``log``."""
    thread = Supervised(name, target, log)
    thread.start()
    return thread


def all_alive(threads: Iterable[threading.Thread | None]) -> bool:
    """True while every (started) thread runs."""
    return all(t is not None and t.is_alive() for t in threads)


def install_excepthook(logger: logging.Logger) -> None:
    """Uncaught exceptions of any thread go to the JSON log, with their traceback."""

    def hook(args: threading.ExceptHookArgs) -> None:
        if args.exc_type is SystemExit:
            return
        name = args.thread.name if args.thread is not None else "?"
        trace = "".join(traceback.format_exception(args.exc_type, args.exc_value,
                                                   args.exc_traceback))
        log_event(logger, "thread.crashed", logging.CRITICAL, thread_name=name,
                  error=f"{args.exc_type.__name__}: {args.exc_value}", traceback=trace)

    threading.excepthook = hook
