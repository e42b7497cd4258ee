"""``dicom-bridge queue``: look at the delivery queue, retry dead rows, purge rows, resume a destination.

Each works whether the daemon runs or not. The command changes the queue database
itself: SQLite (WAL) lets one writer at a time in, so the daemon and the command never
see each other's changes half done. What only the running daemon can do, the command
asks for with a request row in the queue's ``meta`` table, which the daemon's main loop
takes within a second: ``resume`` puts a destination back up, ``wake`` makes its
workers claim the rows just retried. A daemon that is not running has nothing to be
told: every destination starts up, and claims its pending rows, when it starts.
See docs/operations.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import sys
import time
from collections.abc import Callable, Iterable
from contextlib import closing
from pathlib import Path
from typing import Any

from bridge.config import Config, DataDir, load_config
from bridge.config.units import parse_duration
from bridge.errors import ConfigError
from bridge.forward import admin
from bridge.forward.admin import PURGED_BY_DEFAULT
from bridge.forward.queue import PENDING, RESUME, STATES, Queue, Row, RowFilter
from bridge.forward.spool import Spool

NOT_IN_CONFIG = "(not in config)"


class _Refused(Exception):
    """The command cannot do what was asked; ``status`` is the exit code."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


def register(commands: Any) -> None:
    """Add ``queue list|show|retry|purge|resume`` to the ``dicom-bridge`` subcommands."""
    queue = commands.add_parser("queue", help="inspect the delivery queue, retry, purge, resume a destination",
                                description="Inspect and repair the delivery queue, whether the daemon runs or not.")
    actions = queue.add_subparsers(dest="action", required=True)

    show = actions.add_parser("list", help="show queue rows and counts per destination and state",
                              description="Show queue rows, oldest first, and counts per destination and state.")
    _filters(show, STATES)
    show.add_argument("--limit", type=int, default=100, help="rows shown at most (default 100)")
    show.add_argument("--json", action="store_true", help="print JSON, with whole UIDs and times")
    show.set_defaults(func=_command(_list))

    one = actions.add_parser("show", help="show queue rows in full, by id",
                             description="Show every field of the given queue rows, the whole last error "
                                         "included ('queue list' gives the ids).")
    one.add_argument("ids", metavar="ID", type=int, nargs="+", help="row ids")
    one.add_argument("--config", type=Path, help="configuration file (YAML; default: the embedded default)")
    one.set_defaults(func=_command(_show))

    retry = actions.add_parser("retry", help="put dead rows back to pending",
                               description="Put dead rows back to pending, attempts reset; the max_age clock "
                                           "restarts. Say which rows, or --all.")
    _filters(retry, None)
    retry.add_argument("--all", action="store_true", help="every dead row")
    retry.set_defaults(func=_command(_retry))

    purge = actions.add_parser("purge", help="delete rows, and spool files no row needs any more",
                               description="Delete rows (by default done, cancelled and dead ones) and the spool "
                                           "files that no remaining row needs. Say which rows, or --all.")
    _filters(purge, (*PURGED_BY_DEFAULT, PENDING))
    purge.add_argument("--all", action="store_true", help="every row in the states purged")
    purge.add_argument("--force", action="store_true", help="needed with --state pending: those are undelivered")
    purge.set_defaults(func=_command(_purge))

    resume = actions.add_parser("resume", help="put a suspended or backing-off destination back up",
                                description="Put a suspended or backing-off destination back up: it tries again "
                                            "now. The running daemon acts on it within a second.")
    resume.add_argument("destination", help="the destination's name")
    resume.add_argument("--config", type=Path, help="configuration file (YAML; default: the embedded default)")
    resume.set_defaults(func=_command(_resume))


def _filters(parser: argparse.ArgumentParser, states: Iterable[str] | None) -> None:
    parser.add_argument("--config", type=Path, help="configuration file (YAML; default: the embedded default)")
    parser.add_argument("--destination", help="rows of this destination")
    if states is not None:
        parser.add_argument("--state", choices=list(states), help="rows in this state")
    parser.add_argument("--study", metavar="UID", help="rows of this Study Instance UID")
    parser.add_argument("--accession", metavar="NUMBER", help="rows of this Accession Number")
    parser.add_argument("--patient", metavar="ID", help="rows of this Patient ID")
    parser.add_argument("--older-than", metavar="DURATION", type=_duration,
                        help="rows received (or last retried) longer ago than this: 30m, 2h, 7d")


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _row_filter(args: argparse.Namespace, states: tuple[str, ...] = ()) -> RowFilter:
    return RowFilter(destination=args.destination, states=states, study_uid=args.study,
                     accession_number=args.accession, patient_id=args.patient, older_than=args.older_than)


