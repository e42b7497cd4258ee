"""The daemon: opens the spool and queue, starts delivery, the DIMSE listener and watched
folders, and handles signals.

Signal handlers only note the signal; the main loop acts on it (SIGTERM/SIGINT: stop
watching, drain and exit 0; SIGHUP: reload, watched folders included). systemd is told
READY=1 when the listener is up, a STATUS= line (queue depth, associations) at each
housekeeping, and WATCHDOG=1 from the main loop itself when the unit sets WatchdogSec=
(a main loop that hangs stops pinging, and systemd restarts the daemon). The main loop also takes, every second, what
``dicom-bridge queue`` asked of the running daemon (request rows in the queue database:
resume a destination, wake its workers).
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bridge import destinations
from bridge.config import Config, DataDir, Node, load_config
from bridge.dimse import pynetdicom_overrides
from bridge.dimse.listener import Listener
from bridge.dimse.store import Store
from bridge.dimse.verification import Verification
from bridge.errors import ConfigError, StartError, TokenFileError
from bridge.forward.delivery import SUSPENDED, UP, Delivery, DestinationRunner
from bridge.forward.ingest import Ingest
from bridge.forward.queue import DEAD, IN_FLIGHT, PENDING, RESUME, Queue
from bridge.forward.spool import Spool
from bridge.metrics import Metrics
from bridge.qr.find import Find
from bridge.qr.get import Get
from bridge.qr.move import Move
from bridge.sources import Sources
from bridge.watch.watcher import Watcher

if TYPE_CHECKING:
    from bridge.api.server import HttpServer

LOGGER = logging.getLogger(__name__)

HOUSEKEEPING_EVERY = 5.0  # seconds between gauge refreshes and expiry sweeps
PURGE_EVERY = 3600.0
DRAIN_TIMEOUT = 30.0  # seconds SIGTERM waits for associations, then for deliveries
RELOAD_DRAIN_TIMEOUT = 30.0  # seconds a reload waits for the batches of destinations it rebuilds or removes


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


def watchdog_interval() -> float | None:
    """Seconds between WATCHDOG=1 pings: half of ``WATCHDOG_USEC``, as sd_watchdog_enabled(3)
    advises; None when systemd does not watch this process."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec.isdigit() or int(usec) == 0 or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 2e6


