"""Prometheus metrics, prefix ``dicom_bridge_``, in a registry owned by the daemon.

Labels are bounded: service, status, destination, outcome, watched folder and source
(as configured), the operation of a request to a source (``qido``, ``wado``, ``c-find``,
``c-get``, ``c-move``, ``rad69``, ``index``), and calling AE folded to ``other`` past a
fixed number of distinct titles. Never a UID, never patient data.
"""

from __future__ import annotations

import threading

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

# No ``*_created`` series beside every counter and histogram: they double what a scrape
# carries, and neither the dashboard nor the alerts read them.
disable_created_metrics()

MAX_CALLING_AES = 50
DESTINATION_STATES = ("up", "backing_off", "suspended")


class Metrics:
    def __init__(self, known_calling_aes: list[str] | None = None) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self._aes: set[str] = set(known_calling_aes or [])
        self._aes_lock = threading.Lock()
        self.associations = Counter(
            "dicom_bridge_associations", "Associations requested, by result", ["result"], registry=r
        )
        self.active_associations = Gauge(
            "dicom_bridge_active_associations", "Associations open now", registry=r
        )
        self.dimse_requests = Counter(
            "dicom_bridge_dimse_requests", "DIMSE requests served, by service and status", ["service", "status"],
            registry=r,
        )
        self.received_instances = Counter(
            "dicom_bridge_received_instances", "Instances received and spooled", ["calling_ae"], registry=r
        )
        self.received_bytes = Counter(
            "dicom_bridge_received_bytes", "Bytes received and spooled", ["calling_ae"], registry=r
        )
        self.delivered = Counter(
            "dicom_bridge_delivered_instances", "Delivery outcomes, by destination",
            ["destination", "outcome"], registry=r,
        )
        self.delivery_latency = Histogram(
            "dicom_bridge_delivery_latency_seconds", "From receipt to confirmed delivery", ["destination"],
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 21600, 86400), registry=r,
        )
        self.dead_letters = Counter(
            "dicom_bridge_dead_letters", "Rows that became dead, by destination", ["destination"], registry=r
        )
        self.queue_depth = Gauge(
            "dicom_bridge_queue_depth", "Rows pending or in flight, by destination", ["destination"], registry=r
        )
        self.queue_dead = Gauge(
            "dicom_bridge_queue_dead", "Dead rows waiting for an administrator", ["destination"], registry=r
        )
        self.oldest_pending = Gauge(
            "dicom_bridge_queue_oldest_pending_seconds", "Age of the oldest undelivered row", ["destination"],
            registry=r,
        )
        self.destination_state = Gauge(
            "dicom_bridge_destination_state", "1 for the destination's current state", ["destination", "state"],
            registry=r,
        )
        self.watch_files = Counter(
            "dicom_bridge_watch_files", "Files taken from watched folders, by folder and result "
            "(queued, duplicate, failed, retried)", ["watch", "result"], registry=r,
        )
        self.watch_backlog = Gauge(
            "dicom_bridge_watch_backlog", "Files seen in a watched folder and not yet taken", ["watch"], registry=r,
        )
        self.queue_errors = Counter(
            "dicom_bridge_queue_errors", "Queue database errors (locked past the busy timeout, disk full, I/O) "
            "that a worker met and retries, by worker (deliver-<destination>; intake: C-STORE and watched "
            "folders; housekeeping, requests, reload)", ["worker"], registry=r,
        )
        self.worker_restarts = Counter(
            "dicom_bridge_worker_restarts", "Delivery workers that ended unexpectedly and were restarted, "
            "by destination", ["destination"], registry=r,
        )
        self.spool_free = Gauge("dicom_bridge_spool_free_bytes", "Free bytes on the spool's file system", registry=r)
        self.finds = Counter(
            "dicom_bridge_finds", "C-FIND answers per source, by the status it ended with for that source "
            "(0x0000: answered; 0xA700, 0xC001: failed; 0xFE00: cancelled)", ["source", "status"], registry=r,
        )
        self.find_capped = Counter(
            "dicom_bridge_find_capped", "C-FINDs that reached find.max_results and answered no more, by source",
            ["source"], registry=r,
        )
        self.retrievals = Counter(
            "dicom_bridge_retrievals", "C-MOVEs and C-GETs answered, by operation, the source that located the "
            "instances, and the final status", ["operation", "source", "status"], registry=r,
        )
        self.retrieve_suboperations = Counter(
            "dicom_bridge_retrieve_suboperations", "C-MOVE and C-GET sub-operations, by operation and outcome "
            "(completed, warning, failed: not fetched from any source, or not stored by the destination)",
            ["operation", "outcome"], registry=r,
        )
        self.upstream_latency = Histogram(
            "dicom_bridge_upstream_request_seconds", "Requests to a source (a QIDO-RS page, a C-FIND to a PACS, "
            "an archive index query; a WADO-RS retrieval until its answer begins), by source and operation",
            ["source", "operation"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60), registry=r,
        )
        self.upstream_errors = Counter(
            "dicom_bridge_upstream_errors", "Requests to a source that failed: refused, timed out, an HTTP error "
            "status, a DIMSE failure status, an answer that cannot be read; by source and operation (those of "
            "dicom_bridge_upstream_request_seconds)", ["source", "operation"], registry=r,
        )

    def add_source(self, source: str, operations: tuple[str, ...]) -> None:
        """The upstream series of a source, at zero from the start: an alert on
        ``increase()`` sees its first error (a series that appears with 1 shows no increase)."""
        for operation in operations:
            self.upstream_errors.labels(source, operation)
            self.upstream_latency.labels(source, operation)

    def calling_ae(self, ae_title: str) -> str:
        """The label for a calling AE: itself while the set is small, else ``other``."""
        with self._aes_lock:
            if ae_title in self._aes:
                return ae_title
            if len(self._aes) < MAX_CALLING_AES:
                self._aes.add(ae_title)
                return ae_title
        return "other"

    def set_destination_state(self, destination: str, state: str) -> None:
        for s in DESTINATION_STATES:
            self.destination_state.labels(destination, s).set(1 if s == state else 0)
