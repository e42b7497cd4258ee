"""``dicom-bridge rad69 fetch`` (and ``dicom-bridge fetch``): a study, series or list of
instances retrieved from one source of the configuration into a folder, as a C-MOVE
would fetch it (``bridge.sources.retrieval``: located, fetched, each file checked).

Each instance is written as ``DIR/<SOPInstanceUID>.dcm``: a source's temporary file is
moved there (copied, then removed, when DIR is on another file system), the archive's
own files (``local``) are copied. A file appears in DIR only once complete.
"""

from __future__ import annotations

import argparse
import errno
import os
import shutil
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import UID

from bridge import log
from bridge.config import LOCAL, Config, load_config
from bridge.config.sources import RETRIEVE_TIMEOUT
from bridge.dataset.query import STUDY_ROOT_MOVE, Query, parse
from bridge.errors import ConfigError, UpstreamError
from bridge.metrics import Metrics
from bridge.sources import archive_root, build, temp_dir
from bridge.sources.retrieval import Fetched, Retrieval

RAD69 = "rad69"  # the source type ``rad69 fetch`` picks by itself when the config has one


class Usage(Exception):
    """What the command line or the configuration does not allow: exit 2 with the message."""


def register(commands: Any) -> None:
    rad69 = commands.add_parser(
        "rad69", help="IHE XDS-I.b (RAD-69) retrieval",
        description="Commands for the rad69 source (IHE XDS-I.b Retrieve Imaging Document Set).")
    rad69_commands = rad69.add_subparsers(dest="rad69_command", required=True)
    _options(rad69_commands.add_parser(
        "fetch", help="retrieve a study, series or instances into a folder",
        description="Retrieve a study, a series of it, or instances of it into DIR, one file "
                    "<SOPInstanceUID>.dcm each, from the configuration's source of type rad69 (or the one "
                    "named with --source; with no rad69 source, the configuration's only source). "
                    + _EXIT), prefer=RAD69)
    _options(commands.add_parser(
        "fetch", help="retrieve a study, series or instances from a source into a folder",
        description="Retrieve a study, a series of it, or instances of it into DIR, one file "
                    "<SOPInstanceUID>.dcm each, from the source named with --source (or the configuration's "
                    "only source), as a C-MOVE through that source would. " + _EXIT), prefer=None)


_EXIT = ("A progress bar is shown when stderr is a terminal; a summary line ends the output. Exit status: 0 "
         "when every instance came, 1 when any did not (each is listed with the reason) or nothing was found, "
         "2 when the configuration is invalid, the source cannot be chosen or locating fails.")


def _options(parser: argparse.ArgumentParser, prefer: str | None) -> None:
    parser.add_argument("--config", type=Path, required=True, help="configuration file (YAML)")
    parser.add_argument("--study", type=_uid, required=True, metavar="UID", help="the Study Instance UID")
    parser.add_argument("--series", type=_uid, metavar="UID", help="only this series of the study")
    parser.add_argument("--instances", type=_uid, nargs="+", metavar="UID",
                        help="only these SOP Instance UIDs of the study (and of --series, when given)")
    parser.add_argument("-o", "--output", type=Path, required=True, metavar="DIR",
                        help="the folder the files are written to (made when missing)")
    parser.add_argument("--source", metavar="NAME", help="the source to retrieve from (a key of sources:, or local)")
    parser.set_defaults(func=run, prefer=prefer)


def _uid(value: str) -> str:
    if not UID(value).is_valid:
        raise argparse.ArgumentTypeError(f"not a UID: {value!r}")
    return value


def run(args: argparse.Namespace) -> int:
    log.setup("ERROR")  # what goes wrong is in the summary and the failure lines, not logged twice
    command = "dicom-bridge rad69 fetch" if args.prefer == RAD69 else "dicom-bridge fetch"
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    try:
        name = choose_source(config, args.source, args.prefer)
        folders = [(args.output, "the output folder")]
        if name != LOCAL:  # the archive's files are read where they are
            folders.append((temp_dir(config), "the folder for retrieved files"))
        for folder, what in folders:
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise Usage(f"cannot create {what} {folder}: {exc.strerror or exc}") from exc
        source = build(name, config, Metrics())
    except (Usage, ValueError) as exc:
        print(f"{command}: {exc}", file=sys.stderr)
        return 2
    with warnings.catch_warnings():
        # pydicom warns of each odd value it reads; a file it cannot read is a failure with the reason.
        warnings.simplefilter("ignore", UserWarning)
        return _fetch(command, args, config, name, source)


