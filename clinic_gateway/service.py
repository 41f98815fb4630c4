"""``clinic-gateway run --config FILE``: the gateway as a service, N worker processes.

The supervisor (this process, the one systemd starts) validates the config, starts
``service.workers`` worker processes, restarts one that dies (``gateway.worker_died``, then
``gateway.worker_started``), serves the metrics endpoint for all of them
(clinic_gateway/metrics.py), starts the web process when ``[web] enabled`` (the GP's page
and the API, clinic_gateway/web; restarted like a worker: ``gateway.web_started``,
``gateway.web_died``) and, on SIGTERM or SIGINT, stops every worker with SIGTERM
(SIGKILL after ``STOP_TIMEOUT``) and exits 0.

With ``[pacs] enabled`` it also starts one forwarder process for the store
(``python -m clinic_gateway.forwarder``, clinic_gateway/forwarder.py), which delivers the
DICOM objects the workers' exporters queued to the clinic's PACS; restarted like a worker
(``pacs.forwarder_died``, then ``pacs.forwarder_process_started``), stopped with them.

Each worker is one Gateway (clinic_gateway/gateway.py) on the shared subscription and the
shared store, in its own process: a worker killed with SIGKILL mid-transfer loses nothing
(the device resends what was not acked; the store commits with a link that never replaces,
so nothing is stored twice) and its share of the uploads goes to the others meanwhile.
Worker ``n`` connects with its own certificate (``broker.cert_file`` with ``{n}``): the
shipped broker binds the client id to the certificate's CN.

Without ``--config`` the command line of ``clinic_gateway.gateway`` runs one gateway in
this process (development).
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from clinic_gateway.config import Config, ConfigError, check_tls_files, load_config
from dermascope_wire.logs import add_json_handler, log_event
from dermascope_wire.systemd import notify

log = logging.getLogger("clinic_gateway.service")

#: How long a worker has to finish its current message on SIGTERM before SIGKILL.
STOP_TIMEOUT = 20.0
#: A worker that dies sooner than this after its start is restarted only after RESTART_DELAY,
#: so a worker that cannot start (a certificate the broker refuses...) does not spin.
QUICK_DEATH = 10.0
RESTART_DELAY = 2.0
EXIT_CONFIG = 2
_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGCHLD}


#: The supervisor's pid, for its children (``_go_with_the_supervisor``).
SUPERVISOR_ENV = "CLINIC_GATEWAY_SUPERVISOR_PID"
_PR_SET_PDEATHSIG = 1


def _go_with_the_supervisor() -> None:
    """A worker or the web process ends (SIGTERM, so it stops cleanly) when the supervisor
    that started it dies, even by SIGKILL: the next supervisor starts its own, and an orphan
    would hold the shared subscription, the web port or a metrics file meanwhile. Linux's
    parent-death signal; the supervisor's pid closes the race of a death before it is set."""
    supervisor = os.environ.get(SUPERVISOR_ENV)
    if supervisor is None:
        return  # started by hand, not by a supervisor
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        log_event(log, "gateway.pdeathsig_failed", level=logging.WARNING,
                  error=os.strerror(ctypes.get_errno()))
    if str(os.getppid()) != supervisor:
        os.kill(os.getpid(), signal.SIGTERM)


@dataclass
class _Worker:
    n: int  # 1..N for a worker; 0 for the web process and the PACS forwarder
    role: str = "worker"  # "worker", "web" or "forwarder"
    proc: subprocess.Popen | None = None
    started: float = 0.0
    restart_at: float | None = field(default=None)


