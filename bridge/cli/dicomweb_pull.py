"""``dicom-bridge dicomweb pull``: a study, or series of it, into ``DIR/<study>/<series>/``.

Each series' instances are listed first (QIDO-RS, with InstanceNumber), which fixes the
order of the files: ``file000000.dcm`` upwards by InstanceNumber (then SOP Instance UID).
A series is fetched with one WADO-RS request, each part streamed into a temporary file
in the series folder (``bridge.sources.wado``: nothing larger than one read is held)
and renamed to its number once complete. With ``--resume`` the SOP Instance UIDs of the
files already there are read from their headers, and only the others are fetched, one
WADO-RS request each. Series are fetched ``--parallel`` at a time.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bridge.cli.dicomweb_peer import Clients, Usage
from bridge.cli.dicomweb_qido import INSTANCE_NUMBER, SOP_UID, number, search, series_of, value
from bridge.config import HttpPeer
from bridge.dataset import dicomfile
from bridge.errors import InboundError, UpstreamError
from bridge.sources import wado
from bridge.web.multipart import MultipartError

TEMP_PREFIX = ".wado-"


@dataclass
class Series:
    uid: str
    folder: Path
    order: dict[str, int] = field(default_factory=dict)  # SOP Instance UID -> file number
    missing: list[str] = field(default_factory=list)  # to fetch
    present: int = 0
    retrieved: int = 0
    failures: list[str] = field(default_factory=list)


def file_name(number: int) -> str:
    return f"file{number:06d}.dcm"


def pull(args: argparse.Namespace, settings: HttpPeer, clients: Clients) -> int:
    if args.parallel < 1:
        raise Usage("--parallel must be 1 or more")
    started = time.monotonic()
    client = clients.get()
    uids = list(dict.fromkeys(args.series or [])) or series_of(client, args.study)
    if not uids:
        print(f"dicom-bridge dicomweb pull: study {args.study} not found on {settings.url}", file=sys.stderr)
        return 1
    base = args.output if args.no_study_folder else args.output / args.study
    series = [Series(uid, base / uid) for uid in uids]
    if not args.resume:
        there = [s.folder for s in series if s.folder.exists()]
        if there:
            raise Usage(f"{there[0]} exists: give --resume to complete it, or another -o"
                        + (f" ({len(there)} series folders exist)" if len(there) > 1 else ""))
    for one in series:
        _plan(client, args.study, one)
    total = sum(len(s.missing) for s in series)
    bar = _progress(total)
    lock = threading.Lock()

    def done(count: int = 1) -> None:
        if bar is not None:
            with lock:
                bar.update(count)

    try:
        with ThreadPoolExecutor(max_workers=args.parallel, thread_name_prefix="pull") as pool:
            for future in [pool.submit(_fetch, clients, args.study, s, done) for s in series if s.missing]:
                future.result()
    finally:
        if bar is not None:
            bar.close()
    failed = 0
    for one in series:
        for reason in one.failures:
            print(f"series {one.uid}: {reason}", file=sys.stderr)
        failed += len(one.missing) - one.retrieved
    retrieved = sum(s.retrieved for s in series)
    present = sum(s.present for s in series)
    print(f"{retrieved} retrieved, {present} already there, {failed} failed, of {len(series)} series into {base} "
          f"in {time.monotonic() - started:.1f} s")
    return 1 if failed or any(not s.order for s in series) else 0


def _plan(client: Any, study: str, series: Series) -> None:
    """The series' instances (QIDO-RS), their numbers, and which are to be fetched."""
    found = search(client, f"/studies/{study}/series/{series.uid}/instances", {"includefield": INSTANCE_NUMBER})

    found.sort(key=lambda item: (number(item, INSTANCE_NUMBER), str(value(item, SOP_UID))))
    for item in found:
        uid = value(item, SOP_UID)
        if uid and str(uid) not in series.order:
            series.order[str(uid)] = len(series.order)
    if not series.order:
        series.failures.append("no instances found")
        return
    have = set(_present(series.folder))
    series.present = len(have & set(series.order))
    series.missing = [uid for uid in series.order if uid not in have]


def _present(folder: Path) -> Iterator[str]:
    """The SOP Instance UIDs of the complete files in ``folder`` (a file cut short by an
    interrupted pull is not one: it is fetched again)."""
    if not folder.is_dir():
        return
    for path in sorted(folder.glob("*.dcm")):
        if path.name.startswith(TEMP_PREFIX):
            path.unlink(missing_ok=True)  # a part an interrupted pull was writing
            continue
        try:
            uid = dicomfile.text(dicomfile.read_header(path), "SOPInstanceUID")
        except InboundError:
            continue
        if uid:
            yield uid


def _fetch(clients: Clients, study: str, series: Series, done: Any) -> None:
    series.folder.mkdir(parents=True, exist_ok=True)
    path = wado.series_path(study, series.uid)
    if len(series.missing) == len(series.order):
        wanted = set(series.missing)
        _wado(clients, path, series, wanted, done)
        rest = [uid for uid in series.missing if uid in wanted]
    else:
        rest = list(series.missing)
    for uid in rest:  # what a resumed pull lacks, or what the series' answer left out
        if not _wado(clients, f"{path}/instances/{uid}", series, {uid}, done):
            series.failures.append(f"instance {uid} did not come")


def _wado(clients: Clients, path: str, series: Series, wanted: set[str], done: Any) -> bool:
    """GET ``path``; each part that is one of ``wanted`` is renamed to its file (and taken
    out of ``wanted``). Whether all of ``wanted`` came; why not is in ``series.failures``."""
    client = clients.get()
    url = client.url + path
    try:
        with client.request("GET", url, headers={"Accept": wado.ACCEPT}) as response:
            if not 200 <= response.status < 300 or response.status == 204:
                summary = response.summary(response.read(4096))
                response.raise_for_upstream(summary)
                series.failures.append(f"{path}: {summary}")
                return False
            parts = wado.parts(response.iter_available(wado.CHUNK), response.headers.get("Content-Type", ""),
                               series.folder, TEMP_PREFIX)
            try:
                for part in parts:
                    if part is None:
                        continue
                    if part.path is None:
                        series.failures.append(f"a part refused: {part.problem}")
                    elif part.sop_instance_uid in wanted:
                        wanted.discard(part.sop_instance_uid)
                        os.replace(part.path, series.folder / file_name(series.order[part.sop_instance_uid]))
                        series.retrieved += 1
                        done()
                    else:
                        part.path.unlink(missing_ok=True)
            finally:
                parts.close()
    except MultipartError as exc:
        series.failures.append(f"{path}: {exc}")
    except UpstreamError as exc:
        series.failures.append(exc.reason)
        client.close()
    except OSError as exc:  # the output folder: full, or not writable
        series.failures.append(f"{series.folder}: {exc.strerror or exc}")
    return not wanted


def _progress(total: int) -> Any:
    if not sys.stderr.isatty() or not total:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="instance", file=sys.stderr)
