"""Delivery: one worker pool per destination.

Each worker claims a batch, calls ``Destination.send`` and records one outcome per
row. This module is the one place where destination errors become queue outcomes:
``DestinationUnavailable`` backs the whole destination off (circuit breaker) without
charging rows; ``DestinationMisconfigured`` suspends it until a reload or ``queue
resume``; any other exception is a bug in a destination and is charged to the rows as
a transient failure, so it cannot loop forever.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence

from bridge.config import DestinationBase, Retry
from bridge.errors import DestinationMisconfigured, DestinationUnavailable
from bridge.metrics import Metrics
from bridge.model import Destination, Done, Duplicate, Outcome, Permanent, Transient, Warning
from bridge.queue import Batch, Queue, Row, backoff
from bridge.spool import Spool

LOGGER = logging.getLogger(__name__)

UP, BACKING_OFF, SUSPENDED = "up", "backing_off", "suspended"
POLL = 1.0  # seconds between looks at the queue when nothing wakes a worker
# While another worker of the destination is sending, a worker takes a batch that is not
# full only once its first instance has waited this long (see DestinationRunner._claim).
SHARE_AFTER = 0.05


class DestinationRunner:
    """Workers of one destination, and its state: up, backing off (until when), suspended (why)."""

    def __init__(
        self,
        name: str,
        factory: Callable[[], Destination],
        settings: DestinationBase,
        retry: Retry,
        queue: Queue,
        spool: Spool,
        metrics: Metrics,
    ) -> None:
        self.name = name
        self._factory = factory
        self.settings = settings
        self.retry = retry
        self._queue = queue
        self._spool = spool
        self._metrics = metrics
        self._cond = threading.Condition()
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._sending = 0  # workers between a claim and the end of its batch
        self._flush = False  # the next claim takes what is due, even beside a batch in flight
        # Rows a worker waits for (a batch not full, not yet due beside one in flight): while
        # there are, ``queued`` wakes nobody until they would fill a batch.
        self._held = 0
        # Counts the wake-ups sent (each notify): a worker that claimed nothing waits only
        # if none came since it started claiming; else one sent meanwhile, while it was
        # not yet waiting, would be lost and the rows it announced left for POLL.
        self._signals = 0
        self.state, self.reason, self.until, self._failures = UP, "", 0.0, 0
        self._publish()

    # -- control -----------------------------------------------------------------------

    def start(self) -> None:
        for n in range(self.settings.workers):
            thread = threading.Thread(target=self._run, name=f"deliver-{self.name}-{n}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def wake(self) -> None:
        with self._cond:
            self._signals += 1
            self._cond.notify_all()

    def flush(self) -> None:
        """Send what is queued now, beside a batch in flight, instead of after
        ``SHARE_AFTER`` or that batch: a modality has finished an association, so nothing
        more of it is coming to make the next batch larger."""
        with self._cond:
            self._flush = True
            self._held = 0
            self._signals += 1
            self._cond.notify_all()

    def queued(self) -> None:
        """New rows are due: one idle worker looks (what it leaves, the others would leave
        too; waking them all would cost a claim query each, for every instance). While a
        worker already waits for a batch to be due (``SHARE_AFTER``), nobody is woken
        until the rows would fill one: each of those wakes was a claim query, under the
        queue's lock that intake's commits take too, that took nothing."""
        with self._cond:
            if self._held:
                self._held += 1
                if self._held < self.settings.batch.max_instances:
                    return
                self._held = 0
            self._signals += 1
            self._cond.notify()

    def request_stop(self) -> None:
        """Stop claiming new batches."""
        self._stopping.set()
        self.wake()

    def stop(self, deadline: float) -> None:
        """Stop claiming; let batches in flight finish until ``deadline`` (monotonic)."""
        self.request_stop()
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    @property
    def busy(self) -> bool:
        """Whether a worker is still running (after ``stop``: a batch still in flight)."""
        return any(thread.is_alive() for thread in self._threads)

    def resume(self) -> None:
        """Back to up, now: a reload or ``queue resume`` says the cause may be gone."""
        with self._cond:
            if self.state != UP:
                LOGGER.warning("destination %s resumed (was %s: %s)", self.name, self.state, self.reason)
            self.state, self.reason, self.until, self._failures = UP, "", 0.0, 0
            self._publish()
            self._signals += 1
            self._cond.notify_all()

    # -- the worker --------------------------------------------------------------------

    def _run(self) -> None:
        destination: Destination | None = None
        last_work = time.monotonic()
        quiet = True  # nothing was claimed last time: linger before the next claim
        while not self._stopping.is_set():
            with self._cond:
                seen = self._signals
            wait = self._must_wait()
            if not wait and quiet and self.settings.batch.linger:
                self._stopping.wait(self.settings.batch.linger)
            rows = Batch() if wait else self._claim()
            quiet = len(rows) < self.settings.batch.max_instances
            if not rows:
                if destination is not None and time.monotonic() - last_work > self.settings.idle_close:
                    self._close(destination)
                    destination = None
                with self._cond:
                    if not self._stopping.is_set() and self._signals == seen:
                        # while others send, look again soon (when what waits is due to share)
                        soon = rows.due_in or (SHARE_AFTER if self._sending else POLL)
                        self._cond.wait(min(wait or POLL, soon))
                continue
            try:
                if destination is None:
                    destination = self._factory()
                destination = self._deliver(destination, rows)
            finally:
                with self._cond:
                    self._sending -= 1
            last_work = time.monotonic()
        if destination is not None:
            self._close(destination)

    def _claim(self) -> Batch:
        """The next batch for this worker. While another worker is sending, only a full
        batch, or instances that have waited ``SHARE_AFTER`` (behind a large upload): a
        trickle of instances goes out as soon as it comes, one request at a time, and
        what arrives meanwhile makes the next batch larger (fewer requests, less work per
        instance for both sides); a backlog (after an outage, a migration) fills every
        worker's batch and they all send at once."""
        with self._cond:
            others = self._sending
            self._sending += 1
            flush, self._flush = self._flush, False
        rows = Batch()
        try:
            rows = self._queue.claim(self.name, self.settings.batch.max_instances, self.settings.batch.max_bytes,
                                     partial_after=SHARE_AFTER if others and not flush else 0.0)
        finally:
            with self._cond:
                self._held = rows.waiting
                if not rows:
                    self._sending -= 1
        return rows

    def _must_wait(self) -> float:
        """Seconds to wait before claiming (0 = go)."""
        with self._cond:
            if self.state == SUSPENDED:
                return POLL
            if self.state == BACKING_OFF:
                return max(0.0, self.until - time.time())
            return 0.0

    def _deliver(self, destination: Destination, rows: Sequence[Row]) -> Destination | None:
        """Send one batch; returns the destination to keep using, or None to start afresh."""
        try:
            destination.open()
            outcomes = list(destination.send([r.instance for r in rows]))
            if len(outcomes) != len(rows):
                raise RuntimeError(f"{len(outcomes)} outcomes for {len(rows)} instances")
        except DestinationUnavailable as exc:
            until = self._back_off(exc.reason, exc.retry_after)
            self._queue.release(rows, until, exc.reason)
            self._close(destination)
            return None
        except DestinationMisconfigured as exc:
            self._suspend(exc.reason)
            self._queue.release(rows, time.time(), exc.reason)
            self._close(destination)
            return None
        except Exception as exc:
            LOGGER.exception("destination %s failed unexpectedly", self.name)
            outcomes = [Transient(f"internal error: {type(exc).__name__}: {exc}")] * len(rows)
            self._record(rows, outcomes)
            self._close(destination)
            return None
        self._up()
        self._record(rows, outcomes)
        return destination

    def _record(self, rows: Sequence[Row], outcomes: Sequence[Outcome]) -> None:
        releasable = self._queue.record(rows, outcomes, self.retry)
        now = time.time()
        for row, outcome in zip(rows, outcomes, strict=True):
            kind = type(outcome).__name__.lower()
            self._metrics.delivered.labels(self.name, kind).inc()
            if isinstance(outcome, Done | Duplicate | Warning):
                self._metrics.delivery_latency.labels(self.name).observe(max(0.0, now - row.received_at))
                if isinstance(outcome, Warning):
                    LOGGER.info("row %d to %s delivered with warning: %s", row.id, self.name, outcome.reason)
            elif isinstance(outcome, Permanent) or row.attempts + 1 >= self.retry.max_attempts:
                self._metrics.dead_letters.labels(self.name).inc()
                LOGGER.warning("row %d to %s is dead: %s", row.id, self.name, getattr(outcome, "reason", ""))
            else:
                LOGGER.info("row %d to %s will be retried: %s", row.id, self.name, getattr(outcome, "reason", ""))
        for path in releasable:
            self._spool.recycle(path)

    def _close(self, destination: Destination) -> None:
        try:
            destination.close()
        except Exception:
            LOGGER.exception("closing destination %s", self.name)

    # -- state -------------------------------------------------------------------------

    def _up(self) -> None:
        if self.state == UP:
            return
        with self._cond:
            if self.state == BACKING_OFF:
                LOGGER.warning("destination %s is up again", self.name)
                self.state, self.reason, self.until, self._failures = UP, "", 0.0, 0
                self._publish()

    def _back_off(self, reason: str, retry_after: float | None) -> float:
        with self._cond:
            if self.state == BACKING_OFF and self.until > time.time():
                return self.until  # another worker already backed off
            self._failures += 1
            delay = max(backoff(self._failures, self.retry), retry_after or 0.0)
            self.state, self.reason, self.until = BACKING_OFF, reason, time.time() + delay
            LOGGER.warning("destination %s unavailable (%s); next try in %.1fs", self.name, reason, delay)
            self._publish()
            return self.until

    def _suspend(self, reason: str) -> None:
        with self._cond:
            if self.state != SUSPENDED:
                LOGGER.error("destination %s suspended: %s (resume with a reload or 'queue resume')",
                             self.name, reason)
            self.state, self.reason, self.until = SUSPENDED, reason, 0.0
            self._publish()

    def _publish(self) -> None:
        self._metrics.set_destination_state(self.name, self.state)
        self._queue.set_destination_state(self.name, self.state, self.reason or None, self.until or None)