class _WorkerTag(logging.Filter):
    """Every event of a worker names it (``worker``: 1..N), in the shared log."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n = n

    def filter(self, record: logging.LogRecord) -> bool:
        record.worker = self.n
        return True


def _signal_name(returncode: int) -> str | None:
    """The signal that ended a process (Popen's negative return code), e.g. "SIGKILL"."""
    if returncode >= 0:
        return None
    try:
        return signal.Signals(-returncode).name
    except ValueError:  # a real-time signal has no name
        return f"signal {-returncode}"


def _setup_logging(config: Config, worker: int | None) -> None:
    handlers = [add_json_handler("clinic_gateway", stream=sys.stdout)]
    if config.service.log_file is not None:
        handlers.append(add_json_handler("clinic_gateway", path=config.service.log_file))
    if worker is not None:
        for handler in handlers:
            handler.addFilter(_WorkerTag(worker))


def run_worker(config: Config, n: int) -> int:
    """One Gateway until SIGTERM; non-zero if one of its threads died (the supervisor then
    starts it afresh)."""
    from clinic_gateway import gateway
    from clinic_gateway.metrics import GatewayMetrics, PrometheusMetrics
    from dermascope_wire import seal, signing

    _setup_logging(config, n)
    done = threading.Event()
    crashed: list[str] = []
    threading.excepthook = gateway.exit_on_thread_death(done, crashed)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    # The supervisor blocks these to wait for them and a new process inherits its mask:
    # unblocked once the handlers are there (a SIGTERM pending meanwhile is handled now).
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)
    metrics: GatewayMetrics = (PrometheusMetrics() if os.environ.get("PROMETHEUS_MULTIPROC_DIR")
                               else GatewayMetrics())
    keys = config.keys
    gw = gateway.Gateway(
        config.broker.host, config.broker.port, config.store.dir, config.broker.topic_prefix,
        config.broker.protocol, config.broker.group,
        max_size=int(config.store.max_size_mb * 1024 * 1024),
        private_keys=[seal.load_private_key(p) for p in keys.sealing],
        staging_ttl=config.store.staging_ttl_days * 86400.0,
        tls=config.worker_tls(n), command_tls=config.command_tls(n),
        export_dicom=config.store.export_dicom,
        allow_unsealed=config.service.insecure_dev_mode,
        signing_key=signing.load_private_key(keys.signing) if keys.signing else None,
        metrics=metrics)
    if config.pacs.enabled:
        from clinic_gateway import exporter

        # Its exporter queues every DICOM object for the supervisor's PACS forwarder.
        gw.exporter_command = exporter.command(forward=True)
    return gateway.serve_until_done(gw, done, crashed)


