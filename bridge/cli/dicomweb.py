"""``dicom-bridge dicomweb``: look up, pull, push and delete studies on a DICOMweb server
(docs/operations.md).

Exit status, for every subcommand: 0 when everything asked for was done, 1 when anything
failed or was not found (each reason on stderr), 2 for a usage error (flags, the
configuration, a folder in the way, no confirmation). A progress bar is shown when
stderr is a terminal; a summary line ends stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path
from typing import Any

from pydicom.uid import UID

from bridge import log
from bridge.cli import dicomweb_peer
from bridge.cli.dicomweb_peer import Clients, RetryingClient, Usage
from bridge.cli.dicomweb_qido import search, series_of, study_of
from bridge.config import HttpPeer
from bridge.errors import UpstreamError, UpstreamMisconfigured

# Orthanc answers DELETE on its DICOMweb URLs with these: it does not implement it.
UNSUPPORTED = (404, 405, 501)


def register(commands: Any) -> None:
    parser = commands.add_parser(
        "dicomweb", help="look up, pull, push and delete studies on a DICOMweb server",
        description="Commands against a DICOMweb server: a dicomweb destination or source of the configuration "
                    "(--config FILE --target NAME), or --url with authentication whose secrets come from files "
                    "or env:NAME. Exit status: 0 done, 1 something failed or was not found, 2 usage error.")
    sub = parser.add_subparsers(dest="dicomweb_command", required=True)

    lookup = sub.add_parser("lookup", help="the study of a series, or the series of a study")
    which = lookup.add_mutually_exclusive_group(required=True)
    which.add_argument("--series", type=_uid, metavar="UID", help="print the Study Instance UID of this series")
    which.add_argument("--study", type=_uid, metavar="UID", help="print the Series Instance UIDs of this study")
    lookup.set_defaults(func=_lookup)

    pull = sub.add_parser("pull", help="retrieve a study (or series of it) into DIR/<study>/<series>/",
                          description="Retrieve with WADO-RS into DIR/<study>/<series>/file000000.dcm upwards, "
                                      "in InstanceNumber order, streamed to disk. An existing series folder is "
                                      "refused unless --resume, which fetches only the instances not there.")
    pull.add_argument("--study", type=_uid, required=True, metavar="UID")
    pull.add_argument("--series", type=_uid, nargs="+", metavar="UID", help="only these series of the study")
    pull.add_argument("-o", "--output", type=Path, required=True, metavar="DIR")
    pull.add_argument("--no-study-folder", action="store_true", help="write DIR/<series>/, without the study level")
    pull.add_argument("--resume", action="store_true", help="complete existing series folders")
    pull.add_argument("--parallel", type=int, default=2, metavar="N", help="series downloaded at once (default 2)")
    pull.set_defaults(func=_pull)

    push = sub.add_parser("push", help="store every DICOM file of a folder tree with STOW-RS",
                          description="Walk DIR and store every DICOM file with the daemon's batched STOW-RS; "
                                      "files that are not DICOM are reported and skipped. --include and "
                                      "--exclude are regular expressions searched in each path relative to DIR.")
    push.add_argument("dir", type=Path, metavar="DIR")
    push.add_argument("--include", type=_regex, metavar="REGEX", help="only paths that match")
    push.add_argument("--exclude", type=_regex, metavar="REGEX", help="not paths that match")
    push.add_argument("--parallel", type=int, default=2, metavar="N", help="STOW-RS requests at once (default 2)")
    push.add_argument("--batch", type=int, metavar="N", help="instances per request (default: the target's "
                      "batch.max_instances, 50)")
    push.set_defaults(func=_push)

    delete = sub.add_parser("delete", help="delete a study or series",
                            description="DICOMweb DELETE; for a server that does not implement it (Orthanc "
                                        "answers 405), --orthanc-rest URL deletes through Orthanc's REST API "
                                        "(/tools/lookup, then DELETE /studies/{id} or /series/{id}) with the "
                                        "same credentials. Asks for confirmation unless --yes.")
    delete.add_argument("--study", type=_uid, required=True, metavar="UID")
    delete.add_argument("--series", type=_uid, metavar="UID", help="only this series of the study")
    delete.add_argument("--orthanc-rest", metavar="URL", help="Orthanc's REST API root, e.g. http://pacs:8042")
    delete.add_argument("--yes", action="store_true", help="do not ask")
    delete.set_defaults(func=_delete)

    for command in (lookup, pull, push, delete):
        dicomweb_peer.add_options(command)


def _uid(value: str) -> str:
    if not UID(value).is_valid:
        raise argparse.ArgumentTypeError(f"not a UID: {value!r}")
    return value


def _regex(value: str) -> Any:
    import re

    try:
        return re.compile(value)
    except re.error as exc:
        raise argparse.ArgumentTypeError(f"not a regular expression: {value!r}: {exc}") from None


def _run(args: argparse.Namespace, body: Any) -> int:
    """Build the peer, run ``body(args, clients)``; one place turns errors into exit statuses."""
    log.setup("ERROR")
    name = f"dicom-bridge dicomweb {args.dicomweb_command}"
    try:
        settings, policy = dicomweb_peer.peer(args)
    except Usage as exc:
        print(f"{name}: {exc}", file=sys.stderr)
        return 2
    clients = Clients(settings, policy)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # pydicom on odd values: not ours to report
            return int(body(args, settings, clients))
    except Usage as exc:
        print(f"{name}: {exc}", file=sys.stderr)
        return 2
    except UpstreamError as exc:
        print(f"{name}: {exc.reason}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        return 130
    finally:
        clients.close()


# -- lookup ---------------------------------------------------------------------------------


def _lookup(args: argparse.Namespace) -> int:
    return _run(args, _lookup_body)


def _lookup_body(args: argparse.Namespace, settings: HttpPeer, clients: Clients) -> int:
    client = clients.get()
    if args.series:
        study = study_of(client, args.series)
        if study is None:
            print(f"dicom-bridge dicomweb lookup: series {args.series} not found on {settings.url}", file=sys.stderr)
            return 1
        print(study)
        return 0
    series = series_of(client, args.study)
    if not series:
        print(f"dicom-bridge dicomweb lookup: study {args.study} not found on {settings.url}", file=sys.stderr)
        return 1
    print("\n".join(series))
    return 0


# -- pull, push -----------------------------------------------------------------------------


def _pull(args: argparse.Namespace) -> int:
    from bridge.cli import dicomweb_pull

    return _run(args, dicomweb_pull.pull)


def _push(args: argparse.Namespace) -> int:
    from bridge.cli import dicomweb_push

    return _run(args, dicomweb_push.push)


# -- delete ---------------------------------------------------------------------------------


def _delete(args: argparse.Namespace) -> int:
    return _run(args, _delete_body)


def _delete_body(args: argparse.Namespace, settings: HttpPeer, clients: Clients) -> int:
    client = clients.get()
    what = f"series {args.series} of study {args.study}" if args.series else f"study {args.study}"
    if args.series:
        exists = study_of(client, args.series) == args.study
    else:
        exists = bool(search(client, "/studies", {"StudyInstanceUID": args.study}))
    if not exists:
        print(f"dicom-bridge dicomweb delete: {what} not found on {settings.url}", file=sys.stderr)
        return 1
    if not args.yes:
        if not sys.stdin.isatty():
            raise Usage(f"not a terminal: give --yes to delete {what}")
        answer = input(f"Delete {what} from {settings.url}? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            print("not deleted", file=sys.stderr)
            return 1
    path = f"/studies/{args.study}" + (f"/series/{args.series}" if args.series else "")
    with client.request("DELETE", client.url + path) as response:
        content = response.read(4096)
        status, summary = response.status, response.summary(content)
    if 200 <= status < 300:
        print(f"deleted {what} (DICOMweb DELETE)")
        return 0
    if status not in UNSUPPORTED:
        response.raise_for_upstream(summary)
        print(f"dicom-bridge dicomweb delete: {what}: {summary}", file=sys.stderr)
        return 1
    if not args.orthanc_rest:
        print(f"dicom-bridge dicomweb delete: the server does not implement DICOMweb DELETE ({summary}); "
              "for Orthanc, give --orthanc-rest URL", file=sys.stderr)
        return 1
    return _orthanc_delete(args, settings, clients, what)


def _orthanc_delete(args: argparse.Namespace, settings: HttpPeer, clients: Clients, what: str) -> int:
    """Orthanc's REST API: ``POST /tools/lookup`` finds its id of the study or series,
    ``DELETE /studies/{id}`` (or ``/series/{id}``) removes it."""
    try:
        rest = settings.model_copy(update={"url": HttpPeer.model_validate({"url": args.orthanc_rest}).url})
    except ValueError:
        raise Usage(f"--orthanc-rest: expected an http:// or https:// URL, not {args.orthanc_rest!r}") from None
    client = RetryingClient(rest, clients.policy)
    level = "Series" if args.series else "Study"
    uid = args.series or args.study
    try:
        with client.request("POST", f"{rest.url}/tools/lookup", body=uid.encode()) as response:
            content = response.read(1 << 20)
            response.raise_for_upstream(response.summary(content))
            if response.status != 200:
                raise UpstreamMisconfigured(f"{rest.url}/tools/lookup: {response.summary(content)}")
        try:
            found = [item for item in json.loads(content) if item.get("Type") == level]
        except (ValueError, AttributeError, TypeError):
            raise UpstreamMisconfigured(f"{rest.url}/tools/lookup: not Orthanc's answer") from None
        if not found:
            print(f"dicom-bridge dicomweb delete: {what} not found through {rest.url}", file=sys.stderr)
            return 1
        collection = "series" if args.series else "studies"
        url = f"{rest.url}/{collection}/{found[0]['ID']}"
        with client.request("DELETE", url) as response:
            content = response.read(4096)
            response.raise_for_upstream(response.summary(content))
            if not 200 <= response.status < 300:
                print(f"dicom-bridge dicomweb delete: {what}: {url}: {response.summary(content)}", file=sys.stderr)
                return 1
    finally:
        client.close()
    print(f"deleted {what} (Orthanc REST API)")
    return 0