def choose_source(config: Config, name: str | None, prefer: str | None) -> str:
    """The source to retrieve from: ``name``; else the one source of type ``prefer``;
    else the configuration's only source (``local`` counts when there is one archive).
    ``Usage`` says why none can be chosen."""
    names = [*config.sources, *([LOCAL] if archive_root(config) is not None else [])]
    if name is not None:
        if name in names:
            return name
        if name == LOCAL:
            raise Usage("source 'local' needs exactly one destination of type: archive")
        raise Usage(f"no source {name!r} in the configuration" + (f" (sources: {', '.join(names)})" if names else ""))
    if prefer is not None:
        preferred = [n for n, s in config.sources.items() if str(s.type) == prefer]
        if len(preferred) == 1:
            return preferred[0]
        if preferred:
            raise Usage(f"several sources of type {prefer} ({', '.join(preferred)}): choose one with --source")
    if len(names) == 1:
        return names[0]
    if not names:
        raise Usage("the configuration has no source (sources:, or one destination of type: archive for local)")
    raise Usage(f"several sources ({', '.join(names)}): choose one with --source")


def retrieve_query(study: str, series: str | None = None, instances: Sequence[str] = ()) -> Query:
    """The C-MOVE identifier (Study Root) for a study, a series of it or instances of it:
    STUDY, SERIES or IMAGE level, with the UIDs above the level that are known."""
    ds = Dataset()
    ds.QueryRetrieveLevel = "IMAGE" if instances else "SERIES" if series else "STUDY"
    ds.StudyInstanceUID = study
    if series:
        ds.SeriesInstanceUID = series
    if instances:
        ds.SOPInstanceUID = list(instances) if len(instances) > 1 else instances[0]
    return parse(ds, STUDY_ROOT_MOVE)


def deliver(fetched: Fetched, folder: Path) -> Path:
    """``fetched`` as ``folder/<SOPInstanceUID>.dcm``, complete once it has that name: a
    temporary file moved (copied and removed across file systems), another copied."""
    target = folder / f"{fetched.ref.sop_instance_uid}.dcm"
    if fetched.temporary:
        try:
            os.replace(fetched.path, target)
            return target
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
    partial = folder / f".{fetched.ref.sop_instance_uid}.dcm.part"
    try:
        shutil.copyfile(fetched.path, partial)
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return target


def _fetch(command: str, args: argparse.Namespace, config: Config, name: str, source: Any) -> int:
    asked = list(dict.fromkeys(args.instances or []))
    what = f"series {args.series} of study {args.study}" if args.series else f"study {args.study}"
    settings = config.sources.get(name)
    timeout = settings.retrieve_timeout if settings is not None else RETRIEVE_TIMEOUT  # local: no settings
    started = time.monotonic()
    retrieval = Retrieval(retrieve_query(args.study, args.series, asked), [source], {name: timeout})
    retrieved = 0
    failures: list[tuple[str, str]] = []
    progress = None
    try:
        try:
            located = retrieval.locate()
        except UpstreamError as exc:
            reason = exc.reason if exc.reason.startswith(f"source {name}:") else f"source {name}: {exc.reason}"
            print(f"{command}: cannot locate {what}: {reason}", file=sys.stderr)
            return 2
        found = {ref.sop_instance_uid for ref in located}
        missing = [uid for uid in asked if uid not in found]
        progress = _progress(len(located))
        for item in retrieval:
            if item is None:
                continue
            uid = item.ref.sop_instance_uid
            if isinstance(item, Fetched):
                try:
                    if not UID(uid).is_valid:  # it names the file: nothing but digits and dots
                        raise ValueError(f"source {name} gave it as {uid!r}, not a UID: not written")
                    deliver(item, args.output)
                    retrieved += 1
                except (OSError, ValueError) as exc:
                    reason = f"cannot write it to {args.output}: {exc.strerror or exc}" \
                        if isinstance(exc, OSError) else str(exc)
                    failures.append((uid, reason))
                finally:
                    item.done()
            else:
                failures.append((uid, item.failure))
            if progress is not None:
                progress.update(1)
    except KeyboardInterrupt:
        print(f"{command}: interrupted", file=sys.stderr)
        return 130
    finally:
        if progress is not None:
            progress.close()
        retrieval.stop()
        source.close()
    for uid, reason in failures:
        print(f"{uid}: failed: {reason}", file=sys.stderr)
    for uid in missing:
        print(f"{uid}: not found: source {name} locates no such instance in {what}", file=sys.stderr)
    if not located and not asked:
        print(f"{what}: not found: source {name} locates no instance of it", file=sys.stderr)
    print(f"{retrieved} retrieved, {len(failures)} failed of {len(located)} located"
          + (f", {len(missing)} not found" if missing else "") + f" in {time.monotonic() - started:.1f} s")
    return 1 if failures or missing or not located else 0


def _progress(total: int) -> Any:
    if not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="instance", file=sys.stderr)
