"""Watched folders: files dropped into a folder enter the rules and the queue as a C-STORE.

Each ``watch`` entry has a watchdog observer (inotify, or polling for network shares).
Events only note a file as a candidate; a periodic rescan (the first one at start) notes
whatever events missed, such as files that arrived while the daemon was down. A file
renamed into the folder (mv, rsync's temporary name, most transfer tools) is complete
when its event comes, and is taken at once, without waiting for ``settle``. One
scheduler thread looks at the candidates: a file is taken once it has been unchanged
(size and modification time) for ``settle``, and, where inotify says a file was written,
once it has been closed after writing. Taken files go through a bounded work queue to a
fixed pool of worker threads (never a thread per file). At most ``MAX_TRACKED``
candidates are held per folder; the rest wait for a later rescan.

A worker copies the file into the spool's ``incoming/`` folder and hands the copy to
``bridge.forward.ingest`` (the C-STORE path: fsync, spool, queue rows committed). Only then is
the original deleted or moved, so a crash at any moment loses nothing: a file still
there after a restart is taken again, and the queue sees the same content as a harmless
resend. A file that changed while it was copied is left for another look.

What cannot be taken goes to the ``failed`` folder (relative path kept, a name made
unique) with ``<name>.reason`` beside it. A folder holding a DICOMDIR is taken through
it: its referenced files, found by File ID case-insensitively, never by a path outside
that folder. Zip archives (``zip.enabled``) are read member by member into the spool;
member names are only ever shown, never used as paths. File names are logged at DEBUG
only (they can hold patient names).
"""

from __future__ import annotations

import errno
import fnmatch
import logging
import os
import queue
import shutil
import stat
import threading
import time
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import IO

