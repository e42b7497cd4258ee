"""The ``dicom-bridge`` command."""

from __future__ import annotations

import argparse
import logging
import sys
from datetime import datetime
from pathlib import Path

from bridge import __version__, log
from bridge.cli import convert, dicomweb, fetch, queue
from bridge.config import load_config
from bridge.errors import ConfigError, StartError

LOGGER = logging.getLogger("bridge")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dicom-bridge", description="A DICOM bridge daemon.")
    parser.add_argument("--version", action="version", version=f"dicom-bridge {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run the daemon", description=(
        "Run the daemon. Without --config: the embedded default (AE DICOM_BRIDGE on 127.0.0.1:11112, "
        "data under ./dicom-bridge-data, every instance kept in the local archive)."))
    run.add_argument("--config", type=Path, help="configuration file (YAML)")
    run.add_argument("--log-format", choices=["text", "json"],
                     help="text (one line per event) or json (JSON lines); default: the config's log_format, text")
    run.set_defaults(func=_run)

    route = commands.add_parser(
        "route", help="dry run: which rules match each file, and where it would go",
        description="For each file (folders are walked): every rule considered, whether it matched, the first "
                    "condition that failed and why, and the destinations with the changes each would get. "
                    "A file goes through the listener's own checks first, and one that a C-STORE would have "
                    "refused says so with the status it would get. Nothing is sent. Exit status: 0 when every "
                    "file would be accepted, 1 when any would be refused or is not there, 2 when the "
                    "configuration is invalid.")
    route.add_argument("--config", type=Path, help="configuration file (YAML); default: the embedded default")
    route.add_argument("--calling-ae", default="ROUTE", help="the calling AE title to assume (default ROUTE)")
    route.add_argument("--called-ae", help="the called AE title to assume (default: the config's ae_title)")
    route.add_argument("--peer", default="127.0.0.1", help="the peer address to assume (default 127.0.0.1)")
    route.add_argument("--at", type=datetime.fromisoformat, help="the local time to assume, e.g. 2026-11-23T14:30")
    route.add_argument("--verb", choices=["store", "find", "retrieve"], default="store",
                       help="which rules: store (default), or find/retrieve with the file as the identifier")
    route.add_argument("paths", type=Path, nargs="+", metavar="PATH", help="DICOM files or folders")
    route.set_defaults(func=_route)

    check = commands.add_parser(
        "check", help="validate a configuration and its rules",
        description="Validate a configuration file and its rules without starting anything. Every error is "
                    "printed at once, each with its path, and the exit status is 1. A valid file prints "
                    "'FILE: OK' and exits 0, after any notes (what was filled in) and warnings (what is "
                    "valid but probably not meant, e.g. rules that can never match, or no rule that stores, "
                    "so that every C-STORE would be refused).")
    check.add_argument("--config", type=Path, required=True, help="configuration file (YAML)")
    check.set_defaults(func=_check)
    queue.register(commands)
    convert.register(commands)
    fetch.register(commands)
    dicomweb.register(commands)

    serve = commands.add_parser(
        "serve-static", help="serve a static DICOMweb tree over HTTP",
        description="Serve the static DICOMweb tree in DIR (the folder holding studies/) read-only: QIDO-RS "
                    "searches with filters, limit and offset, series and instance metadata, frames and bulk "
                    "data (docs/static.md). One log line per request.")
    serve.add_argument("dir", type=Path, metavar="DIR", help="the tree's root folder")
    serve.add_argument("--listen", type=_host_port, default=("127.0.0.1", 8042), metavar="HOST:PORT",
                       help="address to listen on (default 127.0.0.1:8042; [::1]:8042 for IPv6)")
    serve.set_defaults(func=_serve_static)

    args = parser.parse_args(argv)
    return int(args.func(args))


def _run(args: argparse.Namespace) -> int:
    from bridge.daemon import Daemon

    log.setup(log_format=args.log_format or "text")
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"dicom-bridge: refusing to start, {exc}", file=sys.stderr)
        return 2
    log.setup(config.log_level, args.log_format or config.log_format)
    daemon = Daemon(config, args.config)
    daemon.handle_signals()
    try:
        daemon.start()
    except (StartError, OSError) as exc:
        LOGGER.error("cannot start: %s", exc)
        return 1
    return daemon.serve_forever()


def _host_port(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, not {value!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def _serve_static(args: argparse.Namespace) -> int:
    import uvicorn

    from bridge.static.serve import app

    log.setup()
    if not args.dir.is_dir():
        print(f"dicom-bridge: {args.dir} is not a folder", file=sys.stderr)
        return 2
    host, port = args.listen
    # log_config=None: uvicorn's access lines go through our log format (bridge.log).
    uvicorn.run(app(args.dir), host=host, port=port, log_config=None, access_log=True)
    return 0


def _check(args: argparse.Namespace) -> int:
    from bridge.cli import report

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 1
    for note in config.notes:
        print(f"note: {note}")
    errors = report.http_errors(config)
    if errors:
        print(f"{args.config or 'embedded default'}: {len(errors)} error(s)", file=sys.stderr)
        for error in errors:
            print(f"  {error}", file=sys.stderr)
        return 1
    found = report.warnings(config, args.config)
    for warning in found:
        print(f"warning: {warning}")
    print(f"{args.config}: OK" + (f", {len(found)} warning(s)" if found else ""))
    return 0


def _route(args: argparse.Namespace) -> int:
    from bridge.cli import report
    from bridge.routing.rules import Context

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    ctx = Context(calling_ae=args.calling_ae, called_ae=args.called_ae or config.ae_title, peer=args.peer,
                  now=args.at)
    missing = [p for p in args.paths if not p.exists()]
    for path in missing:
        print(f"{path}: no such file or folder", file=sys.stderr)
    refused = 0
    for path in report.files([p for p in args.paths if p.exists()]):
        lines, status = report.route_lines(config, path, ctx, args.verb)
        print("\n".join(lines))
        refused += status != 0x0000
    return 1 if missing or refused else 0
