"""The device's MQTT uplink: drains the outbox to the clinic gateway (docs/protocol.md).

Why it is built this way:

- paho persists nothing, and a broker PUBACK only means the broker has the message. The
  outbox is the persistence; an entry is removed only when the gateway answers ``committed``
  (it verified and stored the whole capture). A crash anywhere simply means the capture is
  sent again, and the gateway's idempotency on capture id turns that into one capture.
- Two parts: the MQTT connection (``connection``: paho, reconnects, the 3.1.1 fallback,
  callbacks, publishing, the heartbeat) and each capture's transfer (``transfer``: a state
  machine without I/O, from manifest to verdict). :class:`Uplink` is the driver between
  them: its ``uplink-sender`` thread takes the outbox's entries one at a time (FIFO) and
  carries out the transfer's actions over the connection.
- Acks are authenticated (``signing``, ``transfer.verify_ack``): the device acts on an ack
  only when the clinic's gateway key signed it for this device, this capture and this
  transfer's SHA-256, so neither a compromised broker nor a stolen gateway certificate can
  make it delete a capture that was never stored. Anything else is refused
  (``uplink.ack_refused``) and ignored: the capture stays and its transfer times out and
  starts again.
- The three threads (``uplink-net``, ``uplink-sender``, ``uplink-heartbeat``) are
  supervised (dermascope_wire.threads): ``healthy`` turns false when one died, and the service
  then stops with a failure for systemd to restart it.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
from collections import deque
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from dermascope_wire import signing, threads
from dermascope_wire.logs import log_event
from dermascope_wire.protocol import ProtocolError
from device_agent.config import UplinkConfig
from device_agent.uplink.connection import (
    Aborted,
    CommandSink,
    Connection,
    backoff_delay,
    paho_log,
)
from device_agent.uplink.outbox import CorruptEntry, Outbox, OutboxEntry
from device_agent.uplink.transfer import (
    Action,
    AwaitAck,
    Backoff,
    ChunkSizeLearner,
    CorruptPayload,
    Done,
    SendChunks,
    SendFinal,
    SendManifest,
    Transfer,
    choose_chunk_size,
)

# backoff_delay and paho_log are imported from here by tests.
__all__ = ["Uplink", "backoff_delay", "paho_log"]

log = logging.getLogger(__name__)

#: Our own cap on chunks in flight; the broker's Receive Maximum can lower it.
DEFAULT_WINDOW = 16
_THERMAL = Path("/sys/class/thermal/thermal_zone0/temp")


class Uplink:
    #: When the device's calibration was made (ISO 8601, from the agent), or None: the
    #: status says it so the clinic can see a calibration's age (docs/protocol.md section 5).
    calibrated_at: str | None = None

    def __init__(self, config: UplinkConfig, device_id: str, outbox: Outbox,
                 software_version: str, *, window: int = DEFAULT_WINDOW,
                 connect_timeout: float = 5.0,
                 on_command: CommandSink | None = None,
                 trust: signing.Trust | None = None) -> None:
        """``trust``: the gateway signing keys acks must be signed with (the agent sets it
        from ``security.gateway_public_key``). Without one, unsigned acks are accepted over
        plain MQTT only (a developer's bench); with TLS every ack is refused until a key
        is given, so nothing is ever deleted on an unauthenticated word."""
        self.config = config
        self.device_id = device_id
        self.outbox = outbox
        self.software_version = software_version
        self.connection = Connection(config, device_id, software_version, self.health,
                                     window=window, connect_timeout=connect_timeout)
        self.trust = trust
        # Takes each command from the gateway, and a function to answer it with.
        self.on_command = on_command
        self._chunk_sizes = ChunkSizeLearner()
        self._busy = False
        self._req = 0
        self._sender: threads.Supervised | None = None
        # The transfer in progress, kept across reconnects: what it already published
        # tells which chunks may go before the gateway's answer when it resumes.
        self._transfer: Transfer | None = None
        #: Chunks published so far, every transfer and round (benches count resends by it).
        self.chunks_published = 0

    # The agent sets these after construction; the connection uses them.
    @property
    def trust(self) -> signing.Trust | None:
        return self.connection.trust

    @trust.setter
    def trust(self, trust: signing.Trust | None) -> None:
        self.connection.trust = trust

    @property
    def on_command(self) -> CommandSink | None:
        return self.connection.on_command

    @on_command.setter
    def on_command(self, sink: CommandSink | None) -> None:
        self.connection.on_command = sink

    @property
    def last_error(self) -> str:
        return self.connection.last_error

    @property
    def peak_in_flight(self) -> int:
        """Most QoS 1 messages ever awaiting PUBACK at once (the window, checked by tests)."""
        return self.connection.peak_in_flight

    # ------------------------------------------------------------------------- life cycle

    def start(self) -> None:
        """Connect in the background; reconnects forever. A broker down now is fine."""
        conn = self.connection
        if self._sender is not None:
            return
        conn.stopping.clear()  # start() after stop() works again
        if self.trust is None:
            self.trust = signing.Trust(allow_unsigned=not self.config.tls)
        if self.trust.allow_unsigned:
            log_event(log, "security.unsigned_acks", level=logging.WARNING,
                      reason="no gateway signing key: unsigned acks are accepted; "
                             "development only")
        elif not self.trust.keys:
            conn.last_error = "no gateway signing key: acks cannot be verified"
            log_event(log, "security.no_gateway_key", level=logging.ERROR,
                      reason="no gateway signing key: every ack is refused and nothing is "
                             "delivered; set security.gateway_public_key")
        conn.start()
        self._sender = threads.start(f"uplink-sender-{self.device_id}", self._sender_main,
                                     log)
        conn.start_heartbeat()
        log_event(log, "uplink.started", host=self.config.host, port=self.config.port,
                  protocol=self.config.protocol, device_id=self.device_id)

    def __enter__(self) -> Uplink:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop sending, say "offline" (retained), disconnect, join the threads."""
        conn = self.connection
        conn.stopping.set()
        with conn.cond:
            conn.cond.notify_all()
        deadline = time.monotonic() + timeout
        if self._sender is not None:
            self._sender.join(max(0.1, deadline - time.monotonic()))
        # Delivered entries' files are freed on a daemon thread: done before the process
        # may exit, or they come back at the next start and go again (answered "committed").
        self.outbox.settle(max(0.1, deadline - time.monotonic()))
        conn.close(deadline)
        self._sender = None
        log_event(log, "uplink.stopped", device_id=self.device_id)

    def notify(self) -> None:
        """A new entry is in the outbox."""
        with self.connection.cond:
            self.connection.cond.notify_all()

    def healthy(self) -> bool:
        """False once one of the uplink's threads died (it was logged as thread.crashed)."""
        return self._sender is None or threads.all_alive((self._sender,
                                                          *self.connection.supervised()))

    @property
    def online(self) -> bool:
        return self.connection.online

    def wait_online(self, timeout: float) -> bool:
        """True once connected and subscribed (commands and acks can reach us)."""
        return self.connection.wait_online(timeout)

    def wait_idle(self, timeout: float) -> bool:
        """True once the outbox is empty and nothing is in flight."""
        with self.connection.cond:
            return self.connection.cond.wait_for(
                lambda: self.outbox.depth() == 0 and not self._busy, timeout)

    def health(self) -> dict[str, Any]:
        """The heartbeat's figures: no patient data, only counts and device health."""
        oldest = self.outbox.oldest_created()
        try:
            disk_free = shutil.disk_usage(self.outbox.root).free
        except OSError:
            disk_free = None
        try:
            temperature = int(_THERMAL.read_text().strip()) / 1000.0
        except (OSError, ValueError):
            temperature = None
        return {
            "ts": datetime.now(UTC).isoformat(timespec="seconds"),
            "software_version": self.software_version,
            "protocol": "mqtt5" if self.connection.mqtt5 else "mqtt311",
            "outbox_depth": self.outbox.depth(),
            "outbox_bytes": self.outbox.used_bytes(),
            "oldest_pending_age_s": round(time.time() - oldest, 1) if oldest else None,
            "disk_free_bytes": disk_free,
            "temperature_c": temperature,
            "last_error": self.last_error,
            "calibrated_at": self.calibrated_at,
        }

    # ------------------------------------------------------------------------- the sender

    def _sender_main(self) -> None:
        conn = self.connection
        while not conn.stopping.is_set():
            with conn.cond:
                ready = conn.cond.wait_for(
                    lambda: conn.stopping.is_set()
                    or (conn.ready_to_send() and self.outbox.has_deliverable()),
                    timeout=self.config.heartbeat_interval)
                go = ready and not conn.stopping.is_set()
                self._busy = go
            if not go:
                continue
            try:
                pending = self.outbox.deliverable()
                if pending:
                    self._send_entry(pending[0])
            except OSError as err:
                # The device's own disk (removing or quarantining an entry): keep the thread
                # alive, say so in the status, try again later.
                conn.last_error = f"outbox: {err}"
                log_event(log, "uplink.outbox_error", level=logging.ERROR, error=str(err))
                conn.stopping.wait(self.config.retry_max)
            finally:
                with conn.cond:
                    self._busy = False
                    conn.cond.notify_all()

    def _next_req(self) -> int:
        self._req += 1
        return self._req

    def _send_entry(self, entry: OutboxEntry) -> None:
        conn = self.connection
        with conn.cond:
            generation = conn.generation
            max_packet = conn.max_packet
        try:
            chunk_size = choose_chunk_size(
                entry.size, self._chunk_sizes.limit(self.config.chunk_size), max_packet,
                len(conn.topics.up(entry.capture_id, "chunk")))
        except ProtocolError as err:
            conn.last_error = err.detail
            log_event(log, "uplink.packet_too_small", level=logging.ERROR, detail=err.detail)
            with contextlib.suppress(Aborted):
                conn.wait(lambda: False, self.config.retry_max, generation)
            return
        if chunk_size is None:
            self.outbox.quarantine(entry.capture_id, "too large for the broker's packet cap")
            return
        transfer = self._transfer
        if (transfer is None or transfer.capture_id != entry.capture_id
                or transfer.chunk_size != chunk_size):
            self._transfer = None
            try:
                data, digest = self.outbox.read_for_sending(entry)
            except CorruptEntry as err:
                # The outbox already quarantined it and logged; the next entry goes next.
                self._skip_corrupt(entry.capture_id, str(err))
                return
            except FileNotFoundError:
                return
            transfer = self._transfer = Transfer(entry.capture_id, data, digest, chunk_size,
                                                 self._next_req)
        conn.expect_acks(entry.capture_id, transfer.sha256.hex())
        try:
            self._drive(transfer, generation)
        except CorruptPayload as err:
            self._transfer = None
            self.outbox.quarantine(entry.capture_id, "sha256 mismatch")
            self._skip_corrupt(entry.capture_id, str(err))
        except Aborted:
            # Disconnected or stopping: the sender loop resumes after reconnect.
            if transfer.exposed and not conn.stopping.is_set():
                reduced = self._chunk_sizes.dropped(transfer.chunk_size, conn.mqtt5,
                                                    conn.dropped_for_size)
                if reduced is not None:
                    log_event(log, "uplink.chunk_size_reduced", level=logging.WARNING,
                              capture_id=entry.capture_id, chunk_size=reduced)
        finally:
            conn.expect_acks(None)

    def _skip_corrupt(self, capture_id: str, detail: str) -> None:
        self.connection.last_error = f"corrupt outbox entry {capture_id}"
        log_event(log, "uplink.skipped_corrupt", level=logging.WARNING, capture_id=capture_id,
                  detail=detail)

    def _drive(self, t: Transfer, generation: int) -> None:
        """Carry out the transfer's actions until its verdict (Aborted: the connection went)."""
        conn = self.connection
        capture_id = t.capture_id
        actions: deque[Action] = deque(t.start())
        while actions:
            action = actions.popleft()
            if isinstance(action, SendManifest):
                conn.forget_ack(capture_id)  # a stale one must not answer this round
                req = action.manifest.req
                conn.publish(conn.topics.up(capture_id, "manifest"), action.manifest.encode(),
                             kind="manifest", correlation=f"{capture_id}:{req}".encode())
                log_event(log, "uplink.manifest_sent", level=logging.DEBUG,
                          capture_id=capture_id, req=req, size=len(t.data),
                          chunk_size=t.chunk_size, chunks=t.chunk_count)
            elif isinstance(action, SendChunks):
                topic = conn.topics.up(capture_id, "chunk")
                answered = None
                if action.until_answered:
                    def answered() -> bool:
                        return conn.has_ack(capture_id, t.answers)
                for index in action.indexes:
                    if not conn.wait_window(generation, answered):
                        # No PUBACK for a whole ack_timeout: the link is stuck. A round
                        # without an answer: back off, then ask before sending again.
                        actions.clear()
                        actions.extend(t.on_ack(None))
                        break
                    if answered is not None and answered():
                        break  # the manifest's answer: it says what else to send
                    conn.publish(topic, t.chunk(index), kind="chunk")
                    self.chunks_published += 1
            elif isinstance(action, SendFinal):
                req = action.final.req
                conn.publish(conn.topics.up(capture_id, "final"), action.final.encode(),
                             kind="final", correlation=f"{capture_id}:{req}".encode())
                log_event(log, "uplink.final_sent", level=logging.DEBUG, capture_id=capture_id,
                          req=req, resent=action.resent)
            elif isinstance(action, AwaitAck):
                ack = conn.wait_ack(capture_id, t.answers, generation)
                if ack is not None:
                    log_event(log, "uplink.ack", level=logging.DEBUG, capture_id=capture_id,
                              state=ack.state, req=ack.req, missing=len(ack.missing),
                              reason=ack.reason)
                    if t.after_final:
                        self._chunk_sizes.carried()  # the connection carried our chunks
                actions.extend(t.on_ack(ack))
            elif isinstance(action, Backoff):
                log_event(log, "uplink.retry", level=logging.INFO, capture_id=capture_id,
                          attempt=action.attempt, reason=action.reason)
                conn.backoff(action.attempt, generation)
                actions.extend(t.start())
            else:
                self._verdict(t, action)

    def _verdict(self, t: Transfer, done: Done) -> None:
        self._transfer = None
        if done.state == "committed":
            # verify_ack let it through: signed for this transfer's SHA-256.
            self.outbox.remove(t.capture_id, durable=False)
            log_event(log, "capture.delivered", capture_id=t.capture_id, size=len(t.data),
                      chunk_size=t.chunk_size, chunks=t.chunk_count)
            return
        self.connection.last_error = f"gateway rejected {t.capture_id}: {done.reason}"
        log_event(log, "uplink.rejected", level=logging.ERROR, capture_id=t.capture_id,
                  reason=done.reason)
        self.outbox.quarantine(t.capture_id, f"rejected by gateway: {done.reason}")