import pydicom
from watchdog.events import (
    DirCreatedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers.api import BaseObserver
from watchdog.observers.inotify import InotifyObserver
from watchdog.observers.polling import PollingObserver

from bridge.config import Config, Watch
from bridge.errors import InboundError, MissingUid, NotDicom, OutOfResources, Truncated
from bridge.forward.ingest import Ingest, IngestSettings
from bridge.forward.spool import fsync_dir, fsync_file
from bridge.metrics import Metrics
from bridge.routing.rules import Context, RuleSet

LOGGER = logging.getLogger(__name__)

WORKERS = 4  # threads that take files, shared by every watched folder
WORK_QUEUE = 16  # files handed to the workers and not yet started
MAX_TRACKED = 10_000  # candidates held per folder; more wait for a rescan
TICK = 0.2  # seconds between the scheduler's looks at the candidates, at most
MIN_TICK = 0.02  # ... and at least
OPEN_GRACE = 60.0  # a file written and never closed (inotify) is taken after this long unchanged
RETRY_AFTER = 30.0  # a file that could not be persisted (spool full, queue error) is tried again
STOP_TIMEOUT = 10.0
IGNORED = ("*.part", "*.tmp", ".*")  # temporary names, never taken
DICOMDIR_NAMES = ("DICOMDIR", "dicomdir")

# What a worker did with a file: the first four are metric results.
QUEUED, DUPLICATE, FAILED, RETRIED = "queued", "duplicate", "failed", "retried"
WAIT, GONE, DONE = "wait", "gone", "done"

Signature = tuple[int, int, int]


@dataclass
class _Candidate:
    signature: Signature | None = None
    stable_since: float = 0.0
    writing: bool = False  # inotify saw a write and no close since
    renamed: bool = False  # renamed into the folder, and no write seen since: complete, no settling
    not_before: float = 0.0
    busy: bool = False


class _Events(FileSystemEventHandler):
    """Runs in the observer's thread: only notes paths, never does work."""

    def __init__(self, folder: Folder) -> None:
        self.folder = folder

    def on_any_event(self, event: FileSystemEvent) -> None:
        folder = self.folder
        if isinstance(event, DirCreatedEvent | DirMovedEvent):
            folder.rescan_soon()  # a folder moved in brings files no event names
        elif isinstance(event, FileMovedEvent):
            # A rename is complete the moment it happens: how mv, rsync, scp and most
            # transfer tools finish a file. A move from outside the folder has no source.
            if event.src_path:
                folder.forget(_path(event.src_path))
            if event.dest_path:
                folder.note(_path(event.dest_path), writing=False, renamed=True)
        elif isinstance(event, FileDeletedEvent):
            folder.forget(_path(event.src_path))
        elif isinstance(event, FileCreatedEvent | FileModifiedEvent):
            folder.note(_path(event.src_path), writing=folder.settings.observer == "inotify")
        elif isinstance(event, FileClosedEvent):
            folder.note(_path(event.src_path), writing=False)


def _path(value: str | bytes) -> Path:
    return Path(os.fsdecode(value))


class Folder:
    """One ``watch`` entry: its observer, its candidates, and what is done with each file."""

    def __init__(self, settings: Watch, watcher: Watcher) -> None:
        self.settings = settings
        self.root = settings.path
        self.label = settings.label
        self.watcher = watcher
        self.candidates: dict[Path, _Candidate] = {}
        self.lock = threading.Lock()
        self.observer: BaseObserver | None = None
        self.next_rescan = 0.0
        self.stopped = False
        self.counts = {QUEUED: 0, DUPLICATE: 0, FAILED: 0}
        self._emptied: dict[Path, float] = {}  # subfolders a file was taken from -> when to look
        self._missing_logged = False

    # -- life cycle --------------------------------------------------------------------

    def start(self) -> None:
        self._start_observer()
        LOGGER.info("watching %s (%s, %s)", self.label, self.settings.observer,
                    "recursive" if self.settings.recursive else "this folder only")

    def _start_observer(self) -> None:
        if not self.root.is_dir():
            if not self._missing_logged:
                LOGGER.error("watch %s: %s is not a folder; looking again every %.0fs", self.label, self.root,
                             self.settings.rescan)
                self._missing_logged = True
            return
        s = self.settings
        # Full events: a file moved in from outside the watch (inotify's IN_MOVED_TO with
        # no IN_MOVED_FROM) is a move, not a creation still being written.
        observer = (PollingObserver(timeout=s.poll_interval) if s.observer == "polling"
                    else InotifyObserver(generate_full_events=True))
        try:
            observer.schedule(_Events(self), str(self.root), recursive=s.recursive)
            observer.start()
        except OSError as exc:  # e.g. the inotify watch limit: rescans still find every file
            LOGGER.error("watch %s: cannot start the %s observer (%s); relying on rescans every %.0fs",
                         self.label, s.observer, exc, s.rescan)
            return
        self.observer = observer
        if self._missing_logged:
            LOGGER.info("watch %s: %s is there now", self.label, self.root)
            self._missing_logged = False

    def stop(self, deadline: float) -> None:
        self.stopped = True
        if self.observer is not None:
            self.observer.stop()
            self.observer.join(max(0.0, deadline - time.monotonic()))
            self.observer = None

    # -- candidates --------------------------------------------------------------------

    def wanted(self, path: Path) -> bool:
        """Whether ``path`` is a file name this folder takes (not whether it is ready)."""
        try:
            rel = path.relative_to(self.root)
        except ValueError:
            return False
        parts = rel.parts
        if not parts or (len(parts) > 1 and not self.settings.recursive):
            return False
        if any(p.startswith(".") for p in parts) or any(fnmatch.fnmatch(path.name, g) for g in IGNORED):
            return False
        if path.name in DICOMDIR_NAMES:
            return True
        text = rel.as_posix()
        s = self.settings
        return (any(fnmatch.fnmatch(path.name, g) or fnmatch.fnmatch(text, g) for g in s.include)
                and not any(fnmatch.fnmatch(path.name, g) or fnmatch.fnmatch(text, g) for g in s.exclude))

    def note(self, path: Path, writing: bool = False, renamed: bool = False) -> None:
        """``path`` may be ready: ``writing`` when inotify saw it written and not closed,
        ``renamed`` when it was renamed into the folder (complete: taken at the next look,
        without waiting for ``settle``; a DICOMDIR's folder still settles)."""
        if self.stopped or not self.wanted(path):
            return
        with self.lock:
            candidate = self.candidates.get(path)
            if candidate is None:
                if len(self.candidates) >= MAX_TRACKED:
                    self.next_rescan = min(self.next_rescan, time.monotonic() + max(self.settings.settle, 5.0))
                    return
                self.candidates[path] = _Candidate(writing=writing, renamed=renamed)
            else:
                candidate.writing, candidate.renamed = writing, renamed
                candidate.not_before = 0.0

    def forget(self, path: Path) -> None:
        with self.lock:
            candidate = self.candidates.get(path)
            if candidate is not None and not candidate.busy:
                del self.candidates[path]

    def rescan_soon(self) -> None:
        self.next_rescan = min(self.next_rescan, time.monotonic() + self.settings.settle)

    def rescan(self) -> None:
        """Note every file of the folder (a DICOMDIR for its whole folder); remove
        subfolders that have been empty for ``settle``."""
        if self.observer is None:
            self._start_observer()
        if not self.root.is_dir():
            return
        now = time.time()
        for path in self._walk(now):
            with self.lock:
                full = len(self.candidates) >= MAX_TRACKED
            if full:
                break
            self.note(path)

    def _walk(self, now: float) -> Iterator[Path]:
        stack = [self.root]
        while stack:
            folder = stack.pop()
            try:
                dicomdir = next((folder / n for n in DICOMDIR_NAMES if (folder / n).exists()), None)
                if dicomdir is not None:  # taken through its DICOMDIR: nothing below is listed
                    yield dicomdir
                    continue
                empty = True
                with os.scandir(folder) as it:
                    for entry in it:
                        empty = False
                        if entry.name.startswith("."):
                            continue
                        if entry.is_dir(follow_symlinks=False):
                            if self.settings.recursive:
                                stack.append(Path(entry.path))
                        else:
                            yield Path(entry.path)
                if empty and folder != self.root and self.settings.recursive \
                        and now - folder.stat().st_mtime >= self.settings.settle:
                    folder.rmdir()
            except OSError:
                continue  # gone, or not ours to read: the next rescan looks again

    def due(self, now: float) -> list[Path]:
        with self.lock:
            return [p for p, c in self.candidates.items() if not c.busy and c.not_before <= now]

    def ready(self, path: Path, now: float) -> bool | None:
        """Whether a candidate can be taken now; None when it is gone (forgotten)."""
        signature = self._signature(path)
        under_dicomdir = path.name not in DICOMDIR_NAMES and self._under_dicomdir(path)
        with self.lock:
            candidate = self.candidates.get(path)
            if candidate is None:
                return False
            if signature is None or under_dicomdir:
                del self.candidates[path]
                return None
            settle = self.settings.settle
            if candidate.renamed and path.name not in DICOMDIR_NAMES:
                # A rename is how mv, rsync, scp and most transfer tools finish a file: what
                # arrived by one is complete (Ingest's copy still checks it did not change).
                candidate.signature, candidate.busy = signature, True
                return True
            if signature != candidate.signature:
                candidate.signature, candidate.stable_since = signature, now
                candidate.not_before = now + max(settle, TICK)
                return False
            held = now - candidate.stable_since
            wait = max(settle - held, (OPEN_GRACE - held) if candidate.writing else 0.0)
            if wait > 0:
                candidate.not_before = now + min(wait, max(settle, TICK))
                return False
            candidate.busy = True
            return True

    def _signature(self, path: Path) -> Signature | None:
        """Size and modification time; for a DICOMDIR, of its whole folder (a CD copy is
        taken once nothing in it has changed for ``settle``)."""
        try:
            st = os.lstat(path)
            if path.name not in DICOMDIR_NAMES:
                return (st.st_size, st.st_mtime_ns, 1)
            count, size, mtime = 0, 0, 0
            for folder, _, names in os.walk(path.parent):
                for name in names:
                    try:
                        sub = os.lstat(os.path.join(folder, name))
                    except OSError:
                        continue
                    count, size, mtime = count + 1, size + sub.st_size, max(mtime, sub.st_mtime_ns)
            return (size, mtime, count)
        except OSError:
            return None

    def _under_dicomdir(self, path: Path) -> bool:
        folder = path.parent
        while True:
            if any((folder / n).exists() for n in DICOMDIR_NAMES):
                return True
            if folder == self.root or folder == folder.parent:
                return False
            folder = folder.parent

    def finished(self, path: Path, outcome: str) -> None:
        now = time.monotonic()
        with self.lock:
            candidate = self.candidates.get(path)
            if candidate is None:
                return
            if outcome in (DONE, GONE):
                del self.candidates[path]
                return
            candidate.busy = False
            candidate.not_before = now + (RETRY_AFTER if outcome == RETRIED else max(self.settings.settle, 1.0))

    def backlog(self) -> int:
        with self.lock:
            return len(self.candidates)

    def _taken_from(self, folder: Path) -> None:
        if self.settings.recursive and folder != self.root and len(self._emptied) < MAX_TRACKED:
            with self.lock:
                self._emptied[folder] = time.monotonic() + self.settings.settle

    def tidy(self, now: float) -> None:
        """Remove subfolders left empty by taken files, once unchanged for ``settle`` (so
        that a folder just made for a file about to be written is left alone); rmdir
        never removes a folder that is not empty."""
        with self.lock:
            due = [p for p, at in self._emptied.items() if at <= now]
            for path in due:
                del self._emptied[path]
        for path in due:
            try:
                if time.time() - path.stat().st_mtime < self.settings.settle:
                    self._taken_from(path)
                    continue
                path.rmdir()
            except OSError:
                continue  # not empty, or gone
            self._taken_from(path.parent)

    # -- taking files ------------------------------------------------------------------

    def take(self, path: Path) -> str:
        if path.name in DICOMDIR_NAMES:
            return self._take_dicomdir(path)
        if self.settings.zip.enabled and path.suffix.lower() == ".zip":
            return self._take_zip(path)
        return self._take_file(path)

    def _context(self) -> Context:
        s, config = self.settings, self.watcher.config
        return Context(calling_ae=s.calling_ae, called_ae=s.called_ae or config.ae_title,
                       peer=s.peer or f"watch:{self.root}")

    def _result(self, result: str) -> None:
        self.watcher.metrics.watch_files.labels(self.label, result).inc()
        if result in self.counts:
            self.counts[result] += 1

    def _ingest(self, source: IO[bytes], limit: int | None = None) -> tuple[str, InboundError | None]:
        """Copy ``source`` into the spool's incoming folder and ingest it: (result, what
        refused it). ``limit``: the most bytes to copy (a zip member), else ``_TooLarge``."""
        watcher = self.watcher
        temp = watcher.ingest.spool.new_temp()
        path = Path(temp.name)
        try:
            written = 0
            try:
                while chunk := source.read(1 << 20):
                    written += len(chunk)
                    if limit is not None and written > limit:
                        raise _TooLarge
                    temp.write(chunk)
            finally:
                temp.close()
            stored = watcher.ingest.store(path, self._context(), IngestSettings.of(watcher.config), watcher.rules,
                                          "watched file", refusal_level=logging.DEBUG)
        except OutOfResources as exc:
            return RETRIED, exc
        except InboundError as exc:
            return FAILED, exc
        finally:
            path.unlink(missing_ok=True)
        return (QUEUED if stored.rows else DUPLICATE), None

    def _take_file(self, path: Path) -> str:
        try:
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode) or not stat.S_ISREG(st.st_mode):
                return self._fail(path, "not a regular file (symbolic links are not followed)")
            with open(path, "rb") as f:
                result, refused = self._ingest(f)
                after = os.fstat(f.fileno())
        except FileNotFoundError:
            return GONE
        except OSError as exc:
            LOGGER.error("watch %s: cannot read a file: %s", self.label, exc.strerror)
            self._result(RETRIED)
            return RETRIED
        if (after.st_size, after.st_mtime_ns) != (st.st_size, st.st_mtime_ns):
            return WAIT  # written to while it was copied: look again once it settles
        if result == FAILED:
            assert refused is not None
            reason = _reason(refused)
            age = time.time() - st.st_mtime
            if age < self.settings.incomplete_timeout and _looks_incomplete(path, refused):
                LOGGER.debug("watch %s: %s looks incomplete (%s); waiting", self.label, path, reason)
                return WAIT
            return self._fail(path, self._zip_reason(path) or reason)
        self._result(result)
        if result == RETRIED:
            return RETRIED
        LOGGER.debug("watch %s: %s %s", self.label, result, path)
        return self._after(path, (st.st_size, st.st_mtime_ns))

    def _zip_reason(self, path: Path) -> str | None:
        """For a zip archive taken as a file, why it was not taken apart."""
        try:
            with open(path, "rb") as f:
                if f.read(4) != b"PK\x03\x04":
                    return None
        except OSError:
            return None
        if not self.settings.zip.enabled:
            return ("a zip archive, and this folder does not take zip archives apart (zip.enabled is off; "
                    "turn it on to take its members)")
        return "a zip archive not named *.zip: only *.zip files are taken apart (rename it)"

    def _after(self, path: Path, signature: tuple[int, int] | None = None) -> str:
        """Delete or move a file whose content is durable in the spool and queue."""
        try:
            if signature is not None:
                st = os.lstat(path)
                if (st.st_size, st.st_mtime_ns) != signature:
                    return WAIT  # rewritten since it was copied: the new content is taken too
            if self.settings.after == "delete":
                path.unlink()
            else:
                assert self.settings.move_to is not None
                _relocate(path, _unique(self.settings.move_to / path.relative_to(self.root)))
        except FileNotFoundError:
            return GONE
        except OSError as exc:
            LOGGER.error("watch %s: cannot %s a taken file: %s", self.label, self.settings.after, exc.strerror)
            return RETRIED
        self._taken_from(path.parent)
        return DONE

    def _fail(self, path: Path, reason: str, count: bool = True) -> str:
        """Move ``path`` to the failed folder with ``<name>.reason`` beside it."""
        rel = path.relative_to(self.root)
        try:
            target = _unique(self.settings.failed / rel)
            _relocate(path, target)
            text = (f"file: {rel.as_posix()}\nwatch: {self.label}\n"
                    f"when: {datetime.now(UTC).isoformat(timespec='seconds')}\nreason: {reason}\n")
            target.with_name(target.name + ".reason").write_text(text, encoding="utf-8")
        except FileNotFoundError:
            return GONE
        except OSError as exc:
            LOGGER.error("watch %s: cannot move a failed file to %s: %s", self.label, self.settings.failed,
                         exc.strerror)
            return RETRIED
        self._taken_from(path.parent)
        if count:
            self._result(FAILED)
        LOGGER.warning("watch %s: a file failed: %s (moved to %s, with a .reason file)", self.label, reason,
                       self.settings.failed)
        LOGGER.debug("watch %s: failed %s -> %s", self.label, path, target)
        return DONE

    def _take_dicomdir(self, path: Path) -> str:
        """Take each file the DICOMDIR references, then the DICOMDIR itself; files it does not
        reference are taken as ordinary files by the next rescan."""
        folder = path.parent
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            records = list(ds.DirectoryRecordSequence)
        except FileNotFoundError:
            return GONE
        except Exception as exc:
            if time.time() - _mtime(path) < self.settings.incomplete_timeout and _looks_incomplete(path, exc):
                return WAIT
            self.rescan_soon()
            return self._fail(path, f"cannot read DICOMDIR: {type(exc).__name__}", count=False)
        references: list[list[str]] = []
        for record in records:
            file_id = record.get("ReferencedFileID")  # CS, one value per path component
            if not file_id:
                continue
            parts = [file_id] if isinstance(file_id, str) else [str(v) for v in file_id]
            if parts not in references:
                references.append(parts)
        listings: dict[Path, dict[str, str]] = {}
        missing = 0
        for parts in references:
            if self.stopped:
                return RETRIED
            target = _resolve_file_id(folder, parts, listings)
            if target is None:
                missing += 1
                continue
            outcome = self._take_file(target)
            if outcome in (RETRIED, WAIT):
                return outcome
        if missing:
            LOGGER.info("watch %s: %d file(s) its DICOMDIR references are not there (taken already, or absent)",
                        self.label, missing)
        self.rescan_soon()
        return self._after(path)

    def _take_zip(self, path: Path) -> str:
        """Every member into the spool, then the zip deleted or moved; a zip whose members
        cannot all be taken goes to the failed folder whole, its reason naming them."""
        zip_settings = self.settings.zip
        try:
            size = path.stat().st_size
            archive = zipfile.ZipFile(path)
        except FileNotFoundError:
            return GONE
        except (zipfile.BadZipFile, OSError) as exc:
            reason = f"not a readable zip archive: {exc}"
            if time.time() - _mtime(path) < self.settings.incomplete_timeout:
                return WAIT  # the central directory is written last
            return self._fail(path, reason)
        failures: list[str] = []
        taken = 0
        with archive:
            members = [m for m in archive.infolist() if not m.is_dir()]
            declared = sum(m.file_size for m in members)
            limit = min(zip_settings.max_expanded, int(zip_settings.max_ratio * max(size, 1)))
            if declared > limit:
                return self._fail(path, f"expands to {declared} bytes, more than the limit of {limit} "
                                        "(zip.max_expanded, zip.max_ratio)")
            expanded = 0
            for member in members:
                if self.stopped:
                    return RETRIED
                name = PurePosixPath(member.filename.replace("\\", "/")).name
                shown = repr(member.filename)[:120]
                if name in DICOMDIR_NAMES or name.startswith(".") or not name:
                    continue
                if member.flag_bits & 0x1:
                    failures.append(f"{shown}: encrypted (cannot be read without its password)")
                    self._result(FAILED)
                    continue
                try:
                    with archive.open(member) as source:
                        result, refused = self._ingest(source, min(member.file_size, limit - expanded))
                    reason = _reason(refused) if refused is not None else ""
                except _TooLarge:
                    return self._fail(path, f"member {shown} expands beyond its declared size or the limit "
                                            f"of {limit} bytes")
                except (zipfile.BadZipFile, zlib.error, NotImplementedError, EOFError, RuntimeError,
                        ValueError) as exc:
                    result, reason = FAILED, f"cannot extract: {type(exc).__name__}: {exc}"[:200]
                expanded += member.file_size
                if result == RETRIED:
                    self._result(RETRIED)
                    return RETRIED
                self._result(result)
                if result == FAILED:
                    failures.append(f"{shown}: {reason}")
                else:
                    taken += 1
        if failures:
            return self._fail(path, f"{len(failures)} of {taken + len(failures)} member(s) failed (the others "
                                    "are queued):\n  " + "\n  ".join(failures), count=False)
        LOGGER.debug("watch %s: %d member(s) of %s queued", self.label, taken, path)
        return self._after(path)


