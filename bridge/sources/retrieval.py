"""One C-MOVE's or C-GET's instances, located and fetched from the sources a ``retrieve``
rule names, in order (``retrieve: [a, b]``).

- **Locate.** The first source that answers names the instances (``Source.locate``,
  with SOP Class UIDs). A source that fails, or locates nothing, gives way to the next;
  when every source failed, ``locate`` raises the first failure (the service answers
  0xA701 with it).
- **Fetch.** A thread asks the first source to ``retrieve`` every instance located; what
  it cannot deliver (a failure, or all it had not delivered when it failed as a whole)
  is asked of the next source, and so on. Each file is checked before it is handed on:
  it must parse, and hold the SOP Instance UID it was fetched for (a file that does not
  is a failure of that source for that instance, and the next source is asked).
- **Bounded look-ahead.** Fetched files wait for the service in a queue of at most
  ``lookahead`` files, so fetching runs ahead of sending by that many instances and no
  further: what a retrieval holds on disk and in memory does not grow with the study.
- **Nothing hangs.** A source that gives nothing (no file, no failure, no sign of work)
  for its ``retrieve_timeout`` plus ``GRACE`` is taken to be stuck: the instances not yet
  delivered fail with that reason. ``stop`` (a C-CANCEL, the requester gone) makes the
  fetching thread close its source and remove every temporary file not handed over.

Iterating yields a ``Fetched`` (a file to send: the caller sends it, then calls its
``done``), a ``Retrieved`` with a failure (an instance that no source could deliver), or
``None`` every ``HEARTBEAT`` seconds while nothing comes (time to tell the requester the
retrieval is alive).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from bridge.dataset.dicomfile import read_header
from bridge.dataset.query import Query
from bridge.errors import UpstreamError
from bridge.model import InstanceRef, Retrieved, Source

LOGGER = logging.getLogger(__name__)

LOOKAHEAD = 16  # fetched files waiting to be sent, at most
HEARTBEAT = 5.0  # seconds between signs of life while nothing is fetched
GRACE = 5.0  # beyond a source's retrieve_timeout before it is taken to be stuck


@dataclass(frozen=True)
class Fetched:
    """A file ready to be sent for ``ref``, with what sending it needs to know."""

    ref: InstanceRef
    path: Path
    transfer_syntax: str
    sop_class_uid: str
    source: str
    temporary: bool

    def done(self) -> None:
        """Sent (or given up): a temporary file is removed."""
        if self.temporary:
            self.path.unlink(missing_ok=True)


class TooMany(Exception):
    """More instances match than one retrieval may take (``limit``): locating stopped there."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"more than {limit} instances match")
        self.limit = limit


