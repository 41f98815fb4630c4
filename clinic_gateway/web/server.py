"""Serving the web application: its own process under the service's supervisor
(``clinic-gateway run --config FILE`` starts it when ``[web] enabled = true``), or a thread
of the demo's and the tests' (``WebServer``).
"""

from __future__ import annotations

import logging
import signal
import socket
import threading
from dataclasses import dataclass
from pathlib import Path

import uvicorn
from fastapi import FastAPI

from clinic_gateway.config import Config
from clinic_gateway.gateway import Gateway
from clinic_gateway.web.app import create_app
from clinic_gateway.web.auth import Staff
from clinic_gateway.web.board import StatusBoard
from clinic_gateway.web.desk import Desk
from dermascope_wire import signing
from dermascope_wire.logs import log_event

log = logging.getLogger("clinic_gateway.web")


@dataclass
class WebParts:
    app: FastAPI
    desk: Desk
    board: StatusBoard


def build(gateway: Gateway, board: StatusBoard, staff: Staff, *, command_timeout: float = 10.0,
          session_idle: float = 3600.0, secure_cookie: bool = False) -> WebParts:
    desk = Desk(gateway, board, command_timeout)
    return WebParts(create_app(desk, staff, session_idle=session_idle,
                               secure_cookie=secure_cookie), desk, board)


def from_config(config: Config) -> WebParts:
    """The application as the service's config describes it. The Gateway here only sends
    commands (its commander's connection, ``broker.command_*``) and is never started."""
    b, w = config.broker, config.web
    gateway = Gateway(b.host, b.port, config.store.dir, b.topic_prefix, b.protocol, b.group,
                      command_tls=config.command_tls(1),
                      signing_key=(signing.load_private_key(config.keys.signing)
                                   if config.keys.signing else None))
    board = StatusBoard(b.host, b.port, b.topic_prefix, protocol=b.protocol,
                        tls=config.status_tls())
    return build(gateway, board, Staff(w.users, w.api_tokens),
                 command_timeout=w.command_timeout_s,
                 session_idle=w.session_idle_minutes * 60.0, secure_cookie=w.tls)


def beside(gateway: Gateway, staff: Staff, *, status_tls: dict[str, str] | None = None,
           command_timeout: float = 10.0) -> WebParts:
    """The application for a gateway running in this process (the demo, the tests): cases
    go through ``gateway`` itself; the status board is made and started here (``stop`` it)."""
    board = StatusBoard(gateway.host, gateway.port, gateway.prefix, protocol=gateway.protocol,
                        tls=status_tls)
    board.start()
    return build(gateway, board, staff, command_timeout=command_timeout)


def _uvicorn_config(app: FastAPI, address: str, port: int, cert: Path | None = None,
                    key: Path | None = None, sock: socket.socket | None = None
                    ) -> uvicorn.Config:
    # Our own JSON events only: uvicorn's access log would print every path, and its log
    # configuration would replace ours.
    return uvicorn.Config(app, host=address, port=port, log_config=None, access_log=False,
                          ssl_certfile=str(cert) if cert else None,
                          ssl_keyfile=str(key) if key else None, timeout_graceful_shutdown=5,
                          lifespan="off")


def run_web(config: Config) -> int:
    """The web process: until SIGTERM (uvicorn's own handler ends it gracefully)."""
    w = config.web
    try:
        sock = _listen(w.address, w.port)
    except OSError as err:
        log_event(log, "web.failed", level=logging.CRITICAL,
                  error=f"web.address, web.port: cannot listen on {w.address}:{w.port}: "
                        f"{err.strerror or err}")
        return 1
    parts = from_config(config)
    parts.board.start()
    server = uvicorn.Server(_uvicorn_config(parts.app, w.address, w.port, w.tls_cert_file,
                                            w.tls_key_file))
    # uvicorn handles SIGTERM/SIGINT while it serves, then restores the handlers it found
    # and raises the signal again: with the default handler that would end the process
    # before it closed its connection to the broker. Ours asks uvicorn to stop (a signal
    # before uvicorn's handlers are in place included).
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: setattr(server, "should_exit", True))
    # The supervisor blocks these to wait for them, and a new process inherits its mask.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT})
    # Listening already: a request now waits in the backlog until uvicorn takes it.
    log_event(log, "web.listening", address=w.address, port=sock.getsockname()[1], tls=w.tls)
    try:
        server.run(sockets=[sock])
    finally:
        parts.board.stop()
        sock.close()
        log_event(log, "web.stopped")
    return 0 if server.started else 1


def _listen(address: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((address, port))
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    return sock


class WebServer:
    """The application served by uvicorn on a thread (the demo, the tests): ``url`` once
    started."""

    def __init__(self, app: FastAPI, address: str = "127.0.0.1", port: int = 0) -> None:
        self._sock = _listen(address, port)
        self.port = self._sock.getsockname()[1]
        self.url = f"http://{address}:{self.port}"
        self._server = uvicorn.Server(_uvicorn_config(app, address, self.port))
        # Not in the main thread: uvicorn installs no signal handlers then.
        self._thread = threading.Thread(target=self._server.run,
                                        kwargs={"sockets": [self._sock]},
                                        name="web-server", daemon=True)

    def start(self, timeout: float = 10.0) -> WebServer:
        self._thread.start()
        self._sock_ready(timeout)
        log_event(log, "web.listening", url=self.url)
        return self

    def _sock_ready(self, timeout: float) -> None:
        # uvicorn sets ``started`` once it serves; wait on the thread with a bounded poll.
        done = threading.Event()
        for _ in range(int(timeout / 0.05)):
            if self._server.started or not self._thread.is_alive():
                done.set()
                break
            done.wait(0.05)
        if not self._server.started:
            raise RuntimeError(f"the web server did not start within {timeout} s")

    def stop(self, timeout: float = 10.0) -> None:
        self._server.should_exit = True
        self._thread.join(timeout)
        self._sock.close()

    def __enter__(self) -> WebServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
