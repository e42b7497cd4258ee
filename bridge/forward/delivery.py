"""Delivery: one worker pool per destination.

Each worker claims a batch, calls ``Destination.send`` and records one outcome per
row. This module is the one place where upstream errors become queue outcomes:
``UpstreamUnavailable`` backs the whole destination off (circuit breaker) without
charging rows; ``UpstreamMisconfigured`` suspends it until a reload or ``queue
resume``; any other exception is a bug in a destination and is charged to the rows as
a transient failure, so it cannot loop forever.

The workers survive the queue itself failing (SQLite locked past its busy timeout, a
full disk, an I/O error): the error is logged and counted, the worker tries again with
backoff, and an outcome the queue could not take is kept and recorded once it answers
(never dropped, so a batch is not sent twice for it). A worker that ends anyway is
restarted by ``supervise`` (the daemon's housekeeping). While a destination backs off,
one worker probes it (``Probing``) every ``probe_every`` seconds and ends the back-off
as soon as it answers.
"""

from __future__ import annotations

import functools
import logging
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from datetime import UTC, datetime

from bridge.config import DestinationBase, Retry
from bridge.errors import UpstreamMisconfigured, UpstreamUnavailable
from bridge.forward.queue import Batch, Queue, Row, backoff
from bridge.forward.spool import Spool
from bridge.metrics import Metrics
from bridge.model import Destination, Done, Duplicate, Outcome, Permanent, Probing, Transient, Warning

LOGGER = logging.getLogger(__name__)