class Retrieval:
    """The instances ``query`` names, from ``sources`` in order (see the module docstring).

    ``timeouts``: each source's ``retrieve_timeout`` by name. Call ``locate`` first, then
    iterate; ``stop`` always (a ``finally``), however it ends.
    """

    def __init__(self, query: Query, sources: Sequence[Source], timeouts: dict[str, float],
                 lookahead: int = LOOKAHEAD, heartbeat: float = HEARTBEAT, limit: int | None = None) -> None:
        self.query = query
        self.limit = limit  # the most instances it takes: locating more raises TooMany
        self.sources = list(sources)
        self.timeouts = timeouts
        self.heartbeat = heartbeat
        self.located: list[InstanceRef] = []
        self.located_by: str = ""  # the source whose locate was used
        self.failures: list[tuple[str, Exception]] = []  # sources that failed to locate
        self._queue: queue.Queue[object] = queue.Queue(maxsize=max(1, lookahead))
        self._stopped = threading.Event()
        self._activity = time.monotonic()
        self._current = ""  # the source being asked now
        self._thread: threading.Thread | None = None

    # -- locating --------------------------------------------------------------------------

    def locate(self) -> list[InstanceRef]:
        """The instances to retrieve, each once; raises the first source's error when every
        source failed (an empty answer from all is an empty list), ``TooMany`` as soon as
        more than ``limit`` are found (what was located is not held beyond that)."""
        for source in self.sources:
            try:
                refs: dict[str, InstanceRef] = {}
                found = source.locate(self.query)
                try:
                    for ref in found:
                        refs.setdefault(ref.sop_instance_uid, ref)
                        if self.limit is not None and len(refs) > self.limit:
                            raise TooMany(self.limit)
                finally:
                    close = getattr(found, "close", None)
                    if close is not None:
                        close()
            except UpstreamError as exc:
                LOGGER.warning("locating in source %s failed: %s", source.name, exc)
                self.failures.append((source.name, exc))
                continue
            if refs:
                self.located, self.located_by = list(refs.values()), source.name
                return self.located
        if self.failures and len(self.failures) == len(self.sources):
            raise self.failures[0][1]
        return []

    # -- fetching --------------------------------------------------------------------------

    def __iter__(self) -> Iterator[Fetched | Retrieved | None]:
        """One ``Fetched`` or failed ``Retrieved`` per instance located, as each comes;
        ``None`` every ``heartbeat`` seconds while nothing does."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._fetch, name=f"{threading.current_thread().name}-fetch",
                                            daemon=True)
            self._thread.start()
        given: set[str] = set()
        while len(given) < len(self.located):
            try:
                item = self._queue.get(timeout=self.heartbeat)
            except queue.Empty:
                stuck = self._stuck()
                if stuck:
                    LOGGER.warning("retrieval: %s; giving up on what it has not delivered", stuck)
                    self.stop()
                    yield from self._unaccounted(given, stuck)
                    return
                yield None
                continue
            if item is _END:  # every instance was handed over, or failed: nothing should be left
                yield from self._unaccounted(given, "no source delivered it")
                return
            assert isinstance(item, Fetched | Retrieved)
            given.add(item.ref.sop_instance_uid)
            yield item

    def stop(self) -> None:
        """Stop fetching; remove the temporary files not handed over. Returns at once: the
        fetching thread ends after its source's current wait, removing what it holds."""
        self._stopped.set()
        self._drain()

    def _unaccounted(self, given: set[str], reason: str) -> Iterator[Retrieved]:
        for ref in self.located:
            if ref.sop_instance_uid not in given:
                yield Retrieved(ref, failure=reason)

    def _stuck(self) -> str:
        timeout = self.timeouts.get(self._current, 0.0) + GRACE
        if self._current and time.monotonic() - self._activity > timeout:
            return f"source {self._current} gave nothing for {timeout:g}s"
        return ""

    def _drain(self) -> None:
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, Fetched):
                item.done()

    def _put(self, item: object) -> bool:
        """Hand ``item`` over, waiting for room; False once stopped (``item`` not taken)."""
        while not self._stopped.is_set():
            try:
                self._queue.put(item, timeout=0.2)
                return True
            except queue.Full:
                self._activity = time.monotonic()  # waiting for the sender is not the source being stuck
        return False

    def _fetch(self) -> None:
        """The fetching thread: each source in turn for what the previous could not deliver,
        then a failure for each instance none delivered."""
        remaining = {ref.sop_instance_uid: ref for ref in self.located}
        reasons: dict[str, list[str]] = {}
        try:
            for source in self.sources:
                if not remaining or self._stopped.is_set():
                    break
                self._from(source, remaining, reasons)
            for uid, ref in remaining.items():
                if not self._put(Retrieved(ref, failure="; ".join(reasons.get(uid, ["no source delivered it"])))):
                    break
            self._put(_END)
        except Exception:  # a bug must not leave the C-MOVE waiting: it fails what is left
            LOGGER.exception("retrieval: the fetching thread failed")
            self._put(_END)
        finally:
            if self._stopped.is_set():
                self._drain()

    def _from(self, source: Source, remaining: dict[str, InstanceRef], reasons: dict[str, list[str]]) -> None:
        self._current, self._activity = source.name, time.monotonic()
        wanted = list(remaining.values())
        items: Iterator[Retrieved | None] | None = None
        try:
            items = source.retrieve(wanted)  # a source may raise here, before giving an iterator
            for item in items:
                self._activity = time.monotonic()
                if item is None:
                    continue
                ref = remaining.get(item.ref.sop_instance_uid)
                if ref is None:  # not asked for, or delivered already
                    _discard(item)
                    continue
                if item.path is None:
                    reasons.setdefault(ref.sop_instance_uid, []).append(_named(source.name, item.failure))
                    continue
                fetched = _checked(item, ref, source.name)
                if isinstance(fetched, str):
                    reasons.setdefault(ref.sop_instance_uid, []).append(_named(source.name, fetched))
                    continue
                if not self._put(fetched):
                    fetched.done()
                    return
                del remaining[ref.sop_instance_uid]
                if self._stopped.is_set():
                    return
        except UpstreamError as exc:
            LOGGER.warning("retrieving from source %s failed: %s", source.name, exc)
            for uid in remaining:
                reasons.setdefault(uid, []).append(_named(source.name, str(exc)))
        finally:
            items_close = getattr(items, "close", None)
            if items_close is not None:
                items_close()


_END = object()


def _named(source: str, reason: str) -> str:
    """``reason`` prefixed with the source's name, unless it names the source already
    (the sources' own errors start ``source NAME:``)."""
    return reason if reason.startswith(f"source {source}:") else f"{source}: {reason}"


def _discard(item: Retrieved) -> None:
    if item.path is not None and item.temporary:
        item.path.unlink(missing_ok=True)


def _checked(item: Retrieved, ref: InstanceRef, source: str) -> Fetched | str:
    """``item`` as a ``Fetched`` when its file parses and is the instance asked for; else
    why not (the file, if temporary, removed)."""
    assert item.path is not None
    try:
        header = read_header(item.path)
        sop_instance = str(header.get("SOPInstanceUID", "") or "")
        sop_class = str(header.get("SOPClassUID", "") or "") or ref.sop_class_uid
        syntax = str(header.file_meta.get("TransferSyntaxUID", "") or "") if header.file_meta else ""
    except Exception as exc:
        _discard(item)
        return f"the file it gave cannot be read: {exc}"
    if sop_instance != ref.sop_instance_uid:
        _discard(item)
        return f"it gave SOP Instance UID {sop_instance or '(none)'} instead"
    if not syntax:
        _discard(item)
        return "the file it gave has no transfer syntax"
    return Fetched(ref, item.path, syntax, sop_class, source, item.temporary)

