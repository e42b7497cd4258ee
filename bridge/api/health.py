"""Readiness (``/readyz``): can the daemon take an image now and keep it? Each check
answers ``(ok, detail)``; a failing one makes ``/readyz`` answer 503 and says why.

- ``listening``: the DIMSE listener accepts associations;
- ``queue``: the queue database answers a read within a couple of seconds;
- ``spool``: a file can be created, written and removed in the spool's ``incoming``
  folder, and the spool's file system has more free than ``spool.min_free`` (below it,
  C-STORE is refused with 0xA700 anyway).

A destination that is down does not make the daemon unready: it still takes images, and
queues them (``dicom_bridge_destination_state`` and the alerts say so)."""

from __future__ import annotations

import os
import sqlite3
import uuid
from typing import Any

from bridge.api.runtime import Runtime
from bridge.config.units import format_size

QUEUE_TIMEOUT = 2.0  # seconds the queue check waits for a lock


def readiness(runtime: Runtime) -> dict[str, Any]:
    """``{"ready": bool, "checks": {name: {"ok": bool, "detail": str}}}``."""
    checks = {"listening": _listening(runtime), "queue": _queue(runtime), "spool": _spool(runtime)}
    return {
        "ready": all(ok for ok, _ in checks.values()),
        "checks": {name: {"ok": ok, "detail": detail} for name, (ok, detail) in checks.items()},
    }


def _listening(runtime: Runtime) -> tuple[bool, str]:
    listener = runtime.listener
    if listener is None or not listener.serving:
        return False, "the DIMSE listener is not accepting associations (starting or stopping)"
    return True, f"accepting associations on {runtime.config.listen.host}:{listener.port}"


def _queue(runtime: Runtime) -> tuple[bool, str]:
    if runtime.queue is None:
        return False, "the queue is not open (starting or stopping)"
    path = runtime.queue.path
    try:
        # A connection of its own: the daemon's is shared by its workers, and this must
        # not wait behind them, nor change anything.
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=QUEUE_TIMEOUT)
        try:
            db.execute("SELECT count(*) FROM meta").fetchone()
        finally:
            db.close()
    except sqlite3.Error as exc:
        return False, f"the queue database {path} cannot be read: {exc}"
    return True, f"{path} answers"


def _spool(runtime: Runtime) -> tuple[bool, str]:
    folder = runtime.spool.incoming
    probe = folder / f".readyz-{uuid.uuid4().hex}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, b"readyz")
        finally:
            os.close(fd)
            probe.unlink(missing_ok=True)
    except OSError as exc:
        return False, f"the spool folder {folder} is not writable: {exc.strerror or exc}"
    try:
        free = runtime.spool.free_bytes()
    except OSError as exc:
        return False, f"the spool's free space cannot be read: {exc.strerror or exc}"
    floor = runtime.config.spool.min_free
    if free < floor:
        return False, (f"{format_size(free)} free on the spool's file system, below spool.min_free "
                       f"({format_size(floor)}): C-STOREs are refused with 0xA700")
    return True, f"writable, {format_size(free)} free (spool.min_free {format_size(floor)})"