class Supervisor:
    """Starts, watches and stops the worker processes (signals are waited for with
    ``sigtimedwait``: SIGCHLD says a worker died, SIGTERM/SIGINT to stop)."""

    def __init__(self, config: Config, config_path: Path) -> None:
        self.config = config
        self.config_path = config_path
        self.workers = [_Worker(n) for n in range(1, config.service.workers + 1)]
        # The GP's page and the API (clinic_gateway/web): a process of its own, restarted
        # like a worker, so a fault there never touches the receiving of captures.
        self.web = _Worker(0, "web") if config.web.enabled else None
        # One forwarder per store, not per worker: each instance is sent by one process.
        self.forwarder = _Worker(0, "forwarder") if config.pacs.enabled else None
        self.children = self.workers + [w for w in (self.web, self.forwarder) if w is not None]
        self.multiproc_dir: Path | None = None

    def _command(self, child: _Worker) -> list[str]:
        run = [sys.executable, "-m", "clinic_gateway", "run", "--config", str(self.config_path)]
        if child.role == "web":
            return [*run, "--web"]
        if child.role == "forwarder":
            return [sys.executable, "-m", "clinic_gateway.forwarder", "--config",
                    str(self.config_path), "--parent", str(os.getpid())]
        return [*run, "--worker", str(child.n)]

    def _spawn(self, worker: _Worker) -> None:
        env = {**os.environ, SUPERVISOR_ENV: str(os.getpid())}
        if self.multiproc_dir is not None:
            env["PROMETHEUS_MULTIPROC_DIR"] = str(self.multiproc_dir)
        worker.proc = subprocess.Popen(self._command(worker), env=env)
        worker.started = time.monotonic()
        worker.restart_at = None
        if worker.role == "web":
            log_event(log, "gateway.web_started", pid=worker.proc.pid)
        elif worker.role == "forwarder":
            log_event(log, "pacs.forwarder_process_started", pid=worker.proc.pid)
        else:
            log_event(log, "gateway.worker_started", worker=worker.n, pid=worker.proc.pid)

    def alive(self) -> int:
        return sum(1 for w in self.workers if w.proc is not None and w.proc.poll() is None)

    def _serve_metrics(self) -> None:
        from prometheus_client import start_http_server

        from clinic_gateway.metrics import ServiceCollector, service_registry

        m = self.config.metrics
        if not m.enabled:
            return
        self.multiproc_dir = Path(tempfile.mkdtemp(prefix="clinic-gateway-metrics-"))
        registry = service_registry(self.multiproc_dir, ServiceCollector(
            self.config.store.dir, len(self.workers), self.alive))
        try:
            server, _thread = start_http_server(m.port, addr=m.address, registry=registry)
        except OSError as err:
            raise OSError(f"metrics.address, metrics.port: cannot listen on "
                          f"{m.address}:{m.port}: {err.strerror or err}") from None
        log_event(log, "gateway.metrics_listening", address=m.address,
                  port=server.server_port)
        self._server = server

    def _reap(self) -> None:
        from clinic_gateway.metrics import worker_died

        now = time.monotonic()
        for w in self.children:
            if w.proc is None or w.proc.poll() is None:
                continue
            code = w.proc.returncode
            died = {"web": "gateway.web_died", "forwarder": "pacs.forwarder_died"}
            if w.role in died:
                log_event(log, died[w.role], level=logging.ERROR, pid=w.proc.pid,
                          returncode=code, signal=_signal_name(code))
            else:
                log_event(log, "gateway.worker_died", level=logging.ERROR, worker=w.n,
                          pid=w.proc.pid, returncode=code, signal=_signal_name(code))
            if self.multiproc_dir is not None and w.role != "web":
                worker_died(self.multiproc_dir, w.proc.pid)
            w.proc = None
            w.restart_at = now + (RESTART_DELAY if now - w.started < QUICK_DEATH else 0.0)

    def run(self) -> int:
        # Blocked before any thread exists (the metrics server's), so only sigtimedwait
        # below receives them.
        signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
        try:
            self._serve_metrics()
            for w in self.children:
                self._spawn(w)
            log_event(log, "gateway.service_started", workers=len(self.workers),
                      config=str(self.config_path))
            notify("READY=1")  # systemd (Type=notify); a no-op elsewhere
            while True:
                due = [w.restart_at for w in self.children if w.restart_at is not None]
                timeout = max(0.0, min(due) - time.monotonic()) if due else 3600.0
                info = signal.sigtimedwait(_SIGNALS, timeout)
                if info is not None and info.si_signo in (signal.SIGTERM, signal.SIGINT):
                    break
                self._reap()
                now = time.monotonic()
                for w in self.children:
                    if w.proc is None and w.restart_at is not None and w.restart_at <= now:
                        self._spawn(w)
            notify("STOPPING=1")
            self._stop_all()
            log_event(log, "gateway.service_stopped")
            return 0
        finally:
            self._stop_all()  # a no-op after a clean stop; no worker outlives an error here
            server = getattr(self, "_server", None)
            if server is not None:
                server.shutdown()
            if self.multiproc_dir is not None:
                shutil.rmtree(self.multiproc_dir, ignore_errors=True)

    def _stop_all(self) -> None:
        running = [w for w in self.children if w.proc is not None and w.proc.poll() is None]
        for w in running:
            w.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        for w in running:
            try:
                w.proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log_event(log, "gateway.worker_killed", level=logging.ERROR, worker=w.n,
                          role=w.role, pid=w.proc.pid)
                w.proc.kill()
                w.proc.wait()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="clinic-gateway run", description="Run the clinic gateway's workers "
        "(docs/gateway.md).", epilog="Without --config: the development command line of a "
        "single gateway, `clinic-gateway run --store DIR ...` (python -m "
        "clinic_gateway.gateway --help).")
    parser.add_argument("--config", type=Path, required=True,
                        help="the service's TOML config (/etc/clinic-gateway/config.toml)")
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)  # the supervisor's
    parser.add_argument("--web", action="store_true", help=argparse.SUPPRESS)  # its too
    if not any(a == "--config" or a.startswith("--config=") for a in argv):
        if any(a in ("-h", "--help") for a in argv) or not argv:
            parser.parse_args(argv)  # the documented way first: its help, or its error
        from clinic_gateway import gateway  # the development command line

        return gateway.main(argv)
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config)
        check_tls_files(config)
    except ConfigError as err:
        print(f"clinic-gateway: {err}", file=sys.stderr)
        return EXIT_CONFIG
    if args.worker is not None or args.web:
        _go_with_the_supervisor()
    if args.worker is not None:
        return run_worker(config, args.worker)
    if args.web:
        from clinic_gateway.web.server import run_web

        _setup_logging(config, None)
        return run_web(config)
    _setup_logging(config, None)
    if config.service.insecure_dev_mode:
        log_event(log, "gateway.insecure_dev_mode", level=logging.WARNING,
                  detail="service.insecure_dev_mode: no TLS or keys required; development only")
    try:
        return Supervisor(config, args.config).run()
    except OSError as err:  # the metrics port taken, a worker that cannot be started...
        log_event(log, "gateway.service_failed", level=logging.CRITICAL, error=str(err))
        print(f"clinic-gateway: {err}", file=sys.stderr)
        return 1
