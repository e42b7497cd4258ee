"""``dicom-bridge dicomweb push``: every DICOM file of a folder tree stored with the
daemon's own STOW-RS (``bridge.destinations.dicomweb.DicomwebDestination``): batches of
``--batch`` instances (and at most the target's ``batch.max_bytes``), each body streamed
from the files with a known length, per-instance outcomes read from the STOW-RS answer,
a batch a 4xx refuses split in halves. The tree is walked as it is sent: only one
batch per worker is held, as file names and UIDs.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bridge.cli.dicomweb_peer import Clients, Usage
from bridge.config import DicomwebDestination as DicomwebConfig
from bridge.dataset import dicomfile
from bridge.destinations.dicomweb import DicomwebDestination
from bridge.errors import InboundError, UpstreamError, UpstreamMisconfigured
from bridge.model import Done, Duplicate, Outcome, SpooledInstance, Warning


@dataclass
class Tally:
    stored: int = 0
    present: int = 0
    failed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, instance: SpooledInstance, outcome: Outcome) -> None:
        with self.lock:
            if isinstance(outcome, Done | Warning):
                self.stored += 1
            elif isinstance(outcome, Duplicate):
                self.present += 1
            else:
                self.failed.append(f"{instance.spool_path}: {outcome.reason}")


def files(root: Path, include: re.Pattern[str] | None, exclude: re.Pattern[str] | None) -> Iterator[Path]:
    """The files under ``root`` (in name order) whose path relative to it matches."""
    for folder, dirs, names in os.walk(root):
        dirs.sort()
        for name in sorted(names):
            path = Path(folder, name)
            relative = path.relative_to(root).as_posix()
            if include is not None and not include.search(relative):
                continue
            if exclude is not None and exclude.search(relative):
                continue
            yield path


def instance(path: Path, now: datetime) -> SpooledInstance:
    """``path`` as the destination sends it; ``InboundError`` when it is not DICOM."""
    ds = dicomfile.read_header(path)
    uid = dicomfile.text(ds, "SOPInstanceUID")
    if not uid:
        raise InboundError("no SOP Instance UID")
    return SpooledInstance(
        spool_path=path, size=path.stat().st_size, sha256="", sop_class_uid=dicomfile.text(ds, "SOPClassUID"),
        sop_instance_uid=uid, study_uid=dicomfile.text(ds, "StudyInstanceUID"),
        series_uid=dicomfile.text(ds, "SeriesInstanceUID"),
        transfer_syntax=str(ds.file_meta.get("TransferSyntaxUID", "") or ""),
        calling_ae="", called_ae="", peer="push", received_at=now)


def push(args: argparse.Namespace, settings: DicomwebConfig, clients: Clients) -> int:
    if not args.dir.is_dir():
        raise Usage(f"{args.dir} is not a folder")
    if args.parallel < 1 or (args.batch is not None and args.batch < 1):
        raise Usage("--parallel and --batch must be 1 or more")
    started = time.monotonic()
    max_instances = args.batch or settings.batch.max_instances
    tally = Tally()
    stop = threading.Event()
    local = threading.local()
    destinations: list[DicomwebDestination] = []
    temp = Path(tempfile.mkdtemp(prefix="dicom-bridge-push-"))
    bar = _progress()

    def send(batch: list[SpooledInstance]) -> None:
        destination: DicomwebDestination | None = getattr(local, "destination", None)
        if destination is None:
            destination = DicomwebDestination("push", settings, temp)
            destination.client = clients.get()  # the retrying client of this thread
            local.destination = destination
            destinations.append(destination)
        if stop.is_set():
            outcomes: list[Outcome] = []
            reason = "not sent: the server refused an earlier batch"
        else:
            try:
                outcomes = destination.send(batch)
            except UpstreamMisconfigured as exc:
                stop.set()
                outcomes, reason = [], exc.reason
            except UpstreamError as exc:
                outcomes, reason = [], exc.reason
        for one, outcome in zip(batch, outcomes, strict=False):
            tally.add(one, outcome)
        with tally.lock:
            tally.failed += [f"{one.spool_path}: {reason}" for one in batch[len(outcomes):]]
        if bar is not None:
            bar.update(len(batch))

    now = datetime.now(UTC)
    try:
        with ThreadPoolExecutor(max_workers=args.parallel, thread_name_prefix="push") as pool:
            pending: set[Future[None]] = set()
            batch: list[SpooledInstance] = []
            size = 0
            for path in files(args.dir, args.include, args.exclude):
                try:
                    one = instance(path, now)
                except (InboundError, OSError) as exc:
                    reason = exc.reason if isinstance(exc, InboundError) else (exc.strerror or str(exc))
                    tally.skipped.append(f"{path}: not DICOM, skipped: {reason}")
                    continue
                if batch and (len(batch) >= max_instances or size + one.size > settings.batch.max_bytes):
                    pending.add(pool.submit(send, batch))
                    batch, size = [], 0
                    if len(pending) >= args.parallel * 2:  # bounded: the walk waits for the sending
                        finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                        for future in finished:
                            future.result()
                batch.append(one)
                size += one.size
                if bar is not None:
                    bar.total = (bar.total or 0) + 1
                    bar.refresh()
            if batch:
                pending.add(pool.submit(send, batch))
            for future in pending:
                future.result()
    finally:
        if bar is not None:
            bar.close()
        for destination in destinations:
            destination.close()
        shutil.rmtree(temp, ignore_errors=True)
    for line in tally.skipped + tally.failed:
        print(line, file=sys.stderr)
    print(f"{tally.stored} stored, {tally.present} already present, {len(tally.failed)} failed, "
          f"{len(tally.skipped)} not DICOM (skipped) in {time.monotonic() - started:.1f} s")
    return 1 if tally.failed else 0


def _progress() -> Any:
    if not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=0, unit="instance", file=sys.stderr)