class Delivery:
    """All destination runners of the daemon."""

    def __init__(self, runners: dict[str, DestinationRunner]) -> None:
        self.runners = runners

    def start(self) -> None:
        for runner in self.runners.values():
            runner.start()

    def wake(self, names: Sequence[str]) -> None:
        """Rows were queued for ``names``."""
        for name in names:
            if runner := self.runners.get(name):
                runner.queued()

    def flush(self) -> None:
        """An association that stored instances has ended: send what it left now."""
        for runner in list(self.runners.values()):
            runner.flush()

    def add(self, runners: dict[str, DestinationRunner]) -> None:
        """Start the runners of destinations that a reload added or changed."""
        for runner in runners.values():
            runner.start()
        self.runners.update(runners)

    def retire(self, names: Sequence[str], timeout: float) -> list[str]:
        """Stop and forget the runners of ``names`` (a reload removed or changed them).

        They claim nothing more; a batch in flight finishes, up to ``timeout`` seconds for
        all of them together, so it is recorded by the runner that sent it. Returns the
        names whose batch was still in flight at the deadline: its rows stay claimed, so
        a new runner cannot send them twice, and are recorded when it ends.
        """
        deadline = time.monotonic() + timeout
        retired = [self.runners.pop(name) for name in names if name in self.runners]
        for runner in retired:
            runner.request_stop()
        for runner in retired:
            runner.stop(deadline)
        return [runner.name for runner in retired if runner.busy]

    def stop(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for runner in self.runners.values():
            runner.request_stop()
        for runner in self.runners.values():
            runner.stop(deadline)
