"""The daemon: opens the spool and queue, starts delivery and intake, and handles signals.

Signal handlers only note the signal; the main loop acts on it (SIGTERM/SIGINT: drain
and exit 0; SIGHUP: reload). systemd is told READY=1 when the listener is up.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import socket
import threading
import time
from pathlib import Path

from prometheus_client import start_http_server

from bridge import destinations
from bridge.config import Config, load_config
from bridge.delivery import Delivery, DestinationRunner
from bridge.errors import ConfigError
from bridge.intake import Intake, configure_pynetdicom
from bridge.metrics import Metrics
from bridge.queue import Queue
from bridge.spool import Spool

LOGGER = logging.getLogger(__name__)

HOUSEKEEPING_EVERY = 5.0  # seconds between gauge refreshes and expiry sweeps
PURGE_EVERY = 3600.0
DRAIN_TIMEOUT = 30.0  # seconds SIGTERM waits for associations, then for deliveries


def sd_notify(message: str) -> None:
    """Tell systemd (Type=notify) about our state, when it is listening."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.connect(address)
            s.sendall(message.encode())
    except OSError as exc:
        LOGGER.debug("sd_notify failed: %s", exc)


class Daemon:
    def __init__(self, config: Config, config_path: Path | None = None) -> None:
        self.config = config
        self.config_path = config_path
        self.metrics = Metrics(config.accept.calling_ae)
        data = config.data_dir
        data.mkdir(parents=True, exist_ok=True)
        self.spool = Spool(data / "spool")
        self.queue: Queue | None = None
        self.delivery: Delivery | None = None
        self.intake: Intake | None = None
        self._stop = threading.Event()
        self._reload = threading.Event()
        self._last_purge = 0.0

    # -- life cycle --------------------------------------------------------------------

    def start(self) -> None:
        self.spool.open()
        configure_pynetdicom(self.spool, self.config.accept.any_sop_class)
        self.queue = Queue(self.config.data_dir / "queue.sqlite")
        recovered = self.queue.recover()
        if recovered:
            LOGGER.warning("%d row(s) were in flight when the daemon last stopped; queued again", recovered)
        self._sweep_orphans()
        self.delivery = Delivery(self._runners(self.config, list(self.config.destinations)))
        self.delivery.start()
        self.intake = Intake(self.config, self.spool, self.queue, self.metrics, on_queued=self.delivery.wake)
        self.intake.start()
        if self.config.metrics.port:
            start_http_server(self.config.metrics.port, self.config.metrics.host, registry=self.metrics.registry)
            LOGGER.info("metrics on http://%s:%d/metrics", self.config.metrics.host, self.config.metrics.port)
        self.housekeeping()
        sd_notify("READY=1")

    def _runners(self, config: Config, names: list[str]) -> dict[str, DestinationRunner]:
        assert self.queue is not None
        return {
            name: DestinationRunner(
                name, functools.partial(destinations.build, name, config), config.destinations[name],
                config.retry_for(name), self.queue, self.spool, self.metrics,
            )
            for name in names
        }

    def _sweep_orphans(self) -> None:
        """Spool files no row needs: a crash between the rename and the queue commit, or
        between the last row's completion and the file's removal."""
        assert self.queue is not None
        needed = self.queue.needed_spool_paths()
        orphans = [p for p in self.spool.files() if str(p) not in needed]
        for path in orphans:
            self.spool.discard(path)
        if orphans:
            LOGGER.info("removed %d spool file(s) that no queue row needs", len(orphans))

    def serve_forever(self) -> int:
        """Run until SIGTERM or SIGINT; returns the exit code."""
        signal.signal(signal.SIGTERM, lambda *_: self._stop.set())
        signal.signal(signal.SIGINT, lambda *_: self._stop.set())
        signal.signal(signal.SIGHUP, lambda *_: self._reload.set())
        next_housekeeping = time.monotonic() + HOUSEKEEPING_EVERY
        while not self._stop.is_set():
            self._stop.wait(max(0.0, min(1.0, next_housekeeping - time.monotonic())))
            if self._reload.is_set():
                self._reload.clear()
                self.reload()
            if time.monotonic() >= next_housekeeping:
                self.housekeeping()
                next_housekeeping = time.monotonic() + HOUSEKEEPING_EVERY
        self.stop()
        return 0

    def request_stop(self) -> None:
        self._stop.set()

    def stop(self) -> None:
        """Stop accepting, let associations and deliveries in flight finish (bounded), close."""
        sd_notify("STOPPING=1")
        LOGGER.info("stopping: no new associations; waiting for those in progress")
        if self.intake is not None:
            self.intake.stop_accepting()
            self.intake.drain(time.monotonic() + DRAIN_TIMEOUT)
        if self.delivery is not None:
            self.delivery.stop(DRAIN_TIMEOUT)
        if self.queue is not None:
            self.queue.close()
        LOGGER.info("stopped")

    def reload(self) -> None:
        """SIGHUP: new rules for new associations; listener settings need a restart."""
        sd_notify("RELOADING=1")
        try:
            config = load_config(self.config_path)
        except ConfigError as exc:
            LOGGER.error("reload refused, keeping the running configuration:\n%s", exc)
            sd_notify("READY=1")
            return
        if self.delivery is not None:
            # Destinations added by the reload get workers; a removed one keeps its
            # workers, so its queued rows are still delivered (never dropped).
            # (A runner publishes its state when built, so only new ones are built.)
            added = self._runners(config, [n for n in config.destinations if n not in self.delivery.runners])
            for runner in added.values():
                runner.start()
            self.delivery.runners.update(added)
            for runner in self.delivery.runners.values():
                runner.resume()
        if self.intake is not None:
            self.intake.reload(config)
        self.config = config
        LOGGER.info("configuration reloaded from %s", self.config_path or "the embedded default")
        sd_notify("READY=1")

    # -- housekeeping ------------------------------------------------------------------

    def housekeeping(self) -> None:
        """Refresh gauges; dead-letter expired rows; purge old done rows now and then."""
        assert self.queue is not None
        retry_for = {name: self.config.retry_for(name) for name in self.config.destinations}
        expired = self.queue.expire(retry_for)
        if expired:
            LOGGER.warning("%d row(s) expired (older than max_age) and are dead", expired)
        if time.monotonic() - self._last_purge > PURGE_EVERY:
            self._last_purge = time.monotonic()
            for path in self.queue.purge_done(self.config.queue.retention):
                self.spool.discard(path)
        counts = self.queue.counts()
        oldest = self.queue.oldest_pending()
        now = time.time()
        names = set(self.config.destinations) | {d for d, _ in counts}
        for name in names:
            depth = counts.get((name, "pending"), 0) + counts.get((name, "in_flight"), 0)
            self.metrics.queue_depth.labels(name).set(depth)
            self.metrics.queue_dead.labels(name).set(counts.get((name, "dead"), 0))
            self.metrics.oldest_pending.labels(name).set(now - oldest[name] if name in oldest else 0)
        self.metrics.spool_free.set(self.spool.free_bytes())

    @property
    def port(self) -> int:
        assert self.intake is not None
        return self.intake.port