class Daemon:
    def __init__(self, config: Config, config_path: Path | None = None) -> None:
        self.config = config
        self.config_path = config_path
        self.metrics = Metrics(config.accept.calling_ae)
        self.data_dir = DataDir(config.data_dir)
        self.spool = Spool(self.data_dir)  # nothing is written before start() has bound
        self.queue: Queue | None = None
        self.delivery: Delivery | None = None
        self.listener: Listener | None = None
        self.ingest: Ingest | None = None
        self.watcher: Watcher | None = None
        # What C-FIND asks: built when first asked, again when a reload changes them.
        self.sources = Sources(self.metrics)
        self.http: HttpServer | None = None
        self._stop = threading.Event()
        self._reload = threading.Event()
        # Reloads asked for through the HTTP API, answered by the main loop's next reload.
        self._reload_waiters: list[Future[str | None]] = []
        self._reload_lock = threading.Lock()
        self._last_purge = 0.0

    # -- life cycle --------------------------------------------------------------------

    def start(self) -> None:
        _log_config(self.config)
        pynetdicom_overrides.install(self.spool.new_temp, self.config.accept.any_sop_class,
                                     self.config.accept.extra_sop_classes)
        # The listening sockets first: an address in use (another instance) fails here,
        # before anything is written. No association is served before listener.start().
        self.listener = Listener(self.config, self.metrics, self.spool)
        self.listener.bind()
        if self.config.http.port is not None:
            self._serve_http()
        self.data_dir.root.mkdir(parents=True, exist_ok=True)
        self.spool.open()
        self.queue = Queue(self.data_dir.queue, self.config.queue.busy_timeout)
        recovered = self.queue.recover()
        if recovered:
            LOGGER.warning("%d row(s) were in flight when the daemon last stopped; queued again", recovered)
        self._sweep_orphans()
        # Requests left from before this start are moot: every destination starts up and
        # its workers look at the queue at once.
        self.queue.take_requests()
        self.queue.note_daemon(os.getpid())
        destinations.preload(self.config.destinations.values())
        self.delivery = Delivery(self._runners(self.config, list(self.config.destinations)))
        self.delivery.start()
        self._report_unconfigured({
            d for (d, state), n in self.queue.counts().items()
            if d not in self.config.destinations and state in _UNDELIVERED and n
        })
        # The durable path of C-STOREs and watched files alike (bridge.forward.ingest).
        self.ingest = Ingest(self.spool, self.queue, self.metrics, on_queued=self.delivery.wake)
        # The DIMSE services the listener provides: a module of bridge.dimse each.
        self.listener.start([Verification(self.metrics), Store(self.ingest, self.queue, self.metrics),
                             Find(self.sources, self.metrics), Move(self.sources, self.metrics),
                             Get(self.sources, self.metrics)],
                            on_finished=self.delivery.flush)
        # Watched files are taken with the listener's rules.
        self.watcher = Watcher(self.config, self.listener.rules, self.ingest, self.metrics)
        self.watcher.start()
        self.housekeeping()
        sd_notify("READY=1")

    def _serve_http(self) -> None:
        """The HTTP server (bridge.api): bound now, so that an address in use fails the
        start before anything is written; serving at once (``/healthz``; ``/readyz``
        says "not ready" until the listener accepts). Imported here: FastAPI and uvicorn
        take a quarter of a second to import, which a daemon without ``http`` need not pay."""
        from bridge.api.server import HttpServer
        from bridge.api.state import ApiState

        state = ApiState(self)
        try:
            state.configure(self.config)
        except TokenFileError as exc:
            raise StartError(str(exc)) from exc
        self.http = HttpServer(self.config, state)
        self.http.bind()
        self.http.start()

    def _runners(self, config: Config, names: list[str]) -> dict[str, DestinationRunner]:
        assert self.queue is not None
        return {
            name: DestinationRunner(
                name, functools.partial(destinations.build, name, config.destinations[name], _node(config, name),
                                        config.ae_title, DataDir(config.data_dir)),
                config.destinations[name], config.retry_for(name), self.queue, self.spool, self.metrics,
            )
            for name in names
        }

    def _sweep_orphans(self) -> None:
        """At start: remove spool files no row needs (a crash between the rename and the
        queue commit, or between the last row's completion and the file's removal), and
        mark dead the pending rows whose file is gone; neither when the rows name files
        outside this spool (a moved data_dir)."""
        assert self.queue is not None
        needed = self.queue.needed_spool_paths()
        root = os.path.join(str(self.spool.root), "")
        elsewhere = [p for p in needed if not p.startswith(root)]
        if elsewhere:
            # The rows name files under another folder: data_dir was moved or renamed. The
            # files here are not orphans, nor are those rows' files lost; touch nothing.
            LOGGER.error("%d queued row(s) name spool files outside %s, e.g. %s: was data_dir moved? "
                         "Nothing is removed from the spool until the daemon runs with the data_dir "
                         "they were queued in", len(elsewhere), self.spool.root, elsewhere[0])
            return
        present = self.spool.files()
        orphans = [p for p in present if str(p) not in needed]
        for path in orphans:
            self.spool.discard(path)
        if orphans:
            LOGGER.info("removed %d spool file(s) that no queue row needs", len(orphans))
        # Rows whose file is gone: a crash after the queue's commit but before the file's
        # folder entry reached the disk (ingest syncs the two side by side, and answers
        # only once both are durable), or files removed by hand. Left pending, such a row
        # would make the modality's resend of that instance look like a harmless
        # duplicate, acknowledged and then lost; dead, it says what happened.
        on_disk = {str(p) for p in present}
        missing = [p for p in needed if p not in on_disk]
        lost = self.queue.dead_without_file(missing, "its spool file is missing at start-up") if missing else 0
        if lost:
            LOGGER.error("%d queued row(s) have lost their spool file and are dead; a resend of those "
                         "instances is queued anew", lost)

    def handle_signals(self) -> None:
        """SIGTERM and SIGINT ask for a stop, SIGHUP for a reload; the main loop acts on them.
        Called before ``start``: a signal that comes while the daemon starts (it answers
        C-ECHO before its start has ended) waits for the main loop instead of killing it."""
        signal.signal(signal.SIGTERM, lambda *_: self._stop.set())
        signal.signal(signal.SIGINT, lambda *_: self._stop.set())
        signal.signal(signal.SIGHUP, lambda *_: self._reload.set())

    def serve_forever(self) -> int:
        """Run until a stop is asked for (``handle_signals``, ``request_stop``); returns the exit code."""
        next_housekeeping = time.monotonic() + HOUSEKEEPING_EVERY
        watchdog = watchdog_interval()
        next_ping = time.monotonic()
        while not self._stop.is_set():
            # The pings come from this loop, not from a thread of their own: if this loop
            # hangs (a reload, the housekeeping, a request stuck), systemd hears nothing.
            if watchdog is not None and time.monotonic() >= next_ping:
                sd_notify("WATCHDOG=1")
                next_ping = time.monotonic() + watchdog
            wake = min(next_housekeeping, next_ping) if watchdog is not None else next_housekeeping
            self._stop.wait(max(0.0, min(1.0, wake - time.monotonic())))
            if self._reload.is_set():
                self._reload.clear()
                self._reload_now()
            self._survive("requests", self.act_on_requests)
            if time.monotonic() >= next_housekeeping:
                self._survive("housekeeping", self.housekeeping)
                next_housekeeping = time.monotonic() + HOUSEKEEPING_EVERY
        self.stop()
        return 0

    def _reload_now(self) -> None:
        """A reload (SIGHUP or the API), whose outcome goes to every API call waiting for one."""
        with self._reload_lock:
            waiting, self._reload_waiters = self._reload_waiters, []
        refused: list[str | None] = [None]

        def reload() -> None:
            refused[0] = self.reload()

        if not self._survive("reload", reload):
            sd_notify("READY=1")  # not left "reloading": the running configuration serves on
            refused[0] = "the reload failed; the daemon's log says why"
        for waiter in waiting:
            waiter.set_result(refused[0])

    def reload_and_wait(self, timeout: float) -> str | None:
        """Ask the main loop for a reload and wait for it (``bridge.api``): None when the
        new configuration runs, else why it was refused. ``TimeoutError`` past ``timeout``."""
        waiter: Future[str | None] = Future()
        with self._reload_lock:
            self._reload_waiters.append(waiter)
        self._reload.set()
        return waiter.result(timeout)

    def _survive(self, worker: str, action: Callable[[], None]) -> bool:
        """Run one turn of the main loop's work; an error is logged and counted, and the
        loop goes on (the next turn is the retry: a second for requests, HOUSEKEEPING_EVERY
        for housekeeping, the next SIGHUP for a reload). Returns whether it went through."""
        try:
            action()
        except sqlite3.Error as exc:
            self.metrics.queue_errors.labels(worker).inc()
            LOGGER.error("%s: queue error: %s; tried again later", worker, exc)
        except Exception:
            LOGGER.exception("%s failed; tried again later", worker)
        else:
            return True
        return False

    def request_stop(self) -> None:
        self._stop.set()

    def stop(self) -> None:
        """Stop accepting, let associations and deliveries in flight finish (bounded), close."""
        sd_notify("STOPPING=1")
        if self.watcher is not None:
            self.watcher.stop()
        LOGGER.info("stopping: no new associations; waiting for those in progress")
        if self.listener is not None:
            self.listener.stop_accepting()
            self.listener.drain(time.monotonic() + DRAIN_TIMEOUT)
        if self.ingest is not None:
            self.ingest.close()
        if self.delivery is not None:
            self.delivery.stop(DRAIN_TIMEOUT)
        if self.queue is not None:
            self.queue.note_daemon(None)
            self.queue.close()
        self.sources.close()
        if self.http is not None:
            self.http.stop()
        with self._reload_lock:
            for waiter in self._reload_waiters:
                waiter.set_result("the daemon is stopping")
            self._reload_waiters = []
        LOGGER.info("stopped")

    def reload(self) -> str | None:
        """SIGHUP: new rules for new associations, destinations as the file now says;
        listener and HTTP server addresses need a restart. Returns None when the new
        configuration runs, else why it was refused (logged too)."""
        sd_notify("RELOADING=1")
        try:
            config = load_config(self.config_path)
            if self.http is not None:
                self.http.state.configure(config)
        except (ConfigError, TokenFileError) as exc:
            LOGGER.error("reload refused, keeping the running configuration:\n%s", exc)
            sd_notify("READY=1")
            return f"reload refused, keeping the running configuration: {exc}"
        if (config.http.host, config.http.port) != (self.config.http.host, self.config.http.port) or \
                config.http.tls != self.config.http.tls:
            LOGGER.warning("http: its address and TLS settings take effect at the next restart")
        destinations.preload(config.destinations.values())
        if self.delivery is not None:
            self._reload_destinations(config)
        if self.listener is not None:
            self.listener.reload(config)
        if self.watcher is not None and self.listener is not None:
            self.watcher.reload(config, self.listener.rules)
        self.config = config
        LOGGER.info("configuration reloaded from %s", self.config_path or "the embedded default")
        _log_config(config)
        sd_notify("READY=1")
        return None

    def _reload_destinations(self, config: Config) -> None:
        """Runners as ``config`` says: new ones for added destinations and for those whose
        settings changed (the old runner's batch in flight finishes first, bounded); none
        for removed ones, whose rows stay queued (never dropped). Suspensions are lifted:
        a reload is how an administrator says the cause may be fixed. A back-off is kept
        unless the destination changed: a rebuilt runner starts up and tries at once.
        (A runner publishes its state when built, so unchanged ones are not rebuilt.)
        """
        assert self.delivery is not None and self.queue is not None
        running = self.delivery.runners
        added = [n for n in config.destinations if n not in running]
        removed = [n for n in running if n not in config.destinations]
        changed = [n for n in running if n in config.destinations
                   and _built_from(self.config, n) != _built_from(config, n)]
        for name in self.delivery.retire(removed + changed, RELOAD_DRAIN_TIMEOUT):
            LOGGER.warning("destination %s: a batch is still in flight after %.0fs; it is recorded when it ends",
                           name, RELOAD_DRAIN_TIMEOUT)
        for runner in running.values():
            if runner.state == SUSPENDED:
                runner.resume()
        for name in changed:
            self.queue.due_now(name)
            LOGGER.info("destination %s changed: its workers are rebuilt with the new settings", name)
        self.delivery.add(self._runners(config, changed + added))
        self._report_unconfigured(removed)

    def _report_unconfigured(self, names: Iterable[str]) -> None:
        """Destinations not in the configuration keep their rows, never dropped: say which,
        with how many rows, and what an administrator can do about them."""
        assert self.queue is not None
        counts = self.queue.counts()
        for name in sorted(names):
            by_state = {state: n for (d, state), n in counts.items() if d == name}
            undelivered = sum(by_state.get(state, 0) for state in _UNDELIVERED)
            LOGGER.warning(
                "destination %s is not in the configuration: its %d undelivered row(s) stay in the queue (%s); "
                "add it back and reload to deliver them, or remove them with "
                "'dicom-bridge queue purge --destination %s'",
                name, undelivered, ", ".join(f"{s} {n}" for s, n in sorted(by_state.items())) or "no rows", name,
            )
            self.queue.set_destination_state(name, "removed", "not in the configuration", None)
            self.metrics.set_destination_state(name, "removed")

    # -- requests from `dicom-bridge queue` ------------------------------------------------

    def act_on_requests(self) -> None:
        """Act on what ``dicom-bridge queue`` asked for since the last look: ``resume`` puts
        a suspended or backing-off destination back up, ``wake`` makes its workers look at
        the queue now (dead rows were retried). See docs/operations.md."""
        assert self.queue is not None and self.delivery is not None
        try:
            requests = self.queue.take_requests()
        except sqlite3.Error as exc:  # e.g. the CLI holds the lock too long: ask again in a second
            LOGGER.warning("cannot read requests from the queue: %s", exc)
            self.metrics.queue_errors.labels("requests").inc()
            return
        for action, name in requests:
            runner = self.delivery.runners.get(name)
            if runner is None:
                LOGGER.warning("'queue %s %s': %s is not in the running configuration; its rows wait",
                               action, name, name)
            elif action == RESUME:
                LOGGER.info("destination %s: resume requested with 'dicom-bridge queue resume'", name)
                runner.resume()
            else:
                runner.wake()

    # -- housekeeping ------------------------------------------------------------------

    def housekeeping(self) -> None:
        """Restart delivery workers that ended; refresh gauges; dead-letter expired rows;
        purge old done rows now and then."""
        assert self.queue is not None and self.delivery is not None
        self.delivery.supervise()
        retry_for = {name: self.config.retry_for(name) for name in self.config.destinations}
        expired = self.queue.expire(retry_for)
        if expired:
            LOGGER.warning("%d row(s) expired (older than max_age) and are dead", expired)
        if time.monotonic() - self._last_purge > PURGE_EVERY:
            for path in self.queue.purge_done(self.config.queue.retention):
                self.spool.discard(path)
            self._last_purge = time.monotonic()  # after a queue error, tried again at the next housekeeping
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
        if os.environ.get("NOTIFY_SOCKET"):
            sd_notify("STATUS=" + self._status(counts))

    def _status(self, counts: dict[tuple[str, str], int]) -> str:
        """One line for ``systemctl status``: queue depth, associations, destinations not up."""
        assert self.delivery is not None and self.listener is not None
        pending = sum(n for (_, state), n in counts.items() if state in (PENDING, IN_FLIGHT))
        dead = sum(n for (_, state), n in counts.items() if state == DEAD)
        status = f"queue: {pending} pending, {dead} dead; {self.listener.active()} associations"
        down = sorted(f"{name} {runner.state}" for name, runner in self.delivery.runners.items()
                      if runner.state != UP)
        return status + ("; " + ", ".join(down) if down else "")

    @property
    def port(self) -> int:
        assert self.listener is not None
        return self.listener.port


_UNDELIVERED = (PENDING, IN_FLIGHT, DEAD)


def _log_config(config: Config) -> None:
    """What ``check`` would say of a configuration that runs but may not do what was meant."""
    for note in config.notes:
        LOGGER.info("configuration: %s", note)
    warning = config.store_warning()
    if warning:
        LOGGER.warning("configuration: %s", warning)


def _built_from(config: Config, name: str) -> tuple[Any, ...]:
    """What the runner of destination ``name`` is built from; a reload that changes any of
    it rebuilds the runner."""
    return config.destinations[name], config.retry_for(name), _node(config, name), config.data_dir


def _node(config: Config, name: str) -> Node | None:
    """The node a destination of type dimse sends to; None for the other types."""
    node = getattr(config.destinations[name], "node", None)
    return config.nodes.get(node) if node else None