class _TooLarge(Exception):
    """A zip member expands beyond what it declares or what the limits allow."""


class Watcher:
    """Every watched folder, the scheduler thread and the worker pool."""

    def __init__(self, config: Config, rules: RuleSet, ingest: Ingest, metrics: Metrics) -> None:
        self.config = config
        self.rules = rules
        self.ingest = ingest
        self.metrics = metrics
        self.folders: dict[str, Folder] = {}
        self._work: queue.Queue[tuple[Folder, Path]] = queue.Queue(WORK_QUEUE)
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        # watchdog logs every inotify event at DEBUG, file names included: far more than
        # our own DEBUG lines, and names can hold patient data. Set once, here.
        logging.getLogger("watchdog").setLevel(logging.INFO)
        self._apply(self.config.watch)
        self._threads = [threading.Thread(target=self._schedule, name="watch", daemon=True)]
        self._threads += [threading.Thread(target=self._take, name=f"watch-{n}", daemon=True)
                          for n in range(WORKERS)]
        for thread in self._threads:
            thread.start()

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Stop observing and taking files; a file being taken finishes (bounded)."""
        deadline = time.monotonic() + timeout
        self._stop.set()
        self._wake.set()
        with self._lock:
            folders = list(self.folders.values())
        for folder in folders:
            folder.stop(deadline)
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        busy = [t.name for t in self._threads if t.is_alive()]
        if busy:
            LOGGER.warning("watch: %d worker(s) still taking a file at shutdown; it is taken again at start",
                           len(busy))

    def reload(self, config: Config, rules: RuleSet) -> None:
        """New rules for files taken from now on; folders added, removed or changed as the
        configuration now says (an unchanged folder keeps its observer)."""
        self.config, self.rules = config, rules
        self._apply(config.watch)

    def _apply(self, watches: list[Watch]) -> None:
        wanted = {w.label: w for w in watches}
        deadline = time.monotonic() + STOP_TIMEOUT
        with self._lock:
            for label, folder in list(self.folders.items()):
                if wanted.get(label) != folder.settings:
                    folder.stop(deadline)
                    del self.folders[label]
                    self.metrics.watch_backlog.labels(label).set(0)
                    LOGGER.info("watch %s: stopped (%s)", label, "changed" if label in wanted else "removed")
            for label, settings in wanted.items():
                if label not in self.folders:
                    folder = Folder(settings, self)
                    folder.start()
                    self.folders[label] = folder

    # -- threads -----------------------------------------------------------------------

    def _schedule(self) -> None:
        while not self._stop.is_set():
            # Every TICK, or sooner when the workers have drained half the work queue
            # (a folder with thousands of ready files is fed as fast as they are taken).
            self._wake.wait(TICK)
            self._wake.clear()
            time.sleep(MIN_TICK)
            with self._lock:
                folders = list(self.folders.values())
            for folder in folders:
                try:
                    self._look(folder)
                except Exception:  # a bug: keep watching the other folders
                    LOGGER.exception("watch %s: scheduler error", folder.label)

    def _look(self, folder: Folder) -> None:
        now = time.monotonic()
        if now >= folder.next_rescan:
            folder.next_rescan = now + folder.settings.rescan
            folder.rescan()
        folder.tidy(now)
        for path in folder.due(now):
            if self._stop.is_set() or self._work.full():
                break
            if folder.ready(path, time.monotonic()):
                self._work.put((folder, path))
        backlog = folder.backlog()
        self.metrics.watch_backlog.labels(folder.label).set(backlog)
        if backlog == 0 and any(folder.counts.values()):
            c = folder.counts
            LOGGER.info("watch %s: took %d file(s): %d queued, %d duplicate, %d failed", folder.label,
                        sum(c.values()), c[QUEUED], c[DUPLICATE], c[FAILED])
            folder.counts = dict.fromkeys(c, 0)

    def _take(self) -> None:
        while not self._stop.is_set():
            try:
                folder, path = self._work.get(timeout=0.5)
            except queue.Empty:
                continue
            outcome = RETRIED
            try:
                if folder.stopped:
                    continue
                outcome = folder.take(path)
            except Exception:  # a bug: the file stays and is tried again later
                LOGGER.exception("watch %s: error while taking a file", folder.label)
            finally:
                folder.finished(path, outcome)
                if self._work.qsize() <= WORK_QUEUE // 2:
                    self._wake.set()


# -- helpers ---------------------------------------------------------------------------


def _reason(refused: InboundError) -> str:
    """What a failed file's ``.reason`` says of what refused it."""
    if isinstance(refused, NotDicom):
        return "not a DICOM file: no Part-10 'DICM' prefix and File Meta Information"
    return refused.reason


