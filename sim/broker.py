"""A private Mosquitto for tests and the demo (and an MQTT 3.1.1-only amqtt broker).

No root and no system config: it writes its own ``mosquitto.conf`` into ``workdir`` with one
listener on 127.0.0.1, persistence off and its log in ``workdir/mosquitto.log``.

:class:`AmqttBroker` has the same interface and runs amqtt (pip ``amqtt``), a broker that
speaks only MQTT 3.1.1, to prove the uplink's fallback.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

MOSQUITTO_CANDIDATES = ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto")


class BrokerError(RuntimeError):
    """Mosquitto is missing or did not come up."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def find_mosquitto() -> str:
    found = shutil.which("mosquitto")
    if found:
        return found
    for candidate in MOSQUITTO_CANDIDATES:
        if Path(candidate).is_file():
            return candidate
    raise BrokerError("mosquitto not found: install the Debian/Ubuntu package 'mosquitto' "
                      "(sudo apt-get install mosquitto)")


class MosquittoBroker:
    """``with MosquittoBroker(tmp_path) as broker: ... broker.port ...``"""

    host = "127.0.0.1"

    def __init__(self, workdir: Path, port: int | None = None, extra_conf: str = "") -> None:
        self.workdir = Path(workdir)
        self.port = port or free_port()
        self.extra_conf = extra_conf
        self.conf_path = self.workdir / "mosquitto.conf"
        self.log_path = self.workdir / "mosquitto.log"
        self._proc: subprocess.Popen[bytes] | None = None

    def _write_conf(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.conf_path.write_text(
            "# written by sim.broker: private test broker, loopback only\n"
            f"listener {self.port} {self.host}\n"
            "allow_anonymous true\n"
            "persistence false\n"
            # Small control messages (acks) must not wait for Nagle + delayed ACK (~40 ms).
            "set_tcp_nodelay true\n"
            f"log_dest file {self.log_path}\n"
            "log_type error\nlog_type warning\nlog_type notice\nlog_type information\n"
            "connection_messages true\n"
            f"{self.extra_conf}\n",
            encoding="utf-8",
        )

    def _command(self) -> list[str]:
        return [find_mosquitto(), "-c", str(self.conf_path)]

    def start(self, timeout: float = 10.0) -> None:
        if self.running:
            return
        command = self._command()
        self._write_conf()
        self._proc = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + timeout
        while True:
            if self._proc.poll() is not None:
                err = self._proc.stderr.read().decode(errors="replace") if self._proc.stderr else ""
                self._proc = None
                raise BrokerError(f"{command[0]} exited at start: {err.strip()[-2000:]} "
                                  f"(see {self.log_path})")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.5):
                    return
            except OSError:
                # Polling is the only way to see a listener appear; the wait is bounded.
                if time.monotonic() > deadline:
                    self.stop()
                    raise BrokerError(f"{command[0]} did not accept connections on "
                                      f"{self.host}:{self.port} within {timeout}s") from None
                time.sleep(0.05)

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def stop(self, timeout: float = 5.0) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=timeout)
        if proc.stderr:
            proc.stderr.close()

    def kill(self) -> None:
        """SIGKILL, for fault tests: no clean disconnects, no Last Will delay."""
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait(timeout=5.0)
            if self._proc.stderr:
                self._proc.stderr.close()
            self._proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def __enter__(self) -> MosquittoBroker:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


class AmqttBroker(MosquittoBroker):
    """amqtt on loopback: an MQTT 3.1.1-only broker (it refuses MQTT 5 CONNECTs)."""

    def __init__(self, workdir: Path, port: int | None = None, extra_conf: str = "") -> None:
        super().__init__(workdir, port, extra_conf)
        self.conf_path = self.workdir / "amqtt.yaml"
        self.log_path = self.workdir / "amqtt.log"

    def _write_conf(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.conf_path.write_text(
            "listeners:\n  default:\n    type: tcp\n"
            f"    bind: {self.host}:{self.port}\n"
            "plugins:\n  amqtt.plugins.authentication.AnonymousAuthPlugin:\n"
            "    allow_anonymous: true\n"
            f"{self.extra_conf}\n",
            encoding="utf-8",
        )

    def _command(self) -> list[str]:
        script = Path(sys.executable).parent / "amqtt"
        exe = str(script) if script.is_file() else shutil.which("amqtt")
        if not exe:
            raise BrokerError("amqtt not found: pip install amqtt")
        return [exe, "-c", str(self.conf_path)]