UP, BACKING_OFF, SUSPENDED = "up", "backing_off", "suspended"
POLL = 1.0  # seconds between looks at the queue when nothing wakes a worker
# While another worker of the destination is sending, a worker takes a batch that is not
# full only once its first instance has waited this long (see DestinationRunner._claim).
SHARE_AFTER = 0.05
# Seconds between a worker's tries while the queue database fails: doubling, capped.
# Each try may itself wait for the queue's busy timeout.
QUEUE_RETRY_FIRST, QUEUE_RETRY_MAX = 0.5, 5.0


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
        # Outcomes (and releases) of claimed rows that the queue could not take when they
        # came: kept, oldest first, and applied by the first worker to find it answering.
        self._unsettled: deque[Callable[[], None]] = deque()
        self._settling = threading.Lock()
        self._stale = False  # the queue has not yet taken the state shown: write it (_write_state, _catch_up)
        self._can_probe = True
        self._probing = False
        self._next_probe = 0.0
        self._unreachable = False  # a probe of this back-off found the destination not answering
        self._ended = ""  # why the last worker that ended unexpectedly ended
        self._publish()
        self._write_state()

    # -- control -----------------------------------------------------------------------

    def start(self) -> None:
        self._threads = [self._spawn(n) for n in range(self.settings.workers)]

    def _spawn(self, n: int) -> threading.Thread:
        thread = threading.Thread(target=self._run, name=f"deliver-{self.name}-{n}", daemon=True)
        thread.start()
        return thread

    def supervise(self) -> int:
        """Restart the workers that ended unexpectedly (they never should: ``_run``
        survives its own errors); returns how many. The rows such a worker had claimed
        were given back for the others (``_run``). Shown in the log, in
        ``dicom_bridge_worker_restarts`` and, until the destination's state next
        changes, in its reason (``queue list``)."""
        if self._stopping.is_set():
            return 0
        restarted = 0
        for n, thread in enumerate(self._threads):
            if not thread.is_alive():
                LOGGER.error("destination %s: delivery worker %s had ended (%s); restarted", self.name,
                             thread.name, self._ended or "no reason known")
                self._threads[n] = self._spawn(n)
                self._metrics.worker_restarts.labels(self.name).inc()
                restarted += 1
        if restarted:
            with self._cond:
                if self.state == UP:
                    self.reason = (f"a delivery worker was restarted at "
                                   f"{datetime.now(UTC).isoformat(timespec='seconds')} after: {self._ended}")
                    self._publish()
            self._write_state()
        return restarted

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
        """Stop claiming; let batches in flight finish until ``deadline`` (monotonic).
        Outcomes the queue has not taken yet get one more try; rows whose outcome is still
        not recorded stay in flight, and a restart sends them again (``Queue.recover``)."""
        self.request_stop()
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        if self._unsettled and not self.busy:
            try:
                self._settle_unsettled()
            except sqlite3.Error as exc:
                LOGGER.error("destination %s: %d batch outcome(s) could not be recorded (%s); those rows are "
                             "sent again after a restart", self.name, len(self._unsettled), exc)

    @property
    def busy(self) -> bool:
        """Whether a worker is still running (after ``stop``: a batch still in flight)."""
        return any(thread.is_alive() for thread in self._threads)

    def status(self) -> tuple[str, str, float]:
        """``(state, reason, until)`` read together; ``until`` (a time) is when a back-off
        ends, else 0."""
        with self._cond:
            return self.state, self.reason, self.until

    def resume(self) -> None:
        """Back to up, now: a reload or ``queue resume`` says the cause may be gone."""
        with self._cond:
            if self.state != UP:
                LOGGER.warning("destination %s resumed (was %s: %s)", self.name, self.state, self.reason)
            self._failures = 0
            self._wake_up()
        self._write_state()

    # -- the worker --------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._work()
        except BaseException as exc:  # the worker ends: say why; supervise() starts another
            self._ended = f"{type(exc).__name__}: {exc}"
            LOGGER.critical("destination %s: delivery worker %s ended unexpectedly", self.name,
                            threading.current_thread().name, exc_info=True)

    def _work(self) -> None:
        destination: Destination | None = None
        last_work = time.monotonic()
        quiet = True  # nothing was claimed last time: linger before the next claim
        errors = 0  # errors in a row: the queue's, or a bug of this loop
        while not self._stopping.is_set():
            try:
                self._catch_up()
                with self._cond:
                    seen = self._signals
                wait = self._must_wait()
                if wait:
                    self._probe()
                elif quiet and self.settings.batch.linger:
                    self._stopping.wait(self.settings.batch.linger)
                rows = Batch() if wait else self._claim()
                if errors:
                    LOGGER.warning("destination %s: the queue answers again; delivery goes on", self.name)
                    errors = 0
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
                    destination = self._deliver(destination, rows)
                except sqlite3.Error:
                    raise  # the outcome is kept (``_settle``)
                except BaseException:
                    # A bug after the claim: the rows go back, for this worker's next turn or
                    # (if it ends) the others; a no-op for rows already recorded.
                    self._close(destination)
                    destination = None
                    self._unsettled.append(functools.partial(
                        self._queue.release, rows, time.time(), "a delivery worker failed while sending"))
                    raise
                finally:
                    with self._cond:
                        self._sending -= 1
                last_work = time.monotonic()
            except Exception as exc:
                errors += 1
                self._worker_error(exc, errors)
        if destination is not None:
            self._close(destination)

    def _worker_error(self, exc: Exception, errors: int) -> None:
        """Log and count an error of the loop itself, then wait before the next turn:
        doubling from ``QUEUE_RETRY_FIRST`` to ``QUEUE_RETRY_MAX``."""
        delay = min(QUEUE_RETRY_MAX, QUEUE_RETRY_FIRST * 2 ** (errors - 1))
        if isinstance(exc, sqlite3.Error):
            self._metrics.queue_errors.labels(f"deliver-{self.name}").inc()
            if errors & (errors - 1) == 0:  # the 1st, 2nd, 4th, 8th ... in a row
                LOGGER.error("destination %s: queue error (%s), %d in a row; %d outcome(s) wait to be recorded; "
                             "trying again in %.1fs", self.name, exc, errors, len(self._unsettled), delay)
        else:
            LOGGER.exception("destination %s: error in a delivery worker; trying again in %.1fs", self.name, delay)
        self._stopping.wait(delay)

    def _catch_up(self) -> None:
        """What the queue could not take before: the destination's state, kept outcomes."""
        self._catch_up_state()
        if self._unsettled:
            self._settle_unsettled()

    def _catch_up_state(self) -> None:
        if self._stale:
            with self._cond:
                shown = (self.state, self.reason or None, self.until or None)
            self._queue.set_destination_state(self.name, *shown)
            with self._cond:
                self._stale = shown != (self.state, self.reason or None, self.until or None)

    def _settle(self, action: Callable[[], None]) -> None:
        """Record a claimed batch's outcome (or give it back) now; if the queue fails,
        keep it for later (``_settle_unsettled``) and raise."""
        if self._unsettled:  # keep the order: older outcomes first
            self._unsettled.append(action)
            self._settle_unsettled()
            return
        try:
            action()
        except sqlite3.Error:
            self._unsettled.append(action)
            raise

    def _settle_unsettled(self) -> None:
        """Apply the kept outcomes, oldest first; one worker at a time (the others go on)."""
        if not self._settling.acquire(blocking=False):
            return
        try:
            while self._unsettled:
                try:
                    self._unsettled[0]()
                except sqlite3.Error:
                    raise  # kept: the queue still fails
                except Exception:  # a bug, not the queue: trying it again would fail again
                    self._unsettled.popleft()
                    raise
                self._unsettled.popleft()
                LOGGER.info("destination %s: an outcome kept through a queue error is recorded", self.name)
        finally:
            self._settling.release()

    def _probe(self) -> None:
        """While backing off, ask the destination (one worker, every ``probe_every``)
        whether it answers again; once a probe that found it unreachable is followed by
        one that finds it answering, its rows are due and it is up now. A destination
        that answers probes all along fails in a way probes cannot see (a full disk for
        large files, a STOW-RS that fails where OPTIONS works): it keeps its back-off,
        whose count a resumption keeps too, so deliveries are not retried every probe."""
        with self._cond:
            now = time.monotonic()
            every = self.settings.probe_every
            if self.state != BACKING_OFF or not every or not self._can_probe or self._probing \
                    or now < self._next_probe:
                return
            self._probing, self._next_probe = True, now + every
        try:
            answers = self._answers()
        finally:
            with self._cond:
                self._probing = False
        if not answers:
            self._unreachable = True
            return
        if not self._unreachable:
            return
        self._queue.due_now(self.name)  # rows given back at the back-off wait for its end
        with self._cond:
            if self.state != BACKING_OFF:
                return
            LOGGER.warning("destination %s answers again (probe): delivering now", self.name)
            self._unreachable = False
            self._wake_up()
        self._write_state()

    def _answers(self) -> bool:
        try:
            destination = self._factory()
        except Exception as exc:
            LOGGER.debug("destination %s: probe: %s", self.name, exc)
            return False
        try:
            if not isinstance(destination, Probing):
                self._can_probe = False  # plain back-off
                return False
            return destination.probe()
        except Exception as exc:
            LOGGER.debug("destination %s: probe: %s: %s", self.name, type(exc).__name__, exc)
            return False
        finally:
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

    def _deliver(self, destination: Destination | None, rows: Sequence[Row]) -> Destination | None:
        """Send one batch and record its outcome; returns the destination to keep using, or
        None to start afresh."""
        try:
            if destination is None:
                destination = self._factory()
            destination.open()
            outcomes = list(destination.send([r.instance for r in rows]))
            if len(outcomes) != len(rows):
                raise RuntimeError(f"{len(outcomes)} outcomes for {len(rows)} instances")
        except UpstreamUnavailable as exc:
            until = self._back_off(exc.reason, exc.retry_after)
            self._close(destination)
            self._settle(functools.partial(self._queue.release, rows, until, exc.reason))
            return None
        except UpstreamMisconfigured as exc:
            self._suspend(exc.reason)
            self._close(destination)
            self._settle(functools.partial(self._queue.release, rows, time.time(), exc.reason))
            return None
        except Exception as exc:
            LOGGER.exception("destination %s failed unexpectedly", self.name)
            outcomes = [Transient(f"internal error: {type(exc).__name__}: {exc}")] * len(rows)
            self._close(destination)
            self._settle(functools.partial(self._record, rows, outcomes))
            return None
        self._up()
        self._settle(functools.partial(self._record, rows, outcomes))
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

    def _close(self, destination: Destination | None) -> None:
        if destination is None:
            return
        try:
            destination.close()
        except Exception:
            LOGGER.exception("closing destination %s", self.name)

    # -- state -------------------------------------------------------------------------

    def _wake_up(self) -> None:
        """Up now, and every worker looks at the queue (under ``_cond``; the caller then
        writes the state, ``_write_state``)."""
        self.state, self.reason, self.until = UP, "", 0.0
        self._publish()
        self._signals += 1
        self._cond.notify_all()

    def _up(self) -> None:
        """A batch went through: the back-off (or a probe's resumption) is over."""
        if self.state == UP and not self._failures:
            return
        with self._cond:
            if self.state == BACKING_OFF:
                LOGGER.warning("destination %s is up again", self.name)
                self.state, self.reason, self.until = UP, "", 0.0
                self._publish()
            if self.state == UP:
                self._failures = 0
        self._write_state()

    def _back_off(self, reason: str, retry_after: float | None) -> float:
        with self._cond:
            if self.state == BACKING_OFF and self.until > time.time():
                return self.until  # another worker already backed off
        # The back-off's first probe, taken before the back-off is shown or its rows given
        # back: whether a probe sees what this delivery met. Taken later, it could not tell
        # a destination back meanwhile from one whose failure probes cannot see (_probe).
        unreachable = bool(self.settings.probe_every) and self._can_probe and not self._answers()
        with self._cond:
            if self.state == BACKING_OFF and self.until > time.time():
                return self.until  # another worker backed off meanwhile
            self._failures += 1
            self._unreachable, self._next_probe = unreachable, time.monotonic() + self.settings.probe_every
            delay = max(backoff(self._failures, self.retry), retry_after or 0.0)
            self.state, self.reason, self.until = BACKING_OFF, reason, time.time() + delay
            LOGGER.warning("destination %s unavailable (%s); next try in %.1fs", self.name, reason, delay)
            self._publish()
            until = self.until
        self._write_state()
        return until

    def _suspend(self, reason: str) -> None:
        with self._cond:
            if self.state != SUSPENDED:
                LOGGER.error("destination %s suspended: %s (resume with a reload or 'queue resume')",
                             self.name, reason)
            self.state, self.reason, self.until = SUSPENDED, reason, 0.0
            self._publish()
        self._write_state()

    def _publish(self) -> None:
        """The state changed (called under ``_cond``): metrics now; the queue's copy
        (``queue list``) by ``_write_state``, which the caller runs once it has let go of
        ``_cond``: a queue that waits for its lock must not hold intake's wake-ups."""
        self._metrics.set_destination_state(self.name, self.state)
        self._stale = True

    def _write_state(self) -> None:
        """Write the state to the queue; if the queue cannot take it now, a worker writes
        it again on its next turn (``_catch_up``)."""
        try:
            self._catch_up_state()
        except sqlite3.Error as exc:
            LOGGER.warning("destination %s: cannot record its state (%s) in the queue: %s", self.name,
                           self.state, exc)
            self._metrics.queue_errors.labels(f"deliver-{self.name}").inc()


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

    def supervise(self) -> None:
        """Restart delivery workers that ended unexpectedly (``DestinationRunner.supervise``)."""
        for runner in list(self.runners.values()):
            runner.supervise()

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