def _looks_incomplete(path: Path, failure: Exception) -> bool:
    """Whether a file that failed with ``failure`` may still be being written: cut short
    (empty or all zeros so far, a short Pixel Data, pydicom met its end), or a Part-10 file
    whose data set ends without the required UIDs."""
    if isinstance(failure, Truncated | EOFError):
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(132)
            if len(head) < 132:
                return not head.strip(b"\0")
            if head[128:] != b"DICM":
                return False
            size = os.fstat(f.fileno()).st_size
            f.seek(0)
            try:
                pydicom.dcmread(f, stop_before_pixels=True, defer_size=16384)
            except Exception:
                return True  # the header itself is cut
            return f.tell() >= size and isinstance(failure, MissingUid)
    except OSError:
        return False


def _resolve_file_id(folder: Path, parts: list[str], listings: dict[Path, dict[str, str]]) -> Path | None:
    """The file a DICOMDIR's Referenced File ID names, below ``folder``, matching each
    component case-insensitively (CD media are uppercase 8.3); None when it is not there
    or a component could leave the folder."""
    current = folder
    for part in parts:
        part = part.strip()
        if not part or part in (".", "..") or any(c in part for c in "/\\\0"):
            return None
        if current not in listings:
            try:
                listings[current] = {name.casefold(): name for name in os.listdir(current)}
            except OSError:
                return None
        name = listings[current].get(part.casefold())
        if name is None:
            return None
        current = current / name
    return current if os.path.isfile(current) and not os.path.islink(current) else None


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _unique(target: Path) -> Path:
    """``target``, or ``name~N.ext`` when it (or its .reason) is taken already."""
    candidate, n = target, 0
    while candidate.exists() or candidate.with_name(candidate.name + ".reason").exists():
        n += 1
        candidate = target.with_name(f"{target.stem}~{n}{target.suffix}")
    return candidate


def _relocate(source: Path, target: Path) -> None:
    """Move a file, durably; across file systems by copy, fsync and rename, then unlink."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.rename(source, target)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        temp = target.with_name(f".{target.name}.part")
        shutil.copy2(source, temp)
        fsync_file(temp)
        os.rename(temp, target)
        fsync_dir(target.parent)
        source.unlink()
        return
    fsync_dir(target.parent)

