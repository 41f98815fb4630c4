"""The gateway's health and metrics endpoint (Prometheus text format).

With N worker processes the supervisor serves one endpoint for all of them, through
prometheus_client's multiprocess mode: each worker writes its figures to memory-mapped files
in a folder the supervisor made (``PROMETHEUS_MULTIPROC_DIR``, set before a worker imports
prometheus_client), and the supervisor adds them up at each scrape. One port to scrape and
to firewall, and counters of a worker that died stay counted. What is a property of the
service rather than of a worker (up, workers alive, bytes staged in the shared store) the
supervisor reads itself at scrape time.

Metrics (all prefixed ``clinic_gateway_``):

- ``captures_stored_total``: captures committed to the store (duplicates not counted);
- ``captures_rejected_total{reason}``: final "rejected" acks, by reason;
- ``transfer_seconds``: histogram, from a transfer's first manifest to its commit;
- ``device_last_seen_timestamp_seconds{device_id}``: the last message of each device;
- ``staging_bytes``: bytes of transfers in flight in the store's staging;
- ``up`` (1 while the supervisor serves) and ``workers_alive``, ``workers_configured``;
- PACS delivery (``[pacs]``, the forwarder process): ``pacs_queue_depth`` (instances waiting
  in ``.gateway/forward``), ``pacs_failed_entries`` (in ``forward/failed``, for a person),
  ``pacs_forwarded_total``, ``pacs_retries_total{reason}``, ``pacs_failed_total{reason}``
  and ``pacs_forward_seconds`` (histogram, one send).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, multiprocess
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

PREFIX = "clinic_gateway"
#: From a few seconds (a capture on a clinic LAN) to an hour (a device that came back late).
TRANSFER_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)


class GatewayMetrics:
    """What a Gateway counts (``Gateway(metrics=...)``). This base class counts nothing: a
    Gateway made without metrics (tests, the development command line) pays nothing."""

    def seen(self, device_id: str) -> None:
        """Any message from ``device_id`` arrived."""

    def acked(self, state: str, reason: str | None) -> None:
        """A final ack was sent (``committed`` or ``rejected``)."""

    def stored(self, staging_dir: Path) -> None:
        """A capture was committed; ``staging_dir`` holds its manifest, staged when its
        transfer began (on disk, so the time is right whichever worker took the manifest)."""


class PrometheusMetrics(GatewayMetrics):
    """The worker's figures, in prometheus_client's default registry (in multiprocess mode
    when the supervisor set PROMETHEUS_MULTIPROC_DIR)."""

    def __init__(self) -> None:
        self._stored = Counter(f"{PREFIX}_captures_stored", "Captures committed to the store")
        self._rejected = Counter(f"{PREFIX}_captures_rejected",
                                 "Captures refused for good (final 'rejected' ack)", ["reason"])
        self._transfer = Histogram(f"{PREFIX}_transfer_seconds",
                                   "Seconds from a transfer's manifest to its commit",
                                   buckets=TRANSFER_BUCKETS)
        # "max" across workers: the latest time any worker heard from the device.
        self._last_seen = Gauge(f"{PREFIX}_device_last_seen_timestamp_seconds",
                                "Unix time of the device's last message", ["device_id"],
                                multiprocess_mode="max")

    def seen(self, device_id: str) -> None:
        self._last_seen.labels(device_id=device_id).set(time.time())

    def acked(self, state: str, reason: str | None) -> None:
        if state == "rejected":
            self._rejected.labels(reason=reason or "unknown").inc()

    def stored(self, staging_dir: Path) -> None:
        self._stored.inc()
        try:
            began = (staging_dir / "manifest.json").stat().st_mtime
        except OSError:
            return  # another worker's clean-up raced us: the count still holds
        self._transfer.observe(max(0.0, time.time() - began))


#: One send to the PACS: milliseconds on a LAN, up to a timeout.
FORWARD_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class ForwarderMetrics:
    """What the PACS forwarder counts; this base class counts nothing (tests, the demo)."""

    def forwarded(self, seconds: float) -> None:
        """The PACS confirmed an instance, after ``seconds`` of sending."""

    def retried(self, reason: str) -> None:
        """A try failed and will be retried."""

    def failed(self, reason: str) -> None:
        """An entry was given up (moved to ``forward/failed``)."""


class PrometheusForwarderMetrics(ForwarderMetrics):
    """The forwarder's figures (clinic_gateway/forwarder.py), in the multiprocess registry."""

    def __init__(self) -> None:
        self._forwarded = Counter(f"{PREFIX}_pacs_forwarded",
                                  "Instances the PACS confirmed holding")
        self._retries = Counter(f"{PREFIX}_pacs_retries", "Failed tries, to be retried",
                                ["reason"])
        self._failed = Counter(f"{PREFIX}_pacs_failed",
                               "Queue entries given up (moved to forward/failed)", ["reason"])
        self._seconds = Histogram(f"{PREFIX}_pacs_forward_seconds",
                                  "Seconds of one successful send to the PACS",
                                  buckets=FORWARD_BUCKETS)

    def forwarded(self, seconds: float) -> None:
        self._forwarded.inc()
        self._seconds.observe(seconds)

    def retried(self, reason: str) -> None:
        self._retries.labels(reason=reason).inc()

    def failed(self, reason: str) -> None:
        self._failed.labels(reason=reason).inc()


def staging_bytes(store_dir: Path) -> int:
    """Bytes under the store's staging (transfers in flight only: cheap to walk)."""
    total = 0
    for root, _dirs, files in os.walk(store_dir / ".gateway" / "staging"):
        for name in files:
            try:
                total += os.stat(os.path.join(root, name)).st_size
            except OSError:
                continue  # removed while we looked
    return total


class ServiceCollector(Collector):
    """The supervisor's own lines, read at each scrape."""

    def __init__(self, store_dir: Path, workers: int, alive: Callable[[], int]) -> None:
        self.store_dir = store_dir
        self.workers = workers
        self.alive = alive

    def collect(self) -> Iterable[GaugeMetricFamily]:
        yield GaugeMetricFamily(f"{PREFIX}_up", "1 while the gateway's supervisor runs", 1)
        yield GaugeMetricFamily(f"{PREFIX}_workers_configured", "service.workers",
                                self.workers)
        yield GaugeMetricFamily(f"{PREFIX}_workers_alive", "Worker processes running",
                                self.alive())
        yield GaugeMetricFamily(f"{PREFIX}_staging_bytes",
                                "Bytes of transfers in flight in the store's staging",
                                staging_bytes(self.store_dir))
        from clinic_gateway.forwarder import depth  # the queue's layout is the forwarder's

        waiting, failed = depth(self.store_dir)
        yield GaugeMetricFamily(f"{PREFIX}_pacs_queue_depth",
                                "Instances waiting to be forwarded to the PACS", waiting)
        yield GaugeMetricFamily(f"{PREFIX}_pacs_failed_entries",
                                "Queue entries the PACS refused for good (forward/failed)",
                                failed)


def service_registry(multiproc_dir: Path, collector: ServiceCollector) -> CollectorRegistry:
    """The registry the supervisor serves: every worker's figures and its own."""
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=str(multiproc_dir))
    registry.register(collector)
    return registry


def worker_died(multiproc_dir: Path, pid: int) -> None:
    """Forget a dead worker's live gauges (its counters and histogram stay summed)."""
    multiprocess.mark_process_dead(pid, path=str(multiproc_dir))
