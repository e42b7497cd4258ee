"""The ``dicom-bridge`` command."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from bridge import __version__, log
from bridge.config import load_config
from bridge.errors import ConfigError

LOGGER = logging.getLogger("bridge")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dicom-bridge", description="A DICOM bridge daemon.")
    parser.add_argument("--version", action="version", version=f"dicom-bridge {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run the daemon", description=(
        "Run the daemon. Without --config: the embedded default (AE DICOM_BRIDGE on 127.0.0.1:11112, "
        "data under ./dicom-bridge-data, every instance kept in the local archive)."))
    run.add_argument("--config", type=Path, help="configuration file (YAML)")
    run.set_defaults(func=_run)

    check = commands.add_parser("check", help="validate a configuration and its rules")
    check.add_argument("--config", type=Path, required=True, help="configuration file (YAML)")
    check.set_defaults(func=_check)

    args = parser.parse_args(argv)
    return int(args.func(args))


def _run(args: argparse.Namespace) -> int:
    from bridge.daemon import Daemon

    log.setup()
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"dicom-bridge: refusing to start, {exc}", file=sys.stderr)
        return 2
    log.setup(config.log_level)
    daemon = Daemon(config, args.config)
    try:
        daemon.start()
    except OSError as exc:
        LOGGER.error("cannot start: %s", exc)
        return 1
    return daemon.serve_forever()


def _check(args: argparse.Namespace) -> int:
    try:
        load_config(args.config)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 1
    print(f"{args.config}: OK")
    return 0