def _command(action: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """One place where what went wrong becomes a message and an exit status."""

    def run(args: argparse.Namespace) -> int:
        try:
            return action(args)
        except ConfigError as exc:
            print(exc, file=sys.stderr)
            return 1
        except _Refused as exc:
            print(f"dicom-bridge queue {args.action}: {exc}", file=sys.stderr)
            return exc.status
        except sqlite3.Error as exc:
            print(f"dicom-bridge queue {args.action}: the queue database: {exc}", file=sys.stderr)
            return 1

    return run


def _open(config: Config) -> Queue:
    path = DataDir(config.data_dir).queue
    if not path.exists():
        raise _Refused(f"no queue at {path}: the daemon has not run with this data_dir (see --config)")
    return Queue(path)


def _daemon_pid(queue: Queue) -> int | None:
    """The pid of the daemon that owns the queue, if it is still running."""
    pid = queue.daemon_pid()
    if pid is None:
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:  # killed without a chance to clear it
        return None
    except PermissionError:  # running as another user
        return pid
    return pid


def _require_narrowing(where: RowFilter, args: argparse.Namespace, narrowed: bool = False) -> None:
    if not (narrowed or where.narrows() or args.all):
        raise _Refused("say which rows (--destination, --study, --accession, --patient, --older-than), "
                       "or --all for every one", status=2)


# -- list ------------------------------------------------------------------------------


def _list(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    where = _row_filter(args, (args.state,) if args.state else ())
    with closing(_open(config)) as queue:
        rows = queue.select(where, args.limit)
        counts = queue.count_matching(where)
        states = queue.destination_states()
        pid = _daemon_pid(queue)
    known = set(config.destinations)
    if args.json:
        print(json.dumps(_as_json(rows, counts, states, known, pid), indent=2, ensure_ascii=False))
    else:
        for line in _table(rows, known):
            print(line)
        for line in _summary(len(rows), counts, states, known, pid):
            print(line)
    return 0


ERROR_WIDTH = 120  # characters of the last error in a table that is not shown on a terminal
MIN_ERROR_WIDTH = 40
COLUMNS = ("ID", "DESTINATION", "STATE", "ATTEMPTS", "AGE", "PATIENT", "ACCESSION", "STUDY", "SERIES",
           "SOP INSTANCE", "LAST ERROR")


def _table(rows: list[Row], known: set[str]) -> list[str]:
    """One line per row, columns aligned; UIDs shortened to their distinguishing end, the
    last error on one line, cut to what the terminal leaves it (``queue show`` has it whole)."""
    if not rows:
        return []
    now = time.time()
    cells = [list(COLUMNS)] + [
        [str(r.id), _destination(r.destination, known), r.state, str(r.attempts), _age(now - r.age_from),
         r.instance.patient_id, r.instance.accession_number, _short(r.instance.study_uid),
         _short(r.instance.series_uid), _short(r.instance.sop_instance_uid), r.last_error or ""]
        for r in rows
    ]
    widths = [max(len(line[i]) for line in cells) for i in range(len(COLUMNS) - 1)]
    room = _error_room(sum(widths) + 2 * len(widths))
    return ["  ".join([*(c.ljust(w) for c, w in zip(line, widths, strict=False)), _one_line(line[-1], room)]).rstrip()
            for line in cells]


def _error_room(used: int) -> int:
    """Characters left for the last error: the rest of a terminal's width, at least
    ``MIN_ERROR_WIDTH``; ``ERROR_WIDTH`` when the output is not a terminal."""
    if not sys.stdout.isatty():
        return ERROR_WIDTH
    return max(MIN_ERROR_WIDTH, shutil.get_terminal_size().columns - used)


def _one_line(text: str, width: int) -> str:
    """``text`` on one line (runs of white space, newlines included, become one space),
    cut with an ellipsis past ``width`` characters."""
    text = " ".join(text.split())
    return text if len(text) <= width else text[:width - 1].rstrip() + "\u2026"


def _summary(shown: int, counts: dict[tuple[str, str], int], states: dict[str, dict[str, Any]],
             known: set[str], pid: int | None) -> list[str]:
    """How many rows match, by destination and state, and how each destination is doing."""
    total = sum(counts.values())
    lines = [f"{shown} of {total} matching row(s) shown" if total else "no matching rows"]
    for name in sorted({d for d, _ in counts}):
        by_state = ", ".join(f"{s} {n}" for s in STATES if (n := counts.get((name, s), 0)))
        lines.append(f"{_destination(name, known)}: {by_state}{_health(name, states, known)}")
    lines.append(f"daemon: running (pid {pid})" if pid else
                 "daemon: not running (destination states are as it left them)")
    return lines


def _health(name: str, states: dict[str, dict[str, Any]], known: set[str]) -> str:
    state = states.get(name)
    if name not in known or state is None:
        return ""
    if state["state"] == "up":  # a note, e.g. that a delivery worker was restarted
        return f"; {state['reason']}" if state["reason"] else ""
    detail = f"; destination {state['state']}"
    if state["until"] and state["until"] > time.time():
        detail += f" for {_age(state['until'] - time.time())} more"
    return detail + (f" ({state['reason']})" if state["reason"] else "")


def _as_json(rows: list[Row], counts: dict[tuple[str, str], int], states: dict[str, dict[str, Any]],
             known: set[str], pid: int | None) -> dict[str, Any]:
    return {"daemon": {"running": pid is not None, "pid": pid}, **admin.listing(rows, counts, states, known)}


def _show(args: argparse.Namespace) -> int:
    """Every field of the rows asked for, one per line; the last error whole (a line of
    its own per line it has)."""
    config = load_config(args.config)
    known = set(config.destinations)
    with closing(_open(config)) as queue:
        rows = {r.id: r for r in queue.by_id(args.ids)}
    for n, row_id in enumerate(args.ids):
        if n:
            print()
        row = rows.get(row_id)
        if row is None:
            print(f"row {row_id}: not in the queue")
            continue
        i = row.instance
        fields = [
            ("destination", _destination(row.destination, known)), ("state", row.state),
            ("attempts", str(row.attempts)), ("priority", str(row.priority)),
            ("received", admin.iso(row.received_at)),
            ("retried", admin.iso(row.age_from) if row.age_from != row.received_at else None),
            ("next attempt", admin.iso(max(row.next_attempt_at, row.age_from)) if row.state == PENDING else None),
            ("done", admin.iso(row.done_at)), ("patient id", i.patient_id), ("accession", i.accession_number),
            ("study", i.study_uid), ("series", i.series_uid), ("sop instance", i.sop_instance_uid),
            ("sop class", i.sop_class_uid), ("transfer syntax", i.transfer_syntax), ("size", f"{i.size} bytes"),
            ("sha-256", i.sha256), ("calling ae", i.calling_ae), ("called ae", i.called_ae), ("peer", i.peer),
            ("spool file", str(i.spool_path)),
        ]
        print(f"row {row.id}")
        for name, value in fields:
            if value:
                print(f"  {name + ':':<17}{value}")
        if row.last_error:
            first, *rest = row.last_error.splitlines() or [""]
            print(f"  {'last error:':<17}{first}")
            for line in rest:
                print(f"  {'':<17}{line}")
    return 0 if len(rows) == len(set(args.ids)) else 1


def _destination(name: str, known: set[str]) -> str:
    return name if name in known else f"{name} {NOT_IN_CONFIG}"


def _short(uid: str, keep: int = 14) -> str:
    """The end of a UID: UIDs under one root differ there. Whole UIDs are in --json."""
    return uid if len(uid) <= keep + 3 else "..." + uid[-keep:]


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{max(0, int(seconds))}s"


# -- retry, purge, resume --------------------------------------------------------------


def _retry(args: argparse.Namespace) -> int:
    where = _row_filter(args)
    _require_narrowing(where, args)
    config = load_config(args.config)
    with closing(_open(config)) as queue:
        retried = queue.retry(where)
        pid = _daemon_pid(queue)
    total = sum(retried.values())
    detail = ", ".join(f"{_destination(d, set(config.destinations))} {n}" for d, n in sorted(retried.items()))
    print(f"retried {total} dead row(s)" + (f": {detail}" if detail else ""))
    if total:
        print(f"the running daemon (pid {pid}) takes them within a second" if pid else
              "the daemon is not running: they are delivered when it starts")
    if any(d not in config.destinations for d in retried):
        print(f"rows of destinations {NOT_IN_CONFIG} wait until they are configured again")
    return 0


def _purge(args: argparse.Namespace) -> int:
    if args.state == PENDING and not args.force:
        raise _Refused("pending rows are not delivered yet: purging them needs --force", status=2)
    where = _row_filter(args, (args.state,) if args.state else PURGED_BY_DEFAULT)
    _require_narrowing(where, args, narrowed=args.state is not None)
    config = load_config(args.config)
    spool = Spool(DataDir(config.data_dir))
    with closing(_open(config)) as queue:
        purged = admin.purge(queue, spool, where)
    detail = ", ".join(f"{d} {s} {n}" for (d, s), n in sorted(purged.rows.items()))
    print(f"purged {sum(purged.rows.values())} row(s)" + (f": {detail}" if detail else ""))
    print(f"deleted {purged.files} spool file(s) that no row needs any more")
    return 0


def _resume(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    name = args.destination
    if name not in config.destinations:
        known = ", ".join(sorted(config.destinations)) or "none"
        raise _Refused(f"no destination {name!r} in the configuration (destinations: {known})")
    with closing(_open(config)) as queue:
        queue.due_now(name)
        queue.request(RESUME, name)
        state = queue.destination_states().get(name, {}).get("state", "up")
        pid = _daemon_pid(queue)
    if pid:
        print(f"asked the running daemon (pid {pid}) to resume {name} (now {state}); it acts within a second")
    else:
        print(f"the daemon is not running: {name} starts up when it starts")
    return 0
